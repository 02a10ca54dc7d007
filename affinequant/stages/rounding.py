"""Rounders: the last stage of a recipe. Each turns every quantized linear's (merged) weight into
integer codes on its WeightQuantizer's grid and hands them to the block loop's `commit`."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import ConfigError
from .gptq import GPTQ
from .base import Rounder, StageConfig, linear_hessians, quantized_linears, register


@dataclass(frozen=True)
class RTNConfig(StageConfig):
    name = "rtn"
    is_rounder = True


@register
class RTN(Rounder):
    """Round to nearest on the calibrated grid (with LWC's and the clipping search's clipping)."""
    config_class = RTNConfig

    @torch.no_grad()
    def round(self, bq, data, commit) -> None:
        # Scales are stored as float16 values (as every deployment format stores them); the reference
        # dequantizes with its float32 scale and rounds the weight to float16 afterwards (--reference_compat).
        exact_scale = self.ctx.cfg.reference_compat and not self.ctx.cfg.real_quant
        for name, qlinear in quantized_linears(self.ctx).items():
            wq, weight = qlinear.weight_quantizer, qlinear.weight.float()
            commit(name, *(wq.integer_codes(weight) if exact_scale else wq.rounded_to_nearest(weight)))


@dataclass(frozen=True)
class GPTQConfig(StageConfig):
    name = "gptq"
    is_rounder = True
    quantizes_weights = True
    # The defaults are what won on the bench (bench/gptq_defaults.md): act order with static groups and damping
    # 0.05, as GPTQModel's. GPTQ's own (natural order, 0.01) lost to round-to-nearest on SmolLM2 at W3.
    percdamp: float = 0.05
    act_order: bool = True              # columns by descending Hessian diagonal (needs static groups)
    static_groups: bool = True          # grids from the weights before GPTQ's updates (gptq.py says why)
    blocksize: int = 128
    true_sequential: bool = True        # q/k/v, then o, then up/gate, then down, each on the inputs the
                                        # rounded earlier ones give

    def __post_init__(self):
        if not 0.0 <= self.percdamp < 1.0:
            raise ConfigError(f"gptq: percdamp must lie in [0, 1) (got {self.percdamp}); GPTQ uses 0.01")
        if self.act_order and not self.static_groups:
            raise ConfigError("gptq: act_order needs static_groups (g_idx stays i // group_size): drop one")
        if self.blocksize < 1:
            raise ConfigError(f"gptq: blocksize must be positive (got {self.blocksize})")


@register
class GPTQRounder(Rounder):
    """GPTQ on the block's own inputs on the quantized trajectory, after the transforms are merged."""
    config_class = GPTQConfig

    @torch.no_grad()
    def round(self, bq, data, commit) -> None:
        if data is None:
            raise ValueError("GPTQ rounds with the block's calibration inputs: pass BlockData to finalize")
        linears = quantized_linears(self.ctx)
        groups = self.ctx.adapter.sequential_groups(list(linears)) if self.config.true_sequential else [list(linears)]
        for group in groups:
            hessians = linear_hessians(self.ctx, data, group)
            for name in group:
                qlinear = linears[name]
                gptq = GPTQ(hessians.pop(name), self.config.percdamp, self.config.act_order, self.config.blocksize,
                            self.config.static_groups)
                codes, scale, zero = gptq.quantize(qlinear.weight, qlinear.weight_quantizer)
                commit(name, codes, scale, zero)
