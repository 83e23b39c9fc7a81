"""`export_model`, the engine of `poolformer export`: write a PoolFormer as ONNX, pt2 or OpenVINO IR, run the file
with its runtime, and keep it only when its outputs match our fp32 model's.

The model goes into the file in its portable form (`poolformer.runtimes.export_forms`), or with `fast` as the fast
path's folded model (`poolformer.fast.folded_export`; for IR, the graph it builds from OpenVINO's operators).

Parity: the exported file and our fp32 model see the same inputs (random images, plus real or generated
photographs), and the file passes when max |logit difference| <= PARITY_TOLERANCE x max(1, max |logit|) and the
top-1 class agrees on every input. fp32 graphs that compute the same function differ by float rounding alone
(~1e-6 relative here); a runtime that computes GroupNorm per channel or pools over the padding is off by O(1).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import ConfigError
from .fast.folded_export import FoldedExport
from .fast.folding import fold
from .fast.openvino_graph import build_model
from .files import new_file_mode
from .model import MetaFormer
from .runtimes.export_forms import portable_form
from .runtimes.exporting import DEFAULT_OPSET, export_onnx, export_pt2, openvino_converter
from .runtimes.sessions import available, make_runner, require
from .sizes import Size

FORMATS = ("onnx", "pt2", "openvino")  # openvino: OpenVINO IR, FILE.xml with its weights beside it in FILE.bin
PARITY_TOLERANCE = 1e-4


@dataclass
class ParityCheck:
    """One runtime on one kind of input. max_abs_diff: logits; top1_agreement: fraction of inputs."""

    runtime: str
    inputs: str  # "random" or "images"
    count: int
    max_abs_diff: float
    max_abs_logit: float
    top1_agreement: float
    passed: bool


@dataclass
class ExportReport:
    model: str
    format: str
    path: str
    resolution: Size  # the input's height and width the file takes
    opset: int | None
    dynamic_batch: bool
    fast: bool
    tolerance: float
    checks: list[ParityCheck] = field(default_factory=list)
    written: bool = False
    size_bytes: int | None = None
    reason: str | None = None  # why nothing was written

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.passed for c in self.checks)

    def as_json(self) -> dict:
        """Every field; the size as resolution (224 for a square, else "800x1333"), height and width."""
        return {**asdict(self), **self.resolution.json_fields(), "passed": self.passed}


def exportable(model: MetaFormer, fast: bool) -> nn.Module:
    """The module that goes into the file: the folded model (fast) or the portable form of the model."""
    return FoldedExport(model) if fast else portable_form(model)


def openvino_model(model: MetaFormer, shape: tuple[int, ...], fast: bool, dynamic_batch: bool = False) -> Any:
    """The `openvino.Model` that `--format openvino` writes: the fast path's graph built from OpenVINO's operators
    (fast), or OpenVINO's own conversion of the model."""
    if fast:
        return build_model(*fold(model), shape, dynamic_batch)
    graph = openvino_converter(model)(shape)
    if dynamic_batch:
        graph.reshape({graph.inputs[0]: [-1, *shape[1:]]})
    return graph


def save_openvino(model: MetaFormer, path: str | os.PathLike, shape: tuple[int, ...], fast: bool,
                  dynamic_batch: bool = False) -> None:
    """Write `openvino_model(...)` as OpenVINO IR: `path` (.xml) and its weights in float32 beside it (.bin)."""
    require("openvino").save_model(openvino_model(model, shape, fast, dynamic_batch), str(path),
                                   compress_to_fp16=False)


def _run_file(fmt: str, runtime: str, path: str, images: np.ndarray) -> np.ndarray:
    if fmt == "pt2":
        program = torch.export.load(path)
        with torch.no_grad():
            return program.module()(torch.from_numpy(images)).numpy()
    return np.asarray(make_runner(runtime, path, threads=torch.get_num_threads())(images))


def _check(runtime: str, kind: str, got: np.ndarray, expected: np.ndarray, tolerance: float) -> ParityCheck:
    diff = float(np.abs(got - expected).max())
    scale = float(np.abs(expected).max())
    agree = float((got.argmax(1) == expected.argmax(1)).mean())
    return ParityCheck(runtime, kind, int(expected.shape[0]), diff, scale, agree,
                       passed=diff <= tolerance * max(1.0, scale) and agree == 1.0)


def export_model(model: MetaFormer, path: str | os.PathLike, *, fmt: str = "onnx", resolution: Size | int = 224,
                 opset: int = DEFAULT_OPSET, dynamic_batch: bool = False, fast: bool = False,
                 images: torch.Tensor | None = None, runtimes: tuple[str, ...] | None = None,
                 tolerance: float = PARITY_TOLERANCE) -> ExportReport:
    """Export `model` to `path` (written atomically, and only when every parity check passes).

    resolution: the input's height and width (a Size; an int is a square).
    images: preprocessed photographs [N, 3, height, width] checked besides random inputs.
    runtimes: which runtimes run an ONNX file (default: every installed one of onnxruntime, openvino);
    a pt2 file runs in torch, an OpenVINO IR file (`path` .xml, its weights written beside it as .bin) in
    OpenVINO. With `fast`, ONNX and pt2 hold `FoldedExport`, IR the fast path's graph built from OpenVINO's
    operators; without, IR is OpenVINO's own conversion of the model.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}; choose from: {', '.join(FORMATS)}")
    if fmt != "onnx" and opset != DEFAULT_OPSET:
        raise ConfigError("--opset applies to ONNX exports only")
    if fmt == "onnx" and not 13 <= opset <= 20:
        raise ConfigError(f"--opset must be between 13 and 20 for the operators used here, not {opset}")
    spec = getattr(model, "spec", None)
    resolution = Size.of(resolution).check()
    report = ExportReport(model=spec.name if spec else type(model).__name__, format=fmt, path=str(path),
                          resolution=resolution, opset=opset if fmt == "onnx" else None,
                          dynamic_batch=dynamic_batch, fast=fast, tolerance=tolerance)
    if fmt == "onnx":
        runtimes = tuple(r for r in (runtimes or ("onnxruntime", "openvino")) if available(r))
        if not runtimes:
            raise ConfigError("neither onnxruntime nor openvino is installed here: nothing could check the file "
                              "(pip install onnxruntime)")
    if fmt == "openvino":
        if not available("openvino"):
            raise ConfigError("openvino is not installed here (pip install openvino)")
        runtimes = ("openvino",)
    module = exportable(model.eval(), fast)
    batch = 2 if dynamic_batch else 1  # a dynamic batch is exported at 2 and checked at 1 and 3 below
    target = Path(path).expanduser()
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=target.suffix or f".{fmt}", dir=target.parent)
    os.close(fd)
    weights = [(Path(tmp).with_suffix(".bin"), target.with_suffix(".bin"))] if fmt == "openvino" else []
    try:
        shape = (batch, 3, resolution.height, resolution.width)
        try:
            if fmt == "onnx":
                export_onnx(module, tmp, shape, opset, dynamic_batch)
            elif fmt == "pt2":
                export_pt2(module, tmp, shape, dynamic_batch)
            else:
                save_openvino(model, tmp, shape, fast, dynamic_batch)
        except Exception as err:  # the exporters raise many types, with graph dumps in the message
            first = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
            raise ConfigError(f"{report.model} could not be exported as {fmt}: {type(err).__name__}: "
                              f"{first.strip()[:200]}") from None
        inputs = {"random": torch.randn(3, 3, resolution.height, resolution.width,
                                        generator=torch.Generator().manual_seed(0))}
        if images is not None and len(images):
            inputs["images"] = images
        for kind, x in inputs.items():
            with torch.no_grad():
                expected = model(x).float().numpy()
            batches = [x] if dynamic_batch else list(x.split(batch))
            for runtime in (("torch",) if fmt == "pt2" else runtimes):
                got = np.concatenate([_run_file(fmt, runtime, tmp, b.numpy()) for b in batches])
                report.checks.append(_check(runtime, kind, got, expected, tolerance))
        if not report.passed:
            failed = [c for c in report.checks if not c.passed][0]
            report.reason = (f"{failed.runtime} on {failed.inputs} inputs: max |diff| {failed.max_abs_diff:.3g} "
                             f"(allowed {tolerance:g} x {max(1.0, failed.max_abs_logit):.3g}), top-1 agreement "
                             f"{failed.top1_agreement:.0%}")
            return report
        for written, final in weights:  # the weights first: a reader of the new .xml always finds its .bin
            os.chmod(written, new_file_mode())
            os.replace(written, final)
        os.chmod(tmp, new_file_mode())
        os.replace(tmp, target)
        report.written = True
        report.size_bytes = target.stat().st_size + sum(final.stat().st_size for _, final in weights)
        return report
    finally:
        for leftover in (Path(tmp), *(written for written, _ in weights)):
            if leftover.exists():
                leftover.unlink()
