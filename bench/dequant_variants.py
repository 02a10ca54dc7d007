"""The exact packed kernel's dequantization, against the ways of writing it that were tried instead, in one
process (alternating, best of `--repeats`), each checked bit for bit against the kernel's own weight:

- `exact`: what PackedLinear.weight does (tiles of output rows unpacked, offset and scaled into a reused buffer);
- `codes in (in, out) order`: each tile dequantized in the packed words' own order, all passes contiguous, then one
  blocked transposed copy into the (out, in) weight;
- `bytes`: 2/4/8-bit codes read as the bytes of the packed words (uint8 shifts and masks, 4x the lanes of int32),
  offset and scaled into the weight through a permuted view (runs of 8 / 4 / 16 contiguous codes);
- `compiled, static shapes`: the whole layer's unpack, offset and scale as one torch.compile'd function (inductor,
  one build per layer shape and bit width), then the blocked transposed copy;
- `compiled, dynamic shapes`: the same function compiled once for every shape.

The product with the activations is left out: every variant hands the same dense weight to the same F.linear, so
only the dequantization differs. Outside CI (it compiles). Writes bench/dequant_variants.json:

    OMP_NUM_THREADS=1 python bench/dequant_variants.py
"""
import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from affinequant.quant.packing import PackedLinear, _row_tiles, cpu_has_bf16_matmul, unpack_bits  # noqa: E402
from bench.packing_bench import cpu_name  # noqa: E402

SHAPES = [(576, 1536), (896, 4864), (4096, 4096)]


def dequantize_in_packed_order(codes, zeros, scales, in_f: int, gs: int):
    """(in, m) codes, (groups, m) zeros and scales -> the (in, m) weight, every pass contiguous."""
    full, groups = in_f // gs * gs, in_f // gs
    w = ((codes[:full].unflatten(0, (groups, gs)) - zeros[:groups, None]) * scales[:groups, None]).flatten(0, 1)
    if full < in_f:
        w = torch.cat([w, (codes[full:] - zeros[groups:]) * scales[groups:]])
    return w


def layer_in_packed_order(qweight, zeros, scales, bits: int, in_f: int, gs: int):
    return dequantize_in_packed_order(unpack_bits(qweight, bits, in_f), zeros, scales, in_f, gs)


def transposed_tiles(layer: PackedLinear, out: torch.Tensor) -> torch.Tensor:
    zeros, scales = layer.zeros().float().T.contiguous(), layer.scales.float()
    for rows in _row_tiles(layer.out_features, layer.in_features):
        codes = unpack_bits(layer.qweight[:, rows], layer.bits, layer.in_features)
        out[rows].copy_(dequantize_in_packed_order(codes, zeros[:, rows], scales[:, rows], layer.in_features,
                                                   layer.group_size).T)
    return out


def byte_codes(words: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 words (w, m) -> uint8 codes (w, m, 32 / bits): code (32 / bits)·w + j of column o at [w, o, j]
    (little-endian byte order)."""
    b = words.view(torch.uint8).unflatten(-1, (words.shape[1], 4))
    if bits == 8:
        return b
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8)
    return ((b[..., None] >> shifts) & (2**bits - 1)).flatten(2)


def bytes_variant(layer: PackedLinear, out: torch.Tensor) -> torch.Tensor:
    zeros, scales = layer.zeros().float(), layer.scales.T.float()
    gs, in_f = layer.group_size, layer.in_features
    full, groups = in_f // gs * gs, in_f // gs
    for rows in _row_tiles(layer.out_features, in_f):
        codes = byte_codes(layer.qweight[:, rows], layer.bits).permute(1, 0, 2)     # (tile, words, per word)
        per, z, s, dst = codes.shape[2], zeros[rows], scales[rows], out[rows]
        torch.sub(codes[:, :full // per].unflatten(1, (groups, gs // per)), z[:, :groups, None, None],
                  out=dst[:, :full].view(dst.shape[0], groups, gs // per, per)).mul_(s[:, :groups, None, None])
        if full < in_f:
            tail = dst[:, full:].view(dst.shape[0], -1, per)
            torch.sub(codes[:, full // per:full // per + tail.shape[1]], z[:, groups:, None],
                      out=tail).mul_(s[:, groups:, None])
    return out


def compiled_variant(fn):
    def run(layer: PackedLinear, out: torch.Tensor) -> torch.Tensor:
        zeros, scales = layer.zeros().float().T.contiguous(), layer.scales.float()
        out.copy_(fn(layer.qweight, zeros, scales, layer.bits, layer.in_features, layer.group_size).T)
        return out
    return run


def best_ms(fn, repeats: int) -> float:
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2, 8])
    p.add_argument("--group_size", type=int, default=128)
    p.add_argument("--repeats", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2, help="passes over the variants, alternating; the best counts")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "dequant_variants.json")
    args = p.parse_args()
    torch._dynamo.config.recompile_limit = 64        # static shapes: one build per (shape, bits)
    static = torch.compile(layer_in_packed_order, dynamic=False)
    dynamic = torch.compile(layer_in_packed_order, dynamic=True)
    variants = {"exact": lambda layer, out: layer.weight(torch.float32, out),
                "codes in (in, out) order": transposed_tiles, "bytes": bytes_variant,
                "compiled, static shapes": compiled_variant(static),
                "compiled, dynamic shapes": compiled_variant(dynamic)}
    rows = []
    for in_f, out_f in SHAPES:
        for bits in args.bits:
            g = torch.Generator().manual_seed(0)
            groups = math.ceil(in_f / args.group_size)
            layer = PackedLinear.from_codes(torch.randint(0, 2**bits, (out_f, in_f), generator=g),
                                            torch.rand(out_f, groups, generator=g) + 0.01,
                                            torch.randint(1, 2**bits, (out_f, groups), generator=g),
                                            bits, args.group_size, None)
            want = layer.weight(torch.float32)
            row = {"in": in_f, "out": out_f, "bits": bits, "ms": {}, "bit_exact": {}, "first_call_s": {}}
            buffers = {name: torch.empty(out_f, in_f) for name in variants}
            for name, fn in variants.items():
                if name == "bytes" and (bits not in (2, 4, 8) or sys.byteorder != "little"):
                    continue
                t0 = time.perf_counter()
                got = fn(layer, buffers[name])
                row["first_call_s"][name] = time.perf_counter() - t0          # the builds, for compiled ones
                row["bit_exact"][name] = bool(torch.equal(got, want))
            times = {name: [] for name in row["bit_exact"]}
            for _ in range(args.rounds):
                for name in times:
                    times[name].append(best_ms(lambda: variants[name](layer, buffers[name]), args.repeats))
            row["ms"] = {name: min(t) for name, t in times.items()}
            row["relative_to_exact"] = {name: ms / row["ms"]["exact"] for name, ms in row["ms"].items()}
            rows.append(row)
            print(f"{in_f} -> {out_f} W{bits}: " + ", ".join(
                f"{name} {ms:.2f} ms ({row['relative_to_exact'][name]:.2f}x{'' if row['bit_exact'][name] else ', NOT exact'})"
                for name, ms in row["ms"].items()), flush=True)
    result = {"threads": torch.get_num_threads(), "torch": torch.__version__, "cpu": cpu_name(), "bf16_matmul": cpu_has_bf16_matmul(), "group_size": args.group_size,
              "command": " ".join(sys.argv), "rows": rows}
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
