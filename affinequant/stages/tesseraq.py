"""TesseraQ (Li & Panda, 2024): progressive adaptive rounding (PAR) with dequantization-scale tuning,
as a rounder, so it runs after any transform and clipping of the recipe (LET / AffineQuant, LWC, the
clipping search) on the grid they leave.

Every weight gets a soft rounding variable ν through AdaRound's rectified sigmoid
    h(ν) = clamp(σ(ν)(ζ − γ) + γ, 0, 1),   γ = −0.1, ζ = 1.1,
and the layer computes  ŵ = s·f·(clamp(⌊w/s⌋ + h(ν) + z, 0, 2^b − 1) − z)  with the grid (s, z) fixed
and f = 2·h(μ) per group (μ = 0: f = 1). ν starts at h⁻¹(frac(w/s)), so the soft block starts at the
(clipped) FP weights. Over the rounds of the thresholds schedule, a *harden* phase fixes every variable
whose |h − 0.5| lies above that round's per-layer quantile, and a *soften* phase trains the rest (and
μ) against the block's FP output for `iters` Adam steps on random mini-batches, with a fresh optimizer.
At the end every variable is hard: the integer codes are the result, and f multiplies the scale that
is exported, so packed and fake-quant weights stay identical (the reference folds the rounding back
into float weights and re-rounds, which can move a group's scale).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from .. import distributed
from ..config import ConfigError
from .losses import BlockObjective, objective_on
from .base import Rounder, StageConfig, quantized_linears, register

log = logging.getLogger("affinequant")

GAMMA, ZETA = -0.1, 1.1
# The reference's schedule: the quantile of |h - 0.5| above which a round hardens (20 rounds).
THRESHOLDS = (0.8, 0.65, 0.5, 0.43, 0.38, 0.34, 0.3, 0.27, 0.24, 0.21, 0.18, 0.15, 0.12, 0.10, 0.08, 0.06, 0.04,
              0.02, 0.01, 0.005)


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    return (torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA).clamp(0, 1)


def rectified_sigmoid_inverse(h: torch.Tensor) -> torch.Tensor:
    """ν with h(ν) = h for h in [0, 1) (the open ends clamp to a large finite ν)."""
    return torch.logit(((h - GAMMA) / (ZETA - GAMMA)).clamp(1e-6, 1 - 1e-6))


def schedule(rounds: int) -> list[float]:
    """`rounds` thresholds taken evenly from the reference's 20 (all 20 by default), ending at its last."""
    if rounds >= len(THRESHOLDS):
        return list(THRESHOLDS)
    picks = torch.linspace(0, len(THRESHOLDS) - 1, rounds).round().long().tolist()
    return [THRESHOLDS[i] for i in picks]


@dataclass(frozen=True)
class TesseraQConfig(StageConfig):
    name = "tesseraq"
    is_rounder = True
    quantizes_weights = True
    iters: int = 250                   # Adam steps per round (soften phase)
    batch: int = 4                     # calibration samples per step
    lr: float = 1e-3
    rounds: int = 20                   # rounds of the thresholds schedule (taken evenly from the reference's 20)
    tune_scale: bool = True            # learn the dequantization factor f per group
    scale_wd: float = 1e-4             # weight decay of f's variable, as the reference

    def __post_init__(self):
        for name in ("iters", "batch", "rounds"):
            if getattr(self, name) < 1:
                raise ConfigError(f"tesseraq: {name} must be at least 1 (got {getattr(self, name)})")
        if not self.lr > 0:
            raise ConfigError(f"tesseraq: lr must be positive (got {self.lr}); the reference uses 1e-3")

    @property
    def steps(self) -> int:
        return self.iters * min(self.rounds, len(THRESHOLDS))


class SoftRounding(nn.Module):
    """Stands in a linear's weight quantizer during PAR: returns the soft-quantized weight from the grid
    of `quantizer` on `weight` (the merged weight, fixed), whatever weight it is called with."""

    def __init__(self, weight: torch.Tensor, quantizer, tune_scale: bool):
        super().__init__()
        with torch.no_grad():                   # the grid is fixed: no gradient to LWC's factors
            scale, zero = quantizer.scale_zero(weight)                   # (out, groups, 1)
        out_f, in_f = weight.shape
        self.group_of = torch.arange(in_f, device=weight.device) // (quantizer.group_size or in_f)
        self.scale, self.zero = scale[..., 0], zero[..., 0]             # (out, groups)
        self.qmax = quantizer.qmax
        x = weight.float() / self.scale[:, self.group_of]
        self.base = x.floor()
        self.nu = nn.Parameter(rectified_sigmoid_inverse(x - self.base))
        self.mu = nn.Parameter(torch.zeros_like(self.scale), requires_grad=tune_scale)
        self.hard = torch.zeros_like(self.base, dtype=torch.bool)
        self.hard_up = torch.zeros_like(self.base)                       # the hardened variables' 0 / 1

    def offsets(self) -> torch.Tensor:
        return torch.where(self.hard, self.hard_up, rectified_sigmoid(self.nu))

    def factor(self) -> torch.Tensor:
        return 2 * rectified_sigmoid(self.mu)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        z = self.zero[:, self.group_of]
        q = (self.base + self.offsets() + z).clamp(0, self.qmax)
        return (q - z) * (self.scale * self.factor())[:, self.group_of]

    @torch.no_grad()
    def harden(self, threshold: float) -> None:
        """Fix every variable whose |h - 0.5| lies above the `threshold` quantile of this layer's scores
        (hard ones score 0.5, so they stay hard)."""
        h = rectified_sigmoid(self.nu)
        score = torch.where(self.hard, torch.full_like(h, 0.5), (h - 0.5).abs()).flatten()
        k = max(1, min(score.numel(), int(round(threshold * score.numel()))))
        cut = score.kthvalue(k).values
        new = (~self.hard) & ((h - 0.5).abs() > cut)
        self.hard_up[new] = (h[new] >= 0.5).float()
        self.hard |= new

    @torch.no_grad()
    def harden_all(self) -> None:
        h = rectified_sigmoid(self.nu)
        self.hard_up = torch.where(self.hard, self.hard_up, (h >= 0.5).float())
        self.hard[:] = True

    @torch.no_grad()
    def codes(self) -> torch.Tensor:
        return (self.base + self.offsets() + self.zero[:, self.group_of]).clamp(0, self.qmax).to(torch.int32)


@register
class TesseraQ(Rounder):
    config_class = TesseraQConfig

    def __init__(self, config: TesseraQConfig, ctx):
        super().__init__(config, ctx)
        self.learned: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}    # linear -> (codes, factor)
        self.log: dict = {}

    def state(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, (codes, factor) in self.learned.items():
            out[f"tesseraq.{name}.codes"] = codes.to(torch.uint8)          # at most 8 bits: one byte each
            out[f"tesseraq.{name}.dequant_factor"] = factor
        return out

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        names = {k[len("tesseraq."):].rsplit(".", 1)[0] for k in state}
        self.learned = {n: (state[f"tesseraq.{n}.codes"].to(torch.int32), state[f"tesseraq.{n}.dequant_factor"].float())
                        for n in names}

    def report(self) -> dict:
        return self.log

    def round(self, bq, data, commit) -> None:
        linears = quantized_linears(self.ctx)
        if not self.learned:
            if data is None:
                raise ValueError("TesseraQ learns the rounding on the block's calibration data: pass BlockData")
            with torch.enable_grad():          # finalize runs under no_grad
                self.learned = self.learn(linears, data)
        for name, qlinear in linears.items():
            codes, factor = self.learned[name]
            scale, zero = qlinear.weight_quantizer.scale_zero(qlinear.weight.float())
            codes = codes.to(qlinear.weight.device)
            commit(name, codes, qlinear.weight_quantizer.stored_scale(scale[..., 0] * factor.to(scale.device)),
                   zero[..., 0])

    def learn(self, linears: dict, data) -> dict:
        cfg, t0 = self.config, time.time()
        soft = {n: SoftRounding(q.weight.detach(), q.weight_quantizer, cfg.tune_scale) for n, q in linears.items()}
        saved = {n: q.weight_quantizer for n, q in linears.items()}
        rtn = {n: (s.base + (rectified_sigmoid(s.nu) >= 0.5).float() + s.zero[:, s.group_of]).clamp(0, s.qmax)
               for n, s in soft.items()}
        for n, q in linears.items():
            q.weight_quantizer = soft[n]
        n = data.inputs.shape[0]
        gen = torch.Generator().manual_seed(int(self.ctx.cfg.seed) * 1000 + int(self.ctx.index))

        objective = BlockObjective.parse(self.ctx.cfg.loss)

        def loss_on(idx) -> torch.Tensor:
            with data.ctx_factory():
                return objective_on(self.ctx.block, data, idx, objective)

        # data-parallel: each rank draws its share of every mini-batch from its own samples, the gradients
        # and losses are averaged over the ranks, so the rounding variables stay identical on every rank
        parallel = data.data_parallel
        batch = max(1, cfg.batch // distributed.world()) if parallel else cfg.batch

        @torch.no_grad()
        def full_loss() -> float:
            value = sum(loss_on(torch.arange(i, min(i + batch, n))).item() * min(batch, n - i)
                        for i in range(0, n, batch)) / n
            return distributed.mean(value) if parallel else value

        try:
            for s in soft.values():           # the loss at round-to-nearest on this grid, for the report
                s.hard[:] = True
                s.hard_up = (rectified_sigmoid(s.nu) >= 0.5).float()
            loss_rtn = full_loss()
            for s in soft.values():
                s.hard[:] = False
            rounds = []
            for threshold in schedule(cfg.rounds):
                for s in soft.values():
                    s.harden(threshold)
                params = [{"params": [s.nu for s in soft.values()], "weight_decay": 0.0}]
                if cfg.tune_scale:
                    params.append({"params": [s.mu for s in soft.values()], "weight_decay": cfg.scale_wd})
                optimizer = torch.optim.Adam(params, lr=cfg.lr)      # a fresh one every round, as the reference
                total = 0.0
                for _ in range(cfg.iters):
                    idx = torch.randperm(n, generator=gen)[: min(batch, n)]
                    loss = loss_on(idx)
                    value = distributed.mean(loss.item()) if parallel else loss.item()
                    if not math.isfinite(value):
                        raise FloatingPointError("TesseraQ: the block loss is not finite")
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    if parallel:
                        distributed.average_gradients([p for s in soft.values() for p in (s.nu, s.mu)])
                    for s in soft.values():              # hardened variables are fixed
                        if s.nu.grad is not None:
                            s.nu.grad[s.hard] = 0
                    optimizer.step()
                    total += value
                hardened = sum(int(s.hard.sum()) for s in soft.values()) / sum(s.hard.numel() for s in soft.values())
                rounds.append({"threshold": threshold, "hardened": round(hardened, 4), "loss": total / cfg.iters})
                log.info("TesseraQ round %d/%d: %.1f%% hard, loss %.6g", len(rounds), len(schedule(cfg.rounds)),
                         100 * hardened, total / cfg.iters)
            for s in soft.values():
                s.harden_all()
            loss_par = full_loss()
            learned = {name: (s.codes(), s.factor().detach().clone()) for name, s in soft.items()}
        finally:
            for name, q in linears.items():
                q.weight_quantizer = saved[name]
        changed = sum(int((learned[k][0] != rtn[k].to(torch.int32)).sum()) for k in learned)
        total_codes = sum(c.numel() for c, _ in learned.values())
        factors = torch.cat([f.flatten() for _, f in learned.values()])
        self.log = {"loss_rtn": loss_rtn, "loss_par": loss_par, "rounds": rounds,
                    "changed_vs_rtn": round(changed / total_codes, 5), "dequant_factor_range":
                    [round(factors.min().item(), 4), round(factors.max().item(), 4)],
                    "steps": cfg.steps, "seconds": round(time.time() - t0, 2)}
        log.info("TesseraQ: loss %.6g at round-to-nearest -> %.6g, %.2f%% of codes differ from RTN, %.1fs",
                 loss_rtn, loss_par, 100 * changed / total_codes, time.time() - t0)
        return learned
