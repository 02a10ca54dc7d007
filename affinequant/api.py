"""The one-call Python API.

    from affinequant import QuantConfig, quantize
    reports = quantize(model, samples, QuantConfig(wbits=3, group_size=128, lwc=True, epochs=20))
    reports = quantize(model, samples, QuantConfig(wbits=3, group_size=128, epochs=2,
                                                   recipe=["let", {"lwc": {"lr": 5e-2}}, "gptq"]))

`samples` is a (n, seqlen) tensor of token ids (see affinequant.data.calibration_samples).
The model is quantized in place; each BlockReport holds the block's losses and final MSE.
"""
from __future__ import annotations

import torch

from .adapters import get_adapter
from .calibrate import BlockReport, quantize_blocks
from .config import QuantConfig
from .stats import collect_act_stats
from .utils import resolve_device


def quantize(model, samples: torch.Tensor, config: QuantConfig, device: str | torch.device | None = None,
             act_stats: tuple[dict, dict] | None = None) -> list[BlockReport]:
    """Quantize a Hugging Face causal LM in place. LET/AffineQuant statistics are computed on
    `samples` unless given as (act_scales, act_shifts)."""
    device = resolve_device(device) if not isinstance(device, torch.device) else device
    adapter = get_adapter(model.config)
    config.validate()
    if config.needs_statistics and act_stats is None:
        act_stats = collect_act_stats(model, adapter, samples, device)
    scales, shifts = act_stats if act_stats is not None else (None, None)
    return quantize_blocks(model, adapter, samples, config, device, scales, shifts)
