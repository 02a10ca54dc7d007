import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,  # noqa: E402
                          OPTConfig, OPTForCausalLM, Qwen2Config, Qwen2ForCausalLM)

VOCAB = 96


def tiny_model(family: str, seed: int = 0):
    """A tiny random causal LM of one family; GQA wherever the family has it."""
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif family == "mistral":
        model = MistralForCausalLM(MistralConfig(**common, sliding_window=None))
    elif family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))          # q/k/v biases
    elif family == "opt":
        model = OPTForCausalLM(OPTConfig(vocab_size=VOCAB, hidden_size=64, ffn_dim=96, num_hidden_layers=2,
                                         num_attention_heads=4, word_embed_proj_dim=64, max_position_embeddings=256))
    else:
        raise ValueError(family)
    # Random init gives near-zero biases and unit norms; perturb them so transforms are really exercised.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return model.eval()


FAMILIES = ["llama", "mistral", "qwen2", "opt"]


@pytest.fixture
def tokens():
    torch.manual_seed(1)
    return torch.randint(0, VOCAB, (8, 32))


def save_tiny(path, family: str = "llama"):
    """A tiny model with a word-level tokenizer, saved as a local Hugging Face directory."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<pad>": 1, **{w: i + 2 for i, w in enumerate(
        "the a of and to in is was for on as with by at from it that this are be has had an or".split())}}
    vocab.update({chr(97 + i) * 2: len(vocab) for i in range(26)})
    assert len(vocab) <= VOCAB
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>")
    tiny_model(family).save_pretrained(path)
    fast.save_pretrained(path)
    return str(path)


def write_text(path, n_words: int = 6000, seed: int = 0):
    import random
    rng = random.Random(seed)
    words = "the a of and to in is was for on as with by at from it that this are be".split()
    path.write_text(" ".join(rng.choice(words) for _ in range(n_words)))
    return str(path)
