"""Clipping search (AWQ's auto-clip, GPTQModel's mse option): before training, for each (row, group)
of every weight, the ratio r of a grid from 1 down to `min_ratio` that minimises the error of the
rounded group, the range [min, max] shrunk to [r·min, r·max].

metric "output" (default) is the error of the linear's output on the block's calibration inputs,
    Δ_gᵀ H_gg Δ_g per row and group, with H = 2/n·Σxᵀx the inputs' Gram matrix (AWQ's per-group output
    error: terms between groups are left out, so groups are searched independently);
metric "weight" is the squared weight error ‖Δ_g‖².
The ratios then stay fixed: LWC's learned factors, when a later stage learns them, multiply them, and
GPTQ rounds onto the clipped grid. Inputs are seen after the stages before it in the recipe (a LET
before it: the transformed weights and inputs at LET's initialisation).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import ConfigError
from ..quant.quantizer import grid_codes, minmax_scale_zero
from .base import Stage, StageConfig, block_device, linear_hessians, quantized_linears, register

METRICS = ("output", "weight")


@dataclass(frozen=True)
class ClipSearchConfig(StageConfig):
    name = "clip_search"
    quantizes_weights = True
    grid: int = 20                      # ratios 1, ..., min_ratio, evenly spaced (AWQ: 20 down to 0.5)
    min_ratio: float = 0.5
    metric: str = "output"

    def __post_init__(self):
        if self.metric not in METRICS:
            raise ConfigError(f"clip_search: metric {self.metric!r} is not known: use one of {', '.join(METRICS)}")
        if self.grid < 1 or not 0.0 < self.min_ratio <= 1.0:
            raise ConfigError(f"clip_search: grid must be >= 1 and min_ratio in (0, 1] (got {self.grid}, "
                              f"{self.min_ratio})")


@torch.no_grad()
def search_clip_ratio(weight: torch.Tensor, quantizer, hessian: torch.Tensor | None, grid: int = 20,
                      min_ratio: float = 0.5) -> torch.Tensor:
    """The best ratio per (row, group): (out, n_groups, 1). hessian None: weight error."""
    out_f, in_f = weight.shape
    gs = quantizer.group_size or in_f
    n_groups = quantizer.n_groups
    ratios = torch.linspace(1.0, min_ratio, grid).tolist() if grid > 1 else [1.0]
    best = torch.ones(out_f, n_groups, 1, device=weight.device)
    for g in range(n_groups):
        cols = slice(g * gs, min((g + 1) * gs, in_f))
        w = weight[:, cols].float()
        h = None if hessian is None else hessian[cols, cols].float()
        wmax, wmin = w.amax(-1, keepdim=True), w.amin(-1, keepdim=True)
        best_err = torch.full((out_f,), float("inf"), device=weight.device)
        for r in ratios:
            scale, zero = minmax_scale_zero(wmin * r, wmax * r, quantizer.bits, quantizer.symmetric,
                                            qmax=quantizer.qmax)
            delta = (grid_codes(w, scale, zero, quantizer.qmax) - zero) * scale - w
            err = (delta.pow(2) if h is None else (delta @ h) * delta).sum(-1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best[better, g, 0] = r
    return best


@register
class ClipSearch(Stage):
    config_class = ClipSearchConfig

    def __init__(self, config: ClipSearchConfig, ctx):
        super().__init__(config, ctx)
        self.quantizers = {n: q.weight_quantizer for n, q in quantized_linears(ctx).items()}
        for q in self.quantizers.values():       # ratio 1 (no clipping) until searched: x·1.0 is exact
            q.clip_ratio = torch.ones(q.shape[0], q.n_groups, 1, device=block_device(ctx))

    def prepare(self, bq, data) -> None:
        bq.refresh()                                  # the stages before this one, at their start
        hessians = (linear_hessians(self.ctx, data, list(self.quantizers)) if self.config.metric == "output"
                    else {})
        for name, q in self.quantizers.items():
            linear = self.ctx.linears[name]
            weight = (linear.weight if linear.temp_weight is None else linear.temp_weight).detach()
            h = hessians[name].H if name in hessians else None
            q.clip_ratio = search_clip_ratio(weight, q, h, self.config.grid, self.config.min_ratio)

    def state(self) -> dict[str, torch.Tensor]:
        return {f"clip.{n}": q.clip_ratio for n, q in self.quantizers.items()}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        for key, value in state.items():
            self.quantizers[key[len("clip."):]].clip_ratio = value.clone()

    def report(self) -> dict:
        if not self.quantizers:
            return {}
        r = torch.cat([q.clip_ratio.flatten() for q in self.quantizers.values()])
        return {"mean_ratio": round(r.mean().item(), 5), "clipped_fraction": round((r < 1).float().mean().item(), 5)}
