"""`export_model`, the engine of `poolformer export`: write a PoolFormer as ONNX, pt2 or OpenVINO IR, run the file
with its runtime, and keep it only when its outputs match our fp32 model's.

The model goes into the file in its portable form (`poolformer.runtimes.export_forms`), or with `fast` as the fast
path's folded model (`poolformer.fast.folded_export`; for IR, the graph it builds from OpenVINO's operators).

Parity: the exported file and our fp32 model see the same inputs (random images, plus real or generated
photographs), and the file passes when max |logit difference| <= PARITY_TOLERANCE x max(1, max |logit|) and the
top-1 class agrees on every input. fp32 graphs that compute the same function differ by float rounding alone
(~1e-6 relative here); a runtime that computes GroupNorm per channel or pools over the padding is off by O(1).

A features-only model (the dense tasks' backbone) exports with four outputs, `stage1` .. `stage4` (the stage maps
at strides 4, 8, 16, 32 through their output norms), each checked on its own in the same way (no top-1). With
`dynamic_size` (features-only exports) the file takes any input height and width, and is checked at a second,
odd and non-square size as well.
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
from .model import MetaFormer, stage_output_names
from .runtimes.export_forms import portable_form
from .runtimes.exporting import DEFAULT_OPSET, export_onnx, export_pt2, openvino_converter
from .runtimes.sessions import available, make_runner, require
from .sizes import Size

FORMATS = ("onnx", "pt2", "openvino")  # openvino: OpenVINO IR, FILE.xml with its weights beside it in FILE.bin
PARITY_TOLERANCE = 1e-4


@dataclass
class ParityCheck:
    """One runtime on one kind of input, for one output. max_abs_diff: against our fp32 model's output;
    max_abs_logit: the largest |value| of that output (the logits, or a feature map); top1_agreement: fraction of
    inputs (logits only; None for feature maps)."""

    runtime: str
    inputs: str  # "random", "images", or "random HxW" (a dynamic-size file at a second size)
    count: int
    max_abs_diff: float
    max_abs_logit: float
    top1_agreement: float | None
    passed: bool
    output: str = "logits"  # or a features-only export's stage1 .. stage4


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
    outputs: list[str] = field(default_factory=lambda: ["logits"])  # the file's outputs, by name
    dynamic_size: bool = False
    written: bool = False
    size_bytes: int | None = None
    reason: str | None = None  # why nothing was written

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.passed for c in self.checks)

    def as_json(self) -> dict:
        """Every field; the size as resolution (224 for a square, else "800x1333"), height and width."""
        return {**asdict(self), **self.resolution.json_fields(), "passed": self.passed}


def exportable(model: MetaFormer, fast: bool, dynamic_size: bool = False) -> nn.Module:
    """The module that goes into the file: the folded model (fast) or the portable form of the model."""
    return FoldedExport(model, dynamic_size=dynamic_size) if fast else portable_form(model, dynamic_size)


def fixed_size_reason(model: MetaFormer) -> str | None:
    """Why `model` cannot be exported for any input size (a part built for one token count), or None."""
    for module in model.modules():
        if hasattr(module, "num_tokens"):
            return f"its {type(module).__name__} token mixer is built for {module.num_tokens} tokens"
    if any(stage.pos_embed is not None for stage in model.stages):
        return "its position embedding is built for one input size"
    return None


def _output_names(model: MetaFormer) -> list[str]:
    return list(stage_output_names(len(model.stages))) if model.head is None else ["logits"]


def second_size(resolution: Size) -> tuple[int, int]:
    """The odd, non-square input size a dynamic-size file is checked at besides `resolution` (64: 95x97;
    64x96: 95x145)."""
    height, width = 2 * (resolution.height // 2) + 31, 2 * (3 * resolution.width // 4) + 1
    return height, width + 2 if width == height else width


def openvino_model(model: MetaFormer, shape: tuple[int, ...], fast: bool, dynamic_batch: bool = False,
                   dynamic_size: bool = False) -> Any:
    """The `openvino.Model` that `--format openvino` writes: the fast path's graph built from OpenVINO's operators
    (fast), or OpenVINO's own conversion of the model; a features-only model's outputs named stage1 .. stage4."""
    if fast:
        return build_model(*fold(model), shape, dynamic_batch, dynamic_size)
    graph = openvino_converter(model)(shape)
    if dynamic_batch or dynamic_size:
        sides = [-1, -1] if dynamic_size else list(shape[2:])
        graph.reshape({graph.inputs[0]: [-1 if dynamic_batch else shape[0], shape[1], *sides]})
    if model.head is None:
        for output, name in zip(graph.outputs, _output_names(model), strict=True):
            output.get_tensor().set_names({name})
    return graph


def save_openvino(model: MetaFormer, path: str | os.PathLike, shape: tuple[int, ...], fast: bool,
                  dynamic_batch: bool = False, dynamic_size: bool = False) -> None:
    """Write `openvino_model(...)` as OpenVINO IR: `path` (.xml) and its weights in float32 beside it (.bin)."""
    require("openvino").save_model(openvino_model(model, shape, fast, dynamic_batch, dynamic_size), str(path),
                                   compress_to_fp16=False)


def _run_file(fmt: str, runtime: str, path: str, images: np.ndarray,
              features: bool = False) -> np.ndarray | list[np.ndarray]:
    """The file's logits for `images`; with `features`, the list of its outputs (a features-only export's maps)."""
    if fmt == "pt2":
        program = torch.export.load(path)
        with torch.no_grad():
            out = program.module()(torch.from_numpy(images))
        return [o.numpy() for o in out] if features else out.numpy()
    runner = make_runner(runtime, path, threads=torch.get_num_threads(), features=features)
    return [np.asarray(o) for o in runner.run_all(images)] if features else np.asarray(runner(images))


def _check(runtime: str, kind: str, got: np.ndarray, expected: np.ndarray, tolerance: float,
           output: str = "logits") -> ParityCheck:
    scale = float(np.abs(expected).max())
    if got.shape != expected.shape:  # a runtime that gives another shape fails, whatever its values
        return ParityCheck(runtime, kind, int(expected.shape[0]), float("inf"), scale, None, False, output)
    diff = float(np.abs(got - expected).max())
    agree = float((got.argmax(1) == expected.argmax(1)).mean()) if output == "logits" else None
    return ParityCheck(runtime, kind, int(expected.shape[0]), diff, scale, agree,
                       passed=diff <= tolerance * max(1.0, scale) and agree in (None, 1.0), output=output)


def _parity_checks(model: MetaFormer, fmt: str, path: str, runtimes: tuple[str, ...],
                   inputs: dict[str, torch.Tensor], batch: int | None, tolerance: float) -> list[ParityCheck]:
    """Each runtime on each kind of input, one check per output; `batch` None: whole inputs at once (a dynamic
    batch), else runs of `batch` images."""
    names = _output_names(model)
    features = model.head is None
    checks = []
    for kind, x in inputs.items():
        with torch.no_grad():
            reference = model(x)
        expected = [r.float().numpy() for r in (reference if features else [reference])]
        batches = [x] if batch is None else list(x.split(batch))
        for runtime in (("torch",) if fmt == "pt2" else runtimes):
            runs = [_run_file(fmt, runtime, path, b.numpy(), features) for b in batches]
            outputs = zip(*runs, strict=True) if features else [runs]
            for name, got, want in zip(names, outputs, expected, strict=True):
                checks.append(_check(runtime, kind, np.concatenate(got), want, tolerance, name))
    return checks


def export_model(model: MetaFormer, path: str | os.PathLike, *, fmt: str = "onnx", resolution: Size | int = 224,
                 opset: int = DEFAULT_OPSET, dynamic_batch: bool = False, fast: bool = False,
                 images: torch.Tensor | None = None, runtimes: tuple[str, ...] | None = None,
                 tolerance: float = PARITY_TOLERANCE, dynamic_size: bool = False) -> ExportReport:
    """Export `model` to `path` (written atomically, and only when every parity check passes).

    resolution: the input's height and width (a Size; an int is a square).
    images: preprocessed photographs [N, 3, height, width] checked besides random inputs.
    runtimes: which runtimes run an ONNX file (default: every installed one of onnxruntime, openvino);
    a pt2 file runs in torch, an OpenVINO IR file (`path` .xml, its weights written beside it as .bin) in
    OpenVINO. With `fast`, ONNX and pt2 hold `FoldedExport`, IR the fast path's graph built from OpenVINO's
    operators; without, IR is OpenVINO's own conversion of the model.
    A features-only model's file has the outputs stage1 .. stage4, each checked; `dynamic_size` (features-only
    models) makes its input height and width dynamic, checked at `second_size(resolution)` too.
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
                          dynamic_batch=dynamic_batch, fast=fast, tolerance=tolerance,
                          outputs=_output_names(model), dynamic_size=dynamic_size)
    if dynamic_size and model.head is not None:
        raise ConfigError("a dynamic input size is for features-only exports: a classifier file is exported for the "
                          "one resolution that predict and eval read from it")
    fixed = fixed_size_reason(model) if dynamic_size else None
    if fixed is not None:
        raise ConfigError(f"{report.model} cannot be exported for any input size: {fixed}")
    if fmt == "onnx":
        runtimes = tuple(r for r in (runtimes or ("onnxruntime", "openvino")) if available(r))
        if not runtimes:
            raise ConfigError("neither onnxruntime nor openvino is installed here: nothing could check the file "
                              "(pip install onnxruntime)")
    if fmt == "openvino":
        if not available("openvino"):
            raise ConfigError("openvino is not installed here (pip install openvino)")
        runtimes = ("openvino",)
    module = exportable(model.eval(), fast, dynamic_size)
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
                export_onnx(module, tmp, shape, opset, dynamic_batch, tuple(report.outputs), dynamic_size)
            elif fmt == "pt2":
                export_pt2(module, tmp, shape, dynamic_batch, dynamic_size)
            else:
                save_openvino(model, tmp, shape, fast, dynamic_batch, dynamic_size)
        except Exception as err:  # the exporters raise many types, with graph dumps in the message
            first = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
            raise ConfigError(f"{report.model} could not be exported as {fmt}: {type(err).__name__}: "
                              f"{first.strip()[:200]}") from None
        generator = torch.Generator().manual_seed(0)
        inputs = {"random": torch.randn(3, 3, resolution.height, resolution.width, generator=generator)}
        if images is not None and len(images):
            inputs["images"] = images
        if dynamic_size:
            height, width = second_size(resolution)
            inputs[f"random {height}x{width}"] = torch.randn(3, 3, height, width, generator=generator)
        report.checks = _parity_checks(model, fmt, tmp, runtimes or (), inputs, None if dynamic_batch else batch,
                                       tolerance)
        if not report.passed:
            failed = [c for c in report.checks if not c.passed][0]
            where = "" if failed.output == "logits" else f", output {failed.output}"
            agreement = "" if failed.top1_agreement is None else f", top-1 agreement {failed.top1_agreement:.0%}"
            report.reason = (f"{failed.runtime} on {failed.inputs} inputs{where}: max |diff| "
                             f"{failed.max_abs_diff:.3g} (allowed {tolerance:g} x "
                             f"{max(1.0, failed.max_abs_logit):.3g}){agreement}")
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
