"""OmniQuant's learnable equivalent transformation (LET), placed by an adapter's declarations.

Every transformed weight is one function of the original weight and the transform parameters:
    W' = diag(r) · W · diag(c),   b' = r ⊙ (b + W·δ_in − δ_out)
c/δ_in: the input transform a linear receives from its producer (norm → linears, v → o),
r/δ_out: the output transform it applies for its consumer (q ↔ k, v → o).
Training calls `apply(block, merge=False)` (differentiable, stored weights untouched);
the merge calls `apply(block, merge=True)` once, so training and merge cannot drift apart
(the reference keeps two hand-written copies, and in OmniQuant's OPT path they did drift).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .adapters import Adapter
from .qmodules import QuantLinear, TransformedNorm

SCALE_FLOOR = 1e-5


def _floor(s: torch.Tensor) -> torch.Tensor:
    # Straight-through floor: the forward never divides by ~0 or flips sign, the gradient still flows.
    return s + (s.clamp(min=SCALE_FLOOR) - s).detach()


@dataclass
class LinearTransform:
    col: torch.Tensor | None = None      # multiplies input columns
    shift_in: torch.Tensor | None = None
    row: torch.Tensor | None = None      # multiplies output rows
    shift_out: torch.Tensor | None = None

    def weight_bias(self, weight: torch.Tensor, bias: torch.Tensor | None):
        new_bias = bias
        if self.shift_in is not None:
            extra = weight @ self.shift_in.to(weight.dtype)
            new_bias = extra if new_bias is None else new_bias + extra
        if self.shift_out is not None:
            new_bias = -self.shift_out if new_bias is None else new_bias - self.shift_out
        if self.col is not None:
            weight = weight * self.col
        if self.row is not None:
            weight = weight * self.row[:, None]
            if new_bias is not None:
                new_bias = new_bias * self.row
        return weight, new_bias


def expand_kv(per_kv: torch.Tensor, n_kv: int, n_heads: int) -> torch.Tensor:
    """(n_kv * head_dim,) -> (n_heads * head_dim,): query head h reads KV head h // (n_heads / n_kv)."""
    groups = n_heads // n_kv
    return per_kv.view(n_kv, 1, -1).expand(n_kv, groups, per_kv.numel() // n_kv).reshape(-1)


def reduce_to_kv(per_q: torch.Tensor, n_kv: int, n_heads: int) -> torch.Tensor:
    """(n_heads * head_dim,) -> (n_kv * head_dim,) by the max over the query heads of each group."""
    return per_q.view(n_kv, n_heads // n_kv, -1).amax(dim=1).reshape(-1)


def smooth_scale(act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """SmoothQuant's s = max|x|^α / max|W|^(1−α) per input channel (abs-max of the weights,
    not the signed max of the AffineQuant code)."""
    w_absmax = torch.cat(weights, dim=0).abs().amax(dim=0).clamp(min=SCALE_FLOOR)
    act = act_absmax.float().clamp(min=SCALE_FLOOR)
    return (act.pow(alpha) / w_absmax.float().pow(1 - alpha)).clamp(min=SCALE_FLOOR)


class LET(nn.Module):
    """The LET parameters of one block: a scale (and optional shift) per norm group, a per-KV-channel
    scale (and shift) between v and o, and a per-head q↔k scale tied across RoPE pairs so that it
    commutes with the rotation (an exact equivalence, unlike the reference's per-channel one)."""

    def __init__(self, block: nn.Module, adapter: Adapter, model_config, alpha: float,
                 act_scales: dict[str, torch.Tensor], act_shifts: dict[str, torch.Tensor] | None,
                 use_shift: bool):
        super().__init__()
        self.adapter = adapter
        self.n_heads, self.n_kv, self.head_dim = adapter.heads(model_config)
        dev = next(block.parameters()).device
        self.norm_scales = nn.ParameterList()
        self.norm_shifts = nn.ParameterList()
        for norm_name, consumers in adapter.norm_groups:
            key = consumers[0]
            weights = [block.get_submodule(c).weight.detach().float() for c in consumers]
            self.norm_scales.append(nn.Parameter(smooth_scale(act_scales[key].to(dev), weights, alpha)))
            if use_shift:
                self.norm_shifts.append(nn.Parameter(act_shifts[key].to(dev).float().clone()))
        v_name, o_name = adapter.out_pair
        o_weight = block.get_submodule(o_name).weight.detach().float()
        act_o = reduce_to_kv(act_scales[o_name].to(dev).float(), self.n_kv, self.n_heads)
        w_o = reduce_to_kv(o_weight.abs().amax(dim=0), self.n_kv, self.n_heads)
        self.out_scale = nn.Parameter(smooth_scale(act_o, [w_o[None]], alpha))
        self.out_shift = None
        if use_shift:
            shift = act_shifts[o_name].to(dev).float()
            self.out_shift = nn.Parameter(shift.view(self.n_kv, -1, self.head_dim).mean(1).reshape(-1).clone())
        pair_dim = self.head_dim // 2 if adapter.rope else self.head_dim
        self.qk_scale = nn.Parameter(torch.ones(self.n_kv, pair_dim, device=dev))
        self.use_shift = use_shift

    def qk_channel_scale(self) -> torch.Tensor:
        s = _floor(self.qk_scale)
        if self.adapter.rope:
            s = torch.cat([s, s], dim=-1)   # rotate_half pairs channel i with i + head_dim/2
        return s.reshape(-1)

    def plan(self) -> tuple[dict[str, LinearTransform], dict[str, tuple]]:
        """The transform of every affected linear, and (scale, shift) of every norm."""
        linear: dict[str, LinearTransform] = {}
        norms: dict[str, tuple] = {}
        for i, (norm_name, consumers) in enumerate(self.adapter.norm_groups):
            scale = _floor(self.norm_scales[i])
            shift = self.norm_shifts[i] if self.use_shift else None
            norms[norm_name] = (scale, shift)
            for c in consumers:
                linear[c] = LinearTransform(col=scale, shift_in=shift)
        v_name, o_name = self.adapter.out_pair
        out_scale = _floor(self.out_scale)
        linear[v_name].row = 1.0 / out_scale
        linear[v_name].shift_out = self.out_shift
        linear[o_name] = LinearTransform(
            col=expand_kv(out_scale, self.n_kv, self.n_heads),
            shift_in=None if self.out_shift is None else expand_kv(self.out_shift, self.n_kv, self.n_heads))
        q_name, k_name = self.adapter.qk_pair
        qk = self.qk_channel_scale()
        linear[q_name].row = 1.0 / expand_kv(qk, self.n_kv, self.n_heads)
        linear[k_name].row = qk
        return linear, norms

    def apply(self, block: nn.Module, merge: bool) -> None:
        linear_plan, norm_plan = self.plan()
        for name, transform in linear_plan.items():
            module: QuantLinear = block.get_submodule(name)
            weight, bias = transform.weight_bias(module.weight.float(), None if module.bias is None else module.bias.float())
            if merge:
                module.weight.data.copy_(weight.detach().to(module.weight.dtype))
                if bias is not None:
                    if module.bias is None:
                        module.bias = nn.Parameter(torch.zeros_like(bias, dtype=module.weight.dtype), requires_grad=False)
                    module.bias.data.copy_(bias.detach().to(module.bias.dtype))
                module.temp_weight = module.temp_bias = None
            else:
                module.temp_weight, module.temp_bias = weight, bias
        for name, (scale, shift) in norm_plan.items():
            wrapper: TransformedNorm = block.get_submodule(name)
            if merge:
                fold_into_norm(wrapper.norm, scale.detach(), None if shift is None else shift.detach())
                wrapper.scale = wrapper.shift = None
            else:
                wrapper.scale, wrapper.shift = scale, shift


@torch.no_grad()
def fold_into_norm(norm: nn.Module, scale: torch.Tensor, shift: torch.Tensor | None) -> None:
    """(w ⊙ x̂ + b − δ) / s  ==  (w / s) ⊙ x̂ + (b − δ) / s."""
    norm.weight.data.copy_((norm.weight.float() / scale).to(norm.weight.dtype))
    if shift is not None or getattr(norm, "bias", None) is not None:
        bias = getattr(norm, "bias", None)
        if bias is None:
            raise ValueError(f"{type(norm).__name__} has no bias to absorb a LET shift")
        new = bias.float() - (shift if shift is not None else 0.0)
        bias.data.copy_((new / scale).to(bias.dtype))
