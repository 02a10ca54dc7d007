"""The GPTQ rows behind the defaults of --gptq (issue 30): GPTQ's own options (natural column order, damping 0.01),
act order at damping 0.01, 0.05 and 0.1, what --gptq alone does now, round-to-nearest and GPTQModel's GPTQ, on the
bench's samples and windows. The runs are bench/run_bench.py's:

    .venv/bin/python bench/run_bench.py --models smollm2-135m --threads 2 --only \\
        "W3A16g128:RTN,W3A16g128:GPTQ (GPTQ's defaults),W3A16g128:GPTQ,W3A16g128:GPTQ@damp0.05,..."
    .venv/bin/python bench/gptq_defaults.py          # writes bench/gptq_defaults.md from their results
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from run_bench import collect  # noqa: E402

METHODS = ["RTN", "GPTQ (GPTQ's defaults)", "GPTQ", "GPTQ@damp0.05", "GPTQ@damp0.1", "GPTQ (defaults)",
           "GPTQModel GPTQ"]
OPTIONS = {"RTN": "–", "GPTQ (GPTQ's defaults)": "natural order, damp 0.01 (`--no_act_order --percdamp 0.01`)",
           "GPTQ": "act order, damp 0.01", "GPTQ@damp0.05": "act order, damp 0.05",
           "GPTQ@damp0.1": "act order, damp 0.1", "GPTQ (defaults)": "`--gptq` alone",
           "GPTQModel GPTQ": "gptqmodel 7.7.0: damp 0.05, group-aware reorder, desc_act off"}


def main() -> None:
    rows = {(r["model"], r["setting"], r["method"]): r for r in collect()}
    lines = ["# GPTQ's defaults", "", __doc__.split("\n\n")[0].replace("\n", " "), "",
             "| model | setting | method | options | wikitext2 ppl (windows) | ratio to RTN | KL vs FP | top-1 |",
             "|---|---|---|---|---|---|---|---|"]
    for model in ("smollm2-135m", "qwen2.5-coder-0.5b"):
        for setting in ("W3A16g128", "W4A16g128"):
            rtn = rows.get((model, setting, "RTN"))
            for method in METHODS:
                r = rows.get((model, setting, method))
                if r is None:
                    continue
                ratio = f"{r['ppl'] / rtn['ppl']:.3f}" if rtn else "–"
                lines.append(f"| {model} | {setting} | {method} | {OPTIONS[method]} | {r['ppl']:.2f} ({r['windows']}) "
                             f"| {ratio} | {r['kl']:.4f} | {r['top1']:.3f} |")
    lines += ["", "Read: GPTQ's own options lose to round-to-nearest on SmolLM2 at W4 and barely beat it at W3; act order "
              "with damping 0.05 (now what `--gptq` does) beats RTN at W3 by more than GPTQModel on both models and "
              "ties GPTQ's options on Qwen W4 (60.49 against 60.45, with the lower KL). Damping 0.1 won at SmolLM2 W3; "
              "0.05 stays the default because 8 x 512 calibration tokens favour heavy damping and the papers' "
              "128 x 2048 would not. GPTQModel rows at W4 are not here (its environment was not installed). Models "
              "dequantized from GGUF: their FP weights already lie on a coarse grid."]
    (ROOT / "bench" / "gptq_defaults.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
