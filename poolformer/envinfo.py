"""The environment a measurement was taken in, and GPU telemetry through NVML.

`environment()` is stored in every benchmark result file so that a number can always be traced back to the
software, hardware and settings that produced it. `NvmlTelemetry` samples SM clock, temperature, power and
throttle reasons while a configuration runs. NVML (`pynvml`, package nvidia-ml-py) is optional: where the
module, the driver library or a single field is missing, the value is None and the reason is recorded.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import subprocess
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# NVML throttle-reason bits (nvml.h, nvmlClocksThrottleReason*), named here so the report reads as words.
_THROTTLE_REASONS = {
    0x1: "gpu_idle",
    0x2: "applications_clocks_setting",
    0x4: "sw_power_cap",
    0x8: "hw_slowdown",
    0x10: "sync_boost",
    0x20: "sw_thermal_slowdown",
    0x40: "hw_thermal_slowdown",
    0x80: "hw_power_brake_slowdown",
    0x100: "display_clock_setting",
}


def cpu_model() -> str | None:
    """The CPU's marketing name from /proc/cpuinfo (Linux), else platform.processor()."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def git_commit() -> str | None:
    """The commit of the checkout poolformer runs from ('+dirty' when files differ), or None if not a checkout."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "") if commit else None


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:  # not installed, or no metadata
        return None


def environment(device: str) -> dict[str, Any]:
    """Versions, hardware and settings that affect speed, as a JSON-ready dict. device: 'cpu' or 'cuda:N'."""
    import torch

    from . import __version__

    env: dict[str, Any] = {
        "poolformer": __version__,
        "torch": torch.__version__,
        "timm": _version("timm"),
        "python": platform.python_version(),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "device": device,
        "device_name": torch.cuda.get_device_name(device) if device.startswith("cuda") else cpu_model(),
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "matmul_precision": torch.get_float32_matmul_precision(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
    }
    from .capabilities import cpu_capabilities

    env["cpu"] = cpu_capabilities().to_dict()  # instruction sets and native bf16/fp16: they decide CPU speed
    if device.startswith("cuda"):
        env["gpu"] = gpu_info(torch.device(device).index or 0)
    return env


# --------------------------------------------------------------------------------------------- NVML


def _nvml() -> tuple[Any | None, str | None]:
    """(initialised pynvml module, None) or (None, why NVML cannot be used)."""
    try:
        import pynvml
    except ImportError:
        return None, "pynvml (nvidia-ml-py) is not installed"
    try:
        pynvml.nvmlInit()
    except Exception as err:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
        return None, f"NVML unavailable: {type(err).__name__}: {err}".strip()
    return pynvml, None


def _field(call, *args) -> Any:
    """One NVML query; None where the GPU or driver does not support it."""
    try:
        value = call(*args)
    except Exception:
        return None
    return value.decode() if isinstance(value, bytes) else value


def gpu_info(index: int = 0) -> dict[str, Any]:
    """Static facts about GPU `index` from NVML: name, driver, CUDA driver version, total memory."""
    nvml, reason = _nvml()
    if nvml is None:
        return {"nvml": False, "reason": reason}
    handle = _field(nvml.nvmlDeviceGetHandleByIndex, index)
    memory = _field(nvml.nvmlDeviceGetMemoryInfo, handle) if handle is not None else None
    cuda_driver = _field(nvml.nvmlSystemGetCudaDriverVersion)
    return {
        "nvml": True,
        "name": _field(nvml.nvmlDeviceGetName, handle) if handle is not None else None,
        "driver": _field(nvml.nvmlSystemGetDriverVersion),
        "cuda_driver": f"{cuda_driver // 1000}.{cuda_driver % 1000 // 10}" if cuda_driver else None,
        "memory_total_bytes": getattr(memory, "total", None),
    }


@dataclass
class TelemetrySample:
    sm_clock_mhz: int | None
    temperature_c: int | None
    power_w: float | None
    throttle_reasons: list[str]


@dataclass
class TelemetrySummary:
    """What the GPU did while one configuration ran. Empty (all None) where NVML is absent."""

    available: bool
    reason: str | None = None
    samples: int = 0
    sm_clock_mhz_min: int | None = None
    sm_clock_mhz_median: float | None = None
    temperature_c_max: int | None = None
    power_w_mean: float | None = None
    throttle_reasons: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _sample(nvml: Any, handle: Any) -> TelemetrySample:
    power_mw = _field(nvml.nvmlDeviceGetPowerUsage, handle)
    mask = _field(nvml.nvmlDeviceGetCurrentClocksThrottleReasons, handle) or 0
    return TelemetrySample(
        sm_clock_mhz=_field(nvml.nvmlDeviceGetClockInfo, handle, getattr(nvml, "NVML_CLOCK_SM", 1)),
        temperature_c=_field(nvml.nvmlDeviceGetTemperature, handle, getattr(nvml, "NVML_TEMPERATURE_GPU", 0)),
        power_w=None if power_mw is None else power_mw / 1000.0,
        throttle_reasons=[name for bit, name in _THROTTLE_REASONS.items() if mask & bit],
    )


def summarize(samples: list[TelemetrySample]) -> TelemetrySummary:
    """Min/median clock, peak temperature, mean power and every throttle reason seen, ignoring missing fields."""
    clocks = [s.sm_clock_mhz for s in samples if s.sm_clock_mhz is not None]
    temps = [s.temperature_c for s in samples if s.temperature_c is not None]
    powers = [s.power_w for s in samples if s.power_w is not None]
    reasons = sorted({r for s in samples for r in s.throttle_reasons})
    return TelemetrySummary(
        available=True, samples=len(samples),
        sm_clock_mhz_min=min(clocks) if clocks else None,
        sm_clock_mhz_median=statistics.median(clocks) if clocks else None,
        temperature_c_max=max(temps) if temps else None,
        power_w_mean=statistics.fmean(powers) if powers else None,
        throttle_reasons=reasons,
    )


class NvmlTelemetry:
    """Samples GPU `index` every `period_s` in a background thread between start() and stop().

    Use as a context manager; `summary` holds the result after exit. Without NVML it does nothing and the
    summary says why.
    """

    def __init__(self, index: int = 0, period_s: float = 0.1):
        self.index, self.period_s = index, period_s
        self.summary = TelemetrySummary(available=False)
        self._samples: list[TelemetrySample] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "NvmlTelemetry":
        nvml, reason = _nvml()
        handle = _field(nvml.nvmlDeviceGetHandleByIndex, self.index) if nvml is not None else None
        if handle is None:
            self.summary = TelemetrySummary(available=False, reason=reason or f"no NVML handle for GPU {self.index}")
            return self
        self._samples = [_sample(nvml, handle)]
        self._thread = threading.Thread(target=self._run, args=(nvml, handle), daemon=True)
        self._thread.start()
        return self

    def _run(self, nvml: Any, handle: Any) -> None:
        while not self._stop.wait(self.period_s):
            self._samples.append(_sample(nvml, handle))

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.summary = summarize(self._samples)
