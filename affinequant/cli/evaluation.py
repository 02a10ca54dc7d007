"""The evaluation step of a run: perplexity on each set, with KL and top-1 against the FP model (kept in
memory, recorded on disk, or re-read block by block under --stream), and LRQuant's TTA figure beside it."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..eval.data import DataError, eval_tokens
from ..eval.perplexity import FPReference, eval_windows, perplexity
from ..pipeline.tta import swapped_blocks

log = logging.getLogger("affinequant")


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
            tokens, source = eval_tokens(name, tokenizer, seqlen, data_dir, args.ppl_bos)
        except DataError as exc:
            if out is not None:
                log.warning("perplexity on %s skipped: %s", name, exc)
                out[name] = {"skipped": str(exc)}
            continue
        yield name, tokens, source


def _evaluate_streamed(args, blocks, tokenizer, device, data_dir, seqlen, adapter) -> dict:
    from ..eval.perplexity import streamed_perplexity
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
