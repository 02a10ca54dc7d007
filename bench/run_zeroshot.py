"""Zero-shot accuracy of FP, RTN and OmniQuant (LWC) on one model, through main.py --tasks.

    python bench/run_zeroshot.py --model models/smollm2-135m.gguf --data_dir ../shared/data

Each configuration runs main.py in its own process and writes bench/out/zeroshot__<model>__<name>/;
finished ones are skipped. bench/zeroshot.json and bench/ZEROSHOT.md are rebuilt at the end.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from run_bench import OUT, ROOT, SETTINGS, run_main

RUNS = {  # name: flags
    "FP": ["--wbits", "16", "--abits", "16", "--epochs", "0"],
    "RTN W4A16g128": [*SETTINGS["W4A16g128"], "--epochs", "0"],
    "OmniQuant W4A16g128": [*SETTINGS["W4A16g128"], "--lwc"],
}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(ROOT / "models" / "smollm2-135m.gguf"))
    p.add_argument("--data_dir", default=None)
    p.add_argument("--tasks", default="piqa,arc_easy,hellaswag")
    p.add_argument("--limit", type=int, default=500)
    p.add_argument("--nsamples", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lwc_lr", type=float, default=5e-2)
    args = p.parse_args()
    model = Path(args.model).stem
    rows = []
    for name, flags in RUNS.items():
        flags = ["--model", args.model, *flags, "--tasks", args.tasks, "--limit", str(args.limit),
                 "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--calib_dataset", "c4",
                 "--lwc_lr", str(args.lwc_lr)]
        if "--lwc" in flags:
            flags += ["--epochs", str(args.epochs)]
        if args.data_dir:
            flags += ["--data_dir", args.data_dir]
        res = run_main(OUT / f"zeroshot__{model}__{name.replace(' ', '_')}", flags, f"zero-shot {name}")
        rows.append({"model": model, "run": name, "tasks": res["tasks"]})
    tasks = args.tasks.split(",")
    (ROOT / "bench" / "zeroshot.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = [f"0-shot accuracy, first {args.limit} examples of each task (lm-eval 0.4, offline local copies); "
             f"OmniQuant: LWC, {args.nsamples} x {args.seqlen}-token C4 samples, {args.epochs} epochs, "
             f"lwc_lr {args.lwc_lr}. acc / acc_norm.", "",
             "| model | run | " + " | ".join(tasks) + " |", "|---|---|" + "---|" * len(tasks)]
    for r in rows:
        cells = [f"{r['tasks'][t]['acc']:.3f} / {r['tasks'][t].get('acc_norm', float('nan')):.3f}" for t in tasks]
        lines.append(f"| {r['model']} | {r['run']} | " + " | ".join(cells) + " |")
    (ROOT / "bench" / "ZEROSHOT.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
