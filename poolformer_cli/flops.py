"""`poolformer flops MODEL [MODEL ...]`: fvcore, thop, torch and our analytic count side by side."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from .common import (
    check_features_models, check_plot_path, console, err_console, fail, human, one_int, parse_sizes, print_json,
    resolve_models, save_figure, short_model_name, user_errors,
)
from .tables import count, name, number, print_table, prose

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
        None, "--resolution", "--resolutions", metavar="SIZES",
        help="Input sizes: 224 (a square) or HEIGHTxWIDTH (800x1333); several comma-separated (224,384,800x1333) "
             "show how cost grows with tokens (default: each model's own, 224)."),
    features: bool = typer.Option(False, "--features", help="Count the features-only backbone of detection and "
                                  "segmentation (no head; the four stage maps through their own norms)."),
    by: Optional[str] = typer.Option(None, "--by", help="Also break the counts down by 'module' or 'operator'."),
    batch_size: str = typer.Option("1", "--batch-size", metavar="INTEGER", help="Batch size of the counted input."),
    impl: str = typer.Option("ours", help="Count our model or timm's twin ('timm', v1/v2 only: the "
                                          "implementation the published v1 MACs were counted on)."),
    json_output: bool = typer.Option(False, "--json", help="Print a JSON object instead of tables."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Draw every counter's count and the bytes moved "
                                                             "against resolution, per model (.png or .svg)."),
) -> None:
    """Count MACs and FLOPs with fvcore, thop, torch and our analytic count, side by side.

    fvcore is the primary count (it gives the published figures). torch's FlopCounterMode counts FLOPs of
    convolutions and matrix products; our analytic count also charges pooling, elementwise ops, activations
    and norms, and the bytes each operator moves. Lists the ops fvcore skipped and what they would add.

    Example: poolformer flops s12 s24 --resolution 224,384 --by operator; poolformer flops m36 --features
    --resolution 800x1333
    """
    names = resolve_models(models)
    check_features_models(names, features)
    sizes = parse_sizes(resolution, "--resolution") if resolution is not None else [None]
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
                    reports.append(analyse(name, resolution=size, batch_size=batch, impl=impl, features=features))
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
    if features and impl == "timm":
        from poolformer.implementations import Timm

        console.print(f"[yellow]note[/] {Timm.FEATURES_NOTE}", soft_wrap=True)
    console.print(UNITS_NOTE, style="dim")


def _title(r) -> str:
    backbone = " backbone (features only)" if r.features else ""
    return f"{r.model}{backbone} @ {r.resolution.height}x{r.resolution.width}, batch {r.batch_size}"


def _size(r) -> str:
    """'224x224', '800x1333': height x width, both sides always."""
    return f"{r.resolution.height}x{r.resolution.width}"


def _render_counters_one(r) -> None:
    fv, a = r.fvcore.macs, r.analytic
    vs_fvcore = (lambda macs: (f"{macs - fv:+,} MACs vs fvcore", f"{'+' * (macs >= fv)}{human(macs - fv)} vs fvcore"))
    same = (lambda text: (text, ""))  # the count's own compact form: nothing to add once the count is compact
    rows = [  # counter, count, unit, relation to it (exact, compact), what it counts
        ("fvcore (primary)", fv, "MACs", same(human(fv)), "conv, linear, matmul; norms 5/element"),
        ("thop", r.thop.macs, "MACs", vs_fvcore(r.thop.macs), "the nn.Module types it knows"),
        ("thop params", r.thop.params, "params", same(""), f"ours: {r.params:,}"),
        ("torch FlopCounterMode", r.torch.flops, "FLOPs", (f"= {r.torch.flops / 2:,.0f} MACs",
                                                           f"= {human(r.torch.flops / 2)} MACs"),
         "conv and matmul only, 2 FLOPs per MAC"),
        ("analytic", a.macs, "MACs", vs_fvcore(a.macs), "conv, linear, matmul"),
        ("analytic", a.ops, "ops", same(human(a.ops)), "every arithmetic operation, 1 MAC = 2 ops"),
        ("analytic", a.bytes, "bytes", same(human(a.bytes, "B")), "read + written by each operator"),
        ("arithmetic intensity", f"{a.intensity:.1f}", "ops/byte", same(""), "analytic ops / bytes"),
    ]
    if r.published_macs is not None:
        rows.append(("published", r.published_macs, "MACs", vs_fvcore(r.published_macs),
                     "paper / release (fvcore @224)"))
    figure = (lambda value, form: value if isinstance(value, str) else form(value))
    print_table([
        name("counter", lambda row: row[0]),
        number("count", lambda row: figure(row[1], "{:,}".format), lambda row: figure(row[1], human)),
        name("unit", lambda row: row[2]),
        prose("", lambda row: row[3][0], lambda row: row[3][1], priority=2, justify="right"),
        prose("counts", lambda row: row[4], priority=3),
    ], rows, title=_title(r))
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
    print_table([
        name("model", lambda r: r.model, lambda r: short_model_name(r.model)),
        number("HxW", _size),
        number("fvcore MACs", lambda r: human(r.fvcore.macs)),
        number("thop MACs", lambda r: human(r.thop.macs), priority=2),
        number("torch FLOPs", lambda r: human(r.torch.flops), priority=2),
        number("analytic MACs", lambda r: human(r.analytic.macs)),
        number("analytic ops", lambda r: human(r.analytic.ops)),
        number("bytes", lambda r: human(r.analytic.bytes, "B")),
        number("ops/B", lambda r: f"{r.analytic.intensity:.1f}", priority=2),
    ], reports, title="Counters" + (" (features-only backbones)" if any(r.features for r in reports) else ""))
    console.print("exact integers: --json", style="dim")


def _render_skipped(reports) -> None:
    rows = [(r, s) for r in reports for s in r.fvcore_skipped]
    share = (lambda r, s: f"{100 * s.analytic_ops / r.fvcore.macs:.2f}" if s.analytic_ops and r.fvcore.macs else "-")
    which = [name("model", lambda row: row[0].model, lambda row: short_model_name(row[0].model)),
             number("HxW", lambda row: _size(row[0]))]
    print_table([
        *(which if len(reports) > 1 else []),
        name("op", lambda row: row[1].op, lambda row: row[1].op.removeprefix("aten::")),
        number("calls", lambda row: str(row[1].calls)),
        count("analytic ops", lambda row: row[1].analytic_ops),
        number("% of fvcore MACs", lambda row: share(*row)),
    ], rows, title="Ops fvcore skipped (unsupported) and what the analytic count charges for them")


def _first_per_model(reports) -> dict:
    """model -> its report at the first resolution counted."""
    first = {}
    for r in reports:
        first.setdefault(r.model, r)
    return first


def _render_growth(reports) -> None:
    first = _first_per_model(reports)
    ratio = (lambda value: (lambda r: f"{value(r) / value(first[r.model]):.2f}"))
    print_table([
        name("model", lambda r: r.model, lambda r: short_model_name(r.model)),
        number("HxW", _size),
        count("tokens (stage 1)", lambda r: r.tokens, priority=2),
        number("tokens x", ratio(lambda r: r.tokens)),
        count("fvcore MACs", lambda r: r.fvcore.macs, priority=2),
        number("MACs x", ratio(lambda r: r.fvcore.macs)),
        number("ops x", ratio(lambda r: r.analytic.ops)),
        number("bytes x", ratio(lambda r: r.analytic.bytes)),
    ], reports, title="Growth with tokens (relative to each model's first resolution)")
    console.print("Pooling, convs and MLPs grow linearly with tokens (MACs x = tokens x); attention and "
                  "spatial-FC token mixing grow quadratically.", style="dim")


def _render_comparison(reports) -> None:
    print_table([
        name("model", lambda r: r.model, lambda r: short_model_name(r.model)),
        number("HxW", _size, priority=2),
        count("params", lambda r: r.params),
        count("fvcore MACs", lambda r: r.fvcore.macs),
        number("published MACs@224", lambda r: human(r.published_macs)),
        number("top-1 %", lambda r: "-" if r.published_top1 is None else f"{r.published_top1:.1f}"),
        number("MACs per top-1 point", lambda r: human(r.fvcore.macs / r.published_top1) if r.published_top1
               else "-", priority=2),
    ], _first_per_model(reports).values(), title="Comparison (fvcore MACs at the first resolution counted)")


def _breakdown_columns() -> list:
    """The counters' columns both breakdowns share (a row with torch_flops and an analytic count)."""
    return [
        number("torch FLOPs", lambda row: human(row.torch_flops), priority=2),
        number("analytic MACs", lambda row: human(row.analytic.macs)),
        number("analytic ops", lambda row: human(row.analytic.ops)),
        number("bytes", lambda row: human(row.analytic.bytes, "B")),
        number("ops/B", lambda row: f"{row.analytic.intensity:.2f}", priority=2),
    ]


def _render_by_operator(r) -> None:
    print_table([
        name("operator", lambda row: row.op),
        number("calls", lambda row: str(row.analytic.calls)),
        number("fvcore MACs", lambda row: "skipped" if row.fvcore_macs is None else human(row.fvcore_macs)),
        *_breakdown_columns(),
    ], r.operators, title=f"By operator: {_title(r)} (fvcore/analytic in MACs, torch in FLOPs)")


def _render_by_module(r) -> None:
    print_table([
        name("module", lambda row: row.name),
        number("fvcore MACs", lambda row: human(row.fvcore_macs)),
        *_breakdown_columns(),
    ], r.modules, title=f"By module (own work): {_title(r)}")
