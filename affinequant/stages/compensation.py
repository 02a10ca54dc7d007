"""ABQ-LLM's compensation: a learned rank-1 term a·bᵀ added to the MLP's output projection (down_proj)
before it is quantized, in the first and last blocks (where quantizing down_proj hurts most), then
merged into the weight. a starts at 0 and b at 1, so the block starts unchanged.

It composes with the transforms: refresh and merge both add a·bᵀ to the weight as the stages before
it left it (`compensated`), so training and the merged model see the same weight."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import ConfigError
from .base import Stage, StageConfig, block_device, register


@dataclass(frozen=True)
class CompensationConfig(StageConfig):
    name = "compensation"
    learns = True
    first: int = 3          # blocks 0..first-1
    last: int = 4           # and the last `last` blocks (ABQ-LLM: 3 and 4)
    lr: float = 1e-2

    def __post_init__(self):
        if self.first < 0 or self.last < 0 or self.first + self.last == 0:
            raise ConfigError(f"compensation: first {self.first} and last {self.last} blocks select none: "
                              f"give non-negative counts, not both 0 (ABQ-LLM: first 3, last 4)")
        if not self.lr > 0:
            raise ConfigError(f"compensation: lr must be positive (got {self.lr}; ABQ-LLM uses 1e-2)")


@register
class Compensation(Stage):
    config_class = CompensationConfig

    def __init__(self, config: CompensationConfig, ctx):
        super().__init__(config, ctx)
        if not ctx.adapter.mlp_out:
            raise ConfigError(f"compensation: {ctx.model_config.model_type} blocks have no single MLP output "
                              f"projection (mixture of experts): drop --compensation")
        n_blocks = ctx.model_config.num_hidden_layers
        self.active = ctx.index < config.first or ctx.index >= n_blocks - config.last
        self.name = ctx.adapter.mlp_out
        self.linear = ctx.linears[self.name] if self.active else None
        if self.active:
            device = block_device(ctx)
            self.a = nn.Parameter(torch.zeros(self.linear.out_features, 1, device=device))
            self.b = nn.Parameter(torch.ones(self.linear.in_features, 1, device=device))

    def compensated(self, weight: torch.Tensor) -> torch.Tensor:
        """The one formula of training and merge: the weight plus a·bᵀ."""
        return weight + self.a @ self.b.T

    def param_groups(self) -> list[dict]:
        return [{"params": [self.a, self.b], "lr": self.config.lr}] if self.active else []

    def refresh(self) -> None:
        if self.active:
            base = self.linear.temp_weight if self.linear.temp_weight is not None else self.linear.weight.float()
            self.linear.temp_weight = self.compensated(base)

    @torch.no_grad()
    def merge(self) -> None:
        # the stages before have merged into .weight and cleared temp_weight (LET), or never set it
        if self.active:
            self.linear.temp_weight = None
            self.linear.weight.data.copy_(self.compensated(self.linear.weight.float()).to(self.linear.weight.dtype))

    def state(self) -> dict[str, torch.Tensor]:
        return {"compensation.a": self.a, "compensation.b": self.b} if self.active else {}

    @torch.no_grad()
    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        if self.active:
            self.a.copy_(state["compensation.a"])
            self.b.copy_(state["compensation.b"])

    @torch.no_grad()
    def report(self) -> dict:
        if not self.active:
            return {}
        delta = (self.a @ self.b.T).norm() / self.linear.weight.float().norm()
        return {"linear": self.name, "relative_norm": round(delta.item(), 6)}
