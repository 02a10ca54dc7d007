"""The cost of a training step in each mode, measured in one process, alternating between modes so machine
noise hits all of them alike.

    OMP_NUM_THREADS=1 python bench/affine_cost.py --model models/smollm2-135m.gguf

For block 0 of the model: seconds per training step (refresh transforms + forward + backward + AdamW) for
LWC, LWC+LET, AffineQuant (--use_ln_matrix) and AffineQuant (--use_matrix), each with the whole block
compiled (--compile_block, on compiled kernels), with the fused fake-quantization (quantizer._FakeQuant) on
compiled kernels (--quant_kernels compiled, the default where a C++ compiler is) and on eager ones, and with
the unfused formula it replaced; the step's FLOPs (torch's
FlopCounterMode) over its time against the fp32 matmul peak measured in the same process (MFU); the ceiling
of that MFU, the step's own matrix products (same shapes and layouts) timed alone, and their share of the
step; and the merged block's forward time with and without the runtime inverse after its norms.
Writes bench/affine_cost.json.
"""
import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from affinequant.quant import quantizer  # noqa: E402
from affinequant.models.adapters import get_adapter  # noqa: E402
from affinequant.pipeline.calibrate import BlockQuantizer  # noqa: E402
from affinequant.models.blocks import block_output, capture_block_inputs
from affinequant.config import QuantConfig  # noqa: E402
from affinequant.models.loading import load_model  # noqa: E402
from affinequant.pipeline.stats import collect_act_stats  # noqa: E402
from affinequant.pipeline.trainer import CompiledForward  # noqa: E402

MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
           torch.ops.aten.baddbmm.default}

MODES = {
    "LWC (OmniQuant)": dict(lwc=True),
    "LWC+LET (OmniQuant)": dict(lwc=True, let=True),
    "AffineQuant --use_ln_matrix": dict(lwc=True, let=True, use_ln_matrix=True),
    "AffineQuant --use_matrix": dict(lwc=True, let=True, use_matrix=True),
}


def unfused_fake_quant(x, scale, zero, qmax):
    """The fake quantizer as separate autograd operations (what quantizer._FakeQuant replaced)."""
    v = x / scale
    q = ((v.round() - v).detach() + v + zero).clamp(0, qmax)
    return (q - zero) * scale


def matmul_flops(func, args) -> int:
    """FLOPs of one recorded matrix product: 2 * m * k * n (times the batch for bmm)."""
    a, b = (args[1], args[2]) if func in (torch.ops.aten.addmm.default, torch.ops.aten.baddbmm.default) else args[:2]
    return 2 * math.prod(a.shape) * b.shape[-1]


def record_matmuls(step) -> list:
    """The matrix products one step runs: (op, args as (shape, stride) or constants, kwargs)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    calls = []

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in MATMULS:
                calls.append((func, [(tuple(a.shape), a.stride(), a.dtype) if torch.is_tensor(a) else a for a in args],
                              dict(kwargs or {})))
            return func(*args, **(kwargs or {}))
    with Recorder():
        step()
    return calls


def replay_matmuls(calls) -> tuple[float, int]:
    """Seconds and FLOPs of the recorded products run alone, on fresh tensors of the same shapes and strides."""
    def materialise(a):
        if isinstance(a, tuple) and len(a) == 3 and isinstance(a[2], torch.dtype):
            shape, stride, dtype = a
            return torch.empty_strided(shape, stride, dtype=dtype).normal_()
        return a
    prepared = [(func, [materialise(a) for a in args], kwargs) for func, args, kwargs in calls]
    for func, args, kwargs in prepared:                    # warm-up
        func(*args, **kwargs)
    t0 = time.perf_counter()
    for func, args, kwargs in prepared:
        func(*args, **kwargs)
    return time.perf_counter() - t0, sum(matmul_flops(func, args) for func, args, _ in prepared)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(ROOT / "models" / "smollm2-135m.gguf"))
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", default=str(ROOT / "bench" / "affine_cost.json"))
    args = p.parse_args()
    torch.manual_seed(0)
    model, _, _ = load_model(args.model)
    adapter = get_adapter(model.config)
    samples = torch.randint(0, model.config.vocab_size, (2, args.seqlen))
    scales, shifts = collect_act_stats(model, adapter, samples, torch.device("cpu"))
    inputs, kwargs = capture_block_inputs(model, adapter, samples, torch.device("cpu"), torch.float32)
    prefix = f"{adapter.layers_path}.0."
    strip = lambda d: {k[len(prefix):]: v for k, v in d.items() if k.startswith(prefix)}  # noqa: E731
    target = inputs[:1]
    setups = {}
    for name, flags in MODES.items():
        block = copy.deepcopy(adapter.layers(model)[0])
        cfg = QuantConfig(wbits=3, group_size=128, epochs=4, **flags)
        bq = BlockQuantizer(block, adapter, model.config, cfg, strip(scales), strip(shifts))
        bq.start_epoch(3)                                  # every band unlocked: the most expensive step
        params = bq.trainable()
        for q in params:
            q.requires_grad_(True)
        setups[name] = (bq, torch.optim.AdamW(params, lr=1e-3))
    def step(bq, opt):
        bq.refresh()
        loss = F.mse_loss(block_output((bq.train_forward or bq.block)(inputs[:1], **kwargs)), target)
        opt.zero_grad()
        loss.backward()
        opt.step()

    from torch.utils.flop_counter import FlopCounterMode
    flops = {}
    for name, (bq, opt) in setups.items():
        with FlopCounterMode(display=False) as counter:
            step(bq, opt)
        flops[name] = counter.get_total_flops()
    fused_quant = quantizer.fake_quant

    def saved_mib(bq) -> float:
        """MiB of distinct tensors autograd keeps for backward in one step (what the fused node saves on)."""
        seen = {}

        def pack(t):
            seen[(t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))] = t.numel() * t.element_size()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            bq.refresh()
            loss = F.mse_loss(block_output(bq.block(inputs[:1], **kwargs)), target)
        loss.backward()
        return sum(seen.values()) / 2**20
    saved = {}
    for name, (bq, _) in setups.items():
        for fused in (True, False):
            quantizer.fake_quant = fused_quant if fused else unfused_fake_quant
            try:
                saved[(name, fused)] = saved_mib(bq)
            finally:
                quantizer.fake_quant = fused_quant
    # the same step with the whole block compiled (--compile_block), then on three fake-quantizations:
    # compiled kernels, eager ones, and the unfused formula
    variants = {"compiled block": ("compiled", fused_quant), "compiled": ("compiled", fused_quant),
                "eager": ("eager", fused_quant), "unfused": ("eager", unfused_fake_quant)}
    compiled_blocks = {name: CompiledForward(bq.block) for name, (bq, _) in setups.items()}
    times = {v: {name: [] for name in MODES} for v in variants}
    ceiling = {name: [] for name in MODES}
    calls = {name: record_matmuls(lambda: step(*setups[name])) for name in MODES}
    peaks = []
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    for r in range(args.rounds + 1):                       # round 0 is a warm-up (and compiles), not recorded
        t0 = time.perf_counter()
        for _ in range(4):
            torch.mm(a, b)
        peaks.append(4 * 2 * 1024**3 / (time.perf_counter() - t0))
        for name, (bq, opt) in setups.items():
            for variant, (kernels, fake_quant) in variants.items():
                quantizer.KERNELS.use(kernels)
                quantizer.fake_quant = fake_quant
                bq.train_forward = compiled_blocks[name] if variant == "compiled block" else None
                try:
                    t0 = time.perf_counter()
                    step(bq, opt)
                    elapsed = time.perf_counter() - t0
                finally:
                    bq.train_forward = None
                    quantizer.fake_quant = fused_quant
                    quantizer.KERNELS.use("eager")
                if r:
                    times[variant][name].append(elapsed)
            if r:
                ceiling[name].append(replay_matmuls(calls[name]))
    step_times, eager_times, unfused_times = times["compiled"], times["eager"], times["unfused"]
    # merged blocks: plain (OmniQuant LET) against one that keeps runtime inverses after its norms
    merged = {}
    for name in ("LWC+LET (OmniQuant)", "AffineQuant --use_ln_matrix"):
        bq = setups[name][0]
        with torch.no_grad():
            for p_ in bq.trainable():
                p_.requires_grad_(False)
            if bq.let.ln_matrix:                          # trained matrices have off-diagonal entries
                for m in bq.let.norm_params:
                    m.add_(1e-3 * torch.randn_like(m))
        bq.finalize()
        merged[name] = bq.block
    fwd = {name: [] for name in merged}
    with torch.no_grad():
        for block in merged.values():                      # warm-up
            block(inputs[:1], **kwargs)
        for _ in range(4 * args.rounds):
            for name, block in merged.items():
                t0 = time.perf_counter()
                block(inputs[:1], **kwargs)
                fwd[name].append(time.perf_counter() - t0)
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    base_step = med(step_times["LWC+LET (OmniQuant)"])
    base_fwd = med(fwd["LWC+LET (OmniQuant)"])
    peak = sorted(peaks[1:])[-1]       # the best of the rounds: the machine's fp32 matmul peak, here and now
    result = {"model": args.model, "seqlen": args.seqlen, "hidden": model.config.hidden_size,
              "threads": torch.get_num_threads(), "matmul_peak_gflops": peak / 1e9,
              "train_step_gflop": {k: v / 1e9 for k, v in flops.items()},
              "train_step_mfu": {k: flops[k] / med(v) / peak for k, v in step_times.items()},
              "train_step_mfu_eager": {k: flops[k] / med(v) / peak for k, v in eager_times.items()},
              "train_step_mfu_unfused": {k: flops[k] / med(v) / peak for k, v in unfused_times.items()},
              "matmul_only_mfu": {k: med([f / t for t, f in v]) / peak for k, v in ceiling.items()},
              "matmul_share_of_step": {k: med([t for t, _ in v]) / med(step_times[k]) for k, v in ceiling.items()},
              "matmul_share_of_flops": {k: ceiling[k][0][1] / flops[k] for k in MODES},
              "train_step_seconds_compiled_block": {k: med(v) for k, v in times["compiled block"].items()},
              "compiled_block_over_compiled": {k: med(times["compiled block"][k]) / med(step_times[k])
                                               for k in step_times},
              "train_step_mfu_compiled_block": {k: flops[k] / med(v) / peak for k, v in times["compiled block"].items()},
              "train_step_seconds_eager": {k: med(v) for k, v in eager_times.items()},
              "train_step_seconds_unfused": {k: med(v) for k, v in unfused_times.items()},
              "compiled_over_eager": {k: med(step_times[k]) / med(eager_times[k]) for k in step_times},
              "fused_over_unfused": {k: med(eager_times[k]) / med(unfused_times[k]) for k in step_times},
              "saved_for_backward_mib": {k: saved[(k, True)] for k in MODES},
              "saved_for_backward_mib_unfused": {k: saved[(k, False)] for k in MODES},
              "use_ln_matrix_over_let": med(step_times["AffineQuant --use_ln_matrix"]) / base_step,
              "train_step_seconds": {k: med(v) for k, v in step_times.items()},
              "train_step_over_let": {k: med(v) / base_step for k, v in step_times.items()},
              "merged_block_forward_seconds": {k: med(v) for k, v in fwd.items()},
              "runtime_inverse_forward_overhead": med(fwd["AffineQuant --use_ln_matrix"]) / base_fwd}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
