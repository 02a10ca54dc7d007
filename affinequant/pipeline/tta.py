"""LRQuant's test-time adaptation (TTA), done right.

For a perplexity set, the last `blocks` decoder blocks are quantized again from their full-precision
weights, with the run's recipe (fresh stages, the run's activation statistics), on the unlabelled windows
of that set: the quantized model's own hidden states at those blocks are the inputs, and the targets are
the FP model's outputs of the same blocks on the same text (`target="fp_chain"`), or the FP block applied
to the quantized inputs (`"fp_block"`). Activation quantization is on in training and evaluation, as in
the rest of the run. The adapted blocks are swapped in for that set's evaluation only: the plain figure
stays the plain model's, the TTA figure is reported next to it, and the model that is saved is the plain one.

The reference code (quantize/TTA.py) trains the last block on the embeddings (first-layer inputs) and
runs it afterwards with full-precision activations; tests/test_lrquant.py checks that neither happens here.
TTA sees the text it is evaluated on (its inputs, never its labels' loss): its figure is transductive and
is not comparable with calibration-only figures.
"""
from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, replace

import torch
from torch import nn

from ..models.blocks import capture_block_arguments, capture_block_inputs
from .calibrate import BlockRunner, prepare_attention
from ..config import ConfigError, QuantConfig

log = logging.getLogger("affinequant")

TTA_TARGETS = ("fp_chain", "fp_block")


@dataclass(frozen=True)
class TTAConfig:
    blocks: int = 1                     # the last N blocks (LRQuant: 1)
    epochs: int = 5                     # LRQuant's hard-coded 5
    let_lr: float | None = None         # None: the run's --let_lr (LRQuant uses let_lr)
    lwc_lr: float = 1e-2                # LRQuant's hard-coded 1e-2
    target: str = "fp_chain"

    def check(self, cfg: QuantConfig, n_blocks: int | None = None) -> "TTAConfig":
        if self.target not in TTA_TARGETS:
            raise ConfigError(f"--tta_target {self.target!r} is not known: use one of {', '.join(TTA_TARGETS)}")
        if self.blocks < 1 or (n_blocks is not None and self.blocks > n_blocks):
            raise ConfigError(f"--tta_blocks {self.blocks}: give 1 to {n_blocks or 'the number of'} blocks")
        if self.epochs < 1:
            raise ConfigError(f"--tta_epochs {self.epochs}: TTA trains, give at least 1 epoch (LRQuant: 5)")
        if not self.lwc_lr > 0 or (self.let_lr is not None and not self.let_lr > 0):
            raise ConfigError("--tta_let_lr and --tta_lwc_lr must be positive (LRQuant: let_lr, 1e-2)")
        if not replace(cfg, epochs=1).trains:
            raise ConfigError("--tta retrains the last blocks' learned stages, and this run learns none: add --lwc "
                              "and/or --let (LRQuant: --lwc --let), or drop --tta")
        return self

    def run_config(self, cfg: QuantConfig, n_windows: int) -> QuantConfig:
        """The run's configuration for the TTA blocks: its recipe and format, TTA's epochs and rates."""
        return replace(cfg, epochs=self.epochs, nsamples=n_windows, batch_size=1, lwc_lr=self.lwc_lr,
                       let_lr=self.let_lr if self.let_lr is not None else cfg.let_lr)


def _same_model(block: nn.Module, config) -> None:
    """A block copied from the FP reference runs under the quantized model's configuration (its attention
    function among others)."""
    for module in block.modules():
        if hasattr(module, "config") and hasattr(module.config, "_attn_implementation"):
            module.config = config


def adapt(model: nn.Module, reference: nn.Module, adapter, windows: torch.Tensor, cfg: QuantConfig,
          tta: TTAConfig, device: torch.device, amp_dtype: torch.dtype = torch.float16,
          act_scales: dict | None = None, act_shifts: dict | None = None) -> tuple[dict, dict]:
    """Adapt the last `tta.blocks` blocks of `model` (quantized, on `device`) on `windows` (N, L): returns
    {index: adapted block} (on the CPU, not installed) and a report. `reference` is the FP model, on `device`."""
    t0 = time.time()
    layers, fp_layers = adapter.layers(model), adapter.layers(reference)
    start = len(layers) - tta.blocks
    run_cfg = tta.run_config(cfg, windows.shape[0])
    prepare_attention(model, run_cfg)
    runner = BlockRunner(model.config, adapter, run_cfg, device, amp_dtype, act_scales, act_shifts)
    q_inps, block_kwargs = capture_block_arguments(model, adapter, windows, device, runner.cache_dtype, index=start)
    if tta.target == "fp_chain":
        fp_inps, _ = capture_block_inputs(reference, adapter, windows, device, runner.cache_dtype, index=start)
    else:                   # the FP block on the quantized input: the FP "chain" starts at the real inputs
        fp_inps = q_inps
    adapted, reports = {}, []
    for index in range(start, len(layers)):
        block = copy.deepcopy(fp_layers[index]).to("cpu")
        _same_model(block, model.config)
        report, q_inps, fp_inps = runner.quantize(block, index, q_inps, fp_inps, block_kwargs[index], desc="TTA block")
        adapted[index] = block
        reports.append({"index": index, "losses": report.losses, "final_mse": report.final_mse,
                        "fell_back_to_rtn": report.fell_back_to_rtn, "stages": report.stages})
    return adapted, {"blocks": reports, "windows": windows.shape[0], "epochs": tta.epochs, "target": tta.target,
                     "let_lr": run_cfg.let_lr, "lwc_lr": run_cfg.lwc_lr, "seconds": time.time() - t0}


class swapped_blocks:
    """`with swapped_blocks(model, adapter, adapted, device):` the adapted blocks stand in the model; the
    originals are back afterwards."""

    def __init__(self, model: nn.Module, adapter, adapted: dict, device):
        self.layers, self.adapted, self.device = adapter.layers(model), adapted, device
        self.originals: dict = {}

    def __enter__(self):
        for index, block in self.adapted.items():
            self.originals[index] = self.layers[index]
            self.layers[index] = block.to(self.device)
        return self

    def __exit__(self, *exc) -> None:
        for index, block in self.originals.items():
            self.adapted[index].to("cpu")
            self.layers[index] = block
