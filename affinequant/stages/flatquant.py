"""FlatQuant (Sun et al., ICML 2025): a learnable Kronecker-factored affine transform in front of every linear,
learnable activation clipping (LAC), trained block by block against the FP block's output.

Where the transforms sit (row-vector convention: activation x ↦ x·P, consumer weight W ↦ W·P⁻ᵀ; kronecker.py):
- after each norm (q/k/v; gate/up): P = P1 ⊗ P2 with a per-channel scale s in front, x ↦ (x ⊙ s)·P. s folds into
  the norm's weight; P stays an online transform of the norm's output (a full matrix cannot fold into a norm).
- before o_proj: P_heads ⊗ P_v. P_v (head_dim) folds into v_proj's rows, since attention mixes tokens, not
  channels, within a head (FlatQuant's v-cache transform: the cache stores v·P_v); P_heads (heads × heads)
  mixes heads, which no producer can absorb: online, in front of o_proj.
- before down_proj: P1 ⊗ P2 online, its scale s folded into up_proj's rows (the gated MLP multiplies up_proj's
  output into down_proj's input channel by channel); no scale where a nonlinearity sits between (OPT's fc1).
- inside attention after RoPE, where k is quantized: the k-cache transform k ↦ k·P_k, q ↦ q·P_k⁻ᵀ.
Mixture-of-experts blocks get the attention transforms only (the MLP input also feeds the router).

Every factor starts random orthogonal (σ = 1) and the scales from SmoothQuant's formula with α = 0.3 on the
block's statistics, so with no training the stage is a random Kronecker rotation after a smoothing scale.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import ConfigError
from ..quant.kronecker import PARAMETRIZATIONS, decompose_dim, make_factor
from ..quant.qmodules import KeyTransform, OnlineTransform, TransformedNorm, set_submodule
from .transforms import (LinearTransform, _floor, apply_linear_plan, fold_into_norm, fuse_part_transforms,
                          smooth_scale)
from .base import Stage, StageConfig, block_device, probe_loss, register

SCHEDULES = ("cosine", "constant")


@dataclass(frozen=True)
class FlatQuantConfig(StageConfig):
    name = "flatquant"
    learns = True
    needs_statistics = True
    lr: float = 5e-3                    # transforms and scales (FlatQuant's flat_lr)
    lac: bool = True                    # learnable activation clipping on every activation quantizer of the block
    lac_lr: float = 5e-2                # FlatQuant: 10 x lr
    parametrization: str = "svd"        # "svd": U·diag(σ)·Vᵀ, exact inverse; "direct": free matrix (--direct_inv)
    diag: bool = True                   # the per-channel scale in front of each Kronecker transform (--add_diag)
    diag_alpha: float = 0.3             # its SmoothQuant start: max|W|^(1-α) / max|x|^α
    key_transform: bool = True          # the k-cache transform, where k is quantized
    schedule: str = "cosine"            # learning rate: cosine down to 1e-3 x lr over the block's steps, or constant

    def __post_init__(self):
        if self.parametrization not in PARAMETRIZATIONS:
            raise ConfigError(f"flatquant: parametrization {self.parametrization!r} is not known: use svd or direct")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"flatquant: schedule {self.schedule!r} is not known: use cosine or constant")
        if not 0.0 <= self.diag_alpha <= 1.0:
            raise ConfigError(f"flatquant: diag_alpha must lie in [0, 1] (got {self.diag_alpha}); FlatQuant uses 0.3")
        if not (self.lr > 0 and self.lac_lr > 0):
            raise ConfigError("flatquant: lr and lac_lr must be positive (FlatQuant: 5e-3 and 5e-2)")


class KroneckerParameters(nn.Module):
    """One location's transform: factors P1 (n1 × n1) and P2 (n2 × n2), and optionally the scale s (n)."""

    def __init__(self, n: int, parametrization: str, generator, device, scale: torch.Tensor | None):
        super().__init__()
        n1, n2 = decompose_dim(n)
        self.left = make_factor(n1, parametrization, generator, device)
        self.right = make_factor(n2, parametrization, generator, device)
        self.scale = None if scale is None else nn.Parameter(scale.to(device).float().clone())

    def factors(self):
        """((P1, P1⁻ᵀ), (P2, P2⁻ᵀ), s or None); s floored away from 0 (its inverse multiplies the weights)."""
        return self.left.pair(), self.right.pair(), None if self.scale is None else _floor(self.scale)


def smooth_start(act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """FlatQuant's scale start: s = max|W|^(1−α) / max|x|^α per input channel; x is multiplied by s (the
    reciprocal of SmoothQuant's divisor, which LET uses)."""
    return 1.0 / smooth_scale(act_absmax, [w.float() for w in weights], alpha)


@register
class FlatQuant(Stage):
    config_class = FlatQuantConfig

    def __init__(self, config: FlatQuantConfig, ctx):
        super().__init__(config, ctx)
        block, adapter, cfg = ctx.block, ctx.adapter, ctx.cfg
        if ctx.act_scales is None and config.diag:
            raise ConfigError("flatquant's scales start from activation statistics (act_scales): compute them, or set "
                              "diag: false")
        device = block_device(ctx)
        # each block's random start is reproducible from the run's seed (and saved with the block anyway)
        generator = torch.Generator().manual_seed(cfg.seed * 100003 + ctx.index)
        self.n_heads, self.n_kv, self.head_dim = adapter.heads(ctx.model_config)
        self.transforms = nn.ModuleDict()

        def weights(names):
            return [block.get_submodule(n).weight.detach() for n in names]

        self.norms: list[tuple[str, tuple, OnlineTransform]] = []
        for i, (norm_name, consumers) in enumerate(adapter.norm_groups):
            n = block.get_submodule(consumers[0]).in_features
            scale = smooth_start(ctx.act_scales[consumers[0]].to(device), weights(consumers),
                                 config.diag_alpha) if config.diag else None
            self.transforms[f"norm{i}"] = KroneckerParameters(n, config.parametrization, generator, device, scale)
            wrapper = TransformedNorm(block.get_submodule(norm_name))
            wrapper.online = OnlineTransform(*decompose_dim(n)).to(device)
            set_submodule(block, norm_name, wrapper)
            self.norms.append((norm_name, consumers, wrapper.online))
        v_name, o_name = adapter.out_pair
        self.transforms["out_heads"] = make_factor(self.n_heads, config.parametrization, generator, device)
        self.transforms["out_value"] = make_factor(self.head_dim, config.parametrization, generator, device)
        self.o_online = ctx.linears[o_name].online = OnlineTransform(self.n_heads, None).to(device)
        self.down = adapter.mlp_out if adapter.mlp_out in ctx.linears else ""
        self.up = adapter.mlp_up if self.down and config.diag else ""
        if self.down:
            n = ctx.linears[self.down].in_features
            scale = smooth_start(ctx.act_scales[self.down].to(device), weights([self.down]),
                                 config.diag_alpha) if self.up else None
            self.transforms["down"] = KroneckerParameters(n, config.parametrization, generator, device, scale)
            self.down_online = ctx.linears[self.down].online = OnlineTransform(*decompose_dim(n)).to(device)
        qkv = getattr(block.get_submodule(adapter.attention), "qkv_quantizers", None)
        self.key, self.key_start = None, ""
        if config.key_transform and qkv is not None and qkv.k is not None:
            self.transforms["key"] = make_factor(self.head_dim, config.parametrization, generator, device)
            self.key = qkv.k_transform = KeyTransform(self.head_dim).to(device)
        self.lac = {}
        if config.lac:
            quantizers = {n: q.act_quantizer for n, q in ctx.linears.items()}
            if qkv is not None:
                quantizers.update({f"attention.{k}": getattr(qkv, k) for k in ("q", "k", "v")})
            self.lac = {n: q for n, q in quantizers.items() if q is not None}
            for q in self.lac.values():
                q.enable_lac(device)

    def prepare(self, bq, data) -> None:
        self.key_start = self.choose_key_start(bq, data) if self.key is not None else ""

    @torch.no_grad()
    def choose_key_start(self, bq, data) -> str:
        """FlatQuant starts the k-cache transform at a random rotation. Where k has a few huge channels (Qwen2.5's
        k biases) a rotated k quantizes far worse than k itself: Qwen2.5-Coder-0.5B with only k at 4 bits goes
        from 45.4 to 94.4 perplexity unrotated and to 1570 rotated (4 windows), where SmolLM2 gains a little
        (33.7 -> 32.7). So the transform starts at the rotation or at the identity, whichever gives the lower
        block loss on the first calibration samples (the guard LET's initialisation has too)."""
        factor = self.transforms["key"]
        rotated_state = {k: v.clone() for k, v in factor.state_dict().items()}
        rotated = probe_loss(bq, data)
        factor.reset_to_identity()
        if rotated <= probe_loss(bq, data):
            factor.load_state_dict(rotated_state)
            return "rotation"
        return "identity"

    # ----- the transforms ---------------------------------------------------------------------
    def _apply(self, merge: bool) -> None:
        adapter = self.ctx.adapter
        linear: dict[str, LinearTransform] = {}
        for i, (norm_name, consumers, online) in enumerate(self.norms):
            (p1, p1_inv_t), (p2, p2_inv_t), s = self.transforms[f"norm{i}"].factors()
            for c in consumers:
                linear[c] = LinearTransform(col=None if s is None else 1.0 / s, col_kron=(p1_inv_t, p2_inv_t))
            wrapper: TransformedNorm = self.ctx.block.get_submodule(norm_name)
            if merge:
                wrapper.scale = None
                if s is not None:       # (y / s⁻¹): the norm's weight times s
                    fold_into_norm(wrapper, 1.0 / s.detach(), None, adapter.norm_weight_offset)
            else:
                wrapper.scale = None if s is None else 1.0 / s
            online.use(p1, p2, merge)
        v_name, o_name = adapter.out_pair
        heads, heads_inv_t = self.transforms["out_heads"].pair()
        value, value_inv_t = self.transforms["out_value"].pair()
        # v·P_v per KV head: v_proj's rows per head become P_vᵀ·W
        linear.setdefault(v_name, LinearTransform()).row = value.transpose(0, 1).expand(self.n_kv, -1, -1)
        linear[o_name] = LinearTransform(col_kron=(heads_inv_t, value_inv_t))
        self.o_online.use(heads, None, merge)
        if self.down:
            (d1, d1_inv_t), (d2, d2_inv_t), s = self.transforms["down"].factors()
            linear[self.down] = LinearTransform(col=None if s is None else 1.0 / s, col_kron=(d1_inv_t, d2_inv_t))
            if s is not None:
                linear.setdefault(self.up, LinearTransform()).row = s
            self.down_online.use(d1, d2, merge)
        if self.key is not None:
            self.key.use(*self.transforms["key"].pair(), merge)
        plan = fuse_part_transforms(linear, adapter.part_rows(self.ctx.model_config), self.head_dim)
        apply_linear_plan(self.ctx.block, plan, merge)

    def refresh(self) -> None:
        self._apply(merge=False)

    @torch.no_grad()
    def merge(self) -> None:
        self._apply(merge=True)

    # ----- training, state, report ------------------------------------------------------------
    def lac_parameters(self) -> list[nn.Parameter]:
        return [p for q in self.lac.values() for p in (q.clip_upper, q.clip_lower)]

    def param_groups(self) -> list[dict]:
        groups = [{"params": list(self.transforms.parameters()), "lr": self.config.lr, "schedule": self.config.schedule}]
        if self.lac:
            groups.append({"params": self.lac_parameters(), "lr": self.config.lac_lr, "schedule": self.config.schedule})
        return groups

    def state(self) -> dict[str, torch.Tensor]:
        state = {f"flatquant.{k}": v for k, v in self.transforms.state_dict().items()}
        for name, q in self.lac.items():
            state[f"flatquant.lac.{name}.clip_upper"] = q.clip_upper
            state[f"flatquant.lac.{name}.clip_lower"] = q.clip_lower
        return state

    @torch.no_grad()
    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        own = {k[len("flatquant."):]: v for k, v in state.items() if not k.startswith("flatquant.lac.")}
        self.transforms.load_state_dict(own)
        for key, value in state.items():
            if key.startswith("flatquant.lac."):
                name, side = key[len("flatquant.lac."):].rsplit(".", 1)
                getattr(self.lac[name], side).copy_(value)

    @torch.no_grad()
    def report(self) -> dict:
        """The transforms' conditioning (max σ / min σ of P over the factors: 1 is a rotation) and LAC's mean
        clip factor."""
        conds = {}
        for name, module in self.transforms.items():
            factors = [module.left, module.right] if isinstance(module, KroneckerParameters) else [module]
            cond = 1.0
            for f in factors:
                sv = torch.linalg.svdvals(f.pair()[0].double())
                cond *= (sv.max() / sv.min()).item()
            conds[name] = round(cond, 4)
        out = {"condition": conds}
        if self.key_start:
            out["key_start"] = self.key_start
        if self.lac:
            out["mean_lac_clip"] = round(torch.sigmoid(torch.stack(self.lac_parameters())).mean().item(), 5)
        return out

