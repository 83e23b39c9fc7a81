"""How a step is timed and what memory it took, on the CPU or a CUDA GPU: the measuring bench and profile share.

- Steps are timed one by one: with a pair of CUDA events on the measured device's stream (read after one
  synchronisation at the end, so timing never stalls the queue), or with time.perf_counter on the CPU.
- Memory: on a GPU the caching allocator's peaks (allocated by tensors, and reserved); on the CPU the process's
  peak resident set, reset through /proc/self/clear_refs (Linux).
- Out of memory is recognised however it is reported (torch.OutOfMemoryError, or a library's RuntimeError).
"""

from __future__ import annotations

import contextlib
import gc
import time
from pathlib import Path
from typing import Any, Callable

import torch

MIN_TIMED_STEPS = 5  # a distribution needs a few points even when --min-time is tiny


class Stopwatch:
    """Times calls on one device. CPU: perf_counter now. CUDA: a pair of events per call, read in `resolve`
    after a single synchronisation, so that timing does not insert a sync between steps. The events go on
    the current stream of the measured device (the one its kernels run on), which is not the current
    device's when measuring cuda:1 from a process whose current device is cuda:0."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"

    def time(self, fn: Callable[[], Any]) -> Any:
        if self.cuda:
            stream = torch.cuda.current_stream(self.device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            fn()
            end.record(stream)
            return start, end
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1000.0

    def resolve(self, handles: list[Any]) -> list[float]:
        if not self.cuda:
            return list(handles)
        torch.cuda.synchronize(self.device)
        return [start.elapsed_time(end) for start, end in handles]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Callable[[], Any], device: torch.device, *, warmup: int, iters: int,
               min_time_s: float | None = None, reference: Callable[[], Any] | None = None
               ) -> tuple[list[float], list[float]]:
    """Per-step latencies (ms) of `step` after `warmup` untimed steps, and of `reference` when given (run
    right after each model step, so both see the same machine state). Runs `iters` steps, or with
    min_time_s until that much wall time has passed and at least MIN_TIMED_STEPS were taken."""
    for _ in range(warmup):
        step()
        if reference is not None:
            reference()
    synchronize(device)
    watch = Stopwatch(device)
    step_handles, reference_handles = [], []
    started = time.perf_counter()
    while True:
        step_handles.append(watch.time(step))
        if reference is not None:
            reference_handles.append(watch.time(reference))
        taken = len(step_handles)
        if min_time_s is None:
            if taken >= iters:
                break
        elif taken >= MIN_TIMED_STEPS and time.perf_counter() - started >= min_time_s:
            break
    return watch.resolve(step_handles), watch.resolve(reference_handles)


def time_once(fn: Callable[[], Any], device: torch.device) -> float:
    """Wall time of one call in ms, synchronised on both sides (used for the first call / compile)."""
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return (time.perf_counter() - t0) * 1000.0


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    # Linux: writing 5 to clear_refs resets the process's peak resident set size (VmHWM).
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_memory(device: torch.device) -> tuple[int | None, int | None]:
    """(peak allocated, peak reserved) bytes on a GPU; (process peak resident set, None) on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024, None
    except OSError:
        pass
    try:
        import resource  # not resettable: the peak of the whole process so far (kB on Linux)

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, None
    except (ImportError, OSError):
        return None, None


def current_memory(device: torch.device) -> int | None:
    """Bytes in use now: allocated by tensors on a GPU, the process's resident set on the CPU."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# How an allocation failure reads when it is not torch.OutOfMemoryError: the CPU allocator, a raw CUDA call
# ("CUDA error: out of memory"), and cuDNN / cuBLAS failing to get their workspace or handle.
_OUT_OF_MEMORY_MESSAGES = ("out of memory", "can't allocate memory", "cudnn_status_alloc_failed",
                           "cublas_status_alloc_failed")


def is_out_of_memory(err: BaseException) -> bool:
    """torch.OutOfMemoryError (the CUDA caching allocator), or an allocation failure reported as a plain
    RuntimeError (see _OUT_OF_MEMORY_MESSAGES)."""
    if isinstance(err, torch.OutOfMemoryError):
        return True
    message = str(err).lower()
    return isinstance(err, RuntimeError) and any(text in message for text in _OUT_OF_MEMORY_MESSAGES)
