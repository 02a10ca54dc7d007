"""Benchmark: FP, RTN, LWC and LWC+LET at W4A16g128, W3A16g128, W2A16g128 and W4A4 on real models.

    python bench/run_bench.py --models smollm2-135m,qwen2.5-coder-0.5b --model_dir /path/to/ggufs

Each configuration runs `main.py` in its own process (so peak memory is per run), writes its
results JSON under bench/out/, and is skipped when that file already exists (the bench resumes).
bench/results.json and bench/RESULTS.md are rebuilt from whatever has finished.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out"

SETTINGS = {  # name: flags
    "W4A16g128": ["--wbits", "4", "--abits", "16", "--group_size", "128"],
    "W3A16g128": ["--wbits", "3", "--abits", "16", "--group_size", "128"],
    "W2A16g128": ["--wbits", "2", "--abits", "16", "--group_size", "128"],
    "W4A4": ["--wbits", "4", "--abits", "4"],     # q, k and v at 4 bits too (OmniQuant's attention quantizers)
    # the papers' two W4A4s: KV16 (OmniQuant, AffineQuant, ABQ-LLM tables) and KV4 with q at 16 (FlatQuant, QuaRot)
    "W4A4KV16": ["--wbits", "4", "--abits", "4", "--kv_bits", "16"],
    "W4A4KV4": ["--wbits", "4", "--abits", "4", "--kv_bits", "4", "--q_bits", "16"],
    # ABQ-LLM's settings: bit balance (2-bit weights on 5 levels, 2.32 bits: W2*), W6A6 and W2A8
    "W2*A16g128": ["--wbits", "2", "--abits", "16", "--group_size", "128", "--bit_balance"],
    # mixed precision (--target_bpw): each linear at 2, 3 or 4 bits, 2.5 bits per weight on average (codes, scales
    # and zero points counted; W2 g128 asymmetric is 2.14, W3 3.15)
    "W2.5mixA16g128": ["--wbits", "3", "--abits", "16", "--group_size", "128", "--target_bpw", "2.5",
                       "--mixed_bits", "2,3,4"],
    "W6A6": ["--wbits", "6", "--abits", "6"],
    "W2A8": ["--wbits", "2", "--abits", "8"],
    "W2*A8": ["--wbits", "2", "--abits", "8", "--bit_balance"],
}
METHODS = {
    "RTN": ["--epochs", "0"],
    "LWC": ["--lwc"],
    "LWC+LET": ["--lwc", "--let"],
    # AffineQuant's README settings: matrices after the norms weight-only, the q/k matrix for W4A4
    "AffineQuant": ["--lwc", "--let", "--use_ln_matrix"],
    "AffineQuant+qk": ["--lwc", "--let", "--use_matrix"],
    # OmniQuant with the hyperparameters of the reference scripts for W4A4 (Llama-2 / llama-30b):
    # alpha 0.75, let_lr 1e-3, and OmniQuant's default lwc_lr 1e-2 instead of the bench's 5e-2
    "LWC+LET@W4A4-recipe": ["--lwc", "--let", "--alpha", "0.75", "--let_lr", "1e-3", "--lwc_lr", "1e-2"],
    # stages that learn nothing (no --epochs): the clipping search, GPTQ rounding (columns in act-order, as
    # GPTQModel's default group-aware reordering), and both
    "clip search": ["--clip_search"],
    # (the rows before issue 30 ran act order at damping 0.01, spelled out below since the defaults changed)
    "GPTQ": ["--gptq", "--act_order", "--percdamp", "0.01"],
    "GPTQ@damp0.05": ["--gptq", "--act_order", "--percdamp", "0.05"],    # GPTQModel's default dampening
    "GPTQ@damp0.1": ["--gptq", "--act_order", "--percdamp", "0.1"],
    "GPTQ (GPTQ's defaults)": ["--gptq", "--no_act_order", "--percdamp", "0.01"],   # natural order, GPTQ's damping
    "GPTQ (defaults)": ["--gptq"],                                                # what --gptq alone does now
    "clip search+GPTQ": ["--clip_search", "--gptq", "--act_order", "--percdamp", "0.01"],
    # AffineQuant's transforms and LWC, then GPTQ rounding on the merged weights (FlatQuant's composition)
    "AffineQuant+GPTQ": ["--lwc", "--let", "--use_ln_matrix", "--gptq", "--act_order", "--percdamp", "0.01"],
    # the clipping search as LWC's start, alone and inside AffineQuant+GPTQ (recipes/affinequant-clip-gptq.yaml)
    "clip search+LWC": ["--clip_search", "--lwc"],
    "AffineQuant+clip search+GPTQ": ["--lwc", "--let", "--use_ln_matrix", "--clip_search", "--gptq", "--act_order",
                                     "--percdamp", "0.01"],
    # the reference code's conventions (--reference_compat: its LET init, shifts after RMSNorm, per-channel q/k
    # scale, truncation, quantizer range, float16 model) against this tool's defaults, on the same budget
    "LWC (reference conventions)": ["--lwc", "--reference_compat"],
    "AffineQuant (reference conventions)": ["--lwc", "--let", "--use_ln_matrix", "--reference_compat"],
    # TesseraQ's progressive adaptive rounding as the rounder, alone, after the clipping search, and after
    # AffineQuant's transforms and LWC; its steps per block (8 rounds x par_steps/8 iterations, one sample each)
    # equal AutoRound's iters in this bench (run_one adds them from the budget)
    "TesseraQ": ["--tesseraq"],
    "clip search+TesseraQ": ["--clip_search", "--tesseraq"],
    "AffineQuant+TesseraQ": ["--lwc", "--let", "--use_ln_matrix", "--tesseraq"],
    # LRQuant's and ABQ-LLM's block objectives on OmniQuant's LWC+LET (the "LWC+LET" row is MSE): negative log
    # cosine 1:1 with MSE, and the distribution correction (MSE and NLC against the FP-chain output and the FP block
    # on the quantized input, plus the symmetric KL of the attention maps)
    "LWC+LET (MSE+NLC)": ["--lwc", "--let", "--loss", "mse+nlc"],
    "LWC+LET (DC)": ["--lwc", "--let", "--loss", "dc"],
    # LRQuant as its code runs (log-activation LET init, MSE+NLC), and ABQ-LLM's rank-1 down_proj compensation
    "LRQuant (log init; MSE+NLC)": ["--lwc", "--let", "--let_init", "log", "--loss", "mse+nlc"],
    "LWC+LET (DC) +compensation": ["--lwc", "--let", "--loss", "dc", "--compensation"],
    # LRQuant's test-time adaptation of the last block on the evaluation windows (transductive: it sees the text
    # it is evaluated on), on the finished run named in TTA_BASE (its checkpoint: nothing is recalibrated)
    "LWC+LET (MSE+NLC) +TTA": ["--lwc", "--let", "--loss", "mse+nlc", "--tta"],
    "LWC+LET +TTA": ["--lwc", "--let", "--tta"],
    "LWC+LET (MSE+NLC) +TTA fp_block": ["--lwc", "--let", "--loss", "mse+nlc", "--tta", "--tta_target", "fp_block"],
    # FlatQuant: Kronecker transforms + LAC + LWC trained on FP inputs (as its code), with RTN or GPTQ weights; the
    # same on the quantized trajectory; and its transforms at their start (random Kronecker rotation after the
    # smoothing scale), untrained
    "FlatQuant": ["--flatquant", "--train_inputs", "fp"],
    "FlatQuant+GPTQ": ["--flatquant", "--train_inputs", "fp", "--gptq", "--act_order", "--percdamp", "0.01"],
    "FlatQuant (quantized inputs)": ["--flatquant"],
    "FlatQuant (untrained)": ["--flatquant"],
    "FlatQuant@15 epochs": ["--flatquant", "--train_inputs", "fp", "--epochs", "15"],   # FlatQuant's epochs
    # end-to-end refinement of the step sizes after the block loop (issue 33, docs/refine.md): on round-to-nearest,
    # on the clipping search + TesseraQ, and the bench's best recipes as files (recipes/best-w{bits}g128.yaml, run_one
    # fills in the bits), also under mixed precision at 2.5 bits per weight (setting W2.5mix)
    "RTN+E2E@16": ["--e2e_steps", "16"],
    "clip search+TesseraQ+E2E@32": ["--clip_search", "--tesseraq", "--e2e_steps", "32", "--e2e_lr", "5e-3"],
    "clip search+TesseraQ+E2E@16": ["--clip_search", "--tesseraq", "--e2e_steps", "16", "--e2e_lr", "5e-3"],
    "best recipe": ["--recipe", "recipes/best-w{bits}g128.yaml"],
    "best-w2g128 recipe": ["--recipe", "recipes/best-w2g128.yaml"],
    # calibration budget curves (bench/calibration_budget.py): more samples (the method's flags override the
    # budget's --nsamples), more E2E steps on the best recipe's blocks (its checkpoint, RESUME_BASE), and E2E with
    # the norms' gains trained too
    "clip search+GPTQ@32 samples": ["--clip_search", "--gptq", "--act_order", "--percdamp", "0.01", "--nsamples", "32"],
    "clip search+GPTQ@128 samples": ["--clip_search", "--gptq", "--act_order", "--percdamp", "0.01", "--nsamples",
                                     "128"],
    "best recipe@32 samples": ["--recipe", "recipes/best-w{bits}g128.yaml", "--nsamples", "32"],
    "best recipe@128 samples": ["--recipe", "recipes/best-w{bits}g128.yaml", "--nsamples", "128"],
    "clip search+TesseraQ+E2E@128": ["--clip_search", "--tesseraq", "--e2e_steps", "128", "--e2e_lr", "5e-3"],
    "clip search+TesseraQ+E2E@64+norms": ["--clip_search", "--tesseraq", "--e2e_steps", "64", "--e2e_lr", "5e-3",
                                          "--e2e_norms"],
    "best recipe@32 samples+E2E@128": ["--clip_search", "--tesseraq", "--e2e_steps", "128", "--e2e_lr", "5e-3",
                                       "--nsamples", "32"],
    # the tools users would pick instead (bench/peers.py, each in its own environment)
    "GPTQModel GPTQ": [],
    "AutoRound": [],
    "AutoRound@48 steps": [],       # twice the steps: about the wall time of AffineQuant+TesseraQ (SmolLM2 W3)
    "AutoRound@100 steps": [],
    "AutoRound@200 steps": [],      # AutoRound's default steps per block
}
TTA_BASE = {"LWC+LET (MSE+NLC) +TTA": "LWC+LET (MSE+NLC)", "LWC+LET +TTA": "LWC+LET",
            "LWC+LET (MSE+NLC) +TTA fp_block": "LWC+LET (MSE+NLC)"}
# rows that start from another finished row's checkpoint: TTA adapts it at evaluation; a longer E2E refines its
# blocks again (the block checkpoint ignores the whole-model stages, so its blocks are reused as they are)
RESUME_BASE = {**TTA_BASE, "clip search+TesseraQ+E2E@128": "best recipe",
               "clip search+TesseraQ+E2E@64+norms": "best recipe",
               "best recipe@32 samples+E2E@128": "best recipe@32 samples"}
TRAINLESS = {"RTN", "FlatQuant (untrained)", "clip search", "GPTQ", "GPTQ@damp0.05", "GPTQ@damp0.1",
             "GPTQ (GPTQ's defaults)", "GPTQ (defaults)", "clip search+GPTQ", "TesseraQ", "clip search+TesseraQ",
             "RTN+E2E@16", "clip search+TesseraQ+E2E@32", "clip search+TesseraQ+E2E@16", "best recipe", "best-w2g128 recipe", "clip search+GPTQ@32 samples",
             "clip search+GPTQ@128 samples", "best recipe@32 samples", "best recipe@128 samples",
             "clip search+TesseraQ+E2E@128", "clip search+TesseraQ+E2E@64+norms", "best recipe@32 samples+E2E@128"}
PAR_ROUNDS = 8
# The acceptance comparisons first (OmniQuant's, then AffineQuant's), so a cut-short bench still answers them.
OMNI_ACCEPTANCE = [("W3A16g128", "RTN"), ("W3A16g128", "LWC"), ("W4A4", "RTN"), ("W4A4", "LWC+LET"),
                   ("W2A16g128", "RTN"), ("W2A16g128", "LWC")]
AFFINE_ACCEPTANCE = [("W3A16g128", "AffineQuant"), ("W4A4", "AffineQuant+qk"), ("W2A16g128", "AffineQuant")]
RECIPES = [("W4A4", "LWC+LET@W4A4-recipe")]
# The stages issue's rows: GPTQ and the clipping search alone, together, and after AffineQuant
STAGE_ROWS = [(s, m) for s in ("W3A16g128", "W2A16g128") for m in ("GPTQ", "clip search", "clip search+GPTQ",
                                                                    "AffineQuant+GPTQ")]
REST = [("W4A16g128", "RTN"), ("W4A16g128", "LWC"), ("W4A4", "LWC"), ("W4A16g128", "LWC+LET"),
        ("W3A16g128", "LWC+LET"), ("W2A16g128", "LWC+LET")]

# What the table cannot say by itself (rows run under older code, results of superseded runs)
NOTES = ("Qwen W4A4 is evaluated on 40 windows: on 10, the spread between windows (a few tokens per window that "
         "the quantized model turns into spurious attention sinks) hid differences of 15%. 'NLL vs RTN, paired' is "
         "the mean per-window NLL difference to RTN on the same windows, ± its standard error. Runs finished "
         "before the window count changed were re-evaluated from their checkpoints (the same model; the calibration "
         "figures are the original run's). The LET rows at W4A4 start the q<->k scale from q/k statistics; the "
         "AffineQuant+qk rows start their q/k transform at the identity, as the reference does. That start "
         "(--qk_init stats) is model-dependent: SmolLM2 W4A4 with the q<->k scale at 1 (--qk_init ones) gives "
         "661.90 (KL 2.9740) with LWC+LET and 462.65 (KL 2.5961) with the W4A4 recipe; Qwen W4A4 on 40 windows gives "
         "705.28 (KL 3.1879) and 616.43 (KL 3.0242). Superseded Qwen W4A4 "
         "LWC+LET runs with the q<->k scale starting at 1 (10 windows, RTN 702.36): OmniQuant's MSE 899.17, "
         "--loss token_rel 817.20, lwc_lr 1e-2 803.68, with 8 samples 844.24. "
         "GPTQ rows use --act_order (static groups); on 12 SmolLM2 W3 windows GPTQ in natural column order gave 171 "
         "(static grids) and 185 (GPTQ's original dynamic grids) against RTN 167 and act-order 122. The GPTQModel "
         "GPTQ (gptqmodel 7.7.0, its defaults: damp 0.05, group-aware act reorder, desc_act off) and AutoRound "
         "(auto-round 0.16.1 at batch 1: on SmolLM2 24 steps per block, as many as our 8 x 3 training steps; on Qwen "
         "16, twice our 4 x 2, far below its default 200, which is where it lost to RTN) rows quantize "
         "asymmetrically on the same token ids (bench/peers.py), each in its own environment; their seconds are "
         "their own wall time for the whole model divided by the block count, peak RSS their own process's. "
         "The rows of this session ran up to four processes of one thread each on the 2 cores: compare seconds only "
         "between rows run side by side. GPTQ@64 samples is GPTQ with 8x the calibration tokens (64 x 512), the "
         "check that GPTQ is data-starved at W2 with 8 samples. The '(reference conventions)' rows run with "
         "--reference_compat (docs/reference-compat.md: the reference code's LET initialisation and shifts, per-channel "
         "q<->k scale, truncate_number, quantizer range and float16 model) on the same budget as the rows without it. "
         "TesseraQ rows: 8 of the reference's 20 hardening rounds x 3 (SmolLM2) or 2 (Qwen) Adam steps on one sample, "
         "as many steps per block as AutoRound's iters here, at lr 1e-2 (the reference's 1e-3 barely moves the "
         "rounding in so few steps); the reference's budget is 20 rounds x 250 steps x 4 samples. AutoRound@48 steps "
         "is AutoRound with twice its bench steps, about the wall time per block of AffineQuant+TesseraQ. '(MSE+NLC)' and '(DC)' rows are LWC+LET under LRQuant's and "
         "ABQ-LLM's objectives (--loss mse+nlc, --loss dc); '+compensation' adds ABQ-LLM's rank-1 down_proj term. '+TTA' "
         "rows are their base row's checkpoint with LRQuant's test-time adaptation of the last block on the evaluated "
         "windows (transductive; 5 epochs): their seconds are the adaptation per adapted block, their calibration is the "
         "base row's. W2* is ABQ-LLM's bit balance, 5 levels (2.32 bits of information), not INT2. "
         "W4A4 (q, k, v at 4) quantizes attention's inputs as OmniQuant does; W4A4KV16 leaves them in full precision "
         "(the OmniQuant/AffineQuant/ABQ-LLM tables); W4A4KV4 quantizes k and v, q at 16 (FlatQuant, QuaRot). "
         "FlatQuant rows train on FP inputs (--train_inputs fp) with its learning rates and cosine schedule on this "
         "bench's epochs, except '@15 epochs' (its own); '(quantized inputs)' trains on the quantized trajectory; "
         "'(untrained)' is its start (random Kronecker rotations after SmoothQuant-style scales, alpha 0.3). Its KV4 "
         "rows start the k-cache transform at the rotation or the identity by block loss (docs/flatquant.md). "
         "'+E2E@N' rows refine the step sizes of the whole model end to end after the block loop for N steps of one "
         "sample (codes frozen, KL to the FP model; docs/refine.md); their s/block includes the refinement, spread over "
         "the blocks. 'best recipe' rows run recipes/best-w3g128.yaml or best-w2g128.yaml as files (clip search, "
         "TesseraQ, E2E@64). W2.5mix is mixed precision at 2.5 bits per weight (each linear at 2, 3 or 4 bits by a "
         "Fisher-weighted sensitivity; codes, scales and zero points counted), against W2 g128's 2.14 and W3's 3.15. "
         "'E2E@128' and '+norms' rows refine the best recipe's blocks again (its checkpoint): their s/block is their "
         "refinement alone, spread over the blocks. The SmolLM2 W3 best-recipe row is its rerun of 2026-12-07 (61.82; the "
         "row before it, 63.49, had its blocks from a --resume of another run). '@N samples' rows calibrate on N samples "
         "of 512 from the same C4 file and seed.")


def budget(args, model: str, setting: str) -> dict:
    """The budget of one model and setting: the global flags, overridden by --model_overrides, first
    those for the model, then those for the model at that setting
    ("qwen2.5-coder-0.5b:nsamples=4,epochs=2,windows=10;qwen2.5-coder-0.5b/W4A4:windows=40")."""
    out = {"nsamples": args.nsamples, "epochs": args.epochs, "windows": args.windows, "par_steps": args.par_steps}
    specs = [spec.partition(":") for spec in filter(None, args.model_overrides.split(";"))]
    for key in (model, f"{model}/{setting}"):
        for name, _, kvs in specs:
            if name == key:
                out.update({k: int(v) for k, v in (kv.split("=") for kv in kvs.split(","))})
    return out


def budget_flags(args, model: str, setting: str) -> list[str]:
    b = budget(args, model, setting)
    return ["--nsamples", str(b["nsamples"]), "--seqlen", str(args.seqlen), "--calib_dataset", args.calib_dataset,
            "--eval_ppl", "--ppl_datasets", "wikitext2", "--limit", str(b["windows"]),
            "--lwc_lr", str(args.lwc_lr), "--let_lr", str(args.let_lr)]


THREADS = None     # --threads: torch threads of each run (two runs side by side: 1 each)


def _main_py(out: Path, flags: list[str], label: str, log_path: str) -> None:
    cmd = [sys.executable, str(ROOT / "main.py"), "--output_dir", str(out), *flags]
    print(f"[bench] {label}: {' '.join(cmd[1:])}", flush=True)
    t0 = time.time()
    out.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **({"OMP_NUM_THREADS": str(THREADS)} if THREADS else {})}
    with open(log_path, "w") as log:
        subprocess.run(cmd, check=True, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    print(f"[bench]   done in {time.time() - t0:.0f}s", flush=True)


def run_main(out: Path, flags: list[str], label: str) -> dict:
    """main.py with `flags` in its own process, writing into `out` (its log beside it, as out.log);
    skipped when out/results.json already exists. Returns the results."""
    if not (out / "results.json").is_file():
        _main_py(out, flags, label, f"{out}.log")
    return json.loads((out / "results.json").read_text())


def reevaluate(out: Path, flags: list[str], label: str, windows: int) -> None:
    """A finished run whose perplexity covers another number of windows than the budget now asks
    for: evaluate it again without recalibrating. main.py --resume on the run's own checkpoint
    rebuilds the same model from the stored parameters (tests/test_resume.py); the calibration
    figures (seconds, memory, block losses) stay those of the original run."""
    old = json.loads((out / "results.json").read_text())
    if old["ppl"]["wikitext2"]["windows"] == windows:
        return
    checkpoint = out / "checkpoint"
    if old["config"]["epochs"] > 0 and not (checkpoint / "manifest.json").is_file():
        raise SystemExit(f"{out}: evaluated on {old['ppl']['wikitext2']['windows']} windows, the budget asks for "
                         f"{windows}, and there is no checkpoint to rebuild it from: delete {out} to rerun it")
    tmp = out.with_name(out.name + ".reeval")
    resume = ["--resume", str(checkpoint)] if old["config"]["epochs"] > 0 else []
    _main_py(tmp, [*flags, *resume], f"{label} (re-evaluated on {windows} windows)", f"{out}.reeval.log")
    new = json.loads((tmp / "results.json").read_text())
    for key in ("calibration_seconds", "seconds_per_block", "calibration_peak_memory_mib", "blocks"):
        new[key] = old[key]
    new["reevaluated"] = {"from_windows": old["ppl"]["wikitext2"]["windows"], "old_ppl": old["ppl"]}
    (out / f"results.{old['ppl']['wikitext2']['windows']}windows.json").write_text(json.dumps(old, indent=2))
    (out / "results.json").write_text(json.dumps(new, indent=2))
    shutil.rmtree(tmp)


def run_one(args, model: str, setting: str, method: str) -> dict:
    b = budget(args, model, setting)
    epochs = ["--epochs", "0"] if method in TRAINLESS else ["--epochs", str(b["epochs"])]
    flags = ["--model", str(Path(args.model_dir) / f"{model}.gguf"), *SETTINGS[setting], *epochs,
             *budget_flags(args, model, setting),
             *[f.format(bits=SETTINGS[setting][SETTINGS[setting].index("--wbits") + 1]) for f in METHODS[method]]]
    if "--tesseraq" in METHODS[method]:
        flags += ["--par_rounds", str(PAR_ROUNDS), "--par_iters", str(max(1, b["par_steps"] // PAR_ROUNDS)),
                  "--par_batch", "1", "--par_lr", str(args.par_lr)]
    if args.data_dir:
        flags += ["--data_dir", args.data_dir]
    out, label = OUT / f"{model}__{setting}__{method}", f"{model} {setting} {method}"
    if method in RESUME_BASE and not (out / "results.json").is_file():
        base = OUT / f"{model}__{setting}__{RESUME_BASE[method]}"
        if not (base / "checkpoint" / "manifest.json").is_file():
            run_one(args, model, setting, RESUME_BASE[method])
        shutil.rmtree(out / "checkpoint", ignore_errors=True)
        shutil.copytree(base / "checkpoint", out / "checkpoint")     # the same calibrated blocks
        flags += ["--resume", str(out / "checkpoint")]
    if (out / "results.json").is_file():
        reevaluate(out, flags, label, b["windows"])
    return run_main(out, flags, label)


def quality_runs():
    """(model, setting, method, results) of every finished quality run (not the zero-shot runs)."""
    for path in sorted(OUT.glob("*/results.json")):
        if not path.parent.name.startswith("zeroshot__") and not path.parent.name.endswith(".reeval"):
            model, setting, method = path.parent.name.split("__")
            yield model, setting, method, json.loads(path.read_text())


def collect() -> list[dict]:
    """Every finished run's row: those in bench/out, and the committed bench/results.json's rows of runs
    whose folders are not here (bench/out is not committed: a fresh checkout keeps its table)."""
    rows = []
    for model, setting, method, res in quality_runs():
        w = res["ppl_tta"]["wikitext2"] if method in TTA_BASE else res["ppl"]["wikitext2"]
        # a TTA row's seconds: its adaptation per adapted block (its calibration is its base row's)
        sec = (w["tta"]["seconds"] / len(w["tta"]["blocks"]) if method in TTA_BASE else res["seconds_per_block"])
        if res.get("refinement"):       # the whole-model stages' time too, spread over the blocks
            sec = res["calibration_seconds"] / len(res["blocks"])
        rows.append(dict(model=model, setting=setting, method=method, ppl=w["ppl"], fp_ppl=w["fp_ppl"], kl=w["kl"],
                         top1=w["top1_agreement"], windows=w["windows"], seqlen=w["seqlen"],
                         sec_per_block=sec, eval_seconds=w["seconds"], peak_mib=res["calibration_peak_memory_mib"],
                         calibration=res["calibration"], epochs=res["config"]["epochs"],
                         nsamples=res["config"]["nsamples"], window_nll=w.get("window_nll"),
                         calibration_seconds=res["calibration_seconds"],
                         refinement_seconds=sum(r.get("seconds", 0.0) for r in (res.get("refinement") or {}).values()),
                         blocks_restored=res.get("blocks_restored", 0)))
    here = {(r["model"], r["setting"], r["method"]) for r in rows}
    committed = ROOT / "bench" / "results.json"
    if committed.is_file():
        rows += [r for r in json.loads(committed.read_text()) if (r["model"], r["setting"], r["method"]) not in here]
    return rows


def paired_vs_rtn(row: dict, rows: list[dict]) -> str:
    """Mean per-window NLL difference to RTN on the same windows, ± its standard error: windows vary
    far more than methods do (a few tokens the quantized model turns into spurious sinks), so a
    paired difference says whether a gap is more than the choice of windows."""
    rtn = next((r for r in rows if (r["model"], r["setting"], r["method"]) == (row["model"], row["setting"], "RTN")),
               None)
    if row["method"] == "RTN" or not rtn or not row["window_nll"] or not rtn["window_nll"] \
            or len(row["window_nll"]) != len(rtn["window_nll"]):
        return "–"
    diff = [a - b for a, b in zip(row["window_nll"], rtn["window_nll"])]
    n = len(diff)
    mean = sum(diff) / n
    se = (sum((d - mean) ** 2 for d in diff) / (n - 1) / n) ** 0.5 if n > 1 else float("nan")
    return f"{mean:+.3f} ± {se:.3f}"


def setting_label(setting: str) -> str:
    """W2* (bit balance: 5 levels) names its information content: never read as INT2."""
    if setting == "W4A4":
        return "W4A4 (q, k, v at 4)"
    return f"{setting} ({math.log2(5):.2f} bits)" if "*" in setting else setting


def write_tables(rows: list[dict], header: str) -> None:
    (ROOT / "bench" / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = [header, "",
             "| model | setting | method | samples x epochs | wikitext2 ppl (windows) | NLL vs RTN, paired | KL vs FP | "
             "top-1 agree | calib s/block | eval s | peak RSS MiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    order = {m: i for i, m in enumerate(METHODS)}
    settings = list(SETTINGS)
    seen_fp = set()
    for r in sorted(rows, key=lambda r: (r["model"], settings.index(r["setting"]), order.get(r["method"], len(order)))):
        if (r["model"], r["windows"]) not in seen_fp:      # the FP reference on each set of windows
            seen_fp.add((r["model"], r["windows"]))
            lines.append(f"| {r['model']} | FP (GGUF-dequantized) | – | – | {r['fp_ppl']:.2f} ({r['windows']}) | – | 0 "
                         f"| 1 | – | – | – |")
        lines.append(f"| {r['model']} | {setting_label(r['setting'])} | {r['method']} | {r['nsamples']} x {r['epochs']} | "
                     f"{r['ppl']:.2f} ({r['windows']}) | {paired_vs_rtn(r, rows)} | "
                     f"{r['kl']:.4f} | {r['top1']:.3f} | {r['sec_per_block']:.1f} | {r['eval_seconds']:.0f} | "
                     f"{r['peak_mib']:.0f} |")
    (ROOT / "bench" / "RESULTS.md").write_text("\n".join(lines) + "\n")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="smollm2-135m,qwen2.5-coder-0.5b")
    p.add_argument("--model_dir", default=str(ROOT / "models"), help="folder of <model>.gguf (../shared/models/fetch.sh)")
    p.add_argument("--data_dir", default=None)
    p.add_argument("--calib_dataset", default="c4")
    p.add_argument("--nsamples", type=int, default=8)
    p.add_argument("--model_overrides",
                   default="qwen2.5-coder-0.5b:nsamples=4,epochs=2,windows=10,par_steps=16;"
                           "qwen2.5-coder-0.5b/W4A4:windows=40;qwen2.5-coder-0.5b/W4A4KV16:windows=40;"
                           "qwen2.5-coder-0.5b/W4A4KV4:windows=40",
                   help="budget overrides per model or model/setting (CPU time): "
                        "'model:nsamples=N,epochs=E,windows=W;model/SETTING:windows=W;...'")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lwc_lr", type=float, default=5e-2)
    p.add_argument("--let_lr", type=float, default=5e-3)
    p.add_argument("--windows", type=int, default=20)
    p.add_argument("--par_steps", type=int, default=24,
                   help="TesseraQ steps per block (AutoRound's iters in this bench: 24 on SmolLM2, 16 on Qwen)")
    p.add_argument("--par_lr", type=float, default=1e-2,
                   help="TesseraQ's learning rate: the reference's 1e-3 barely moves the rounding in this bench's few "
                        "steps (SmolLM2 W3 blocks 0-3, 24 steps: block 3 output MSE RTN 1.63, lr 1e-3 1.12, 1e-2 0.51, "
                        "5e-2 1.26)")
    p.add_argument("--full_grid_models", type=int, default=2,
                   help="how many of --models also run the non-acceptance settings (the grid is slow on CPU)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per run (OMP_NUM_THREADS)")
    p.add_argument("--only", default="", help="comma-separated SETTING:METHOD pairs to run (default: all)")
    args = p.parse_args()
    global THREADS
    THREADS = args.threads
    OUT.mkdir(parents=True, exist_ok=True)
    header = (f"Budget: {args.nsamples} calibration samples (per-model overrides: {args.model_overrides or 'none'}) x "
              f"{args.seqlen} tokens ({args.calib_dataset}), "
              f"{args.epochs} epochs, lwc_lr {args.lwc_lr}, let_lr {args.let_lr}; WikiText-2 test perplexity over "
              f"the first {args.windows} windows of {args.seqlen} tokens; KL and top-1 against the FP model on the "
              f"same windows. CPU, 2 cores, float32. The models are dequantized from GGUF, so the FP weights already "
              f"lie on a coarse grid (SmolLM2: Q4_1, group 32). Seconds are wall time on a shared machine: compare "
              f"them within one model's rows only. Eval seconds include the FP reference pass for KL. {NOTES}")
    models = args.models.split(",")
    if args.only:
        queue = [(m, *x.split(":")) for m in models for x in args.only.split(",")]
    else:   # OmniQuant's acceptance comparisons on every model, then AffineQuant's, then the rest of the grid
        queue = [(m, *sm) for m in models for sm in OMNI_ACCEPTANCE]
        queue += [(m, *sm) for m in models for sm in AFFINE_ACCEPTANCE + RECIPES + STAGE_ROWS]
        queue += [(m, *sm) for m in models[: args.full_grid_models] for sm in REST]
    for model, setting, method in queue:
        run_one(args, model, setting, method)
        write_tables(collect(), header)
    write_tables(collect(), header)


if __name__ == "__main__":
    main()
