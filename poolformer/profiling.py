"""Where the time goes: one benchmark configuration under torch.profiler, summarised per operator.

Times are *self* times (the time spent in an operator itself, not in the operators it calls), so the shares
add up to 100% without double counting: aten::conv2d, for example, has almost no self time because the work
is done in the convolution kernel it calls. On a GPU the self time is the device (kernel) time of the kernels
an operator launched itself; on the CPU it is the host time. (With CUDA activity the profiler also lists every
kernel as an event of its own, carrying the same time again: those rows are left out and only give the total;
kernels launched outside any operator appear as one row of their own.) Operators are also grouped into categories (convolution, normalisation, pooling,
elementwise, ...) to show why a PoolFormer is slower than its MACs suggest: the normalisations, the pooling
mixer and the elementwise ops (LayerScale, residual adds, GELU) do few MACs but move a lot of memory.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .bench import BenchConfig, BuildModel, describe, make_input, prepare_model
from .devices import autocast
from .files import replace_atomically
from .measure import synchronize

# first match wins; matched against the lower-case operator name without the "aten::" prefix
_CATEGORIES = (
    ("convolution", ("conv", "mkldnn_convolution", "cudnn_convolution")),
    ("normalisation", ("group_norm", "layer_norm", "batch_norm", "native_norm", "rms_norm")),
    ("pooling", ("pool",)),
    ("matmul", ("addmm", "matmul", "mm", "linear", "bmm", "baddbmm", "scaled_dot_product")),
    ("elementwise", ("add", "sub", "mul", "div", "gelu", "relu", "silu", "sigmoid", "tanh", "pow", "sqrt",
                     "rsqrt", "exp", "clamp", "where", "softmax", "neg", "mean", "sum", "var")),
    ("memory", ("copy", "contiguous", "empty", "clone", "cat", "reshape", "view", "permute", "transpose",
                "flatten", "expand", "as_strided", "fill", "zero")),
)
_EXACT = {"to": "memory", "to_copy": "memory"}  # too short to match as substrings


@dataclass
class OperatorTime:
    name: str
    category: str
    self_ms: float  # per profiled step
    calls: int  # per profiled step
    share: float  # fraction of the total self time, 0..1


@dataclass
class ProfileReport:
    config: BenchConfig
    steps: int
    time_kind: str  # "cpu" (host self time) or "cuda" (kernel self time)
    total_ms: float  # total self time per step
    operators: list[OperatorTime]  # slowest first
    categories: dict[str, float] = field(default_factory=dict)  # category -> share of total, largest first
    trace_path: str | None = None


def _matches(needle: str, name: str) -> bool:
    """A needle matches inside a word of the name; "mm" only at a word's end (addmm, bmm, _scaled_mm), so that
    CUPTI's "Command Buffer Full" is no matmul."""
    words = re.split(r"[^a-z0-9_]+", name)
    return any(word.endswith(needle) if needle == "mm" else needle in word for word in words)


def categorize(op_name: str) -> str:
    """'aten::native_group_norm' -> 'normalisation'; unknown operators -> 'other'."""
    name = op_name.lower().split("::")[-1].lstrip("_")
    if name in _EXACT:
        return _EXACT[name]
    for category, needles in _CATEGORIES:
        if any(_matches(needle, name) for needle in needles):
            return category
    return "other"


def profile_model(config: BenchConfig, *, warmup: int = 3, steps: int = 5, trace_path: str | Path | None = None,
                  build_model: BuildModel | None = None) -> ProfileReport:
    """Profile `steps` forward passes of `config` after `warmup` unprofiled ones. trace_path: also write a
    Chrome trace (open in chrome://tracing or https://ui.perfetto.dev), atomically."""
    from torch.profiler import ProfilerActivity, profile

    # Kineto, the profiler's backend, reads its log level when it first starts; at its default it writes its
    # start/stop lines and, without a GPU, a "gpuGetDeviceCount failed" ERROR to stderr, noise in the middle of
    # the command's output. 6 is above every level it logs at; set KINETO_LOG_LEVEL to see them.
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    if warmup < 0 or steps < 1:
        raise ValueError("profile needs warmup >= 0 and steps >= 1")
    device = torch.device(config.device)
    model = prepare_model(config, build_model)
    x = make_input(config)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.inference_mode(), autocast(config.device, config.precision):
        for _ in range(warmup):
            model(x)
        synchronize(device)
        with profile(activities=activities) as prof:
            for _ in range(steps):
                model(x)
            synchronize(device)
    report = summarize(prof.key_averages(), steps, "cuda" if device.type == "cuda" else "cpu", config)
    if trace_path is not None:
        report.trace_path = _export_trace(prof, Path(trace_path))
    return report


UNATTRIBUTED_KERNELS = "(kernels launched outside any operator)"
# CUPTI's own ranges that kernel time lands in: a launch that waited for room in a full launch queue (eager
# PyTorch at large batch on a GPU) is timed under this range, not under the operator that made it
CUPTI_RANGES = {"Command Buffer Full": "(kernels launched while the launch queue was full)"}


def _self_time_us(event: Any, time_kind: str) -> float:
    if time_kind == "cuda":
        # torch >= 2.4 names it self_device_time_total; the old name warns (and is gone in newer releases)
        name = "self_device_time_total" if hasattr(event, "self_device_time_total") else "self_cuda_time_total"
        return float(getattr(event, name, 0.0))
    return float(event.self_cpu_time_total)


def _is_device_event(event: Any) -> bool:
    """A kernel, memcpy or memset as the GPU ran it (not the host-side operator that launched it)."""
    device_type = getattr(event, "device_type", None)
    return device_type is not None and getattr(device_type, "name", str(device_type)).split(".")[-1] != "CPU"


def _host_rows(events: Any, time_kind: str) -> list[tuple[str, float, int]]:
    """(operator, self µs, calls) of every host-side operator with self time. With CUDA times, each kernel
    is listed twice by the profiler: inside the operator that launched it and as a device event of its own;
    only the operators are kept, and kernels no operator claims (graph replays, compiled code launching
    kernels directly) become one row, so the rows add up to the GPU's total kernel time."""
    events = [e for e in events if not getattr(e, "is_user_annotation", False)]
    rows = [(CUPTI_RANGES.get(e.key, e.key), _self_time_us(e, time_kind), e.count) for e in events
            if not _is_device_event(e)]
    rows = [(name, us, count) for name, us, count in rows if us > 0]
    if time_kind == "cuda":
        device_us = sum(_self_time_us(e, time_kind) for e in events if _is_device_event(e))
        unattributed_us = device_us - sum(us for _, us, _ in rows)
        if unattributed_us > 1e-3 * device_us:
            rows.append((UNATTRIBUTED_KERNELS, unattributed_us, 0))
    return rows


def summarize(events: Any, steps: int, time_kind: str, config: BenchConfig) -> ProfileReport:
    """Per-operator self time, calls and share from profiler key averages, slowest first."""
    rows = _host_rows(events, time_kind)
    total_us = sum(us for _, us, _ in rows) or 1.0
    operators = sorted((OperatorTime(name, categorize(name), us / 1000.0 / steps, round(count / steps), us / total_us)
                        for name, us, count in rows), key=lambda op: op.self_ms, reverse=True)
    categories: dict[str, float] = {}
    for op in operators:
        categories[op.category] = categories.get(op.category, 0.0) + op.share
    categories = dict(sorted(categories.items(), key=lambda item: item[1], reverse=True))
    return ProfileReport(config=config, steps=steps, time_kind=time_kind, total_ms=total_us / 1000.0 / steps,
                         operators=operators, categories=categories)


def _export_trace(prof: Any, path: Path) -> str:
    """The Chrome trace written atomically (poolformer.files): a path ending in .gz gets it gzipped, as
    torch.profiler does for such names, since the temporary file keeps the target's suffix."""
    path = path.expanduser()
    replace_atomically(path, prof.export_chrome_trace)
    return str(path)


# ------------------------------------------------------------------------------------ the fast path's kernels


@dataclass
class KernelProfile:
    """`--impl fast` on its Triton kernels, kernel by kernel (poolformer.fast.roofline.time_kernels): per
    (stage, kernel) the launches, ms per forward, share, bytes moved, TB/s and TFLOP/s."""

    config: BenchConfig
    repeats: int
    total_ms: float  # the launches' medians, summed: one forward
    host_ahead: bool  # False: the host fell behind the GPU in some forwards, so the times are upper bounds
    kernels: list[dict]


def profile_fast_kernels(config: BenchConfig, *, repeats: int = 10,
                         build_model: BuildModel | None = None) -> KernelProfile:
    """Time every kernel of `config`'s forward on its own (CUDA events after each launch, CUDA graphs off, the
    first forward untimed). Needs --impl fast running on the Triton backend: a CUDA GPU, or Triton's
    interpreter on CPU tensors (POOLFORMER_TRITON_INTERPRET=1; host clocks then)."""
    from .errors import ConfigError
    from .fast.roofline import kernel_table, time_kernels

    if repeats < 1:
        raise ValueError("profile --kernels needs repeats >= 1")
    if config.impl != "fast":
        raise ConfigError(f"--kernels times the fast path's own kernels: use --impl fast, not --impl {config.impl}")
    model = prepare_model(config, build_model)
    x = make_input(config)
    backend = describe(config, model).backend
    if backend is None:  # a build_model that gives something else
        raise ConfigError("--kernels times the fast path's own kernels, and this model is not the fast path")
    if backend != "triton":
        raise ConfigError(f"--kernels needs the fast path's Triton kernels, and {config.precision} on "
                          f"{config.device} runs the {backend!r} backend (they run on CUDA GPUs, or in "
                          "Triton's interpreter with POOLFORMER_TRITON_INTERPRET=1)")
    with torch.inference_mode(), autocast(config.device, config.precision):
        times = time_kernels(model, x, repeats=repeats)
    return KernelProfile(config, repeats, times.total_ms, times.host_ahead, kernel_table(times))
