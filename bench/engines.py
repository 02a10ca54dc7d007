"""What the engine checks share (bench/gguf_check.py, bench/serve_check.py): the evaluation windows as token ids,
written once by our evaluator's own code, and one results file per check that each engine's environment adds its
records to. Imports neither torch nor affinequant at module level: the engines' environments lack them."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]


def update(out: Path, engine: str, record: dict) -> None:
    """Add `record` (one model file or directory, one engine) to out/results.json."""
    path = out / "results.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    results.setdefault(Path(record["file"]).name, {})[engine] = record
    path.write_text(json.dumps(results, indent=2) + "\n")


def ppl_of(window_nll: list[float]) -> float:
    """Perplexity from per-window mean NLLs of equal-length windows (our evaluator's formula)."""
    return math.exp(sum(window_nll) / len(window_nll))


def windows(args) -> None:
    """out/windows.npy: the first --limit WikiText-2 windows of --seqlen tokens exactly as main.py --eval_ppl
    evaluates them (--ppl_bos first: BOS opens the first window only)."""
    sys.path.insert(0, str(ROOT))
    from affinequant.eval.data import default_data_dir, eval_tokens
    from affinequant.eval.perplexity import eval_windows
    from affinequant.models.loading import load_model
    _, tokenizer, _ = load_model(args.model)
    tokens, source = eval_tokens("wikitext2", tokenizer, args.seqlen, default_data_dir(), bos="first")
    ids = eval_windows(tokens, args.seqlen, args.limit).numpy().astype(np.int32)
    args.out.mkdir(parents=True, exist_ok=True)
    np.save(args.out / "windows.npy", ids)
    print(f"{ids.shape[0]} windows of {ids.shape[1]} tokens from {source} -> {args.out / 'windows.npy'}")


def ours(out: Path, file: str, model, column: str, **extra) -> dict:
    """Our evaluator's perplexity of `model` on out/windows.npy, recorded for `file` under `column`."""
    import torch
    sys.path.insert(0, str(ROOT))
    from affinequant.eval.perplexity import perplexity
    ids = torch.from_numpy(np.load(out / "windows.npy")).long()
    result = perplexity(model, ids.reshape(-1), ids.shape[1], torch.device("cpu"), desc=Path(file).name)
    record = {"file": file, "ppl": result["ppl"], "window_nll": result["window_nll"], "seconds": result["seconds"],
              "threads": torch.get_num_threads(), **extra}
    update(out, column, record)
    return record


def report(out: Path, engines: tuple[str, str], columns: tuple[str, ...] = ()) -> None:
    """A markdown table: per file, the two engines' perplexities, their ratio and the largest window difference."""
    a_name, b_name = engines
    results = json.loads((out / "results.json").read_text())
    print("| file | " + "".join(f"{c} | " for c in columns) + f"{a_name} | {b_name} | {b_name} / {a_name} − 1 | "
          "largest window diff |")
    print("|---|" + "---|" * (len(columns) + 4))
    for name, rec in results.items():
        a, b = rec.get(a_name), rec.get(b_name)
        if a and b:
            worst = max(abs(x - y) for x, y in zip(a["window_nll"], b["window_nll"]))
            cells = "".join(f"{a.get(c, b.get(c, ''))} | " for c in columns)
            print(f"| {name} | {cells}{a['ppl']:.4f} | {b['ppl']:.4f} | {b['ppl'] / a['ppl'] - 1:+.3%} | "
                  f"{worst:.4f} nats |")
