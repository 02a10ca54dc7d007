"""Data-parallel calibration on torch.distributed:

    torchrun --nproc_per_node 2 main.py --batch_size 2 ...

Every rank draws the same calibration samples and takes its share of each global batch (with
--batch_size B on W ranks, B/W samples per rank per step), runs the block loop on its share, and the
shared trainer averages the gradients (and the loss its decisions read) over the ranks every step, so every
rank holds the same block parameters, equal to one process with --batch_size B up to float summation
order; the clipping search's and GPTQ's Hessians are summed over the ranks, and TesseraQ averages its
gradients the same way. Rank 0 alone writes (checkpoints, statistics, results, exports) and evaluates. gloo on the CPU,
nccl on CUDA (one GPU per rank, LOCAL_RANK). A rank that dies ends the others' collectives with an
error; main.py then stops with one line, and --resume continues from the blocks rank 0 checkpointed.
"""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

# how long a collective waits for a rank that stopped answering
TIMEOUT = datetime.timedelta(seconds=float(os.environ.get("AFFINEQUANT_DIST_TIMEOUT", "600")))


def requested() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: torch.device) -> torch.device:
    """Join the process group torchrun describes (a no-op in a single process); returns this rank's device."""
    if not requested() or dist.is_initialized():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)
    return device


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    return rank() == 0


def shard(n: int, batch_size: int) -> list[int]:
    """This rank's sample indices: from each global batch of `batch_size`, its contiguous share."""
    per_rank = batch_size // world()
    r = rank()
    return [i for i in range(n) if (i % batch_size) // per_rank == r]


def all_reduce_sum_(tensors) -> None:
    if active():
        for t in tensors:
            dist.all_reduce(t)


def average_gradients(params) -> None:
    """Average the gradients of `params` over the ranks. A parameter this rank's batch did not reach (an
    MoE expert no local token was routed to) contributes zeros, so every rank reduces the same list."""
    if not active():
        return
    grads = []
    for p in params:
        if p.requires_grad:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
    all_reduce_mean_(grads)


def all_reduce_mean_(tensors) -> None:
    if active():
        for t in tensors:
            dist.all_reduce(t)
            t.div_(world())


def _scalar(value: float) -> torch.Tensor:
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    return torch.tensor([value], dtype=torch.float64, device=device)


def total(value: float) -> float:
    """The sum of `value` over the ranks."""
    if not active():
        return value
    t = _scalar(value)
    dist.all_reduce(t)
    return t.item()


def mean(value: float) -> float:
    return total(value) / world()


def barrier() -> None:
    if active():
        dist.barrier()


def finish() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
