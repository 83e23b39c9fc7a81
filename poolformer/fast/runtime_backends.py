"""The folded model run by a deployment runtime: the fast path's CPU backends ``openvino-folded`` and
``onnxruntime-folded``, where OpenVINO or ONNX Runtime is installed (named apart from `--impl openvino` and
`--impl onnxruntime`, which run those runtimes' conversion of the reference model).

On a CPU, s12's time is its 1x1 convolutions, and these runtimes' kernels run them closer to the cores' peak
than PyTorch's eager operators (benchmarks/results/runtimes_cpu_*.md). Fed the folded graph (no norm affines,
no LayerScale) they also do less element-wise work than on the original model. OpenVINO gets it built from its
own operators, each GroupNorm one MVN node (`poolformer.fast.openvino_graph`); ONNX Runtime gets the ONNX export
of `poolformer.fast.folded_export.FoldedExport`. One graph and one compiled model per input shape and
precision, made on the first call with them (a few hundred ms), then reused.

Precisions: float32 in both; bfloat16 in OpenVINO on CPUs that compute it natively (AVX512-BF16/AMX), where
OpenVINO runs the float32 graph with bf16 inference precision (statistics and the head stay float32 there).
"""

from __future__ import annotations

import torch

from .folding import FoldedModel, Plan

RUNTIMES = ("openvino", "onnxruntime")  # auto's order of preference on a CPU
BACKEND_NAMES = {"openvino": "openvino-folded", "onnxruntime": "onnxruntime-folded"}  # runtime -> fast backend
PRECISIONS = {torch.float32: "fp32", torch.bfloat16: "bf16"}


def available(runtime: str) -> bool:
    from ..runtimes.sessions import available as installed

    return installed(runtime)


def runs(runtime: str, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether `runtime` computes the folded graph in `dtype` on `device` here (CPUs only)."""
    if device.type != "cpu" or dtype not in PRECISIONS or not available(runtime):
        return False
    if dtype == torch.float32:
        return True
    from ..capabilities import cpu_capabilities

    return runtime == "openvino" and cpu_capabilities().native_bf16


def folded_session(folded: FoldedModel, plan: Plan, runtime: str, dtype: torch.dtype = torch.float32):
    """The folded model run by `runtime` in `dtype` (see `runs`): a `poolformer.runtimes.sessions.RuntimeModule`
    taking images [B, 3, H, W] to float32 logits (a features-only model: its four normalised maps), with one
    export and compiled model per input shape."""
    from ..model import stage_output_names
    from ..runtimes.exporting import export_onnx
    from ..runtimes.sessions import RuntimeModule
    from .folded_export import FoldedExport
    from .openvino_graph import build_model

    classes = folded.head_weight.shape[0] if folded.head_weight is not None else 0
    shared = dict(num_classes=classes, precision=PRECISIONS[dtype], features=plan.features_only)
    if runtime == "openvino":
        return RuntimeModule(runtime, build=lambda shape: build_model(folded, plan, shape), **shared)
    module = FoldedExport(folded=folded, plan=plan)
    outputs = stage_output_names(len(folded.stages)) if plan.features_only else ("logits",)
    return RuntimeModule(runtime, export=lambda path, shape: export_onnx(module, path, shape, outputs=outputs),
                         **shared)
