"""main.py's run: check, load, quantize, evaluate, export, write results.json. Library errors end here as
one line on stderr and a non-zero exit."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from .. import distributed
from ..config import ConfigError, QuantConfig
from ..errors import AffineQuantError
from ..eval.data import default_data_dir
from ..formats.export import save_quantized
from ..formats.reference import ReferenceParams
from ..models.adapters import get_adapter
from ..models.loading import load_config, load_model, model_name, resolve_model_path
from ..pipeline.tta import adapt
from ..quant.packing import use_packed_kernel
from ..quant.quantizer import KERNELS
from ..utils import peak_memory_mb, resolve_device, seed_everything, setup_logging, write_json
from .args import build_parser, config_from_args
from .calibration import quantize
from .evaluation import evaluate_ppl, place_for_eval
from .preflight import check_output_paths, check_stream_source, is_reference_file, preflight, tta_config

log = logging.getLogger("affinequant")


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
        results["ppl_bos"] = args.ppl_bos
        results["ppl"], tta_results = evaluate_ppl(args, model, reference, tokenizer, device, data_dir, cfg.seqlen,
                                                   adapter, tta, blocks)
        if tta_results:
            results["ppl_tta"] = tta_results
    if args.tasks:
        from ..eval.tasks import run_tasks
        place_for_eval(model, device, args.multigpu, adapter)
        results["tasks"] = run_tasks(model, tokenizer, args.tasks, args.num_fewshot,
                                     args.limit if args.limit > 0 else None, device, data_dir, args.eval_batch_size)
        model.to("cpu")
    if args.save_dir:
        results["saved"] = {"path": args.save_dir,
                            "format": save_quantized(model, tokenizer, args.save_dir, cfg, model_id, args.gptq_format,
                                                     overwrite=args.overwrite, blocks=blocks,
                                                     save_format=args.save_format)}
    if args.save_gguf:
        from ..formats.gguf import save_gguf
        results["gguf"] = save_gguf(model, model_id, args.save_gguf, args.gguf_type, cfg.layer_bits)
        results["gguf"]["path"] = args.save_gguf
    if blocks is not None:
        blocks.store.remove()
    results["peak_memory_mib"] = peak_memory_mb(device)      # the whole run, evaluation included
    write_json(Path(args.output_dir) / "results.json", results)
    log.info("results written to %s", Path(args.output_dir) / "results.json")
    return results


def open_streamed(args, model_id: str, model_config, adapter, dtype):
    """--stream: (skeleton, tokenizer, StreamedModel); no weight is read yet."""
    from transformers import AutoTokenizer

    from ..pipeline.streaming import StreamedModel
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

def main(argv=None) -> None:
    run(argv)
