"""The one trainer of every stage that learns: AdamW over the stages' parameter groups (each with its
own learning rate), `epochs` passes over the calibration samples, the stages' schedule hooks at each
epoch, AMP on CUDA, and NaN/Inf and divergence handling: a loss that is not finite, or grows far beyond
the block's starting loss (DIVERGED_STEP x on one step, DIVERGED_EPOCH x on an epoch's mean), rolls back
to the epoch's start with halved learning rates; after `max_nan_retries` the block keeps its initial
(round-to-nearest) parameters."""
from __future__ import annotations

import logging
import math
import time

import torch

from .. import distributed
from ..utils import memory_report

log = logging.getLogger("affinequant")

# Bounds relative to the block's starting loss (its first step, before any update). Calibration batches
# differ from each other by a few x; a learning rate that blows up goes orders of magnitude past this.
DIVERGED_STEP = 100.0
DIVERGED_EPOCH = 10.0
COSINE_FLOOR = 1e-3     # a group with schedule "cosine" decays to this fraction of its rate (FlatQuant's eta_min)


def scheduled_lr(base: float, schedule: str | None, step: int, total: int) -> float:
    """A group's learning rate at `step` of `total`: constant, or cosine from `base` to COSINE_FLOOR x base."""
    if schedule != "cosine" or total <= 1:
        return base
    return base * (COSINE_FLOOR + (1 - COSINE_FLOOR) * 0.5 * (1 + math.cos(math.pi * min(step, total) / total)))


def _describe(health: dict) -> str:
    parts = []
    for key, value in health.items():
        if isinstance(value, dict):
            parts.append(f"{key} " + " ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                                              for k, v in value.items()))
        else:
            parts.append(f"{key} {value}")
    return ", ".join(parts)


_compile_failure: str | None = None     # why torch.compile could not build a block here: tried once per process


def compile_failure() -> str | None:
    """None, or why --compile_block fell back to eager in this process."""
    return _compile_failure


class CompiledForward:
    """The block's forward for its training steps under --compile_block: torch.compile (inductor: C++ on the
    CPU, Triton on CUDA) with static shapes, since a block trains on one batch shape. Norms, RoPE, the MLP's
    activation and the quantizers' element-wise work fuse into fewer passes. Dynamo caches graphs on the
    decoder layer's code, guarded on shapes and dtypes, so the blocks after the first reuse the first's
    graphs. The transforms' refresh stays outside (eager), once per step. Where nothing can be built (no C++
    compiler, no Triton), one warning, then eager for the rest of the process."""

    def __init__(self, block):
        self.block = block
        self.compiled = None if _compile_failure else torch.compile(block, dynamic=False)

    def __call__(self, *args, **kwargs):
        global _compile_failure
        if self.compiled is not None:
            try:
                return self.compiled(*args, **kwargs)
            except torch._dynamo.exc.TorchDynamoException as err:   # a failed build, not an error of the block
                _compile_failure = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}"
                log.warning("--compile_block: torch.compile cannot build the block here (%s); training eager",
                            _compile_failure)
                self.compiled = None
        return self.block(*args, **kwargs)


def train_block(bq, data, cfg, report, progress_desc: str, compile_block: bool = False) -> None:
    """Train the learning stages of `bq` (a calibrate.BlockQuantizer) on `data` (stages.BlockData); with
    `compile_block`, the training steps run the block through CompiledForward."""
    params = [g for g in bq.param_groups() if g["params"]]
    if not params:          # a stage that learns in some blocks only (compensation): nothing here
        return
    bq.train_forward = CompiledForward(bq.block) if compile_block else None
    try:
        _train(bq, data, cfg, report, progress_desc, params)
    finally:
        bq.train_forward = None


def _train(bq, data, cfg, report, progress_desc: str, params: list) -> None:
    for g in params:
        for p in g["params"]:
            p.requires_grad_(True)
    initial = [p.detach().clone() for g in params for p in g["params"]]
    lr_scale = 1.0
    n = data.inputs.shape[0]
    epoch = 0

    def make_optimizer():  # a fresh one per block, and after each NaN rollback at the lowered LR
        return torch.optim.AdamW([{**g, "lr": g["lr"] * lr_scale, "base_lr": g["lr"] * lr_scale} for g in params],
                                 weight_decay=cfg.wd)

    optimizer = make_optimizer()
    start_loss = None
    steps_per_epoch = math.ceil(n / data.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    while epoch < cfg.epochs:
        for name, health in bq.start_epoch(epoch).items():
            log.info("%s epoch %d: %s: %s", progress_desc, epoch, name, _describe(health))
        good = [p.detach().clone() for g in params for p in g["params"]]
        scaler = torch.amp.GradScaler(data.device.type, enabled=data.grad_scaling)
        t0, total, finite = time.time(), 0.0, True
        for i in range(0, n, data.batch_size):
            batch = slice(i, i + data.batch_size)
            with data.ctx_factory():
                loss = bq.loss(data, batch)
            # data-parallel: every decision reads the loss averaged over the ranks, so all ranks take it alike
            value = distributed.mean(loss.item()) if data.data_parallel else loss.item()
            if not math.isfinite(value):
                finite, why = False, "NaN/Inf"
                break
            if start_loss is None:
                start_loss = value
            elif value > DIVERGED_STEP * start_loss:
                finite, why = False, f"diverging ({value:.3g} against {start_loss:.3g} at the start)"
                break
            for g in optimizer.param_groups:
                g["lr"] = scheduled_lr(g["base_lr"], g.get("schedule"), epoch * steps_per_epoch + i // data.batch_size,
                                       total_steps)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if data.data_parallel:
                distributed.average_gradients([p for g in params for p in g["params"]])
            scaler.step(optimizer)
            scaler.update()
            total += value
        steps = math.ceil(n / data.batch_size)
        if finite and start_loss is not None and total / steps > DIVERGED_EPOCH * start_loss:
            finite, why = False, f"diverging (epoch mean {total / steps:.3g} against {start_loss:.3g} at the start)"
        if not finite:
            if why == "NaN/Inf":
                report.nan_events += 1
            else:
                report.divergence_events += 1
            retries = report.nan_events + report.divergence_events
            _restore(params, good)
            if retries > cfg.max_nan_retries:
                _restore(params, initial)
                report.fell_back_to_rtn = True
                log.warning("%s: loss is %s again after %d retries: keeping the block's initial parameters "
                            "(round-to-nearest weights, and the initial transforms)", progress_desc, why,
                            cfg.max_nan_retries)
                break
            lr_scale *= 0.5
            optimizer = make_optimizer()
            log.warning("%s epoch %d: loss is %s; rolled back to the epoch's start, learning rates x%.3g, retrying",
                        progress_desc, epoch, why, lr_scale)
            continue
        report.losses.append(total / steps)
        log.info("%s epoch %d/%d  loss %.6g  %.1fs  %s", progress_desc, epoch + 1, cfg.epochs,
                 total / steps, time.time() - t0, memory_report(data.device))
        epoch += 1
    for g in params:
        for p in g["params"]:
            p.requires_grad_(False)


def _restore(params, values) -> None:
    with torch.no_grad():
        for p, v in zip((p for g in params for p in g["params"]), values):
            p.copy_(v)
