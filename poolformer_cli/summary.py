"""`poolformer summary MODEL`: per-layer shapes, parameters, MACs and activation sizes."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from .common import (
    check_writable, console, csv_text, human, one_int, one_resolution, print_json, resolve_models, user_errors,
    write_atomic,
)

CSV_COLUMNS = ("model", "name", "type", "depth", "output_shape", "params", "macs", "activation_bytes")


def summary_command(
    models: list[str] = typer.Argument(..., help="Model names, aliases or patterns ('v2_*'), or timm:NAME "
                                                 "(see `poolformer list`)."),
    resolution: Optional[str] = typer.Option(None, help="Input height = width in pixels (default: the model's own, 224)."),
    batch_size: str = typer.Option("1", "--batch-size", metavar="INTEGER", help="Batch size of the traced input."),
    depth: str = typer.Option("2", metavar="INTEGER", help="How deep to expand modules: 1 = stem/stages/head, 2 = blocks within "
                                      "stages, 3 = inside blocks, 4 = everything."),
    json_output: bool = typer.Option(False, "--json", help="Print a JSON object (an array of them for several "
                                                           "models) instead of tables."),
    csv_path: Optional[Path] = typer.Option(None, "--csv", help="Also write the per-layer rows to this CSV file."),
) -> None:
    """Per-layer summary: output shape, parameters, MACs and output activation size, with totals and a
    per-stage breakdown.

    MACs are multiply-accumulates of convolutions, linear layers and matrix products (1 MAC = 2 FLOPs);
    `poolformer flops` compares this count with fvcore, thop and torch.
    """
    names = resolve_models(models)
    size = one_resolution(resolution, "summary")
    batch, levels = one_int(batch_size, "--batch-size"), one_int(depth, "--depth")
    check_writable(csv_path, "--csv")
    from poolformer.summary import summarize

    with user_errors():
        results = [summarize(name, resolution=size, batch_size=batch, depth=levels) for name in names]
    if csv_path is not None:
        write_atomic(csv_path, csv_text(CSV_COLUMNS, _csv_rows(results)))
    if json_output:
        documents = [r.as_json() for r in results]
        print_json(documents[0] if len(documents) == 1 else documents)
        return
    for result in results:
        _render(result)
    if csv_path is not None:
        console.print(f"wrote {sum(len(r.layers) for r in results)} rows to {csv_path}", style="dim")


def _csv_rows(results) -> list[dict]:
    return [{**dataclasses.asdict(row), "model": result.model, "output_shape": "x".join(map(str, row.output_shape))}
            for result in results for row in result.layers]


def _render(result) -> None:
    shape = "x".join(map(str, result.input_shape))
    layers = Table(title=f"{result.model}  input {shape}", title_justify="left")
    for column, justify in (("layer", "left"), ("type", "left"), ("output shape", "left"),
                            ("params", "right"), ("MACs", "right"), ("output", "right")):
        layers.add_column(column, justify=justify, no_wrap=True)
    for row in result.layers:
        layers.add_row("  " * (row.depth - 1) + row.name, row.type, "x".join(map(str, row.output_shape)),
                       f"{row.params:,}", f"{row.macs:,}", human(row.activation_bytes, "B"))
    console.print(layers)

    stages = Table(title="Per stage", title_justify="left")
    for column in ("stage", "tokens", "channels", "blocks", "params", "MACs", "MACs %"):
        stages.add_column(column, justify="left" if column == "stage" else "right")
    for s in result.stages:
        share = 100 * s.macs / result.total_macs if result.total_macs else 0.0
        stages.add_row(s.stage, f"{s.tokens:,}", str(s.channels), str(s.blocks), f"{s.params:,}",
                       f"{s.macs:,}", f"{share:.1f}")
    if result.stages:
        console.print(stages)

    totals = Table(title="Totals", title_justify="left", show_header=False)
    totals.add_column("what")
    totals.add_column("value", justify="right")
    totals.add_column("", style="dim")
    frozen = result.total_params - result.trainable_params
    totals.add_row("parameters", f"{result.total_params:,}", "every nn.Parameter, LayerScale and frozen included")
    totals.add_row("trainable parameters", f"{result.trainable_params:,}",
                   f"{frozen:,} frozen" if frozen else "none frozen")
    totals.add_row("MACs", f"{result.total_macs:,}", f"{human(result.total_macs)} multiply-accumulates "
                   f"(conv, linear, matmul) = {human(2 * result.total_macs)} FLOPs")
    totals.add_row("parameter memory", human(result.param_bytes, "B"), f"{result.param_bytes:,} bytes")
    totals.add_row("activation memory", human(result.activation_bytes, "B"),
                   f"{result.activation_bytes:,} bytes: every tensor the forward pass writes")
    console.print(totals)
    console.print("MACs count conv, linear and matmul multiply-accumulates only. Published figures are fvcore's, "
                  "which also charges 5 per normalised element; `poolformer flops` shows every counter and what "
                  "each one skips.", style="dim")
