"""The calibration step of a run: calibration data, activation statistics, the FP reference for the KL
comparison, the checkpoint, then the block loop, recorded into the results."""
from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path

import torch

from .. import distributed
from ..eval.data import adds_bos, calibration_samples
from ..formats.reference import ReferenceResume, write_reference_params
from ..formats.gguf import gguf_layer_grids
from ..pipeline.allocate import mixed_precision, quantized_linears
from ..pipeline.calibrate import quantize_blocks
from ..pipeline.checkpoint import CalibrationCheckpoint
from ..pipeline.stats import collect_act_stats
from ..pipeline.trainer import compile_failure
from ..stages.transforms import QK_OUTPUT
from ..utils import load_tensors, memory_report, peak_memory_mb, round_to_half_, save_tensors, tensor_digest, write_json
from .evaluation import record_fp_reference
from .preflight import check_stats, stats_files

log = logging.getLogger("affinequant")


def load_or_collect_stats(args, model, adapter, samples, device, net: str, blocks=None):
    scales_path, shifts_path, both = stats_files(args, net)
    if both:
        scales = load_tensors(scales_path, "activation scales")
        check_stats(scales, scales_path, model.config.hidden_size, adapter)
        shifts = load_tensors(shifts_path, "activation shifts")
        log.info("LET init from %s and %s", scales_path, shifts_path)
        if not any(k.endswith(QK_OUTPUT) for k in scales) and args.qk_init == "stats":
            log.info("%s has no q/k output statistics (written by the reference code or before they were "
                     "recorded): the q <-> k scales start at 1, as in OmniQuant. Delete it (or rerun "
                     "generate_act_scale_shift.py) for their SmoothQuant-style start", scales_path)
        return scales, shifts
    log.info("activation statistics %s not found: computing them on the calibration set", scales_path)
    scales, shifts = collect_act_stats(model, adapter, samples, device, blocks)   # every rank: all samples, same stats
    if distributed.is_main():
        save_tensors(scales_path, scales)   # default paths only: stats_files refuses a named file that is missing
        save_tensors(shifts_path, shifts)
        log.info("wrote %s and %s", scales_path, shifts_path)
    return scales, shifts

def allocation_for(args, cfg, model, adapter, samples, device) -> dict:
    """--target_bpw's allocation: measured on the calibration samples before the block loop changes the model,
    and kept in <output_dir>/allocation.json, which a resumed run reads instead of measuring again (so that its
    blocks get the bits the checkpoint's were quantized at)."""
    path = Path(args.output_dir) / "allocation.json"
    key = {"target_bpw": cfg.target_bpw, "choices": sorted(set(cfg.mixed_bits)), "group_size": cfg.group_size,
           "symmetric": cfg.symmetric, "nsamples": cfg.nsamples, "seqlen": cfg.seqlen, "seed": cfg.seed}
    if args.resume is not None and path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("key") == key:
            log.info("mixed precision: the allocation of %s (%.3f bits per weight)", path, saved["bits_per_weight"])
            return saved
    allocation = {**mixed_precision(model, adapter, samples, cfg, device), "key": key}
    if distributed.is_main():
        write_json(path, allocation)
    return allocation


def quantize(args, cfg, model, adapter, tokenizer, device, dtype, data_dir, net, model_id, results,
             reference_params=None, blocks=None) -> tuple[torch.nn.Module | None, tuple]:
    """Calibrate and quantize `model` in place, recording into `results`; returns the reference for KL and TTA:
    an FP copy of the model (None without --eval_ppl, or with --no_kl and no --tta), or with --kl_reference disk
    the FP log-probabilities of each perplexity set ({set: FPReference}), recorded before calibration; and the
    activation statistics (act_scales, act_shifts; None when no stage uses them). `reference_params`: a
    reference parameter file to rebuild blocks from (--resume FILE.pth). `blocks`: --stream's StreamedModel (the
    KL reference is then its FP blocks, re-read at evaluation: None here)."""
    calib_bos = args.calib_bos == "on" and adds_bos(tokenizer)
    samples, calib_source = calibration_samples(args.calib_dataset, tokenizer, cfg.nsamples, cfg.seqlen,
                                                cfg.seed, data_dir, None if blocks is not None else model, calib_bos)
    results["calibration"] = calib_source
    results["calibration_bos"] = calib_bos
    results["calibration_data_free"] = calib_source.startswith("generated")
    log.info("calibration: %d x %d tokens from %s", cfg.nsamples, cfg.seqlen, calib_source)

    if cfg.target_bpw is not None:
        results["mixed_precision"] = allocation_for(args, cfg, model, adapter, samples, device)
        cfg.layer_bits = results["mixed_precision"]["layer_bits"]
    if args.save_gguf and blocks is None:
        cfg.layer_grids = gguf_layer_grids(args.gguf_type, {n: m.in_features for n, m in
                                                            quantized_linears(model, adapter).items()})

    act_scales = act_shifts = None
    if cfg.needs_statistics:
        act_scales, act_shifts = load_or_collect_stats(args, model, adapter, samples, device, net, blocks)

    if cfg.reference_compat:
        round_to_half_(model)       # the reference holds its model in float16; the FP baseline too
    kl_on_disk = args.eval_ppl and not args.no_kl and not args.tta and args.kl_reference == "disk"
    reference = copy.deepcopy(model) if (args.eval_ppl and (not args.no_kl or args.tta) and not kl_on_disk
                                         and blocks is None) else None
    if kl_on_disk and distributed.is_main() and blocks is None:
        reference = record_fp_reference(args, model, tokenizer, device, data_dir, cfg.seqlen, adapter)
    own_resume = args.resume is not None and reference_params is None
    checkpoint_dir = args.resume if own_resume and args.resume else Path(args.output_dir) / "checkpoint"
    make_checkpoint = lambda writer: CalibrationCheckpoint(  # noqa: E731
        checkpoint_dir, cfg, model_id, calib_source, len(adapter.layers(model)), resume=own_resume,
        data_digest=tensor_digest({"samples": samples}), writer=writer)
    # data-parallel: rank 0 sets the checkpoint up (and writes it); the others read it once it is there
    checkpoint = make_checkpoint(True) if distributed.is_main() else None
    distributed.barrier()
    if checkpoint is None:
        checkpoint = make_checkpoint(False)
    own_checkpoint = checkpoint
    if reference_params is not None:
        checkpoint = ReferenceResume(reference_params, checkpoint)
        results["resumed_from"] = str(reference_params.path)
    t0 = time.time()
    try:
        reports = quantize_blocks(model, adapter, samples, cfg, device, act_scales, act_shifts,
                                  amp_dtype=torch.bfloat16 if dtype == torch.bfloat16 else torch.float16,
                                  checkpoint=checkpoint, blocks=blocks, cache_dir=args.cache_dir,
                                  compile_block=args.compile_block)
    except (torch.OutOfMemoryError, MemoryError) as exc:
        raise SystemExit(f"out of memory during calibration ({type(exc).__name__}). The activation caches hold "
                         f"3-4 copies of nsamples x seqlen x hidden: lower --nsamples ({cfg.nsamples}) or --seqlen "
                         f"({cfg.seqlen}), keep --batch_size 1, drop --aug_loss or --loss dc (one cache less), and on CUDA keep "
                         f"autocast on (no --deactive_amp). Finished blocks are checkpointed: rerun with --resume "
                         f"to continue from them") from exc
    results["calibration_seconds"] = time.time() - t0
    results["compile_block"] = args.compile_block and cfg.trains and compile_failure() is None  # used, not asked
    worked = [r for r in reports if not r.restored]      # a resumed run's replayed blocks cost no training
    results["seconds_per_block"] = sum(r.seconds for r in worked) / max(len(worked), 1)
    results["blocks_restored"] = len(reports) - len(worked)
    results["calibration_peak_memory_mib"] = peak_memory_mb(device)
    results["blocks"] = [r.__dict__ for r in reports]
    if reports.refinement:
        results["refinement"] = reports.refinement
    if any(r.fell_back_to_rtn for r in reports):
        results["blocks_fell_back_to_rtn"] = [r.index for r in reports if r.fell_back_to_rtn]
    log.info("calibration done in %.1fs (%.2fs per block), %s", results["calibration_seconds"],
             results["seconds_per_block"], memory_report(device))
    if args.save_params and distributed.is_main():
        results["saved_params"] = write_reference_params(args.save_params, own_checkpoint, cfg, model.config, adapter)
    return reference, (act_scales, act_shifts)
