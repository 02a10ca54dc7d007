"""Seconds per block: the reference AffineQuant's block loop against ours, on the same random MHA
Llama-shaped model, the same calibration tokens and activation statistics, the same settings, one
process each, the same thread count. Outside CI: the reference needs its own environment.

Set-up, once (the reference pins transformers 4.35; it runs on this project's torch):

    python -m venv ../refvenv
    ../refvenv/bin/pip install torch==2.13.0 transformers==4.35.2 "numpy<2" safetensors
    git clone https://github.com/bytedance/AffineQuant ../AffineQuant

Then:

    OMP_NUM_THREADS=1 python bench/reference_side_by_side.py \
        --reference_dir ../AffineQuant --reference_python ../refvenv/bin/python

The reference runs unedited. As for the fixture in ../shared/fixtures/reference-affinequant (its README),
three run-time substitutions let it run on CPU, nothing else: `Tensor.cuda` returns the tensor itself,
`torch.cuda.amp.autocast` is a no-op context (so both codes train in fp32), and `auto_gptq`'s CUDA
linear (used only with --real_quant) is an empty stub; modules for the other families it imports
(OPT, Falcon) are stubbed when the checkout lacks them. Its `affinequant()` is called directly with the
arguments its main.py builds (quantizer parameter dicts, `args.dtype = float32`, the model loaded in
float16 as its LMClass does), which bypasses its data loading and evaluation.

First `--check_fixture` (default on) runs the reference on the fixture's model and data with the fixture's
settings and compares its per-layer losses with the fixture's: the reference checkout and the
substitutions here reproduce the reference's own CPU run. Then each mode (LWC, LWC+LET, --use_ln_matrix)
runs on both codes, the reference first, and the per-block seconds of each (everything the loop does for
a block: FP targets, LET initialisation, training, merge, next inputs) are compared. Ours runs with
`--reference_compat` (the reference's conventions, so the same arithmetic and losses), with its
defaults, and with its defaults and --compile_block. Each code runs --repeats times, the codes taking
turns, and each code's best run counts (the machine's speed drifts by 10-20% over minutes). The first block of each run pays one-off costs
(building compiled kernels), so the steady figure is the mean over the blocks after the first; the
matmul floor is the block's matrix-product FLOPs (FlopCounterMode, our default run) at the fp32 matmul
peak measured in this process. Writes bench/reference_side_by_side.json.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT.parent / "shared" / "fixtures" / "reference-affinequant"

MODES = {
    "LWC": dict(lwc=True),
    "LWC+LET": dict(lwc=True, let=True),
    "AffineQuant --use_ln_matrix": dict(lwc=True, let=True, use_ln_matrix=True),
}
OURS = {  # our runs: the reference's conventions (the same arithmetic), our defaults, and --compile_block
    "ours --reference_compat": dict(reference_compat=True),
    "ours": dict(reference_compat=False),
    "ours --compile_block": dict(reference_compat=False, compile_block=True),
}
FIXTURE_RUNS = {  # the fixture README's settings of each reference run
    "lwc_w3g64": dict(wbits=3, group_size=64, lwc=True, sf=1.0),
    "affine_w4g64_ln": dict(wbits=4, group_size=64, lwc=True, let=True, use_ln_matrix=True, sf=1e-2),
}


# ---------------------------------------------------------------------------------------------------
# The reference side: runs under the reference's interpreter, imports nothing of ours.

def run_reference(job: dict) -> dict:
    """Call the reference's affinequant() on job["model"] with job's settings; per-block seconds and
    the per-layer, per-epoch losses it logs."""
    import contextlib
    import random
    import types
    from argparse import Namespace

    import numpy as np
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    ref_dir = Path(job["reference_dir"]).resolve()
    sys.path.insert(0, str(ref_dir))
    # the three run-time substitutions that let the reference run on CPU (module docstring)
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.cuda.amp.autocast = lambda *a, **k: contextlib.nullcontext()
    for name in ("auto_gptq", "auto_gptq.nn_modules", "auto_gptq.nn_modules.qlinear",
                 "auto_gptq.nn_modules.qlinear.qlinear_cuda"):
        sys.modules[name] = types.ModuleType(name)
    for family, cls in (("int_opt_layer", "QuantOPTDecoderLayer"), ("int_falcon_layer", "QuantFalconDecoderLayer")):
        if not (ref_dir / "models" / f"{family}.py").is_file():
            stub = types.ModuleType(f"models.{family}")
            setattr(stub, cls, None)
            sys.modules[f"models.{family}"] = stub
    from quantize.affinequant import affinequant

    torch.set_num_threads(job["threads"])
    s = job["settings"]
    args = Namespace(net="llama-bench", model=job["model"], epochs=s["epochs"], nsamples=s["nsamples"],
                     batch_size=1, wbits=s["wbits"], abits=16, group_size=s["group_size"], lwc=s.get("lwc", False),
                     let=s.get("let", False), use_ln_matrix=s.get("use_ln_matrix", False),
                     use_matrix=s.get("use_matrix", False), sf=s.get("sf", 1.0), let_lr=5e-3, lwc_lr=1e-2, wd=0,
                     alpha=0.5, symmetric=False, aug_loss=False, a_dynamic_method="per_token",
                     w_dynamic_method="per_channel", deactive_amp=False, dtype=torch.float32, real_quant=False,
                     resume=None, output_dir=job["output_dir"], seed=2)
    quant = dict(n_bits=16, per_channel_axes=[], symmetric=False, dynamic_method="per_token")
    args.weight_quant_params = dict(n_bits=args.wbits, per_channel_axes=[0], symmetric=False,
                                    dynamic_method="per_channel", group_size=args.group_size, lwc=args.lwc)
    args.act_quant_params = args.q_quant_params = args.k_quant_params = args.v_quant_params = quant
    args.p_quant_params = dict(n_bits=16, metric="fix0to1")

    model = AutoModelForCausalLM.from_pretrained(job["model"], torch_dtype=torch.float16)  # as its LMClass
    model.eval()
    lm = Namespace(model=model, device=torch.device("cpu"), _device=torch.device("cpu"), seqlen=s["seqlen"])
    tokens = load_file(job["tokens"])["input_ids"][:s["nsamples"], :s["seqlen"]]
    dataloader = [(tokens[i:i + 1], None) for i in range(tokens.shape[0])]
    act_scales = torch.load(job["act_scales"], weights_only=True)
    act_shifts = torch.load(job["act_shifts"], weights_only=True)

    events = []

    class Log:
        def info(self, message):
            events.append((time.perf_counter(), str(message)))

    random.seed(2)
    np.random.seed(2)
    torch.manual_seed(2)
    affinequant(lm, args, dataloader, act_scales, act_shifts, Log())
    end = time.perf_counter()
    starts = [t for t, m in events if m.startswith("=== Start quantize layer")]
    seconds = [b - a for a, b in zip(starts, starts[1:] + [end])]
    losses: dict[int, list] = {}
    for _, m in events:
        if m.startswith("layer ") and " loss:" in m:
            layer = int(m.split()[1])
            losses.setdefault(layer, []).append(float(m.split("loss:")[1].split()[0]))
    return {"block_seconds": seconds, "losses": [losses[i] for i in sorted(losses)],
            "torch": torch.__version__, "transformers": __import__("transformers").__version__}


# ---------------------------------------------------------------------------------------------------
# Our side and the driver: run under this project's interpreter.

def run_ours(job: dict) -> dict:
    import contextlib

    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, str(ROOT))
    from affinequant.quant import quantizer
    from affinequant.models.adapters import get_adapter
    from affinequant.pipeline.calibrate import quantize_blocks
    from affinequant.config import QuantConfig

    torch.set_num_threads(job["threads"])
    kernels = quantizer.KERNELS.use(job["kernels"])
    counter = contextlib.nullcontext()
    if job.get("count_flops"):        # the matrix products of the whole loop (FlopCounterMode: not attention)
        from torch.utils.flop_counter import FlopCounterMode
        counter = FlopCounterMode(display=False)
    s = job["settings"]
    model = AutoModelForCausalLM.from_pretrained(job["model"], dtype=torch.float32).eval()
    cfg = QuantConfig(wbits=s["wbits"], group_size=s["group_size"], lwc=s.get("lwc", False), let=s.get("let", False),
                      use_ln_matrix=s.get("use_ln_matrix", False), sf=s.get("sf", 1.0), epochs=s["epochs"],
                      nsamples=s["nsamples"], seqlen=s["seqlen"], reference_compat=job["reference_compat"])
    tokens = load_file(job["tokens"])["input_ids"][:s["nsamples"], :s["seqlen"]]
    torch.manual_seed(2)
    with counter:
        reports = quantize_blocks(model, get_adapter(model.config), tokens, cfg, torch.device("cpu"),
                                  torch.load(job["act_scales"], weights_only=True),
                                  torch.load(job["act_shifts"], weights_only=True),
                                  compile_block=job.get("compile_block", False))
    out = {"block_seconds": [r.seconds for r in reports], "losses": [r.losses for r in reports],
           "quant_kernels": kernels}
    if job.get("count_flops"):
        out["flops_per_block"] = counter.get_total_flops() / len(reports)
    return out


def matmul_peak(threads: int, rounds: int = 5) -> float:
    """The best FLOP/s of a few 1024^3 fp32 matrix products, here and now (the yardstick of bench/affine_cost)."""
    import torch
    torch.set_num_threads(threads)
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    best = 0.0
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        best = max(best, 4 * 2 * 1024**3 / (time.perf_counter() - t0))
    return best


def call(python: str, side: str, job: dict, env: dict) -> dict:
    """Run one side in a fresh process (each code's own interpreter and imports), return its JSON."""
    with tempfile.TemporaryDirectory() as tmp:
        job_file, out_file = Path(tmp) / "job.json", Path(tmp) / "out.json"
        job = dict(job, output_dir=tmp)
        job_file.write_text(json.dumps(job))
        subprocess.run([python, __file__, "--side", side, "--job", str(job_file), "--out", str(out_file)],
                       check=True, env=env)
        return json.loads(out_file.read_text())


def steady(seconds: list) -> float:
    """Seconds per block once one-off costs are paid (the first block compiles kernels, warms allocators):
    the mean over the blocks after the first."""
    return sum(seconds[1:]) / len(seconds[1:]) if len(seconds) > 1 else seconds[0]


def make_model(path: Path, args) -> None:
    """A random MHA Llama-shaped model (SmolLM2's widths with as many KV heads as heads), its calibration
    tokens, and activation statistics in the reference's format (per-channel max |x| and the EMA'd
    midpoint of every linear's input, computed by our stats module on the same tokens)."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(ROOT))
    from affinequant.models.adapters import get_adapter
    from affinequant.pipeline.stats import collect_act_stats

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                         num_attention_heads=args.heads, num_key_value_heads=args.heads, vocab_size=args.vocab,
                         max_position_embeddings=max(2048, args.seqlen), rms_norm_eps=1e-5, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            p.copy_(p.half().float())          # representable in float16: the reference loads float16
    model.save_pretrained(path / "model", safe_serialization=True)
    g = torch.Generator().manual_seed(1234)
    tokens = torch.randint(0, args.vocab, (args.nsamples, args.seqlen), generator=g)
    save_file({"input_ids": tokens}, str(path / "tokens.safetensors"))
    scales, shifts = collect_act_stats(model, get_adapter(config), tokens, torch.device("cpu"))
    torch.save(scales, path / "act_scales.pt")
    torch.save(shifts, path / "act_shifts.pt")


def check_fixture(args, env) -> dict:
    """The reference checkout, run here, against the losses the fixture's own reference run logged."""
    out = {}
    for run_name, settings in FIXTURE_RUNS.items():
        job = dict(reference_dir=str(args.reference_dir), model=str(FIXTURE / "model"), threads=args.threads,
                   tokens=str(FIXTURE / "calib_tokens.safetensors"), act_scales=str(FIXTURE / "act_scales.pt"),
                   act_shifts=str(FIXTURE / "act_shifts.pt"),
                   settings=dict(settings, epochs=2, nsamples=8, seqlen=128))
        got = call(args.reference_python, "reference", job, env)["losses"]
        logged = json.loads((FIXTURE / run_name / "losses.json").read_text())["per_layer_epoch_losses"]
        want = [[e["loss"] for e in logged[k]] for k in sorted(logged, key=int)]
        rel = max(abs(a - b) / abs(b) for g_, w_ in zip(got, want) for a, b in zip(g_, w_))
        out[run_name] = {"reference_here": got, "fixture": want, "max_rel_diff": rel}
        print(f"fixture {run_name}: max relative loss difference {rel:.2e}", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reference_dir", type=Path, help="a checkout of bytedance/AffineQuant")
    p.add_argument("--reference_python", help="the interpreter of the reference's environment")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 1)))
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--intermediate", type=int, default=1536)
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--wbits", type=int, default=3)
    p.add_argument("--group_size", type=int, default=64, help="the reference's quantizer refuses a ragged last "
                   "group when asymmetric, so a width the group divides")
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--repeats", type=int, default=2, help="runs of each code per mode, in turns; the best counts")
    p.add_argument("--no_check_fixture", action="store_true")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "reference_side_by_side.json")
    p.add_argument("--side", choices=["reference", "ours"], help=argparse.SUPPRESS)
    p.add_argument("--job", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.side:                        # one side, in its own process (see call())
        job = json.loads(args.job.read_text())
        result = run_reference(job) if args.side == "reference" else run_ours(job)
        args.out.write_text(json.dumps(result))
        return
    if not args.reference_dir or not (args.reference_dir / "quantize" / "affinequant.py").is_file():
        p.error("--reference_dir must be a checkout of bytedance/AffineQuant (quantize/affinequant.py in it)")
    if not args.reference_python or not Path(args.reference_python).is_file():
        p.error("--reference_python must be the interpreter of the reference's environment (set-up: see --help)")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    result = {"threads": args.threads, "command": " ".join(sys.argv),
              "model": dict(hidden=args.hidden, intermediate=args.intermediate, heads=args.heads,
                            kv_heads=args.heads, layers=args.layers, vocab=args.vocab),
              "repeats": args.repeats, "settings": dict(wbits=args.wbits, group_size=args.group_size, nsamples=args.nsamples,
                               seqlen=args.seqlen, epochs=args.epochs, batch_size=1)}
    if not args.no_check_fixture and FIXTURE.is_dir():
        result["fixture_check"] = check_fixture(args, env)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_model(tmp, args)
        common = dict(model=str(tmp / "model"), tokens=str(tmp / "tokens.safetensors"), threads=args.threads,
                      act_scales=str(tmp / "act_scales.pt"), act_shifts=str(tmp / "act_shifts.pt"))
        peaks = [matmul_peak(args.threads)]
        rows = {}
        for mode in args.modes:
            settings = dict(result["settings"], **MODES[mode], sf=1e-2 if MODES[mode].get("let") else 1.0)
            job = dict(common, settings=settings)
            runs = {name: [] for name in ("reference", *OURS)}
            for _ in range(args.repeats):          # the codes take turns, so a slow spell of the machine hits all
                runs["reference"].append(call(args.reference_python, "reference",
                                              dict(job, reference_dir=str(args.reference_dir)), env))
                for name, extra in OURS.items():
                    runs[name].append(call(sys.executable, "ours", dict(job, **extra, kernels="auto"), env))
            row = {}
            for name, results in runs.items():   # each code's best run (the least disturbed), and every run's figure
                row[name] = min(results, key=lambda res: steady(res["block_seconds"]))
                row[name]["steady_seconds_of_each_run"] = [steady(res["block_seconds"]) for res in results]
            flops = call(sys.executable, "ours", dict(job, reference_compat=False, kernels="eager", count_flops=True),
                         env)["flops_per_block"]
            row["matmul_gflop_per_block"] = flops / 1e9
            for name in ("reference", *OURS):
                row[name]["steady_seconds"] = steady(row[name]["block_seconds"])
            rows[mode] = row
            print(f"{mode}: s per block: " + ", ".join(f"{name} {row[name]['block_seconds']}"
                                                      for name in ("reference", *OURS)), flush=True)
        peaks.append(matmul_peak(args.threads))
        peak = max(peaks)
        result["matmul_peak_gflops"] = peak / 1e9
        for mode, row in rows.items():
            ref = row["reference"]
            floor = row["matmul_gflop_per_block"] * 1e9 / peak
            row["matmul_floor_seconds"] = floor   # the block's matrix products alone, at the peak
            for name in OURS:
                row[f"{name} / reference"] = {"steady": row[name]["steady_seconds"] / ref["steady_seconds"],
                                              "all blocks": sum(row[name]["block_seconds"])
                                              / sum(ref["block_seconds"])}
            for name in ("reference", *OURS):
                row[name]["floor / steady"] = floor / row[name]["steady_seconds"]
        result["modes"] = rows
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
