"""`poolformer export MODEL --output FILE`: ONNX or pt2, checked against our fp32 model before it is written.
Parsing and rendering only; the work is in poolformer.runtimes."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import typer
from rich.text import Text

from .common import check_writable, console, err_console, fail, one_size, print_json, resolve_model, user_errors
from .tables import name, number, print_table, print_words


def export_command(
    model: str = typer.Argument(..., help="Model name or alias (see `poolformer list`)."),
    output: Path = typer.Option(..., "--output", "-o", help="The file to write (.onnx, .pt2, or .xml for openvino: "
                                                            "its weights go beside it as .bin)."),
    fmt: str = typer.Option("onnx", "--format", help="onnx, pt2 (torch.export program) or openvino (OpenVINO IR)."),
    weights: Optional[Path] = typer.Option(None, help="Checkpoint file (official, timm or transformers layout)."),
    pretrained: bool = typer.Option(False, "--pretrained", help="Use the published ImageNet weights."),
    resolution: str = typer.Option("224", metavar="SIZE", help="Input size the file is exported for: 224 (a square) "
                                   "or HEIGHTxWIDTH, e.g. 800x1333."),
    opset: int = typer.Option(17, help="ONNX opset (13-20)."),
    dynamic_batch: bool = typer.Option(False, "--dynamic-batch", help="Any batch size (default: batch 1)."),
    features: bool = typer.Option(False, "--features", help="Export the detection/segmentation backbone (the "
                                                            "dense tasks' fork_feat model) instead of the "
                                                            "classifier: no head, four outputs stage1 .. stage4, the "
                                                            "stage maps [batch, C_i, H_i, W_i] at strides 4, 8, 16 "
                                                            "and 32, each through its GroupNorm output norm "
                                                            "(official norm0/2/4/6). --weights takes an mmdet/mmseg "
                                                            "checkpoint, or classification weights (fresh norms)."),
    dynamic_size: bool = typer.Option(False, "--dynamic-size", help="Any input height and width (--features only; "
                                                                    "checked at a second, odd non-square size too)."),
    fast: bool = typer.Option(False, "--fast", help="Export the folded model of poolformer.optimize: fewer "
                                                    "operators, the same logits (PoolFormer v1/v2 only)."),
    images: Optional[list[str]] = typer.Option(None, "--images", help="Photographs (files, folders or globs) to "
                                                                      "check parity on, besides random inputs "
                                                                      "(default: generated images)."),
    json_output: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Export a model to ONNX, a torch.export pt2 program or OpenVINO IR, written only when it matches our model.

    The file runs with ONNX Runtime and OpenVINO (torch for pt2, OpenVINO for IR) on random inputs and on
    images, and is written only when its logits match our fp32 model's (max |diff| <= 1e-4 x max(1, max
    |logit|), the same top-1 on every input). IR with --fast is the graph `--impl fast` runs on a CPU;
    without, OpenVINO's own conversion of the model.

    With --features the file holds the backbone of the dense tasks: input "images" (batch x 3 x H x W), outputs
    "stage1" .. "stage4" (strides 4, 8, 16, 32), each checked like the logits (no top-1). Such a file is not a
    classifier: predict and eval refuse it.

    GroupNorm with one group and the pooling that skips padded positions are exported as plain reductions,
    a depthwise convolution and a constant map, which every runtime computes the same way (TensorRT, for
    example, computes ONNX GroupNormalization with one group per channel).

    Example: poolformer export s12 --pretrained --output s12.onnx
    """
    if dynamic_size and not features:
        fail("--dynamic-size applies to --features exports: a classifier file is exported for the one --resolution "
             "that predict and eval read from it")
    name = resolve_model(model)
    size = one_size(resolution, "--resolution", "export")
    if fmt not in ("onnx", "pt2", "openvino"):
        fail(f"unknown format {fmt!r} for --format; choose from: onnx, pt2, openvino")
    suffix = {"onnx": ".onnx", "pt2": ".pt2", "openvino": ".xml"}[fmt]
    if output.suffix.lower() != suffix:
        fail(f"--output {str(output)!r}: a --format {fmt} file should end in {suffix}")
    check_writable(output, "--output")
    if fmt == "openvino":
        check_writable(output.with_suffix(".bin"), "--output's weights file")
    from poolformer import create_model
    from poolformer.predict import trained_num_classes
    from poolformer.export import export_model

    with user_errors():
        if weights is not None and pretrained:
            fail("pass either --weights PATH or --pretrained, not both")
        classes = 1000  # the checkpoint's classifier width where one is given (a fine-tuned 10-class head)
        if (weights is not None or pretrained) and not features:
            classes = trained_num_classes(name, weights=weights, pretrained=pretrained)
        net = create_model(name, weights=None if weights is None else str(weights), pretrained=pretrained,
                           num_classes=classes, features_only=features, **_size_overrides(name, size))
        checked = _images(net.spec, size, images)
        if fast:
            from poolformer.errors import ConfigError
            from poolformer.fast import fold

            try:
                fold(net)
            except ConfigError as err:
                fail(f"--fast: {str(err).split(';')[0]}; export it without --fast")
        with err_console.status(f"exporting {name} as {fmt} and checking it ..."):
            report = export_model(net, output, fmt=fmt, resolution=size, opset=opset, dynamic_batch=dynamic_batch,
                                  fast=fast, images=checked, dynamic_size=dynamic_size)
    if json_output:
        print_json(report.as_json())
    else:
        _render(report)
    if not report.written:
        fail(f"not written: the exported file does not match the model ({report.reason})", 1)


def _size_overrides(name: str, size) -> dict:
    """Models with token-count dependent parts (random / spatial-FC mixers, position embeddings) are built for
    the export size (height and width)."""
    from poolformer.zoo import get_spec

    return {} if get_spec(name).family in ("v1", "v2") else {"img_size": size.img_size}


def _images(spec, size, arguments: Optional[list[str]]):
    """[N, 3, height, width]: the photographs given (preprocessed as the model expects: a square crop of the
    longer side, then its centre at height x width), else generated ones."""
    import torch

    from poolformer.data import Preprocess, load_batch, synthetic_images
    from poolformer.predict import collect_images

    side = max(size.height, size.width)
    square = dataclasses.replace(Preprocess.for_spec(spec), input_size=side)
    top, left = (side - size.height) // 2, (side - size.width) // 2

    def transform(img):
        return square(img)[:, top:top + size.height, left:left + size.width]

    if not arguments:
        return torch.stack([transform(img) for img in synthetic_images(4)])
    entries = collect_images(arguments)
    tensors, errors = load_batch([e.path for e in entries if e.error is None], transform)
    problems = [e for e in entries if e.error] + [e for e in errors if e]
    if problems or not tensors:
        first = problems[0] if problems else "no images"
        fail(f"--images: {getattr(first, 'path', '')}{': ' if hasattr(first, 'path') else ''}"
             f"{getattr(first, 'error', first)}", 1)
    return torch.stack(tensors)


def _render(report) -> None:
    features = report.outputs != ["logits"]
    size = "any size" if report.dynamic_size else f"{report.resolution.height}x{report.resolution.width} px"
    title = (f"{report.model} -> {report.path} ({report.format}{', opset ' + str(report.opset) if report.opset else ''}"
             f", {size}, {'dynamic batch' if report.dynamic_batch else 'batch 1'}"
             f"{', folded (--fast)' if report.fast else ''}"
             f"{', features ' + ' '.join(report.outputs) if features else ''})")
    columns = [name("runtime", lambda c: c.runtime), name("inputs", lambda c: c.inputs)]
    if features:
        columns.append(name("output", lambda c: c.output))
    columns += [
        number("count", lambda c: str(c.count), priority=2),
        number("max |diff|", lambda c: f"{c.max_abs_diff:.2e}"),
        number("max |value|" if features else "max |logit|", lambda c: f"{c.max_abs_logit:.3g}", priority=2),
    ]
    if not features:
        columns.append(number("top-1 agree", lambda c: f"{c.top1_agreement:.0%}"))
    columns.append(name("parity", lambda c: Text("ok", style="green") if c.passed else Text("FAILED", style="red")))
    print_table(columns, report.checks, title=title)
    if report.written:
        print_words(f"wrote {report.path} ({report.size_bytes / 1e6:,.1f} MB)")
    if features:
        console.print(f"parity: max |diff| <= {report.tolerance:g} x max(1, max |value|) for each output, against "
                      "our fp32 model", style="dim")
    else:
        console.print(f"parity: max |diff| <= {report.tolerance:g} x max(1, max |logit|) and the same top-1 on "
                      "every input, against our fp32 model", style="dim")
