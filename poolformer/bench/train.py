"""One training row: time the train step (poolformer.training: forward, loss, backward, optimizer step), read the
memory peaks, and check the loss and gradients against an independent implementation with the same weights.

Under torchrun every process trains its own batch of `batch_size` images in DistributedDataParallel (gloo on
CPUs, nccl on GPUs); a step's time is the slowest process's, and the row's img/s counts every process's
images. The caller times the same row in one process first, for the scaling efficiency (see runner).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from ..distributed import Distributed, gather
from ..implementations import implementation_for
from ..measure import (
    current_memory, free_memory, is_out_of_memory, peak_memory, reset_peak_memory, time_once, time_steps,
)
from ..training import (
    GradParity, compare_grads, disable_stochastic_depth, fixed_labels, loss_and_grads, original_head, timm_v1_head,
    train_step,
)
from ..zoo import get_spec
from .config import BUILD_SEED, BenchConfig, BenchResult, BenchSettings, BuildModel, one_line
from .models import build_kwargs, default_build, make_input, target

_WRAPPERS = ("module.", "_orig_mod.")  # DistributedDataParallel's and torch.compile's prefixes to parameter names


def unwrapped_name(name: str) -> str:
    """A parameter's name without DistributedDataParallel's and torch.compile's prefixes."""
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPERS:
            if name.startswith(prefix):
                name, changed = name[len(prefix):], True
    return name


def train_reference(config: BenchConfig) -> str | None:
    """The implementation a train row's loss and gradients are checked against: timm's for ours and ours for timm
    (a published v1/v2 model: two independent implementations with the same weights); for other zoo models our
    eager model, where the row is not that already; None for timm peers."""
    from ..peers import is_peer

    if is_peer(config.model):
        return None
    if get_spec(config.model).family in ("v1", "v2"):
        return "timm" if config.impl == "ours" else "ours"
    plain = not (config.compile or config.channels_last or config.grad_checkpointing or config.precision != "fp32")
    return None if plain else "ours"


def _reference_forward(config: BenchConfig, reference: str) -> Callable[[nn.Module, torch.Tensor], torch.Tensor] | None:
    """How the reference computes the row's logits: a v1 model's head differs between timm (average, then norm)
    and the original (norm, then average), so the reference runs the row's head semantics on its own modules."""
    if get_spec(config.model).family != "v1" or reference == config.impl:
        return None
    return original_head if reference == "timm" else timm_v1_head


def check_train_parity(config: BenchConfig, model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                       build_model: BuildModel | None) -> tuple[GradParity | None, str | None]:
    """The row's loss and gradients (its own model: compiled, checkpointed, in DDP, in its precision) against the
    reference implementation in fp32, given the row model's current weights, on the same batch."""
    reference_name = train_reference(config)
    if reference_name is None:
        why = "a timm peer has no independent model" if config.impl in ("ours", "timm") else "no reference"
        return None, f"not checked: {why}"
    device = torch.device(config.device)
    weights = {unwrapped_name(k): v.detach() for k, v in model.state_dict().items()}
    try:
        got = loss_and_grads(model, images, labels, config.precision)
        torch.manual_seed(BUILD_SEED)
        reference = (build_model or default_build())(config.model, reference_name, **build_kwargs(config))
        reference.load_state_dict(weights)
        reference = reference.train().to(device)
        disable_stochastic_depth(reference)
        expected = loss_and_grads(reference, images.float(), labels, "fp32", _reference_forward(config, reference_name))
        del reference
    except Exception as err:
        return None, f"not checked: the reference failed ({one_line(err)})"
    finally:
        free_memory(device)
    return compare_grads(got, expected, reference_name, images.shape[0], config.precision, rename=unwrapped_name), None


def _slowest_steps(procs: Distributed | None, steps_ms: list[float]) -> list[float]:
    """Each step's time across processes: the slowest's (the step ends for all when the last finishes)."""
    if procs is None or not procs.active:
        return steps_ms
    every = gather(procs, steps_ms)
    return [max(times) for times in zip(*every)]


def prepare_training_model(config: BenchConfig, settings: BenchSettings, build_model: BuildModel | None = None,
                           procs: Distributed | None = None) -> nn.Module:
    """The row's model (built after seeding, as inference rows) ready to train, in DistributedDataParallel under
    torchrun."""
    implementation = implementation_for(config.model, config.impl, config.weights)
    torch.manual_seed(BUILD_SEED)
    built = (build_model or default_build())(config.model, config.impl, **build_kwargs(config))
    row_target = target(config, settings.compile_backend, settings.compile_mode)
    model = implementation.prepare_training(built, row_target, config.grad_checkpointing)
    if procs is not None and procs.active:
        from torch.nn.parallel import DistributedDataParallel

        device = torch.device(config.device)
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model


def num_classes_of(model: nn.Module) -> int:
    """The classes a (possibly compiled or DDP-wrapped) classifier predicts: what its fixed labels range over."""
    core = getattr(model, "module", model)
    core = getattr(core, "_orig_mod", core)
    return int(getattr(core, "num_classes", 1000) or 1000)


def run_train_config(config: BenchConfig, settings: BenchSettings, build_model: BuildModel | None = None,
                     reference: Callable[[], Any] | None = None, procs: Distributed | None = None) -> BenchResult:
    """Measure one train row. Never raises for OOM or a failing model: the status says what happened."""
    device = torch.device(config.device)
    model = step = None
    try:
        model = prepare_training_model(config, settings, build_model, procs)
        images = make_input(config)
        labels = fixed_labels(config.batch_size, num_classes_of(model), config.device)
        step = train_step(model, images, labels, config.optimizer or "sgd", config.precision)
        free_memory(device)
        reset_peak_memory(device)
        start_memory = current_memory(device)
        first_call_ms = time_once(step, device)
        distributed = procs is not None and procs.active
        steps_ms, reference_ms = time_steps(step, device, warmup=settings.warmup, iters=settings.iters,
                                            min_time_s=None if distributed else settings.min_time_s,
                                            reference=reference)
        steps_ms = _slowest_steps(procs, steps_ms)
        peak, reserved = peak_memory(device)
        result = BenchResult.timed(
            config, settings, steps_ms, reference_ms, world_size=procs.world_size if distributed else 1,
            peak_memory_bytes=peak, peak_reserved_bytes=reserved, start_memory_bytes=start_memory,
            first_call_ms=first_call_ms, compile_mode=(settings.compile_mode or "default") if config.compile else None)
        if settings.parity:
            result.grad_parity, result.parity_note = check_train_parity(config, model, images, labels, build_model)
            if result.grad_parity is not None and not result.grad_parity.ok:
                result.status = "mismatch"  # wrong gradients: not a speed result
        return result
    except Exception as err:
        return BenchResult(config=config, status="oom" if is_out_of_memory(err) else "error", error=one_line(err))
    finally:
        del model, step
        free_memory(device)
