"""Quality per second: perplexity against the whole calibration's wall time, for our recipes and the peers
(AutoRound at several step counts, GPTQModel's GPTQ), from the bench's rows (bench/results.json and bench/out).

    .venv/bin/python bench/quality_per_second.py --model smollm2-135m --setting W3A16g128

Writes bench/plots/quality_per_second__<model>__<setting>.png and a table in bench/QUALITY_PER_SECOND.md.
The seconds are each row's own wall time on this 2-core machine (ours: calibration_seconds, blocks and
refinement; the peers': their whole run divided by the block count, times the blocks). Rows from different bench
sessions ran beside different loads: the table says which rows were run side by side.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from run_bench import RESUME_BASE, ROOT, TTA_BASE, collect

BLOCKS = {"smollm2-135m": 30, "qwen2.5-coder-0.5b": 24}
OURS = ("RTN", "clip search", "clip search+GPTQ", "TesseraQ", "clip search+TesseraQ", "AffineQuant+TesseraQ",
        "RTN+E2E@16", "clip search+TesseraQ+E2E@32", "best recipe", "clip search+TesseraQ+E2E@128",
        "clip search+TesseraQ+E2E@64+norms", "best recipe@32 samples")


def wall_seconds(row: dict, rows: list[dict]) -> float:
    """A row's whole calibration, s. A row resumed from another row's blocks (RESUME_BASE, not TTA) ran only
    its own refinement: its wall time is the base row's block loop plus that refinement."""
    base_name = RESUME_BASE.get(row["method"])
    if base_name and row["method"] not in TTA_BASE:
        base = next(r for r in rows if (r["model"], r["setting"], r["method"]) == (row["model"], row["setting"],
                                                                                   base_name))
        return wall_seconds(base, rows) - base.get("refinement_seconds", 0.0) + row.get("refinement_seconds", 0.0)
    return row["sec_per_block"] * BLOCKS[row["model"]]


def rows_for(model: str, setting: str, methods=OURS) -> list[dict]:
    rows = collect()
    out = []
    for r in rows:
        if r["model"] != model or r["setting"] != setting:
            continue
        peer = r["method"].startswith(("AutoRound", "GPTQModel"))
        if peer or r["method"] in methods:
            out.append({**r, "peer": peer, "wall": wall_seconds(r, rows)})
    return sorted(out, key=lambda r: r["wall"])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--setting", default="W3A16g128")
    args = p.parse_args()
    rows = rows_for(args.model, args.setting)
    fp = rows[0]["fp_ppl"] if rows else float("nan")
    lines = [f"### {args.model} {args.setting} (FP {fp:.2f})", "",
             "| method | calibration wall s | wikitext2 ppl | x FP | KL vs FP | top-1 |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['wall']:.0f} | {r['ppl']:.2f} | {r['ppl'] / r['fp_ppl']:.2f} | {r['kl']:.4f} | "
              f"{r['top1']:.3f} |" for r in rows]
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for peer, marker, label in ((False, "o", "affinequant"), (True, "s", "peers")):
        pts = [r for r in rows if r["peer"] == peer]
        ax.scatter([r["wall"] for r in pts], [r["ppl"] for r in pts], marker=marker, label=label)
        for r in pts:
            ax.annotate(r["method"], (r["wall"], r["ppl"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.axhline(fp, color="gray", linestyle="--", linewidth=0.8, label=f"FP {fp:.1f}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("calibration wall time, s (2 CPU cores)")
    ax.set_ylabel("WikiText-2 perplexity (20 windows of 512)")
    ax.set_title(f"{args.model} {args.setting}: quality per second")
    ax.legend(fontsize=8)
    fig.tight_layout()
    plot = ROOT / "bench" / "plots" / f"quality_per_second__{args.model}__{args.setting}.png"
    fig.savefig(plot, dpi=120)
    page = ROOT / "bench" / "QUALITY_PER_SECOND.md"
    sections = {}
    if page.is_file():
        for block in page.read_text().split("\n### ")[1:]:
            sections[block.split("\n", 1)[0].split(" (FP")[0]] = "### " + block.rstrip("\n")
    sections[f"{args.model} {args.setting}"] = "\n".join(lines + ["", f"![plot](plots/{plot.name})"])
    head = page.read_text().split("\n### ")[0] if page.is_file() else (
        "# Quality per second\n\nPerplexity against calibration wall time (bench/quality_per_second.py). Same "
        "calibration samples and evaluation windows for every row.\n")
    page.write_text(head.rstrip("\n") + "\n\n" + "\n\n".join(sections[k] for k in sorted(sections)) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
