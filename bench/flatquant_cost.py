"""What FlatQuant's online transforms cost at run time: the forward time of one decoder block with them
(after the merge: Kronecker transforms after the norms and in front of o_proj and down_proj, the k-cache
transform in attention) against the same block with LET merged (nothing online), both fake-quantized at
W4A4, and both weight-only (W4A16, where LET leaves plain linears), in one process.

    python bench/flatquant_cost.py --threads 1

Block shapes are those of SmolLM2-135M and Qwen2.5-Coder-0.5B (random weights: the cost does not depend
on the values). Writes bench/flatquant_cost.json; quote ratios, not seconds (a shared machine).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM  # noqa: E402

from affinequant.models.adapters import get_adapter  # noqa: E402
from affinequant.pipeline.calibrate import BlockQuantizer  # noqa: E402
from affinequant.models.blocks import capture_block_inputs
from affinequant.config import QuantConfig  # noqa: E402
from affinequant.quant.qmodules import use_quantized_attention  # noqa: E402

SHAPES = {
    "smollm2-135m": (LlamaForCausalLM, LlamaConfig, dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                                                         num_key_value_heads=3)),
    "qwen2.5-coder-0.5b": (Qwen2ForCausalLM, Qwen2Config, dict(hidden_size=896, intermediate_size=4864,
                                                               num_attention_heads=14, num_key_value_heads=2)),
}
VARIANTS = {
    "FP": None,
    "LET W4A4": dict(wbits=4, abits=4, let=True, lwc=True),
    "FlatQuant W4A4": dict(wbits=4, abits=4, flatquant=True),
    "FlatQuant W4A4KV4": dict(wbits=4, abits=4, kv_bits=4, q_bits=16, flatquant=True),
    "LET W4A16": dict(wbits=4, abits=16, let=True, lwc=True),
    "FlatQuant W4A16": dict(wbits=4, abits=16, flatquant=True),
}


def block_of(name: str, variant: dict | None, tokens: int):
    model_class, config_class, dims = SHAPES[name]
    torch.manual_seed(0)
    model = model_class(config_class(vocab_size=256, num_hidden_layers=1, max_position_embeddings=4096, **dims)).eval()
    adapter = get_adapter(model.config)
    ids = torch.randint(0, 256, (1, tokens))
    inputs, kwargs = capture_block_inputs(model, adapter, ids, torch.device("cpu"), torch.float32)
    block = adapter.layers(model)[0]
    if variant is not None:
        cfg = QuantConfig(**variant).validate()
        use_quantized_attention(model)
        stats = {n: torch.rand(m.in_features) + 0.5 for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
        bq = BlockQuantizer(block, adapter, model.config, cfg, stats, None)
        with torch.no_grad():
            bq.finalize()
    return block, inputs, kwargs


def time_forward(block, inputs, kwargs, repeats: int) -> float:
    with torch.no_grad():
        block(inputs, **kwargs)
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            block(inputs, **kwargs)
            best = min(best, time.perf_counter() - t0)
    return best


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tokens", default="1,64,512")
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    results = {"threads": args.threads, "repeats": args.repeats, "torch": torch.__version__, "rows": []}
    for name in SHAPES:
        for tokens in map(int, args.tokens.split(",")):
            times = {}
            for variant, cfg in VARIANTS.items():
                block, inputs, kwargs = block_of(name, cfg, tokens)
                times[variant] = time_forward(block, inputs, kwargs, args.repeats)
            row = {"model": name, "tokens": tokens, "seconds": times,
                   "flatquant_vs_let_w4a4": times["FlatQuant W4A4"] / times["LET W4A4"],
                   "flatquant_kv4_vs_let_w4a4": times["FlatQuant W4A4KV4"] / times["LET W4A4"],
                   "flatquant_vs_let_w4a16": times["FlatQuant W4A16"] / times["LET W4A16"]}
            results["rows"].append(row)
            print(f"{name} {tokens:4d} tokens: FlatQuant / LET  W4A4 {row['flatquant_vs_let_w4a4']:.2f}x  "
                  f"W4A4KV4 {row['flatquant_kv4_vs_let_w4a4']:.2f}x  W4A16 {row['flatquant_vs_let_w4a16']:.2f}x", flush=True)
    (ROOT / "bench" / "flatquant_cost.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
