"""OmniQuant's learnable weight clipping: per (row, group), the grid's max and min are scaled by
sigmoid(γ) and sigmoid(β), learned against the block output (start: sigmoid(4) ≈ 0.982)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import ConfigError
from .base import Stage, StageConfig, block_device, quantized_linears, register


@dataclass(frozen=True)
class LWCConfig(StageConfig):
    name = "lwc"
    learns = True
    quantizes_weights = True
    lr: float = 1e-2
    schedule: str = "constant"          # or "cosine" (down to 1e-3 x lr: FlatQuant trains LWC with its transforms)

    def __post_init__(self):
        if self.schedule not in ("constant", "cosine"):
            raise ConfigError(f"lwc: schedule {self.schedule!r} is not known: use constant or cosine")


@register
class LWC(Stage):
    config_class = LWCConfig

    def __init__(self, config: LWCConfig, ctx):
        super().__init__(config, ctx)
        self.quantizers = {n: q.weight_quantizer for n, q in quantized_linears(ctx).items()}
        for q in self.quantizers.values():
            q.enable_lwc(block_device(ctx))

    def param_groups(self) -> list[dict]:
        params = [p for q in self.quantizers.values() for p in (q.upbound_factor, q.lowbound_factor)]
        return [{"params": params, "lr": self.config.lr, "schedule": self.config.schedule}]

    def state(self) -> dict[str, torch.Tensor]:
        return {f"lwc.{name}.{side}": getattr(q, side) for name, q in self.quantizers.items()
                for side in ("upbound_factor", "lowbound_factor")}

    @torch.no_grad()
    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        for key, value in state.items():
            name, side = key[len("lwc."):].rsplit(".", 1)
            getattr(self.quantizers[name], side).copy_(value)

    @torch.no_grad()
    def report(self) -> dict:
        ups = torch.cat([torch.sigmoid(q.upbound_factor).flatten() for q in self.quantizers.values()])
        return {"mean_upper_clip": round(ups.mean().item(), 5)} if ups.numel() else {}
