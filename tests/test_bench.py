"""poolformer.bench / envinfo / profiling and the `bench` and `profile` commands.

Measurements use s12 at batch 1-2, 64x64 and a handful of steps; nothing here asserts a wall-clock value.
Failure modes (out of memory, a crashing model, Ctrl-C) are injected through extra entries in
poolformer.implementations.IMPLEMENTATIONS, which is how `--impl` finds implementations at run time.
The step timers and memory counters are poolformer.measure's.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import types
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from poolformer import bench, envinfo, measure
from poolformer.errors import ConfigError
from poolformer.implementations import IMPLEMENTATIONS, Implementation
from poolformer_cli.app import app

runner = CliRunner()
FAST = ["--device", "cpu", "--resolutions", "64", "--warmup", "1", "--iters", "3", "--threads", "1"]
REQUIRED_ROW_KEYS = {"model", "impl", "device", "batch_size", "resolution", "precision", "channels_last", "compile",
                     "status", "throughput", "latency_ms", "peak_memory_bytes"}
REQUIRED_ENV_KEYS = {"poolformer", "torch", "timm", "cuda", "cpu_model", "threads", "device", "cudnn_benchmark",
                     "matmul_precision", "cudnn_allow_tf32", "cuda_matmul_allow_tf32", "date", "git_commit"}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


class _Failing(nn.Module):
    """Wraps a model; raises `error()` when the batch reaches `at_batch`, else runs the model."""

    def __init__(self, model: nn.Module, at_batch: int, error):
        super().__init__()
        self.model, self.at_batch, self.error = model, at_batch, error

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] >= self.at_batch:
            raise self.error()
        return self.model(x)


class _Wrapping(Implementation):
    """An implementation that is `wrap(the reference model)`, prepared and described like ours."""

    def __init__(self, wrap):
        self.wrap = wrap

    def convert(self, model):
        return self.wrap(model)


def _register(monkeypatch, name: str, at_batch: int, error) -> None:
    monkeypatch.setitem(IMPLEMENTATIONS, name, _Wrapping(lambda model: _Failing(model, at_batch, error)))


def _oom() -> Exception:
    return torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


# ------------------------------------------------------------------------------------------ statistics


def test_latency_stats_match_numpy():
    steps = list(np.random.default_rng(0).gamma(2.0, 3.0, size=37))
    stats = bench.LatencyStats.from_steps(steps)
    assert stats.median == pytest.approx(np.median(steps))
    assert stats.p90 == pytest.approx(np.percentile(steps, 90))
    assert stats.iqr == pytest.approx(np.percentile(steps, 75) - np.percentile(steps, 25))
    assert stats.mean == pytest.approx(np.mean(steps))


def test_time_steps_excludes_warmup_and_keeps_every_step(monkeypatch):
    """A fake clock: the 2 warm-up steps 'take' 1000 ms, the timed ones 5, 6, 7, 8 ms, the reference 2 ms."""
    now = [0.0]
    monkeypatch.setattr(measure.time, "perf_counter", lambda: now[0])
    step_durations_s = iter([1.0, 1.0, 0.005, 0.006, 0.007, 0.008])  # a 7th call would raise StopIteration
    reference_calls = []

    def step():
        now[0] += next(step_durations_s)

    def reference():
        reference_calls.append(now[0])
        now[0] += 0.002

    steps_ms, reference_ms = measure.time_steps(step, torch.device("cpu"), warmup=2, iters=4, reference=reference)
    assert steps_ms == pytest.approx([5.0, 6.0, 7.0, 8.0])
    assert reference_ms == pytest.approx([2.0] * 4)
    assert len(reference_calls) == 6  # interleaved: once after every model step, warm-up included


def test_min_time_runs_until_time_passed(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(measure.time, "perf_counter", lambda: now[0])

    def step():
        now[0] += 0.1  # 100 ms per step on the fake clock

    steps_ms, _ = measure.time_steps(step, torch.device("cpu"), warmup=0, iters=1, min_time_s=1.25)
    assert len(steps_ms) == 13  # the first step that ends after 1.25 s of stepping is the 13th
    steps_ms, _ = measure.time_steps(step, torch.device("cpu"), warmup=0, iters=1, min_time_s=0.01)
    assert len(steps_ms) == measure.MIN_TIMED_STEPS


# ------------------------------------------------------------------------------------------ the engine


def _register_recording(monkeypatch, describe) -> list:
    """Implementation "recording": the model, noting describe(model, x) for every forward call."""
    seen = []

    class Recording(nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, x):
            seen.append(describe(self.model, x))
            return self.model(x)

    monkeypatch.setitem(IMPLEMENTATIONS, "recording", _Wrapping(Recording))
    return seen


def test_run_config_measures_the_requested_configuration(monkeypatch):
    seen = _register_recording(monkeypatch, lambda model, x: (
        tuple(x.shape), x.is_contiguous(memory_format=torch.channels_last),
        torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None))
    config = bench.BenchConfig("s12", "recording", "cpu", batch_size=2, resolution=64, precision="bf16",
                               channels_last=True)
    result = bench.run_config(config, bench.BenchSettings(warmup=2, iters=3))
    assert result.status == "ok", result.error
    assert len(seen) == 1 + 2 + 3 + 1  # first call, warm-up, timed steps, the parity check's untimed call
    assert set(seen) == {((2, 3, 64, 64), True, torch.bfloat16)}
    assert len(result.steps_ms) == 3
    assert result.latency_ms.median == pytest.approx(float(np.median(result.steps_ms)))
    assert result.throughput == pytest.approx(2 * 1000.0 / result.latency_ms.median)
    assert result.first_call_ms > 0 and result.peak_memory_bytes > 0
    assert result.latency_ms.p90 >= result.latency_ms.median


def test_noisy_flag_follows_the_iqr():
    settings = bench.BenchSettings(warmup=0, iters=3, noisy_iqr_ratio=0.0)
    result = bench.run_config(bench.BenchConfig("s12", batch_size=1, resolution=64), settings)
    assert result.noisy == (result.latency_ms.iqr > 0)
    settings.noisy_iqr_ratio = 1e9
    assert not bench.run_config(bench.BenchConfig("s12", batch_size=1, resolution=64), settings).noisy


@pytest.mark.slow
def test_compile_time_is_reported_apart(monkeypatch):
    """torch.compile path with the 'eager' backend (the default inductor needs a C++ toolchain and minutes)."""
    config = bench.BenchConfig("s12", batch_size=1, resolution=64, compile=True)
    result = bench.run_config(config, bench.BenchSettings(warmup=1, iters=2, compile_backend="eager"))
    assert result.status == "ok", result.error
    row = result.to_row()
    assert row["compile"] is True and row["compile_ms"] == result.first_call_ms > 0
    assert bench.run_config(bench.BenchConfig("s12", batch_size=1, resolution=64),
                            bench.BenchSettings(warmup=0, iters=1)).to_row()["compile_ms"] is None


@pytest.mark.slow
def test_oom_gives_an_oom_row_and_the_run_goes_on(monkeypatch):
    _register(monkeypatch, "oom_at_4", 4, _oom)
    configs = bench.expand_configs(["s12"], ["oom_at_4"], "cpu", [2, 4, 1], [64], ["fp32"], False, False)
    results = list(bench.run_benchmark(configs, bench.BenchSettings(warmup=0, iters=2)))
    assert [r.status for r in results] == ["ok", "oom", "ok"]
    assert results[1].throughput is None and "OutOfMemoryError" in results[1].error
    assert results[2].throughput > 0


def test_an_oom_row_leaves_no_model_behind(monkeypatch):
    """On an H200 the m48 model of an OOM row stayed in the model cache (294 MB held for the rest of the run,
    where memory had just run out); the row that runs out of memory now drops its model."""
    import weakref

    built = []

    def tracked(model):
        failing = _Failing(model, 4, _oom)
        built.append(weakref.ref(failing))
        return failing

    monkeypatch.setitem(IMPLEMENTATIONS, "tracked", _Wrapping(tracked))
    models = bench.ModelCache()
    settings = bench.BenchSettings(warmup=0, iters=1, parity=False)
    ok = list(bench.run_benchmark(bench.expand_configs(["s12"], ["tracked"], "cpu", [2], [64], ["fp32"], False, False),
                                  settings, models=models))
    assert ok[0].status == "ok" and len(models.models) == 1  # a model that worked stays for the next batch size
    oom = bench.expand_configs(["s24"], ["tracked"], "cpu", [4], [64], ["fp32"], False, False)
    assert [r.status for r in bench.run_benchmark(oom, settings, models=models)] == ["oom"]
    assert len(built) == 2 and built[1]() is None  # s24's model is gone, not only out of the cache
    assert [key.model for key in models.models] == ["s12"]


def test_cpu_allocator_failure_counts_as_oom_but_other_errors_do_not():
    assert measure.is_out_of_memory(RuntimeError("[enforce fail] DefaultCPUAllocator: can't allocate memory: 9 GB"))
    assert measure.is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert not measure.is_out_of_memory(RuntimeError("shape mismatch"))


def test_a_crashing_model_gives_an_error_row(monkeypatch):
    _register(monkeypatch, "crash", 1, lambda: RuntimeError("kernel exploded\nsecond line"))
    result = bench.run_config(bench.BenchConfig("s12", "crash", resolution=64), bench.BenchSettings(iters=1))
    assert result.status == "error" and result.error == "RuntimeError: kernel exploded"


@pytest.mark.parametrize("oom_at, limit, expected", [pytest.param(5, 64, 4, marks=pytest.mark.slow), (1, 64, None),
                                                       pytest.param(100, 8, 8, marks=pytest.mark.slow),
                                                       pytest.param(7, 64, 6, marks=pytest.mark.slow)])
def test_find_max_batch(monkeypatch, oom_at, limit, expected):
    _register(monkeypatch, "oom", oom_at, _oom)
    config = bench.BenchConfig("s12", "oom", resolution=64)
    assert bench.find_max_batch(config, limit=limit) == expected


@pytest.mark.slow
def test_max_batch_search_stops_at_a_kernel_limit_below_memory(monkeypatch):
    """Huge batches can fail before memory runs out (CUDA avg_pool2d refuses outputs over 2^31 elements: s12
    at 224 px above ~10,700 images). That used to abort the search, and `--max-batch` then benchmarked
    batch 1 as if it were the largest; now the search ends at the last batch that ran and says why."""
    _register(monkeypatch, "int32_at_7", 7, lambda: RuntimeError(
        "value cannot be converted to type int32_t without overflow"))
    found = bench.search_max_batch(bench.BenchConfig("s12", "int32_at_7", resolution=64), limit=64)
    assert found.batch_size == 6 and found.limited_by.startswith("batch 7: RuntimeError: value cannot be")
    _register(monkeypatch, "oom_at_5", 5, _oom)
    assert bench.search_max_batch(bench.BenchConfig("s12", "oom_at_5", resolution=64), limit=64).limited_by == "memory"
    assert bench.search_max_batch(bench.BenchConfig("s12", "oom_at_5", resolution=64), limit=4).limited_by == \
        "the limit (4)"
    result = _run([*FAST, "--impl", "int32_at_7", "--max-batch", "--max-batch-limit", "16", "--json"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert [r["batch_size"] for r in document["results"]] == [6]
    assert "int32_t" in list(document["env"]["max_batch_limited_by"].values())[0]


@pytest.mark.parametrize("message", ["CUDA error: out of memory", "cuDNN error: CUDNN_STATUS_ALLOC_FAILED",
                                     "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"])
def test_library_allocation_failures_count_as_out_of_memory(message):
    """cuDNN and cuBLAS report a failed workspace or handle allocation as a RuntimeError, not OutOfMemoryError."""
    assert measure.is_out_of_memory(RuntimeError(message))


@pytest.mark.slow
def test_a_sweep_builds_each_model_once_per_batch_size_sweep(monkeypatch):
    """Configurations that differ only in batch size share one built model (a build can take longer than the
    measurement); another precision, memory format or implementation gets its own; compiled ones never share."""
    builds = []

    def counting(model):
        builds.append(model.spec.name)
        return model

    monkeypatch.setitem(IMPLEMENTATIONS, "counting", _Wrapping(counting))
    settings = bench.BenchSettings(warmup=0, iters=1)
    configs = bench.expand_configs(["s12"], ["counting"], "cpu", [1, 2, 1], [64], ["fp32", "bf16"], False, False)
    results = list(bench.run_benchmark(configs, settings))
    # autocast leaves the model as built: fp32 and bf16 rows (and an emulated row's fp32 comparison) share it
    assert [r.status for r in results] == ["ok"] * 6 and len(builds) == 1
    builds.clear()
    cast = bench.expand_configs(["s12"], ["counting"], "cpu", [1, 2], [64], ["fp32", "bf16"], False, False, cast=True)
    assert [c.cast for c in cast] == [False, False, True, True]
    models = bench.ModelCache()
    for config in cast:  # one configuration per call, as the command line does
        list(bench.run_benchmark([config], bench.BenchSettings(warmup=0, iters=1, parity=False), models=models))
    assert len(builds) == 2  # fp32 (also for the emulated bf16 rows' fp32 comparison) and bf16 weights
    # (the kernel's VmRSS / VmHWM counters lag by up to a few pages per thread: no order between them on a CPU)
    assert all(r.start_memory_bytes > 0 and r.peak_memory_bytes > 0 for r in results)
    builds.clear()
    compiled = bench.expand_configs(["s12"], ["counting"], "cpu", [1, 2], [64], ["fp32"], False, True)
    list(bench.run_benchmark(compiled, bench.BenchSettings(warmup=0, iters=1, compile_backend="eager")))
    assert len(builds) == 2


def test_cuda_events_go_on_the_measured_devices_stream(monkeypatch):
    """Timing cuda:1 from a process whose current device is cuda:0: events recorded on the current device's
    stream would time nothing of the work. Fake CUDA: which stream each event is recorded on, which device is
    synchronised."""
    recorded, synchronised = [], []

    class Event:
        def __init__(self, enable_timing):
            self.stream = None

        def record(self, stream=None):
            self.stream = stream
            recorded.append(stream)

        def elapsed_time(self, end):
            return 2.5

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: f"stream of {device}")
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synchronised.append(device))
    watch = measure.Stopwatch(torch.device("cuda", 1))
    handles = [watch.time(lambda: None) for _ in range(2)]
    assert watch.resolve(handles) == [2.5, 2.5]
    assert recorded == ["stream of cuda:1"] * 4 and synchronised == [torch.device("cuda", 1)]


def test_normalised_mode_times_the_reference_workload():
    settings = bench.BenchSettings(warmup=0, iters=3, normalised=True)
    (result,) = bench.run_benchmark([bench.BenchConfig("s12", resolution=64)], settings)
    assert result.reference_ms > 0
    ratios = [ref / step for ref, step in zip(result.reference_steps_ms, result.steps_ms)]
    assert len(result.reference_steps_ms) == 3
    assert result.relative_throughput == pytest.approx(float(np.median(ratios)))  # batch 1


def test_device_and_precision_validation():
    assert bench.resolve_device("CPU") == "cpu"
    with pytest.raises(ConfigError, match="unknown device"):
        bench.resolve_device("tpu:0")
    if not torch.cuda.is_available():
        assert bench.resolve_device(None) == "cpu"
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            bench.resolve_device("cuda:0")
    with pytest.raises(ConfigError, match="unknown precision"):
        bench.check_precision("cpu", "fp8")
    bench.check_precision("cpu", "bf16")  # supported by every torch this package allows


@pytest.mark.gpu
def test_a_cuda_row_measures_speed_tensor_memory_and_parity():
    """On a GPU the row runs on CUDA: its throughput, the peak of tensor memory and its logits against the fp32
    reference (bf16 within parity's tolerance)."""
    result = bench.run_config(bench.BenchConfig("s12", "ours", "cuda", 2, 64, "bf16"), bench.BenchSettings(iters=3))
    assert result.status == "ok" and result.throughput > 0, result.error
    assert result.peak_memory_bytes > 0
    assert result.parity is not None and result.parity.ok


def test_precision_that_autocast_silently_ignores_is_rejected(monkeypatch):
    """Older torch builds warn and disable CPU autocast for fp16 instead of failing; we must notice."""
    real = torch.autocast
    monkeypatch.setattr(torch, "autocast", lambda device_type, dtype=None, **kw: real(device_type, enabled=False))
    with pytest.raises(ConfigError, match="fp16 autocast is not supported on cpu"):
        bench.check_precision("cpu", "fp16")


# ------------------------------------------------------------------------------------------ environment / NVML


def test_environment_block():
    env = envinfo.environment("cpu")
    assert REQUIRED_ENV_KEYS <= env.keys()
    assert env["torch"] == torch.__version__ and env["threads"] == torch.get_num_threads()
    assert env["git_commit"] is None or len(env["git_commit"].split("+")[0]) == 40


def test_nvml_absent_degrades_gracefully(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails
    info = envinfo.gpu_info(0)
    assert info["nvml"] is False and "not installed" in info["reason"]
    with envinfo.NvmlTelemetry(0) as telemetry:
        pass
    assert telemetry.summary.available is False and "not installed" in telemetry.summary.reason


def test_nvml_without_driver_degrades_gracefully():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU driver")
    pytest.importorskip("pynvml")
    info = envinfo.gpu_info(0)
    assert info["nvml"] is False and "NVML" in info["reason"]


class _NVMLError(Exception):
    pass


def _unsupported(*_):
    raise _NVMLError("Not Supported")


def _fake_nvml(**overrides):
    """A fake pynvml for two GPUs, in NVML's (PCI) order: GPU-aaa then GPU-bbb (an H100 at 1980/2619 MHz)."""
    uuids = ["GPU-aaa", "GPU-bbb"]
    functions = dict(
        nvmlInit=lambda: None, nvmlDeviceGetHandleByIndex=lambda i: uuids[i],
        nvmlDeviceGetHandleByUUID=lambda u: uuids[uuids.index(u)], nvmlDeviceGetUUID=lambda h: h,
        NVML_CLOCK_SM=1, NVML_CLOCK_MEM=2, NVML_TEMPERATURE_GPU=0,
        nvmlDeviceGetClockInfo=lambda h, kind: {1: 1980, 2: 2619}[kind],
        nvmlDeviceGetMaxClockInfo=lambda h, kind: {1: 1980, 2: 2619}[kind],
        nvmlDeviceGetTemperature=lambda h, sensor: 61, nvmlDeviceGetPowerUsage=lambda h: 650_000,
        nvmlDeviceGetEnforcedPowerLimit=lambda h: 700_000, nvmlDeviceGetMemoryBusWidth=lambda h: 5120,
        nvmlDeviceGetUtilizationRates=lambda h: types.SimpleNamespace(gpu=97, memory=60),
        nvmlDeviceGetCurrentClocksThrottleReasons=lambda h: 0x4 | 0x40,
        nvmlDeviceGetName=lambda h: {"GPU-aaa": b"NVIDIA A100", "GPU-bbb": b"NVIDIA H100"}[h],
        nvmlSystemGetDriverVersion=lambda: "550.54", nvmlSystemGetCudaDriverVersion=lambda: 12040,
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(total=80e9))
    functions.update(overrides)
    return types.SimpleNamespace(**{k: v for k, v in functions.items() if v is not None})


def test_nvml_environment_and_telemetry_fields(monkeypatch):
    """Every field the GPU report needs, per row (clocks, temperature, power, utilisation, throttle reasons)
    and per run (name, driver, CUDA driver, memory, top clocks, power limit)."""
    monkeypatch.setitem(sys.modules, "pynvml", _fake_nvml())
    assert envinfo.gpu_info(0) == {
        "nvml": True, "name": "NVIDIA A100", "uuid": "GPU-aaa", "driver": "550.54", "cuda_driver": "12.4",
        "memory_total_bytes": 80e9, "max_sm_clock_mhz": 1980, "max_memory_clock_mhz": 2619, "power_limit_w": 700.0,
        "memory_bus_width_bits": 5120, "memory_bandwidth_tb_s": pytest.approx(3.352, abs=1e-3)}  # H100's datasheet
    with envinfo.NvmlTelemetry(0, period_s=0.001) as telemetry:
        pass
    summary = telemetry.summary
    assert summary.available and summary.samples >= 2
    assert (summary.sm_clock_mhz_min, summary.sm_clock_mhz_median, summary.memory_clock_mhz_median) == (1980, 1980, 2619)
    assert (summary.temperature_c_max, summary.power_w_mean, summary.power_w_max) == (61, 650.0, 650.0)
    assert (summary.gpu_utilisation_pct_mean, summary.memory_utilisation_pct_mean) == (97, 60)
    assert summary.throttle_reasons == ["hw_thermal_slowdown", "sw_power_cap"]


def test_nvml_finds_the_cuda_device_by_uuid(monkeypatch):
    """CUDA_VISIBLE_DEVICES=1: CUDA's device 0 is NVML's device 1. By index NVML would describe (and sample)
    the wrong GPU; by the UUID torch reports it finds the right one."""
    monkeypatch.setitem(sys.modules, "pynvml", _fake_nvml())
    assert envinfo.gpu_info(0, uuid="GPU-bbb")["name"] == "NVIDIA H100"
    sampled = []
    monkeypatch.setattr(envinfo, "_sample", lambda nvml, handle: sampled.append(handle) or envinfo.TelemetrySample(
        1980, 2619, 61, 650.0, 97, 60, []))
    with envinfo.NvmlTelemetry(0, period_s=10, uuid="GPU-bbb"):
        pass
    assert sampled == ["GPU-bbb", "GPU-bbb"]  # on entry and on exit
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: types.SimpleNamespace(uuid="5a1e-77"))
    assert envinfo.cuda_uuid(0) == "GPU-5a1e-77"

    def no_device(i):
        raise RuntimeError("no CUDA GPUs are available")

    monkeypatch.setattr(torch.cuda, "get_device_properties", no_device)
    assert envinfo.cuda_uuid(0) is None


def test_nvml_row_shorter_than_the_sampling_period_is_sampled_while_busy(monkeypatch):
    """A 5 ms row with a 100 ms period used to keep only the sample taken before it ran (idle clocks)."""
    clock = iter([345, 1980])
    monkeypatch.setitem(sys.modules, "pynvml", _fake_nvml(nvmlDeviceGetClockInfo=lambda h, kind: next(clock)
                                                          if kind == 1 else 2619))
    with envinfo.NvmlTelemetry(0, period_s=10) as telemetry:
        pass
    assert telemetry.summary.samples == 2 and telemetry.summary.sm_clock_mhz_median == (345 + 1980) / 2


def test_nvml_telemetry_with_partial_support(monkeypatch):
    """Power unsupported, utilisation missing from this nvidia-ml-py, and throttle reasons only under NVML's
    newer name ("clocks event reasons"): the other fields still arrive, nothing raises."""
    fake = _fake_nvml(nvmlDeviceGetPowerUsage=_unsupported, nvmlDeviceGetEnforcedPowerLimit=_unsupported,
                      nvmlDeviceGetUtilizationRates=None, nvmlDeviceGetCurrentClocksThrottleReasons=None,
                      nvmlDeviceGetCurrentClocksEventReasons=lambda h: 0x1)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    assert envinfo.gpu_info(0)["power_limit_w"] is None
    assert envinfo.gpu_info(0)["memory_bandwidth_tb_s"] is not None
    monkeypatch.setitem(sys.modules, "pynvml", _fake_nvml(nvmlDeviceGetMemoryBusWidth=_unsupported))
    assert envinfo.gpu_info(0)["memory_bandwidth_tb_s"] is None
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    with envinfo.NvmlTelemetry(0, period_s=0.001) as telemetry:
        pass
    summary = telemetry.summary
    assert (summary.sm_clock_mhz_min, summary.temperature_c_max, summary.power_w_mean) == (1980, 61, None)
    assert summary.gpu_utilisation_pct_mean is None and summary.throttle_reasons == ["gpu_idle"]


def test_peak_bandwidth_from_torchs_device_properties(monkeypatch):
    """Where NVML is missing, the peak memory bandwidth comes from torch's own device properties: the memory
    clock (kHz) and bus width, the same formula as NVML's figure; None where this torch reports neither."""
    properties = dict(major=9, minor=0, multi_processor_count=132, total_memory=80e9)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: types.SimpleNamespace(
        **properties, memory_clock_rate=2_619_000, memory_bus_width=5120))
    facts = envinfo.cuda_properties(0)
    assert facts["torch_memory_bandwidth_tb_s"] == pytest.approx(3.352, abs=1e-3)  # H100's datasheet
    assert facts["multiprocessors"] == 132 and facts["compute_capability"] == "9.0"
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: types.SimpleNamespace(**properties))
    assert envinfo.cuda_properties(0)["torch_memory_bandwidth_tb_s"] is None


def test_unreadable_throttle_reasons_are_unknown_not_none(monkeypatch):
    """Where NVML cannot read throttle reasons the summary says None (unknown), never [] (no throttling)."""
    fake = _fake_nvml(nvmlDeviceGetCurrentClocksThrottleReasons=_unsupported)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    with envinfo.NvmlTelemetry(0, period_s=0.001) as telemetry:
        pass
    assert telemetry.summary.available and telemetry.summary.throttle_reasons is None


# ------------------------------------------------------------------------------------------ the command


def _run(args, **kwargs):
    return runner.invoke(app, ["bench", *args], **kwargs)


@pytest.mark.slow
def test_bench_json_output_file_and_csv(tmp_path):
    out, csv_path = tmp_path / "r.json", tmp_path / "r.csv"
    result = _run(["s12", *FAST, "--batch-sizes", "1,2", "--impl", "ours,timm", "--output", str(out),
                   "--csv", str(csv_path), "--json"])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    document = json.loads(out.read_text())
    assert printed["results"] == document["results"]
    assert REQUIRED_ENV_KEYS <= document["env"].keys() and document["env"]["threads"] == 1
    rows = document["results"]
    assert [(r["impl"], r["batch_size"]) for r in rows] == [("ours", 1), ("ours", 2), ("timm", 1), ("timm", 2)]
    for row in rows:
        assert REQUIRED_ROW_KEYS <= row.keys() and {"median", "p90", "iqr"} <= row["latency_ms"].keys()
        assert row["status"] == "ok" and row["model"] == "poolformer_s12" and row["resolution"] == 64
        assert len(row["latency_ms"]["steps"]) == 3
    lines = csv_path.read_text().splitlines()
    header = lines[0].split(",")
    assert len(lines) == 1 + 4 and header[:3] == ["model", "impl", "mode"]
    assert {"device", "batch_size", "resolution", "throughput"} <= set(header)
    first = next(csv.DictReader(io.StringIO(csv_path.read_text())))
    assert float(first["throughput"]) == pytest.approx(rows[0]["throughput"])
    assert first["cast"] == "False" and first["backend"] == ""
    assert not list(tmp_path.glob(".*"))  # no temporary files left behind


def test_bench_table_output():
    result = _run(["s12", *FAST, "--batch-sizes", "1", "--normalised"])
    assert result.exit_code == 0, result.output
    assert "s12/ours" in result.stdout and "img/s" in result.stdout and "rel." in result.stdout


@pytest.mark.slow
def test_bench_oom_row_through_the_cli(monkeypatch, tmp_path):
    _register(monkeypatch, "oom_at_2", 2, _oom)
    out = tmp_path / "r.json"
    result = _run([*FAST, "--impl", "oom_at_2", "--batch-sizes", "1,2,1", "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert [r["status"] for r in json.loads(out.read_text())["results"]] == ["ok", "oom", "ok"]


@pytest.mark.slow
def test_bench_max_batch_through_the_cli(monkeypatch):
    _register(monkeypatch, "oom_at_6", 6, _oom)
    result = _run([*FAST, "--impl", "oom_at_6", "--max-batch", "--max-batch-limit", "16", "--json"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert [r["batch_size"] for r in document["results"]] == [5]
    assert list(document["env"]["max_batch"].values()) == [5]


@pytest.mark.slow
def test_ctrl_c_keeps_the_finished_rows(monkeypatch, tmp_path):
    _register(monkeypatch, "interrupt_at_3", 3, KeyboardInterrupt)
    out = tmp_path / "r.json"
    result = _run([*FAST, "--impl", "interrupt_at_3", "--batch-sizes", "1,2,3,1", "--output", str(out)])
    assert result.exit_code == 130
    assert "Traceback" not in result.output and "interrupted" in result.stderr
    assert [r["batch_size"] for r in json.loads(out.read_text())["results"]] == [1, 2]


@pytest.mark.parametrize("args, message", [
    (["--device", "cuda"], "no CUDA GPU"),
    (["--device", "cuda:1"], "no CUDA GPU"),
    (["--device", "gpu"], "unknown device"),
    (["--precision", "fp32,int8"], "unknown precision"),
    (["--batch-sizes", "0"], "must be >= 1"),
    (["--batch-sizes", "8,x"], "integers"),
    (["--resolutions", "16"], "every side must be at least 32"),
    (["--impl", "nope"], "unknown impl"),
    (["--iters", "0"], "--iters must be >= 1"),
    (["--iters", "5", "--min-time", "1"], "either --iters or --min-time"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["nosuchmodel"], "unknown model"),
    (["--baseline", "/nonexistent/baseline.json"], "does not exist"),
])
def test_bad_input_is_one_line_exit_2(args, message):
    if torch.cuda.is_available() and "cuda" in " ".join(args):
        pytest.skip("this machine has a GPU")
    result = _run(["--resolutions", "64", "--iters", "1", "--warmup", "0", *args])
    assert result.exit_code == 2, result.output
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.output


def test_new_implementations_are_accepted_without_code_changes(monkeypatch):
    monkeypatch.setitem(IMPLEMENTATIONS, "mine", Implementation())  # one class (here ours) and one entry
    result = _run([*FAST, "--impl", "mine", "--batch-sizes", "1", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["results"][0]["impl"] == "mine"


# ------------------------------------------------------------------------------------------ profile


def test_profile_names_the_operators(tmp_path):
    from poolformer.profiling import profile_model

    report = profile_model(bench.BenchConfig("s12", batch_size=1, resolution=64), warmup=1, steps=2)
    names = {op.name: op for op in report.operators}
    assert names["aten::native_group_norm"].category == "normalisation"
    assert names["aten::avg_pool2d"].category == "pooling"
    # s12: 12 blocks x 2 norms + head norm; 12 pooling mixers; per step
    assert names["aten::native_group_norm"].calls == 25 and names["aten::avg_pool2d"].calls == 12
    assert sum(op.share for op in report.operators) == pytest.approx(1.0)
    assert report.operators == sorted(report.operators, key=lambda op: op.self_ms, reverse=True)


def _event(key, self_device_us, count, device_type="CPU", annotation=False):
    """A stand-in for one row of torch.profiler's key_averages() (FunctionEventAvg) in a CUDA run."""
    from torch.autograd import DeviceType

    return types.SimpleNamespace(key=key, count=count, self_device_time_total=float(self_device_us),
                                 self_cpu_time_total=5.0, device_type=getattr(DeviceType, device_type),
                                 is_user_annotation=annotation)


def test_cuda_profile_counts_each_kernel_once():
    """What torch 2.x's profiler returns with CUDA activity: every kernel twice, once inside the operator
    that launched it (aten::...) and once as a device event under its own name; plus a user annotation
    spanning everything and a Triton kernel no operator launched. Rows are operators only, and the total is
    the GPU's kernel time: 300 us of convolution + 100 of group norm + 50 of the stray kernel per step."""
    from poolformer.profiling import UNATTRIBUTED_KERNELS, summarize

    events = [
        _event("aten::cudnn_convolution", 600, 4), _event("aten::native_group_norm", 200, 4),
        _event("aten::conv2d", 0, 4), _event("cudaLaunchKernel", 0, 8),
        _event("sm90_xmma_fprop_implicit_gemm", 600, 4, "CUDA"), _event("group_norm_kernel", 200, 4, "CUDA"),
        _event("triton_poi_fused_add_0", 100, 2, "CUDA"),
        _event("ProfilerStep", 900, 2, "CUDA", annotation=True),
    ]
    report = summarize(events, steps=2, time_kind="cuda", config=bench.BenchConfig("s12", device="cuda"))
    assert [op.name for op in report.operators] == ["aten::cudnn_convolution", "aten::native_group_norm",
                                                   UNATTRIBUTED_KERNELS]
    assert report.total_ms == pytest.approx(0.450)
    assert [op.self_ms for op in report.operators] == pytest.approx([0.300, 0.100, 0.050])
    assert sum(op.share for op in report.operators) == pytest.approx(1.0)
    assert report.categories["convolution"] == pytest.approx(0.300 / 0.450)


def test_profile_categories_match_whole_operator_names():
    """On an H200, CUPTI's "Command Buffer Full" (launches that waited for a full launch queue) carried kernel
    time and was filed as matmul, "mm" being inside "command"."""
    from poolformer.profiling import categorize

    assert [categorize(n) for n in ("aten::addmm", "aten::mm", "aten::bmm", "aten::_scaled_mm", "aten::linear")] \
        == ["matmul"] * 5
    assert categorize("Command Buffer Full") == "other"
    assert categorize("aten::cudnn_convolution") == "convolution" and categorize("aten::add_") == "elementwise"


def test_cuda_profile_names_the_launch_queue_range():
    """The kernel time CUPTI files under "Command Buffer Full" (14% on the H200 run) gets a row saying what it is."""
    from poolformer.profiling import CUPTI_RANGES, summarize

    events = [_event("aten::cudnn_convolution", 300, 2), _event("Command Buffer Full", 100, 2),
              _event("sm90_xmma_fprop_implicit_gemm", 400, 2, "CUDA")]
    report = summarize(events, steps=2, time_kind="cuda", config=bench.BenchConfig("s12", device="cuda"))
    assert [(op.name, op.category) for op in report.operators] == [
        ("aten::cudnn_convolution", "convolution"), (CUPTI_RANGES["Command Buffer Full"], "other")]
    assert "launch queue" in report.operators[1].name


def test_profile_command_with_trace(tmp_path):
    trace = tmp_path / "trace.json"
    result = runner.invoke(app, ["profile", "s12", "--device", "cpu", "--batch-size", "1", "--resolution", "64",
                                 "--warmup", "0", "--steps", "1", "--trace", str(trace)])
    assert result.exit_code == 0, result.output
    assert "aten::native_group_norm" in result.stdout and "normalisation" in result.stdout
    assert json.loads(trace.read_text())["traceEvents"]


def test_profile_trace_to_a_gz_name_is_gzipped(tmp_path):
    """--trace x.json.gz: gzip, as torch.profiler writes such names (the atomic write keeps the suffix)."""
    import gzip

    trace = tmp_path / "trace.json.gz"
    result = runner.invoke(app, ["profile", "s12", "--device", "cpu", "--batch-size", "1", "--resolution", "64",
                                 "--warmup", "0", "--steps", "1", "--trace", str(trace)])
    assert result.exit_code == 0, result.output
    assert json.loads(gzip.decompress(trace.read_bytes()))["traceEvents"]
    assert [p.name for p in tmp_path.iterdir()] == ["trace.json.gz"]  # no temporary file left beside it


def test_profile_failure_is_one_line(monkeypatch):
    _register(monkeypatch, "oom_at_1", 1, _oom)
    result = runner.invoke(app, ["profile", "s12", "--device", "cpu", "--impl", "oom_at_1", "--resolution", "64",
                                 "--warmup", "0", "--steps", "1"])
    assert result.exit_code == 1 and "OutOfMemoryError" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output


def test_max_batch_with_a_crashing_model_gives_an_error_row(monkeypatch):
    _register(monkeypatch, "crash", 1, lambda: RuntimeError("boom"))
    result = _run([*FAST, "--impl", "crash", "--max-batch", "--json"])
    assert result.exit_code == 1  # no configuration succeeded
    (row,) = json.loads(result.stdout)["results"]
    assert row["status"] == "error" and row["error"] == "RuntimeError: boom" and row["batch_size"] == 1


def test_profile_bad_input():
    result = runner.invoke(app, ["profile", "s12", "--device", "cuda:0"] if not torch.cuda.is_available()
                           else ["profile", "s12", "--precision", "fp8"])
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.subprocess
def test_help_does_not_import_torch():
    import subprocess

    out = subprocess.run([sys.executable, "-X", "importtime", "-c", "import poolformer_cli.app"],
                         capture_output=True, text=True, check=True).stderr
    assert "torch" not in out


# ------------------------------------------------------------------------------------------ cast, compile mode


def test_cast_rows_convert_weights_and_input_and_skip_autocast(monkeypatch):
    """--cast-model: bf16 weights and a bf16 input with autocast off (timm's --model-dtype), checked against
    the fp32 reference like every row."""
    seen = _register_recording(monkeypatch, lambda model, x: (x.dtype, next(model.parameters()).dtype,
                                                              torch.is_autocast_enabled("cpu")))
    config = bench.BenchConfig("s12", "recording", "cpu", batch_size=2, resolution=64, precision="bf16", cast=True)
    result = bench.run_config(config, bench.BenchSettings(warmup=1, iters=2))
    assert result.status == "ok", result.error
    assert set(seen) == {(torch.bfloat16, torch.bfloat16, False)}
    assert result.parity is not None and result.parity.ok and result.parity.reference == "ours"
    assert result.to_row()["cast"] is True


@pytest.mark.slow
def test_cast_fast_rows_run_the_fast_path_in_the_precision():
    config = bench.BenchConfig("s12", "fast", "cpu", batch_size=1, resolution=64, precision="bf16", cast=True)
    model = bench.prepare_model(config)
    assert model.dtype == torch.bfloat16
    result = bench.run_config(config, bench.BenchSettings(warmup=0, iters=1))
    assert result.status == "ok", result.error
    # a bf16 backend (OpenVINO where the CPU has native bf16, else oneDNN or portable), never fp32-only ONNX Runtime
    assert result.backend == model.backend_for(torch.bfloat16) and result.backend != "onnxruntime-folded"


@pytest.mark.slow
def test_cast_and_compile_mode_on_the_command_line(tmp_path):
    out = tmp_path / "r.json"
    result = _run(["s12", *FAST, "--impl", "ours", "--batch-sizes", "1", "--precision", "fp32,bf16", "--cast-model",
                   "--output", str(out)])
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())["results"]
    assert [(r["precision"], r["cast"]) for r in rows] == [("fp32", False), ("bf16", True)]
    assert "bf16 cast" in result.stdout


@pytest.mark.slow
def test_compile_mode_reaches_torch_compile_and_the_row(monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: calls.append(kwargs) or model)
    config = bench.BenchConfig("s12", "timm", "cpu", batch_size=1, resolution=64, compile=True)
    result = bench.run_config(config, bench.BenchSettings(warmup=0, iters=1, compile_mode="max-autotune"))
    # on the CPU through Frozen: one static graph per shape, compiled with freezing
    assert result.status == "ok" and calls == [{"backend": "inductor", "mode": "max-autotune", "dynamic": False}]
    assert result.to_row()["compile_mode"] == "max-autotune"
    uncompiled = bench.run_config(replace(config, compile=False), bench.BenchSettings(warmup=0, iters=1))
    assert uncompiled.to_row()["compile_mode"] is None


@pytest.mark.parametrize("args, message", [
    (["--compile", "--compile-mode", "fastest"], "unknown --compile-mode 'fastest'"),
    (["--compile-mode", "max-autotune"], "apply to --compile"),
    (["--compile", "--compile-backend", "tvm"], "unknown --compile-backend 'tvm'"),
])
def test_bad_compile_mode_is_one_line(args, message):
    from .conftest import assert_one_line_error

    assert_one_line_error(_run(["s12", *FAST, *args]), message)


def test_regression_keys_treat_files_without_cast_as_autocast():
    """Baselines written before --cast-model (the committed CI baseline is one) still load and match."""
    from poolformer.regression import config_key, load_results

    committed = load_results(Path(__file__).resolve().parents[1] / "benchmarks/results/ci_baseline_cpu.json")
    assert all("cast" not in row for row in committed["results"])

    old = {"model": "poolformer_s12", "impl": "ours", "device": "cuda:0", "batch_size": 1, "resolution": 224,
           "precision": "bf16", "channels_last": False, "compile": False}
    assert config_key(old) == config_key({**old, "cast": False}) != config_key({**old, "cast": True})


@pytest.mark.parametrize("content, impl, message", [
    (b"not a model", "onnxruntime", "ONNX Runtime cannot load it"),
    (b"not a model", "ours", "not a PyTorch or safetensors checkpoint"),
    (None, "ours", "does not fit poolformer_s12"),
])
def test_an_unusable_weights_file_is_refused_before_the_sweep(tmp_path, content, impl, message):
    """A weights file that cannot run is one line on stderr and exit 1 before any row: no table, nothing on
    stdout (it used to start the sweep and print an error row per configuration)."""
    from poolformer import create_model
    from poolformer.weights import export_state_dict

    path = tmp_path / ("w.onnx" if impl == "onnxruntime" else "w.pth")
    if content is None:  # a real checkpoint of another architecture
        torch.save(export_state_dict(create_model("s24"), "official"), path)
    else:
        path.write_bytes(content)
    result = _run(["s12", *FAST, "--impl", impl, "--weights", str(path), "--batch-sizes", "1,2"])
    assert result.exit_code == 1 and result.stdout == "", result.output
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow
@pytest.mark.subprocess
def test_profile_writes_nothing_to_stderr_on_success():
    """The profiler's backend (Kineto) logs its start and stop, and a failed GPU probe, to stderr; the command's
    output must not carry them."""
    env = {k: v for k, v in os.environ.items() if k != "KINETO_LOG_LEVEL"}
    done = subprocess.run([sys.executable, "-m", "poolformer_cli", "profile", "s12", "--device", "cpu",
                           "--batch-size", "1", "--resolution", "64", "--warmup", "0", "--steps", "1", "--top", "3"],
                          capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    assert done.stderr == "" and "self time" in done.stdout
