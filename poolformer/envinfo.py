"""The environment a measurement was taken in, and GPU telemetry through NVML.

`environment()` is stored in every benchmark result file so that a number can always be traced back to the
software, hardware and settings that produced it. `NvmlTelemetry` samples SM and memory clocks, temperature,
power, utilisation and throttle reasons while a configuration runs. NVML (`pynvml`, package nvidia-ml-py) is
optional: where the module, the driver library or a single field is missing, the value is None and the
reason is recorded. NVML numbers GPUs in PCI order and CUDA by CUDA_VISIBLE_DEVICES / speed, so a CUDA device
is found in NVML by its UUID, not its index.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import subprocess
import threading
from dataclasses import asdict, dataclass
from functools import lru_cache
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


@lru_cache(maxsize=1)
def git_commit() -> str | None:
    """The commit of the checkout poolformer runs from ('+dirty' when files differ), or None if not a checkout.

    Asked once per process: every bench run records it, and two git processes per run add up in a long process
    (the test suite runs hundreds)."""
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
    from .capabilities import cpu_capabilities, cpu_model

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
        # fp32 convolutions on a GPU run in TF32 (10-bit mantissa) unless this is False: "fp32" rows depend on it
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "cuda_matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
    }
    env["cpu"] = cpu_capabilities().to_dict()  # instruction sets and native bf16/fp16: they decide CPU speed
    if device.startswith("cuda"):
        index = torch.device(device).index or 0
        gpu = {**gpu_info(index, cuda_uuid(index)), **cuda_properties(index)}
        if gpu.get("memory_bandwidth_tb_s") is None:  # no NVML here: the same figure from torch's properties
            gpu["memory_bandwidth_tb_s"] = gpu["torch_memory_bandwidth_tb_s"]
        env["gpu"] = gpu
    return env


def memory_bandwidth_tb_s(max_memory_clock_mhz: int | None, bus_width_bits: int | None) -> float | None:
    """Peak DRAM bandwidth (10^12 B/s) from the memory clock and bus width: two transfers per clock (HBM and
    GDDR as NVML reports their clocks). H100 SXM: 2619 MHz x 5120 bits -> 3.35 TB/s, its datasheet figure."""
    if not max_memory_clock_mhz or not bus_width_bits:
        return None
    return max_memory_clock_mhz * 1e6 * 2 * bus_width_bits / 8 / 1e12


def cuda_properties(index: int) -> dict[str, Any]:
    """What torch knows about CUDA device `index`: compute capability, multiprocessors, memory, and the peak
    memory bandwidth from its memory clock (kHz) and bus width where this torch reports them (else None)."""
    import torch

    props = torch.cuda.get_device_properties(index)
    memory_clock_khz = getattr(props, "memory_clock_rate", None)
    bandwidth = memory_bandwidth_tb_s(memory_clock_khz and memory_clock_khz / 1000,
                                      getattr(props, "memory_bus_width", None))
    return {"compute_capability": f"{props.major}.{props.minor}", "multiprocessors": props.multi_processor_count,
            "torch_memory_total_bytes": props.total_memory, "torch_memory_bandwidth_tb_s": bandwidth}


def cuda_uuid(index: int) -> str | None:
    """NVML's UUID ("GPU-...") of CUDA device `index`, or None where torch does not report one."""
    import torch

    try:
        uuid = str(torch.cuda.get_device_properties(index).uuid)
    except Exception:  # no such attribute in this torch, or no device
        return None
    return uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}"


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
    """One NVML query; None where the GPU, the driver or this nvidia-ml-py does not support it."""
    if call is None:
        return None
    try:
        value = call(*args)
    except Exception:
        return None
    return value.decode() if isinstance(value, bytes) else value


def _call(nvml: Any, function: str, *args) -> Any:
    """nvml.function(*args) as `_field` does it; None also where this nvidia-ml-py lacks the function."""
    return _field(getattr(nvml, function, None), *args)


def _handle(nvml: Any, index: int, uuid: str | None) -> Any:
    """NVML's handle for the CUDA device with this UUID; by index where no UUID is known or it is not found
    (the same GPU when CUDA_VISIBLE_DEVICES is unset on a machine with one GPU)."""
    if uuid is not None:
        handle = _call(nvml, "nvmlDeviceGetHandleByUUID", uuid)
        if handle is not None:
            return handle
    return _call(nvml, "nvmlDeviceGetHandleByIndex", index)


def gpu_info(index: int = 0, uuid: str | None = None) -> dict[str, Any]:
    """Static facts about a GPU from NVML: name, driver, CUDA driver version, memory, top clocks and the power
    limit. index: the CUDA device index; uuid: its NVML UUID (see cuda_uuid), which wins when given."""
    nvml, reason = _nvml()
    if nvml is None:
        return {"nvml": False, "reason": reason}
    handle = _handle(nvml, index, uuid)
    if handle is None:
        return {"nvml": False, "reason": f"no NVML handle for CUDA device {index}" + (f" ({uuid})" if uuid else "")}
    memory = _call(nvml, "nvmlDeviceGetMemoryInfo", handle)
    cuda_driver = _call(nvml, "nvmlSystemGetCudaDriverVersion")
    power_limit_mw = _call(nvml, "nvmlDeviceGetEnforcedPowerLimit", handle)
    max_memory_clock = _call(nvml, "nvmlDeviceGetMaxClockInfo", handle, getattr(nvml, "NVML_CLOCK_MEM", 2))
    bus_width = _call(nvml, "nvmlDeviceGetMemoryBusWidth", handle)
    return {
        "nvml": True,
        "name": _call(nvml, "nvmlDeviceGetName", handle),
        "uuid": _call(nvml, "nvmlDeviceGetUUID", handle),
        "driver": _call(nvml, "nvmlSystemGetDriverVersion"),
        "cuda_driver": f"{cuda_driver // 1000}.{cuda_driver % 1000 // 10}" if cuda_driver else None,
        "memory_total_bytes": getattr(memory, "total", None),
        "max_sm_clock_mhz": _call(nvml, "nvmlDeviceGetMaxClockInfo", handle, getattr(nvml, "NVML_CLOCK_SM", 1)),
        "max_memory_clock_mhz": max_memory_clock,
        "memory_bus_width_bits": bus_width,
        "memory_bandwidth_tb_s": memory_bandwidth_tb_s(max_memory_clock, bus_width),
        "power_limit_w": None if power_limit_mw is None else power_limit_mw / 1000.0,
    }


@dataclass
class TelemetrySample:
    sm_clock_mhz: int | None
    memory_clock_mhz: int | None
    temperature_c: int | None
    power_w: float | None
    gpu_utilisation_pct: int | None  # share of the last sample period with a kernel running
    memory_utilisation_pct: int | None  # share of the last sample period with device memory being read/written
    throttle_reasons: list[str] | None  # None: NVML could not say (not: no throttling)


@dataclass
class TelemetrySummary:
    """What the GPU did while one configuration ran. Empty (all None) where NVML is absent."""

    available: bool
    reason: str | None = None
    samples: int = 0
    sm_clock_mhz_min: int | None = None
    sm_clock_mhz_median: float | None = None
    memory_clock_mhz_median: float | None = None
    temperature_c_max: int | None = None
    power_w_mean: float | None = None
    power_w_max: float | None = None
    gpu_utilisation_pct_mean: float | None = None
    memory_utilisation_pct_mean: float | None = None
    throttle_reasons: list[str] | None = None  # every reason seen in any sample; None: never readable

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _throttle_mask(nvml: Any, handle: Any) -> int | None:
    """NVML renamed "clocks throttle reasons" to "clocks event reasons" (same bits); either may be missing."""
    for name in ("nvmlDeviceGetCurrentClocksEventReasons", "nvmlDeviceGetCurrentClocksThrottleReasons"):
        mask = _call(nvml, name, handle)
        if mask is not None:
            return mask
    return None


def _sample(nvml: Any, handle: Any) -> TelemetrySample:
    power_mw = _call(nvml, "nvmlDeviceGetPowerUsage", handle)
    mask = _throttle_mask(nvml, handle)
    utilisation = _call(nvml, "nvmlDeviceGetUtilizationRates", handle)
    return TelemetrySample(
        sm_clock_mhz=_call(nvml, "nvmlDeviceGetClockInfo", handle, getattr(nvml, "NVML_CLOCK_SM", 1)),
        memory_clock_mhz=_call(nvml, "nvmlDeviceGetClockInfo", handle, getattr(nvml, "NVML_CLOCK_MEM", 2)),
        temperature_c=_call(nvml, "nvmlDeviceGetTemperature", handle, getattr(nvml, "NVML_TEMPERATURE_GPU", 0)),
        power_w=None if power_mw is None else power_mw / 1000.0,
        gpu_utilisation_pct=getattr(utilisation, "gpu", None),
        memory_utilisation_pct=getattr(utilisation, "memory", None),
        throttle_reasons=None if mask is None else [name for bit, name in _THROTTLE_REASONS.items() if mask & bit],
    )


def _present(samples: list[TelemetrySample], name: str) -> list:
    return [getattr(s, name) for s in samples if getattr(s, name) is not None]


def summarize(samples: list[TelemetrySample]) -> TelemetrySummary:
    """Clocks, peak temperature, power, utilisation and every throttle reason seen, ignoring missing fields."""
    clocks, memory_clocks = _present(samples, "sm_clock_mhz"), _present(samples, "memory_clock_mhz")
    temps, powers = _present(samples, "temperature_c"), _present(samples, "power_w")
    gpu_util, memory_util = _present(samples, "gpu_utilisation_pct"), _present(samples, "memory_utilisation_pct")
    reasons = _present(samples, "throttle_reasons")
    return TelemetrySummary(
        available=True, samples=len(samples),
        sm_clock_mhz_min=min(clocks) if clocks else None,
        sm_clock_mhz_median=statistics.median(clocks) if clocks else None,
        memory_clock_mhz_median=statistics.median(memory_clocks) if memory_clocks else None,
        temperature_c_max=max(temps) if temps else None,
        power_w_mean=statistics.fmean(powers) if powers else None,
        power_w_max=max(powers) if powers else None,
        gpu_utilisation_pct_mean=statistics.fmean(gpu_util) if gpu_util else None,
        memory_utilisation_pct_mean=statistics.fmean(memory_util) if memory_util else None,
        throttle_reasons=sorted({r for seen in reasons for r in seen}) if reasons else None,
    )


class NvmlTelemetry:
    """Samples a GPU every `period_s` in a background thread, from entry to exit (one sample on entry and one
    on exit, so even a configuration shorter than the period is seen while it runs, not only before).

    index: the CUDA device index; uuid: its NVML UUID (see cuda_uuid), found by UUID when given. Use as a
    context manager; `summary` holds the result after exit. Without NVML it does nothing and the summary
    says why.
    """

    def __init__(self, index: int = 0, period_s: float = 0.1, uuid: str | None = None):
        self.index, self.period_s, self.uuid = index, period_s, uuid
        self.summary = TelemetrySummary(available=False)
        self._samples: list[TelemetrySample] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._nvml: Any = None
        self._handle: Any = None

    def __enter__(self) -> "NvmlTelemetry":
        nvml, reason = _nvml()
        handle = _handle(nvml, self.index, self.uuid) if nvml is not None else None
        if handle is None:
            self.summary = TelemetrySummary(available=False, reason=reason or f"no NVML handle for GPU {self.index}")
            return self
        self._nvml, self._handle = nvml, handle
        self._samples = [_sample(nvml, handle)]
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            self._samples.append(_sample(self._nvml, self._handle))

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._samples.append(_sample(self._nvml, self._handle))
            self.summary = summarize(self._samples)
