"""Real low-bit weights in the GPTQ layout, and the linear layer that runs them.

For an nn.Linear of shape (out, in), quantized per group of `group_size` input columns:
    qweight  int32 (ceil(in·bits/32), out)   codes packed along the input dim, LSB first
    qzeros   int32 (n_groups, ceil(out·bits/32))  zero points packed along the output dim;
             checkpoint_format "gptq" (v1) stores zero − 1, "gptq_v2" stores zero
    scales   fp16  (n_groups, out)
    g_idx    int32 (in,)  the group of each input column: i // group_size (a shorter last group
             where group_size does not divide in)
The bit stream is contiguous, so 3-bit codes straddle 32-bit words exactly as GPTQ packs them.
The fake-quantized model's weights (`dequantize`) and the packed layer's (`PackedLinear.weight`) are the
same float32 operations, (q − zero) · scale, so the two agree bit for bit.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack non-negative integer codes (n, m) < 2^bits along dim 0 into int32 (ceil(n·bits/32), m)."""
    n, m = codes.shape
    words = math.ceil(n * bits / 32)
    c = codes.to(torch.int64)
    offset = torch.arange(n, dtype=torch.int64) * bits
    word, shift = offset // 32, offset % 32
    out = torch.zeros(words + 1, m, dtype=torch.int64)
    out.index_add_(0, word, c << shift[:, None])               # disjoint bits: adding is OR-ing
    spill = (shift + bits) > 32                                 # codes that straddle two words
    if spill.any():
        out.index_add_(0, word[spill] + 1, c[spill] >> (32 - shift[spill])[:, None])
    out = out[:words] & 0xFFFFFFFF
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of pack_bits: int32 (words, m) -> int32 codes (n, m)."""
    if 32 % bits == 0:
        # 2/4/8 bits: whole codes per word; a broadcast shift and mask (int32 arithmetic shift, the mask
        # drops the sign bits) unpacks without gathers or int64 temporaries.
        shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)
        codes = (packed[:, None, :] >> shifts[None, :, None]) & (2**bits - 1)
        return codes.reshape(-1, packed.shape[1])[:n]
    # 3/5/6/7 bits: the stream repeats every lcm(bits, 32) bits, `period` words holding `per_period` codes at the
    # same offsets, so each code position of a period is one strided slice of int32 words (two for a code that
    # straddles a word boundary): int32 shifts and masks over (periods, m) planes, no gathers, no int64.
    period = bits // math.gcd(bits, 32)
    per_period = 32 * period // bits
    groups = math.ceil(packed.shape[0] / period)
    if groups * period > packed.shape[0]:
        packed = torch.cat([packed, packed.new_zeros(groups * period - packed.shape[0], packed.shape[1])])
    words = packed.reshape(groups, period, packed.shape[1])
    mask = 2**bits - 1
    planes = []
    for j in range(per_period):
        word, shift = divmod(j * bits, 32)
        low = (words[:, word] >> shift) & ((1 << min(bits, 32 - shift)) - 1)   # & drops the sign extension
        if shift + bits > 32:
            low = low | ((words[:, word + 1] & (mask >> (32 - shift))) << (32 - shift))
        planes.append(low)
    return torch.stack(planes, dim=1).reshape(-1, packed.shape[1])[:n]


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int | None,
               dtype: torch.dtype) -> torch.Tensor:
    """W = (q − zero[g]) · scale[g] for codes (out, in), scale/zero (out, n_groups)."""
    in_f = codes.shape[1]
    g = torch.arange(in_f, device=codes.device) // (group_size or in_f)
    return ((codes.float() - zero.float()[:, g]) * scale.float()[:, g]).to(dtype).contiguous()


def _row_tiles(out_features: int, in_features: int) -> list[slice]:
    """Tiles of output rows whose unpacked codes take about 1 MiB (int32), at most 64 tiles (3-bit unpacking makes
    ~100 small operations per tile)."""
    rows = max(2**18 // in_features, math.ceil(out_features / 64), 1)
    return [slice(r, min(r + rows, out_features)) for r in range(0, out_features, rows)]


_SCRATCH: dict = {}   # (device, dtype) -> the buffer that the exact kernel dequantizes into, sized for the largest layer


def _scratch(shape: tuple[int, int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A reused (out, in) buffer: the layers of a model run one after the other, so one buffer per device and dtype
    serves them all (it holds the largest layer's dense weight, once)."""
    numel = shape[0] * shape[1]
    buf = _SCRATCH.get((device, dtype))
    if buf is None or buf.numel() < numel:
        buf = _SCRATCH[(device, dtype)] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel].view(shape)


INT4_CPU_GROUPS = (32, 64, 128, 256)     # group sizes torch's int4 CPU kernel takes
PACKED_KERNELS = ("exact", "int4_cpu", "int8_cpu", "cpu")
# int8_cpu runs one kernel call per group: at decode sizes it beats the dense layer (2.5x at 4096 -> 4096, one
# token), over a few rows unpacking once and one dense matmul is faster (bench/PACKING.md), so longer inputs
# take the exact path
INT8_CPU_MAX_ROWS = 16
# torch's int4 CPU kernel runs fast on long inputs only with bfloat16 hardware (AVX512-BF16 or AMX). Without it its
# time grows with the rows (0.5 ms per row at 4096 -> 4096, one thread), and beyond ~250-450 rows the exact kernel is
# faster (bench/PACKING.md), so there longer inputs take the exact path
INT4_CPU_MAX_ROWS_WITHOUT_BF16 = 256


def cpu_has_bf16_matmul() -> bool:
    """Whether this CPU has bfloat16 matrix instructions (AVX512-BF16 or AMX tiles)."""
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check() for check in checks if check is not None)


class PackedLinear(nn.Module):
    """A linear layer whose weight is stored packed (GPTQ layout) and unpacked on the fly
    with torch operations, on any device (kernel "exact": bit-exact against the fake-quantized weight).
    Kernel "int4_cpu" (use_kernel) runs 2/3/4-bit layers through torch's int4 CPU matmul instead (their codes
    repacked once into an int4 copy held beside the packed storage, 0.5 byte per weight): activations
    and the per-group scale and offset in bfloat16, so not bit-exact (tests/test_packing.py states the
    tolerance), and several times faster than the dense float32 layer at decode; inputs of more than
    INT4_CPU_MAX_ROWS_WITHOUT_BF16 rows take the exact path on CPUs without bfloat16 matrix instructions. Kernel "int8_cpu" does the
    same for 8-bit layers with torch's int8 CPU matmul (one call per group, zero points as a correction term) on
    inputs of up to INT8_CPU_MAX_ROWS rows (decode), exact beyond; "cpu" picks whichever of the two the layer
    can run."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int | None, bias: bool,
                 zero_offset: int = 1, dtype=torch.float16):
        super().__init__()
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.group_size = group_size
        self.zero_offset = zero_offset          # 1 for GPTQ v1 ("zero − 1"), 0 for v2
        n_groups = math.ceil(in_features / group_size) if group_size else 1
        self.register_buffer("qweight", torch.zeros(math.ceil(in_features * bits / 32), out_features, dtype=torch.int32))
        self.register_buffer("qzeros", torch.zeros(n_groups, math.ceil(out_features * bits / 32), dtype=torch.int32))
        self.register_buffer("scales", torch.zeros(n_groups, out_features, dtype=torch.float16))
        self.register_buffer("g_idx", torch.arange(in_features, dtype=torch.int32) // (group_size or in_features))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype) if bias else None)
        self.weight_dtype = dtype
        self.kernel = "exact"
        self._int4 = None           # (packed weight, scales and offsets) for int4_cpu, built on first use

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                   group_size: int | None, bias: torch.Tensor | None, zero_offset: int = 1) -> "PackedLinear":
        out_f, in_f = codes.shape
        dtype = bias.dtype if bias is not None else torch.float16
        layer = cls(in_f, out_f, bits, group_size, bias is not None, zero_offset, dtype)
        layer.qweight.copy_(pack_bits(codes.T.contiguous(), bits))
        layer._encode_zeros(zero.to(torch.int32), zero_offset)
        layer.scales.copy_(scale.T.to(torch.float16))
        if bias is not None:
            layer.bias.copy_(bias)
        return layer.to(codes.device)

    def _apply(self, fn, recurse=True):
        # model.to(dtype) must not change the storage format: scales stay fp16 (as in GPTQ files)
        super()._apply(fn, recurse)
        self.scales = self.scales.to(torch.float16)
        return self

    @torch.no_grad()
    def set_zero_offset(self, zero_offset: int) -> None:
        """Re-encode the stored zero points for GPTQ v1 (zero − 1, offset 1) or v2 (offset 0)."""
        if zero_offset != self.zero_offset:
            self._encode_zeros(self.zeros(), zero_offset)

    def _encode_zeros(self, zeros: torch.Tensor, zero_offset: int) -> None:
        """zeros (out, n_groups) -> qzeros, packed along the output dim."""
        if zero_offset == 1 and int(zeros.min()) < 1:
            raise ValueError("a zero point of 0 cannot be stored in GPTQ v1 ('zero − 1'); use checkpoint "
                             "format gptq_v2 (zero_offset=0)")
        stored = (zeros.to(torch.int64) - zero_offset) & (2**self.bits - 1)
        self.qzeros.copy_(pack_bits(stored.contiguous(), self.bits).T.contiguous())
        self.zero_offset = zero_offset

    def codes(self) -> torch.Tensor:
        return unpack_bits(self.qweight, self.bits, self.in_features).T

    def zeros(self) -> torch.Tensor:
        stored = unpack_bits(self.qzeros.T.contiguous(), self.bits, self.out_features)   # (out, n_groups)
        return (stored.to(torch.int64) + self.zero_offset).to(torch.int32)

    def weight(self, dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """The dense (out, in) weight, equal bit for bit to `dequantize` of the same codes, written into `out`
        (a contiguous (out, in) tensor of `dtype`) when given. Made a tile of output rows at a time: each tile's
        packed words are unpacked, offset and scaled while they sit in cache, and written straight into the
        dense layout (no full-size integer temporaries, no transpose of the whole weight)."""
        dtype = dtype or self.weight_dtype
        if out is None:
            out = torch.empty(self.out_features, self.in_features, dtype=dtype, device=self.qweight.device)
        zeros = self.zeros().float()                                               # (out, groups)
        scales = self.scales.T.float()
        gs = self.group_size or self.in_features
        full, groups = self.in_features // gs * gs, self.in_features // gs
        for rows in _row_tiles(self.out_features, self.in_features):
            codes = unpack_bits(self.qweight[:, rows], self.bits, self.in_features).T   # (tile, in), strided
            z, s = zeros[rows], scales[rows]
            # (q − zero) · scale in float32, then the cast: the same operations as `dequantize`
            parts = [(codes[:, :full].unflatten(1, (groups, gs)), z[:, :groups, None], s[:, :groups, None],
                      out[rows, :full].unflatten(1, (groups, gs)))]
            if full < self.in_features:                                                # shorter last group
                parts.append((codes[:, full:], z[:, groups:], s[:, groups:], out[rows, full:]))
            for q, zero, scale, dst in parts:
                if dtype == torch.float32:
                    torch.sub(q, zero, out=dst).mul_(scale)
                else:
                    dst.copy_((q - zero).mul_(scale))
        return out

    @property
    def int4_cpu_supported(self) -> bool:
        gs = self.group_size or self.in_features
        # 2- and 3-bit codes (and bit balance's five levels) are int4 codes too: the kernel runs them alike
        # a shorter last group (576 = 4.5 x 128) runs too: the kernel gets whole groups, the missing columns padded
        # (their activations are zero, so they add nothing)
        return self.bits <= 4 and gs in INT4_CPU_GROUPS and hasattr(torch, "_weight_int4pack_mm_for_cpu")

    @property
    def _int4_padding(self) -> int:
        gs = self.group_size or self.in_features
        return -self.in_features % gs

    @property
    def int8_cpu_supported(self) -> bool:
        return self.bits == 8 and hasattr(torch, "_weight_int8pack_mm")

    def use_kernel(self, kernel: str) -> bool:
        """Switch to a kernel of PACKED_KERNELS; returns False (and stays exact) where it cannot run this layer.
        "cpu" picks int4_cpu for 2/3/4-bit layers and int8_cpu for 8-bit ones."""
        if kernel not in PACKED_KERNELS:
            raise ValueError(f"unknown packed kernel {kernel!r}: use one of {', '.join(PACKED_KERNELS)}")
        if kernel == "cpu":
            kernel = "int4_cpu" if self.int4_cpu_supported else "int8_cpu"
        if (kernel == "int4_cpu" and not self.int4_cpu_supported) or (kernel == "int8_cpu"
                                                                     and not self.int8_cpu_supported):
            self.kernel, self._int4 = "exact", None
            return False
        self.kernel, self._int4 = kernel, None
        return True

    def _int8_tensors(self):
        # torch's int8 CPU kernel computes x @ (w8 * scale)^T with one scale per output channel and no zero point:
        # per group, w = (q - zero) * scale = (q - 128) * scale + (128 - zero) * scale, the second term being a
        # per-channel constant times the sum of the group's activations
        codes, scales, zeros = self.codes(), self.scales.float().cpu(), self.zeros().float().cpu().T
        gs = self.group_size or self.in_features
        signed = (codes - 128).to(torch.int8).cpu()
        groups = [signed[:, g * gs:(g + 1) * gs].contiguous() for g in range(scales.shape[0])]
        return groups, scales.to(torch.bfloat16), (128 - zeros) * scales

    @torch.no_grad()
    def _int4_tensors(self):
        # the kernel computes (q' - 8) * scale + offset. Codes of fewer bits are moved to the middle of the int4
        # range (q' = q + 8 - 2^(bits-1)), so that the offset (2^(bits-1) - zero) * scale stays small: a bfloat16
        # offset near 8 * scale would cancel against (q' - 8) * scale and lose the low bits' precision
        shift = 8 - 2 ** (self.bits - 1)
        codes = F.pad(self.codes() + shift, (0, self._int4_padding), value=8)       # padding: code 8, weight ~0
        packed = torch._convert_weight_to_int4pack_for_cpu(codes.contiguous().cpu(), 2)
        scales = self.scales.float().cpu()                                   # (groups, out)
        offsets = (2 ** (self.bits - 1) - self.zeros().float().cpu().T) * scales
        return packed, torch.stack([scales, offsets], -1).to(torch.bfloat16).contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == "int8_cpu" and x.device.type == "cpu" and x.numel() // self.in_features <= INT8_CPU_MAX_ROWS:
            if self._int4 is None:
                self._int4 = self._int8_tensors()
            groups, scales, offsets = self._int4
            rows = x.reshape(-1, self.in_features).to(torch.bfloat16)
            gs = self.group_size or self.in_features
            y = 0
            for g, codes in enumerate(groups):
                part = rows[:, g * gs:(g + 1) * gs]
                y = y + torch._weight_int8pack_mm(part, codes, scales[g]).float() + part.float().sum(-1, keepdim=True) \
                    * offsets[g]
            y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
            return y if self.bias is None else y + self.bias.to(x.dtype)
        if self.kernel == "int4_cpu" and x.device.type == "cpu" and (
                x.numel() // self.in_features <= INT4_CPU_MAX_ROWS_WITHOUT_BF16 or cpu_has_bf16_matmul()):
            if self._int4 is None:
                self._int4 = self._int4_tensors()
            packed, scales_offsets = self._int4
            rows = F.pad(x.reshape(-1, self.in_features).to(torch.bfloat16), (0, self._int4_padding))
            y = torch._weight_int4pack_mm_for_cpu(rows, packed, self.group_size or self.in_features, scales_offsets)
            y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
            return y if self.bias is None else y + self.bias.to(x.dtype)
        # the exact kernel: dequantize, then the dense product. Outside autograd the weight goes to a buffer kept
        # for reuse: a fresh weight-sized allocation costs as much as the dequantization (its pages are faulted in)
        keep = torch.is_grad_enabled() and x.requires_grad
        out = None if keep else _scratch((self.out_features, self.in_features), x.dtype, self.qweight.device)
        return F.linear(x, self.weight(x.dtype, out), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, bias={self.bias is not None}")


def use_packed_kernel(model: nn.Module, kernel: str) -> tuple[int, int]:
    """Set every PackedLinear of `model` to `kernel`; returns (layers switched, packed layers)."""
    layers = [m for m in model.modules() if isinstance(m, PackedLinear)]
    return sum(m.use_kernel(kernel) for m in layers), len(layers)
