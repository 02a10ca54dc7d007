"""Models larger than memory (--stream): the model is a skeleton on the meta device, and its blocks are read
from the checkpoint's safetensors one at a time, quantized, and written to disk as they finish.

    TensorFiles    the tensors of a safetensors checkpoint (one file or an index of shards), each read with
                   plain file reads into fresh memory: no memory map, so a read costs exactly the tensor's
                   bytes of resident memory, and nothing stays resident once the tensor is dropped
    BlockStore     finished blocks on disk: each block's parameters and buffers in one safetensors file, its
                   modules (whatever the stages made of them) kept on the meta device, rebuilt on demand
    StreamedModel  the skeleton, the checkpoint and the store together: the block source the block loop,
                   the statistics, the evaluation and the export walk (InMemoryBlocks is the in-memory one)

What stays in memory: the skeleton (no tensors), the non-block weights while a step needs them (the
embeddings for the calibration inputs and for the evaluation's logits), one block and the activation caches
(which --cache_dir moves to disk: activations.py).
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import struct
from pathlib import Path

import torch
from torch import nn

from ..errors import ModelLoadError
from ..utils import atomic_write

log = logging.getLogger("affinequant")

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


class TensorFiles:
    """The tensors of safetensors files, by name: `read(name)` reads one into fresh memory."""

    def __init__(self, files: list[Path]):
        self.entries: dict[str, tuple[Path, torch.dtype, list[int], int, int]] = {}
        for path in files:
            with open(path, "rb") as f:
                (length,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(length))
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                if info["dtype"] not in SAFETENSORS_DTYPES:
                    raise ModelLoadError(f"{path}: tensor {name} has dtype {info['dtype']}, which --stream cannot "
                                         f"read; load the model without --stream")
                begin, end = info["data_offsets"]
                self.entries[name] = (path, SAFETENSORS_DTYPES[info["dtype"]], info["shape"], 8 + length + begin,
                                      8 + length + end)

    @classmethod
    def of_checkpoint(cls, folder: str | Path) -> "TensorFiles":
        """The weights of a Hugging Face model directory: model.safetensors, or the shards its index names."""
        folder = Path(folder)
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return cls([folder / n for n in names])
        if (folder / "model.safetensors").is_file():
            return cls([folder / "model.safetensors"])
        raise ModelLoadError(f"--stream reads blocks from safetensors, and {folder} has neither model.safetensors nor "
                             f"model.safetensors.index.json: convert the model once (python -m affinequant.convert "
                             f"MODEL DIR) and pass DIR")

    def read_rows(self, name: str, rows: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A 2-D tensor of which only `rows` are read (an embedding table, for the token ids a step looks up):
        the others are left unwritten, so their pages are never touched and cost no resident memory."""
        path, stored, shape, begin, _ = self.entries[name]
        dtype = dtype or stored
        out = torch.empty(shape, dtype=dtype)
        row = torch.empty(shape[1], dtype=stored)
        buffer, width = row.view(torch.uint8).numpy(), shape[1] * row.element_size()
        with open(path, "rb") as f:
            for r in torch.unique(rows).tolist():
                f.seek(begin + r * width)
                if f.readinto(buffer) != width:
                    raise ModelLoadError(f"{path} is truncated (tensor {name}): download or convert it again")
                out[r] = row
        return out

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        path, stored, shape, begin, end = self.entries[name]
        tensor = torch.empty(shape, dtype=stored)
        if end > begin:
            buffer = tensor.reshape(-1).view(torch.uint8).numpy()
            with open(path, "rb") as f:
                f.seek(begin)
                if f.readinto(buffer) != end - begin:
                    raise ModelLoadError(f"{path} is truncated (tensor {name}): download or convert it again")
        return tensor if dtype is None or not tensor.is_floating_point() else tensor.to(dtype)


def module_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of `module` by name, persistent or not (a rebuilt block needs them all)."""
    return dict(list(module.named_parameters()) + list(module.named_buffers()))


def set_tensor(root: nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace the parameter or buffer `name` of `root` by `value` (a parameter stays a frozen parameter)."""
    owner, _, leaf = name.rpartition(".")
    module = root.get_submodule(owner) if owner else root
    if leaf in module._parameters:
        module._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    else:
        module._buffers[leaf] = value


def to_meta(module: nn.Module) -> None:
    """Drop every tensor of `module` (its structure stays): what a finished or released block becomes."""
    module.to("meta")
    return_freed_memory()


def _glibc(name: str):
    import ctypes
    try:
        return getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):       # not glibc
        return None


_TRIM = _glibc("malloc_trim")
M_MMAP_THRESHOLD = -3
STREAM_MMAP_THRESHOLD = 16 << 20


def map_large_allocations(threshold: int | None = None) -> None:
    """Have glibc map every allocation of `threshold` bytes or more on its own (default 16 MiB, or
    $AFFINEQUANT_MMAP_THRESHOLD_MIB; 0 leaves glibc's own policy), so that it goes back to the system when freed.
    By default glibc raises this threshold up to 32 MiB as large blocks are freed, after which a block's
    weight-sized temporaries come from its heap and stay resident. Measured on Qwen2.5-Coder-0.5B (--stream,
    LWC): a peak of 1094-1298 MiB without, 1005 MiB at 16 MiB, 896 MiB at 1 MiB; the price is the page faults
    of fresh mappings, a 1.22x LWC training step at 16 MiB against 32 MiB (one thread, one process)."""
    import os
    if threshold is None:
        threshold = int(float(os.environ.get("AFFINEQUANT_MMAP_THRESHOLD_MIB", STREAM_MMAP_THRESHOLD >> 20)) * 2**20)
    mallopt = _glibc("mallopt")
    if mallopt is not None and threshold > 0:
        mallopt(M_MMAP_THRESHOLD, threshold)


def return_freed_memory() -> None:
    """Hand the memory of dropped tensors back to the system. glibc keeps freed blocks of a few MiB in its heap
    (its mmap threshold rises to the largest block freed), so without this a streamed run's resident memory
    grows by about a block's weights per block although nothing references them."""
    if _TRIM is not None:
        _TRIM(0)


class BlockStore:
    """Finished blocks in `folder`, one safetensors file each (written atomically)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def path(self, index: int) -> Path:
        return self.folder / f"block_{index:04d}.safetensors"

    def put(self, index: int, block: nn.Module) -> None:
        from safetensors.torch import save_file
        tensors, seen = {}, set()
        for name, t in module_tensors(block).items():
            t = t.detach().contiguous()
            storage = t.untyped_storage().data_ptr()
            tensors[name] = t.clone() if storage in seen else t     # safetensors refuses tensors sharing storage
            seen.add(storage)
        atomic_write(self.path(index), lambda tmp: save_file(tensors, tmp))
        to_meta(block)

    def remove(self) -> None:
        """Delete the block files (the run is over: its exports and results are written)."""
        import shutil
        shutil.rmtree(self.folder, ignore_errors=True)

    def get(self, index: int, block: nn.Module) -> nn.Module:
        """Give `block` (on the meta device) its tensors back, on the CPU, exactly as they were written."""
        files = TensorFiles([self.path(index)])
        for name in module_tensors(block):
            set_tensor(block, name, files.read(name))
        return block


class InMemoryBlocks:
    """The block source of a model held in memory: its own blocks, nothing to load or write."""
    streamed = False

    def __init__(self, model: nn.Module, adapter):
        self.model, self.adapter = model, adapter

    def __len__(self) -> int:
        return len(self.adapter.layers(self.model))

    def block(self, index: int) -> nn.Module:
        return self.adapter.layers(self.model)[index]

    def finished(self, index: int) -> None:
        pass

    restore = block

    def release(self, index: int) -> None:
        pass

    # before quantize_blocks changes it, the model's own block is its FP block (the activation statistics)
    fp_block = block
    release_fp = release

    def load_non_block(self, token_ids: torch.Tensor | None = None, head: bool | None = None) -> None:
        pass

    def release_non_block(self) -> None:
        pass

    @contextlib.contextmanager
    def non_block(self, token_ids: torch.Tensor | None = None, head: bool | None = None):
        """The non-block weights, loaded for the duration of the context (load_non_block), released after."""
        self.load_non_block(token_ids, head)
        try:
            yield
        finally:
            self.release_non_block()


class StreamedModel(InMemoryBlocks):
    """A model whose blocks live on disk. `block(i)` reads block i from the checkpoint (its FP weights, in
    `dtype`); `finished(i)` writes what it became to the store and drops it; `restore(i)` / `release(i)` bring
    a finished block back and drop it again; `fp_block(i)` is block i of an FP skeleton (stock modules and
    attention), for the KL reference re-read from disk."""
    streamed = True

    def __init__(self, folder: str | Path, config, adapter, dtype: torch.dtype, work_dir: str | Path,
                 writer: bool = True):
        self.writer = writer            # data-parallel: rank 0 stores the finished blocks, the others drop theirs
        self.files = TensorFiles.of_checkpoint(folder)
        self.folder, self.dtype, self.adapter = Path(folder), dtype, adapter
        self.fp_config = copy.deepcopy(config)
        self.model = self._skeleton(config)
        self._fp_model = None
        self._partial = False           # the input embedding holds only some rows (load_non_block)
        missing = [n for n in self.model.state_dict() if n not in self.files and not self._tied(n)]
        if missing:
            raise ModelLoadError(f"{folder}: the checkpoint has no tensor {missing[0]} (of {len(missing)} missing) that "
                                 f"{type(self.model).__name__} needs: --stream reads checkpoints whose tensor names "
                                 f"are the model's own, and transformers renames or fuses this one's as it loads "
                                 f"it; quantize it without --stream")
        self.store = BlockStore(work_dir)
        self.prefix = adapter.layers_path + "."
        map_large_allocations()

    def _skeleton(self, config) -> nn.Module:
        """The model with parameters on the meta device; buffers (RoPE's inverse frequencies) are real, as the
        model's constructor computes them."""
        from accelerate import init_empty_weights
        from transformers import AutoModelForCausalLM
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config, dtype=self.dtype)
        model.eval()
        model.config.use_cache = False
        return model

    def _tied(self, name: str) -> bool:
        """A parameter the checkpoint need not hold: the output embedding tied to the input one."""
        out = self.model.get_output_embeddings()
        return (getattr(self.model.config, "tie_word_embeddings", False) and out is not None
                and name.endswith(".weight") and self.model.get_submodule(name.rpartition(".")[0]) is out)

    def _non_block_names(self) -> list[str]:
        return [n for n, _ in self.model.named_parameters() if not n.startswith(self.prefix) and not self._tied(n)]

    def load_non_block(self, token_ids: torch.Tensor | None = None, head: bool | None = None) -> None:
        """The embeddings, the final norm and the head, from the checkpoint (in `dtype`). With `token_ids` (the
        tokens about to be embedded), only those rows of the input embedding, and the output embedding only with
        `head` (default: without token_ids): the calibration inputs then cost a few MiB instead of vocab x hidden
        twice. A tied embedding is read whole when the head is needed."""
        head = token_ids is None if head is None else head
        embedding = f"{self._name_of(self.model.get_input_embeddings())}.weight"
        output = self.model.get_output_embeddings()
        output = None if output is None else f"{self._name_of(output)}.weight"
        tied = output is not None and self._tied(output)
        for name in self._non_block_names():
            loaded = not self.model.get_parameter(name).is_meta
            if name == output and not head:
                continue
            if name == embedding and token_ids is not None and not (tied and head):
                if not loaded:
                    set_tensor(self.model, name, self.files.read_rows(name, token_ids.reshape(-1), self.dtype))
                    self._partial = True
            elif not loaded or (name == embedding and self._partial):
                set_tensor(self.model, name, self.files.read(name, self.dtype))
                self._partial = self._partial and name != embedding
        self._tie()

    def _name_of(self, module: nn.Module) -> str:
        return next(n for n, m in self.model.named_modules() if m is module)

    def release_non_block(self) -> None:
        self._partial = False
        for name in self._non_block_names():
            set_tensor(self.model, name, self.model.get_parameter(name).to("meta"))
        self._tie()
        return_freed_memory()

    def _tie(self) -> None:
        if getattr(self.model.config, "tie_word_embeddings", False) and self.model.get_output_embeddings() is not None:
            self.model.get_output_embeddings().weight = self.model.get_input_embeddings().weight

    def _read_block(self, model: nn.Module, index: int) -> nn.Module:
        block = self.adapter.layers(model)[index]
        for name, tensor in module_tensors(block).items():
            key = f"{self.prefix}{index}.{name}"
            if tensor.is_meta:
                set_tensor(block, name, self.files.read(key, self.dtype))
        return block

    def block(self, index: int) -> nn.Module:
        return self._read_block(self.model, index)

    def finished(self, index: int) -> None:
        block = self.adapter.layers(self.model)[index]
        if self.writer:
            self.store.put(index, block)
        else:
            to_meta(block)

    def restore(self, index: int) -> nn.Module:
        return self.store.get(index, self.adapter.layers(self.model)[index])

    def release(self, index: int) -> None:
        to_meta(self.adapter.layers(self.model)[index])

    @property
    def fp_model(self) -> nn.Module:
        """The FP skeleton: stock modules and attention (its own configuration), sharing the non-block weights."""
        if self._fp_model is None:
            self._fp_model = self._skeleton(copy.deepcopy(self.fp_config))
        for name in self._non_block_names():
            set_tensor(self._fp_model, name, self.model.get_parameter(name))
        if getattr(self._fp_model.config, "tie_word_embeddings", False):
            self._fp_model.get_output_embeddings().weight = self._fp_model.get_input_embeddings().weight
        return self._fp_model

    def fp_block(self, index: int) -> nn.Module:
        return self._read_block(self.fp_model, index)

    def release_fp(self, index: int) -> None:
        """Drop an FP block's parameters (its buffers, which the checkpoint may not hold, stay)."""
        block = self.adapter.layers(self.fp_model)[index]
        for name, p in list(block.named_parameters()):
            set_tensor(block, name, p.to("meta"))
        return_freed_memory()
