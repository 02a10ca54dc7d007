"""What TesseraQ's CPU budget costs against a budget shaped like the reference's: the first blocks of
SmolLM2-135M at W3 g128, same calibration samples, each block's output MSE against its FP output.

    python bench/tesseraq_budget.py --model models/smollm2-135m.gguf --data_dir ../shared/data --blocks 2

Writes bench/tesseraq_budget.json. The reference budget (20 rounds x 250 steps x 4 samples of 2048
tokens) is about 40 CPU-hours per SmolLM2 block here; "20x25x4" keeps its schedule, batch and learning
rate with a tenth of its steps per round.
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
BUDGETS = {
    "round to nearest": {},
    "CPU bench budget: 8 rounds x 3 steps x 1 sample, lr 1e-2": dict(par_rounds=8, par_iters=3, par_batch=1,
                                                                      par_lr=1e-2),
    "20 rounds x 25 steps x 4 samples, lr 1e-3 (the reference's shape, 1/10 of its steps)": dict(
        par_rounds=20, par_iters=25, par_batch=4, par_lr=1e-3),
}


def main():
    import sys
    sys.path.insert(0, str(ROOT))
    from affinequant.models.adapters import get_adapter
    from affinequant.pipeline.calibrate import quantize_blocks
    from affinequant.config import QuantConfig
    from affinequant.eval.data import calibration_samples
    from affinequant.models.loading import load_model

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(ROOT / "models" / "smollm2-135m.gguf"))
    p.add_argument("--data_dir", default=None)
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer, _ = load_model(args.model)
    adapter = get_adapter(model.config)
    model.model.layers = model.model.layers[: args.blocks]
    model.config.num_hidden_layers = args.blocks
    samples, source = calibration_samples("c4", tokenizer, 8, 512, 2, Path(args.data_dir) if args.data_dir else None)
    out = {"model": args.model, "setting": "W3A16g128", "calibration": source, "threads": args.threads, "runs": {}}
    for name, par in BUDGETS.items():
        cfg = QuantConfig(wbits=3, group_size=128, nsamples=8, seqlen=512, tesseraq=bool(par), **par)
        t0 = time.time()
        reports = quantize_blocks(copy.deepcopy(model), adapter, samples, cfg, torch.device("cpu"))
        out["runs"][name] = {"block_mse": [r.final_mse for r in reports],
                             "seconds_per_block": (time.time() - t0) / len(reports),
                             "changed_vs_rtn": [r.stages.get("tesseraq", {}).get("changed_vs_rtn") for r in reports]}
        print(name, out["runs"][name], flush=True)
        (ROOT / "bench" / "tesseraq_budget.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
