"""`poolformer flops MODEL [MODEL ...]`: fvcore, thop, torch and our analytic count side by side."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from .common import (
    check_plot_path, console, err_console, fail, human, one_int, parse_resolutions, print_json, resolve_models,
    save_figure, user_errors,
)

BREAKDOWNS = ("module", "operator")
IMPLS = ("ours", "timm")

UNITS_NOTE = (
    "Units: MACs = multiply-accumulates (1 MAC = 2 FLOPs). fvcore calls its count 'flops' but counts one per "
    "multiply-add (norms: 5 per element) and skips pooling, elementwise ops and activations: these are MACs, "
    "as the authors publish them. thop: MACs of the module types it knows. torch FlopCounterMode: FLOPs of "
    "conv and matmul only (= 2 x analytic MACs). analytic ops: every arithmetic operation (1 MAC = 2 ops, "
    "pooling, pool(x)-x, LayerScale, residual adds, activations and norms included); bytes: what each "
    "operator reads + writes in eager execution; ops/B: arithmetic intensity."
)


def flops_command(
    models: List[str] = typer.Argument(..., help="Model names, aliases or patterns ('poolformer_s*'), or "
                                                 "timm:NAME peers (see `poolformer list`)."),
    resolution: Optional[str] = typer.Option(
        None, help="Input height = width; several comma-separated values (e.g. 224,384,512) show how cost "
                   "grows with tokens (default: each model's own, 224)."),
    by: Optional[str] = typer.Option(None, "--by", help="Also break the counts down by 'module' or 'operator'."),
    batch_size: str = typer.Option("1", "--batch-size", metavar="INTEGER", help="Batch size of the counted input."),
    impl: str = typer.Option("ours", help="Count our model or timm's twin ('timm', v1/v2 only: the "
                                          "implementation the published v1 MACs were counted on)."),
    json_output: bool = typer.Option(False, "--json", help="Print a JSON object instead of tables."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Draw every counter's count and the bytes moved "
                                                             "against resolution, per model (.png or .svg)."),
) -> None:
    """Count MACs/FLOPs with fvcore (primary: the published figures), thop, torch's FlopCounterMode and our
    analytic count, which also charges pooling, elementwise ops, activations and norms, and the bytes each
    operator moves. Lists the ops fvcore skipped and what they would add."""
    names = resolve_models(models)
    sizes = parse_resolutions(resolution) if resolution is not None else [None]
    batch = one_int(batch_size, "--batch-size")
    if by is not None and by not in BREAKDOWNS:
        fail(f"--by must be one of: {', '.join(BREAKDOWNS)}; got {by!r}")
    if impl not in IMPLS:
        fail(f"--impl must be one of: {', '.join(IMPLS)}; got {impl!r}")
    check_plot_path(plot)
    from poolformer.flops import analyse

    reports = []
    with user_errors():
        for name in names:
            for size in sizes:
                with err_console.status(f"counting {name} at {size or 'its own resolution'} ..."):
                    reports.append(analyse(name, resolution=size, batch_size=batch, impl=impl))
    if plot is not None:
        from poolformer.plots import flops_figure

        save_figure(flops_figure(reports), plot)
    if json_output:
        print_json({"models": [r.as_json() for r in reports]})
        return
    if len(reports) == 1:
        _render_counters_one(reports[0])
    else:
        _render_counters_many(reports)
    _render_skipped(reports)
    if len(sizes) > 1:
        _render_growth(reports)
    if len(names) > 1:
        _render_comparison(reports)
    if by is not None:
        for report in reports:
            (_render_by_module if by == "module" else _render_by_operator)(report)
    console.print(UNITS_NOTE, style="dim")


def _title(r) -> str:
    return f"{r.model} @ {r.resolution}x{r.resolution}, batch {r.batch_size}"


def _render_counters_one(r) -> None:
    table = Table(title=_title(r), title_justify="left")
    for column, justify in (("counter", "left"), ("count", "right"), ("unit", "left"), ("", "right"),
                            ("counts", "left")):
        table.add_column(column, justify=justify)
    fv = r.fvcore.macs
    a = r.analytic
    vs_fvcore = (lambda macs: f"{macs - fv:+,} MACs vs fvcore")
    table.add_row("fvcore (primary)", f"{fv:,}", "MACs", human(fv), "conv, linear, matmul; norms 5/element")
    table.add_row("thop", f"{r.thop.macs:,}", "MACs", vs_fvcore(r.thop.macs), "the nn.Module types it knows")
    table.add_row("thop params", f"{r.thop.params:,}", "params", "", f"ours: {r.params:,}")
    table.add_row("torch FlopCounterMode", f"{r.torch.flops:,}", "FLOPs", f"= {r.torch.flops / 2:,.0f} MACs",
                  "conv and matmul only, 2 FLOPs per MAC")
    table.add_row("analytic", f"{a.macs:,}", "MACs", vs_fvcore(a.macs), "conv, linear, matmul")
    table.add_row("analytic", f"{a.ops:,}", "ops", human(a.ops), "every arithmetic operation, 1 MAC = 2 ops")
    table.add_row("analytic", f"{a.bytes:,}", "bytes", human(a.bytes, "B"), "read + written by each operator")
    table.add_row("arithmetic intensity", f"{a.intensity:.1f}", "ops/byte", "", "analytic ops / bytes")
    if r.published_macs is not None:
        table.add_row("published", f"{r.published_macs:,}", "MACs", vs_fvcore(r.published_macs),
                      "paper / release (fvcore @224)")
    console.print(table)
    if r.published_macs is not None and r.published_macs != fv:
        console.print(_published_note(r), style="dim")


def _published_note(r) -> str:
    """Why fvcore on our model need not equal the published figure exactly."""
    from poolformer.peers import is_peer
    from poolformer.zoo import get_spec

    if is_peer(r.model):
        return ""
    spec = get_spec(r.model)
    if spec.family == "v1" and r.impl == "ours":
        return ("Our v1 head follows the original code (GroupNorm on the 7x7 map, then mean; fvcore: 5 MACs per "
                "element). timm's head averages first, then LayerNorms 512/768 values; the exact s12 figure "
                "1,822,580,736 was counted that way: `--impl timm` reproduces it.")
    if spec.family == "v1":
        return "Published v1 figures after s12 are rounded to 0.1M (3.4129G ...)."
    if "layernorm" in spec.arch.norms:
        return ("Channel LayerNorm is written out (mean, pow, sqrt) as in the authors' code, so fvcore counts no "
                "MACs for it, as in the published figure; the analytic count still charges it.")
    return "Published figures for this family are rounded to 0.1G in the papers."


def _render_counters_many(reports) -> None:
    table = Table(title="Counters", title_justify="left")
    table.add_column("model", overflow="fold")
    for column in ("res", "fvcore\nMACs", "thop\nMACs", "torch\nFLOPs", "analytic\nMACs", "analytic\nops",
                   "bytes", "ops/B"):
        table.add_column(column, justify="right", no_wrap=True)
    for r in reports:
        a = r.analytic
        table.add_row(r.model, str(r.resolution), human(r.fvcore.macs), human(r.thop.macs), human(r.torch.flops),
                      human(a.macs), human(a.ops), human(a.bytes, "B"), f"{a.intensity:.1f}")
    console.print(table)
    console.print("exact integers: --json", style="dim")


def _render_skipped(reports) -> None:
    table = Table(title="Ops fvcore skipped (unsupported) and what the analytic count charges for them",
                  title_justify="left")
    many = len(reports) > 1
    if many:
        table.add_column("model")
        table.add_column("res", justify="right")
    for column in ("op", "calls", "analytic ops", "% of fvcore MACs"):
        table.add_column(column, justify="left" if column == "op" else "right")
    for r in reports:
        for s in r.fvcore_skipped:
            share = f"{100 * s.analytic_ops / r.fvcore.macs:.2f}" if s.analytic_ops and r.fvcore.macs else "-"
            cells = [s.op, str(s.calls), "-" if s.analytic_ops is None else f"{s.analytic_ops:,}", share]
            table.add_row(*([r.model, str(r.resolution)] if many else []), *cells)
    console.print(table)


def _render_growth(reports) -> None:
    table = Table(title="Growth with tokens (relative to each model's first resolution)", title_justify="left")
    for column in ("model", "res", "tokens (stage 1)", "tokens x", "fvcore MACs", "MACs x", "ops x", "bytes x"):
        table.add_column(column, justify="left" if column == "model" else "right")
    base = {}
    for r in reports:
        b = base.setdefault(r.model, r)
        table.add_row(r.model, str(r.resolution), f"{r.tokens:,}", f"{r.tokens / b.tokens:.2f}",
                      f"{r.fvcore.macs:,}", f"{r.fvcore.macs / b.fvcore.macs:.2f}",
                      f"{r.analytic.ops / b.analytic.ops:.2f}", f"{r.analytic.bytes / b.analytic.bytes:.2f}")
    console.print(table)
    console.print("Pooling, convs and MLPs grow linearly with tokens (MACs x = tokens x); attention and "
                  "spatial-FC token mixing grow quadratically.", style="dim")


def _render_comparison(reports) -> None:
    table = Table(title="Comparison (fvcore MACs at the first resolution counted)", title_justify="left")
    for column in ("model", "res", "params", "fvcore MACs", "published MACs@224", "top-1 %", "MACs per top-1 point"):
        table.add_column(column, justify="left" if column == "model" else "right")
    seen = set()
    for r in reports:
        if r.model in seen:
            continue
        seen.add(r.model)
        per_point = human(r.fvcore.macs / r.published_top1) if r.published_top1 else "-"
        table.add_row(r.model, str(r.resolution), f"{r.params:,}", f"{r.fvcore.macs:,}", human(r.published_macs),
                      "-" if r.published_top1 is None else f"{r.published_top1:.1f}", per_point)
    console.print(table)


def _render_by_operator(r) -> None:
    table = Table(title=f"By operator: {_title(r)} (fvcore/analytic in MACs, torch in FLOPs)", title_justify="left")
    for column in ("operator", "calls", "fvcore\nMACs", "torch\nFLOPs", "analytic\nMACs", "analytic\nops", "bytes",
                   "ops/B"):
        table.add_column(column, justify="left" if column == "operator" else "right", no_wrap=True)
    for row in r.operators:
        a = row.analytic
        table.add_row(row.op, str(a.calls), "skipped" if row.fvcore_macs is None else human(row.fvcore_macs),
                      human(row.torch_flops), human(a.macs), human(a.ops), human(a.bytes, "B"), f"{a.intensity:.2f}")
    console.print(table)


def _render_by_module(r) -> None:
    table = Table(title=f"By module (own work): {_title(r)}", title_justify="left")
    for column in ("module", "fvcore\nMACs", "torch\nFLOPs", "analytic\nMACs", "analytic\nops", "bytes", "ops/B"):
        table.add_column(column, justify="left" if column == "module" else "right", no_wrap=True)
    for row in r.modules:
        a = row.analytic
        table.add_row(row.name, human(row.fvcore_macs), human(row.torch_flops), human(a.macs), human(a.ops),
                      human(a.bytes, "B"), f"{a.intensity:.2f}")
    console.print(table)
