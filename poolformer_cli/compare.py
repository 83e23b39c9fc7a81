"""`poolformer compare MODEL...`: published top-1 against MACs, parameters and throughput measured here, with
the Pareto fronts. Parsing and rendering only; the work is in poolformer.compare and poolformer.plots."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import (
    PRECISION_NAMES, check_impl, check_plot_path, check_precision_name, check_writable, console, csv_text,
    err_console, fail, human, one_int, one_size, print_json, print_precision_note, resolve_models,
    save_figure, short_model_name, user_errors, write_atomic,
)
from .tables import name, number, print_table

CSV_COLUMNS = ("model", "family", "params", "macs", "published_macs", "top1", "top1_source", "throughput",
               "latency_ms", "status", "pareto_macs", "pareto_params", "pareto_throughput", "error")


def compare_command(
    models: list[str] = typer.Argument(..., help="Models, aliases, patterns ('poolformer_s*', 'v2_*') and timm:NAME "
                                                 "peers (e.g. timm:resnet50, timm:deit_small_patch16_224)."),
    device: Optional[str] = typer.Option(None, help="Where to measure throughput: cpu, cuda or cuda:N (default: cuda "
                                                    "when available)."),
    batch_size: str = typer.Option("32", "--batch-size", metavar="INTEGER", help="Batch size for throughput."),
    precision: str = typer.Option("fp32", help=f"{', '.join(PRECISION_NAMES)} (bf16/fp16 via torch.autocast)."),
    resolution: Optional[str] = typer.Option(None, metavar="SIZE", help="Input size for MACs and throughput: 224 (a "
                                             "square) or HEIGHTxWIDTH, e.g. 800x1333 (default 224)."),
    impl: str = typer.Option("ours", help="Implementation of the PoolFormer models (ours, timm, fast); peers always "
                                          "run as timm builds them."),
    no_measure: bool = typer.Option(False, "--no-measure", help="MACs and parameters only; throughput is not "
                                                                 "measured."),
    warmup: int = typer.Option(3, min=0, help="Untimed steps per model."),
    iters: int = typer.Option(10, min=1, help="Timed steps per model."),
    threads: Optional[int] = typer.Option(None, min=1, help="CPU threads for torch (default: torch's own choice)."),
    json_output: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    csv_path: Optional[Path] = typer.Option(None, "--csv", help="Write one row per model as CSV."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Draw top-1 against MACs, parameters and throughput "
                                                             "with the Pareto fronts (.png or .svg)."),
) -> None:
    """Accuracy against cost: published top-1 beside parameters, MACs and throughput, with the Pareto fronts.

    Parameters and MACs are counted on each model and throughput is measured here and now. A model is on the
    front of a cost when no other model is both more accurate and cheaper in it.

    Top-1 is the published figure: the papers for PoolFormer models, timm's results for timm: peers (with
    the weights' name); models without one are listed but not placed on the fronts.

    Example: poolformer compare 'poolformer_s*' timm:resnet50 --device cuda
    """
    names = resolve_models(models)
    batch = one_int(batch_size, "--batch-size")
    size = one_size(resolution, "--resolution", "compare") or 224
    check_precision_name(precision)
    check_writable(csv_path, "--csv")
    check_plot_path(plot)
    check_impl(impl)
    from poolformer import bench as engine
    from poolformer.compare import compare_models

    settings = engine.BenchSettings(warmup=warmup, iters=iters, threads=threads)
    with user_errors():
        device_name = None
        if not no_measure:
            device_name = engine.resolve_device(device)
            engine.check_precision(device_name, precision)
            print_precision_note(device_name, precision)
            engine.apply_settings(settings, device_name)
        with err_console.status("comparing ...") as status:
            result = compare_models(names, resolution=size, device=device_name, batch_size=batch,
                                    precision=precision, impl=impl, settings=settings,
                                    progress=lambda name: status.update(f"comparing {name} ..."))
    if csv_path is not None:
        write_atomic(csv_path, csv_text(CSV_COLUMNS, _csv_rows(result)))
    if plot is not None:
        from poolformer.plots import compare_figure

        try:
            figure = compare_figure(result)
        except ValueError as err:
            fail(f"--plot: {err}", 1)
        save_figure(figure, plot)
    if json_output:
        print_json(result.as_json())
    else:
        _render(result)


def _marks(result, model: str) -> str:
    """'M P T' for the fronts a model is on (MACs, parameters, throughput)."""
    return " ".join(letter for axis, letter in (("macs", "M"), ("params", "P"), ("throughput", "T"))
                    if model in result.fronts.get(axis, []))


def _speed(r) -> str:
    if r.throughput is not None:
        return f"{r.throughput:,.1f}"
    return "-" if r.status == "not measured" else r.status


def _render(result) -> None:
    where = (f"{result.device}, batch {result.batch_size}, {result.precision}, impl {result.impl}"
             if result.device else "not measured")
    print_table([
        name("model", lambda r: r.model, lambda r: short_model_name(r.model)),
        number("params", lambda r: human(r.params)),
        number("MACs", lambda r: human(r.macs)),
        number("published MACs@224", lambda r: human(r.published_macs), priority=2),
        number("top-1 %", lambda r: "-" if r.top1 is None else f"{r.top1:.2f}"),
        number("img/s", _speed),
        name("Pareto", lambda r: _marks(result, r.model)),
    ], result.rows, title=f"accuracy vs cost at {result.resolution.height}x{result.resolution.width} px "
                          f"(throughput: {where})")
    for r in result.rows:
        if r.error:
            console.print(f"[red]error[/] {r.model}: {r.error}", soft_wrap=True)
    console.print("MACs: multiply-accumulates of conv, linear and matmul for one image (1 MAC = 2 FLOPs), counted on "
                  "each model; top-1: published (papers; timm's results for timm: peers); Pareto: on the front of "
                  "top-1 vs M = MACs, P = parameters, T = throughput.", style="dim")


def _csv_rows(result) -> list[dict]:
    """Each row's fields, with 1/0 for whether it is on each Pareto front."""
    return [{**vars(r), **{f"pareto_{axis}": int(r.model in result.fronts.get(axis, []))
                           for axis in ("macs", "params", "throughput")}} for r in result.rows]
