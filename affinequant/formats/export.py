"""Saving and loading quantized models. Three formats, chosen by what the model holds:

standard  weight-only, fake-quantized floats in plain nn.Linear: a stock Hugging Face checkpoint
          that reloads exactly with AutoModelForCausalLM.from_pretrained.
gptq      packed weights (--real_quant) in the GPTQ layout, with config.json's
          quantization_config (quant_method "gptq"): for transformers + GPTQModel, vLLM, SGLang.
compressed-tensors  the same packed weights (--real_quant --save_format compressed-tensors) as llm-compressor
          writes them ("pack-quantized", zero points stored for asymmetric): vLLM's preferred format
          (compressed_tensors.py).
runtime   anything a stock class lacks (per-token activation quantizers, AffineQuant's runtime
          inverse after a norm, FlatQuant's online transforms and clipping factors, a bias the
          architecture does not declare): such a model would
          reload *silently wrong* with stock classes, so there is no standard weight file, stock
          from_pretrained fails loudly, and `load_quantized(path)` rebuilds the modules and loads
          strictly from affinequant.safetensors.
affinequant.json (the manifest) records the format and everything load_quantized needs.
"""
from __future__ import annotations

import json
import logging
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_model

from . import compressed_tensors
from ..models.adapters import get_adapter
from ..errors import OutputError
from ..models.moe import ExpertLinears, packed_experts, unpack_experts
from ..quant.packing import PackedLinear, use_packed_kernel
from ..quant.qmodules import (KeyTransform, OnlineTransform, QKVQuantizers, QuantLinear, TransformedNorm, install_quantizers,
                       set_submodule, use_quantized_attention)
from ..quant.quantizer import ActQuantizer
from ..utils import atomic_write, write_json

log = logging.getLogger("affinequant")

MANIFEST = "affinequant.json"
RUNTIME_WEIGHTS = "affinequant.safetensors"
PACKED_SUFFIXES = (".qweight", ".qzeros", ".scales", ".g_idx")


def runtime_norms(model) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, TransformedNorm) and m.inverse is not None]


def norm_biases(model) -> list[str]:
    """Norms given a bias their architecture lacks (a reference-convention shift after an RMSNorm)."""
    return [name for name, m in model.named_modules() if isinstance(m, TransformedNorm) and m.bias is not None]


def online_transforms(model) -> dict[str, list]:
    """FlatQuant's online transforms, by module name: their factor sizes."""
    return {name: m.sizes for name, m in model.named_modules() if isinstance(m, OnlineTransform)}


def key_transforms(model) -> dict[str, int]:
    return {name: m.key.shape[0] for name, m in model.named_modules() if isinstance(m, KeyTransform)}


def lac_quantizers(model) -> list[str]:
    """Activation quantizers with learned clipping factors (FlatQuant's LAC)."""
    return [name for name, m in model.named_modules() if isinstance(m, ActQuantizer) and m.lac]


def packed_modules(model) -> dict[str, list]:
    return {name: [m.bits, m.group_size, m.zero_offset] for name, m in model.named_modules()
            if isinstance(m, PackedLinear)}


def _stock_keys(config) -> set[str]:
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        return set(AutoModelForCausalLM.from_config(config).state_dict())


def _as_stock_keys(model) -> set[str]:
    keys = set()
    for key in model.state_dict():
        for suffix in PACKED_SUFFIXES:
            if key.endswith(suffix):
                key = key[: -len(suffix)] + ".weight"
        keys.add(key)
    return keys


GPTQ_FORMATS = ("auto", "gptq", "gptq_v2")


def choose_gptq_format(model, symmetric: bool, requested: str = "auto", blocks=None) -> str:
    """auto: v1 ("gptq", every engine reads it) for symmetric models; v2 for asymmetric ones, because
    GPTQModel refuses asymmetric v1 files it did not write itself (old AutoGPTQ corrupted their zeros).
    v1 is impossible when a zero point is 0. `blocks`: a streamed model's blocks, read back one at a time
    (their zero points are re-encoded as each is written: _write_weights)."""
    streamed = blocks is not None and blocks.streamed
    layers = [] if streamed else [m for m in model.modules() if isinstance(m, PackedLinear)]
    v1_possible = False
    if requested == "gptq" or (requested == "auto" and symmetric):     # only then do the zero points matter
        v1_possible = all(int(m.zeros().min()) >= 1 for m in layers)
        for index in range(len(blocks)) if streamed else ():
            v1_possible = all(int(m.zeros().min()) >= 1 for m in blocks.restore(index).modules()
                              if isinstance(m, PackedLinear))
            blocks.release(index)
            if not v1_possible:
                break
    if requested == "gptq" and not v1_possible:
        raise OutputError("--gptq_format gptq: some zero points are 0, which GPTQ v1 ('zero - 1') cannot store; "
                         "use --gptq_format gptq_v2 or auto")
    if requested == "auto":
        requested = "gptq" if symmetric and v1_possible else "gptq_v2"
    for m in layers:
        m.set_zero_offset(1 if requested == "gptq" else 0)
    return requested


def _storage_key(tensor: torch.Tensor) -> tuple:
    """What two names of one tensor share (a tied embedding and output head)."""
    return tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape)


def _every_name(state: dict) -> dict:
    """`state` with a tensor shared by several names (a tied embedding and output head) stored under each of
    them: vLLM, unlike transformers, does not re-tie on load and reads model.embed_tokens.weight."""
    out, storage = {}, {}
    for key, tensor in state.items():
        tensor = tensor.detach()
        shared = _storage_key(tensor)
        out[key] = tensor.clone().contiguous() if shared in storage else tensor.contiguous()
        storage.setdefault(shared, key)
    return out


def _write_weights(model, save_dir: Path, stem: str, blocks=None, zero_offset: int | None = None,
                   every_name: bool = False, convert: Callable[[dict], dict] | None = None) -> None:
    """The model's tensors as `stem`.safetensors; for a streamed model (`blocks`), as Hugging Face shards
    (`stem`-0000k-of-0000n.safetensors and `stem`.safetensors.index.json: the non-block tensors, then one shard
    per block, each block read back from the store while its shard is written), which from_pretrained,
    GPTQModel and load_quantized read. `zero_offset`: the GPTQ zero-point encoding of packed layers.
    `every_name`: a tied tensor under each of its names, for the engines (see _every_name). `convert`: maps
    each file's tensors to another format's names and layouts (compressed-tensors)."""
    from safetensors.torch import save_file
    if blocks is None or not blocks.streamed:
        if every_name or convert:       # else save_model: it stores a tied tensor once
            tensors = _every_name(model.state_dict()) if every_name else model.state_dict()
            tensors = convert(tensors) if convert else tensors
            atomic_write(save_dir / f"{stem}.safetensors", lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
        else:
            atomic_write(save_dir / f"{stem}.safetensors", lambda tmp: save_model(model, tmp, metadata={"format": "pt"}))
        return
    prefix = blocks.prefix
    n_shards = len(blocks) + 1
    weight_map, total = {}, 0

    def write(shard: int, tensors: dict) -> None:
        nonlocal total
        name = f"{stem}-{shard:05d}-of-{n_shards:05d}.safetensors"
        tensors = {k: v.detach().contiguous() for k, v in (convert(tensors) if convert else tensors).items()}
        atomic_write(save_dir / name, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
        weight_map.update({k: name for k in tensors})
        total += sum(v.numel() * v.element_size() for v in tensors.values())

    with blocks.non_block():
        seen, non_block = set(), {}
        for key, tensor in model.state_dict(keep_vars=True).items():
            if key.startswith(prefix) or (id(tensor) in seen and not every_name):   # a tied output embedding
                continue
            seen.add(id(tensor))
            non_block[key] = tensor
        write(1, _every_name(non_block) if every_name else non_block)
    for index in range(len(blocks)):
        block = blocks.restore(index)
        if zero_offset is not None:
            for m in block.modules():
                if isinstance(m, PackedLinear):
                    m.set_zero_offset(zero_offset)
        write(index + 2, {f"{prefix}{index}.{k}": v for k, v in block.state_dict().items()})
        blocks.release(index)
    write_json(save_dir / f"{stem}.safetensors.index.json", {"metadata": {"total_size": total},
                                                            "weight_map": weight_map})


def _read_weights(model, path: Path, stem: str, convert: Callable[[dict], dict] | None = None) -> None:
    """Load what _write_weights wrote (one file or shards) into `model`, strictly: every tensor the file holds is
    the model's, and every tensor of the model is read, a tied one under any of its names. `convert`: the
    inverse of _write_weights' (each file's tensors back to ours)."""
    from safetensors.torch import load_file
    index = path / f"{stem}.safetensors.index.json"
    shards = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file()
              else [f"{stem}.safetensors"])
    loaded = set()
    for shard in shards:
        tensors = load_file(path / shard)
        tensors = convert(tensors) if convert else tensors
        unexpected = model.load_state_dict(tensors, strict=False).unexpected_keys
        if unexpected:
            raise RuntimeError(f"{shard} holds tensors the model lacks: {unexpected[:3]}")
        loaded |= set(tensors)
    names_of = {}           # one storage, every name it has (a tied embedding and output head)
    for key, tensor in model.state_dict().items():
        names_of.setdefault(_storage_key(tensor), set()).add(key)
    missing = [key for names in names_of.values() if not names & loaded for key in sorted(names)]
    if missing:
        raise RuntimeError(f"the weights lack {missing[:3]}")


def gptq_config(packed: dict[str, list], sym: bool) -> dict:
    bits = Counter(b for b, _, _ in packed.values()).most_common(1)[0][0]
    (_, group, _), *_ = packed.values()
    v2 = any(offset == 0 for _, _, offset in packed.values())
    config = {"quant_method": "gptq", "bits": bits, "group_size": group or -1, "sym": sym, "desc_act": False,
              "checkpoint_format": "gptq_v2" if v2 else "gptq", "true_sequential": True,
              "damp_percent": 0.01, "static_groups": False, "quantizer": ["affinequant"]}
    # mixed precision (--target_bpw): the modules at other bits, as GPTQModel's per-module overrides read them
    # ("+:" a regex of module names that the override applies to)
    other = {name: b for name, (b, _, _) in packed.items() if b != bits}
    if other:
        config["dynamic"] = {f"+:^{re.escape(name)}$": {"bits": b} for name, b in sorted(other.items())}
    return config


def check_save_dir(save_dir: str | Path, overwrite: bool = False) -> None:
    """A directory we may write an export into: new, empty, one of our exports (replaced completely), or
    anything with `overwrite`. Refused otherwise: stale weights beside a new export would load silently."""
    save_dir = Path(save_dir)
    if save_dir.exists() and not save_dir.is_dir():
        raise OutputError(f"--save_dir {save_dir} is a file: give a directory for the quantized model")
    if save_dir.is_dir() and any(save_dir.iterdir()) and not (save_dir / MANIFEST).is_file() and not overwrite:
        raise OutputError(f"--save_dir {save_dir} is not empty and holds no affinequant export ({MANIFEST}): give a new "
                          f"or empty directory, or pass --overwrite to replace its contents")


def _replace_dir(target: Path, write):
    """Write a directory through a sibling temporary one, then swap: the old contents go entirely (no stale
    file survives beside the new ones), and a crash leaves the old directory as it was."""
    import shutil
    import tempfile
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        result = write(tmp)
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            if old.exists():
                shutil.rmtree(old)
            target.rename(old)
        tmp.rename(target)
        if old is not None:
            shutil.rmtree(old)
        return result
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


SAVE_FORMATS = ("gptq", "compressed-tensors")


def save_quantized(model, tokenizer, save_dir: str, cfg, model_id: str | None = None,
                   gptq_format: str = "auto", overwrite: bool = False, blocks=None, save_format: str = "gptq") -> str:
    """Write `model` to `save_dir`; returns the format written (standard, gptq, compressed-tensors or runtime).
    gptq_format: auto | gptq (v1) | gptq_v2, for packed models; save_format: gptq or compressed-tensors, the
    layout of packed weights (compressed-tensors holds only packed weight-only models). An existing export there is replaced
    completely; another non-empty directory only with `overwrite` (check_save_dir). `blocks`: --stream's
    StreamedModel, whose blocks are read back one at a time and written as shards."""
    check_save_dir(save_dir, overwrite)
    final = Path(save_dir)

    def write(tmp):
        with packed_experts(model):     # fake-quantized MoE experts back in transformers' 3-D layout
            return _write_export(model, tokenizer, tmp, final, cfg, model_id, gptq_format, blocks, save_format)
    return _replace_dir(final, write)


def _write_engine_config(config, save_dir: Path, quantization_config: dict) -> None:
    """config.json with a packed format's quantization_config, and the dtype an engine runs in where the
    config names none (the packed scales are float16)."""
    config_dict = config.to_dict()
    if not (config_dict.get("dtype") or config_dict.get("torch_dtype")):
        config_dict["torch_dtype"] = "float16"
    config_dict["quantization_config"] = quantization_config
    (save_dir / "config.json").write_text(json.dumps(config_dict, indent=2, default=str) + "\n")


def _write_export(model, tokenizer, save_dir: Path, final: Path, cfg, model_id, gptq_format: str,
                  blocks=None, save_format: str = "gptq") -> str:
    zero_offset = None
    compressed = save_format == "compressed-tensors"
    if any(isinstance(m, PackedLinear) for m in model.modules()):
        if compressed:          # zero points as they are (a streamed model's blocks: as each is written)
            zero_offset = 0
            for m in [] if blocks is not None and blocks.streamed else model.modules():
                if isinstance(m, PackedLinear):
                    m.set_zero_offset(0)
        else:
            zero_offset = 1 if choose_gptq_format(model, cfg.symmetric, gptq_format, blocks) == "gptq" else 0
    act_quant = any(isinstance(m, QuantLinear) and m.act_quantizer is not None for m in model.modules())
    attention_quant = any(isinstance(m, QKVQuantizers) for m in model.modules())
    online, keys, lac = online_transforms(model), key_transforms(model), lac_quantizers(model)
    norms, biases, packed = runtime_norms(model), norm_biases(model), packed_modules(model)
    stock_keys = _stock_keys(model.config)
    # biases the transforms gave linears the architecture has none on (reference-convention shifts)
    added_biases = sorted(name for name, m in model.named_modules() if hasattr(m, "in_features")
                          and getattr(m, "bias", None) is not None and f"{name}.bias" not in stock_keys)
    runtime_modules = act_quant or attention_quant or norms or online
    extra_keys = sorted(_as_stock_keys(model) - stock_keys) if not runtime_modules else []
    fmt = "runtime" if (runtime_modules or extra_keys) else ("gptq" if packed else "standard")
    if compressed:
        if fmt != "gptq":
            raise OutputError("--save_format compressed-tensors holds packed weight-only models, and this one "
                              + ("needs modules a stock class lacks (activation quantizers, online transforms or "
                                 "inverse matrices after norms)" if fmt == "runtime" else "has no packed weights")
                              + ": quantize with --real_quant and weight-only flags, or drop --save_format")
        fmt = "compressed-tensors"
        packed = {name: [bits, group, 0] for name, (bits, group, _) in packed.items()}
        compressed_tensors.check_layers(packed, {name: model.get_submodule(name).in_features for name in packed})
    manifest = {"format": fmt, "config": cfg.to_dict(), "model": model_id, "setting": cfg.setting,
                "effective_weight_bits": cfg.effective_wbits, "runtime_inverse_norms": norms,
                "runtime_norm_biases": biases, "added_linear_biases": added_biases,
                "activation_bits": cfg.abits if act_quant else 16, "packed": packed,
                "attention_bits": {"q": cfg.q_width, "kv": cfg.kv_width} if attention_quant else {"q": 16, "kv": 16},
                "online_transforms": online, "key_transforms": keys, "lac_quantizers": lac,
                "unpacked_experts": any(isinstance(m, ExpertLinears) for m in model.modules()),
                "weights": "packed integer codes (GPTQ layout)" if packed else "fake-quantized (dequantized floats)"}
    config = model.config
    # what an engine needs to pick the class: a config built from a GGUF names none (save_pretrained fills it in
    # for the standard export only)
    config.architectures = config.architectures or [type(model).__name__]
    saved_attn, saved_cache = config._attn_implementation, config.use_cache
    config._attn_implementation, config.use_cache = "sdpa", True
    try:
        if fmt == "standard" and blocks is not None and blocks.streamed:
            config.save_pretrained(save_dir)
            _write_weights(model, save_dir, "model", blocks)
            log.info("saved a standard checkpoint to %s (fake-quantized weights, one shard per block; loads with "
                     "AutoModelForCausalLM.from_pretrained)", final)
        elif fmt == "standard":
            model.save_pretrained(save_dir)
            log.info("saved a standard checkpoint to %s (fake-quantized weights; loads with "
                     "AutoModelForCausalLM.from_pretrained)", final)
        elif fmt == "compressed-tensors":
            # every other linear (the output head) stays dense, as llm-compressor's `ignore` says
            ignore = sorted(n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n not in packed)
            qcfg = compressed_tensors.config(packed, cfg.symmetric, ignore)
            _write_engine_config(config, save_dir, qcfg)
            _write_weights(model, save_dir, "model", blocks, zero_offset, every_name=True,
                           convert=lambda tensors: compressed_tensors.to_compressed(tensors, packed, cfg.symmetric))
            (bits, group, _), *_ = packed.values()
            log.info("saved a compressed-tensors checkpoint (pack-quantized, %d-bit, group %s, %s) to %s",
                     bits, group or "per channel",
                     "symmetric" if cfg.symmetric else "asymmetric with zero points", final)
        elif fmt == "gptq":
            qcfg = gptq_config(packed, cfg.symmetric)
            _write_engine_config(config, save_dir, qcfg)
            _write_weights(model, save_dir, "model", blocks, zero_offset, every_name=True)
            ragged = [n for n, m in model.named_modules() if isinstance(m, PackedLinear) and m.group_size
                      and m.in_features % m.group_size]
            widths = Counter(b for b, _, _ in packed.values())
            log.info("saved a GPTQ checkpoint (%s, group %s, sym %s, %s) to %s",
                     ", ".join(f"{n} modules at {b} bits" for b, n in sorted(widths.items())) if len(widths) > 1
                     else f"{qcfg['bits']}-bit", qcfg["group_size"], qcfg["sym"], qcfg["checkpoint_format"], final)
            if ragged:
                log.warning("%d layers have in_features not divisible by the group size %s (e.g. %s): their last "
                            "group is shorter. g_idx describes it exactly and torch kernels run it, but fast "
                            "kernels (GPTQModel's default CPU kernel, Marlin/Exllama) refuse such layers; load "
                            "with GPTQModel's BACKEND.TORCH", len(ragged), qcfg["group_size"], ragged[0])
            if qcfg["checkpoint_format"] == "gptq_v2":
                log.warning("written as gptq_v2 (zero points stored as they are), which transformers + GPTQModel "
                            "load; vLLM refuses asymmetric GPTQ (v1 or v2): for vLLM, add --save_format "
                            "compressed-tensors (zero points kept) or quantize with --symmetric")
        else:
            config.save_pretrained(save_dir)
            _write_weights(model, save_dir, RUNTIME_WEIGHTS.removesuffix(".safetensors"), blocks)
            what = [w for w, on in (("per-token activation quantizers", act_quant or attention_quant),
                                    (f"{len(online)} online transforms (FlatQuant)", online),
                                    (f"{len(norms)} runtime inverse matrices after norms", norms),
                                    (f"tensors the stock class lacks ({', '.join(extra_keys[:3])})", extra_keys)) if on]
            log.warning("the model needs %s: saved to %s in affinequant's format. Load it with "
                        "affinequant.load_quantized(%r); plain from_pretrained refuses it (no model.safetensors) "
                        "rather than loading it wrong", " and ".join(what), final, str(final))
    finally:
        config._attn_implementation, config.use_cache = saved_attn, saved_cache
    if getattr(model, "generation_config", None) is not None and not (save_dir / "generation_config.json").is_file():
        model.generation_config.save_pretrained(save_dir)       # every format, as save_pretrained does for its own
    if tokenizer is not None:
        tokenizer.save_pretrained(save_dir)
    write_json(save_dir / MANIFEST, manifest)
    return fmt


def load_quantized(path: str, dtype: torch.dtype = torch.float32, kernel: str = "exact"):
    """Load a model written by save_quantized, with every module it needs. `kernel`: how packed layers run
    ("exact", "int4_cpu", "int8_cpu" or "cpu": torch's low-bit CPU kernels where a layer allows them;
    packing.PackedLinear)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{path} has no {MANIFEST}: not a checkpoint written by affinequant")
    manifest = json.loads(manifest_path.read_text())
    if manifest["format"] == "standard":
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    config = AutoConfig.from_pretrained(path)
    if hasattr(config, "quantization_config"):
        del config.quantization_config      # we rebuild the packed layers ourselves
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    adapter = get_adapter(config)
    if manifest.get("unpacked_experts"):
        unpack_experts(model, adapter)
    for name in manifest.get("added_linear_biases", []):
        linear = model.get_submodule(name)
        linear.bias = torch.nn.Parameter(torch.zeros(linear.out_features, dtype=linear.weight.dtype))
    bits = manifest["activation_bits"]
    attention_bits = manifest.get("attention_bits", {"q": bits, "kv": bits})
    online = manifest.get("online_transforms", {})
    if min(bits, attention_bits["q"], attention_bits["kv"]) < 16 or online:
        symmetric = manifest["config"].get("symmetric", False)
        for block in adapter.layers(model):
            install_quantizers(block, adapter, bits, symmetric, lambda name, w: None,
                               reference=manifest["config"].get("reference_compat", False),
                               q_bits=attention_bits["q"], kv_bits=attention_bits["kv"])
        use_quantized_attention(model)
    for name in manifest.get("lac_quantizers", []):
        model.get_submodule(name).enable_lac()
    for name, head_dim in manifest.get("key_transforms", {}).items():
        set_submodule(model, name, KeyTransform(head_dim))
    for name, sizes in online.items():
        parent = name.rsplit(".", 1)[0]
        if not isinstance(model.get_submodule(parent), QuantLinear | TransformedNorm):
            set_submodule(model, parent, TransformedNorm(model.get_submodule(parent)))
        set_submodule(model, name, OnlineTransform(*sizes))
    inverse_norms, biased = set(manifest["runtime_inverse_norms"]), set(manifest.get("runtime_norm_biases", []))
    for name in sorted(inverse_norms | biased):
        norm = model.get_submodule(name)
        set_submodule(model, name, TransformedNorm(norm, hidden_size=norm.weight.shape[0] if name in inverse_norms
                                                   else None, with_bias=name in biased))
    for name, (wbits, group, offset) in manifest.get("packed", {}).items():
        linear = model.get_submodule(name)
        set_submodule(model, name, PackedLinear(linear.in_features, linear.out_features, wbits, group,
                                                linear.bias is not None, offset, dtype))
    weights = path / (RUNTIME_WEIGHTS if manifest["format"] == "runtime" else "model.safetensors")
    convert = None
    if manifest["format"] == "compressed-tensors":
        (bits, group, _), *_ = manifest["packed"].values()
        convert = lambda tensors: compressed_tensors.from_compressed(tensors, bits, group)  # noqa: E731
    try:
        _read_weights(model, path, weights.name.removesuffix(".safetensors"), convert)
    except Exception as exc:
        raise RuntimeError(f"{weights} does not match its manifest or is corrupt ({exc}); save the model again") from exc
    model.config.use_cache = False
    use_packed_kernel(model, kernel)
    return model
