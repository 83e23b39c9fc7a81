"""Device and precision names shared by the engines (bench, profile, predict, eval)."""

from __future__ import annotations

import contextlib

import torch

from .errors import ConfigError

# --precision name -> the dtype torch.autocast runs in; fp32 runs without autocast.
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}

ALL_KINDS = ("cpu", "cuda", "mps", "xpu")


def resolve_device(name: str | None = "auto", kinds: tuple[str, ...] = ALL_KINDS) -> torch.device:
    """None or "auto" -> cuda:0 when a GPU is present, else the CPU. Otherwise `name` ("cpu", "cuda",
    "cuda:N", ...) must be one of `kinds` and exist here; ConfigError says what to use instead."""
    if name is None or name.strip().lower() == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    text = name.strip().lower()
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in kinds:
        raise ConfigError(f"unknown device {name!r}; use {', '.join(kinds)} or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {text!r} requested but no CUDA GPU is available "
                              "(torch.cuda.is_available() is False); use --device cpu")
        index = device.index or 0
        if index >= torch.cuda.device_count():
            raise ConfigError(f"device {text!r} does not exist: {torch.cuda.device_count()} CUDA device(s) visible")
        return torch.device("cuda", index)
    return device


def precision_note(device: str | torch.device, precision: str) -> str | None:
    """One line for a user who asked for `precision` on `device` where the hardware does not run it natively
    (see poolformer.capabilities: bf16/fp16 on CPUs without AVX512-BF16/AMX run converted or emulated),
    or None where it runs natively. GPUs that lack a precision are refused earlier (bench.check_precision)."""
    if torch.device(device).type != "cpu" or precision == "fp32":
        return None
    from .capabilities import cpu_capabilities, precision_note as cpu_note

    return cpu_note(cpu_capabilities(), precision)


def precision_is_emulated(device: str | torch.device, precision: str) -> bool:
    """True where `precision` on `device` falls back to reference kernels many times slower than fp32."""
    if torch.device(device).type != "cpu" or precision == "fp32":
        return False
    from .capabilities import cpu_capabilities, precision_support

    return precision_support(cpu_capabilities(), precision) == "emulated"


def autocast(device: str | torch.device, precision: str) -> contextlib.AbstractContextManager:
    """torch.autocast in `precision` on the device's type; a no-op for fp32."""
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)
