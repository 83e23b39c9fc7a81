"""Processes of a torchrun job: joining its process group and combining what each process measured.

Without torchrun (WORLD_SIZE unset or 1) everything here is a single process and no group is made.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from .errors import ConfigError


def world_size_from_env() -> int:
    """The number of processes torchrun started (WORLD_SIZE), 1 without torchrun."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


@contextlib.contextmanager
def distributed(device: torch.device) -> Iterator[Distributed]:
    """Join the process group torchrun describes in the environment (WORLD_SIZE, RANK, LOCAL_RANK,
    MASTER_ADDR/PORT): nccl on GPUs, each process on cuda:LOCAL_RANK; gloo on CPUs. Without torchrun this is
    a single process. The group is torn down on exit if it was created here."""
    world_size = world_size_from_env()
    if world_size <= 1:
        yield Distributed(0, 1, device)
        return
    import torch.distributed as dist

    if not dist.is_available():
        raise ConfigError("this PyTorch build has no torch.distributed; run without torchrun")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    created = not dist.is_initialized()
    if created:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    try:
        yield Distributed(dist.get_rank(), dist.get_world_size(), device)
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()


def gather(procs: Distributed, value: Any) -> list[Any]:
    """`value` from every process, in rank order (just [value] in a single process)."""
    if not procs.active:
        return [value]
    import torch.distributed as dist

    gathered: list[Any] = [None] * procs.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def barrier(procs: Distributed) -> None:
    """Wait until every process gets here (nothing in a single process)."""
    if procs.active:
        import torch.distributed as dist

        dist.barrier()
