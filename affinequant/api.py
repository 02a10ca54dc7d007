"""The one-call Python API.

    from affinequant import QuantConfig, quantize
    reports = quantize(model, samples, QuantConfig(wbits=3, group_size=128, lwc=True, epochs=20))
    reports = quantize(model, samples, QuantConfig(wbits=3, group_size=128, epochs=2,
                                                   recipe=["let", {"lwc": {"lr": 5e-2}}, "gptq"]))

`samples` is a (n, seqlen) tensor of token ids (see affinequant.eval.data.calibration_samples).
The model is quantized in place; each BlockReport holds the block's losses and final MSE.

A model larger than memory, from a directory with safetensors, block by block (docs/streaming.md):

    blocks, reports = quantize_streamed("models/qwen", samples, config, work_dir="work/blocks")
    save_quantized(blocks.model, tokenizer, "out/qwen-w4", config, blocks=blocks)
"""
from __future__ import annotations

import torch

from .models.adapters import get_adapter
from .pipeline.calibrate import BlockReport, quantize_blocks
from .config import QuantConfig
from .pipeline.stats import collect_act_stats
from .utils import resolve_device


def quantize(model, samples: torch.Tensor, config: QuantConfig, device: str | torch.device | None = None,
             act_stats: tuple[dict, dict] | None = None, cache_dir: str | None = None,
             blocks=None, compile_block: bool = False) -> list[BlockReport]:
    """Quantize a Hugging Face causal LM in place. LET/AffineQuant statistics are computed on
    `samples` unless given as (act_scales, act_shifts). `cache_dir`: keep the activation caches in files
    there. `blocks`: where the blocks come from (quantize_streamed passes its StreamedModel). `compile_block`:
    the training steps run each block through torch.compile (trainer.CompiledForward)."""
    device = resolve_device(device) if not isinstance(device, torch.device) else device
    adapter = get_adapter(model.config)
    config.validate()
    if config.needs_statistics and act_stats is None:
        act_stats = collect_act_stats(model, adapter, samples, device, blocks)
    scales, shifts = act_stats if act_stats is not None else (None, None)
    return quantize_blocks(model, adapter, samples, config, device, scales, shifts, blocks=blocks, cache_dir=cache_dir,
                           compile_block=compile_block)


def quantize_streamed(model_dir: str, samples: torch.Tensor, config: QuantConfig, work_dir: str,
                      device: str | torch.device | None = None, dtype: torch.dtype = torch.float32,
                      act_stats: tuple[dict, dict] | None = None, cache_dir: str | None = None):
    """`quantize` for a model that need not fit in memory: its blocks are read from `model_dir`'s safetensors one
    at a time and written to `work_dir` as they finish. Returns (the StreamedModel, the reports); pass the former
    as `blocks` to save_quantized and streamed_perplexity."""
    from .models.loading import load_config
    from .pipeline.streaming import StreamedModel
    model_config = load_config(model_dir)
    blocks = StreamedModel(model_dir, model_config, get_adapter(model_config), dtype, work_dir)
    return blocks, quantize(blocks.model, samples, config, device, act_stats, cache_dir, blocks)
