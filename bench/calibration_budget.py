"""Calibration budget curves: perplexity against the number of calibration samples and against the steps of
the best recipe's trained stages, from the bench's rows (bench/results.json and bench/out), so that a user can
choose what to spend.

    python bench/run_bench.py --models smollm2-135m --threads 2 --only "W3A16g128:best recipe@32 samples,..."
    .venv/bin/python bench/calibration_budget.py --model smollm2-135m --settings W3A16g128,W2A16g128

Writes bench/CALIBRATION_BUDGET.md and bench/plots/calibration_budget__<model>__<setting>.png. Every row
evaluates on the same WikiText-2 windows; the 8-sample rows draw the bench's samples, the larger ones more from
the same C4 file with the same seed.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from quality_per_second import rows_for
from run_bench import ROOT

# (curve, x label, [(x, method)]): the same recipe with one budget changed
CURVES = [
    ("clip search+GPTQ, samples", "calibration samples (x 512 tokens)",
     [(8, "clip search+GPTQ"), (32, "clip search+GPTQ@32 samples"), (128, "clip search+GPTQ@128 samples")]),
    ("best recipe, samples", "calibration samples (x 512 tokens)",
     [(8, "best recipe"), (32, "best recipe@32 samples"), (128, "best recipe@128 samples")]),
    ("best recipe, E2E steps", "end-to-end steps (one sample each)",
     [(0, "clip search+TesseraQ"), (32, "clip search+TesseraQ+E2E@32"), (64, "best recipe"),
      (128, "clip search+TesseraQ+E2E@128")]),
    ("best recipe at 32 samples, E2E steps", "end-to-end steps (one sample each)",
     [(64, "best recipe@32 samples"), (128, "best recipe@32 samples+E2E@128")]),
    ("best recipe + norm gains, E2E steps", "end-to-end steps (one sample each)",
     [(0, "clip search+TesseraQ"), (64, "clip search+TesseraQ+E2E@64+norms")]),
]


def budget_section(model: str, setting: str) -> list[str]:
    """The table of one setting's curves, and its plot (bench/plots/calibration_budget__<model>__<setting>.png)."""
    methods = {m for _, _, pts in CURVES for _, m in pts}
    rows = {r["method"]: r for r in rows_for(model, setting, methods) if not r["peer"]}
    fp = next(iter(rows.values()))["fp_ppl"] if rows else float("nan")
    bits = setting[1]
    lines = [f"## {model} {setting}", "",
             f"FP {fp:.2f}. The best recipe is recipes/best-w{bits}g128.yaml.", "",
             "| curve | budget | method | wikitext2 ppl | x FP | KL vs FP | top-1 | calibration wall s |",
             "|---|---|---|---|---|---|---|---|"]
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    ax_of = {"samples": axes[0], "E2E": axes[1]}
    for curve, xlabel, points in CURVES:
        have = [(x, rows[m]) for x, m in points if m in rows]
        for x, r in have:
            lines.append(f"| {curve} | {x} | {r['method']} | {r['ppl']:.2f} | {r['ppl'] / r['fp_ppl']:.2f} | "
                         f"{r['kl']:.4f} | {r['top1']:.3f} | {r['wall']:.0f} |")
        ax = next(a for key, a in ax_of.items() if key in curve)
        if have:
            ax.plot([x for x, _ in have], [r["ppl"] for _, r in have], marker="o", label=curve.split(",")[0])
            for x, r in have:
                ax.annotate(f"{r['wall']:.0f} s", (x, r["ppl"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(xlabel)
    axes[0].set_xscale("log", base=2)
    axes[0].set_ylabel("WikiText-2 perplexity")
    for ax in axes:
        ax.axhline(fp, color="gray", linestyle="--", linewidth=0.8)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(f"{model} {setting}: calibration budget (labels: calibration wall s)")
    fig.tight_layout()
    plot = ROOT / "bench" / "plots" / f"calibration_budget__{model}__{setting}.png"
    fig.savefig(plot, dpi=110)
    plt.close(fig)
    return lines + ["", f"![plot](plots/{plot.name})", ""]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--settings", default="W3A16g128,W2A16g128")
    args = p.parse_args()
    lines = ["# Calibration budget", "",
             "Perplexity against what calibration spends (bench/calibration_budget.py), "
             f"{args.model}, WikiText-2 first 20 windows of 512 (the model is dequantized from GGUF, so its weights "
             "already lie on a coarse grid). The best recipes are recipes/best-w3g128.yaml and best-w2g128.yaml: "
             "clip search, TesseraQ 8 rounds x 3 steps, E2E 64 steps. Wall time on the 2-core machine; rows run "
             "side by side are said below the tables.", ""]
    for setting in args.settings.split(","):
        lines += budget_section(args.model, setting)
    page = ROOT / "bench" / "CALIBRATION_BUDGET.md"
    notes = page.read_text().split("<!-- notes -->", 1)[1] if page.is_file() and "<!-- notes -->" in \
        page.read_text() else "\n"
    page.write_text("\n".join(lines) + "\n<!-- notes -->" + notes)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
