"""What an algorithm of the block loop is: a typed config (what a recipe names) and a handler (a
Stage), registered under the config's name. The block loop (pipeline/calibrate.py) only calls the hooks below,
in recipe order; it knows no algorithm by name.

A stage's life in one block:
    __init__(config, ctx)     attach: install what it learns into the block (ctx.block, ctx.linears)
    prepare(bq, data)         before training, with the block's inputs and targets (init guards, searches)
    param_groups()            what the shared trainer learns, each group with its own learning rate
    start_epoch(epoch, n)     schedule hook at each epoch (AffineQuant's band unlock)
    refresh()                 once per training step: recompute transformed weights from the parameters
    merge()                   fold what was learned into the weights, once, at the end
    state() / load_state()    everything a checkpoint needs to rebuild the block without training
    report()                  a JSON-able dict for results.json
A Rounder is the last stage of every recipe: after the merge it turns each linear's weight into
integer codes on the grid of its WeightQuantizer and hands (codes, scale, zero) to `commit`, which
the block loop owns: the fake-quant weight and the packed layer are both built from those codes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar

import torch
from torch import nn

from .. import distributed
from ..recipe import StageConfig, register_config
from .gptq import Hessian


@dataclass
class BlockContext:
    """What a stage may touch: the block (float32, on the calibration device), its QuantLinears by
    name, the adapter's declarations, the run's quantization format and the block's statistics."""
    block: nn.Module
    adapter: object
    model_config: object
    cfg: object                                    # QuantConfig
    linears: dict                                  # name -> QuantLinear
    act_scales: dict | None = None
    act_shifts: dict | None = None
    index: int = 0                                 # the block's index in the model (seeds, logs)


@dataclass
class BlockData:
    """The block's calibration data, owned by the block loop: inputs on the quantized trajectory,
    the FP targets (and with --aug_loss or --loss dc the FP block on the quantized inputs), the block's
    keyword arguments, and how to run it (device, autocast, batch size). For attention loss terms, the
    FP inputs and a full-precision copy of the block."""
    inputs: torch.Tensor
    targets: list = field(default_factory=list)
    kwargs: dict = field(default_factory=dict)
    device: torch.device = torch.device("cpu")
    ctx_factory: Callable = None
    batch_size: int = 1
    trains: bool = False                           # the run learns (epochs > 0)
    fp_inputs: torch.Tensor | None = None          # the block's inputs on the FP trajectory
    fp_block: nn.Module | None = None              # the block before quantization (attention terms only)
    data_parallel: bool = False                    # this rank holds its share of the samples (distributed.py)
    grad_scaling: bool = False                     # float16 autocast: scale the loss so gradients do not underflow


class Stage:
    config_class: ClassVar[type[StageConfig]] = StageConfig    # its traits (learns, is_rounder...) are the config's

    def __init__(self, config: StageConfig, ctx: BlockContext):
        self.config, self.ctx = config, ctx

    def prepare(self, bq, data: BlockData) -> None:
        pass

    def param_groups(self) -> list[dict]:
        return []

    def start_epoch(self, epoch: int, epochs: int) -> dict:
        return {}

    def refresh(self) -> None:
        pass

    def merge(self) -> None:
        pass

    def state(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        pass

    def report(self) -> dict:
        return {}


Commit = Callable[[str, torch.Tensor, torch.Tensor, torch.Tensor], None]


class Rounder(Stage):
    def round(self, bq, data: BlockData | None, commit: Commit) -> None:
        """Call commit(name, codes (out, in) int32, scale (out, groups), zero (out, groups)) for every
        linear of ctx.linears that has a weight quantizer. Scales must already be fp16-representable."""
        raise NotImplementedError


STAGES: dict[str, type[Stage]] = {}


def register(stage_class: type[Stage]) -> type[Stage]:
    """Class decorator: make a stage known to recipes under its config's name."""
    config = stage_class.config_class
    if config.is_rounder != issubclass(stage_class, Rounder):
        raise ValueError(f"stage {config.name!r}: a Rounder's config says is_rounder, and only a Rounder's")
    register_config(config)
    STAGES[config.name] = stage_class
    return stage_class


def block_device(ctx: BlockContext) -> torch.device:
    return next(ctx.block.parameters()).device


def quantized_linears(ctx: BlockContext) -> dict:
    """The linears whose weights are quantized (all of them unless --wbits 16)."""
    return {n: q for n, q in ctx.linears.items() if q.weight_quantizer is not None}


@torch.no_grad()
def probe_loss(bq, data: BlockData, probe: int = 4) -> float:
    """The block objective summed over the first `probe` calibration samples, as the block stands now: what
    the initialisation guards compare (data-parallel: each rank probes its share, summed over the ranks)."""
    per_rank = max(1, probe // distributed.world()) if data.data_parallel else probe
    total = 0.0
    for i in range(min(per_rank, data.inputs.shape[0])):
        with data.ctx_factory():
            total += bq.loss(data, slice(i, i + 1)).item()
    return distributed.total(total) if data.data_parallel else total


class _AllSeen(Exception):
    pass


@torch.no_grad()
def linear_hessians(ctx: BlockContext, data: BlockData, names: list[str]) -> dict:
    """GPTQ's H = 2/n·Σxᵀx of the inputs of each linear in `names` (over every rank's samples when
    data-parallel), from one pass of the block over data.inputs as it stands now (transforms refreshed, earlier linears as already rounded). The
    input is what the linear receives, before its own activation quantizer. Each forward stops as
    soon as every named linear has seen its input, so the later part of the block does not run."""

    modules = {n: ctx.linears[n] for n in names}
    hessians = {n: Hessian(m.in_features, data.device) for n, m in modules.items()}
    seen: set[str] = set()

    def hook_for(name):
        def hook(module, args):
            # what the weight multiplies: the input after the linear's online transform (FlatQuant)
            hessians[name].add_batch(args[0] if module.online is None else module.online(args[0]))
            seen.add(name)
            if len(seen) == len(modules):
                raise _AllSeen
        return hook

    handles = [m.register_forward_pre_hook(hook_for(n)) for n, m in modules.items()]
    try:
        for i in range(0, data.inputs.shape[0], data.batch_size):
            seen.clear()
            with data.ctx_factory():
                try:
                    ctx.block(data.inputs[i:i + data.batch_size].to(data.device), **data.kwargs)
                except _AllSeen:
                    pass
    finally:
        for h in handles:
            h.remove()
    if data.data_parallel:          # H over every rank's inputs: Σ_r n_r·H_r / Σ_r n_r
        for h in hessians.values():
            h.H *= h.nsamples
            distributed.all_reduce_sum_([h.H])
            h.nsamples = int(distributed.total(h.nsamples))
            h.H /= max(h.nsamples, 1)
    return hessians
