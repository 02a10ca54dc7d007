import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers import (Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig,  # noqa: E402
                          LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, OPTConfig, OPTForCausalLM,
                          Phi3Config, Phi3ForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

VOCAB = 96


@pytest.fixture(autouse=True)
def eager_quant_kernels_between_tests():
    """A run through the CLI switches the process's quantizer kernels (--quant_kernels auto): each test starts
    from the eager ones, whatever ran before it."""
    from affinequant.quant.quantizer import KERNELS
    KERNELS.use("eager")
    yield
    KERNELS.use("eager")


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
    elif family == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(**common, head_dim=16))      # q_norm / k_norm
    elif family == "gemma2":
        # sliding-window layers (window 8) alternate with global ones; soft-capped attention logits, eager
        model = Gemma2ForCausalLM(Gemma2Config(**common, head_dim=16, sliding_window=8, query_pre_attn_scalar=24))
    elif family == "gemma3":
        # q_norm / k_norm, and sliding layers with their own RoPE base (local vs global)
        model = Gemma3ForCausalLM(Gemma3TextConfig(**common, head_dim=16, sliding_window=8, query_pre_attn_scalar=24,
                                                   layer_types=["sliding_attention", "full_attention"]))
    elif family == "phi3":          # fused qkv_proj and gate_up_proj
        model = Phi3ForCausalLM(Phi3Config(**common, pad_token_id=0, bos_token_id=1, eos_token_id=2))
    elif family in MOE_FAMILIES:
        model = _tiny_moe(family, common)
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


MOE_FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"]


def _tiny_moe(family: str, common: dict):
    """Mixture-of-experts: 4 experts, 2 per token; Qwen2-MoE adds a shared expert and its gate."""
    import transformers as tf
    moe = dict(num_experts_per_tok=2)
    if family == "mixtral":
        return tf.MixtralForCausalLM(tf.MixtralConfig(**common, num_local_experts=4, **moe))
    if family == "qwen2_moe":
        return tf.Qwen2MoeForCausalLM(tf.Qwen2MoeConfig(**common, num_experts=4, moe_intermediate_size=32,
                                                        shared_expert_intermediate_size=48, **moe))
    if family == "qwen3_moe":
        return tf.Qwen3MoeForCausalLM(tf.Qwen3MoeConfig(**common, num_experts=4, moe_intermediate_size=32,
                                                        head_dim=16, **moe))
    return tf.OlmoeForCausalLM(tf.OlmoeConfig(**common, num_experts=4, pad_token_id=0, bos_token_id=1,
                                              eos_token_id=2, **moe))


FAMILIES = ["llama", "mistral", "qwen2", "opt", "qwen3", "gemma2", "gemma3", "phi3"]


@pytest.fixture
def tokens():
    torch.manual_seed(1)
    return torch.randint(0, VOCAB, (8, 32))


def save_tiny(path, family: str = "llama", bos: bool = False):
    """A tiny model with a word-level tokenizer, saved as a local Hugging Face directory. `bos`: the tokenizer
    opens every text with <s>, as Llama's does."""
    tiny_model(family).save_pretrained(path)
    tiny_tokenizer(bos).save_pretrained(path)
    return str(path)


def tiny_tokenizer(bos: bool = False):
    """A word-level tokenizer of the tiny models' vocabulary; `bos`: it adds <s> (id 2) in front, as Llama's."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<pad>": 1, "<s>": 2, "</s>": 3, **{w: i + 4 for i, w in enumerate(
        "the a of and to in is was for on as with by at from it that this are be has had an or".split())}}
    vocab.update({chr(97 + i) * 2: len(vocab) for i in range(26)})
    assert len(vocab) <= VOCAB
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>")


def write_text(path, n_words: int = 6000, seed: int = 0):
    import random
    rng = random.Random(seed)
    words = "the a of and to in is was for on as with by at from it that this are be".split()
    path.write_text(" ".join(rng.choice(words) for _ in range(n_words)))
    return str(path)


def prepared_block(family: str, tokens, cfg):
    """Block 0 of a tiny model wrapped by BlockQuantizer with `cfg`, activation quantizers off,
    so a transform alone is under test. Returns (block, quantizer, inputs, kwargs, FP output)."""
    import copy

    from affinequant.models.adapters import get_adapter
    from affinequant.pipeline.calibrate import BlockQuantizer
    from affinequant.models.blocks import block_output, capture_block_inputs
    from affinequant.pipeline.stats import collect_act_stats

    model = tiny_model(family)
    adapter = get_adapter(model.config)
    scales, shifts = collect_act_stats(model, adapter, tokens, torch.device("cpu"))
    inputs, kwargs = capture_block_inputs(model, adapter, tokens, torch.device("cpu"), torch.float32)
    block = copy.deepcopy(adapter.layers(model)[0])
    with torch.no_grad():
        reference = block_output(block(inputs, **kwargs))
    prefix = f"{adapter.layers_path}.0."
    strip = lambda d: {k[len(prefix):]: v for k, v in d.items() if k.startswith(prefix)}  # noqa: E731
    bq = BlockQuantizer(block, adapter, model.config, cfg, strip(scales), strip(shifts))
    for q in bq.linears.values():
        q.act_quantizer = None
    block.get_submodule(adapter.attention).qkv_quantizers = None
    return block, bq, inputs, kwargs, reference


def assert_transform_exact(block, bq, inputs, kwargs, reference, rtol):
    """The differentiable (training) view and the merged weights both reproduce the FP block."""
    from affinequant.models.blocks import block_output
    with torch.no_grad():
        bq.refresh()
        trained_view = block_output(block(inputs, **kwargs))
        bq.finalize()
        merged = block_output(block(inputs, **kwargs))
    scale = reference.abs().max()
    assert (trained_view - reference).abs().max() / scale < rtol
    assert (merged - reference).abs().max() / scale < rtol
