"""Real quantization figures: checkpoint bytes (FP16 vs packed), peak memory of evaluating the FP
and the packed model, and the speed of the packed linear against the dense one.

    python bench/packing_bench.py --model_dir models --data_dir ../shared/data

Writes bench/packing_results.json and bench/PACKING.md. RTN weights (the packing does not depend
on how the weights were calibrated). Each peak-memory figure comes from its own process.
"""
from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def file_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def eval_peak(folder: str, data_dir: str, windows: int) -> dict:
    """Run in a child process: load a saved model, evaluate `windows` WikiText-2 windows of 512."""
    code = f"""
import json, resource, sys, torch
sys.path.insert(0, {str(ROOT)!r})
from pathlib import Path
from affinequant.formats.export import load_quantized
from affinequant.eval.data import eval_tokens
from affinequant.eval.perplexity import perplexity
from transformers import AutoTokenizer
model = load_quantized({folder!r})
tok = AutoTokenizer.from_pretrained({folder!r})
tokens, _ = eval_tokens("wikitext2", tok, 512, Path({data_dir!r}))
res = perplexity(model, tokens, 512, torch.device("cpu"), limit={windows})
from affinequant.utils import peak_memory_mb
print(json.dumps({{"ppl": res["ppl"], "seconds": res["seconds"], "peak_rss_mib": peak_memory_mb(torch.device("cpu"))}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def cpu_name() -> str:
    import platform
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def linear_speed(shapes, repeats: int = 20) -> list[dict]:
    import torch
    from affinequant.quant.packing import PackedLinear
    from affinequant.quant.quantizer import WeightQuantizer
    rows = []
    torch.manual_seed(0)
    for (in_f, out_f), bits in [(shape, bits) for bits in (4, 3, 2, 8) for shape in shapes]:
        dense = torch.nn.Linear(in_f, out_f, bias=False)
        codes, scale, zero = WeightQuantizer((out_f, in_f), bits, 128).integer_codes(dense.weight)
        packed = PackedLinear.from_codes(codes, scale.half().float(), zero, bits, 128, None, zero_offset=0)
        int4 = copy.deepcopy(packed)
        layers = [("dense", dense), ("packed", packed)] + ([("int4_cpu", int4)] if int4.use_kernel("cpu") else [])
        for tokens in (1, 512):
            x = torch.randn(1, tokens, in_f)
            timings = {}
            with torch.no_grad():
                for name, layer in layers:
                    layer(x)
                    t0 = time.perf_counter()
                    for _ in range(repeats):
                        layer(x)
                    timings[name] = (time.perf_counter() - t0) / repeats
            rows.append({"in": in_f, "out": out_f, "bits": bits, "tokens": tokens, "dense_ms": 1e3 * timings["dense"],
                         "packed_ms": 1e3 * timings["packed"], "packed_over_dense": timings["packed"] / timings["dense"],
                         "int4_cpu_ms": 1e3 * timings["int4_cpu"] if "int4_cpu" in timings else None,
                         "dense_over_int4_cpu": timings["dense"] / timings["int4_cpu"] if "int4_cpu" in timings
                         else None})
    return rows


def kernel_perplexity(model_path: str, data_dir: str, windows: int) -> dict:
    """W4 g128 RTN packed model: WikiText-2 perplexity and eval seconds with the exact packed kernel, with
    torch's int4 CPU kernel, and of the FP model, in one process."""
    import torch
    from affinequant.models.adapters import get_adapter
    from affinequant.pipeline.calibrate import quantize_blocks
    from affinequant.config import QuantConfig
    from affinequant.eval.data import eval_tokens
    from affinequant.eval.perplexity import perplexity
    from affinequant.models.loading import load_model
    from affinequant.quant.packing import use_packed_kernel
    model, tok, _ = load_model(model_path)
    tokens, _ = eval_tokens("wikitext2", tok, 512, Path(data_dir))
    out = {"fp32": perplexity(model, tokens, 512, torch.device("cpu"), windows)}
    cfg = QuantConfig(wbits=4, group_size=128, real_quant=True, nsamples=1, seqlen=64)
    quantize_blocks(model, get_adapter(model.config), torch.randint(0, 1000, (1, 64)), cfg, torch.device("cpu"))
    for kernel in ("exact", "int4_cpu"):
        switched, total = use_packed_kernel(model, kernel)
        res = perplexity(model, tokens, 512, torch.device("cpu"), windows)
        out[kernel] = {"ppl": res["ppl"], "seconds": res["seconds"], "layers": f"{switched}/{total}"}
    out["fp32"] = {"ppl": out["fp32"]["ppl"], "seconds": out["fp32"]["seconds"]}
    return out


def main():
    import torch
    from affinequant.models.adapters import get_adapter
    from affinequant.pipeline.calibrate import quantize_blocks
    from affinequant.config import QuantConfig
    from affinequant.formats.export import save_quantized
    from affinequant.models.loading import load_model

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="smollm2-135m,qwen2.5-coder-0.5b")
    p.add_argument("--model_dir", default=str(ROOT / "models"))
    p.add_argument("--data_dir", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--windows", type=int, default=2)
    p.add_argument("--speed_only", action="store_true",
                   help="re-measure only the linear speed, keeping the model figures of packing_results.json")
    args = p.parse_args()
    results = {"models": {}, "linear_speed": None, "kernel_perplexity": None}
    if args.speed_only:
        results["models"] = json.loads((ROOT / "bench" / "packing_results.json").read_text())["models"]
    for name in [] if args.speed_only else args.models.split(","):
        entry = results["models"][name] = {}
        with tempfile.TemporaryDirectory() as tmp:
            model, tok, _ = load_model(str(Path(args.model_dir) / f"{name}.gguf"))
            fp_dir = Path(tmp) / "fp16"
            model.half().save_pretrained(fp_dir)
            tok.save_pretrained(fp_dir)
            (fp_dir / "affinequant.json").write_text(json.dumps({"format": "standard"}))
            entry["fp16_bytes"] = file_bytes(fp_dir)
            model.float()
            samples = torch.randint(0, 1000, (1, 64))
            for bits in (4, 3, 2):
                m = copy.deepcopy(model)
                cfg = QuantConfig(wbits=bits, group_size=128, real_quant=True, nsamples=1, seqlen=64)
                quantize_blocks(m, get_adapter(m.config), samples, cfg, torch.device("cpu"))
                out = Path(tmp) / f"w{bits}"
                m.half()
                save_quantized(m, tok, str(out), cfg)
                entry[f"W{bits}g128_bytes"] = file_bytes(out)
                entry[f"W{bits}g128_over_fp16"] = entry[f"W{bits}g128_bytes"] / entry["fp16_bytes"]
                if bits == 4:
                    entry["eval_fp32"] = eval_peak(str(fp_dir), args.data_dir, args.windows)
                    entry["eval_packed_w4"] = eval_peak(str(out), args.data_dir, args.windows)
            print(name, json.dumps(entry, indent=1), flush=True)
    from affinequant.quant.packing import INT4_CPU_MAX_ROWS_WITHOUT_BF16, cpu_has_bf16_matmul
    results["cpu"] = {"name": cpu_name(), "bf16_matmul": cpu_has_bf16_matmul()}
    results["linear_speed"] = linear_speed([(576, 1536), (896, 4864), (4096, 4096)])
    results["kernel_perplexity"] = {name: kernel_perplexity(str(Path(args.model_dir) / f"{name}.gguf"), args.data_dir,
                                                            args.windows) for name in args.models.split(",")}
    (ROOT / "bench" / "packing_results.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = ["Checkpoint bytes (all tensors, embeddings and head stay fp16) and evaluation peak RSS "
             f"({args.windows} WikiText-2 windows of 512 tokens, float32 compute on CPU, each in its own process).", "",
             "| model | fp16 MB | W4g128 / fp16 | W3g128 / fp16 | W2g128 / fp16 | eval peak RSS FP MiB | packed W4 MiB | packed/FP RSS |",
             "|---|---|---|---|---|---|---|---|"]
    for name, e in results["models"].items():
        fp, pk = e["eval_fp32"]["peak_rss_mib"], e["eval_packed_w4"]["peak_rss_mib"]
        lines.append(f"| {name} | {e['fp16_bytes'] / 1e6:.0f} | {e['W4g128_over_fp16']:.3f} | {e['W3g128_over_fp16']:.3f} | "
                     f"{e['W2g128_over_fp16']:.3f} | {fp:.0f} | {pk:.0f} | {pk / fp:.2f} |")
    lines += ["", f"Packed linear (W4/W3/W2/W8 g128) against nn.Linear (float32), CPU, {torch.get_num_threads()} thread(s), "
              "same process: the exact kernel (torch unpack + matmul, bit-exact against fake-quant) and torch's low-bit "
              "CPU kernels (`--packed_kernel cpu`: int4 for 2/3/4-bit, 2- and 3-bit codes held as 4-bit ones, a shorter "
              "last group, as 576 at g128, padded to whole groups; int8 for 8-bit, one call per group, on up to "
              "16 rows (longer inputs take the exact path); bfloat16 activations and scales). CPU: "
              f"{results['cpu']['name']}, " + ("with bfloat16 matrix instructions" if results["cpu"]["bf16_matmul"] else
              "without bfloat16 matrix instructions (AVX512-BF16, AMX), so int4 inputs of more than "
              f"{INT4_CPU_MAX_ROWS_WITHOUT_BF16} rows take the exact path") + ":", "",
              "| bits | in → out | tokens | dense ms | exact packed ms | exact / dense | fast kernel ms | dense / fast "
              "(speed-up) |", "|---|---|---|---|---|---|---|---|"]
    for r in results["linear_speed"]:
        int4 = (f"{r['int4_cpu_ms']:.3f} | {r['dense_over_int4_cpu']:.2f}x" if r["int4_cpu_ms"] is not None
                else "– | –")
        lines.append(f"| {r.get('bits', 4)} | {r['in']} → {r['out']} | {r['tokens']} | {r['dense_ms']:.3f} | {r['packed_ms']:.3f} | "
                     f"{r['packed_over_dense']:.1f} | {int4} |")
    lines += ["", f"W4 g128 RTN packed models, WikiText-2 ({args.windows} windows of 512), one process" + (
              "" if results["cpu"]["bf16_matmul"] else " (on this CPU the int4_cpu layers give 512-row inputs to the "
              "exact path, hence the exact figures)") + ":", "",
              "| model | FP ppl | exact kernel ppl | int4_cpu ppl (layers on it) | eval s FP / exact / int4_cpu |",
              "|---|---|---|---|---|"]
    for name, k in results["kernel_perplexity"].items():
        lines.append(f"| {name} | {k['fp32']['ppl']:.3f} | {k['exact']['ppl']:.3f} | {k['int4_cpu']['ppl']:.3f} "
                     f"({k['int4_cpu']['layers']}) | {k['fp32']['seconds']:.1f} / {k['exact']['seconds']:.1f} / "
                     f"{k['int4_cpu']['seconds']:.1f} |")
    (ROOT / "bench" / "PACKING.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
