"""`poolformer eval`: top-1 / top-5 accuracy on an ImageNet-style class-folder dataset. Parsing and rendering
only; the counting is in poolformer.evaluate. torch is imported inside the command."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .common import (
    check_impl, check_precision_name, check_writable, csv_text, err_console, fail, print_json, print_classifier_notes,
    resolve_model, user_errors, write_atomic,
)
from .tables import name, print_table, prose


def summary_json(result) -> dict:
    """The --output document: the required keys first, then what produced them."""
    return {
        "top1": result.top1, "top5": result.top5, "images": result.images, "skipped": len(result.skipped),
        "throughput": result.throughput, "wall_s": result.wall_s,
        "correct_top1": result.correct_top1, "correct_top5": result.correct_top5,
        "model": result.model, "impl": result.impl, "weights": result.weights, "root": result.root,
        "mapping": result.mapping, "device": result.device, "precision": result.precision,
        "channels_last": result.channels_last, "batch_size": result.batch_size, "world_size": result.world_size,
        "skipped_files": [{"path": s.path, "error": s.error} for s in result.skipped],
    }


PREDICTIONS_COLUMNS = ("path", "target", "target_label", "top1", "top1_label", "top1_probability", "correct_top1",
                       "correct_top5", "top5", "error")


def predictions_csv(result, labels: list[str]) -> str:
    """One row per image: scored images with their top-5, then skipped ones with their error."""
    scored = [{"path": o.path, "target": o.target, "target_label": labels[o.target], "top1": o.top_indices[0],
               "top1_label": labels[o.top_indices[0]], "top1_probability": f"{o.top_probabilities[0]:.6f}",
               "correct_top1": int(o.correct_top1), "correct_top5": int(o.correct_top5),
               "top5": " ".join(map(str, o.top_indices)), "error": ""} for o in result.outcomes]
    return csv_text(PREDICTIONS_COLUMNS, scored + [{"path": s.path, "error": s.error} for s in result.skipped])


def _render(result) -> None:
    rows = [
        ("top-1", f"{result.top1:.3f}%  ({result.correct_top1:,} / {result.images:,})"),
        ("top-5", f"{result.top5:.3f}%  ({result.correct_top5:,} / {result.images:,})"),
        ("images scored", f"{result.images:,}"),
        ("images skipped", f"{len(result.skipped):,}"),
        ("throughput", f"{result.throughput:,.1f} img/s"),
        ("wall time", f"{result.wall_s:.2f} s"),
        ("classes mapped by", result.mapping),
        ("setup", f"{result.impl}, {result.precision}{', channels_last' if result.channels_last else ''}, "
                  f"batch {result.batch_size}, {result.device}"
                  + (f" x {result.world_size} processes" if result.world_size > 1 else "")),
    ]
    print_table([name("metric", lambda row: row[0]), prose("value", lambda row: row[1])], rows,
                title=f"{result.model} on {result.root}")
    for s in result.skipped:
        err_console.print(f"skipped {s.path}: {s.error}", soft_wrap=True, markup=False)


@contextlib.contextmanager
def _progress_bar(enabled: bool):
    """A callback for the engine that drives a Rich bar with running top-1 and images/s (None when off)."""
    if not enabled:
        yield None
        return
    with Progress(TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("top-1 {task.fields[top1]:.2f}%"), TextColumn("{task.fields[rate]:.1f} img/s"),
                  TimeElapsedColumn(), console=err_console, transient=True) as bar:
        task = bar.add_task("eval", total=None, top1=0.0, rate=0.0)

        def update(p) -> None:
            bar.update(task, completed=p.done, total=p.total, top1=p.top1, rate=p.images_per_s)

        yield update


def eval_command(
    data: Path = typer.Argument(..., help="Dataset folder: ImageNet val layout (DIR or DIR/val with one "
                                          "folder per wnid) or any class-folder dataset."),
    model: str = typer.Option("s12", "--model", "-m", help="Model name or alias (see `poolformer list`)."),
    weights: Optional[Path] = typer.Option(None, help="Checkpoint or exported file (official, timm or transformers "
                                                      "layout). Default: the published ImageNet weights, downloaded "
                                                      "once, then cached."),
    pretrained: bool = typer.Option(False, "--pretrained", help="Use the published ImageNet weights (the default "
                                                                "without --weights)."),
    class_map: Optional[Path] = typer.Option(None, help="Folder -> class index: JSON {folder: index}, or text "
                                                        "with one folder name per line (line number = index)."),
    batch_size: int = typer.Option(64, min=1, help="Images per forward pass (per process)."),
    workers: Optional[int] = typer.Option(None, min=0, help="DataLoader worker processes decoding images, per "
                                                           "process (default: the CPU count, at most 8)."),
    limit: Optional[int] = typer.Option(None, min=1, help="Evaluate only N images, spread evenly over the "
                                                          "sorted dataset so every class is represented."),
    device: str = typer.Option("auto", help="auto (GPU if available), cpu, cuda or cuda:N. Under torchrun "
                                            "each process uses cuda:LOCAL_RANK."),
    precision: str = typer.Option("fp32", help="fp32, bf16 or fp16 (bf16/fp16 via torch.autocast)."),
    channels_last: bool = typer.Option(False, "--channels-last",
                                       help="Model and input in channels_last memory format."),
    impl: str = typer.Option("ours", help="Implementation to run: ours, timm, fast, onnxruntime or openvino."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write the summary as JSON (atomically)."),
    predictions: Optional[Path] = typer.Option(None, help="Write one CSV row per image (atomically)."),
    json_output: bool = typer.Option(False, "--json", help="Print the summary JSON instead of a table."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar on stderr (by default one shows "
                                                                   "the running top-1 and images/s)."),
) -> None:
    """ImageNet top-1 / top-5 accuracy of a trained model on a folder of labelled images.

    Folders named by ImageNet wnids map to the 1000 outputs by wnid (sorted wnids = class index; a subset of
    classes is fine). Unreadable images are skipped and listed, never counted. Run the same command under
    `torchrun --nproc-per-node N` to shard the images over N processes; the counts are summed.

    Example: poolformer eval ~/data/imagenet --model s12 --limit 5000
    """
    name = resolve_model(model)
    check_precision_name(precision)
    check_impl(impl)
    check_writable(output, "--output")
    check_writable(predictions, "--predictions")
    from poolformer.data import class_folders, read_class_map
    from poolformer.distributed import distributed
    from poolformer.evaluate import evaluate
    from poolformer.devices import resolve_device
    from poolformer.predict import load_classifier, trained_num_classes

    with user_errors():
        mapping = read_class_map(class_map) if class_map is not None else None
        # the dataset is checked before the model is built: bad input fails fast
        dataset = class_folders(data, trained_num_classes(name, weights=weights, pretrained=pretrained), mapping)
        with distributed(resolve_device(device)) as procs:
            classifier = load_classifier(name, weights=weights, pretrained=pretrained, impl=impl, device=procs.device)
            if procs.is_main:
                print_classifier_notes(classifier, precision)
            with _progress_bar(not no_progress and procs.is_main and not json_output) as on_batch:
                result = evaluate(classifier, dataset, batch_size=batch_size, workers=workers, limit=limit,
                                  precision=precision, channels_last=channels_last,
                                  keep_outcomes=predictions is not None, procs=procs, progress=on_batch)
    if not procs.is_main:
        return
    document = summary_json(result)
    if output is not None:
        write_atomic(output, json.dumps(document, indent=2) + "\n")
    if predictions is not None:
        write_atomic(predictions, predictions_csv(result, classifier.labels))
    if json_output:
        print_json(document)
    else:
        _render(result)
    if result.images == 0:
        fail(f"none of the {len(result.skipped)} images could be read", 1)
