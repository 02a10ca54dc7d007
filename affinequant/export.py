"""Saving and loading quantized models.

A weight-only model without runtime modules holds plain nn.Linear layers with fake-quantized
weights: it is saved as a standard Hugging Face checkpoint and reloads exactly with stock
transformers. A model that needs modules a stock class lacks (per-token activation quantizers;
AffineQuant's runtime inverse after a norm) would reload *silently wrong* with stock classes, so
it is written without the standard weight file: stock `from_pretrained` fails loudly, and
`affinequant.load_quantized(path)` rebuilds those modules from the manifest and loads strictly.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model

from .adapters import get_adapter
from .qmodules import QuantLinear, TransformedNorm, install_quantizers, set_submodule, use_quantized_attention
from .utils import atomic_write, write_json

log = logging.getLogger("affinequant")

MANIFEST = "affinequant.json"
RUNTIME_WEIGHTS = "affinequant.safetensors"


def runtime_norms(model) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, TransformedNorm) and m.inverse is not None]


def save_quantized(model, tokenizer, save_dir: str, cfg, model_id: str | None = None) -> str:
    """Write `model` to `save_dir`; returns 'standard' or 'runtime' (the format written)."""
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    act_quant = any(isinstance(m, QuantLinear) and m.act_quantizer is not None for m in model.modules())
    norms = runtime_norms(model)
    model.config.use_cache = True
    attn = model.config._attn_implementation
    model.config._attn_implementation = "sdpa"
    manifest = {"format": "runtime" if (act_quant or norms) else "standard", "config": cfg.to_dict(),
                "model": model_id, "runtime_inverse_norms": norms, "activation_bits": cfg.abits if act_quant else 16,
                "weights": "fake-quantized (dequantized floats)"}
    try:
        if manifest["format"] == "standard":
            model.save_pretrained(save_dir)
            log.info("saved a standard checkpoint to %s (fake-quantized weights; loads with "
                     "AutoModelForCausalLM.from_pretrained)", save_dir)
        else:
            model.config.save_pretrained(save_dir)
            atomic_write(save_dir / RUNTIME_WEIGHTS, lambda tmp: save_model(model, tmp))
            what = [w for w, on in (("per-token activation quantizers", act_quant),
                                    (f"{len(norms)} runtime inverse matrices after norms", norms)) if on]
            log.warning("the model needs %s, which stock transformers classes lack: saved to %s in affinequant's "
                        "format. Load it with affinequant.load_quantized(%r); plain from_pretrained refuses it "
                        "(no model.safetensors) rather than loading it wrong", " and ".join(what), save_dir,
                        str(save_dir))
    finally:
        model.config._attn_implementation = attn
    if tokenizer is not None:
        tokenizer.save_pretrained(save_dir)
    write_json(save_dir / MANIFEST, manifest)
    return manifest["format"]


def load_quantized(path: str, dtype: torch.dtype = torch.float32):
    """Load a model written by save_quantized, with every runtime module it needs."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{path} has no {MANIFEST}: not a checkpoint written by affinequant")
    manifest = json.loads(manifest_path.read_text())
    if manifest["format"] == "standard":
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    config = AutoConfig.from_pretrained(path)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    adapter = get_adapter(config)
    bits = manifest["activation_bits"]
    if bits < 16:
        symmetric = manifest["config"].get("symmetric", False)
        for block in adapter.layers(model):
            install_quantizers(block, adapter, bits, symmetric, lambda w: None)
        use_quantized_attention(model)
    for name in manifest["runtime_inverse_norms"]:
        norm = model.get_submodule(name)
        set_submodule(model, name, TransformedNorm(norm, hidden_size=norm.weight.shape[0]))
    try:
        missing, unexpected = load_model(model, path / RUNTIME_WEIGHTS, strict=True)
    except Exception as exc:
        raise RuntimeError(f"{path / RUNTIME_WEIGHTS} does not match its manifest or is corrupt ({exc}); "
                           f"save the model again") from exc
    model.config.use_cache = False
    return model
