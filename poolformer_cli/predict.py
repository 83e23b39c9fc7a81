"""`poolformer predict`: classify image files and show the top-k classes. Parsing and rendering only; the
work is in poolformer.predict. torch is imported inside the command."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import typer

from .common import (
    check_impl, check_precision_name, console, err_console, print_json, print_classifier_notes, resolve_model,
    user_errors,
)
from .tables import number, print_table, prose


def _result_json(result) -> dict:
    entry = {"image": result.image, "predictions": [dataclasses.asdict(p) for p in result.predictions]}
    if result.error is not None:
        entry["error"] = result.error
    return entry


def _render(result) -> None:
    if result.error is not None:
        err_console.print(f"[bold red]error:[/] {result.image}: {result.error}", soft_wrap=True, markup=True)
        return
    console.print(result.image, style="bold", markup=False, highlight=False, soft_wrap=True)  # paths never wrap
    print_table([
        number("rank", lambda item: str(item[0]), priority=2),
        number("index", lambda item: str(item[1].index), priority=2),
        prose("class", lambda item: item[1].label),
        number("probability", lambda item: f"{100 * item[1].probability:.2f}%"),
    ], enumerate(result.predictions, 1))


def predict_command(
    images: list[str] = typer.Argument(..., help="Image files, directories (their images, not recursive) or "
                                                 "glob patterns (quote them; ** recurses)."),
    model: str = typer.Option("s12", "--model", "-m", help="Model name or alias (see `poolformer list`)."),
    weights: Optional[Path] = typer.Option(None, help="Checkpoint or exported file (official, timm or transformers "
                                                      "layout; the class count follows its classifier). Default: "
                                                      "the published ImageNet weights, downloaded once, then cached."),
    pretrained: bool = typer.Option(False, "--pretrained", help="Use the published ImageNet weights (the default "
                                                                "without --weights)."),
    top_k: int = typer.Option(5, "--top-k", "-k", min=1, help="How many classes to show per image."),
    device: str = typer.Option("auto", help="auto (GPU if available), cpu, cuda or cuda:N."),
    batch_size: int = typer.Option(16, min=1, help="Images per forward pass."),
    impl: str = typer.Option("ours", help="Implementation to run: ours, timm, fast, onnxruntime or openvino."),
    precision: str = typer.Option("fp32", help="fp32, bf16 or fp16 (bf16/fp16 via torch.autocast)."),
    labels: Optional[Path] = typer.Option(None, help="Class names, one per line (line i names output i); "
                                                     "default: ImageNet names for 1000 classes, else indices."),
    json_output: bool = typer.Option(False, "--json", help="Print a JSON list instead of tables."),
) -> None:
    """Classify images with a trained model: the top-k classes and their probabilities for each image.

    Images are preprocessed as the model expects (shorter side resized to input_size / crop_pct with
    bicubic interpolation, centre crop, ImageNet mean/std). Exit code 1 when any image could not be read.

    Example: poolformer predict photos/ --model s24 --top-k 3
    """
    name = resolve_model(model)
    check_impl(impl)
    check_precision_name(precision)
    from poolformer.predict import collect_images, load_classifier, predict

    with user_errors():
        classifier = load_classifier(name, weights=weights, pretrained=pretrained, impl=impl, device=device,
                                     labels_file=labels)
        print_classifier_notes(classifier, precision)
        results = predict(classifier, collect_images(images), top=top_k, batch_size=batch_size, precision=precision)
    if json_output:
        print_json([_result_json(r) for r in results])
    else:
        for result in results:
            _render(result)
    if any(not r.ok for r in results):
        raise typer.Exit(1)
