"""One inference row: time the forward, read the memory peaks, and check the logits (a backbone's four maps, each)
against the fp32 reference."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from ..implementations import Target, implementation_for, is_exported_file
from ..measure import (
    current_memory, free_memory, is_out_of_memory, peak_memory, reset_peak_memory, time_once, time_steps,
)
from .config import (
    BUILD_SEED, PARITY_SAMPLES, PARITY_TOLERANCE, BenchConfig, BenchResult, BenchSettings, BuildModel, Parity,
    one_line,
)
from .models import ModelCache, build_kwargs, default_build, describe, make_input, prepare_model, row_autocast


def run_config(config: BenchConfig, settings: BenchSettings, build_model: BuildModel | None = None,
               reference: Callable[[], Any] | None = None, models: ModelCache | None = None) -> BenchResult:
    """Measure one configuration. Never raises for OOM or a failing model: the status says what happened.
    models: reuse a model built for an earlier configuration (see ModelCache)."""
    device = torch.device(config.device)
    model = x = None
    try:
        def build() -> nn.Module:
            return prepare_model(config, build_model, settings.compile_backend, settings.compile_mode)

        model = models.get(config, build) if models is not None else build()
        free_memory(device)
        reset_peak_memory(device)
        start_memory = current_memory(device)
        x = make_input(config)
        with torch.inference_mode(), row_autocast(config):
            def step() -> Any:
                return model(x)

            first_call_ms = time_once(step, device)
            steps_ms, reference_ms = time_steps(step, device, warmup=settings.warmup, iters=settings.iters,
                                                min_time_s=settings.min_time_s, reference=reference)
        peak, reserved = peak_memory(device)
        result = BenchResult.timed(config, settings, steps_ms, reference_ms, peak_memory_bytes=peak,
                                   peak_reserved_bytes=reserved, start_memory_bytes=start_memory,
                                   first_call_ms=first_call_ms)
        described = describe(config, model, settings.compile_backend, settings.compile_mode)
        result.backend, result.backend_note = described.backend, described.backend_note
        result.bytes_per_image, result.compile_mode = described.bytes_per_image, described.compile_mode
        result.impl_note = described.note
        if settings.parity:
            result.parity, result.parity_note = check_parity(config, model, x, build_model, settings)
            if result.parity is not None and not result.parity.ok:
                result.status = "mismatch"  # wrong outputs: not a speed result
        return result
    except Exception as err:
        status = "oom" if is_out_of_memory(err) else "error"
        if status == "oom" and models is not None:
            models.discard(config)
        return BenchResult(config=config, status=status, error=one_line(err))
    finally:
        del model, x
        free_memory(device)


def check_parity(config: BenchConfig, model: nn.Module, x: torch.Tensor, build_model: BuildModel | None,
                 settings: BenchSettings) -> tuple[Parity | None, str | None]:
    """Run the row's model once more on its input (untimed) and the fp32 reference on the first PARITY_SAMPLES
    images, comparing the logits (a backbone's maps, each); (Parity, None), or (None, why not) where no reference
    can be had (an exported file, a reference that does not fit in memory, a model that cannot be rebuilt)."""
    if is_exported_file(config.weights):
        return None, "no reference: the weights are inside the exported file"
    device = torch.device(config.device)
    reference_name = implementation_for(config.model, config.impl, config.weights).reference
    reference_implementation = implementation_for(config.model, reference_name, config.weights)
    samples = min(PARITY_SAMPLES, config.batch_size)
    same_model = reference_name == config.impl and not config.compile and config.precision == "fp32"
    try:
        with torch.inference_mode():
            with row_autocast(config):
                got = [out[:samples].float() for out in _outputs(model(x))]
            images = x[:samples].float().contiguous()  # the reference runs fp32 (a cast row's input is not)
            if same_model:
                expected = [out.float() for out in _outputs(model(images))]
            else:
                torch.manual_seed(BUILD_SEED)
                build = build_model or default_build()
                reference = build(config.model, reference_name, **build_kwargs(config))
                reference = reference_implementation.prepare(reference, Target(config.device))
                expected = [out.float() for out in _outputs(reference(images))]
                del reference
    except Exception as err:
        return None, f"not checked: the reference failed ({one_line(err)})"
    finally:
        free_memory(device)
    shapes = ([list(t.shape) for t in got], [list(t.shape) for t in expected])
    if shapes[0] != shapes[1]:
        shown = [s[0] if len(s) == 1 else s for s in shapes]
        return None, f"not checked: output {shown[0]} vs reference {shown[1]}"
    diffs = [(a - b).abs().max().item() for a, b in zip(got, expected)]
    relatives = [d / max(1.0, b.abs().max().item()) for d, b in zip(diffs, expected)]
    tolerance = PARITY_TOLERANCE[config.precision]
    if config.features:  # four maps: each within tolerance; no classes to agree on
        ok = max(relatives) <= tolerance
        return Parity(reference_name, samples, max(diffs), max(relatives), None, tolerance, ok, relatives), None
    agreement = (got[0].argmax(1) == expected[0].argmax(1)).float().mean().item()
    ok = relatives[0] <= tolerance and (agreement == 1.0 or config.precision != "fp32")
    return Parity(reference_name, samples, diffs[0], relatives[0], agreement, tolerance, ok), None


def _outputs(value: Any) -> list[torch.Tensor]:
    """A model's outputs as a list: [logits], or a features-only backbone's maps (a list or tuple)."""
    return list(value) if isinstance(value, (list, tuple)) else [value]
