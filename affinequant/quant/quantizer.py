"""Uniform min-max fake quantization with learnable weight clipping (LWC).

One formula serves weights and activations:
    scale = range / levels,  zero = round(-xmin / scale),  q = clamp(round(x / scale) + zero, 0, 2^N - 1)
    x_hat = (q - zero) * scale
Rounding uses the straight-through estimator so LWC's clipping factors learn through `scale`.
"""
from __future__ import annotations

import math

import torch
from torch import nn

# The scale is clamped away from zero: a constant group (max == min) would otherwise give
# scale 0 and NaN, as in the reference code's quantizer.
SCALE_MIN, SCALE_MAX = 1e-5, 1e4
LWC_INIT = 4.0  # sigmoid(4) ~ 0.982 of the row/group max and min, as OmniQuant


def round_ste(x: torch.Tensor) -> torch.Tensor:
    return (x.round() - x).detach() + x


def minmax_scale_zero(xmin: torch.Tensor, xmax: torch.Tensor, bits: int, symmetric: bool, reference: bool = False,
                      qmax: int | None = None):
    """Scale and integer zero point of the grid [0, qmax] (default 2^bits - 1) that covers [xmin, xmax].

    Symmetric follows the GPTQ convention (zero = 2^(bits-1)) so that exports are standard.
    Asymmetric ranges always contain 0, as in GPTQ: the zero point is then an exact code in
    [0, 2^bits - 1], so a group that does not straddle 0 still packs without wrap-around.
    `reference`: the OmniQuant/AffineQuant convention instead (--reference_compat): the range is the
    group's own, and the zero point round(-xmin/scale) may fall outside the grid (such a group cannot
    be packed in the GPTQ layout); symmetric: zero 2^(bits-1) - 1.
    `qmax`: ABQ-LLM's bit balance, 2^bits levels + 1 (asymmetric only).
    """
    qmax = 2**bits - 1 if qmax is None else qmax
    if symmetric:
        absmax = torch.maximum(xmax.abs(), xmin.abs())
        scale = (absmax / max(2 ** (bits - 1) - 1, 1)).clamp(SCALE_MIN, SCALE_MAX)
        zero = torch.full_like(scale, float(2 ** (bits - 1) - (1 if reference else 0)))
    elif reference:
        scale = ((xmax - xmin) / qmax).clamp(SCALE_MIN, SCALE_MAX)
        zero = (-xmin / scale).clamp(-SCALE_MAX, SCALE_MAX).round().detach()
    else:
        xmin, xmax = xmin.clamp(max=0), xmax.clamp(min=0)
        scale = ((xmax - xmin) / qmax).clamp(SCALE_MIN, SCALE_MAX)
        zero = (-xmin / scale).round().clamp(0, qmax).detach()
    return scale, zero


def grid_codes(x: torch.Tensor, scale, zero, qmax: int) -> torch.Tensor:
    """The integer codes of x on the grid [0, qmax] (float tensor, no gradient path): what every rounder stores."""
    return (x / scale).round().add(zero).clamp(0, qmax)


class _FakeQuant(torch.autograd.Function):
    """(clamp(round(x / scale) + zero, 0, qmax) - zero) * scale, with the straight-through estimator, as one
    autograd node: it saves only its inputs and recomputes the grid in backward, where the same formula built
    from separate operations would keep half a dozen x-sized intermediates alive per weight until backward.
    Its gradients are those of that formula (tests/test_quantizer.py) in closed form: through the rounding the
    gradient is the identity and the clamp passes it where round(x / scale) + zero lies in [0, qmax], so x gets
    `grad` there (the separate operations compute (grad * scale) / scale, the same to one rounding); `scale`
    gets sum(grad * (code - zero)) - sum(passed grad * x / scale) over what it was broadcast across; `zero` is
    a constant (every caller detaches it). Each direction is one kernel (KERNELS)."""

    @staticmethod
    def forward(ctx, x, scale, zero, qmax: int):
        ctx.save_for_backward(x, scale, zero)
        ctx.qmax = qmax
        return KERNELS.grid(x, scale, zero, qmax)

    @staticmethod
    def backward(ctx, grad):
        x, scale, zero = ctx.saved_tensors
        need_x, need_scale = ctx.needs_input_grad[:2]
        grad_x, grad_scale = KERNELS.grads(x, scale, zero, grad, ctx.qmax, need_x)
        return (grad_x.sum_to_size(x.shape) if need_x else None,
                grad_scale.sum_to_size(scale.shape) if need_scale else None, None, None)


class _LastDimRange(torch.autograd.Function):
    """x.amin(-1, keepdim=True), x.amax(-1, keepdim=True) with autograd's own gradients for them (each split
    evenly over the entries that attain the extreme) computed by one kernel (KERNELS.range_grads), where
    autograd's backward of the two reductions makes about ten passes over x."""

    @staticmethod
    def forward(ctx, x):
        low, high = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
        ctx.save_for_backward(x, low, high)
        return low, high

    @staticmethod
    def backward(ctx, grad_low, grad_high):
        return KERNELS.range_grads(*ctx.saved_tensors, grad_low, grad_high)


def last_dim_range(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The min and max of x over its last dimension (kept): a group's or a token's range."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _LastDimRange.apply(x)
    return x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)


def _range_grads(x, low, high, grad_low, grad_high):
    """The gradient of (amin, amax) over the last dimension: each extreme's gradient split evenly over the
    entries equal to it, as autograd computes it (the same values)."""
    at_low, at_high = x == low, x == high
    return (torch.where(at_low, grad_low / at_low.sum(-1, keepdim=True), 0.0)
            + torch.where(at_high, grad_high / at_high.sum(-1, keepdim=True), 0.0))


def _grid(x, scale, zero, qmax: int):
    """(clamp(round(x / scale) + zero, 0, qmax) - zero) * scale, one temporary updated in place."""
    return (x / scale).round_().add_(zero).clamp_(0, qmax).sub_(zero).mul_(scale)


def _grid_out_of_place(x, scale, zero, qmax: int):
    """_grid without in-place operations, for the compiler to fuse (the same values)."""
    return ((x / scale).round() + zero).clamp(0, qmax).sub(zero).mul(scale)


def _ste_grads(x, scale, zero, grad, qmax: int, need_x: bool):
    """_FakeQuant's gradients: x's (None unless `need_x`) and scale's, the latter summed over the last dimension
    when scale has 1 there (the group or the token; summed here so that a compiled kernel fuses the sum) and
    still to be summed over scale's other broadcast dimensions."""
    ratio = x / scale
    codes = ratio.round() + zero
    clamped = codes.clamp(0, qmax)
    passed = torch.where(clamped != codes, 0.0, grad)      # a NaN code counts as clamped: no gradient
    per_element = grad * (clamped - zero) - passed * ratio
    grad_scale = per_element.sum(-1, keepdim=True) if scale.shape[-1] == 1 else per_element
    return (passed if need_x else None), grad_scale


_COMPILED: dict = {}          # torch.compile's wrappers, made once per process


class _Kernels:
    """The fake quantizer's element-wise kernels (forward grid, backward gradients, the range's gradients): eager PyTorch, several
    passes over the tensor each, or the same functions compiled by torch.compile into one fused loop each
    (inductor: C++ on CPU, Triton on CUDA), several times faster (bench/affine_cost.py). The values are the same
    bit for bit; the gradients to float rounding (the sums run in another order). `use(mode)` switches them for
    the process; a backend that cannot build falls back to eager with one warning."""

    def __init__(self):
        self._eager()

    def _eager(self) -> None:
        self.mode = "eager"
        self.grid, self.grads, self.range_grads = _grid, _ste_grads, _range_grads

    def use(self, mode: str) -> str:
        """"eager", "compiled", or "auto" (compiled where torch.compile can build kernels: a C++ compiler on
        CPU, and Triton too where CUDA is). Returns the mode now in use."""
        if mode not in ("auto", "compiled", "eager"):
            raise ValueError(f"quantizer kernels must be auto, compiled or eager, not {mode!r}")
        if mode == "auto":
            mode = "compiled" if compile_available() else "eager"
        self._eager()
        if mode == "compiled":
            self.mode = "compiled"
            self.grid = self._compiled(_grid_out_of_place, _grid)
            self.grads = self._compiled(_ste_grads, _ste_grads)
            self.range_grads = self._compiled(_range_grads, _range_grads)
        return self.mode

    def _compiled(self, source, eager):
        # dynamic shapes from the start: one kernel per tensor rank serves every layer, so a layer gets the same
        # kernel (and the same sums) whichever shape happened to be compiled first
        # the wrapper is cached too: a compiled block (--compile_block) guards on the functions it calls, so
        # switching the kernels away and back must hand it the same function, not a new one that recompiles it
        if source in _COMPILED:
            return _COMPILED[source]
        compiled = torch.compile(source, dynamic=True)

        def call(*args):
            try:
                return compiled(*args)
            except Exception as err:   # noqa: BLE001 - whatever stops the build, the eager kernel computes the same
                import logging
                logging.getLogger(__name__).warning(
                    "compiled quantizer kernels unavailable (%s: %s); using eager ones (--quant_kernels eager "
                    "skips the attempt)", type(err).__name__, (str(err).splitlines() or [""])[0])
                self._eager()
                return eager(*args)
        _COMPILED[source] = call
        return call


def compile_available() -> bool:
    """Whether torch.compile can build kernels here: a C++ compiler for CPU tensors (and Triton where CUDA is)."""
    import shutil
    if torch.cuda.is_available():
        try:
            from torch.utils._triton import has_triton
        except ImportError:
            return False
        if not has_triton():
            return False
    return any(shutil.which(cc) for cc in ("g++", "c++", "clang++"))


KERNELS = _Kernels()


def fake_quant(x, scale, zero, qmax: int):
    """x on the grid of `scale` and `zero` (straight-through rounding); one autograd node (_FakeQuant)."""
    if torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad):
        return _FakeQuant.apply(x, scale, zero, qmax)
    return KERNELS.grid(x, scale, zero, qmax)


FP16_SIGNIFICANT_BITS = 11


def fp16_scale(scale: torch.Tensor, significant_bits: int = FP16_SIGNIFICANT_BITS) -> torch.Tensor:
    """A scale as every deployment format stores it: a float16 value (kept in float32), its significand rounded
    to `significant_bits` bits (11: float16's own). GGUF's Q4_1 and Q5_1 store the block minimum -scale·zero as a
    float16 too; with 7 (Q4_1) or 6 (Q5_1) bits, scale times a zero point of 4 or 5 bits has at most 11, so the
    minimum is exact and the file holds our grid bit for bit."""
    scale = scale.half().float()
    if significant_bits < FP16_SIGNIFICANT_BITS:
        mantissa, exponent = torch.frexp(scale)              # mantissa in [0.5, 1)
        step = 2.0 ** significant_bits
        scale = torch.ldexp(torch.round(mantissa * step) / step, exponent).half().float()
    return scale


FP16_MIN_SUBNORMAL = 2.0 ** -24


def superblock_scale(scale: torch.Tensor, groups: int, sub_max: int,
                     significant_bits: int = FP16_SIGNIFICANT_BITS) -> torch.Tensor:
    """Scales (out, n_groups) as GGUF's K-quants store them, quantized again: each run of `groups` groups of a
    row (a super-block, 256 weights) shares one float16 step d, the largest scale over `sub_max`, and each group's
    scale becomes d·k with k an integer in [1, sub_max] (Q6_K's int8 scales: 127; Q3_K's 6-bit: 31). d·k is
    exact in float32 (11 + 7 significant bits), and so is d·k times a code, as llama.cpp dequantizes."""
    d, k = superblock_steps(scale, groups, sub_max, significant_bits)
    return (d[..., None] * k).reshape(scale.shape)


def superblock_steps(scale: torch.Tensor, groups: int, sub_max: int,
                     significant_bits: int = FP16_SIGNIFICANT_BITS) -> tuple[torch.Tensor, torch.Tensor]:
    """superblock_scale's parts: the steps d (out, n_super) and the integers k (out, n_super, groups).
    d may be a float16 subnormal (a model of small weights: Qwen's down_proj has scales near 4e-4, so Q6_K's d is
    near 3e-6), as llama.cpp stores it; clamping it to the smallest normal would leave the largest group k = 6 of
    127. A subnormal has fewer significant bits, so d is taken one float16 step up where rounding to nearest
    would push the largest scale past sub_max + 1/2: the largest group keeps its scale within d/2."""
    out, n = scale.shape
    runs = scale.reshape(out, n // groups, groups)
    top = runs.amax(-1)
    d = fp16_scale((top / sub_max).clamp(min=FP16_MIN_SUBNORMAL), significant_bits)
    up = fp16_scale((d.half().view(torch.int16) + 1).view(torch.float16).float(), significant_bits)
    d = torch.where(top > d * (sub_max + 0.5), up, d)
    return d, (runs / d[..., None]).round().clamp(1, sub_max)


# the grid arguments that say how scales are stored: stored_scale's keyword arguments
SCALE_FORMAT_KEYS = ("scale_bits", "super_groups", "sub_max")


def stored_scale(scale: torch.Tensor, scale_bits: int = FP16_SIGNIFICANT_BITS, super_groups: int = 0,
                 sub_max: int = 0) -> torch.Tensor:
    """Scales (out, n_groups) as a deployment format stores them: float16 values of `scale_bits` significant bits
    (fp16_scale), or, with `super_groups`, a K-quant's super-block steps times small integers (superblock_scale)."""
    if super_groups:
        return superblock_scale(scale, super_groups, sub_max, scale_bits)
    return fp16_scale(scale, scale_bits)


def group_view(weight: torch.Tensor, group_size: int | None) -> tuple[torch.Tensor, int]:
    """(out, in) -> (out, n_groups, group_size). Column i belongs to group i // group_size (GPTQ).

    When group_size does not divide in_features the last group is shorter; it is padded with
    copies of its own last column, which changes neither its min nor its max.
    Returns the view and the number of padding columns.
    """
    out_f, in_f = weight.shape
    gs = in_f if not group_size else group_size
    n_groups = math.ceil(in_f / gs)
    pad = n_groups * gs - in_f
    if pad:
        weight = torch.nn.functional.pad(weight[None], (0, pad), mode="replicate")[0]
    return weight.reshape(out_f, n_groups, gs), pad


class WeightQuantizer(nn.Module):
    """Per-output-channel or per-group weight quantizer. Each (row, group) range [min, max] can be
    narrowed by a fixed clipping ratio (`clip_ratio`, from the clipping search) and by LWC's learned
    factors sigmoid(upbound_factor), sigmoid(lowbound_factor); both multiply the range when present.
    `balanced`: ABQ-LLM's bit balance, one level more than 2^bits (2-bit: codes 0..4, about 2.32 bits),
    stored in the next wider container (`storage_bits`)."""

    def __init__(self, shape: tuple[int, int], bits: int, group_size: int | None = None,
                 symmetric: bool = False, lwc: bool = False, reference: bool = False, balanced: bool = False,
                 scale_bits: int = FP16_SIGNIFICANT_BITS, super_groups: int = 0, sub_max: int = 0):
        super().__init__()
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        self.scale_bits = scale_bits        # significant bits of each stored scale (fp16_scale)
        # K-quants: scales quantized again per `super_groups` groups, on integers up to `sub_max` (superblock_scale)
        self.super_groups, self.sub_max = super_groups, sub_max
        self.balanced = balanced
        self.qmax = 2**bits - (0 if balanced else 1)
        self.storage_bits = math.ceil(math.log2(self.qmax + 1))
        self.reference = reference          # the reference code's range convention (minmax_scale_zero)
        self.shape = tuple(shape)
        if super_groups and self.n_groups % super_groups:
            raise ValueError(f"rows of {shape[1]} are {self.n_groups} groups of {group_size}: no whole number of "
                             f"super-blocks of {super_groups} groups")
        self.upbound_factor = self.lowbound_factor = None
        self.clip_ratio: torch.Tensor | None = None       # (out, n_groups, 1), set by the clipping search
        if lwc:
            self.enable_lwc()

    @property
    def n_groups(self) -> int:
        return math.ceil(self.shape[1] / self.group_size) if self.group_size else 1

    def enable_lwc(self, device=None) -> None:
        init = torch.full((self.shape[0], self.n_groups, 1), LWC_INIT, device=device)
        self.upbound_factor = nn.Parameter(init.clone())
        self.lowbound_factor = nn.Parameter(init.clone())

    def _range(self, xmin: torch.Tensor, xmax: torch.Tensor, groups=slice(None)):
        if self.clip_ratio is not None:
            ratio = self.clip_ratio[:, groups]
            xmax, xmin = ratio * xmax, ratio * xmin
        if self.upbound_factor is not None:
            xmax = torch.sigmoid(self.upbound_factor[:, groups]) * xmax
            xmin = torch.sigmoid(self.lowbound_factor[:, groups]) * xmin
        return minmax_scale_zero(xmin, xmax, self.bits, self.symmetric, self.reference, self.qmax)

    def scale_zero(self, weight: torch.Tensor):
        """Scale and zero of each (row, group): tensors of shape (out, n_groups, 1)."""
        return self._grouped_scale_zero(group_view(weight, self.group_size)[0])

    def _grouped_scale_zero(self, w: torch.Tensor):
        """scale_zero of a weight already in group_view's (out, n_groups, group_size) layout."""
        return self._range(*last_dim_range(w))

    def group_scale_zero(self, columns: torch.Tensor, group: int):
        """Scale and zero (out,) of group `group` from its current columns (out, <= group_size):
        the grid GPTQ rounds onto, with the same clipping as the fake quantizer."""
        scale, zero = self._range(columns.amin(-1, keepdim=True)[:, None], columns.amax(-1, keepdim=True)[:, None],
                                  slice(group, group + 1))
        return scale[:, 0, 0], zero[:, 0, 0]

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.bits >= 16:
            return weight
        w, pad = group_view(weight, self.group_size)     # once: a ragged last group makes it a copy
        scale, zero = self._grouped_scale_zero(w)
        w_hat = fake_quant(w, scale, zero, self.qmax).reshape(weight.shape[0], -1)
        return w_hat[:, : weight.shape[1]] if pad else w_hat

    @property
    def scale_format(self) -> dict:
        """How the scales are stored (stored_scale's arguments): for a quantizer of the same grid, E2E's."""
        return {key: getattr(self, key) for key in SCALE_FORMAT_KEYS}

    def stored_scale(self, scale: torch.Tensor) -> torch.Tensor:
        """`scale` (out, n_groups) as the export stores it, and as every rounder commits it."""
        return stored_scale(scale, **self.scale_format)

    @torch.no_grad()
    def rounded_to_nearest(self, weight: torch.Tensor):
        """What round to nearest commits: codes, the stored scales (stored_scale) and zero points. On a K-quant's
        grid the codes are rounded on the stored scales, which move by up to 1/62; on float16 scales on the
        calibrated ones (a code differs only within 2^-11 of a tie)."""
        codes, scale, zero = self.integer_codes(weight, stored=bool(self.super_groups))
        return codes, (scale if self.super_groups else self.stored_scale(scale)), zero

    @torch.no_grad()
    def integer_codes(self, weight: torch.Tensor, stored: bool = False):
        """The integer codes (out, in), and scale/zero (out, n_groups), of the calibrated quantizer; `stored`: on
        the scales as stored (stored_scale), so that the codes are the nearest ones on the grid the file holds
        (a K-quant's scales move by up to half a step of its sub-scales, 1/62 for Q3_K)."""
        w, _ = group_view(weight, self.group_size)
        scale, zero = self._grouped_scale_zero(w)
        if stored:
            scale = self.stored_scale(scale[..., 0])[..., None]
        q = grid_codes(w, scale, zero, self.qmax)
        return q.reshape(weight.shape[0], -1)[:, : weight.shape[1]].to(torch.int32), scale[..., 0], zero[..., 0]


class ActQuantizer(nn.Module):
    """Dynamic per-token quantizer: a min-max grid over the last dimension of every token.
    With LAC (FlatQuant's learnable activation clipping, `enable_lac`) the token's max and min are scaled by
    sigmoid(clip_upper) and sigmoid(clip_lower): one pair of scalars per quantizer (per layer, not per channel),
    starting at sigmoid(4) = 0.982."""

    def __init__(self, bits: int, symmetric: bool = False, reference: bool = False):
        super().__init__()
        self.bits, self.symmetric, self.reference = bits, symmetric, reference
        self.clip_upper = self.clip_lower = None

    def enable_lac(self, device=None) -> None:
        self.clip_upper = nn.Parameter(torch.full((), LWC_INIT, device=device))
        self.clip_lower = nn.Parameter(torch.full((), LWC_INIT, device=device))

    @property
    def lac(self) -> bool:
        return self.clip_upper is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bits >= 16:
            return x
        xmin, xmax = last_dim_range(x)
        if self.clip_upper is not None:
            xmax = torch.sigmoid(self.clip_upper).to(x.dtype) * xmax
            xmin = torch.sigmoid(self.clip_lower).to(x.dtype) * xmin
        scale, zero = minmax_scale_zero(xmin, xmax, self.bits, self.symmetric, self.reference)
        return fake_quant(x, scale, zero, 2**self.bits - 1)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, symmetric={self.symmetric}, per-token dynamic" + (", LAC" if self.lac else "")
