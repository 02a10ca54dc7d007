"""Small shared helpers: logging, devices, memory figures, atomic writes, hub reachability."""
from __future__ import annotations

import json
import logging
import os
import random
import resource
import socket
import sys
import tempfile
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from .errors import ConfigError

log = logging.getLogger("affinequant")


def setup_logging(output_dir: str | None = None) -> None:
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    log.setLevel(logging.INFO)
    log.handlers.clear()
    stream = logging.StreamHandler(sys.stdout)
    stream.setFormatter(fmt)
    log.addHandler(stream)
    if output_dir:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(Path(output_dir) / "log.txt")
        handler.setFormatter(fmt)
        log.addHandler(handler)
    log.propagate = False


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str | None) -> torch.device:
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"--device {name} is not a device: use cpu, cuda, cuda:N, mps or auto") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    if device.type not in ("cpu", "cuda", "mps", "xpu"):
        raise ConfigError(f"--device {name}: {device.type} is not supported; use cpu or cuda")
    return device


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # VmHWM is this process image's peak resident memory. ru_maxrss would do elsewhere, but on Linux
    # a child inherits its parent's maxrss across fork, so a small child of a big parent misreports.
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory_report(device: torch.device) -> str:
    kind = "GPU peak" if device.type == "cuda" else "RSS peak"
    return f"{kind} {peak_memory_mb(device):.0f} MiB"


def atomic_write(path: str | os.PathLike, write) -> None:
    """Write through a temporary file in the same folder, then rename: a crash leaves the old file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path, obj) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, default=str)
            f.write("\n")
    atomic_write(path, write)


def save_tensors(path, obj) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def load_tensors(path, what: str):
    """torch.load with weights_only=True, and a message that says what the file was for."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # corrupt or foreign file
        raise ConfigError(f"{what} file {path} cannot be read ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
                          f"delete it and run again to regenerate it") from exc


@lru_cache(maxsize=None)
def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub can be reached; False also when the user set HF_HUB_OFFLINE."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false") or os.environ.get("AFFINEQUANT_OFFLINE"):
        return False
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


@torch.no_grad()
def round_to_half_(model: torch.nn.Module) -> None:
    """Round every float32 tensor of the model's state dict to the nearest float16 value, in place (dtype
    kept): the reference code holds its model in float16 (--reference_compat). Non-persistent buffers
    (RoPE's inverse frequencies) are recomputed in float32 by the model and stay as they are."""
    for tensor in model.state_dict().values():
        if tensor.dtype == torch.float32:
            tensor.copy_(tensor.half().float())


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the names, shapes, dtypes and bytes of `tensors` (in name order)."""
    import hashlib
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
