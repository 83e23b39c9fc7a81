"""Pictures: functions from result values to a matplotlib Figure. Nothing here saves a file or shows a window
(the command line saves, atomically); matplotlib runs on its Agg backend, so no display is needed.

- `bench_figure(rows)`: bench result rows (`BenchResult.to_row()` dicts, as in `--output` files): throughput,
  p50/p90 latency and peak memory against batch size, one line per model x impl x precision, one column of
  panels per input size (height x width); configurations that ran out of memory are marked with a red x.
- `flops_figure(reports)`: every counter's count and the bytes moved against resolution, one colour per model.
- `compare_figure(result)`: published top-1 against MACs, parameters and measured throughput, each point
  labelled, the Pareto front drawn.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Iterable, Sequence

from .sizes import row_size

FIGURE_DPI = 100
SIDE_LABEL = "input side (px; for H x W, the side of the square of equal area)"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _series_label(row: dict[str, Any]) -> str:
    from .regression import options_suffix

    return f"{row['model']}/{row['impl']} {row['precision']}" + options_suffix(row)


def bench_figure(rows: Iterable[dict[str, Any]]):
    """[3 x resolutions] panels: img/s, latency (p50 solid, p90 dashed) and peak memory (MB) vs batch size."""
    rows = list(rows)
    if not rows:
        raise ValueError("no bench rows to plot")
    plt = _pyplot()
    resolutions = sorted({row_size(r) for r in rows})
    fig, axes = plt.subplots(3, len(resolutions), figsize=(5.2 * len(resolutions), 9.6), squeeze=False,
                             dpi=FIGURE_DPI, sharex="col")
    colours = {}
    for column, resolution in enumerate(resolutions):
        series: dict[str, list[dict]] = defaultdict(list)
        for row in rows:
            if row_size(row) == resolution:
                series[_series_label(row)].append(row)
        throughput_ax, latency_ax, memory_ax = axes[0][column], axes[1][column], axes[2][column]
        for label, points in series.items():
            if not any(r["status"] in ("ok", "oom") for r in points):
                continue  # only errors: nothing to draw (the table lists them)
            colour = colours.setdefault(label, f"C{len(colours) % 10}")
            points.sort(key=lambda r: r["batch_size"])
            ok = [r for r in points if r["status"] == "ok"]
            batches = [r["batch_size"] for r in ok]
            throughput_ax.plot(batches, [r["throughput"] for r in ok], "o-", color=colour, label=label)
            latency_ax.plot(batches, [r["latency_ms"]["median"] for r in ok], "o-", color=colour)
            latency_ax.plot(batches, [r["latency_ms"]["p90"] for r in ok], "--", color=colour, alpha=0.7)
            memory_ax.plot(batches, [(r.get("peak_memory_bytes") or 0) / 1e6 for r in ok], "o-", color=colour)
            for failed in (r for r in points if r["status"] == "oom"):
                throughput_ax.plot([failed["batch_size"]], [0], "x", color="red", markersize=10, mew=2,
                                   label="out of memory" if "out of memory" not in
                                   throughput_ax.get_legend_handles_labels()[1] else None)
        throughput_ax.set_title(f"{resolution.height}x{resolution.width} px")
        throughput_ax.set_ylabel("throughput (images/s)")
        latency_ax.set_ylabel("latency per batch (ms)\nmedian solid, p90 dashed")
        memory_ax.set_ylabel("peak memory (MB)")
        memory_ax.set_xlabel("batch size")
        batch_sizes = sorted({r["batch_size"] for r in rows if row_size(r) == resolution})
        for ax in (throughput_ax, latency_ax, memory_ax):
            ax.set_xscale("log", base=2)
            ax.set_xticks(batch_sizes, [str(b) for b in batch_sizes])
            ax.minorticks_off()
            ax.grid(True, alpha=0.3)
        throughput_ax.legend(fontsize="small")
    device = rows[0].get("device", "")
    fig.suptitle(f"poolformer bench on {device}")
    fig.tight_layout()
    return fig


# counter name -> (value from a FlopsReport, unit shown in the legend)
_COUNTERS = (
    ("fvcore", lambda r: r.fvcore.macs, "MACs"),
    ("thop", lambda r: r.thop.macs, "MACs"),
    ("torch FlopCounterMode", lambda r: r.torch.flops, "FLOPs"),
    ("analytic", lambda r: r.analytic.macs, "MACs"),
    ("analytic", lambda r: r.analytic.ops, "ops"),
)


def flops_figure(reports: Sequence[Any]):
    """Two panels: each counter's count (log scale) and the bytes moved, against resolution, per model."""
    if not reports:
        raise ValueError("no flops reports to plot")
    plt = _pyplot()
    fig, (count_ax, bytes_ax) = plt.subplots(1, 2, figsize=(12, 4.8), dpi=FIGURE_DPI)
    by_model: dict[str, list] = defaultdict(list)
    for report in reports:
        by_model[report.model].append(report)
    styles = ("o-", "s--", "^-.", "d:", "v-")
    for index, (model, model_reports) in enumerate(by_model.items()):
        model_reports.sort(key=lambda r: r.resolution.pixels)
        resolutions = [r.resolution.pixels ** 0.5 for r in model_reports]  # a rectangle: the equal-area square's side
        colour = f"C{index % 10}"
        for style, (counter, value, unit) in zip(styles, _COUNTERS):
            count_ax.plot(resolutions, [value(r) for r in model_reports], style, color=colour,
                          label=f"{model}: {counter} ({unit})")
        bytes_ax.plot(resolutions, [r.analytic.bytes / 1e6 for r in model_reports], "o-", color=colour, label=model)
    count_ax.set_yscale("log")
    count_ax.set_xlabel(SIDE_LABEL)
    count_ax.set_ylabel("count per batch (MACs: 1 multiply-add; FLOPs = 2 per MAC)")
    count_ax.set_title("what each counter counts")
    # colour = model, marker = counter: a legend of both instead of one entry per line
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=f"C{i % 10}", label=model) for i, model in enumerate(by_model)]
    handles += [Line2D([], [], color="grey", marker=style[0], linestyle="", label=f"{counter} ({unit})")
                for style, (counter, _, unit) in zip(styles, _COUNTERS)]
    count_ax.legend(handles=handles, fontsize="x-small", loc="upper left")
    bytes_ax.set_xlabel(SIDE_LABEL)
    bytes_ax.set_ylabel("bytes read + written by the operators (MB)")
    bytes_ax.set_title("memory traffic (eager execution)")
    bytes_ax.legend(fontsize="small")
    for ax in (count_ax, bytes_ax):
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    return fig


_AXIS_LABELS = {
    "macs": ("MACs per image (G; conv, linear, matmul)", lambda v: v / 1e9),
    "params": ("parameters (M)", lambda v: v / 1e6),
    "throughput": ("throughput measured here (images/s)", lambda v: v),
}


def _short_name(model: str) -> str:
    """A zoo model's first alias (s12, v2_s12), a peer's full name (timm:resnet50)."""
    from .zoo import MODELS

    spec = MODELS.get(model)
    return spec.aliases[0] if spec is not None and spec.aliases else model


def compare_figure(result: Any):
    """One panel per cost axis (MACs, parameters, and throughput when measured): published top-1 against it,
    every model labelled, the Pareto front as a line. Models without a published top-1 are left out."""
    plt = _pyplot()
    axes_names = [a for a in ("macs", "params", "throughput") if a in result.fronts]
    if not axes_names:
        raise ValueError("nothing to plot: no model has a published top-1 (and a measured value)")
    fig, axes = plt.subplots(1, len(axes_names), figsize=(6.4 * len(axes_names), 6.4), squeeze=False,
                             dpi=FIGURE_DPI)
    for ax, axis in zip(axes[0], axes_names):
        label, scale = _AXIS_LABELS[axis]
        points = [(r, scale(getattr(r, axis))) for r in result.rows
                  if r.top1 is not None and getattr(r, axis) is not None]
        for row, x in points:
            marker = "s" if row.family == "peer" else "o"
            ax.plot([x], [row.top1], marker, color="C1" if row.family == "peer" else "C0")
            ax.annotate(_short_name(row.model), (x, row.top1), textcoords="offset points",
                        xytext=(4, 4), fontsize="x-small")
        front = set(result.fronts[axis])
        on_front = sorted(((x, row.top1) for row, x in points if row.model in front))
        # the best top-1 reachable at each cost: a staircase (cheaper to the left; faster to the right)
        ax.step([p[0] for p in on_front], [p[1] for p in on_front], where="pre" if axis == "throughput" else "post",
                color="C2", alpha=0.7, label="Pareto front")
        ax.set_xlabel(label)
        ax.set_ylabel("published ImageNet-1k top-1 (%)")
        ax.grid(True, alpha=0.3)
        ax.margins(x=0.15, y=0.1)
        ax.legend(fontsize="small", loc="best")
    where = (f"{result.device}, batch {result.batch_size}, {result.precision}" if result.device else "not measured")
    fig.suptitle(f"accuracy vs cost at {result.resolution}px (throughput: {where}; squares: timm peers)")
    fig.tight_layout()
    return fig
