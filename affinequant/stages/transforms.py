"""Equivalent transformations between a producer and its consumers, placed by an adapter:
OmniQuant's LET (per-channel scales and shifts) and AffineQuant's invertible matrices.

Every transformed weight is one function of the original weight and the transform parameters
(row-vector convention, y = x Wᵀ + b; a consumer receives x' = (x − δ)·T⁻¹):
    consumer:  W' = W·Tᵀ,   b' = b + W·δ            (T = diag(s) for LET)
    producer:  W' = R·W,    b' = R·(b − δ_out)      (R = T⁻ᵀ on v for v → o; q ↔ k see below)
Training calls `apply(block, merge=False)` (differentiable, stored weights untouched); the merge
calls `apply(block, merge=True)` once, so training and merge cannot drift apart (the reference
keeps two hand-written copies, and in OmniQuant's OPT path they did drift).

AffineQuant's matrices are A∘M with a banded mask M (1 on the diagonal, sf on unlocked bands,
0 elsewhere) that unlocks band after band over the epochs; their inverses are computed once per
step in float32. A matrix after a norm cannot be folded into the norm: it stays a runtime
matmul by its inverse (TransformedNorm.inverse), saved and loaded with the model.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from ..models.adapters import Adapter
from ..quant.kronecker import kron_matmul
from ..quant.qmodules import QuantLinear, TransformedNorm

log = logging.getLogger("affinequant")

SCALE_FLOOR = 1e-5
QK_OUTPUT = ":output"    # act_scales key suffix of the q/k output statistics (stats.collect_act_stats)
MAX_CONDITION = 1e4      # beyond this an effective matrix is "heading towards singular": back off


def _floor(s: torch.Tensor) -> torch.Tensor:
    # Straight-through floor: the forward never divides by ~0 or flips sign, the gradient still flows.
    return s + (s.clamp(min=SCALE_FLOOR) - s).detach()


def mul_cols(weight: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """W·Tᵀ for T a vector (diagonal), a full matrix, or per-head blocks (H, h, h)."""
    if t.dim() == 1:
        return weight * t
    if t.dim() == 2:
        return weight @ t.T
    heads, h, _ = t.shape
    return torch.einsum("oHj,Hij->oHi", weight.view(weight.shape[0], heads, h), t).reshape(weight.shape)


def mul_rows(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """R·W (or R·b for a bias vector) for R a vector, a full matrix, or per-head blocks."""
    if r.dim() == 1:
        return x * (r[:, None] if x.dim() == 2 else r)
    if r.dim() == 2:
        return r @ x
    heads, h, _ = r.shape
    return torch.einsum("Hij,Hj...->Hi...", r, x.reshape(heads, h, *x.shape[1:])).reshape(x.shape)


def qk_transform_exists(adapter: Adapter, model_config) -> bool:
    """Whether a q <-> k transform preserves the attention scores: not where q and k pass through their own
    norms (Qwen3, Gemma-3), nor under partial RoPE (Phi-4-mini's partial_rotary_factor < 1), whose channel
    pairs are not the (i, i + head_dim/2) that the tied scales assume."""
    return adapter.qk_transform and getattr(model_config, "partial_rotary_factor", 1.0) in (None, 1.0)


@dataclass
class LinearTransform:
    col: torch.Tensor | None = None      # input transform T (consumer side)
    shift_in: torch.Tensor | None = None
    row: torch.Tensor | None = None      # output transform R (producer side)
    shift_out: torch.Tensor | None = None
    col_kron: tuple | None = None        # then W·(A ⊗ B) on the input side: FlatQuant's (P1⁻ᵀ, P2⁻ᵀ) (kronecker.py)

    def weight_bias(self, weight: torch.Tensor, bias: torch.Tensor | None):
        new_bias = bias
        if self.shift_in is not None:
            extra = weight @ self.shift_in.to(weight.dtype)
            new_bias = extra if new_bias is None else new_bias + extra
        if self.shift_out is not None:
            new_bias = -self.shift_out if new_bias is None else new_bias - self.shift_out
        if self.col is not None:
            weight = mul_cols(weight, self.col)
        if self.col_kron is not None:
            weight = kron_matmul(weight, *self.col_kron)
        if self.row is not None:
            weight = mul_rows(weight, self.row)
            if new_bias is not None:
                new_bias = mul_rows(new_bias, self.row)
        return weight, new_bias


def expand_kv(per_kv: torch.Tensor, n_kv: int, n_heads: int) -> torch.Tensor:
    """Per-KV-head values to per-query-head values: query head h reads KV head h // (n_heads / n_kv).
    Vectors (n_kv·h,) become (n_heads·h,); blocks (n_kv, h, h) become (n_heads, h, h)."""
    groups = n_heads // n_kv
    if per_kv.dim() == 3:
        return per_kv.repeat_interleave(groups, dim=0)
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


def log_activation_scale(act_absmax: torch.Tensor) -> torch.Tensor:
    """LRQuant's initialisation: s = max|x| / log2(2 + max|x|) per channel. It reads no weights and no α:
    a large channel is divided by nearly itself over its logarithm, a small one (|x| << 1) by about |x|."""
    act = act_absmax.float().clamp(min=0)
    return (act / torch.log2(2 + act)).clamp(min=SCALE_FLOOR)


def reference_smooth_scale(act_absmax: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """The reference code's initialisation (--reference_compat): statistics rounded to fp16, and the
    *signed* max over the output rows of one weight (AffineQuant kept OmniQuant's early bug)."""
    act = act_absmax.half().clamp(min=SCALE_FLOOR).pow(alpha).float()     # computed in float16, as there
    w_max = weight.float().amax(dim=0).clamp(min=SCALE_FLOOR)
    return (act / w_max.pow(1 - alpha)).clamp(min=SCALE_FLOOR)


REFERENCE_TRUNCATION = 1e-2     # the reference's truncate_number threshold


@torch.no_grad()
def truncate_(t: torch.Tensor, threshold: float = REFERENCE_TRUNCATION) -> None:
    """The reference's truncate_number, in place: every nonzero entry with |x| < threshold becomes
    sign(x)·threshold (exact zeros stay zero)."""
    small = t.abs() < threshold
    t[small] = t.sign()[small] * threshold


def band_count(dim: int, epoch: int, epochs: int, reference: bool = False) -> int:
    """Bands unlocked on each side, the diagonal included: k_e = floor((D−1)/(E−1)·e) + 1.
    Integer arithmetic, so the last epoch unlocks all D bands (the reference's float truncation
    leaves one locked; `reference` reproduces it). One epoch or none: the diagonal only (the reference
    divides by zero)."""
    if epochs <= 1:
        return 1
    if reference:
        return int((dim - 1) / (epochs - 1) * min(epoch, epochs - 1)) + 1
    return (dim - 1) * min(epoch, epochs - 1) // (epochs - 1) + 1


def band_mask(dim: int, bands: int, sf: float, device) -> torch.Tensor:
    offset = (torch.arange(dim, device=device)[:, None] - torch.arange(dim, device=device)[None, :]).abs()
    mask = torch.where(offset < bands, torch.full((), sf, device=device), torch.zeros((), device=device))
    return mask.fill_diagonal_(1.0)


def diagonal_dominance(t: torch.Tensor) -> float:
    """min_i |T_ii| / Σ_{j≠i} |T_ij| over rows (and blocks): > 1 means strictly dominant, so
    invertible by the Levy–Desplanques theorem."""
    diag = t.diagonal(dim1=-2, dim2=-1).abs()
    off = t.abs().sum(-1) - diag
    ratio = torch.where(off > 0, diag / off.clamp(min=torch.finfo(t.dtype).tiny), torch.full_like(diag, float("inf")))
    return ratio.min().item()       # inf: no off-diagonal entry yet (a band was just unlocked)


def rope_pair_blocks(pairs: torch.Tensor) -> torch.Tensor:
    """(H, h/2, 2) complex scales c = a + ib per RoPE pair -> (H, h, h) real blocks of
    multiplication by c on the pair (x_i, x_{i+h/2}). Multiplication by a complex number
    commutes with RoPE's rotation, so q·c and k/c̄ keep every attention score exactly."""
    heads, half, _ = pairs.shape
    a, b = pairs[..., 0], pairs[..., 1]
    top = torch.cat([torch.diag_embed(a), -torch.diag_embed(b)], dim=-1)
    bottom = torch.cat([torch.diag_embed(b), torch.diag_embed(a)], dim=-1)
    return torch.cat([top, bottom], dim=-2)


def fuse_part_transforms(linear: dict[str, LinearTransform], part_rows: dict, head_dim: int) -> dict[str, LinearTransform]:
    """Fold the output transforms planned for the parts of a fused linear (Phi-3's q/k/v in qkv_proj) into
    one transform of its rows: vectors concatenated, or per-head blocks where any part has blocks (a
    vector part becomes diagonal blocks, a part without a transform identity blocks)."""
    for name, parts in part_rows.items():
        planned = [(linear.pop(part, None), rows) for part, rows in parts]
        if all(t is None for t, _ in planned):
            continue
        if any(t is not None and (t.col is not None or t.shift_in is not None) for t, _ in planned):
            raise ValueError(f"{name}: an input transform planned for one of its parts; the parts share the input")
        target = linear.setdefault(name, LinearTransform())
        rows = [(t.row if t is not None else None, n) for t, n in planned]
        if all(r is None or r.dim() == 1 for r, _ in rows):
            dev = next(r for r, _ in rows if r is not None).device if any(r is not None for r, _ in rows) else None
            if dev is not None:
                row = torch.cat([r if r is not None else torch.ones(n, device=dev) for r, n in rows])
                target.row = row if target.row is None else row * target.row
        else:
            h = head_dim
            blocks = []
            for r, n in rows:
                if r is None:
                    dev = next(x for x, _ in rows if x is not None).device
                    blocks.append(torch.eye(h, device=dev).expand(n // h, h, h))
                elif r.dim() == 1:
                    blocks.append(torch.diag_embed(r.view(n // h, h)))
                else:
                    blocks.append(r)
            if target.row is not None:
                raise ValueError(f"{name}: a row transform of the whole fused linear and per-head ones of its parts")
            target.row = torch.cat(blocks)
        shifts = [(t.shift_out if t is not None else None, n) for t, n in planned]
        if any(sh is not None for sh, _ in shifts):
            dev = next(sh for sh, _ in shifts if sh is not None).device
            target.shift_out = torch.cat([sh if sh is not None else torch.zeros(n, device=dev) for sh, n in shifts])
    return linear


class LET(nn.Module):
    """The equivalent-transformation parameters of one block.

    norm → consumers: a scale per channel (LET), or a d×d matrix with --use_ln_matrix;
    v → o: a scale per KV channel (LET), or a per-KV-head matrix in AffineQuant mode;
    q ↔ k: a scale per KV head and RoPE pair (LET), or with --use_matrix a per-head matrix
    (no RoPE) / a complex scale per RoPE pair (RoPE models: the general transform that commutes
    with the rotation, so the block's function is preserved exactly).

    `reference` (--reference_compat) follows the reference code instead: its initialisation
    (reference_smooth_scale), shifts trained even after an RMSNorm (from act_shifts where the norm has
    a bias, else from 0), the q ↔ k scale or matrix per channel / head as if there were no RoPE (not
    function-preserving on RoPE models, as in the reference), and its band schedule.
    """

    def __init__(self, block: nn.Module, adapter: Adapter, model_config, alpha: float,
                 act_scales: dict[str, torch.Tensor], act_shifts: dict[str, torch.Tensor] | None,
                 use_shift: bool, ln_matrix: bool = False, affine: bool = False, qk_matrix: bool = False,
                 sf: float = 1.0, qk_from_stats: bool = True, reference: bool = False, scale_init: str = "smoothquant"):
        super().__init__()
        self.adapter, self.reference = adapter, reference
        self.n_heads, self.n_kv, self.head_dim = adapter.heads(model_config)
        self.use_shift, self.ln_matrix, self.affine, self.qk_matrix = use_shift, ln_matrix, affine, qk_matrix
        self.qk_pairs = adapter.rope and not reference      # q/k scales tied per RoPE pair
        self.ln_sf = self.head_sf = sf
        dev = next(block.parameters()).device
        self.hidden = block.get_submodule(adapter.norm_groups[0][1][0]).in_features
        self.part_rows = adapter.part_rows(model_config)
        self.norm_params = nn.ParameterList()
        self.norm_shifts = nn.ParameterList()

        def initial_shift(key: str) -> torch.Tensor:
            if act_shifts is not None and key in act_shifts and adapter.norm_has_bias:
                return act_shifts[key].to(dev).float().clone()
            return torch.zeros(act_scales[key].numel(), device=dev)      # the reference's start after an RMSNorm

        for i, (norm_name, consumers) in enumerate(adapter.norm_groups):
            key = consumers[0]
            if scale_init == "log":
                s = log_activation_scale(act_scales[key].to(dev))
            elif reference:
                s = reference_smooth_scale(act_scales[key].to(dev),
                                           block.get_submodule(adapter.reference_init_linears[i]).weight.detach(), alpha)
            else:
                weights = [block.get_submodule(c).weight.detach().float() for c in consumers]
                s = smooth_scale(act_scales[key].to(dev), weights, alpha)
            self.norm_params.append(nn.Parameter(torch.diag(s) if ln_matrix else s))
            if use_shift:
                self.norm_shifts.append(nn.Parameter(initial_shift(key)))
        v_name, o_name = adapter.out_pair
        o_weight = block.get_submodule(o_name).weight.detach().float()
        act_o = reduce_to_kv(act_scales[o_name].to(dev).float(), self.n_kv, self.n_heads)
        if scale_init == "log":
            s_out = log_activation_scale(act_o)
        elif reference:
            w_o = reduce_to_kv(o_weight.amax(dim=0), self.n_kv, self.n_heads)
            s_out = reference_smooth_scale(act_o, w_o[None], alpha)
        else:
            w_o = reduce_to_kv(o_weight.abs().amax(dim=0), self.n_kv, self.n_heads)
            s_out = smooth_scale(act_o, [w_o[None]], alpha)
        self.out_param = nn.Parameter(torch.diag_embed(s_out.view(self.n_kv, self.head_dim)) if affine else s_out)
        self.out_shift = None
        if use_shift:
            shift = initial_shift(o_name)
            self.out_shift = nn.Parameter(shift.view(self.n_kv, -1, self.head_dim).mean(1).reshape(-1).clone())
        if not qk_transform_exists(adapter, model_config):
            self.qk_param = None
        elif reference and not qk_matrix:   # OmniQuant / AffineQuant: a scale per channel, starting at 1
            self.qk_param = nn.Parameter(torch.ones(self.n_kv, self.head_dim, device=dev))
        elif qk_matrix and self.qk_pairs:
            pairs = torch.zeros(self.n_kv, self.head_dim // 2, 2, device=dev)
            pairs[..., 0] = 1.0
            self.qk_param = nn.Parameter(pairs)
        elif qk_matrix:
            self.qk_param = nn.Parameter(torch.eye(self.head_dim, device=dev).repeat(self.n_kv, 1, 1))
        else:
            q_name, k_name = adapter.qk_pair
            q_out, k_out = act_scales.get(q_name + QK_OUTPUT), act_scales.get(k_name + QK_OUTPUT)
            if qk_from_stats and q_out is not None and k_out is not None:
                s_qk = self.qk_smooth_scale(q_out.to(dev).float(), k_out.to(dev).float(), alpha)
            else:    # --qk_init ones, or statistics without q/k outputs: OmniQuant's start, all ones
                s_qk = torch.ones(self.n_kv, self.head_dim // 2 if self.qk_pairs else self.head_dim, device=dev)
            self.qk_param = nn.Parameter(s_qk)
        # masks start at the diagonal; set_epoch unlocks bands
        self.register_buffer("ln_mask", band_mask(self.hidden, 1, self.ln_sf, dev) if ln_matrix else None,
                             persistent=False)
        self.register_buffer("head_mask", band_mask(self.head_dim, 1, self.head_sf, dev), persistent=False)
        self.ln_bands = self.head_bands = 1

    def qk_smooth_scale(self, q_absmax: torch.Tensor, k_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
        """The q ↔ k scale s (q/s, k·s) that migrates k's outlier channels into q, as SmoothQuant does
        for x and W (QServe's SmoothAttention): s = max|q|^(1−α) / max|k|^α, per KV head and channel,
        q's maximum taken over the query heads that share the KV head. For RoPE models a pair
        (i, i + head_dim/2) rotates together, so it takes one scale, from the larger of its two maxima.
        Without it OmniQuant starts this scale at 1, and a short calibration leaves it there."""
        q = reduce_to_kv(q_absmax, self.n_kv, self.n_heads).view(self.n_kv, self.head_dim)
        k = k_absmax.view(self.n_kv, self.head_dim)
        if self.qk_pairs:
            q = q.view(self.n_kv, 2, -1).amax(1)
            k = k.view(self.n_kv, 2, -1).amax(1)
        q, k = q.clamp(min=SCALE_FLOOR), k.clamp(min=SCALE_FLOOR)
        return (q.pow(1 - alpha) / k.pow(alpha)).clamp(min=SCALE_FLOOR)

    @torch.no_grad()
    def reset_to_identity(self) -> None:
        """Every transform to the identity (scales 1, shifts 0): the block's own weights."""
        for p in list(self.norm_params) + [self.out_param]:
            p.copy_(torch.eye(p.shape[-1], device=p.device).expand_as(p) if p.dim() >= 2 else torch.ones_like(p))
        for p in list(self.norm_shifts) + ([self.out_shift] if self.out_shift is not None else []):
            p.zero_()
        if self.qk_param is None:
            return
        if self.qk_matrix and self.qk_pairs:
            self.qk_param.zero_()
            self.qk_param[..., 0] = 1.0
        elif self.qk_matrix:
            self.qk_param.copy_(torch.eye(self.head_dim, device=self.qk_param.device).expand_as(self.qk_param))
        else:
            self.qk_param.fill_(1.0)

    def scale_params(self) -> list[nn.Parameter]:
        """The parameters the reference names *smooth_scale* (vectors and raw matrices)."""
        return [p for p in (*self.norm_params, self.out_param, self.qk_param) if p is not None]

    @torch.no_grad()
    def truncate(self) -> None:
        """The reference's truncate_number on every scale before each step and at the merge."""
        for p in self.scale_params():
            truncate_(p.data)

    # ----- the gradual mask -------------------------------------------------------------------
    def masked_matrices(self, ln_mask=None, head_mask=None) -> list[tuple[str, torch.Tensor]]:
        ln_mask = self.ln_mask if ln_mask is None else ln_mask
        head_mask = self.head_mask if head_mask is None else head_mask
        out = []
        if self.ln_matrix:
            out += [(f"norm{i}", p * ln_mask) for i, p in enumerate(self.norm_params)]
        if self.affine:
            out.append(("v→o", self.out_param * head_mask))
        if self.qk_matrix and not self.qk_pairs:
            out.append(("q↔k", self.qk_param * head_mask))
        return out

    @torch.no_grad()
    def set_epoch(self, epoch: int, epochs: int) -> dict:
        """Unlock the bands of epoch `epoch` of `epochs`. If the matrices would be ill-conditioned
        under the new mask, halve sf (up to 4 times) and, failing that, hold the unlock."""
        if not (self.ln_matrix or self.affine):
            return {}
        dev = self.head_mask.device
        want_ln = band_count(self.hidden, epoch, epochs, self.reference)
        want_head = band_count(self.head_dim, epoch, epochs, self.reference)
        ln_sf, head_sf = self.ln_sf, self.head_sf
        for attempt in range(5):
            ln_mask = band_mask(self.hidden, want_ln, ln_sf, dev) if self.ln_matrix else None
            head_mask = band_mask(self.head_dim, want_head, head_sf, dev)
            cond = max((torch.linalg.cond(t.float()).max().item() for _, t in
                        self.masked_matrices(ln_mask, head_mask)), default=1.0)
            if cond < MAX_CONDITION:
                break
            ln_sf, head_sf = ln_sf / 2, head_sf / 2
        else:
            log.warning("epoch %d: matrices would be ill-conditioned (cond %.3g): holding the unlock at %d/%d "
                        "bands", epoch, cond, self.ln_bands, self.head_bands)
            return self.health()
        if (ln_sf, head_sf) != (self.ln_sf, self.head_sf):
            log.warning("epoch %d: condition number too high; stability factor lowered to %.3g / %.3g",
                        epoch, ln_sf, head_sf)
        self.ln_sf, self.head_sf = ln_sf, head_sf
        self.ln_mask, self.head_mask = ln_mask, head_mask
        self.ln_bands, self.head_bands = want_ln, want_head
        return self.health()

    def mask_state(self) -> dict[str, torch.Tensor]:
        return {"mask.ln_bands": torch.tensor(self.ln_bands), "mask.head_bands": torch.tensor(self.head_bands),
                "mask.ln_sf": torch.tensor(self.ln_sf, dtype=torch.float64),
                "mask.head_sf": torch.tensor(self.head_sf, dtype=torch.float64)}

    def restore_mask(self, state: dict[str, torch.Tensor]) -> None:
        dev = self.head_mask.device
        self.ln_bands, self.head_bands = int(state["mask.ln_bands"]), int(state["mask.head_bands"])
        self.ln_sf, self.head_sf = float(state["mask.ln_sf"]), float(state["mask.head_sf"])
        if self.ln_matrix:
            self.ln_mask = band_mask(self.hidden, self.ln_bands, self.ln_sf, dev)
        self.head_mask = band_mask(self.head_dim, self.head_bands, self.head_sf, dev)

    @torch.no_grad()
    def health(self) -> dict:
        report = {"ln_bands": self.ln_bands, "head_bands": self.head_bands, "sf": [self.ln_sf, self.head_sf]}
        for name, t in self.masked_matrices():
            report[name] = {"dominance": diagonal_dominance(t.float()),
                            "cond": torch.linalg.cond(t.float()).max().item()}
        return report

    # ----- the transforms ---------------------------------------------------------------------
    def plan(self) -> tuple[dict[str, LinearTransform], dict[str, tuple]]:
        """The transform of every affected linear, and (scale, shift, inverse) of every norm.
        Each matrix is inverted once here, in float32, and reused wherever it is needed."""
        linear: dict[str, LinearTransform] = {}
        norms: dict[str, tuple] = {}
        for i, (norm_name, consumers) in enumerate(self.adapter.norm_groups):
            shift = self.norm_shifts[i] if self.use_shift else None
            if self.ln_matrix:
                t = self.norm_params[i] * self.ln_mask
                norms[norm_name] = (None, shift, torch.linalg.inv(t.float()))
            else:
                t = _floor(self.norm_params[i])
                norms[norm_name] = (t, shift, None)
            for c in consumers:
                linear[c] = LinearTransform(col=t, shift_in=shift)
        v_name, o_name = self.adapter.out_pair
        linear.setdefault(v_name, LinearTransform())            # a part of a fused linear has no entry yet
        if self.affine:
            t_out = self.out_param * self.head_mask                        # (n_kv, h, h)
            linear[v_name].row = torch.linalg.inv(t_out.float()).transpose(-1, -2)
        else:
            t_out = _floor(self.out_param)
            linear[v_name].row = 1.0 / t_out
        linear[v_name].shift_out = self.out_shift
        linear[o_name] = LinearTransform(
            col=expand_kv(t_out, self.n_kv, self.n_heads),
            shift_in=None if self.out_shift is None else expand_kv(self.out_shift, self.n_kv, self.n_heads))
        if self.qk_param is not None:
            q_name, k_name = self.adapter.qk_pair
            q_row, k_row = self.qk_rows()
            linear.setdefault(q_name, LinearTransform()).row = expand_kv(q_row, self.n_kv, self.n_heads)
            linear.setdefault(k_name, LinearTransform()).row = k_row
        return self.fuse(linear), norms

    def fuse(self, linear: dict[str, LinearTransform]) -> dict[str, LinearTransform]:
        return fuse_part_transforms(linear, self.part_rows, self.head_dim)

    def qk_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Output transforms of q and k (per KV head) such that every q·k score is unchanged."""
        if self.qk_matrix and self.qk_pairs:
            c = self.qk_param
            norm2 = (c[..., 0] ** 2 + c[..., 1] ** 2).clamp(min=SCALE_FLOOR)
            # q·c and k/c̄ = k·c/|c|²: the same rotation of both, and scales |c| and 1/|c|.
            return rope_pair_blocks(c), rope_pair_blocks(c / norm2[..., None])
        if self.qk_matrix:
            t = self.qk_param * self.head_mask
            return torch.linalg.inv(t.float()).transpose(-1, -2), t           # q·T⁻¹, k·Tᵀ
        s = _floor(self.qk_param)
        if self.qk_pairs:
            s = torch.cat([s, s], dim=-1)   # rotate_half pairs channel i with i + head_dim/2
        s = s.reshape(-1)
        return 1.0 / s, s

    def apply(self, block: nn.Module, merge: bool) -> None:
        linear_plan, norm_plan = self.plan()
        apply_linear_plan(block, linear_plan, merge)
        for name, (scale, shift, inverse) in norm_plan.items():
            wrapper: TransformedNorm = block.get_submodule(name)
            if merge:
                wrapper.scale = wrapper.shift = None
                if inverse is not None and _is_diagonal(inverse):
                    scale, inverse = 1.0 / inverse.diagonal(), None   # a diagonal matrix folds like LET
                if inverse is not None:
                    if shift is not None:
                        fold_into_norm(wrapper, torch.ones_like(shift), shift.detach(), self.adapter.norm_weight_offset)
                    wrapper.set_inverse(inverse.detach())
                else:
                    fold_into_norm(wrapper, scale.detach(), None if shift is None else shift.detach(),
                                   self.adapter.norm_weight_offset)
            else:
                wrapper.scale, wrapper.shift, wrapper.inverse_train = scale, shift, inverse


def apply_linear_plan(block: nn.Module, plan: dict[str, LinearTransform], merge: bool) -> None:
    """Every planned linear's transformed weight and bias: its temp weights while training (differentiable,
    stored weights untouched), or written into the stored weights once at the merge. One function for both,
    so training and merge cannot drift apart."""
    for name, transform in plan.items():
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


def _is_diagonal(t: torch.Tensor) -> bool:
    return bool((t - torch.diag_embed(t.diagonal())).abs().max() == 0)


@torch.no_grad()
def fold_into_norm(wrapper: TransformedNorm, scale: torch.Tensor, shift: torch.Tensor | None,
                   weight_offset: float = 0.0) -> None:
    """(w ⊙ x̂ + b − δ) / s  ==  (w / s) ⊙ x̂ + (b − δ) / s. A norm without a bias (RMSNorm) keeps
    −δ / s in the wrapper's bias (only the reference's conventions shift there). A norm that scales by
    (offset + w) (Gemma: 1 + w) stores w' = (offset + w) / s − offset."""
    norm = wrapper.norm
    new_weight = (weight_offset + norm.weight.float()) / scale - weight_offset
    norm.weight.data.copy_(new_weight.to(norm.weight.dtype))
    bias = getattr(norm, "bias", None)
    if bias is not None:
        new = bias.float() - (shift if shift is not None else 0.0)
        bias.data.copy_((new / scale).to(bias.dtype))
    elif shift is not None:
        wrapper.set_bias(-shift / scale)
