"""`poolformer summary MODEL`: per-layer shapes, parameters, MACs and activation sizes."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import typer

from .common import (
    check_features_models, check_writable, console, csv_text, fail, human, one_int, one_size, print_json,
    resolve_models, user_errors, write_atomic,
)
from .tables import count, name, number, print_table, print_words, prose

CSV_COLUMNS = ("model", "name", "type", "depth", "output_shape", "params", "macs", "activation_bytes")


def summary_command(
    models: list[str] = typer.Argument(..., help="Model names, aliases or patterns ('v2_*'), or timm:NAME "
                                                 "(see `poolformer list`)."),
    resolution: Optional[str] = typer.Option(None, metavar="SIZE", help="Input size in pixels: 224 (a square) or "
                                             "HEIGHTxWIDTH, e.g. 800x1333 (default: the model's own, 224)."),
    features: bool = typer.Option(False, "--features", help="The features-only backbone of detection and "
                                  "segmentation (no head; the four stage maps through their own norms)."),
    batch_size: str = typer.Option("1", "--batch-size", metavar="INTEGER", help="Batch size of the traced input."),
    depth: str = typer.Option("2", metavar="INTEGER", help="How deep to expand modules: 1 = stem/stages/head, 2 = blocks within "
                                      "stages, 3 = inside blocks, 4 = everything."),
    optimizer: str = typer.Option("sgd", help="Whose state the training memory counts: sgd (momentum: one tensor "
                                              "per parameter) or adamw (two)."),
    json_output: bool = typer.Option(False, "--json", help="Print a JSON object (an array of them for several "
                                                           "models) instead of tables."),
    csv_path: Optional[Path] = typer.Option(None, "--csv", help="Also write the per-layer rows to this CSV file."),
) -> None:
    """Per-layer summary: output shape, parameters, MACs and output activation size, with totals, a per-stage
    breakdown and the memory a training step needs.

    MACs are multiply-accumulates of convolutions, linear layers and matrix products (1 MAC = 2 FLOPs);
    `poolformer flops` compares this count with fvcore, thop and torch. Training memory is parameters,
    gradients, optimizer state and the activations autograd saves for backward, with and without gradient
    checkpointing, at the batch size and resolution given.

    Example: poolformer summary s24 --depth 1; poolformer summary m36 --features --resolution 800x1333
    """
    names = resolve_models(models)
    if optimizer not in ("sgd", "adamw"):
        fail(f"unknown optimizer {optimizer!r} for --optimizer; choose from: sgd, adamw")
    check_features_models(names, features)
    size = one_size(resolution, "--resolution", "summary")
    batch, levels = one_int(batch_size, "--batch-size"), one_int(depth, "--depth")
    check_writable(csv_path, "--csv")
    from poolformer.summary import summarize

    with user_errors():
        results = [summarize(name, resolution=size, batch_size=batch, depth=levels, optimizer=optimizer,
                             features=features)
                   for name in names]
    if csv_path is not None:
        write_atomic(csv_path, csv_text(CSV_COLUMNS, _csv_rows(results)))
    if json_output:
        documents = [r.as_json() for r in results]
        print_json(documents[0] if len(documents) == 1 else documents)
        return
    for result in results:
        _render(result)
    if csv_path is not None:
        print_words(f"wrote {sum(len(r.layers) for r in results)} rows to {csv_path}", style="dim")


def _csv_rows(results) -> list[dict]:
    return [{**dataclasses.asdict(row), "model": result.model, "output_shape": "x".join(map(str, row.output_shape))}
            for result in results for row in result.layers]


def relative_names(layers) -> dict[str, str]:
    """Each layer's path below the layer listed one level up before it (stages.0.blocks.1 -> blocks.1), for
    tables too narrow for whole paths; the indentation shows the parent."""
    parents: dict[int, str] = {}
    names = {}
    for row in layers:
        parents[row.depth] = row.name
        parent = parents.get(row.depth - 1)
        names[row.name] = row.name[len(parent) + 1:] if parent and row.name.startswith(parent + ".") else row.name
    return names


def _render(result) -> None:
    shape = "x".join(map(str, result.input_shape))
    short = relative_names(result.layers)
    indent = (lambda row: "  " * (row.depth - 1))
    print_table([
        name("layer", lambda r: indent(r) + r.name, lambda r: indent(r) + short[r.name]),
        name("type", lambda r: r.type, priority=3),
        name("output shape", lambda r: "x".join(map(str, r.output_shape)), priority=2),
        count("params", lambda r: r.params),
        count("MACs", lambda r: r.macs),
        number("output size", lambda r: human(r.activation_bytes, "B"), priority=2),
    ], result.layers, title=f"{result.model}{' backbone (features only)' if result.features else ''}  input {shape} "
                            f"(batch x channels x height x width)")

    if result.stages:
        total = result.total_macs
        shaped = (lambda s: s.stage != "norms")  # a backbone's output norms: one row for the four maps
        print_table([
            name("stage", lambda s: s.stage if shaped(s) else "output norms"),
            count("tokens", lambda s: s.tokens if shaped(s) else None, priority=2),
            number("channels", lambda s: str(s.channels) if shaped(s) else "-", priority=2),
            number("blocks", lambda s: str(s.blocks) if shaped(s) else "-", priority=2),
            count("params", lambda s: s.params),
            count("MACs", lambda s: s.macs),
            number("MACs %", lambda s: f"{100 * s.macs / total if total else 0.0:.1f}"),
        ], result.stages, title="Per stage (tokens: height x width of the stage's map)")

    frozen = result.total_params - result.trainable_params
    exact = (lambda n: (f"{n:,}", human(n)))
    in_bytes = (lambda n: (human(n, "B"),) * 2)
    totals = [  # what, (exact, compact), details
        ("parameters", exact(result.total_params), "every nn.Parameter, LayerScale and frozen included"),
        ("trainable parameters", exact(result.trainable_params), f"{frozen:,} frozen" if frozen else "none frozen"),
        ("MACs", exact(result.total_macs), f"{human(result.total_macs)} multiply-accumulates (conv, linear, "
                                           f"matmul) = {human(2 * result.total_macs)} FLOPs"),
        ("parameter memory", in_bytes(result.param_bytes), f"{result.param_bytes:,} bytes"),
        ("activation memory", in_bytes(result.activation_bytes),
         f"{result.activation_bytes:,} bytes: every tensor the forward pass writes"),
    ]
    print_table([name("what", lambda t: t[0]), number("value", lambda t: t[1][0], lambda t: t[1][1]),
                 prose("", lambda t: t[2], priority=2)], totals, title="Totals", show_header=False)
    console.print("MACs count conv, linear and matmul multiply-accumulates only. Published figures are fvcore's, "
                  "which also charges 5 per normalised element; `poolformer flops` shows every counter and what "
                  "each one skips.", style="dim")
    if result.training is not None:
        _render_training(result.training)


def _render_training(memory) -> None:
    """Parameters, gradients, optimizer state and saved activations of a training step, without and with gradient
    checkpointing (decimal units: 1 MB = 10^6 bytes)."""
    state = {"sgd": "sgd momentum", "adamw": "adamw moments"}[memory.optimizer]
    checkpointed = memory.activations_checkpointed_bytes
    rows = [("parameters (fp32)", memory.params_bytes, memory.params_bytes),
            ("gradients", memory.grads_bytes, memory.grads_bytes),
            (f"optimizer state ({state})", memory.optimizer_bytes, memory.optimizer_bytes),
            ("activations saved for backward", memory.activations_bytes, checkpointed),
            ("total", memory.total_bytes, memory.total_checkpointed_bytes)]
    print_table([name("", lambda r: r[0]), number("plain", lambda r: human(r[1], "B")),
                 number("checkpointed", lambda r: human(r[2], "B"))], rows,
                title=f"Training memory, batch {memory.batch_size}, {memory.optimizer}")
    print_words("Counted, not measured: autograd's saved tensors during one forward (each storage once); with "
                "gradient checkpointing each block keeps its input and backward recomputes one block at a time. "
                "Allocator slack and backward's temporary buffers come on top.", style="dim")
