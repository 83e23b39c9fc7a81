"""What a forward on the Triton kernels records about its launches, for the roofline and kernel-by-kernel
timing (`poolformer.fast.roofline`): each launch's bytes (`KernelTraffic`) and a timing mark after it
(`LaunchMark`), listed by the `Recorder` the forward runs with, only inside its contexts."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import torch


@dataclass(frozen=True)
class KernelTraffic:
    """Bytes one kernel (or PyTorch operator) reads and writes, each tensor it touches counted once."""

    name: str
    read_bytes: int
    write_bytes: int


@dataclass(frozen=True)
class LaunchMark:
    """One kernel (or PyTorch operator) of a timed forward: its name, stage (0 = stem, then 1-4, None = head),
    the multiply-add FLOPs it does (2 per MAC; 0 where not counted), and the mark recorded right after it was
    launched (a CUDA event on a GPU, time.perf_counter() seconds on a CPU)."""

    name: str
    stage: int | None
    flops: int
    mark: Any


def _mark(device: torch.device) -> Any:
    if device.type == "cuda":
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event
    return time.perf_counter()


def _nbytes(tensors: Iterable[torch.Tensor | None]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class Recorder:
    """The launches of the forwards that run with this recorder (a FastPoolFormer holds one), listed only inside
    its contexts: `record_traffic()` lists each launch's bytes, `mark_launches(device)` a mark after each; outside
    them `record` does nothing. `stage` is where the forward is (0 the stem, 1-4 the stages, None the head): the
    forward sets it as it goes, and each mark carries it."""

    def __init__(self) -> None:
        self._traffic: list[KernelTraffic] | None = None
        self._marks: list[LaunchMark] | None = None
        self.stage: int | None = 0

    @contextlib.contextmanager
    def record_traffic(self) -> Iterator[list[KernelTraffic]]:
        """Within this context every launch recorded here lists its traffic in the list it yields."""
        previous, self._traffic = self._traffic, []
        try:
            yield self._traffic
        finally:
            self._traffic = previous

    @contextlib.contextmanager
    def mark_launches(self, device: torch.device | str) -> Iterator[list[LaunchMark]]:
        """Within this context every launch recorded here adds a LaunchMark to the list it yields, after a first
        mark named "start": on a GPU the time between two marks is the GPU time of the launch between them, as
        long as the host stays ahead of the GPU (poolformer.fast.roofline.time_kernels sees to that)."""
        previous, self._marks = self._marks, [LaunchMark("start", None, 0, _mark(torch.device(device)))]
        try:
            yield self._marks
        finally:
            self._marks = previous

    def record(self, name: str, reads: Iterable[torch.Tensor | None], writes: list[torch.Tensor],
               flops: int = 0) -> None:
        """One launch that read `reads` and wrote `writes` (None entries: arguments switched off)."""
        if self._traffic is not None:
            self._traffic.append(KernelTraffic(name, _nbytes(reads), _nbytes(writes)))
        if self._marks is not None:
            self._marks.append(LaunchMark(name, self.stage, flops, _mark(writes[0].device)))
