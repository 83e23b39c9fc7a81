"""A PoolFormer as a file or a graph a runtime reads: ONNX and pt2 export of a module, and OpenVINO's own conversion
of a model (what `--impl openvino` runs).

Exports always hold the float32 graph, even when made under autocast. Checking a file against our model and
writing it only when it matches is `poolformer.export`.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..model import MetaFormer
from .export_forms import portable_form

DEFAULT_OPSET = 17


@contextmanager
def _no_autocast():
    """The file holds the float32 graph even when the export happens under autocast (a runtime made on the first
    call of a bf16 bench row): traced under autocast, its matmuls would be frozen in as bf16 casts."""
    with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
        yield


def export_onnx(module: nn.Module, path: str | os.PathLike, shape: tuple[int, ...], opset: int = DEFAULT_OPSET,
                dynamic_batch: bool = False, outputs: tuple[str, ...] = ("logits",),
                dynamic_size: bool = False) -> None:
    """Trace `module` on zeros of `shape` [B, 3, H, W] and write ONNX (input "images", outputs named `outputs`:
    "logits", or a features-only model's stage1 .. stage4), the batch and/or height and width dynamic if asked."""
    batch = {0: "batch"} if dynamic_batch else {}
    axes = {"images": {**batch, **({2: "height", 3: "width"} if dynamic_size else {})}}
    for name in outputs:
        axes[name] = {**batch, **({2: f"{name}_height", 3: f"{name}_width"} if dynamic_size else {})}
    with torch.no_grad(), _no_autocast(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
        torch.onnx.export(module.eval(), (torch.zeros(shape),), str(path), opset_version=opset, dynamo=False,
                          input_names=["images"], output_names=list(outputs),
                          dynamic_axes=axes if dynamic_batch or dynamic_size else None)


# The input sides a dynamic-size pt2 program takes: from 35, where the stride-32 map has 2 positions a side
# (torch.export treats a size of 1 as a special case it cannot keep symbolic), to 16384.
MIN_SIDE, MAX_SIDE = 35, 16384


def export_pt2(module: nn.Module, path: str | os.PathLike, shape: tuple[int, ...], dynamic_batch: bool = False,
               dynamic_size: bool = False) -> None:
    """torch.export the module for `shape` and save the program (load with torch.export.load); the batch and/or
    height and width (MIN_SIDE to MAX_SIDE) dynamic if asked."""
    dims = {}
    if dynamic_batch:
        dims[0] = torch.export.Dim("batch", min=1, max=4096)
    if dynamic_size:
        dims[2], dims[3] = (torch.export.Dim(side, min=MIN_SIDE, max=MAX_SIDE) for side in ("height", "width"))
    with torch.no_grad(), _no_autocast():
        program = torch.export.export(module.eval(), (torch.zeros(shape),), dynamic_shapes=(dims,) if dims else None)
    torch.export.save(program, str(path))


def onnx_exporter(model: MetaFormer, opset: int = DEFAULT_OPSET):
    """An `export(path, shape)` function for RuntimeModule: static-shape ONNX of this model's portable form."""
    module = portable_form(model)

    def export(path: str, shape: tuple[int, ...]) -> None:
        export_onnx(module, path, shape, opset)

    return export


def openvino_converter(model: MetaFormer):
    """A `build(shape)` function for RuntimeModule("openvino", build=...): the `openvino.Model` of this model for
    static input `shape`, from OpenVINO's own PyTorch frontend (`openvino.convert_model`). That is OpenVINO's best
    form of a PoolFormer: it makes each GroupNorm(1) one MVN node and folds the norms' affines and LayerScale into
    the convolutions itself (s12 ran 1.05-1.14x faster than from the better ONNX export;
    benchmarks/results/runtimes_cpu_avx512_bf16.md).
    A model its tracing cannot take goes through the portable ONNX export instead."""

    def build(shape: tuple[int, ...]) -> Any:
        from .sessions import openvino_core, require

        ov = require("openvino")
        example = torch.zeros(shape)
        try:
            with torch.no_grad(), _no_autocast(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the tracer's notes
                converted = ov.convert_model(model.eval(), example_input=example)
        except Exception:  # the frontend raises RuntimeError and others for what TorchScript cannot trace
            with tempfile.TemporaryDirectory(prefix="poolformer-onnx-") as folder:
                path = os.path.join(folder, "model.onnx")
                export_onnx(portable_form(model), path, shape)
                return openvino_core().read_model(path)
        converted.reshape({converted.inputs[0]: list(shape)})
        return converted

    return build
