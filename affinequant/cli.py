"""The command line: AffineQuant's flags (same names, meanings and defaults), then the run."""
from __future__ import annotations

import argparse
import copy
import logging
import time
from pathlib import Path

import torch

from . import distributed
from .adapters import get_adapter
from .calibrate import quantize_blocks
from .checkpoint import CalibrationCheckpoint
from .config import LET_INITS, QK_INITS, ConfigError, QuantConfig
from .data import CALIB_DATASETS, PPL_DATASETS, DataError, calibration_samples, default_data_dir, eval_tokens
from .errors import AffineQuantError, OutputError
from .evaluate import FPReference, eval_windows, perplexity
from .export import check_save_dir, save_quantized
from .modeling import block_linear_shapes, load_config, load_model, model_name, resolve_model_path
from .packing import use_packed_kernel
from .quantizer import KERNELS
from .reference_format import ReferenceParams, ReferenceResume, write_reference_params
from .stats import collect_act_stats
from .trainer import compile_failure
from .transforms import QK_OUTPUT
from .tta import TTA_TARGETS, TTAConfig, adapt, swapped_blocks
from .utils import hub_reachable, load_tensors, memory_report, peak_memory_mb, resolve_device, round_to_half_, \
    save_tensors, seed_everything, setup_logging, tensor_digest, write_json

log = logging.getLogger("affinequant")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="main.py", description="Block-wise post-training quantization "
                                "(OmniQuant LWC/LET, AffineQuant) of Hugging Face causal LMs.")
    a = p.add_argument
    a("--model", default=None, help="hub id, local directory or .gguf file (default: embedded SmolLM2-135M)")
    a("--net", default=None, help="short model name for statistics files (default: basename of --model)")
    a("--output_dir", default="./log/", help="where the log and results JSON go")
    a("--save_dir", default=None, help="save the quantized model here (Hugging Face format)")
    a("--resume", nargs="?", const="", default=None, metavar="DIR|FILE.pth",
      help="continue an interrupted calibration from its checkpoint (default DIR: <output_dir>/checkpoint); "
           "with --epochs 0, rebuild a finished run from its parameters. A FILE.pth of the reference code "
           "(omni_parameters.pth, affine_parameters.pth) is applied with its conventions (--reference_compat); "
           "with --epochs > 0 only the layers it lacks are trained")
    a("--overwrite", action="store_true",
      help="let --save_dir replace a non-empty directory that is not an affinequant export")
    a("--save_params", default=None, metavar="FILE.pth",
      help="also write the learned parameters as a reference parameter file (OmniQuant/AffineQuant format)")
    a("--reference_compat", action="store_true",
      help="reproduce the reference code's conventions: its LET initialisation and shifts, per-channel q/k "
           "scales, truncation, quantizer range, float16 model (docs/reference-compat.md)")
    a("--real_quant", action="store_true", help="pack weights into real low-bit tensors")
    a("--packed_kernel", default="exact", choices=["exact", "int4_cpu", "int8_cpu", "cpu"],
      help="with --real_quant, how packed layers run in evaluation: exact (unpack + matmul, bit-exact against "
           "fake-quant), int4_cpu (torch's int4 CPU kernel for 2/3/4-bit layers with a group size of 32-256), int8_cpu "
           "(torch's int8 CPU kernel for 8-bit layers) or cpu (whichever of the two a layer can run): bfloat16 "
           "activations, several times faster at decode, within 1%% of exact")
    a("--gptq_format", default="auto", choices=["auto", "gptq", "gptq_v2"],
      help="with --real_quant --save_dir: GPTQ checkpoint_format (auto: v1 for symmetric, v2 for asymmetric)")
    a("--calib_dataset", default=None,
      help="wikitext2 | c4 | ptb | generated | a .txt/.jsonl/.parquet file "
           "(default: wikitext2 if reachable, else c4, else model-generated text)")
    a("--data_dir", default=None, help="folder of local data files (also $AFFINEQUANT_DATA)")
    a("--nsamples", type=int, default=128, help="number of calibration samples")
    a("--seqlen", type=int, default=2048, help="tokens per calibration sample and perplexity window")
    a("--batch_size", type=int, default=1, help="calibration batch size")
    a("--seed", type=int, default=2, help="seed for calibration sampling")
    a("--eval_ppl", action="store_true", help="evaluate perplexity")
    a("--ppl_datasets", default="wikitext2,c4", help=f"comma-separated, from {', '.join(PPL_DATASETS)}")
    a("--no_kl", action="store_true", help="skip the KL/top-1 comparison with the full-precision model "
                                           "(it keeps a full-precision copy in memory)")
    a("--kl_reference", default="model", choices=["model", "disk"],
      help="what the KL/top-1 comparison reads: a full-precision copy of the model kept in memory (model), or the FP "
           "model's log-probabilities on the evaluation windows, recorded before quantization into <output_dir>/"
           "fp_reference (disk: windows x seqlen x vocab x 4 bytes, deleted after the evaluation; the same figures, "
           "no second model in memory). --tta keeps the copy anyway")
    a("--tta", action="store_true",
      help="LRQuant's test-time adaptation, done right: for each perplexity set, requantize the last blocks from their "
           "FP weights on that set's unlabelled windows (the quantized model's hidden states as inputs, activation "
           "quantization on) and report the adapted model's perplexity as a separate TTA figure (ppl_tta)")
    a("--tta_blocks", type=int, default=1, help="TTA: how many of the last blocks to adapt (LRQuant: 1)")
    a("--tta_epochs", type=int, default=5, help="TTA: epochs over the evaluation windows (LRQuant: 5)")
    a("--tta_let_lr", type=float, default=None, help="TTA: LET learning rate (default: --let_lr, as LRQuant)")
    a("--tta_lwc_lr", type=float, default=1e-2, help="TTA: LWC learning rate (LRQuant: 1e-2)")
    a("--tta_target", default="fp_chain", choices=TTA_TARGETS,
      help="TTA targets: fp_chain (the FP model's outputs of those blocks on the same text) or fp_block (the FP "
           "block applied to the quantized inputs)")
    a("--tasks", default="", help="lm-eval tasks, comma-separated")
    a("--num_fewshot", type=int, default=None, help="default: 0, and 5 for MMLU (hendrycksTest) as AffineQuant")
    a("--eval_batch_size", type=int, default=8, help="batch size of lm-eval requests")
    a("--limit", type=int, default=-1, help="evaluate only the first N perplexity windows / task examples")
    a("--wbits", type=int, default=4)
    a("--abits", type=int, default=16)
    a("--group_size", type=int, default=None)
    a("--kv_bits", type=int, default=None,
      help="bits of k and v as attention reads them (the KV cache): per token and head, asymmetric, dynamic "
           "(default: --abits; 16: not quantized). Results name them: W4A4KV16, W4A4KV4")
    a("--q_bits", type=int, default=None,
      help="bits of q as attention reads it (default: --kv_bits, as OmniQuant quantizes q, k and v alike; FlatQuant "
           "and QuaRot leave q at 16)")
    a("--symmetric", action="store_true", help="symmetric quantization (default asymmetric)")
    a("--bit_balance", action="store_true",
      help="ABQ-LLM's bit balance: 2-bit asymmetric weights on 5 levels {0..4} (W2*, about 2.32 bits of information; "
           "reported as such, never as INT2; --real_quant stores the codes in 3-bit GPTQ containers)")
    a("--alpha", type=float, default=0.5, help="SmoothQuant migration strength for the LET init")
    a("--let_lr", type=float, default=5e-3)
    a("--lwc_lr", type=float, default=1e-2)
    a("--wd", type=float, default=0.0)
    a("--epochs", type=int, default=None,
      help="training epochs per block; 0 = round-to-nearest (default 0, and FlatQuant's 15 with --flatquant)")
    a("--lwc", action="store_true", help="learnable weight clipping")
    a("--let", action="store_true", help="learnable equivalent transformation")
    a("--aug_loss", action="store_true", help="also match the FP block applied to the quantized input")
    a("--loss", default="mse",
      help="block objective, terms joined by '+' with optional weights: mse (OmniQuant's), nlc (LRQuant's negative "
           "log cosine; LRQuant: mse+nlc), attn_kl (symmetric KL of the attention maps), token_rel, token_cos, or dc "
           "(ABQ-LLM's distribution correction: mse+nlc+attn_kl against two targets). Example: mse+0.5*nlc")
    a("--let_init", default="smoothquant", choices=LET_INITS,
      help="where the LET scales start: smoothquant (max|x|^alpha / max|W|^(1-alpha)) or log (LRQuant: "
           "max|x| / log2(2 + max|x|), no weights, no alpha)")
    a("--qk_init", default="stats", choices=QK_INITS,
      help="where the LET q<->k scale starts: stats (SmoothQuant-style from q/k output statistics) or ones "
           "(OmniQuant)")
    a("--deactive_amp", action="store_true",
      help="train in float32 without autocast (autocast is on for CUDA, and on the CPU with --dtype bfloat16)")
    a("--act-scales", dest="act_scales", default=None, help="default ./act_scales/<net>.pt")
    a("--act-shifts", dest="act_shifts", default=None, help="default ./act_shifts/<net>.pt")
    a("--multigpu", action="store_true")
    a("--use_matrix", action="store_true", help="AffineQuant: per-head q/k matrix")
    a("--use_ln_matrix", action="store_true", help="AffineQuant: matrices after the norms")
    a("--sf", type=float, default=None, help="AffineQuant stability factor of the gradual mask "
                                            "(default: 1e-2 weight-only, 0.1 with activation quantization)")
    a("--recipe", default=None, metavar="FILE",
      help="YAML or JSON list of stages (let, lwc, clip_search, gptq, rtn ...) that replaces the algorithm flags "
           "(--lwc --let --use_ln_matrix --use_matrix --clip_search --gptq)")
    a("--clip_search", action="store_true",
      help="search each weight group's clipping ratio on the calibration inputs before training (alone, "
           "as LWC's start, or before --gptq)")
    a("--compensation", action="store_true",
      help="ABQ-LLM's compensation: learn a rank-1 term a*b^T added to down_proj before quantization in the first 3 "
           "and last 4 blocks, merged into the weight (a recipe sets other blocks: compensation: {first: N, last: M})")
    a("--flatquant", action="store_true",
      help="FlatQuant: a learnable Kronecker-factored transform with a per-channel scale in front of every linear "
           "(online where no weight or norm can absorb it), the k-cache transform, learnable activation clipping, and "
           "LWC; cosine learning rate (docs/flatquant.md)")
    a("--flat_lr", type=float, default=5e-3, help="FlatQuant: learning rate of the transforms (LAC: 10x)")
    a("--direct_inv", action="store_true",
      help="FlatQuant: learn each factor as a free matrix inverted in float64, not through its SVD")
    a("--train_inputs", default="quantized", choices=["quantized", "fp"],
      help="what a block learns on: its inputs on the quantized model (OmniQuant, AffineQuant) or on the FP model "
           "(FlatQuant)")
    a("--gptq", action="store_true", help="round the weights with GPTQ after the transforms (instead of to nearest)")
    a("--percdamp", type=float, default=0.01, help="GPTQ dampening: fraction of the Hessian's mean diagonal")
    a("--act_order", action="store_true", help="GPTQ: columns in descending Hessian-diagonal order (static groups)")
    a("--tesseraq", action="store_true",
      help="round the weights with TesseraQ (progressive adaptive rounding + dequantization-scale tuning) after the "
           "transforms and clipping")
    a("--par_iters", type=int, default=250, help="TesseraQ: Adam steps per round (reference 250)")
    a("--par_batch", type=int, default=4, help="TesseraQ: calibration samples per step (reference 4)")
    a("--par_lr", type=float, default=1e-3, help="TesseraQ: learning rate of the rounding variables")
    a("--par_rounds", type=int, default=20,
      help="TesseraQ: rounds of the hardening schedule, taken evenly from the reference's 20")
    a("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    a("--quant_kernels", default="auto", choices=["auto", "compiled", "eager"],
      help="the fake quantizer's element-wise kernels: compiled by torch.compile into one fused loop each (a C++ "
           "compiler on CPU, Triton on CUDA; about 25 s the first time, cached after), or eager PyTorch; auto: "
           "compiled when training or quantizing activations and the compiler is there. Same values; gradients to float rounding")
    a("--compile_block", action="store_true",
      help="run each block's training steps through torch.compile (inductor: C++ on CPU, Triton on CUDA): 7-17%% "
           "less time per block on CPU where the group size divides the widths, about even where it does not "
           "(docs/step-cost.md), for a one-off build of 10-40 s per process; pays with long budgets. The same "
           "losses to float rounding")
    a("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
      help="model dtype outside calibration (default: float16 on CUDA, float32 on CPU); bfloat16 also makes "
           "calibration autocast in bfloat16, on CUDA and on the CPU")
    a("--trust_remote_code", action="store_true", help="let transformers run the model repository's code")
    a("--cache_dir", default=None, metavar="DIR",
      help="keep the calibration's activation caches (inputs, targets, outputs: nsamples x seqlen x hidden each, in the "
           "autocast dtype) in files in DIR instead of memory, read a batch at a time; deleted as they are replaced")
    a("--stream", action="store_true",
      help="models larger than memory: keep the model as a skeleton on the meta device, read each block from the "
           "checkpoint's safetensors when its turn comes and write it to <output_dir>/blocks when done; the "
           "evaluation and --save_dir walk the blocks the same way, and the KL reference re-reads the FP blocks. "
           "--model: a directory with safetensors (python -m affinequant.convert makes one from a .gguf), or a hub id, "
           "downloaded once the checks pass")
    return p


FLATQUANT_EPOCHS = 15     # FlatQuant's default (its scripts: 15 epochs of 128 x 2048 tokens)


def default_epochs(args) -> int:
    """--epochs, or its default: 0 (round-to-nearest, as AffineQuant), FlatQuant's 15 with --flatquant."""
    if args.epochs is not None:
        return args.epochs
    return FLATQUANT_EPOCHS if args.flatquant else 0


def config_from_args(args) -> QuantConfig:
    from .recipe import load_recipe_file
    return QuantConfig(recipe=load_recipe_file(args.recipe) if args.recipe else None,
                       clip_search=args.clip_search, compensation=args.compensation, gptq=args.gptq, percdamp=args.percdamp, act_order=args.act_order,
                       tesseraq=args.tesseraq, par_iters=args.par_iters, par_batch=args.par_batch, par_lr=args.par_lr,
                       par_rounds=args.par_rounds,
                       wbits=args.wbits, abits=args.abits, group_size=args.group_size, symmetric=args.symmetric,
                       bit_balance=args.bit_balance,
                       lwc=args.lwc, let=args.let, alpha=args.alpha, let_init=args.let_init, let_lr=args.let_lr, lwc_lr=args.lwc_lr,
                       wd=args.wd, epochs=default_epochs(args), nsamples=args.nsamples, batch_size=args.batch_size,
                       seqlen=args.seqlen, aug_loss=args.aug_loss, loss=args.loss, qk_init=args.qk_init,
                       deactive_amp=args.deactive_amp,
                       use_ln_matrix=args.use_ln_matrix, use_matrix=args.use_matrix, sf=args.sf,
                       real_quant=args.real_quant, reference_compat=args.reference_compat,
                       kv_bits=args.kv_bits, q_bits=args.q_bits, flatquant=args.flatquant, flat_lr=args.flat_lr,
                       direct_inv=args.direct_inv, train_inputs=args.train_inputs,
                       seed=args.seed).validate()


def check_group_size(in_features_of: dict[str, tuple[int, int]], group_size: int | None) -> None:
    """`in_features_of`: {linear: (out, in)} of a block (from the configuration alone)."""
    if not group_size:
        return
    in_features = {name: shape[1] for name, shape in in_features_of.items()}
    too_small = {n: f for n, f in in_features.items() if f < group_size}
    if too_small:
        name, f = next(iter(too_small.items()))
        raise ConfigError(f"--group_size {group_size} is larger than {name}'s in_features {f}: "
                          f"use a group size of at most {min(in_features.values())}, or omit --group_size (per channel)")
    ragged = {n: f for n, f in in_features.items() if f % group_size}
    if ragged:
        log.info("group size %d does not divide in_features of %s: as GPTQ does, the last group of each row "
                 "is shorter (column i is in group i // %d)",
                 group_size, ", ".join(f"{n} ({f})" for n, f in ragged.items()), group_size)


def stats_files(args, net: str) -> tuple[Path, Path, bool]:
    """The activation-statistics files: (scales, shifts, whether both exist). A file the user named must
    exist, and so must its partner (never computed and written over a user's file)."""
    scales_path = Path(args.act_scales or f"./act_scales/{net}.pt")
    shifts_path = Path(args.act_shifts or f"./act_shifts/{net}.pt")
    for flag, path, given in (("--act-scales", scales_path, args.act_scales), ("--act-shifts", shifts_path,
                                                                                args.act_shifts)):
        if given and not path.is_file():
            raise ConfigError(f"{flag} {path}: no such file. Generate it with `python generate_act_scale_shift.py "
                              f"--model {args.model or '<model>'}`, or omit {flag} to compute the statistics now")
    if (args.act_scales or args.act_shifts) and not (scales_path.is_file() and shifts_path.is_file()):
        missing, flag = (shifts_path, "--act-shifts") if scales_path.is_file() else (scales_path, "--act-scales")
        raise ConfigError(f"{missing} (the statistics file beside the one given) does not exist: pass {flag} FILE "
                          f"too (generate_act_scale_shift.py writes both)")
    return scales_path, shifts_path, scales_path.is_file() and shifts_path.is_file()


def check_stats(scales, path: Path, hidden_size: int, adapter) -> None:
    """Statistics of this model: block 0's first consumer of a norm, of the hidden size."""
    expected = f"{adapter.layers_path}.0.{adapter.norm_groups[0][1][0]}"
    if not isinstance(scales, dict) or expected not in scales or scales[expected].numel() != hidden_size:
        raise ConfigError(f"{path} does not hold statistics for this model (no '{expected}' of size {hidden_size}): "
                          f"pass --act-scales/--act-shifts files for this model, or delete {path} to compute them")


def load_or_collect_stats(args, model, adapter, samples, device, net: str, blocks=None):
    scales_path, shifts_path, both = stats_files(args, net)
    if both:
        scales = load_tensors(scales_path, "activation scales")
        check_stats(scales, scales_path, model.config.hidden_size, adapter)
        shifts = load_tensors(shifts_path, "activation shifts")
        log.info("LET init from %s and %s", scales_path, shifts_path)
        if not any(k.endswith(QK_OUTPUT) for k in scales) and args.qk_init == "stats":
            log.info("%s has no q/k output statistics (written by the reference code or before they were "
                     "recorded): the q <-> k scales start at 1, as in OmniQuant. Delete it (or rerun "
                     "generate_act_scale_shift.py) for their SmoothQuant-style start", scales_path)
        return scales, shifts
    log.info("activation statistics %s not found: computing them on the calibration set", scales_path)
    scales, shifts = collect_act_stats(model, adapter, samples, device, blocks)   # every rank: all samples, same stats
    if distributed.is_main():
        save_tensors(scales_path, scales)   # default paths only: stats_files refuses a named file that is missing
        save_tensors(shifts_path, shifts)
        log.info("wrote %s and %s", scales_path, shifts_path)
    return scales, shifts


def run(argv=None) -> dict:
    """main.py: every failure the library reports (AffineQuantError) ends as one line on stderr and a
    non-zero exit; argument errors as argparse's usage line and exit 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ConfigError as exc:
        parser.error(str(exc))
    try:
        return _run(parser, args, cfg)
    except AffineQuantError as exc:
        log.error("%s", exc)
        raise SystemExit(f"main.py: error: {exc}") from exc
    except RuntimeError as exc:
        if not distributed.active():
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        msg = (f"rank {distributed.rank()}: a collective with the other ranks failed ({first}): another rank "
               f"stopped. The blocks finished before are checkpointed by rank 0: rerun with --resume")
        log.error("%s", msg)
        raise SystemExit(f"main.py: error: {msg}") from exc
    finally:
        distributed.finish()


def _run(parser, args, cfg: QuantConfig) -> dict:
    check_output_paths(args)
    device = distributed.init(resolve_device(args.device))
    setup_logging(args.output_dir if distributed.is_main() else None)
    if not distributed.is_main():           # rank 0 reports; the others only warn
        log.setLevel(logging.WARNING)
    seed_everything(args.seed)
    # auto compiles where the fake quantizer runs at every step: training, and quantized activations
    kernels = args.quant_kernels
    if kernels == "auto" and (cfg.full_precision or not (cfg.trains or cfg.tesseraq or cfg.abits < 16)):
        kernels = "eager"
    log.info("quantizer kernels: %s", KERNELS.use(kernels))
    if args.multigpu and torch.cuda.device_count() < 2:
        log.warning("--multigpu: %d CUDA device(s) visible, nothing to spread: running on %s",
                    torch.cuda.device_count(), device)
    dtype = {"auto": torch.float16 if device.type == "cuda" else torch.float32, "float32": torch.float32,
             "float16": torch.float16, "bfloat16": torch.bfloat16}[args.dtype]
    data_dir = default_data_dir(args.data_dir)
    log.info("configuration: %s", cfg.to_dict())
    if cfg.bit_balance:
        log.info("%s: 2-bit weights on 5 levels (bit balance), %.2f bits of information per weight, not INT2%s",
                 cfg.setting, cfg.effective_wbits, "; packed in 3-bit containers" if cfg.real_quant else "")
    model_id = resolve_model_path(args.model)
    reference_params = None
    if args.stream:
        try:
            check_stream_source(model_id)
        except ConfigError as exc:
            parser.error(str(exc))
    model_config = load_config(model_id, args.trust_remote_code)
    try:
        adapter = get_adapter(model_config)
        if args.resume and is_reference_file(args.resume):
            # checked against the model's configuration before any weight is loaded
            reference_params, cfg = ReferenceParams.open(args.resume, cfg, model_config, adapter)
        preflight(args, cfg, model_config, adapter, model_id, data_dir)
    except ConfigError as exc:
        parser.error(str(exc))
    if args.stream:
        model, tokenizer, blocks = open_streamed(args, model_id, model_config, adapter, dtype)
    else:
        model, tokenizer, model_id = load_model(model_id, dtype, args.trust_remote_code)
        blocks = None
    net = args.net or model_name(model_id)
    results: dict = {"model": model_id, "net": net, "setting": cfg.setting, "effective_wbits": cfg.effective_wbits,
                     "config": cfg.to_dict(), "recipe": cfg.recipe_data(),
                     "device": str(device)}

    if cfg.full_precision:
        log.info("--wbits 16 --abits 16: nothing to quantize, evaluating the full-precision model")
        reference, stats = None, (None, None)   # KL against itself would be 0
    else:
        reference, stats = quantize(args, cfg, model, adapter, tokenizer, device, dtype, data_dir, net, model_id,
                                    results, reference_params, blocks)
    results["quant_kernels"] = KERNELS.mode         # after calibration: "eager" if compiling failed on the way

    if cfg.real_quant and args.packed_kernel != "exact":
        switched, total = use_packed_kernel(model, args.packed_kernel)
        results["packed_kernel"] = {"kernel": args.packed_kernel, "layers": switched, "packed_layers": total}
        log.info("packed kernel %s on %d of %d packed layers (the others: exact)", args.packed_kernel, switched, total)
    if not distributed.is_main():           # data-parallel: rank 0 evaluates, exports and writes the results
        return results
    if args.eval_ppl:
        tta = None
        if args.tta:
            amp_dtype = torch.bfloat16 if dtype == torch.bfloat16 else torch.float16
            tta = lambda windows: adapt(model, reference, adapter, windows, cfg, tta_config(args), device,  # noqa: E731
                                        amp_dtype, *stats)
        results["ppl"], tta_results = evaluate_ppl(args, model, reference, tokenizer, device, data_dir, cfg.seqlen,
                                                   adapter, tta, blocks)
        if tta_results:
            results["ppl_tta"] = tta_results
    if args.tasks:
        from .tasks import run_tasks
        place_for_eval(model, device, args.multigpu, adapter)
        results["tasks"] = run_tasks(model, tokenizer, args.tasks, args.num_fewshot,
                                     args.limit if args.limit > 0 else None, device, data_dir, args.eval_batch_size)
        model.to("cpu")
    if args.save_dir:
        results["saved"] = {"path": args.save_dir,
                            "format": save_quantized(model, tokenizer, args.save_dir, cfg, model_id, args.gptq_format,
                                                     overwrite=args.overwrite, blocks=blocks)}
    if blocks is not None:
        blocks.store.remove()
    results["peak_memory_mib"] = peak_memory_mb(device)      # the whole run, evaluation included
    write_json(Path(args.output_dir) / "results.json", results)
    log.info("results written to %s", Path(args.output_dir) / "results.json")
    return results


def open_streamed(args, model_id: str, model_config, adapter, dtype):
    """--stream: (skeleton, tokenizer, StreamedModel); no weight is read yet."""
    from transformers import AutoTokenizer
    from .streaming import StreamedModel
    folder = model_id
    if not Path(model_id).is_dir():             # a hub id: its safetensors, config and tokenizer, to the hub cache
        from huggingface_hub import snapshot_download
        log.info("--stream: downloading %s's safetensors from the hub (blocks are then read one at a time)", model_id)
        folder = snapshot_download(model_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt",
                                                             "*.jinja", "tokenizer*"])
    blocks = StreamedModel(folder, model_config, adapter, dtype, Path(args.output_dir) / "blocks",
                           writer=distributed.is_main())
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=args.trust_remote_code)
    log.info("--stream: %s as a skeleton; its %d blocks are read from %s one at a time and written to %s when done",
             type(blocks.model).__name__, len(blocks), model_id, blocks.store.folder)
    return blocks.model, tokenizer, blocks


def check_stream_source(model_id: str) -> None:
    """--stream's model: a local directory with safetensors (checked before anything reads the model)."""
    from .streaming import TensorFiles
    if Path(model_id).suffix == ".gguf":
        raise ConfigError(f"--stream reads blocks from safetensors, and {model_id} is a GGUF file: convert it once "
                          f"(python -m affinequant.convert {model_id} DIR) and pass --model DIR")
    if not Path(model_id).is_dir():
        if Path(model_id).exists() or not hub_reachable():
            raise ConfigError(f"--stream reads blocks from a local checkpoint, and {model_id} is not a directory "
                              f"(and the hub is not reachable to download it): download the model (huggingface-cli "
                              f"download {model_id} --local-dir DIR) and pass --model DIR")
        return                  # a hub id: downloaded once every check has passed (open_streamed)
    try:
        TensorFiles.of_checkpoint(model_id)
    except AffineQuantError as exc:
        raise ConfigError(str(exc)) from exc


def check_stream(args, cfg: QuantConfig, adapter) -> None:
    """What --stream can do: everything that walks the model block by block."""
    refused = [(args.tasks, "--tasks (lm-eval needs the whole model: evaluate the --save_dir export)"),
               (args.tta, "--tta"), (args.multigpu, "--multigpu"),
               (cfg.reference_compat, "--reference_compat (the reference's float16 model)"),
               (args.calib_dataset == "generated", "--calib_dataset generated (it samples from the whole model)"),
               (cfg.full_precision, "--wbits 16 --abits 16 (nothing to stream)"),
               (args.packed_kernel != "exact", f"--packed_kernel {args.packed_kernel} (evaluate the --save_dir export "
                                               f"with it)"),
               (adapter.experts, "a mixture-of-experts model (its checkpoint stores each expert apart, and "
                                 "transformers fuses them only when it loads the whole model)")]
    for given, what in refused:
        if given:
            raise ConfigError(f"--stream does not go with {what}: drop one of them")


def check_cache_dir(folder: str, cfg: QuantConfig, model_config, dtype_bytes: int) -> None:
    """--cache_dir: a writable directory with room for the caches (four of nsamples x seqlen x hidden at most)."""
    import shutil
    path = Path(folder)
    make_directory(path, "--cache_dir", "the activation caches", ConfigError)
    need = 4 * cfg.nsamples * cfg.seqlen * model_config.hidden_size * dtype_bytes
    free = shutil.disk_usage(path).free
    if need > free:
        raise ConfigError(f"--cache_dir {folder}: the activation caches need up to {need / 2**30:.1f} GiB and "
                          f"{free / 2**30:.1f} GiB are free: free space, choose another directory, or lower --nsamples")


def make_directory(path: Path, flag: str, what: str, error: type) -> None:
    """Create `path` (a directory given by `flag` for `what`), or raise `error` saying why it cannot be one."""
    if path.exists() and not path.is_dir():
        raise error(f"{flag} {path} is a file: give a directory for {what}")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise error(f"{flag} {path} cannot be created ({exc.strerror}): give a writable directory") from exc


def check_output_paths(args) -> None:
    """Where results and exports go, before anything is written there."""
    make_directory(Path(args.output_dir), "--output_dir", "the log and results.json", OutputError)
    if args.save_dir:
        check_save_dir(args.save_dir, args.overwrite)
    if args.save_params and Path(args.save_params).is_dir():
        raise OutputError(f"--save_params {args.save_params} is a directory: give a file name (FILE.pth)")


def preflight(args, cfg: QuantConfig, model_config, adapter, model_id: str, data_dir) -> None:
    """Every check that needs no weights, so a mistake costs seconds, not a model load and a calibration."""
    if cfg.full_precision and (not (args.eval_ppl or args.tasks) or args.save_dir or args.save_params):
        raise ConfigError("--wbits 16 --abits 16 quantizes nothing: it only evaluates the full-precision model, so "
                          "give --eval_ppl or --tasks (and no --save_dir/--save_params), or lower --wbits or --abits")
    if args.limit == 0 or args.limit < -1:
        raise ConfigError(f"--limit {args.limit}: give a positive number of windows / examples, or omit --limit "
                          f"to evaluate all of them")
    context = getattr(model_config, "max_position_embeddings", None)
    if context and cfg.seqlen > context:
        raise ConfigError(f"--seqlen {cfg.seqlen} is longer than the model's context ({context} positions): use "
                          f"--seqlen {context} or less")
    if args.eval_ppl:
        names = [d.strip() for d in args.ppl_datasets.split(",") if d.strip()]
        unknown = [n for n in names if n not in PPL_DATASETS]
        if unknown or not names:
            raise ConfigError(f"--ppl_datasets {args.ppl_datasets}: {', '.join(unknown) or 'empty'} is not a "
                              f"perplexity set; use one or more of {', '.join(PPL_DATASETS)}")
    if args.tasks:
        from .tasks import check_tasks
        check_tasks(args.tasks, data_dir)
    if args.tta:
        if not args.eval_ppl or cfg.full_precision:
            raise ConfigError("--tta adapts the last blocks for the perplexity evaluation of a quantized model: add "
                              "--eval_ppl (and quantize), or drop --tta")
        tta_config(args).check(cfg, model_config.num_hidden_layers)
    if args.stream:
        check_stream(args, cfg, adapter)
    if args.cache_dir:
        check_cache_dir(args.cache_dir, cfg, model_config, dtype_bytes=2 if args.dtype == "bfloat16" else 4)
    if cfg.full_precision:
        return
    if distributed.active():
        from .calibrate import check_data_parallel
        check_data_parallel(cfg)
    check_group_size(block_linear_shapes(model_config, adapter)[0], cfg.group_size)
    calib = args.calib_dataset
    if calib and (Path(calib).suffix in (".txt", ".jsonl", ".json", ".parquet", ".gz") or "/" in calib) \
            and not Path(calib).is_file():
        raise ConfigError(f"--calib_dataset {calib}: no such file; give a .txt/.jsonl/.parquet file or one of "
                          f"{', '.join(CALIB_DATASETS)}")
    if calib and Path(calib).is_file() and not "".join(Path(calib).suffixes).endswith((".parquet", ".gz")):
        with open(calib, "rb") as f:
            head = f.read(1 << 16)
        try:
            head.decode("utf-8")
        except UnicodeDecodeError as exc:
            if exc.start < len(head) - 4:       # not just a multi-byte character cut at the end of the sample
                raise ConfigError(f"--calib_dataset {calib} is not UTF-8 text (a binary file?): give a .txt, a .jsonl "
                                  f"with a \"text\" field per line, or a .parquet with a \"text\" column") from exc
    if cfg.needs_statistics:      # small files: read now, before the model loads
        scales_path, _, both = stats_files(args, args.net or model_name(model_id))
        if both:
            check_stats(load_tensors(scales_path, "activation scales"), scales_path, model_config.hidden_size, adapter)
    if args.resume is not None and not is_reference_file(args.resume):
        CalibrationCheckpoint.verify(args.resume or Path(args.output_dir) / "checkpoint", cfg, model_id,
                                     model_config.num_hidden_layers)


def tta_config(args) -> TTAConfig:
    return TTAConfig(blocks=args.tta_blocks, epochs=args.tta_epochs, let_lr=args.tta_let_lr, lwc_lr=args.tta_lwc_lr,
                     target=args.tta_target)


def is_reference_file(resume: str) -> bool:
    """--resume names a parameter file of the reference code rather than our checkpoint directory."""
    path = Path(resume)
    return path.suffix in (".pth", ".pt", ".bin") or path.is_file()


def quantize(args, cfg, model, adapter, tokenizer, device, dtype, data_dir, net, model_id, results,
             reference_params=None, blocks=None) -> tuple[torch.nn.Module | None, tuple]:
    """Calibrate and quantize `model` in place, recording into `results`; returns the reference for KL and TTA:
    an FP copy of the model (None without --eval_ppl, or with --no_kl and no --tta), or with --kl_reference disk
    the FP log-probabilities of each perplexity set ({set: FPReference}), recorded before calibration; and the
    activation statistics (act_scales, act_shifts; None when no stage uses them). `reference_params`: a
    reference parameter file to rebuild blocks from (--resume FILE.pth). `blocks`: --stream's StreamedModel (the
    KL reference is then its FP blocks, re-read at evaluation: None here)."""
    samples, calib_source = calibration_samples(args.calib_dataset, tokenizer, cfg.nsamples, cfg.seqlen,
                                                cfg.seed, data_dir, None if blocks is not None else model)
    results["calibration"] = calib_source
    log.info("calibration: %d x %d tokens from %s", cfg.nsamples, cfg.seqlen, calib_source)

    act_scales = act_shifts = None
    if cfg.needs_statistics:
        act_scales, act_shifts = load_or_collect_stats(args, model, adapter, samples, device, net, blocks)

    if cfg.reference_compat:
        round_to_half_(model)       # the reference holds its model in float16; the FP baseline too
    kl_on_disk = args.eval_ppl and not args.no_kl and not args.tta and args.kl_reference == "disk"
    reference = copy.deepcopy(model) if (args.eval_ppl and (not args.no_kl or args.tta) and not kl_on_disk
                                         and blocks is None) else None
    if kl_on_disk and distributed.is_main() and blocks is None:
        reference = record_fp_reference(args, model, tokenizer, device, data_dir, cfg.seqlen, adapter)
    own_resume = args.resume is not None and reference_params is None
    checkpoint_dir = args.resume if own_resume and args.resume else Path(args.output_dir) / "checkpoint"
    make_checkpoint = lambda writer: CalibrationCheckpoint(  # noqa: E731
        checkpoint_dir, cfg, model_id, calib_source, len(adapter.layers(model)), resume=own_resume,
        data_digest=tensor_digest({"samples": samples}), writer=writer)
    # data-parallel: rank 0 sets the checkpoint up (and writes it); the others read it once it is there
    checkpoint = make_checkpoint(True) if distributed.is_main() else None
    distributed.barrier()
    if checkpoint is None:
        checkpoint = make_checkpoint(False)
    own_checkpoint = checkpoint
    if reference_params is not None:
        checkpoint = ReferenceResume(reference_params, checkpoint)
        results["resumed_from"] = str(reference_params.path)
    t0 = time.time()
    try:
        reports = quantize_blocks(model, adapter, samples, cfg, device, act_scales, act_shifts,
                                  amp_dtype=torch.bfloat16 if dtype == torch.bfloat16 else torch.float16,
                                  checkpoint=checkpoint, blocks=blocks, cache_dir=args.cache_dir,
                                  compile_block=args.compile_block)
    except (torch.OutOfMemoryError, MemoryError) as exc:
        raise SystemExit(f"out of memory during calibration ({type(exc).__name__}). The activation caches hold "
                         f"3-4 copies of nsamples x seqlen x hidden: lower --nsamples ({cfg.nsamples}) or --seqlen "
                         f"({cfg.seqlen}), keep --batch_size 1, drop --aug_loss or --loss dc (one cache less), and on CUDA keep "
                         f"autocast on (no --deactive_amp). Finished blocks are checkpointed: rerun with --resume "
                         f"to continue from them") from exc
    results["calibration_seconds"] = time.time() - t0
    results["compile_block"] = args.compile_block and cfg.trains and compile_failure() is None  # used, not asked
    worked = [r for r in reports if not r.restored]      # a resumed run's replayed blocks cost no training
    results["seconds_per_block"] = sum(r.seconds for r in worked) / max(len(worked), 1)
    results["blocks_restored"] = len(reports) - len(worked)
    results["calibration_peak_memory_mib"] = peak_memory_mb(device)
    results["blocks"] = [r.__dict__ for r in reports]
    if any(r.fell_back_to_rtn for r in reports):
        results["blocks_fell_back_to_rtn"] = [r.index for r in reports if r.fell_back_to_rtn]
    log.info("calibration done in %.1fs (%.2fs per block), %s", results["calibration_seconds"],
             results["seconds_per_block"], memory_report(device))
    if args.save_params and distributed.is_main():
        results["saved_params"] = write_reference_params(args.save_params, own_checkpoint, cfg, model.config, adapter)
    return reference, (act_scales, act_shifts)


def _eval_sets(args, tokenizer, seqlen, data_dir):
    """(name, windows, source) of every perplexity set that can be read; the others are reported by evaluate_ppl."""
    for name, tokens, source in _ppl_sets(args, tokenizer, seqlen, data_dir):
        yield name, eval_windows(tokens, seqlen, args.limit if args.limit > 0 else None), source


def record_fp_reference(args, model, tokenizer, device, data_dir, seqlen, adapter) -> dict[str, FPReference]:
    """--kl_reference disk: the FP model's log-probabilities on every evaluation window, recorded before
    quantization, so that no copy of the model is kept for the KL comparison. Checks the disk space first."""
    import shutil
    folder = Path(args.output_dir) / "fp_reference"
    folder.mkdir(parents=True, exist_ok=True)
    sets = list(_eval_sets(args, tokenizer, seqlen, data_dir))
    vocab = model.get_output_embeddings().weight.shape[0]
    need = sum(FPReference.nbytes(windows, vocab) for _, windows, _ in sets)
    free = shutil.disk_usage(folder).free
    if need > 0.95 * free:
        raise SystemExit(f"--kl_reference disk needs {need / 2**30:.1f} GiB in {folder} and {free / 2**30:.1f} GiB are "
                         f"free: free space, give another --output_dir, evaluate fewer windows (--limit), or use "
                         f"--kl_reference model (a copy in memory) or --no_kl")
    log.info("recording the FP model's log-probabilities for the KL comparison: %.2f GiB in %s", need / 2**30, folder)
    place_for_eval(model, device, args.multigpu, adapter)
    try:
        return {name: FPReference.record(model, windows, device, folder / f"{name}.npy", desc=f"{name} (FP)")
                for name, windows, _ in sets}
    finally:
        model.to("cpu")


def place_for_eval(model, device, multigpu: bool, adapter) -> None:
    """Put the model on `device`, or with --multigpu spread its blocks over every visible GPU."""
    if multigpu and torch.cuda.device_count() > 1:
        from accelerate import dispatch_model, infer_auto_device_map
        block_class = type(adapter.layers(model)[0]).__name__
        device_map = infer_auto_device_map(model, no_split_module_classes=[block_class])
        dispatch_model(model, device_map=device_map)
        log.info("--multigpu: model placed over %d GPUs", torch.cuda.device_count())
    else:
        model.to(device)


def evaluate_ppl(args, model, reference, tokenizer, device, data_dir, seqlen, adapter, tta=None,
                 blocks=None) -> tuple[dict, dict]:
    """Perplexity on each set (with KL/top-1 against `reference` unless --no_kl); with `tta` (windows ->
    (adapted blocks, report)), also the perplexity with the adapted blocks swapped in, as a separate figure.
    `blocks`: --stream's StreamedModel, evaluated block by block (its FP blocks, re-read, the KL reference)."""
    if blocks is not None and blocks.streamed:
        return _evaluate_streamed(args, blocks, tokenizer, device, data_dir, seqlen, adapter), {}
    recorded = isinstance(reference, dict)       # --kl_reference disk: {set: FPReference}
    place_for_eval(model, device, args.multigpu, adapter)
    if reference is not None and not recorded:
        place_for_eval(reference, device, args.multigpu, adapter)
    kl_reference = None if args.no_kl else reference
    out, out_tta = {}, {}
    for name, tokens, source in _ppl_sets(args, tokenizer, seqlen, data_dir, out):
        limit = args.limit if args.limit > 0 else None
        res = perplexity(model, tokens, seqlen, device, limit,
                         kl_reference.get(name) if recorded else kl_reference, desc=name)
        res["source"] = source
        out[name] = res
        log.info("%s perplexity %.3f over %d windows%s", name, res["ppl"], res["windows"], _agreement(res))
        if tta is not None:
            adapted, report = tta(eval_windows(tokens, seqlen, limit))
            with swapped_blocks(model, adapter, adapted, device):
                res_tta = perplexity(model, tokens, seqlen, device, limit, kl_reference, desc=f"{name} (TTA)")
            out_tta[name] = {**res_tta, "source": source, "tta": report}
            log.info("%s perplexity with TTA of the last %d block(s): %.3f (plain %.3f)%s; TTA itself %.1fs",
                     name, len(adapted), res_tta["ppl"], res["ppl"], _agreement(res_tta), report["seconds"])
    model.to("cpu")
    if recorded:
        for fp in reference.values():
            fp.remove()
        folders = {fp.path.parent for fp in reference.values()}
        for folder in folders:
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
    elif reference is not None:
        reference.to("cpu")
    return out, out_tta


def _ppl_sets(args, tokenizer, seqlen, data_dir, out: dict | None = None):
    """(name, tokens, source) of each --ppl_datasets set; one that cannot be read is logged and recorded in `out`
    (without `out`, passed over in silence: the evaluation reports it)."""
    for name in [d.strip() for d in args.ppl_datasets.split(",") if d.strip()]:
        try:
            tokens, source = eval_tokens(name, tokenizer, seqlen, data_dir)
        except DataError as exc:
            if out is not None:
                log.warning("perplexity on %s skipped: %s", name, exc)
                out[name] = {"skipped": str(exc)}
            continue
        yield name, tokens, source


def _evaluate_streamed(args, blocks, tokenizer, device, data_dir, seqlen, adapter) -> dict:
    from .evaluate import streamed_perplexity
    out = {}
    for name, tokens, source in _ppl_sets(args, tokenizer, seqlen, data_dir, out):
        res = streamed_perplexity(blocks, adapter, tokens, seqlen, device, args.limit if args.limit > 0 else None,
                                  with_reference=not args.no_kl, desc=name)
        out[name] = {**res, "source": source}
        log.info("%s perplexity %.3f over %d windows%s", name, res["ppl"], res["windows"], _agreement(res))
    return out


def _agreement(res: dict) -> str:
    return (f"  (FP {res['fp_ppl']:.3f}, KL {res['kl']:.4f}, top-1 agreement {res['top1_agreement']:.3f})"
            if "kl" in res else "")


def main(argv=None) -> None:
    run(argv)
