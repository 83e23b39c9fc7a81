"""Accuracy against cost: published top-1 beside parameters, MACs and throughput measured here and now.

The PoolFormer paper plots top-1 against MACs; whether speed follows MACs depends on the machine, so
`compare_models` also measures throughput with the bench engine (same method as `poolformer bench`). For each
cost axis the Pareto front is the set of models no other model beats on both top-1 and that cost.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Sequence

from .bench import BenchConfig, BenchSettings, run_config
from .errors import ConfigError
from .sizes import Size

# axis -> (row attribute, whether a larger value is better)
AXES: dict[str, tuple[str, bool]] = {"macs": ("macs", False), "params": ("params", False),
                                     "throughput": ("throughput", True)}


@dataclass
class CompareRow:
    """One model. macs: analytic multiply-accumulates (conv, linear, matmul) for one image at `resolution`."""

    model: str
    family: str  # v1, v2, ablation, hybrid, or peer (timm:NAME)
    params: int
    macs: int
    published_macs: int | None  # the paper's figure at 224 (PoolFormer models), fvcore-counted
    top1: float | None  # published ImageNet-1k top-1, %
    top1_source: str | None
    throughput: float | None = None  # images/s measured here (None when not measured or failed)
    latency_ms: float | None = None  # median per batch
    status: str = "not measured"  # ok | oom | error | not measured
    error: str | None = None


@dataclass
class CompareResult:
    rows: list[CompareRow]
    resolution: Size  # the input's height and width, for MACs and throughput
    device: str | None
    batch_size: int
    precision: str
    impl: str
    fronts: dict[str, list[str]] = field(default_factory=dict)  # axis -> models on its Pareto front

    def as_json(self) -> dict:
        """Every field; the size as resolution (224 for a square, else "800x1333"), height and width."""
        return {**asdict(self), **self.resolution.json_fields()}


def pareto_front(points: Sequence[tuple[str, float, float]], larger_cost_is_better: bool = False) -> list[str]:
    """Names of the points (name, cost, top1) that no other point dominates: at least as good on both and better
    on one. `cost` is minimised unless larger_cost_is_better (throughput). Ordered from the cheapest (for
    throughput: the fastest) to the most accurate."""
    sign = -1.0 if larger_cost_is_better else 1.0
    front = []
    for name, cost, top1 in points:
        dominated = any(
            (sign * other_cost <= sign * cost and other_top1 >= top1)
            and (sign * other_cost < sign * cost or other_top1 > top1)
            for other_name, other_cost, other_top1 in points if other_name != name)
        if not dominated:
            front.append((sign * cost, name))
    return [name for _, name in sorted(front)]


def published_top1(name: str) -> tuple[float | None, str | None]:
    """(top-1 %, where it comes from) for a zoo model or a timm peer; (None, None) where none is known."""
    from .peers import is_peer, published

    if is_peer(name):
        figures = published(name)
        return (figures.top1, f"timm results ({figures.weights}, {figures.eval_size}px)") if figures else (None, None)
    from .zoo import get_spec

    spec = get_spec(name)
    return spec.published.top1, "paper" if spec.published.top1 is not None else None


def describe(name: str, resolution: Size | int) -> CompareRow:
    """Everything but throughput: parameters and MACs counted on the model, published figures."""
    from .peers import is_peer
    from .summary import summarize

    summary = summarize(name, resolution=resolution, depth=1)
    top1, source = published_top1(name)
    if is_peer(name):
        family, published_macs = "peer", None
    else:
        from .zoo import get_spec

        spec = get_spec(name)
        family, published_macs = spec.family, spec.published.macs
    return CompareRow(model=summary.model, family=family, params=summary.total_params, macs=summary.total_macs,
                      published_macs=published_macs, top1=top1, top1_source=source)


def compare_models(names: Iterable[str], *, resolution: Size | int = 224, device: str | None = "cpu",
                   batch_size: int = 32, precision: str = "fp32", impl: str = "ours",
                   settings: BenchSettings | None = None,
                   progress: Callable[[str], None] | None = None) -> CompareResult:
    """Describe every model and, unless device is None, measure its throughput (`impl` for PoolFormer models;
    peers always run as timm builds them). Fronts are computed over the models with a published top-1."""
    names = list(names)
    if not names:
        raise ConfigError("compare needs at least one model")
    if batch_size < 1:
        raise ConfigError(f"batch size must be >= 1, got {batch_size}")
    from .peers import is_peer

    settings = settings or BenchSettings(warmup=3, iters=10)
    resolution = Size.of(resolution).check()
    rows = []
    for name in names:
        if progress is not None:
            progress(name)
        row = describe(name, resolution)
        if device is not None:
            config = BenchConfig(model=name, impl="ours" if is_peer(name) else impl, device=device,
                                 batch_size=batch_size, resolution=resolution, precision=precision)
            measured = run_config(config, settings)
            row.status, row.error, row.throughput = measured.status, measured.error, measured.throughput
            row.latency_ms = measured.latency_ms.median if measured.latency_ms else None
        rows.append(row)
    result = CompareResult(rows=rows, resolution=resolution, device=device, batch_size=batch_size,
                           precision=precision, impl=impl)
    for axis, (attribute, larger_is_better) in AXES.items():
        points = [(r.model, getattr(r, attribute), r.top1) for r in rows
                  if r.top1 is not None and getattr(r, attribute) is not None]
        if points:
            result.fronts[axis] = pareto_front(points, larger_cost_is_better=larger_is_better)
    return result
