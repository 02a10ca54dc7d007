"""Saving quantized models.

Weight-only models hold plain nn.Linear layers with fake-quantized weights, so a standard
save_pretrained checkpoint reloads exactly with stock transformers. Activation quantization
lives in modules a stock class does not have, so such a checkpoint would reload silently
without it: we refuse rather than write something that loads wrong.
"""
from __future__ import annotations

import logging
from pathlib import Path

from .config import QuantConfig
from .qmodules import QuantLinear
from .utils import write_json

log = logging.getLogger("affinequant")


def save_fake_quant(model, tokenizer, save_dir: str, cfg: QuantConfig, results: dict) -> None:
    if any(isinstance(m, QuantLinear) for m in model.modules()):
        raise SystemExit(f"--save_dir with --abits {cfg.abits}: activation quantization is not part of a "
                         f"Hugging Face checkpoint, which would reload silently without it; "
                         f"saving weight-and-activation models is not implemented yet")
    model.config.use_cache = True
    model.config._attn_implementation = "sdpa"
    model.save_pretrained(save_dir)
    tokenizer.save_pretrained(save_dir)
    write_json(Path(save_dir) / "affinequant.json", {"format": "fake-quantized weights (dequantized floats)",
                                                     "config": cfg.to_dict(), "model": results.get("model")})
    log.info("saved the fake-quantized model to %s (loads with AutoModelForCausalLM.from_pretrained)", save_dir)
