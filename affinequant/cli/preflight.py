"""Every check of a run that needs no weights, so that a mistake costs seconds, not a model load and a
calibration: the flags against the model's configuration, the output paths, the statistics files, --stream's
source, --cache_dir's room."""
from __future__ import annotations

import logging
from pathlib import Path

from .. import distributed
from ..config import ConfigError, QuantConfig
from ..errors import AffineQuantError, OutputError
from ..eval.data import CALIB_DATASETS, PPL_DATASETS
from ..formats import compressed_tensors
from ..formats.export import check_save_dir
from ..formats.gguf import check_gguf_target
from ..models.loading import block_linear_shapes, model_name
from ..pipeline.checkpoint import CalibrationCheckpoint
from ..pipeline.tta import TTAConfig
from ..utils import hub_reachable, load_tensors

log = logging.getLogger("affinequant")


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


def check_compressed_target(args, cfg: QuantConfig, shapes: dict[str, tuple[int, int]]) -> None:
    """--save_format compressed-tensors: packed weight-only models in whole groups (`shapes`: {linear: (out, in)}
    of a block)."""
    flag = f"--save_format {args.save_format}"
    if not (args.save_dir and cfg.real_quant):
        raise ConfigError(f"{flag} is the layout of packed weights in --save_dir: add --real_quant and --save_dir, or "
                          f"drop {flag}")
    runtime = [what for what, on in (("--abits < 16", cfg.abits < 16),
                                     ("--kv_bits/--q_bits", min(cfg.kv_width, cfg.q_width) < 16),
                                     ("--use_ln_matrix", cfg.use_ln_matrix), ("--flatquant", cfg.flatquant)) if on]
    if runtime:
        raise ConfigError(f"{flag} holds weight-only models, and {runtime[0]} keeps modules at run time that it cannot "
                          f"describe: drop {flag} (affinequant's own format is written) or {runtime[0]}")
    # the export's own check on the block's shapes (one scheme for all layers: every one at --wbits, --group_size)
    compressed_tensors.check_layers({n: [cfg.wbits, cfg.group_size, 0] for n in shapes},
                                    {n: shape[1] for n, shape in shapes.items()})


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

def check_stream_source(model_id: str) -> None:
    """--stream's model: a local directory with safetensors (checked before anything reads the model)."""
    from ..pipeline.streaming import TensorFiles
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
    if cfg.target_bpw is not None:
        refused = [flag for flag, given in (("--stream", args.stream), ("--save_format compressed-tensors",
                                             getattr(args, "save_format", None) == "compressed-tensors"))
                   if given]
        if refused:
            raise ConfigError(f"--target_bpw (mixed precision) does not work with {refused[0]} yet: the sensitivity "
                              f"pass holds the whole model, and compressed-tensors exports take one bit width; export "
                              f"GPTQ (--real_quant --save_dir) or GGUF (--save_gguf), or drop {refused[0]}")
    if args.save_gguf:
        check_gguf_target(args.save_gguf, args.gguf_type, cfg, model_id, args.overwrite, args.stream)
    if cfg.full_precision and (not (args.eval_ppl or args.tasks or args.save_gguf) or args.save_dir
                               or args.save_params):
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
        from ..eval.tasks import check_tasks
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
        from ..pipeline.calibrate import check_data_parallel
        check_data_parallel(cfg)
    shapes = block_linear_shapes(model_config, adapter)[0]
    check_group_size(shapes, cfg.group_size)
    if args.save_format != "gptq":
        check_compressed_target(args, cfg, shapes)
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
