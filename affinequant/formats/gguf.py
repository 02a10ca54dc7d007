"""GGUF files for llama.cpp (and ollama, LM Studio on top of it).

The legacy symmetric types Q4_0, Q5_0 and Q8_0 store w = d · q per block of 32 weights, with d in fp16 and q a
signed (bits)-bit integer: exactly our symmetric grid at --group_size 32 (zero point 2^(bits-1), fp16 scales).
Q4_1 and Q5_1 store w = d · q + m with q unsigned and d, m in fp16: our asymmetric grid s · (q - z) at group 32,
with m the block's smallest weight, once s has at most 7 (Q4_1) or 6 (Q5_1) significant bits so that every
s · (code - z) is an fp16 value too (QuantConfig.scale_bits, set from the type; quantizer.fp16_scale).
So the decoder blocks are not quantized again here: each block's scale is recovered from the calibrated weights
(`_exact_blocks`: the finest fp16 d on which every weight is an integer in range), its codes written, and the
file checked against the `gguf` package's reference dequantization, which must give our weights bit for bit.
A block that lies on no such grid (a model quantized at another setting) is quantized by that reference code
instead and counted in the report. The token embedding and the output head, which calibration leaves in full
precision, are quantized by the reference code in the types llama.cpp gives them (`_outer_type`): the head (or a
tied embedding) in Q8_0, an untied embedding in the file's type; norms in F32. F16 and F32 write every weight as is.
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


GGUF_TYPES = {t.name: t for t in (
    GGUFType("F32", None, None, 0), GGUFType("F16", None, None, 1),
    GGUFType("Q4_0", 4, 32, 2), GGUFType("Q4_1", 4, 32, 3, symmetric=False, scale_bits=7),
    GGUFType("Q8_0", 8, 32, 7), GGUFType("Q5_0", 5, 32, 8), GGUFType("Q5_1", 5, 32, 9, symmetric=False, scale_bits=6))}


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


def check_gguf_target(path: str, type_name: str, cfg, source: str | None, overwrite: bool = False,
                      stream: bool = False) -> GGUFType:
    """Refuse, before calibration, what cannot be written: a type the run's grid is not, a model with runtime
    modules, a model not loaded from a GGUF file (its tokenizer metadata is copied from there), a target that
    holds something else."""
    gtype = gguf_type(type_name)
    if cfg.target_bpw is not None:
        widths = sorted(set(cfg.mixed_bits))
        if not set(widths) <= set(TYPE_OF_BITS) or cfg.group_size != 32 or not cfg.symmetric or cfg.bit_balance \
                or gtype.bits is None:
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
    if not exact:
        return gguf.quants.quantize(w.astype(np.float32), qtype), 0
    d, m, q, off = _exact_blocks(w, GGUF_TYPES[type_name])
    data = _pack(d, m, q, GGUF_TYPES[type_name])
    if off.any():
        data[off] = gguf.quants.quantize(w.reshape(-1, 32)[off].astype(np.float32), qtype)
    return data.reshape(rows, -1), int(off.sum())


def _outer_type(name: str, tied: bool, gtype: GGUFType) -> str:
    """The type of a matrix outside the decoder blocks, as llama.cpp's quantizer picks it (llama_tensor_get_type):
    the output head (or the token embedding when it is tied to the head) gets more bits, Q6_K where its rows
    allow and Q8_0 otherwise, here Q8_0 always, as this module writes no K-quants; an untied token embedding, a
    table of rows looked up, gets the file's own type. Calibration leaves both in full precision, so they are
    quantized by the gguf package's reference code, as llama.cpp would."""
    if name == "output.weight" or (tied and name == "token_embd.weight"):
        return "Q8_0"
    return gtype.name


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
                kind = TYPE_OF_BITS[layer_bits[module]] if layer_bits and module in layer_bits else gtype.name
            else:
                kind = _outer_type(name, tied, gtype)
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
    log.info("saved %s as GGUF %s: %s; %.3f bits per weight%s", target, gtype.name,
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
