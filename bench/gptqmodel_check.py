"""Does our GPTQ export load in GPTQModel and give the same logits as our packed model?

Two stages, because GPTQModel needs torch >= 2.14.1 (its own virtual environment):
    .venv/bin/python bench/gptqmodel_check.py export --model models/smollm2-135m.gguf --out /tmp/gq
    GPTQMODEL_CPU_WORKERS=2 /path/to/gptq-venv/bin/python bench/gptqmodel_check.py compare --out /tmp/gq
`export` quantizes (RTN, --real_quant; with --target_bpw, each linear at its own width from --mixed_bits, the
widths other than the most common one under the config's `dynamic` overrides), saves the GPTQ checkpoint, and
stores our packed model's logits on fixed token ids; `compare` loads the checkpoint with GPTQModel (BACKEND.TORCH: its default
CPU kernel refuses a group size that does not divide in_features) and compares. The comparison is
written to bench/gptqmodel_check.json.
"""
import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def export(args):
    sys.path.insert(0, str(ROOT))
    from affinequant.models.adapters import get_adapter
    from affinequant.pipeline.calibrate import quantize_blocks
    from affinequant.config import QuantConfig
    from affinequant.formats.export import load_quantized, save_quantized
    from affinequant.models.loading import load_model
    model, tok, _ = load_model(args.model)
    cfg = QuantConfig(wbits=args.wbits, group_size=args.group_size, symmetric=args.symmetric, real_quant=True,
                      nsamples=1, seqlen=64, target_bpw=args.target_bpw, mixed_bits=args.mixed_bits)
    samples = torch.randint(0, 1000, (1, 64), generator=torch.Generator().manual_seed(0))
    if args.target_bpw:
        from affinequant.pipeline.allocate import mixed_precision
        cfg.layer_bits = mixed_precision(model, get_adapter(model.config), samples, cfg,
                                         torch.device("cpu"))["layer_bits"]
    quantize_blocks(model, get_adapter(model.config), samples, cfg, torch.device("cpu"))
    model.half()
    fmt = save_quantized(model, tok, args.out, cfg)
    ids = tok("The capital of France is Paris. The quick brown fox jumps over the lazy dog.",
              return_tensors="pt").input_ids
    ours = load_quantized(args.out, dtype=torch.float16).float()    # fp16 non-linear weights, as saved
    with torch.no_grad():
        logits = ours(ids).logits
    torch.save({"ids": ids, "logits": logits, "format": fmt}, Path(args.out) / "reference_logits.pt")
    print(f"exported {fmt} checkpoint to {args.out}")


def compare(args):
    from gptqmodel import BACKEND, GPTQModel
    ref = torch.load(Path(args.out) / "reference_logits.pt", weights_only=True)
    model = GPTQModel.load(args.out, backend=BACKEND.TORCH, device="cpu", dtype=torch.float16)
    with torch.no_grad():
        logits = model.model(ref["ids"]).logits.float()
    diff = (logits - ref["logits"]).abs()
    result = {"max_abs_diff": diff.max().item(), "mean_abs_diff": diff.mean().item(),
              "logit_scale": ref["logits"].abs().max().item(),
              "top1_agreement": (logits.argmax(-1) == ref["logits"].argmax(-1)).float().mean().item(),
              "kernel": next(type(m).__name__ for m in model.model.modules() if hasattr(m, "qweight")),
              "bits": {name: m.bits for name, m in model.model.named_modules() if hasattr(m, "qweight")}}
    result["bits_counts"] = {b: list(result["bits"].values()).count(b) for b in sorted(set(result["bits"].values()))}
    expected = json.loads((Path(args.out) / "config.json").read_text())["quantization_config"]
    result["dynamic"] = expected.get("dynamic")
    name = "gptqmodel_check_mixed.json" if expected.get("dynamic") else "gptqmodel_check.json"
    if not expected.get("dynamic"):
        result.pop("bits")
    (ROOT / "bench" / name).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=["export", "compare"])
    p.add_argument("--model", default=str(ROOT / "models" / "smollm2-135m.gguf"))
    p.add_argument("--out", default="/tmp/affinequant-gptq")
    p.add_argument("--wbits", type=int, default=4)
    p.add_argument("--group_size", type=int, default=128)
    p.add_argument("--symmetric", action="store_true")
    p.add_argument("--target_bpw", type=float, default=None, help="mixed precision at this average bits per weight")
    p.add_argument("--mixed_bits", type=lambda s: [int(b) for b in s.split(",")], default=[2, 3, 4])
    args = p.parse_args()
    export(args) if args.stage == "export" else compare(args)
