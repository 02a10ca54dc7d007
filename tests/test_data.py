import math
import random
from pathlib import Path

import pytest
import torch

from affinequant.eval.data import DataError, _wikitext_rows, calibration_samples, document_windows, load_text
from affinequant.eval.perplexity import perplexity

from conftest import tiny_model

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_shared = pytest.mark.skipif(not (SHARED / "wiki.test.raw").is_file(), reason="../shared/data not present")


@needs_shared
def test_wikitext_local_file_reproduces_hf_rows(monkeypatch):
    monkeypatch.setenv("AFFINEQUANT_OFFLINE", "1")
    rows = _wikitext_rows(SHARED / "wiki.test.raw")
    assert len(rows) == 4358 and rows[0] == "" and rows[1] == " = Robert Boulter = \n"
    text = load_text("wikitext2", "test", SHARED)
    assert text.text == "\n\n".join(rows) and text.source.startswith("file:")


@needs_shared
def test_missing_split_names_the_fix(monkeypatch):
    from affinequant.utils import hub_reachable
    hub_reachable.cache_clear()
    monkeypatch.setenv("AFFINEQUANT_OFFLINE", "1")
    with pytest.raises(DataError, match="--data_dir"):
        load_text("wikitext2", "train", SHARED)
    hub_reachable.cache_clear()


def test_document_windows_are_long_enough_and_seeded():
    class Tok:
        def __call__(self, text, return_tensors=None, add_special_tokens=False):
            return type("E", (), {"input_ids": torch.tensor([[len(w) for w in text.split()]])})()
    docs = ["a " * 5, "bb " * 40, "ccc " * 64, "dd " * 80]    # the 64-token one is exactly seqlen: skipped
    w1 = document_windows(docs, Tok(), 6, 64, random.Random(0))
    w2 = document_windows(docs, Tok(), 6, 64, random.Random(0))
    assert w1.shape == (6, 64) and torch.equal(w1, w2)
    assert set(w1.unique().tolist()) == {2}                     # only the document longer than seqlen


def test_perplexity_matches_hf_loss():
    model = tiny_model("llama")
    torch.manual_seed(0)
    tokens = torch.randint(0, 96, (5 * 32 + 7,))              # 5 windows and a dropped tail
    res = perplexity(model, tokens, 32, torch.device("cpu"))
    with torch.no_grad():
        losses = [model(tokens[i * 32:(i + 1) * 32][None], labels=tokens[i * 32:(i + 1) * 32][None]).loss
                  for i in range(5)]
    assert res["windows"] == 5
    assert math.isclose(res["ppl"], math.exp(torch.stack(losses).mean().item()), rel_tol=1e-5)
    assert len(res["window_nll"]) == 5
    for kept, loss in zip(res["window_nll"], losses):       # per window, for paired comparisons of runs
        assert math.isclose(kept, loss.item(), rel_tol=1e-5)


def test_kl_is_zero_against_itself_and_positive_otherwise():
    model = tiny_model("llama")
    other = tiny_model("llama", seed=1)
    tokens = torch.randint(0, 96, (64,))
    same = perplexity(model, tokens, 32, torch.device("cpu"), reference=model)
    assert abs(same["kl"]) < 1e-6 and same["top1_agreement"] == 1.0 and same["fp_ppl"] == same["ppl"]
    diff = perplexity(model, tokens, 32, torch.device("cpu"), reference=other, limit=1)
    assert diff["kl"] > 0 and diff["windows"] == 1 and diff["windows_total"] == 2


def test_calibration_from_text_file(tmp_path):
    from conftest import save_tiny, write_text
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(save_tiny(tmp_path / "m"))
    samples, source = calibration_samples(write_text(tmp_path / "c.txt"), tok, 4, 16, 2, None)
    again, _ = calibration_samples(str(tmp_path / "c.txt"), tok, 4, 16, 2, None)
    assert samples.shape == (4, 16) and torch.equal(samples, again) and "c.txt" in source
    with pytest.raises(DataError, match="fewer than one window"):
        calibration_samples(str(tmp_path / "c.txt"), tok, 4, 100000, 2, None)


def test_the_default_data_dir_is_shared_data_beside_the_checkout(monkeypatch):
    """Without --data_dir or $AFFINEQUANT_DATA, runs read ../shared/data (relative to the repository), wherever
    the package's modules sit inside it."""
    from affinequant.eval.data import default_data_dir
    monkeypatch.delenv("AFFINEQUANT_DATA", raising=False)
    beside = Path(__file__).resolve().parents[2] / "shared" / "data"
    assert default_data_dir() == (beside if beside.is_dir() else None)
