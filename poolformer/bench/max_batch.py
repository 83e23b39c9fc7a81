"""The largest batch size that runs: doubling, then bisection, on one model."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from ..measure import free_memory, is_out_of_memory, synchronize
from ..training import fixed_labels, train_step
from .config import BenchConfig, BenchSettings, BuildModel, one_line
from .models import make_input, prepare_model, row_autocast
from .train import num_classes_of, prepare_training_model


@dataclass(frozen=True)
class MaxBatch:
    """The largest batch size that ran, and what stopped the search there."""

    batch_size: int | None  # None: not even batch 1 fits in memory
    limited_by: str  # "memory", "the limit (N)", or "batch N: <the error>" (see search_max_batch)


def _try_batch(model: nn.Module, config: BenchConfig) -> str | None:
    """None when two steps of `model` at `config`'s batch size run (forward passes, or train steps for a train
    row); "memory" when they run out of memory; otherwise the error in one line."""
    device = torch.device(config.device)
    x = None
    try:
        x = make_input(config)
        if config.mode == "train":
            labels = fixed_labels(config.batch_size, num_classes_of(model), device)
            step = train_step(model, x, labels, config.optimizer or "sgd", config.precision)
            step()
            step()
            del step
        else:
            with torch.inference_mode(), row_autocast(config):
                model(x)
                model(x)
        synchronize(device)
        return None
    except Exception as err:
        return "memory" if is_out_of_memory(err) else one_line(err)
    finally:
        del x
        free_memory(device)


def search_max_batch(config: BenchConfig, limit: int = 4096, build_model: BuildModel | None = None) -> MaxBatch:
    """The largest batch size <= limit that runs for `config` (doubling, then bisection; the model is built
    once, uncompiled). Memory is what usually stops it, but huge batches can also fail otherwise before memory
    runs out: some kernels index with 32-bit integers (avg_pool2d refuses outputs over 2^31 elements, about
    10,700 images of s12 at 224 px). Such an error above a batch that ran ends the search like an
    out-of-memory does, and `limited_by` names it. An error at batch 1 is raised: the model does not run.
    Assumes what fits at one batch size fits at every smaller one."""
    uncompiled = replace(config, compile=False)
    if config.mode == "train":
        model = prepare_training_model(uncompiled, BenchSettings(), build_model)
    else:
        model = prepare_model(uncompiled, build_model)
    try:
        first = _try_batch(model, replace(config, batch_size=1))
        if first == "memory":
            return MaxBatch(None, "memory")
        if first is not None:
            raise RuntimeError(first)
        good, bad, failures = 1, None, {}

        def runs(batch_size: int) -> bool:
            failures[batch_size] = _try_batch(model, replace(config, batch_size=batch_size))
            return failures[batch_size] is None

        while bad is None and good < limit:
            trial = min(good * 2, limit)
            good, bad = (trial, None) if runs(trial) else (good, trial)
        while bad is not None and bad - good > 1:
            middle = (good + bad) // 2
            good, bad = (middle, bad) if runs(middle) else (good, middle)
        if bad is None:
            return MaxBatch(good, f"the limit ({limit})")
        reason = failures[bad]
        return MaxBatch(good, "memory" if reason == "memory" else f"batch {bad}: {reason}")
    finally:
        del model
        free_memory(torch.device(config.device))


def find_max_batch(config: BenchConfig, limit: int = 4096, build_model: BuildModel | None = None) -> int | None:
    """search_max_batch's batch size: the largest that runs, or None when not even batch 1 fits."""
    return search_max_batch(config, limit, build_model).batch_size
