"""The command line's flags: AffineQuant's (same names, meanings and defaults) and ours, and the
QuantConfig they make."""
from __future__ import annotations

import argparse
import logging

from ..config import LET_INITS, QK_INITS, ConfigError, QuantConfig
from ..eval.data import BOS_MODES, PPL_DATASETS
from ..formats.export import SAVE_FORMATS
from ..formats.gguf import GGUF_TYPES, default_gguf_type, scale_bits_of
from ..pipeline.tta import TTA_TARGETS

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
    a("--save_gguf", default=None, metavar="FILE.gguf",
      help="also write the model as a GGUF file for llama.cpp (a model loaded from a .gguf file: its metadata and "
           "tokenizer are copied); the weights must lie on --gguf_type's grid (Q4_0: --wbits 4 --group_size 32 "
           "--symmetric; Q4_1: the same without --symmetric) and are written exactly")
    a("--gguf_type", default=None, choices=list(GGUF_TYPES),
      help="with --save_gguf: the GGUF type (default: from --wbits and --symmetric, Q4_0, Q5_0 or Q8_0 symmetric, "
           "Q4_1 or Q5_1 asymmetric; F16 at --wbits 16)")
    a("--gptq_format", default="auto", choices=["auto", "gptq", "gptq_v2"],
      help="with --real_quant --save_dir: GPTQ checkpoint_format (auto: v1 for symmetric, v2 for asymmetric)")
    a("--save_format", default="gptq", choices=list(SAVE_FORMATS),
      help="with --real_quant --save_dir: the packed weights' layout: gptq (GPTQModel, vLLM for symmetric 4/8 bits) or "
           "compressed-tensors (pack-quantized, as llm-compressor writes it: vLLM, asymmetric included)")
    a("--calib_dataset", default=None,
      help="wikitext2 | c4 | ptb | generated | a .txt/.jsonl/.parquet file "
           "(default: wikitext2 if reachable, else c4, else model-generated text)")
    a("--calib_bos", default="on", choices=["on", "off"],
      help="on: where the tokenizer adds BOS (Llama, Mistral, Gemma), each calibration sample is BOS and seqlen-1 "
           "tokens of text, as the model sees text in use; off: plain slices of text, as the reference's")
    a("--data_dir", default=None, help="folder of local data files (also $AFFINEQUANT_DATA)")
    a("--nsamples", type=int, default=128, help="number of calibration samples")
    a("--seqlen", type=int, default=2048, help="tokens per calibration sample and perplexity window")
    a("--batch_size", type=int, default=1, help="calibration batch size")
    a("--seed", type=int, default=2, help="seed for calibration sampling")
    a("--eval_ppl", action="store_true", help="evaluate perplexity")
    a("--ppl_datasets", default="wikitext2,c4", help=f"comma-separated, from {', '.join(PPL_DATASETS)}")
    a("--ppl_bos", default="first", choices=list(BOS_MODES),
      help="BOS in perplexity windows: first, the joined text tokenized once with the tokenizer's defaults (BOS opens "
           "window 0 where the tokenizer adds one: GPTQ's, OmniQuant's, AffineQuant's protocol); every, each window "
           "opens with BOS (lm-eval's rolling perplexity); none, no special tokens")
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
    a("--percdamp", type=float, default=0.05,
      help="GPTQ dampening: fraction of the Hessian's mean diagonal (GPTQModel's 0.05; GPTQ's original 0.01)")
    a("--act_order", action="store_true", dest="act_order_flag",
      help="GPTQ: columns in descending Hessian-diagonal order, with static groups (the default)")
    a("--no_act_order", action="store_true",
      help="GPTQ: columns in natural order, as GPTQ's original (with --percdamp 0.01: its defaults)")
    a("--tesseraq", action="store_true",
      help="round the weights with TesseraQ (progressive adaptive rounding + dequantization-scale tuning) after the "
           "transforms and clipping")
    a("--par_iters", type=int, default=250, help="TesseraQ: Adam steps per round (reference 250)")
    a("--par_batch", type=int, default=4, help="TesseraQ: calibration samples per step (reference 4)")
    a("--par_lr", type=float, default=1e-3, help="TesseraQ: learning rate of the rounding variables")
    a("--par_rounds", type=int, default=20,
      help="TesseraQ: rounds of the hardening schedule, taken evenly from the reference's 20")
    a("--target_bpw", type=float, default=None, metavar="BPW",
      help="mixed precision: give each linear its bits from --mixed_bits so that the model averages BPW bits per "
           "weight (codes, scales and zero points counted), by a per-linear sensitivity measured on the calibration "
           "data; --wbits is then only the default of layers outside the blocks' linears")
    a("--mixed_bits", default="2,3,4", help="--target_bpw: the bit widths a linear may get (comma-separated)")
    a("--e2e_steps", type=int, default=0,
      help="after the block loop, refine the step sizes of the whole quantized model end to end for this many Adam "
           "steps, the integer codes frozen (EfficientQAT's E2E-QP; recipe stage e2e). 0: off")
    a("--e2e_lr", type=float, default=2e-3, help="e2e: learning rate of the log step sizes (a relative change)")
    a("--e2e_loss", default="kl", choices=["kl", "ce"],
      help="e2e: KL to the FP model's next-token distribution (kl), or next-token cross-entropy on the calibration text")
    a("--e2e_norms", action="store_true",
      help="e2e: also train the gains of the blocks' norms (a per-channel input scale; floating point in every export)")
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


def _bit_list(text: str) -> tuple:
    try:
        return tuple(sorted({int(b) for b in text.split(",") if b.strip()}))
    except ValueError:
        raise ConfigError(f"--mixed_bits {text!r}: give bit widths separated by commas, e.g. 2,3,4") from None


def config_from_args(args) -> QuantConfig:
    from ..recipe import load_recipe_file
    order_flags = [f for f, given in (("--act_order", args.act_order_flag), ("--no_act_order", args.no_act_order))
                   if given]
    if len(order_flags) == 2:
        raise ConfigError("--act_order and --no_act_order contradict each other: keep one")
    if order_flags and args.recipe:
        raise ConfigError(f"--recipe names the stages, so {order_flags[0]} would be ignored: drop it, or put "
                          f"act_order in the recipe's gptq stage")
    if order_flags and not args.gptq:
        raise ConfigError(f"{order_flags[0]} orders GPTQ's columns: add --gptq, or drop {order_flags[0]}")
    if args.save_gguf and not args.gguf_type:
        args.gguf_type = default_gguf_type(args.wbits, args.abits, args.symmetric)
    return QuantConfig(recipe=load_recipe_file(args.recipe) if args.recipe else None,
                       scale_bits=scale_bits_of(args.gguf_type if args.save_gguf else None),
                       clip_search=args.clip_search, compensation=args.compensation, gptq=args.gptq, percdamp=args.percdamp, act_order=not args.no_act_order,
                       tesseraq=args.tesseraq, par_iters=args.par_iters, par_batch=args.par_batch, par_lr=args.par_lr,
                       par_rounds=args.par_rounds, target_bpw=args.target_bpw, mixed_bits=_bit_list(args.mixed_bits), e2e_steps=args.e2e_steps, e2e_lr=args.e2e_lr, e2e_loss=args.e2e_loss, e2e_norms=args.e2e_norms,
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
