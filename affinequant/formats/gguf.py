"""GGUF files for llama.cpp (and ollama, LM Studio on top of it).

The legacy symmetric types Q4_0, Q5_0 and Q8_0 store w = d · q per block of 32 weights, with d in fp16 and q a
signed (bits)-bit integer: exactly our symmetric grid at --group_size 32 (zero point 2^(bits-1), fp16 scales).
Q4_1 and Q5_1 store w = d · q + m with q unsigned and d, m in fp16: our asymmetric grid s · (q - z) at group 32,
with m the block's smallest weight, once s has at most 7 (Q4_1) or 6 (Q5_1) significant bits so that every
s · (code - z) is an fp16 value too (QuantConfig.scale_bits, set from the type; quantizer.fp16_scale).
So the decoder blocks are not quantized again here: each block's scale is recovered from the calibrated weights
(`_exact_blocks`: the finest fp16 d on which every weight is an integer in range), its codes written, and the
file checked against the `gguf` package's reference dequantization, which must give our weights bit for bit.
The K-quants Q3_K and Q6_K store w = d · k · q per super-block of 256 weights: d in fp16, one small integer k
per group of 16 (6 bits for Q3_K, 8 for Q6_K), q signed: our symmetric grid at --group_size 16 once each
group's scale is d · k (quantizer.superblock_scale, which every rounder commits through when the run is
calibrated for the type: QuantConfig.layer_grids, from gguf_layer_grids). A linear whose rows are no whole
number of super-blocks is calibrated and written in the type's fallback (Q4_0 for Q3_K, Q8_0 for Q6_K), as
llama.cpp's own quantizer falls back. `_exact_superblocks` recovers d, k and the codes from the weights.
A block that lies on no such grid (a model quantized at another setting) is quantized by that reference code
(for a K-quant, our grid's nearest codes) instead and counted in the report. The token embedding and the output
head, which calibration leaves in full precision, are rounded to nearest in the types llama.cpp gives them
(`_outer_type`): the head (or a tied embedding) in Q6_K or Q8_0, an untied embedding in the file's type; norms
in F32. F16 and F32 write every weight as is.
Under mixed precision (--target_bpw with --mixed_bits among 4, 5 and 8) each decoder linear is written in the type
of its own width (TYPE_OF_BITS), as llama.cpp's mixed files are: one type per tensor.

The metadata (architecture, tokenizer, chat template) is copied from the GGUF file the model was loaded from;
llama-architecture q/k rows are permuted back to llama.cpp's rotary layout, as its converter does.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError, OutputError
from ..quant.quantizer import FP16_SIGNIFICANT_BITS

log = logging.getLogger("affinequant")


@dataclass(frozen=True)
class GGUFType:
    name: str
    bits: int | None            # None: a float type
    group_size: int | None
    file_type: int              # llama.cpp's LLAMA_FTYPE_* for general.file_type
    symmetric: bool = True      # w = d·q (signed q); False: w = d·q + m (unsigned q, a minimum per block)
    scale_bits: int = FP16_SIGNIFICANT_BITS     # the most significant bits a scale may have to be written exactly
    # K-quants: super-blocks of `super_groups` groups whose scales are d·k, k an integer in [1, sub_max]; a row
    # that is no whole number of super-blocks is written in `fallback` instead, as llama.cpp's quantizer does
    super_groups: int = 0
    sub_max: int = 0
    fallback: str | None = None

    @property
    def block(self) -> int:
        """Weights per block of the file: 32 for the legacy types, 256 (a super-block) for the K-quants."""
        return self.group_size * (self.super_groups or 1)

    def grid(self) -> dict:
        """The grid a linear written in this type is calibrated on (WeightQuantizer's arguments)."""
        return {"bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric,
                "scale_bits": self.scale_bits, "super_groups": self.super_groups, "sub_max": self.sub_max}

    def for_row(self, in_features: int) -> "GGUFType":
        """The type a matrix with rows of `in_features` is written in: this one, or its fallback."""
        return GGUF_TYPES[self.fallback] if self.fallback and in_features % self.block else self


GGUF_TYPES = {t.name: t for t in (
    GGUFType("F32", None, None, 0), GGUFType("F16", None, None, 1),
    GGUFType("Q4_0", 4, 32, 2), GGUFType("Q4_1", 4, 32, 3, symmetric=False, scale_bits=7),
    GGUFType("Q8_0", 8, 32, 7), GGUFType("Q5_0", 5, 32, 8), GGUFType("Q5_1", 5, 32, 9, symmetric=False, scale_bits=6),
    # a file of Q3_K is llama.cpp's "Q3_K - Small" (file type 11); the fallbacks are llama.cpp's (llama-quant.cpp)
    GGUFType("Q3_K", 3, 16, 11, super_groups=16, sub_max=31, fallback="Q4_0"),
    GGUFType("Q6_K", 6, 16, 18, super_groups=16, sub_max=127, fallback="Q8_0"))}


TYPE_OF_BITS = {4: "Q4_0", 5: "Q5_0", 8: "Q8_0"}      # the legacy symmetric type of each width, groups of 32


def gguf_type(name: str) -> GGUFType:
    if name.upper() not in GGUF_TYPES:
        raise ConfigError(f"--gguf_type {name} is not a GGUF type this tool writes: use one of {', '.join(GGUF_TYPES)}")
    return GGUF_TYPES[name.upper()]


def default_gguf_type(wbits: int, abits: int, symmetric: bool) -> str:
    """The type a run's grid is: F16 for a full-precision model, else the legacy type of its bit width and
    symmetry (check_gguf_target refuses a grid that has none)."""
    if wbits >= 16 and abits >= 16:
        return "F16"
    matching = [t.name for t in GGUF_TYPES.values() if t.bits == wbits and t.symmetric == symmetric]
    return matching[0] if matching else "Q4_0"


def scale_bits_of(type_name: str | None) -> int:
    """The significant bits of the scales a run must store to be written exactly as `type_name`."""
    return gguf_type(type_name).scale_bits if type_name else FP16_SIGNIFICANT_BITS


def gguf_layer_grids(type_name: str, in_features: dict[str, int]) -> dict | None:
    """The grid each block linear (name -> row length) is calibrated on for a K-quant file: the type's own where
    its rows are whole super-blocks, else its fallback's (GGUFType.for_row), as the file will hold them; None
    for the legacy types, whose grid is the run's."""
    gtype = gguf_type(type_name)
    if not gtype.super_groups:
        return None
    return {name: gtype.for_row(n).grid() for name, n in in_features.items()}


def check_gguf_target(path: str, type_name: str, cfg, source: str | None, overwrite: bool = False,
                      stream: bool = False) -> GGUFType:
    """Refuse, before calibration, what cannot be written: a type the run's grid is not, a model with runtime
    modules, a model not loaded from a GGUF file (its tokenizer metadata is copied from there), a target that
    holds something else."""
    gtype = gguf_type(type_name)
    if cfg.target_bpw is not None:
        widths = sorted(set(cfg.mixed_bits))
        if not set(widths) <= set(TYPE_OF_BITS) or cfg.group_size != 32 or not cfg.symmetric or cfg.bit_balance \
                or gtype.bits is None or gtype.super_groups:
            raise ConfigError(f"--save_gguf under --target_bpw writes each linear in the legacy type of its width "
                              f"({', '.join(f'{b}: {t}' for b, t in TYPE_OF_BITS.items())}, symmetric, groups of 32): "
                              f"give --mixed_bits among 4,5,8 --group_size 32 --symmetric and a quantized "
                              f"--gguf_type (got --mixed_bits {','.join(map(str, widths))} --group_size "
                              f"{cfg.group_size}{' --symmetric' if cfg.symmetric else ''}, --gguf_type {gtype.name})")
    elif gtype.bits is not None and not cfg.full_precision:
        want = (gtype.bits, gtype.group_size, gtype.symmetric)
        have = (cfg.wbits, cfg.group_size, cfg.symmetric)
        if have != want or cfg.bit_balance:
            kind = "symmetric" if gtype.symmetric else "asymmetric"
            others = [t.name for t in GGUF_TYPES.values() if (t.bits, t.group_size, t.symmetric) == (cfg.wbits, cfg.group_size, cfg.symmetric)]
            raise ConfigError(f"--gguf_type {gtype.name} stores {kind} {gtype.bits}-bit weights in groups of "
                              f"{gtype.group_size}: quantize with --wbits {gtype.bits} --group_size {gtype.group_size}"
                              f"{' --symmetric' if gtype.symmetric else ' (no --symmetric)'} (got --wbits {cfg.wbits} "
                              f"--group_size {cfg.group_size}{' --symmetric' if cfg.symmetric else ''}"
                              f"{' --bit_balance' if cfg.bit_balance else ''}), "
                              f"{f'or pick --gguf_type {others[0]}' if others else 'or pick --gguf_type F32'}")
        if cfg.scale_bits > gtype.scale_bits:
            raise ConfigError(f"--gguf_type {gtype.name} is exact for scales of at most {gtype.scale_bits} significant "
                              f"bits and this run stores {cfg.scale_bits}: build the configuration with scale_bits="
                              f"{gtype.scale_bits} (main.py does so from --gguf_type)")
    if gtype.super_groups and cfg.real_quant:
        raise ConfigError(f"--gguf_type {gtype.name} stores its scales quantized again per super-block, which the "
                          f"GPTQ layout of --real_quant cannot hold: drop --real_quant")
    if cfg.abits < 16 or cfg.q_width < 16 or cfg.kv_width < 16:
        raise ConfigError("--save_gguf writes weight-only models: llama.cpp has no per-token activation quantizers "
                          "(drop --abits/--kv_bits, or use --save_dir)")
    if source is None or not str(source).endswith(".gguf"):
        raise ConfigError("--save_gguf copies the architecture and tokenizer metadata from the GGUF file the model "
                          "was loaded from: pass --model FILE.gguf (a Hugging Face model is not supported yet)")
    if stream:
        raise ConfigError("--save_gguf with --stream is not supported yet: drop --stream")
    target = Path(path)
    if target.is_dir():
        raise OutputError(f"--save_gguf {path} is a directory: give a file name ending in .gguf")
    if target.exists() and not overwrite and not _is_gguf(target):
        raise OutputError(f"--save_gguf {path} exists and is not a GGUF file: give a new file name, or --overwrite")
    return gtype


def _is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def _llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotate-half row order -> llama.cpp's interleaved one (convert_hf_to_gguf's permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _is_fp16(x: np.ndarray) -> np.ndarray:
    return x == x.astype(np.float16).astype(np.float32)


def _exact_blocks(w: np.ndarray, gtype: GGUFType):
    """For rows of `w` cut into blocks of 32, the finest grid of the type that holds each block exactly: the fp16
    step d (n_blocks,), the fp16 minimum m (n_blocks,; 0 for a symmetric type) and the codes (n_blocks, 32), with
    d · q + m == w in float32 as the reference dequantizes, q signed in [-2^(bits-1), 2^(bits-1) - 1] for a
    symmetric type and in [0, 2^bits - 1] for one with a minimum; and which blocks lie on no such grid."""
    blocks = w.reshape(-1, 32).astype(np.float32)
    if gtype.symmetric:
        low, high = -(2 ** (gtype.bits - 1)), 2 ** (gtype.bits - 1) - 1
        m = np.zeros(len(blocks), np.float32)
        span, spans = np.abs(blocks).max(axis=1), range(-low, 0, -1)
    else:
        low, high = 0, 2 ** gtype.bits - 1
        m = blocks.min(axis=1)
        span, spans = blocks.max(axis=1) - m, range(high, 0, -1)
    d = np.zeros(len(blocks), np.float32)
    found = (span == 0) & _is_fp16(m)
    shifted = blocks - m[:, None]
    for k in spans:                     # the largest code span first: the finest grid
        cand = (span / np.float32(k)).astype(np.float32)
        todo = ~found & _is_fp16(cand) & _is_fp16(m)
        if not todo.any():
            continue
        q = np.round(shifted[todo] / cand[todo, None])
        ok = (q >= low).all(1) & (q <= high).all(1) & ((q * cand[todo, None] + m[todo, None]) == blocks[todo]).all(1)
        idx = np.flatnonzero(todo)[ok]
        d[idx], found[idx] = cand[idx], True
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(d[:, None] > 0, np.round(shifted / np.where(d > 0, d, 1)[:, None]), 0)
    return d, m, q.astype(np.int16), ~found


def _superblock_multiples(gtype: GGUFType) -> list[int]:
    """The integers N = k·c (k in [1, sub_max], c a code magnitude) a super-block's largest weight can be of its
    step d, the likeliest first: k = sub_max is the group with the largest scale (superblock_steps sets d from
    it), which usually holds the largest weight, at the largest code magnitude."""
    seen, order = set(), []
    for k in range(gtype.sub_max, 0, -1):
        for c in range(2 ** (gtype.bits - 1), 0, -1):
            if k * c not in seen:
                seen.add(k * c)
                order.append(k * c)
    return order


def _exact_superblocks(w: np.ndarray, gtype: GGUFType):
    """For rows of `w` cut into super-blocks, the K-quant encoding that holds each exactly: the fp16 step d
    (n,), the group scales k (n, super_groups) in [1, sub_max] and the codes (n, block), with (d·k)·q == w in
    float32 as the reference dequantizes; and which super-blocks have none.
    Every weight of such a super-block is d times an integer n = k·q (exact in float32: d has 11 significant bits,
    n at most 12), so d is the super-block's largest magnitude over some N = k·c (_superblock_multiples), an fp16
    value on which every weight is an integer multiple. Given the multiples n of a group, its k must divide them all and bring them
    into the code range; the largest such k is their gcd (or its largest divisor at most sub_max), which gives
    the smallest codes, so if it does not fit no k does. Any (d, k, q) found is verified to give the weights
    exactly, so a wrong guess cannot pass."""
    G, gs, kmax = gtype.super_groups, gtype.group_size, gtype.sub_max
    low, high = -(2 ** (gtype.bits - 1)), 2 ** (gtype.bits - 1) - 1
    blocks = w.reshape(-1, G, gs).astype(np.float32)
    n_super = len(blocks)
    magnitude = np.abs(blocks)
    top = magnitude.max(axis=(1, 2))
    d = np.zeros(n_super, np.float32)
    k = np.ones((n_super, G), np.int64)
    q = np.zeros((n_super, G, gs), np.int16)
    done = top == 0                                            # an all-zero super-block: d = 0, codes 0
    # the group holding the largest weight, a quick first test of each candidate d before all 256 weights
    first = blocks[np.arange(n_super), magnitude.max(axis=2).argmax(axis=1)]               # (n, gs)
    # the candidates with k near sub_max: d comes from the largest group scale (superblock_steps), within one
    # float16 step, which for a subnormal d is up to 1/32 of it
    likely = 8 * (-low)
    for i, N in enumerate(_superblock_multiples(gtype)):
        todo = np.flatnonzero(~done)
        if not len(todo) or (i == likely and len(todo) > n_super // 2):
            break       # (a tensor off the grid, not a few odd super-blocks: not worth the long search)
        cand = (top[todo] / np.float32(N)).astype(np.float32)
        keep = _is_fp16(cand) & (cand > 0)
        todo, cand = todo[keep], cand[keep]
        keep = ((np.round(first[todo] / cand[:, None]) * cand[:, None]) == first[todo]).all(1)
        todo, cand = todo[keep], cand[keep]
        n = np.round(blocks[todo] / cand[:, None, None])
        keep = ((n * cand[:, None, None]) == blocks[todo]).all((1, 2))
        todo, cand, n = todo[keep], cand[keep], n[keep].astype(np.int32)
        g = np.gcd.reduce(np.abs(n), axis=2)                                        # (m, G)
        kk = np.where(g == 0, 1, g)
        for div in range(2, kmax + 1):              # gcd above sub_max: its largest divisor that is at most it
            big = kk > kmax
            if not big.any():
                break
            kk = np.where(big & (g % div == 0) & (g // div <= kmax), g // div, kk)
        codes = n // kk[:, :, None].astype(np.int32)
        ok = (kk <= kmax).all(1) & (codes >= low).all((1, 2)) & (codes <= high).all((1, 2))
        sel = todo[ok]
        d[sel], k[sel], q[sel], done[sel] = cand[ok], kk[ok], codes[ok].astype(np.int16), True
    steps = (d[:, None] * k.astype(np.float32)).astype(np.float32)[:, :, None]
    exact = done & (q >= low).all((1, 2)) & (q <= high).all((1, 2)) & ((steps * q) == blocks).all((1, 2))
    return d, k.astype(np.int16), q.reshape(n_super, -1), ~exact


def _k_rtn(w: np.ndarray, gtype: GGUFType):
    """Round to nearest on the K-quant's grid, the codes rounded with the stored scales (superblock_steps): what
    a tensor outside calibration (the output head), or a super-block off the grid, is written with. Returns
    (d, k, q) as _exact_superblocks."""
    from ..quant.quantizer import WeightQuantizer, grid_codes, superblock_steps
    rows = torch.from_numpy(w.reshape(-1, gtype.block).astype(np.float32))
    quantizer = WeightQuantizer(tuple(rows.shape), **gtype.grid())
    scale, zero = quantizer.scale_zero(rows)                                   # (n, G, 1)
    d, k = superblock_steps(scale[..., 0], gtype.super_groups, gtype.sub_max)  # (n, 1), (n, 1, G)
    grouped = rows.reshape(len(rows), gtype.super_groups, gtype.group_size)
    q = grid_codes(grouped, (d[..., None] * k).reshape(-1, gtype.super_groups, 1), zero, quantizer.qmax) - zero
    return d[:, 0].numpy(), k[:, 0].numpy().astype(np.int16), q.reshape(len(rows), -1).numpy().astype(np.int16)


def _pack_k(d: np.ndarray, k: np.ndarray, q: np.ndarray, gtype: GGUFType) -> np.ndarray:
    """Super-blocks of (d, group scales k, codes q) in the byte layout of Q3_K or Q6_K (ggml-common.h)."""
    n = len(d)
    dbytes = d.astype(np.float16).view(np.uint8).reshape(n, 2)
    if gtype.name == "Q6_K":
        u = (q + 32).astype(np.uint8).reshape(n, 2, 4, 32)       # (half, quarter, l)
        low, high = u & 0x0F, u >> 4
        ql = np.concatenate([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], axis=2)
        qh = high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)
        return np.concatenate([ql.reshape(n, 128), qh.reshape(n, 64), k.astype(np.int8).view(np.uint8), dbytes], axis=1)
    u = (q + 4).astype(np.uint8).reshape(n, 2, 4, 32)             # Q3_K: (half, shift, l)
    low, hbit = u & 3, u >> 2
    qs = low[:, :, 0] | (low[:, :, 1] << 2) | (low[:, :, 2] << 4) | (low[:, :, 3] << 6)
    hmask = np.zeros((n, 32), np.uint8)
    for half in range(2):
        for j in range(4):
            hmask |= hbit[:, half, j] << (4 * half + j)
    s6 = (k + 32).astype(np.uint8)                                 # 6-bit, -32 .. 31 stored as 0 .. 63
    scales = np.concatenate([(s6[:, 0:4] & 0x0F) | ((s6[:, 8:12] & 0x0F) << 4),
                             (s6[:, 4:8] & 0x0F) | ((s6[:, 12:16] & 0x0F) << 4),
                             (s6[:, 0:4] >> 4) | ((s6[:, 4:8] >> 4) << 2) | ((s6[:, 8:12] >> 4) << 4)
                             | ((s6[:, 12:16] >> 4) << 6)], axis=1)
    return np.concatenate([hmask, qs.reshape(n, 64), scales, dbytes], axis=1)


def _pack(d: np.ndarray, m: np.ndarray, q: np.ndarray, gtype: GGUFType) -> np.ndarray:
    """Blocks of (d, m, codes) in the byte layout of Q4_0, Q4_1, Q5_0, Q5_1 or Q8_0 (ggml-common.h): d, then m for
    the types with a minimum, then for 5 bits the fifth bits, then the low nibbles (element j and j + 16 share a
    byte)."""
    head = [d.astype(np.float16).view(np.uint8).reshape(-1, 2)]
    if not gtype.symmetric:
        head.append(m.astype(np.float16).view(np.uint8).reshape(-1, 2))
    if gtype.bits == 8:
        return np.concatenate(head + [q.astype(np.int8).view(np.uint8)], axis=1)
    u = (q + (2 ** (gtype.bits - 1) if gtype.symmetric else 0)).astype(np.uint8)     # 0 .. 2^bits - 1
    qs = (u[:, :16] & 0x0F) | ((u[:, 16:] & 0x0F) << 4)
    if gtype.bits == 5:
        head.append(np.packbits((u >> 4).astype(np.uint8), axis=1, bitorder="little"))  # a little-endian u32
    return np.concatenate(head + [qs], axis=1)


def _quantized_tensor(w: np.ndarray, type_name: str, exact: bool):
    """(bytes (rows, row_bytes), blocks not on the grid): our codes where the weight lies on the type's grid
    (`exact`), the reference quantizer's for the rest."""
    import gguf
    qtype = gguf.GGMLQuantizationType[type_name]
    rows = w.shape[0]
    gtype = GGUF_TYPES[type_name]
    if gtype.super_groups:          # the gguf package does not quantize K-quants: our grid's nearest codes
        if exact:
            d, k, q, off = _exact_superblocks(w, gtype)
            if off.any():
                d[off], k[off], q[off] = _k_rtn(w.reshape(-1, gtype.block)[off], gtype)
        else:
            (d, k, q), off = _k_rtn(w, gtype), np.zeros(0, bool)
        return _pack_k(d, k, q, gtype).reshape(rows, -1), int(off.sum())
    if not exact:
        return gguf.quants.quantize(w.astype(np.float32), qtype), 0
    d, m, q, off = _exact_blocks(w, GGUF_TYPES[type_name])
    data = _pack(d, m, q, GGUF_TYPES[type_name])
    if off.any():
        data[off] = gguf.quants.quantize(w.reshape(-1, 32)[off].astype(np.float32), qtype)
    return data.reshape(rows, -1), int(off.sum())


def _outer_type(name: str, tied: bool, gtype: GGUFType, in_features: int) -> str:
    """The type of a matrix (rows of `in_features`) outside the decoder blocks, as llama.cpp's quantizer picks it
    (llama_tensor_get_type): the output head (or the token embedding when it is tied to the head) gets more
    bits, Q6_K where its rows are whole super-blocks and Q8_0 otherwise (Q8_0 in a Q8_0 file); an untied token
    embedding, a table of rows looked up, gets the file's own type. Calibration leaves both in full precision,
    so they are rounded to nearest: by the gguf package's reference code, or on our K-quant grid (_k_rtn)."""
    if name == "output.weight" or (tied and name == "token_embd.weight"):
        return "Q8_0" if gtype.name == "Q8_0" else GGUF_TYPES["Q6_K"].for_row(in_features).name
    return gtype.for_row(in_features).name


def _copied_metadata(writer, reader, skip: set[str]) -> None:
    import gguf
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in skip:
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type=sub)


def save_gguf(model, source: str, path: str, type_name: str, layer_bits: dict | None = None) -> dict:
    """Write the (weight-only, fake-quantized) `model` as a GGUF file of `type_name` at `path`, atomically; the
    metadata from the GGUF file `source`. `layer_bits` (module name -> bits, mixed precision): those linears in
    the type of their width instead. Returns the report: each tensor's type, the file's bits per weight, the
    blocks that were requantized, and the largest difference between the file's dequantized decoder weights and
    ours (0 when every block was on the grid)."""
    import gguf
    gtype = gguf_type(type_name)
    reader = gguf.GGUFReader(source)
    arch = reader.fields["general.architecture"].contents()
    arch_enum = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch]
    cfg = model.config
    name_map = gguf.get_tensor_name_map(arch_enum, cfg.num_hidden_layers)
    state = model.state_dict()
    tied = ("lm_head.weight" in state and "model.embed_tokens.weight" in state
            and state["lm_head.weight"].data_ptr() == state["model.embed_tokens.weight"].data_ptr())
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    writer = gguf.GGUFWriter(str(tmp), arch)
    _copied_metadata(writer, reader, {"general.architecture", "general.file_type", "general.quantization_version"})
    if layer_bits:      # llama.cpp names a mixed file by its most common type ("mostly Q4_0")
        widths = list(layer_bits.values())
        writer.add_file_type(GGUF_TYPES[TYPE_OF_BITS[max(set(widths), key=widths.count)]].file_type)
    else:
        writer.add_file_type(gtype.file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    report = {"type": gtype.name, "tensors": {}, "requantized_blocks": 0, "max_abs_diff": 0.0}
    n_weights = n_bits = 0
    for key, tensor in state.items():
        if tied and key == "lm_head.weight":
            continue
        name = name_map.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise OutputError(f"{key}: no GGUF name for this tensor of a {arch} model")
        w = tensor.detach().float().cpu().numpy()
        if arch == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = cfg.num_attention_heads if "attn_q" in name else cfg.num_key_value_heads
            w = _llama_permute(w, heads)
        in_block = name.startswith("blk.")
        if w.ndim == 1 or gtype.bits is None or w.shape[-1] % 32:
            kind = "F16" if gtype.name == "F16" and w.ndim == 2 else "F32"
            data = w.astype(np.float16 if kind == "F16" else np.float32)
            writer.add_tensor(name, data)
            bits = 16 if kind == "F16" else 32
        else:
            module = key.rsplit(".", 1)[0]
            if in_block:
                kind = TYPE_OF_BITS[layer_bits[module]] if layer_bits and module in layer_bits \
                    else gtype.for_row(w.shape[-1]).name
            else:
                kind = _outer_type(name, tied, gtype, w.shape[-1])
            data, off = _quantized_tensor(w, kind, exact=in_block)
            report["requantized_blocks"] += off
            writer.add_tensor(name, data, raw_dtype=gguf.GGMLQuantizationType[kind])
            bits = data.size * 8 / w.size
            if in_block:
                back = gguf.quants.dequantize(data, gguf.GGMLQuantizationType[kind]).reshape(w.shape)
                report["max_abs_diff"] = max(report["max_abs_diff"], float(np.abs(back - w).max()))
        report["tensors"][name] = kind
        n_weights += w.size
        n_bits += bits * w.size
    report["bits_per_weight"] = n_bits / n_weights
    report["tensor_types"] = {k: sum(v == k for v in report["tensors"].values())
                              for k in sorted(set(report["tensors"].values()))}
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        tmp.replace(target)
    finally:
        if tmp.exists():
            tmp.unlink()
    log.info("saved %s as GGUF %s: %s; %.3f bits per weight%s", target,
             f"mixed ({', '.join(sorted({TYPE_OF_BITS[b] for b in layer_bits.values()}))})" if layer_bits else gtype.name,
             ", ".join(f"{n} {k}" for k, n in report["tensor_types"].items()), report["bits_per_weight"],
             f"; {report['requantized_blocks']} blocks were not on the {gtype.name} grid and were requantized"
             if report["requantized_blocks"] else "")
    return report


def dequantized_state(path: str) -> dict[str, torch.Tensor]:
    """Every tensor of a GGUF file, dequantized by the gguf package's reference code (tests, bench)."""
    import gguf
    reader = gguf.GGUFReader(path)
    out = {}
    for t in reader.tensors:
        shape = tuple(int(s) for s in reversed(t.shape.tolist()))
        values = gguf.quants.dequantize(t.data, t.tensor_type)
        out[t.name] = torch.from_numpy(np.array(values, dtype=np.float32).reshape(shape))
    return out


def file_summary(path: str) -> dict:
    """A GGUF file's bits per weight (every tensor's bytes over its elements) and its count of each tensor type."""
    import gguf
    reader = gguf.GGUFReader(path)
    types = [t.tensor_type.name for t in reader.tensors]
    n_bits = sum(int(t.n_bytes) * 8 for t in reader.tensors)
    n_weights = sum(int(t.n_elements) for t in reader.tensors)
    return {"bits_per_weight": n_bits / n_weights, "tensor_types": {k: types.count(k) for k in sorted(set(types))}}
