"""`optimize(model)`: the inference-only module that runs the folded model, and the choice of its kernels.

Backends (the kernels one forward runs on), chosen once per (dtype, device) the module meets:
- ``onnxruntime``: the folded graph run by ONNX Runtime (`poolformer.fast.onnxruntime`); float32 on the CPU,
  where onnxruntime is installed. The fastest CPU path measured (benchmarks/results/runtimes_cpu.md).
- ``onednn``: oneDNN's fused, pre-packed primitives (`poolformer.fast.cpu`); CPUs only, and only in a dtype
  oneDNN runs on this CPU (float32 everywhere; bfloat16 where `poolformer.capabilities` says oneDNN has it).
- ``portable``: the same algebra with plain PyTorch operators; works on any device and dtype.

`backend="auto"` takes the first of these that can run the dtype on the device; `forward_features` (maps, not
logits) always runs oneDNN or portable. The environment variable POOLFORMER_FAST_BACKEND forces one backend
everywhere (tests use it to cover every path on any host).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError
from ..model import MetaFormer
from . import cpu
from .folding import FoldedModel, fold

BACKENDS = ("auto", "onnxruntime", "onednn", "portable")
BACKEND_ENV = "POOLFORMER_FAST_BACKEND"
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def onednn_runs(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether oneDNN's fused primitives run `dtype` on `device` here (never off the CPU)."""
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.float32:
        return True
    if dtype == torch.bfloat16:
        from ..capabilities import cpu_capabilities

        return cpu_capabilities().onednn_bf16
    return False  # float16: oneDNN's fp16 linear is not wired into _linear_pointwise on every torch


def choose_backend(requested: str, dtype: torch.dtype, device: torch.device) -> str:
    """The backend that runs `dtype` on `device` for a request of `requested` (see the module docstring)."""
    forced = os.environ.get(BACKEND_ENV, "").strip().lower()
    if forced and forced not in BACKENDS:
        raise ConfigError(f"{BACKEND_ENV}={forced!r} is not a backend; use one of: {', '.join(BACKENDS)}")
    if forced and forced != "auto":
        requested = forced
    if requested not in BACKENDS:
        raise ConfigError(f"unknown fast backend {requested!r}; choose from: {', '.join(BACKENDS)}")
    runtime_possible = onnxruntime_runs(dtype, device)
    if requested == "onnxruntime":
        if not runtime_possible:
            raise ConfigError(f"the onnxruntime backend runs float32 on the CPU with onnxruntime installed, not "
                              f"{str(dtype).removeprefix('torch.')} on {device}; use backend='auto'")
        return "onnxruntime"
    if requested == "auto" and runtime_possible:
        return "onnxruntime"
    possible = onednn_runs(dtype, device)
    if requested == "onednn" and not possible:
        raise ConfigError(f"oneDNN cannot run {str(dtype).removeprefix('torch.')} on {device} here; "
                          "use backend='portable' or 'auto'")
    if requested == "portable" or not possible:
        return "portable"
    return "onednn"


def onnxruntime_runs(dtype: torch.dtype, device: torch.device) -> bool:
    from .onnxruntime import available

    return device.type == "cpu" and dtype == torch.float32 and available()


@dataclass(frozen=True)
class Prepared:
    """The folded tensors converted for one (dtype, device), and the backend that runs them."""

    folded: FoldedModel
    backend: str
    session: object | None = None  # the onnxruntime backend's FoldedSession


class FastPoolFormer(nn.Module):
    """Inference-only PoolFormer with the reference model's outputs. Input [B, 3, H, W] (any H, W >= 32),
    output float32 logits [B, num_classes].

    Runs in `dtype` (float32 unless given), or in bfloat16/float16 when called under autocast. Weights are
    converted to each (dtype, device) it meets once and cached, with the backend chosen for them
    (`backend_for`).
    """

    def __init__(self, model: MetaFormer, dtype: torch.dtype | None = None, backend: str = "auto"):
        super().__init__()
        if dtype is not None and dtype not in DTYPES:
            raise ConfigError(f"optimize() runs in float32, bfloat16 or float16, not {dtype}")
        if backend not in BACKENDS:
            raise ConfigError(f"unknown fast backend {backend!r}; choose from: {', '.join(BACKENDS)}")
        self.folded, self.plan = fold(model)
        self.dtype = dtype or torch.float32
        self.backend = backend
        self.spec = getattr(model, "spec", None)
        self.arch = model.arch
        self.num_classes = model.num_classes
        self._cache: dict[tuple, Prepared] = {}
        self.eval()

    def compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        """bfloat16/float16 under autocast on x's device, else the dtype given to optimize()."""
        if torch.is_autocast_enabled(x.device.type):
            return torch.get_autocast_dtype(x.device.type)
        return self.dtype

    def prepared(self, dtype: torch.dtype, device: torch.device) -> Prepared:
        key = (dtype, device)
        if key not in self._cache:
            backend = choose_backend(self.backend, dtype, device)
            if backend == "onnxruntime":
                from .onnxruntime import FoldedSession

                self._cache[key] = Prepared(self.folded, backend, FoldedSession(self.folded, self.plan))
                return self._cache[key]
            folded = self.folded.to(dtype, device)
            self._cache[key] = Prepared(cpu.pack_for_onednn(folded) if backend == "onednn" else folded, backend)
        return self._cache[key]

    def _torch_path(self, dtype: torch.dtype, device: torch.device) -> Prepared:
        """oneDNN or portable, for what the runtime backend does not give (feature maps)."""
        prepared = self.prepared(dtype, device)
        if prepared.backend != "onnxruntime":
            return prepared
        key = (dtype, device, "torch")
        if key not in self._cache:
            backend = "onednn" if onednn_runs(dtype, device) and self.backend in ("auto", "onnxruntime") else "portable"
            folded = self.folded.to(dtype, device)
            self._cache[key] = Prepared(cpu.pack_for_onednn(folded) if backend == "onednn" else folded, backend)
        return self._cache[key]

    def backend_for(self, dtype: torch.dtype | None = None, device: torch.device | str = "cpu") -> str:
        """The backend a forward in `dtype` (default: the module's) on `device` runs."""
        return choose_backend(self.backend, dtype or self.dtype, torch.device(device))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, C, H/32, W/32] (a channels-last view), like MetaFormer.forward_features."""
        return self._run(x, features_only=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x, features_only=False)

    def _run(self, x: torch.Tensor, features_only: bool) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.folded.stem_weight.shape[1]:
            raise ConfigError(f"expected images [B, {self.folded.stem_weight.shape[1]}, H, W], got {list(x.shape)}")
        dtype = self.compute_dtype(x)
        prepared = self.prepared(dtype, x.device)
        if prepared.backend == "onnxruntime" and not features_only:
            with torch.no_grad():
                return prepared.session(x)
        prepared = self._torch_path(dtype, x.device)
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
            images = x.to(dtype).contiguous(memory_format=torch.channels_last)
            features = cpu.features_forward(images, prepared.folded, self.plan, prepared.backend == "onednn")
            if features_only:
                return features.permute(0, 3, 1, 2)
            return cpu.head_forward(features, prepared.folded, self.plan)

    def extra_repr(self) -> str:
        name = self.spec.name if self.spec is not None else "MetaFormer"
        return (f"{name}, dtype={self.dtype}, backend={self.backend}, "
                f"blocks={sum(len(s.blocks) for s in self.folded.stages)}")


def optimize(model: MetaFormer, dtype: torch.dtype | None = None, backend: str = "auto") -> FastPoolFormer:
    """An inference-only form of a PoolFormer v1/v2 `model` with the same logits, faster (see
    `poolformer.fast`).

    dtype: run in this dtype (float32 default). bfloat16 is fast on CPUs with AVX512-BF16/AMX and runs
    (emulated, slowly) elsewhere; under autocast the module switches to the autocast dtype by itself.
    backend: "auto" (default), "onednn" or "portable" (see this module's docstring).
    Raises ConfigError for models the fast path does not cover (non-pooling token mixers, other norms).
    """
    return FastPoolFormer(model, dtype=dtype, backend=backend)
