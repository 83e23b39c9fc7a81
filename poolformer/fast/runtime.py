"""The folded model run by a deployment runtime: the fast path's CPU backends where OpenVINO or ONNX Runtime is
installed.

On a CPU, s12's time is its 1x1 convolutions, and these runtimes' kernels run them closer to the cores' peak
than PyTorch's eager operators (benchmarks/results/runtimes_cpu_*.md). Fed the folded graph (no norm affines,
no LayerScale, one statistic per norm: poolformer.runtimes.export_forms.FoldedExport) they also do less
element-wise work than on the original model. One export and one compiled model per input shape and
precision, made on the first call with them (a few hundred ms), then reused.

Precisions: float32 in both; bfloat16 in OpenVINO on CPUs that compute it natively (AVX512-BF16/AMX), where
OpenVINO runs the float32 graph with bf16 inference precision (statistics and the head stay float32 there).
"""

from __future__ import annotations

import os
import shutil
import tempfile

import numpy as np
import torch

from .folding import FoldedModel, Plan

RUNTIMES = ("openvino", "onnxruntime")  # auto's order of preference on a CPU
PRECISIONS = {torch.float32: "fp32", torch.bfloat16: "bf16"}


def available(runtime: str) -> bool:
    from ..runtimes.runners import available as installed

    return installed(runtime)


def runs(runtime: str, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether `runtime` computes the folded graph in `dtype` on `device` here (CPUs only)."""
    if device.type != "cpu" or dtype not in PRECISIONS or not available(runtime):
        return False
    if dtype == torch.float32:
        return True
    from ..capabilities import cpu_capabilities

    return runtime == "openvino" and cpu_capabilities().native_bf16


class FoldedSession:
    """Runs the folded model in `runtime`: images [B, 3, H, W] (CPU tensor) -> float32 logits [B, classes],
    computed in `dtype` (see `runs`)."""

    def __init__(self, folded: FoldedModel, plan: Plan, runtime: str, dtype: torch.dtype = torch.float32):
        from ..runtimes.export_forms import FoldedExport

        self.runtime, self.precision = runtime, PRECISIONS[dtype]
        self.module = FoldedExport(folded=folded, plan=plan)
        self._runners: dict[tuple[int, ...], object] = {}
        self._folder: str | None = None

    def _runner(self, shape: tuple[int, ...]):
        if shape not in self._runners:
            from ..runtimes.exporting import export_onnx
            from ..runtimes.runners import make_runner

            self._folder = self._folder or tempfile.mkdtemp(prefix="poolformer-fast-")
            path = os.path.join(self._folder, f"{'x'.join(map(str, shape))}.onnx")
            if not os.path.exists(path):
                export_onnx(self.module, path, shape)
            self._runners[shape] = make_runner(self.runtime, path, threads=torch.get_num_threads(),
                                               precision=self.precision)
        return self._runners[shape]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        run = self._runner(tuple(images.shape))
        logits = run(np.ascontiguousarray(images.detach().float().numpy()))
        return torch.from_numpy(np.asarray(logits, dtype=np.float32))

    def __del__(self) -> None:
        if getattr(self, "_folder", None):
            shutil.rmtree(self._folder, ignore_errors=True)
