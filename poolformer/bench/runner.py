"""A benchmark run: every configuration in turn, each result yielded as soon as it is known."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Iterable, Iterator

import torch

from ..distributed import Distributed, barrier
from ..errors import ConfigError
from ..implementations import check_features
from ..sizes import Size
from .config import BenchConfig, BenchResult, BenchSettings, BuildModel, check_config, check_settings
from .inference import run_config
from .models import ModelCache
from .reference import reference_workload
from .train import run_train_config


def expand_configs(models: Iterable[str], impls: Iterable[str], device: str, batch_sizes: Iterable[int],
                   resolutions: Iterable[Size | int], precisions: Iterable[str], channels_last: bool,
                   compile: bool, weights: str | None = None, cast: bool = False, modes: Iterable[str] = ("inference",),
                   optimizer: str = "sgd", grad_checkpointing: Iterable[bool] = (False,),
                   features: bool = False) -> list[BenchConfig]:
    """Every combination, in the order model > mode > impl > precision > resolution > gradient checkpointing >
    batch size (cast applies to bf16/fp16 inference rows only; optimizer and checkpointing to train rows).
    resolutions: sizes (an int is a square). features: every row times the features-only backbone (ConfigError
    where a model or implementation cannot build one: a timm peer, a runtime)."""
    models, impls, resolutions = list(models), list(impls), [Size.of(r).check() for r in resolutions]
    for model in models:
        for impl in impls:
            check_features(model, impl, features)
    rows = []
    for m in models:
        for mode in modes:
            train = mode == "train"
            for i in impls:
                for p in precisions:
                    for r in resolutions:
                        for ckpt in (grad_checkpointing if train else (False,)):
                            rows.extend(BenchConfig(m, i, device, b, r, p, channels_last, compile, weights,
                                                    cast and p != "fp32" and not train, mode,
                                                    optimizer if train else None, ckpt, features)
                                        for b in batch_sizes)
    return rows


def apply_settings(settings: BenchSettings, device: str) -> None:
    """Process-wide settings that affect speed (recorded in the environment block)."""
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    if device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True  # pick the fastest convolution algorithm, as timm does


def run_benchmark(configs: Iterable[BenchConfig], settings: BenchSettings, build_model: BuildModel | None = None,
                  models: ModelCache | None = None, procs: Distributed | None = None) -> Iterator[BenchResult]:
    """Measure each configuration in turn, yielding each result as soon as it is known (so a caller can save
    finished rows before a Ctrl-C). GPU runs carry NVML telemetry (or the reason it is absent).
    models: a ModelCache to share across calls (a caller running one configuration per call).
    procs: under torchrun, every process calls this with the same configurations; train rows then run in
    DistributedDataParallel, after rank 0 has timed the same row alone (the others waiting) for the scaling
    efficiency. Inference rows do not run under torchrun (ConfigError)."""
    from ..envinfo import NvmlTelemetry, cuda_uuid

    check_settings(settings)
    models = models if models is not None else ModelCache()
    distributed = procs is not None and procs.active
    for config in configs:
        check_config(config)
        if distributed and config.mode != "train":
            raise ConfigError("under torchrun bench measures train rows (--mode train) in DistributedDataParallel; "
                              "run inference rows without torchrun")
        apply_settings(settings, config.device)
        reference = None
        if settings.normalised:
            reference = reference_workload(config.device, config.batch_size, config.resolution)
        single = None
        if distributed:
            if procs.is_main:
                single = run_train_config(config, settings, build_model, reference)
            barrier(procs)
        if config.device.startswith("cuda"):
            index = torch.device(config.device).index or 0
            with NvmlTelemetry(index, uuid=cuda_uuid(index)) as telemetry:
                result = _run_row(config, settings, build_model, reference, models, procs)
            result.telemetry = telemetry.summary.to_dict()
        else:
            result = _run_row(config, settings, build_model, reference, models, procs)
        if single is not None:
            result.single_process_throughput = single.throughput
        _add_precision_note(result, settings, build_model, models)
        yield result


def _run_row(config: BenchConfig, settings: BenchSettings, build_model: BuildModel | None, reference: Any,
             models: ModelCache | None, procs: Distributed | None = None) -> BenchResult:
    if config.mode == "train":
        return run_train_config(config, settings, build_model, reference, procs)
    return run_config(config, settings, build_model, reference, models)


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
    fp32 = _run_row(replace(config, precision="fp32", cast=False), quick, build_model, None, models)
    result.fp32_throughput = fp32.throughput
