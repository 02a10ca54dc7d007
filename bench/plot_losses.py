"""Per-block loss curves from bench/out/*/results.json, as SVG (no plotting dependency).

    python bench/plot_losses.py [--model smollm2-135m] [--setting W3A16g128] [--tesseraq]

For each (model, setting) writes bench/plots/<model>__<setting>.svg with two panels:
left, each block's final output MSE against the full-precision block (log scale), one line per
method; middle, the training loss of every block over its epochs (normalised by its first epoch);
right, with TesseraQ rows, each block's soften-phase loss per PAR round (normalised by its first round).
"""
from __future__ import annotations

import argparse
import math
from collections import defaultdict
from pathlib import Path

from run_bench import ROOT, quality_runs

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]


def _panel(x0, y0, w, h, series, title, xlabel, ylog):
    """series: {name: [(x, y), ...]} -> SVG elements."""
    pts = [(x, y) for s in series.values() for x, y in s if y > 0 or not ylog]
    if not pts:
        return []
    xs, ys = [p[0] for p in pts], [math.log10(p[1]) if ylog else p[1] for p in pts]
    xmin, xmax, ymin, ymax = min(xs), max(xs), min(ys), max(ys)
    xmax, ymax = (xmax if xmax > xmin else xmin + 1), (ymax if ymax > ymin else ymin + 1)
    sx = lambda x: x0 + 50 + (x - xmin) / (xmax - xmin) * (w - 60)  # noqa: E731
    sy = lambda y: y0 + h - 30 - ((math.log10(y) if ylog else y) - ymin) / (ymax - ymin) * (h - 60)  # noqa: E731
    out = [f'<text x="{x0 + w / 2}" y="{y0 + 15}" text-anchor="middle" font-size="13">{title}</text>',
           f'<rect x="{x0 + 50}" y="{y0 + 30}" width="{w - 60}" height="{h - 60}" fill="none" stroke="#999"/>',
           f'<text x="{x0 + w / 2}" y="{y0 + h - 5}" text-anchor="middle" font-size="11">{xlabel}</text>',
           f'<text x="{x0 + 45}" y="{y0 + 35}" text-anchor="end" font-size="10">{(10 ** ymax if ylog else ymax):.3g}</text>',
           f'<text x="{x0 + 45}" y="{y0 + h - 30}" text-anchor="end" font-size="10">{(10 ** ymin if ylog else ymin):.3g}</text>']
    for i, (name, s) in enumerate(series.items()):
        color = COLORS[i % len(COLORS)]
        line = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in s if y > 0 or not ylog)
        out.append(f'<polyline points="{line}" fill="none" stroke="{color}" stroke-width="1.5"/>')
        out.append(f'<text x="{x0 + 60}" y="{y0 + 45 + 14 * i}" font-size="11" fill="{color}">{name}</text>')
    return out


def plot(model: str, setting: str, runs: dict[str, dict], path: Path) -> None:
    mse = {m: [(b["index"], b["final_mse"]) for b in r["blocks"]] for m, r in runs.items()}
    curves = {}
    for m, r in runs.items():
        pts = []
        for b in r["blocks"]:
            if b["losses"]:
                pts += [(b["index"] + e / len(b["losses"]), l / b["losses"][0]) for e, l in enumerate(b["losses"])]
        if pts:
            curves[m] = pts
    par = {}           # TesseraQ: each block's soften-phase loss per round, relative to its first round
    for m, r in runs.items():
        pts = []
        for b in r["blocks"]:
            rounds = (b.get("stages") or {}).get("tesseraq", {}).get("rounds", [])
            if rounds and rounds[0]["loss"] > 0:
                pts += [(b["index"] + i / len(rounds), x["loss"] / rounds[0]["loss"]) for i, x in enumerate(rounds)]
        if pts:
            par[m] = pts
    width = 1500 if par else 1000
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="360" font-family="sans-serif">',
           '<rect width="100%" height="100%" fill="white"/>',
           *_panel(0, 0, 500, 360, mse, f"{model} {setting}: block output MSE vs FP", "block", True),
           *_panel(500, 0, 500, 360, curves, "training loss / first epoch, each block's epochs", "block (+ epoch)", False),
           *(_panel(1000, 0, 500, 360, par, "TesseraQ loss per round / first round", "block (+ round)", False)
             if par else []),
           "</svg>"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(svg) + "\n")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--setting", default=None)
    p.add_argument("--tesseraq", action="store_true",
                   help="only the runs that round with TesseraQ, to <model>__<setting>__tesseraq.svg")
    args = p.parse_args()
    groups = defaultdict(dict)
    for model, setting, method, res in quality_runs():
        if (args.model in (None, model)) and (args.setting in (None, setting)) and (
                not args.tesseraq or any(s.get("stage") == "tesseraq" for s in res.get("recipe", []))):
            groups[(model, setting)][method] = res
    for (model, setting), runs in groups.items():
        out = ROOT / "bench" / "plots" / f"{model}__{setting}{'__tesseraq' if args.tesseraq else ''}.svg"
        plot(model, setting, runs, out)
        print(out)


if __name__ == "__main__":
    main()
