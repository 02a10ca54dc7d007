"""Activation caches on disk (--cache_dir): the block loop's inputs, targets and outputs (samples x seqlen x
hidden each, three or four of them) as files, read and written a batch at a time with plain file I/O (no
memory map, so only the batch in use is resident). A cache behaves like the tensor it replaces where the
block loop and the stages touch it: `shape`, `dtype`, `len`, indexing by an int, a slice or a tensor of sample
indices (reads), and assignment to a slice of samples (writes). Values round-trip exactly, so a run with
--cache_dir equals the run without it bit for bit.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch


class DiskActivations:
    """A (samples, ...) tensor in a file of `folder`; the file goes when the cache is garbage-collected."""

    def __init__(self, folder: str | Path, shape: tuple[int, ...], dtype: torch.dtype):
        self.folder, self.shape, self.dtype = Path(folder), torch.Size(shape), dtype
        self.folder.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=self.folder, prefix="activations-", suffix=".bin")
        self.path, self._fd = Path(name), fd
        self.sample_shape = self.shape[1:]
        self.sample_bytes = torch.Size(self.sample_shape).numel() * torch.empty((), dtype=dtype).element_size()
        os.ftruncate(fd, self.shape[0] * self.sample_bytes)

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def __del__(self):
        fd = getattr(self, "_fd", None)
        if fd is not None:
            os.close(fd)
            self._fd = None
            self.path.unlink(missing_ok=True)

    def _rows(self, index) -> list[int]:
        if isinstance(index, int):
            index = index + self.shape[0] if index < 0 else index
            if not 0 <= index < self.shape[0]:
                raise IndexError(f"sample {index} of {self.shape[0]}")
            return [index]
        if isinstance(index, slice):
            return list(range(*index.indices(self.shape[0])))
        return [int(i) for i in torch.as_tensor(index).reshape(-1).tolist()]

    def _runs(self, rows: list[int]):
        """(first row, count, position in `rows`) of each run of consecutive rows: one read or write each."""
        start = 0
        while start < len(rows):
            end = start + 1
            while end < len(rows) and rows[end] == rows[end - 1] + 1:
                end += 1
            yield rows[start], end - start, start
            start = end

    def __getitem__(self, index) -> torch.Tensor:
        rows = self._rows(index)
        out = torch.empty((len(rows), *self.sample_shape), dtype=self.dtype)
        buffer = out.reshape(-1).view(torch.uint8).numpy()
        for first, count, at in self._runs(rows):
            chunk = buffer[at * self.sample_bytes:(at + count) * self.sample_bytes]
            if os.preadv(self._fd, [chunk], first * self.sample_bytes) != len(chunk):
                raise OSError(f"{self.path}: short read (the cache file was truncated)")
        return out[0] if isinstance(index, int) else out

    def __setitem__(self, index, value: torch.Tensor) -> None:
        rows = self._rows(index)
        value = value.detach().to("cpu", self.dtype).reshape(len(rows), *self.sample_shape).contiguous()
        buffer = value.reshape(-1).view(torch.uint8).numpy()
        for first, count, at in self._runs(rows):
            os.pwrite(self._fd, buffer[at * self.sample_bytes:(at + count) * self.sample_bytes],
                      first * self.sample_bytes)

    def clone(self) -> "DiskActivations":
        copy = DiskActivations(self.folder, self.shape, self.dtype)
        for i in range(len(self)):
            copy[i:i + 1] = self[i:i + 1]
        return copy


def empty_like(inputs):
    """An uninitialised cache like `inputs`: on disk when `inputs` is, a tensor otherwise."""
    if isinstance(inputs, DiskActivations):
        return DiskActivations(inputs.folder, inputs.shape, inputs.dtype)
    return torch.empty_like(inputs)


def mean_squared_error(a, b, chunk: int = 8) -> float:
    """mean((a - b)^2) over two caches (tensors or on disk), a few samples at a time, in float64 sums: the same
    figure whether the caches are in memory or on disk."""
    total, count = 0.0, 0
    for i in range(0, len(a), chunk):
        d = a[i:i + chunk].double() - b[i:i + chunk].double()
        total += float(d.square().sum())
        count += d.numel()
    return total / max(count, 1)
