"""Do our GGUF files run in llama.cpp with the perplexity our evaluator gives them?

For each GGUF file: our evaluator's perplexity (affinequant's WikiText-2 windows, the file's weights dequantized by
transformers' GGUF loader, float32) against llama.cpp's (llama-cpp-python, its own CPU kernels) on the very same
token ids, window by window; and the greedy text llama.cpp writes for three prompts. Three stages, because
llama-cpp-python lives in a virtual environment of its own:

    .venv/bin/python bench/gguf_check.py windows --model models/smollm2-135m.gguf --out DIR
    /work/venvs/llama/bin/python bench/gguf_check.py llama --out DIR FILE.gguf ...   # also: --quantize Q4_0 F16.gguf
    .venv/bin/python bench/gguf_check.py ours --out DIR FILE.gguf ...

`windows` writes DIR/windows.npy (--ppl_bos first: BOS opens the first window only, as main.py evaluates);
`llama` and `ours` each add one record per file to DIR/results.json; `report` prints the table. llama.cpp's
`--quantize TYPE SRC` first writes llama.cpp's own quantization of SRC (an F16/F32 GGUF) next to it, the baseline
row. Threads: 2 for llama.cpp, torch's default for ours (both stated in the records).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]


def _update(out: Path, engine: str, record: dict) -> None:
    path = out / "results.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    results.setdefault(Path(record["file"]).name, {})[engine] = record
    path.write_text(json.dumps(results, indent=2) + "\n")


def _ppl(window_nll: list[float]) -> float:
    return math.exp(sum(window_nll) / len(window_nll))


def windows(args) -> None:
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


def llama(args) -> None:
    import llama_cpp
    files = list(args.files)
    if args.quantize:
        kind, source = args.quantize
        target = Path(source).with_name(f"{Path(source).stem.rsplit('-', 1)[0]}-llamacpp-{kind.lower()}.gguf")
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{kind.upper()}")
        params.nthread = args.threads
        if llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), params) != 0:
            raise SystemExit(f"llama.cpp could not quantize {source} to {kind}")
        print(f"llama.cpp quantized {source} -> {target}")
        files.append(str(target))
    ids = np.load(args.out / "windows.npy")
    for file in files:
        model = llama_cpp.Llama(model_path=file, n_ctx=ids.shape[1], n_batch=ids.shape[1], logits_all=True,
                                n_threads=args.threads, verbose=False)
        t0, window_nll = time.time(), []
        for window in ids:
            model.reset()
            model.eval(window.tolist())
            logits = np.asarray(model.scores[: len(window) - 1], dtype=np.float64)
            logz = logits.max(-1) + np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1))
            window_nll.append(float(np.mean(logz - logits[np.arange(len(window) - 1), window[1:]])))
        seconds = time.time() - t0
        texts = {}
        for prompt in PROMPTS:
            model.reset()
            texts[prompt] = model(prompt, max_tokens=24, temperature=0.0)["choices"][0]["text"]
        record = {"file": file, "ppl": _ppl(window_nll), "window_nll": window_nll, "seconds": seconds,
                  "threads": args.threads, "engine": f"llama-cpp-python {llama_cpp.__version__}", "greedy": texts}
        _update(args.out, "llama.cpp", record)
        print(f"{Path(file).name}: llama.cpp ppl {record['ppl']:.4f} ({seconds:.0f} s); {texts[PROMPTS[0]]!r}")


def ours(args) -> None:
    sys.path.insert(0, str(ROOT))
    import torch
    from affinequant.eval.perplexity import perplexity
    from affinequant.formats.gguf import file_summary
    from affinequant.models.loading import load_model
    ids = torch.from_numpy(np.load(args.out / "windows.npy")).long()
    for file in args.files:
        model, _, _ = load_model(file)
        result = perplexity(model, ids.reshape(-1), ids.shape[1], torch.device("cpu"), desc=Path(file).name)
        record = {"file": file, "ppl": result["ppl"], "window_nll": result["window_nll"],
                  "seconds": result["seconds"], "threads": torch.get_num_threads(),
                  "engine": "affinequant evaluator (weights dequantized by transformers, float32)",
                  **file_summary(file)}
        _update(args.out, "ours", record)
        print(f"{Path(file).name}: our ppl {record['ppl']:.4f}, {record['bits_per_weight']:.3f} bpw")


def report(args) -> None:
    results = json.loads((args.out / "results.json").read_text())
    print("| file | bits/weight | ours | llama.cpp | llama.cpp / ours − 1 | largest window diff |")
    print("|---|---|---|---|---|---|")
    for name, rec in results.items():
        a, b = rec.get("ours"), rec.get("llama.cpp")
        if a and b:
            worst = max(abs(x - y) for x, y in zip(a["window_nll"], b["window_nll"]))
            print(f"| {name} | {a['bits_per_weight']:.3f} | {a['ppl']:.4f} | {b['ppl']:.4f} | "
                  f"{b['ppl'] / a['ppl'] - 1:+.3%} | {worst:.4f} nats |")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=["windows", "llama", "ours", "report"])
    p.add_argument("files", nargs="*")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--model", default="models/smollm2-135m.gguf")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quantize", nargs=2, metavar=("TYPE", "SOURCE"))
    args = p.parse_intermixed_args()
    {"windows": windows, "llama": llama, "ours": ours, "report": report}[args.stage](args)
