"""compressed-tensors "pack-quantized": the checkpoint format llm-compressor writes and vLLM prefers for
weight-only integer models, asymmetric ones included (its WNA16 kernels take zero points; GPTQ's do not).

Per quantized linear `L` of shape (out, in), group g (compressed-tensors 0.20's layout, which vLLM reads):
    L.weight_packed      int32 (out, ceil(in·bits/32))  codes as unsigned q, a dense LSB-first bit stream along
                         the input dim (compressed-tensors keeps signed q − 2^(bits−1) and adds 2^(bits−1) to pack)
    L.weight_scale       (out, in/g), the model's dtype
    L.weight_zero_point  int32 (ceil(out·bits/32), in/g)  asymmetric only: unsigned zero points packed along out
    L.weight_shape       int64 [out, in]
    W = (q − zero) · scale; symmetric: zero = 2^(bits−1), not stored.
Our GPTQ layout holds the same bit streams transposed (packing.py: qweight is the codes packed along the input
dim, qzeros with offset 0 the zero points packed along the output dim), so the conversion in both directions
moves tensors and never requantizes: the file's weights are ours exactly.
"""
from __future__ import annotations

import torch

from ..errors import OutputError
from ..quant.packing import pack_bits, unpack_bits

FORMAT = "pack-quantized"
SUFFIXES = (".weight_packed", ".weight_scale", ".weight_zero_point", ".weight_shape")


def check_layers(packed: dict[str, list], in_features: dict[str, int]) -> None:
    """What the format cannot hold: layers of several bit widths or group sizes (one scheme for all), and
    groups that do not divide in_features. (Symmetric zero points are checked as each layer is converted.)"""
    schemes = {(bits, group) for bits, group, _ in packed.values()}
    if len(schemes) > 1:
        raise OutputError(f"--save_format compressed-tensors writes one bit width and group size for all layers, and "
                          f"this model has {sorted(schemes, key=str)}: export it as GPTQ (--save_format gptq)")
    (bits, group), = schemes
    ragged = [n for n in packed if group and in_features[n] % group]
    if ragged:
        raise OutputError(f"--group_size {group} does not divide {ragged[0]}'s in_features {in_features[ragged[0]]}: "
                          f"compressed-tensors (and vLLM) need whole groups; choose a group size that divides it")


def config(packed: dict[str, list], symmetric: bool, ignore: list[str]) -> dict:
    """config.json's quantization_config, as llm-compressor writes it for a weight-only W{bits}A16 model."""
    (bits, group, _), *_ = packed.values()
    weights = {"num_bits": bits, "type": "int", "symmetric": symmetric, "strategy": "group" if group else "channel",
               "group_size": group or None, "dynamic": False, "actorder": None, "observer": "minmax",
               "observer_kwargs": {}, "block_structure": None}
    return {"quant_method": "compressed-tensors", "format": FORMAT, "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                          "output_activations": None, "format": FORMAT}},
            "ignore": ignore, "kv_cache_scheme": None, "sparsity_config": {}, "transform_config": {},
            "global_compression_ratio": None, "version": "0.20.0"}   # no "producer": vLLM reads it as ModelOpt's dict


def to_compressed(state: dict, packed: dict[str, list], symmetric: bool) -> dict:
    """Our packed layers' tensors (qweight, qzeros with offset 0, scales, g_idx) in a state dict -> theirs. The
    caller sets the layers' zero offset to 0 first (_write_export, and _write_weights for streamed blocks)."""
    out = {}
    for key, tensor in state.items():
        name, _, leaf = key.rpartition(".")
        if name not in packed or leaf not in ("qweight", "qzeros", "scales", "g_idx"):
            out[key] = tensor
            continue
        if leaf == "qweight":
            out[f"{name}.weight_packed"] = tensor.T.contiguous()
            out[f"{name}.weight_shape"] = torch.tensor([tensor.shape[1], state[f"{name}.g_idx"].numel()])
        elif leaf == "scales":
            out[f"{name}.weight_scale"] = tensor.T.contiguous()
        elif leaf == "qzeros" and not symmetric:
            out[f"{name}.weight_zero_point"] = tensor.T.contiguous()
        elif leaf == "qzeros":
            bits = packed[name][0]
            zeros = unpack_bits(tensor.T.contiguous(), bits, state[f"{name}.qweight"].shape[1])
            if bool((zeros != 2 ** (bits - 1)).any()):
                raise OutputError(f"{name} has zero points off the symmetric grid's middle {2 ** (bits - 1)} (not "
                                  f"representable as symmetric compressed-tensors): export it without --symmetric")
    return out


def from_compressed(tensors: dict, bits: int, group: int | None) -> dict:
    """Theirs -> our packed layers' tensors, zero points with offset 0 (what load_quantized builds)."""
    out = {k: v for k, v in tensors.items() if not k.endswith(SUFFIXES)}
    for key in tensors:
        if not key.endswith(".weight_packed"):
            continue
        name = key.removesuffix(".weight_packed")
        out_f, in_f = (int(x) for x in tensors[f"{name}.weight_shape"])
        scale = tensors[f"{name}.weight_scale"]
        zeros = tensors.get(f"{name}.weight_zero_point")
        if zeros is None:       # symmetric: the middle of the grid
            zeros = pack_bits(torch.full((out_f, scale.shape[1]), 2 ** (bits - 1), dtype=torch.int32), bits)
        out[f"{name}.qweight"] = tensors[key].T.contiguous()
        out[f"{name}.qzeros"] = zeros.T.contiguous()
        out[f"{name}.scales"] = scale.T.to(torch.float16).contiguous()
        out[f"{name}.g_idx"] = torch.arange(in_f, dtype=torch.int32) // (group or in_f)
    return out
