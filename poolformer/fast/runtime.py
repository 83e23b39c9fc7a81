"""The folded model run by ONNX Runtime: the fast path's fp32 backend on CPUs where onnxruntime is installed.

On a CPU, s12's time is its 1x1 convolutions, and ONNX Runtime's kernels run them closer to the cores' peak
than PyTorch's eager operators (benchmarks/results/runtimes_cpu.md). Fed the folded graph (no norm affines,
no LayerScale, one statistic per norm: poolformer.runtimes.export_forms.FoldedExport) it also does less
element-wise work than on the original model. One export and one session per input shape, made on the
first call with that shape (a few hundred ms), then reused.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import numpy as np
import torch

from .folding import FoldedModel, Plan


def available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


class FoldedSession:
    """Runs the folded fp32 model in ONNX Runtime: images [B, 3, H, W] (CPU tensor) -> logits [B, classes]."""

    def __init__(self, folded: FoldedModel, plan: Plan):
        from ..runtimes.export_forms import FoldedExport

        self.module = FoldedExport(folded=folded, plan=plan)
        self._sessions: dict[tuple[int, ...], object] = {}
        self._folder: str | None = None

    def _session(self, shape: tuple[int, ...]):
        if shape not in self._sessions:
            from ..runtimes.exporting import export_onnx
            from ..runtimes.runners import OnnxRuntimeRunner

            self._folder = self._folder or tempfile.mkdtemp(prefix="poolformer-fast-")
            path = os.path.join(self._folder, f"{'x'.join(map(str, shape))}.onnx")
            export_onnx(self.module, path, shape)
            self._sessions[shape] = OnnxRuntimeRunner(path, threads=torch.get_num_threads())
        return self._sessions[shape]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        run = self._session(tuple(images.shape))
        logits = run(np.ascontiguousarray(images.detach().float().numpy()))
        return torch.from_numpy(np.asarray(logits, dtype=np.float32))

    def __del__(self) -> None:
        if getattr(self, "_folder", None):
            shutil.rmtree(self._folder, ignore_errors=True)
