"""Peak resident memory of one quantization, with the model in memory against --stream (blocks read from the
checkpoint's safetensors one at a time, finished blocks on disk, KL reference re-read from disk) and --stream
--cache_dir (activation caches in files too); the same run otherwise. Qwen2.5-Coder-0.5B by default, converted
once to safetensors (python -m affinequant.convert models/qwen2.5-coder-0.5b.gguf models/qwen2.5-coder-0.5b).

    python bench/stream_memory.py --data_dir ../shared/data

Each run is its own main.py process (its peak RSS is its own: VmHWM); they run one after another. Writes
bench/stream_memory.json: calibration and whole-run peaks, their ratio to the model's fp32 size, perplexity and
KL (which must agree), seconds.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

RUNS = {"memory": [], "stream": ["--stream"], "stream+cache_dir": ["--stream", "--cache_dir", "{out}/cache"]}


def fp32_bytes(model_dir: Path) -> int:
    """4 bytes per parameter the checkpoint holds (an untied head counts: it is memory the model needs)."""
    sys.path.insert(0, str(ROOT))
    from affinequant.pipeline.streaming import TensorFiles
    files = TensorFiles.of_checkpoint(model_dir)
    total = 0
    for _, _, shape, _, _ in files.entries.values():
        n = 1
        for s in shape:
            n *= s
        total += 4 * n
    return total


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(ROOT / "models" / "qwen2.5-coder-0.5b"))
    p.add_argument("--data_dir", default=None)
    p.add_argument("--windows", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", default=",".join(RUNS))
    args = p.parse_args()
    out = ROOT / "bench" / "out" / "stream_memory"
    method = ["--wbits", "4", "--group_size", "128", "--lwc", "--let", "--epochs", "2", "--nsamples", "8", "--seqlen",
              "512", "--calib_dataset", "c4", "--eval_ppl", "--ppl_datasets", "wikitext2", "--limit", str(args.windows),
              "--net", "qwen-stream-bench"]
    size = fp32_bytes(Path(args.model))
    rows = {}
    for name in args.runs.split(","):
        run_dir = out / name
        flags = [sys.executable, str(ROOT / "main.py"), "--model", args.model, *method, "--output_dir", str(run_dir),
                 *[f.format(out=run_dir) for f in RUNS[name]]]
        if args.data_dir:
            flags += ["--data_dir", args.data_dir]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        run_dir.mkdir(parents=True, exist_ok=True)
        for stats in ("act_scales", "act_shifts"):       # every run computes its statistics (streamed too)
            (ROOT / stats / "qwen-stream-bench.pt").unlink(missing_ok=True)
        with open(out / f"{name}.log", "w") as log:
            subprocess.run(flags, check=True, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
        res = json.loads((run_dir / "results.json").read_text())
        w = res["ppl"]["wikitext2"]
        rows[name] = {"calibration_peak_mib": res["calibration_peak_memory_mib"], "peak_mib": res["peak_memory_mib"],
                      "calibration_peak_vs_fp32": res["calibration_peak_memory_mib"] * 2**20 / size,
                      "peak_vs_fp32": res["peak_memory_mib"] * 2**20 / size,
                      "ppl": w["ppl"], "fp_ppl": w["fp_ppl"], "kl": w["kl"], "top1_agreement": w["top1_agreement"],
                      "calibration_seconds": res["calibration_seconds"], "eval_seconds": w["seconds"],
                      "block_mse": [b["final_mse"] for b in res["blocks"]]}
        print(name, {k: v for k, v in rows[name].items() if k != "block_mse"}, flush=True)
    first = next(iter(rows.values()))
    result = {"model": Path(args.model).name, "fp32_mib": size / 2**20, "half_fp32_mib": size / 2**21,
              "method": "W4A16 g128 LWC+LET, 8 x 512 C4 tokens, 2 epochs", "windows": args.windows,
              "threads": args.threads, "rows": rows,
              "same_calibration": all(r["block_mse"] == first["block_mse"] for r in rows.values()),
              "same_ppl": all(r["ppl"] == first["ppl"] for r in rows.values())}
    for r in rows.values():
        del r["block_mse"]
    (ROOT / "bench" / "stream_memory.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
