"""Peak memory of an evaluated run with the KL reference as an FP copy of the model in memory (--kl_reference
model) against the FP log-probabilities recorded on disk before quantization (--kl_reference disk), on the
same run otherwise; the figures must be identical.

    python bench/kl_reference_memory.py --model models/qwen2.5-coder-0.5b.gguf --data_dir ../shared/data

Each run is its own main.py process (so its peak RSS is its own); writes bench/kl_reference_memory.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(ROOT / "models" / "qwen2.5-coder-0.5b.gguf"))
    p.add_argument("--data_dir", default=None)
    p.add_argument("--windows", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    out = ROOT / "bench" / "out" / "kl_reference_memory"
    rows = {}
    for kind in ("model", "disk"):
        flags = [sys.executable, str(ROOT / "main.py"), "--model", args.model, "--wbits", "4", "--group_size", "128",
                 "--nsamples", "4", "--seqlen", "512", "--calib_dataset", "c4", "--eval_ppl", "--ppl_datasets",
                 "wikitext2", "--limit", str(args.windows), "--kl_reference", kind, "--output_dir", str(out / kind)]
        if args.data_dir:
            flags += ["--data_dir", args.data_dir]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        with open(out.with_name(f"kl_reference_memory_{kind}.log"), "w") as log:
            out.mkdir(parents=True, exist_ok=True)
            subprocess.run(flags, check=True, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
        res = json.loads((out / kind / "results.json").read_text())
        w = res["ppl"]["wikitext2"]
        rows[kind] = {"peak_memory_mib": res["peak_memory_mib"], "ppl": w["ppl"], "fp_ppl": w["fp_ppl"], "kl": w["kl"],
                      "top1_agreement": w["top1_agreement"], "eval_seconds": w["seconds"]}
        print(kind, rows[kind], flush=True)
    result = {"model": Path(args.model).name, "setting": "W4A16g128 RTN", "windows": args.windows,
              "threads": args.threads, "rows": rows,
              "peak_ratio_disk_vs_model": rows["disk"]["peak_memory_mib"] / rows["model"]["peak_memory_mib"],
              "same_figures": all(rows["disk"][k] == rows["model"][k] for k in ("ppl", "fp_ppl", "kl", "top1_agreement"))}
    (ROOT / "bench" / "kl_reference_memory.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
