"""Per-channel activation statistics of every linear's input, for the LET initialisation.

    python generate_act_scale_shift.py --model <HF id | dir | .gguf> [--calib_dataset wikitext2]

writes act_scales/<net>.pt and act_shifts/<net>.pt keyed by module name (model.layers.0.self_attn.q_proj).
"""
import argparse
import logging
from pathlib import Path

import torch

from affinequant.models.adapters import get_adapter
from affinequant.eval.data import calibration_samples, default_data_dir
from affinequant.models.loading import load_model, model_name
from affinequant.pipeline.stats import collect_act_stats
from affinequant.utils import resolve_device, save_tensors, seed_everything, setup_logging

log = logging.getLogger("affinequant")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="hub id, local directory or .gguf file (default: embedded SmolLM2)")
    p.add_argument("--net", default=None, help="name of the output files (default: basename of --model)")
    p.add_argument("--scales-output-path", default="./act_scales/")
    p.add_argument("--shifts-output-path", default="./act_shifts/")
    p.add_argument("--calib_dataset", default=None, help="as main.py's --calib_dataset")
    p.add_argument("--data_dir", default=None)
    p.add_argument("--num-samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--seed", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--trust_remote_code", action="store_true")
    args = p.parse_args(argv)
    setup_logging()
    seed_everything(args.seed)
    device = resolve_device(args.device)
    model, tokenizer, model_id = load_model(args.model, torch.float32, args.trust_remote_code)
    adapter = get_adapter(model.config)
    samples, source = calibration_samples(args.calib_dataset, tokenizer, args.num_samples, args.seq_len, args.seed,
                                          default_data_dir(args.data_dir), model)
    log.info("statistics over %d x %d tokens from %s", args.num_samples, args.seq_len, source)
    scales, shifts = collect_act_stats(model, adapter, samples, device)
    net = args.net or model_name(model_id)
    for folder, stats in ((args.scales_output_path, scales), (args.shifts_output_path, shifts)):
        path = Path(folder) / f"{net}.pt"
        save_tensors(path, stats)
        log.info("wrote %s (%d modules)", path, len(stats))


if __name__ == "__main__":
    main()
