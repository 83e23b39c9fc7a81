"""A benchmark run: every configuration in turn, each result yielded as soon as it is known."""

from __future__ import annotations

from dataclasses import replace
from typing import Iterable, Iterator

import torch

from .config import BenchConfig, BenchResult, BenchSettings, BuildModel, check_settings
from .inference import run_config
from .models import ModelCache
from .reference import reference_workload


def expand_configs(models: Iterable[str], impls: Iterable[str], device: str, batch_sizes: Iterable[int],
                   resolutions: Iterable[int], precisions: Iterable[str], channels_last: bool,
                   compile: bool, weights: str | None = None, cast: bool = False) -> list[BenchConfig]:
    """Every combination, in the order model > impl > precision > resolution > batch size (cast applies to
    bf16/fp16 rows only)."""
    return [BenchConfig(m, i, device, b, r, p, channels_last, compile, weights, cast and p != "fp32")
            for m in models for i in impls for p in precisions for r in resolutions for b in batch_sizes]


def apply_settings(settings: BenchSettings, device: str) -> None:
    """Process-wide settings that affect speed (recorded in the environment block)."""
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    if device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True  # pick the fastest convolution algorithm, as timm does


def run_benchmark(configs: Iterable[BenchConfig], settings: BenchSettings,
                  build_model: BuildModel | None = None, models: ModelCache | None = None) -> Iterator[BenchResult]:
    """Measure each configuration in turn, yielding each result as soon as it is known (so a caller can save
    finished rows before a Ctrl-C). GPU runs carry NVML telemetry (or the reason it is absent).
    models: a ModelCache to share across calls (a caller running one configuration per call)."""
    from ..envinfo import NvmlTelemetry, cuda_uuid

    check_settings(settings)
    models = models if models is not None else ModelCache()
    for config in configs:
        apply_settings(settings, config.device)
        reference = None
        if settings.normalised:
            reference = reference_workload(config.device, config.batch_size, config.resolution)
        if config.device.startswith("cuda"):
            index = torch.device(config.device).index or 0
            with NvmlTelemetry(index, uuid=cuda_uuid(index)) as telemetry:
                result = run_config(config, settings, build_model, reference, models)
            result.telemetry = telemetry.summary.to_dict()
        else:
            result = run_config(config, settings, build_model, reference, models)
        _add_precision_note(result, settings, build_model, models)
        yield result


FP32_COMPARISON_STEPS = 3  # timed steps of the fp32 run beside an emulated-precision row (after 1 warm-up)


def _add_precision_note(result: BenchResult, settings: BenchSettings, build_model: BuildModel | None,
                        models: ModelCache | None = None) -> None:
    """Where the row's precision is not native here, say so; where it is emulated (many times slower than
    fp32), also time a few fp32 steps of the same configuration, so the row shows what fp32 would give."""
    from ..devices import precision_is_emulated, precision_note

    config = result.config
    result.precision_note = precision_note(config.device, config.precision)
    if result.status != "ok" or not settings.fp32_comparison or not precision_is_emulated(config.device,
                                                                                           config.precision):
        return
    quick = replace(settings, warmup=1, iters=FP32_COMPARISON_STEPS, min_time_s=None, normalised=False, parity=False)
    fp32 = run_config(replace(config, precision="fp32", cast=False), quick, build_model, models=models)
    result.fp32_throughput = fp32.throughput
