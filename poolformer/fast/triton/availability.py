"""Whether and how the Triton kernels run here: Triton's import, the interpreter switch, the kernels module,
the reasons a dtype, device or model is not covered, and the facts of the GPU the launch heuristics use.

With POOLFORMER_TRITON_INTERPRET=1 (tests, debugging) the kernels run in Triton's interpreter, on CPU tensors:
Triton chooses between compiling and interpreting once per process, at its first import, so with the switch
set every Triton kernel of the process is interpreted (CUDA tensors too, through host copies).
"""

from __future__ import annotations

import contextlib
import os
import sys
from types import ModuleType
from typing import Iterator

import torch

from ... import settings
from ..folding import FoldedModel, Plan
from .tiles import MIN_CHANNELS

INTERPRET_ENV = "POOLFORMER_TRITON_INTERPRET"
KERNELS_MODULE = "poolformer.fast.triton.kernels"
# Where no GPU is asked (CPU tensors, Triton's interpreter, predictions made without a device): the
# multiprocessors of an H100 SXM or H200, the GPUs the design-time tile order was tuned on.
REFERENCE_SM_COUNT = 132


def interpreter_enabled() -> bool:
    """Whether POOLFORMER_TRITON_INTERPRET=1 lets the kernels run on CPU tensors (Triton's interpreter)."""
    return settings.flag(INTERPRET_ENV)


def unavailable_reason(dtype: torch.dtype, device: torch.device) -> str | None:
    """Why the Triton kernels cannot run `dtype` on `device` here, in one line; None when they can."""
    if device.type not in ("cuda", "cpu"):
        return f"the Triton kernels run on CUDA GPUs (and on the CPU in Triton's interpreter), not on {device.type}"
    if device.type == "cpu" and not interpreter_enabled():
        return (f"the Triton kernels run on CUDA GPUs; on the CPU only in Triton's interpreter "
                f"(set {INTERPRET_ENV}=1, for testing: it is very slow)")
    try:
        interprets = triton_interprets()
    except ImportError as err:
        return f"Triton is not importable ({err})"
    if device.type == "cpu" and not interprets:
        return (f"Triton was imported before {INTERPRET_ENV}=1 took effect (torch.compile imports it), so it "
                f"compiles instead of interpreting; set {INTERPRET_ENV}=1 before starting Python")
    if device.type == "cuda" and not interprets:
        major, minor = torch.cuda.get_device_capability(device)
        if dtype == torch.bfloat16 and major < 8:
            return f"bf16 Triton kernels need a GPU of compute capability 8.0 or newer, this one is {major}.{minor}"
    return None


def unsupported_model_reason(folded: FoldedModel, plan: Plan) -> str | None:
    """Why the kernels cannot run this folded model (shapes they do not cover); None when they can."""
    if plan.pool_size % 2 == 0:
        return f"the Triton token mixer needs an odd pool size, not {plan.pool_size}"
    for stage in folded.stages:
        for block in stage.blocks:
            channels = block.fc1_weight.shape[1]
            if channels < MIN_CHANNELS:
                return f"the Triton MLP kernel needs at least {MIN_CHANNELS} channels, not {channels}"
    return None


@contextlib.contextmanager
def _triton_interpret_env(interpret: bool) -> Iterator[None]:
    """TRITON_INTERPRET set to `interpret` for the duration (Triton reads it when it decorates a function)."""
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = previous


def import_triton() -> ModuleType:
    """Triton, imported so that POOLFORMER_TRITON_INTERPRET=1 takes effect: Triton decides between compiling
    and interpreting when it decorates its own library, at its first import, so the switch must be seen before
    anything imports Triton (torch.compile does); after that the process's mode is fixed, and TRITON_INTERPRET=1
    stays set (parts of Triton imported later check it)."""
    if "triton" not in sys.modules and interpreter_enabled():
        os.environ["TRITON_INTERPRET"] = "1"
    import triton

    return triton


def triton_interprets() -> bool:
    """Whether this process's Triton runs kernels in its interpreter (fixed when Triton was first imported)."""
    return type(import_triton().language.cdiv).__name__ == "InterpretedFunction"


def kernels() -> ModuleType:
    """The kernels, decorated in the same mode as Triton's own library (whatever TRITON_INTERPRET says now)."""
    if KERNELS_MODULE not in sys.modules:
        with _triton_interpret_env(triton_interprets()):
            from . import kernels as _  # noqa: F401
    return sys.modules[KERNELS_MODULE]


def multiprocessor_count(device: torch.device) -> int:
    """The streaming multiprocessors of a CUDA `device` (launch heuristics size their grids by it);
    REFERENCE_SM_COUNT for any other device."""
    if device.type != "cuda":
        return REFERENCE_SM_COUNT
    return torch.cuda.get_device_properties(device).multi_processor_count
