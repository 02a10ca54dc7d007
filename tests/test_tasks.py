"""--tasks runs lm-eval on the in-memory model, offline from a local task file, and its accuracy
equals an independent computation of the same 0-shot multiple-choice protocol."""
import json

import pytest
import torch
import torch.nn.functional as F

from affinequant.cli import run

from conftest import save_tiny, write_text
from test_cli import _run_keeping_model

pytest.importorskip("lm_eval")


def _arc_docs(n):
    """A tiny ARC file in the HF schema, in the tiny tokenizer's vocabulary."""
    words = "the a of and to in is was for on as with by at from it that this are be".split()
    docs = []
    for i in range(n):
        q = " ".join(words[(i + k) % len(words)] for k in range(5))
        choices = [" ".join(words[(i * 3 + j + k) % len(words)] for k in range(2)) for j in range(4)]
        docs.append({"id": str(i), "question": q, "choices": {"text": choices, "label": list("ABCD")},
                     "answerKey": "ABCD"[i % 4]})
    return docs


def test_tasks_offline_match_direct_loglikelihood(tmp_path, monkeypatch):
    monkeypatch.setenv("AFFINEQUANT_OFFLINE", "1")
    from affinequant.utils import hub_reachable
    hub_reachable.cache_clear()
    data = tmp_path / "data"
    data.mkdir()
    docs = _arc_docs(12)
    (data / "ARC-Easy-Test.jsonl").write_text("\n".join(json.dumps(d) for d in docs) + "\n")
    model_dir = save_tiny(tmp_path / "tiny-llama")
    argv = ["--model", model_dir, "--calib_dataset", write_text(tmp_path / "c.txt"), "--nsamples", "2",
            "--seqlen", "32", "--wbits", "4", "--tasks", "arc_easy", "--data_dir", str(data),
            "--output_dir", str(tmp_path / "out")]
    model = _run_keeping_model(argv)
    res = json.loads((tmp_path / "out" / "results.json").read_text())["tasks"]["arc_easy"]
    assert res["source"] == "local file" and res["sample_len"] == 12 and res["num_fewshot"] == 0

    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_dir)
    correct = 0
    with torch.no_grad():
        for d in docs:
            ctx = tok(f"Question: {d['question']}\nAnswer:", add_special_tokens=False).input_ids
            scores = []
            for choice in d["choices"]["text"]:
                cont = tok(" " + choice, add_special_tokens=False).input_ids
                ids = torch.tensor([ctx + cont])
                logp = F.log_softmax(model(ids).logits[0, :-1].float(), -1)
                scores.append(sum(logp[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont)))
            correct += int(max(range(4), key=scores.__getitem__) == "ABCD".index(d["answerKey"]))
    assert res["acc"] == pytest.approx(correct / len(docs))
    hub_reachable.cache_clear()


def test_task_without_local_data_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("AFFINEQUANT_OFFLINE", "1")
    from affinequant.utils import hub_reachable
    hub_reachable.cache_clear()
    model_dir = save_tiny(tmp_path / "tiny-llama")
    with pytest.raises(SystemExit) as exc:
        run(["--model", model_dir, "--calib_dataset", write_text(tmp_path / "c.txt"), "--nsamples", "2",
             "--seqlen", "32", "--tasks", "piqa", "--output_dir", str(tmp_path / "out"),
             "--data_dir", str(tmp_path)])
    assert "piqa" in str(exc.value) and "hub is not reachable" in str(exc.value)
    hub_reachable.cache_clear()
