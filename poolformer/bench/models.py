"""The row's model and input: built after seeding (every implementation gets the same weights), prepared by its
implementation, and reused between rows that differ only in batch size (`ModelCache`)."""

from __future__ import annotations

import contextlib
from dataclasses import replace
from typing import Any, Callable

import torch
from torch import nn

from ..devices import PRECISIONS, autocast
from ..implementations import Description, Target, implementation_for, resolution_kwargs
from .config import BUILD_SEED, BenchConfig, BuildModel


def default_build() -> BuildModel:
    from ..implementations import build

    return build


def build_kwargs(config: BenchConfig) -> dict[str, Any]:
    """The model sized for the row's resolution (see implementations.resolution_kwargs), with its weights, as a
    features-only backbone where the row asks for one."""
    weights = {"weights": config.weights} if config.weights is not None else {}
    features = {"features_only": True} if config.features else {}
    return {**resolution_kwargs(config.model, config.resolution), **weights, **features}


def target(config: BenchConfig, compile_backend: str = "inductor", compile_mode: str | None = None) -> Target:
    """What the row's model is prepared for (see Implementation.prepare)."""
    return Target(config.device, config.precision, config.cast, config.channels_last, config.compile, compile_mode,
                  compile_backend, config.batch_size, config.resolution)


def prepare_model(config: BenchConfig, build_model: BuildModel | None = None,
                  compile_backend: str = "inductor", compile_mode: str | None = None) -> nn.Module:
    """The model for `config` (built after seeding with BUILD_SEED) prepared by its implementation: on its
    device, in eval mode, channels_last, cast and compiled as asked. cast: the weights are converted to bf16/fp16
    and run without autocast (timm's `--model-dtype`)."""
    build_model = build_model or default_build()
    implementation = implementation_for(config.model, config.impl, config.weights)
    torch.manual_seed(BUILD_SEED)
    model = build_model(config.model, config.impl, **build_kwargs(config))
    return implementation.prepare(model, target(config, compile_backend, compile_mode))


def describe(config: BenchConfig, model: nn.Module, compile_backend: str = "inductor",
             compile_mode: str | None = None) -> Description:
    """What ran the row's prepared `model` (the fast path's backend, the bytes its kernels move, compile mode)."""
    row_target = target(config, compile_backend, compile_mode)
    return implementation_for(config.model, config.impl, config.weights).describe(model, row_target)


def make_input(config: BenchConfig) -> torch.Tensor:
    """A random image batch [batch_size, 3, height, width] on the config's device and memory format (in the cast
    dtype with config.cast)."""
    size = config.resolution
    x = torch.randn(config.batch_size, 3, size.height, size.width, device=config.device)
    x = x if not config.cast else x.to(PRECISIONS[config.precision])
    return x.contiguous(memory_format=torch.channels_last) if config.channels_last else x


def row_autocast(config: BenchConfig) -> contextlib.AbstractContextManager:
    """Autocast in the row's precision, unless the model was cast to it."""
    return contextlib.nullcontext() if config.cast else autocast(config.device, config.precision)


class ModelCache:
    """The last models built, handed again to configurations that differ only in batch size (or in the
    autocast precision, which leaves the model as built): building a model and moving it to the device can take
    longer than measuring it. At most `size` models (two: a cast row and its fp32 comparison alternate), the
    least recently used dropped before the next is built. Compiled models are built afresh for every
    configuration, so that each row's first call shows its compilation."""

    def __init__(self, size: int = 2) -> None:
        self.size = size
        self.models: dict[BenchConfig, nn.Module] = {}

    def get(self, config: BenchConfig, build: Callable[[], nn.Module]) -> nn.Module:
        if config.compile:
            return build()
        key = replace(config, batch_size=0, precision=config.precision if config.cast else "")
        if key in self.models:
            self.models[key] = self.models.pop(key)  # most recently used last
            return self.models[key]
        while len(self.models) >= self.size:
            del self.models[next(iter(self.models))]
        self.models[key] = build()
        return self.models[key]

    def discard(self, config: BenchConfig) -> None:
        """Forget the model of `config` (one that ran out of memory: memory is short, and it would only fail again)."""
        self.models.pop(replace(config, batch_size=0, precision=config.precision if config.cast else ""), None)


def check_weights(configs: list[BenchConfig], build_model: BuildModel | None = None) -> None:
    """Build each distinct (model, implementation, weights file) of `configs` once on the CPU, as its rows will:
    an unreadable or wrong-architecture file is one CheckpointError before any row runs, not an error row per
    configuration after a sweep has started. Configurations without a weights file are not built."""
    build_model = build_model or default_build()
    seen = set()
    for config in configs:
        key = (config.model, config.impl, config.weights)
        if config.weights is None or key in seen:
            continue
        seen.add(key)
        build_model(config.model, config.impl, **build_kwargs(config))
