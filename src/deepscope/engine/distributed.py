"""Device choice and data-parallel set-up from ``torchrun``'s environment variables.

Launching with ``torchrun --nproc-per-node N deepscope train ...`` sets RANK, WORLD_SIZE
and LOCAL_RANK; we then join a process group (NCCL on GPUs, gloo on CPU). Without those
variables everything runs in one process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from deepscope.errors import DeepscopeError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def pick_device(preference: str = "auto", local_rank: int = 0) -> torch.device:
    """CUDA when present (the local rank's GPU under torchrun), else CPU; ``preference`` overrides."""
    if preference == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(preference)
    except RuntimeError:
        raise DeepscopeError(f"unknown device {preference!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeepscopeError(f"device {preference!r} requested but CUDA is not available on this machine")
        if device.index is None:
            device = torch.device(f"cuda:{local_rank}")
    return device


def init_distributed(preference: str = "auto") -> tuple[DistInfo, torch.device]:
    """Join the torchrun process group if there is one, and pick this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(), pick_device(preference)
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    device = pick_device(preference, info.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return info, device


def all_reduce_max(values: list[float], device: torch.device) -> list[float]:
    """Element-wise maximum over processes (used to agree on stopping)."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.tolist()


def gather_objects(value: Any) -> list[Any]:
    """``value`` of every process, in rank order (just ``[value]`` without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shutdown(finished: bool = True) -> None:
    """Leave the process group. After a command that ``finished`` on every process, the processes first wait for each
    other: one leaving while another still writes its report can abort gloo's threads at exit ("terminate called
    without an active exception"). After an error they do not wait, since the others may never get there."""
    if dist.is_available() and dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()
