"""BOS as the papers' protocol has it (issue 30): perplexity windows cut from the joined text tokenized once with
the tokenizer's defaults (`first`), each window opened by BOS (`every`), or no special tokens (`none`);
calibration samples that open with BOS where the tokenizer adds one; data-free calibration in one batch."""
import json
import math

import pytest
import torch
from transformers import AutoTokenizer

from affinequant.eval.data import adds_bos, calibration_samples, eval_tokens, generated_samples, load_text
from affinequant.eval.perplexity import perplexity

from conftest import save_tiny, tiny_model, tiny_tokenizer, write_text

WORDS = "the a of and to in is was for on as with by at from it that this are be".split()


@pytest.fixture
def wiki_dir(tmp_path):
    """A wiki.test.raw of WikiText-2's shape: rows joined by the loader with "\\n\\n"."""
    import random
    rng = random.Random(0)
    rows = [" ".join(rng.choice(WORDS) for _ in range(40)) + " \n" for _ in range(30)]
    (tmp_path / "wiki.test.raw").write_text("".join(rows))
    return tmp_path


def test_a_tokenizer_that_adds_bos_is_told_from_one_that_does_not(tmp_path):
    assert adds_bos(tiny_tokenizer(bos=True)) and not adds_bos(tiny_tokenizer(bos=False))
    reloaded = AutoTokenizer.from_pretrained(save_tiny(tmp_path / "m", bos=True))    # as main.py loads it
    assert adds_bos(reloaded)


def test_first_is_the_joined_text_tokenized_once_with_the_tokenizers_defaults(wiki_dir):
    tok = tiny_tokenizer(bos=True)
    text = load_text("wikitext2", "test", wiki_dir).text             # the test rows joined by "\n\n"
    first, _ = eval_tokens("wikitext2", tok, 16, wiki_dir, "first")
    expected = tok(text, return_tensors="pt").input_ids[0]
    assert torch.equal(first, expected)                              # GPTQ's datautils: tokenizer(joined)
    assert first[0].item() == tok.bos_token_id and (first == tok.bos_token_id).sum() == 1   # BOS opens window 0 only
    none, _ = eval_tokens("wikitext2", tok, 16, wiki_dir, "none")
    assert torch.equal(none, first[1:])


def test_every_opens_each_window_with_bos_and_then_continues_the_text(wiki_dir):
    tok = tiny_tokenizer(bos=True)
    none, _ = eval_tokens("wikitext2", tok, 16, wiki_dir, "none")
    every, _ = eval_tokens("wikitext2", tok, 16, wiki_dir, "every")
    windows = every.reshape(-1, 16)
    assert (windows[:, 0] == tok.bos_token_id).all()
    assert torch.equal(windows[:, 1:].reshape(-1), none[: windows.shape[0] * 15])
    assert windows.shape[0] == none.numel() // 15


def test_perplexity_of_each_mode_equals_an_independent_computation(wiki_dir):
    """Our evaluator on the stream eval_tokens gives, against HF's own loss on the windows built by hand."""
    model, tok = tiny_model("llama"), tiny_tokenizer(bos=True)
    text = load_text("wikitext2", "test", wiki_dir).text
    bare = tok(text, add_special_tokens=False).input_ids
    bos, seqlen = tok.bos_token_id, 16
    by_hand = {"first": [([bos] + bare)[i * seqlen:(i + 1) * seqlen] for i in range(4)],
               "none": [bare[i * seqlen:(i + 1) * seqlen] for i in range(4)],
               "every": [[bos] + bare[i * (seqlen - 1):(i + 1) * (seqlen - 1)] for i in range(4)]}
    for mode, windows in by_hand.items():
        tokens, _ = eval_tokens("wikitext2", tok, seqlen, wiki_dir, mode)
        res = perplexity(model, tokens, seqlen, torch.device("cpu"), limit=4)
        with torch.no_grad():
            losses = [model(torch.tensor([w]), labels=torch.tensor([w])).loss.item() for w in windows]
        for ours, theirs in zip(res["window_nll"], losses, strict=True):
            # the same float32 forward, batched or not: a few ulps of a sum over 64 features and 96 logits
            assert math.isclose(ours, theirs, rel_tol=1e-5), mode


def test_every_needs_a_bos_token():
    from affinequant.eval.data import DataError, bos_token_id

    class NoBos:
        bos_token_id = None
    with pytest.raises(DataError, match="--ppl_bos"):
        bos_token_id(NoBos(), "--ppl_bos every")


def test_calibration_samples_open_with_bos_followed_by_text(tmp_path):
    tok = tiny_tokenizer(bos=True)
    path = write_text(tmp_path / "c.txt")
    plain, _ = calibration_samples(path, tok, 4, 16, 2, None)
    with_bos, source = calibration_samples(path, tok, 4, 16, 2, None, bos=True)
    assert with_bos.shape == plain.shape == (4, 16) and "BOS" in source
    assert (with_bos[:, 0] == tok.bos_token_id).all() and (plain != tok.bos_token_id).all()
    stream = tok((tmp_path / "c.txt").read_text(), add_special_tokens=False).input_ids
    joined = " ".join(map(str, stream))
    for row in with_bos[:, 1:].tolist():                             # each a slice of the text itself
        assert " ".join(map(str, row)) in joined


def test_generated_calibration_is_one_seeded_batch_opening_with_bos():
    model, tok = tiny_model("llama"), tiny_tokenizer(bos=True)
    a = generated_samples(model, tok, 3, 12, seed=5, bos=True)
    b = generated_samples(model, tok, 3, 12, seed=5, bos=True)
    assert a.shape == (3, 12) and torch.equal(a, b) and (a[:, 0] == tok.bos_token_id).all()
    assert generated_samples(model, tok, 3, 12, seed=5).shape == (3, 12)


def test_results_record_the_bos_choices_and_a_data_free_calibration(tmp_path, monkeypatch):
    from affinequant.cli import run
    monkeypatch.chdir(tmp_path)
    model = save_tiny(tmp_path / "m", bos=True)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "wiki.test.raw").write_text(" ".join(WORDS * 40) + " \n")
    res = run(["--model", model, "--wbits", "4", "--group_size", "16", "--nsamples", "2", "--seqlen", "16",
               "--calib_dataset", "generated", "--eval_ppl", "--ppl_datasets", "wikitext2", "--limit", "2",
               "--data_dir", str(tmp_path / "data"), "--output_dir", str(tmp_path / "out"), "--ppl_bos", "every"])
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["ppl_bos"] == res["ppl_bos"] == "every"
    assert saved["calibration_bos"] is True and saved["calibration_data_free"] is True
