"""Throughput-regression checks: compare a run's rows with a baseline result file.

Rows match when they describe the same configuration (model, impl, device type, batch size, input size,
precision, channels_last, compile, cast, features, and for train rows mode, optimizer, gradient checkpointing);
the device index is ignored so a baseline from cuda:0 applies to cuda:1, and a square row written before sizes
had two sides (resolution 224 alone) matches one that names height and width.

Two metrics:
- ``throughput`` (images/s): right when baseline and run come from the same, quiet machine.
- ``relative_throughput`` (normalised mode): throughput x median latency of a fixed reference workload timed
  interleaved with the model in the same run (see poolformer.bench.reference_workload) = images per
  reference run. A machine that is uniformly faster, slower or busier moves both and cancels out; a change
  in this package's code moves only the model.

A configuration regresses when the current value is more than `max_regression_pct` percent below the
baseline's AND the per-step timings say the difference is not chance: a one-sided Mann-Whitney U test of the
current steps against the baseline's stored steps (latencies; in normalised mode the per-step ratios
reference / model), p < ALPHA. The threshold says whether a change matters, the test whether it is real: a
noisy run whose median drifted past the threshold while its steps overlap the baseline's does not fire.
Where either file has no step times, or too few for the test to ever reach ALPHA, the threshold decides alone
(and the comparison says so). A configuration that ran in the baseline but is now `oom` or `error` regresses.

On a GPU each comparison also says where the GPU ran differently from the baseline (SM or memory clock,
temperature, throttle reasons, from the rows' NVML telemetry), so that a slowdown is not silently blamed
on the code.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .errors import ConfigError
from .sizes import row_size

KEY_FIELDS = ("model", "impl", "device", "batch_size", "resolution", "precision", "channels_last", "compile",
              "cast", "features", "mode", "optimizer", "grad_checkpointing")
# fields older files lack, and what a row without them was: no --cast-model, no --features, inference
DEFAULTS = {"cast": False, "features": False, "mode": "inference", "optimizer": None, "grad_checkpointing": False}
REQUIRED_FIELDS = tuple(name for name in KEY_FIELDS if name not in DEFAULTS)
ALPHA = 0.05  # significance level of the step-time test
CLOCK_CHANGE = 0.05  # relative SM/memory clock difference that is reported
TEMPERATURE_CHANGE_C = 10


@dataclass
class Comparison:
    """One configuration found in both files. Values are in the report's metric; change_pct < 0 is slower."""

    label: str
    baseline: float
    current: float | None
    change_pct: float | None
    regressed: bool
    note: str | None = None
    p_value: float | None = None  # one-sided Mann-Whitney U on the step timings; None: not testable
    gpu_differences: list[str] = field(default_factory=list)  # how the GPU ran differently from the baseline


@dataclass
class RegressionReport:
    metric: str  # "throughput" (images/s) or "relative_throughput" (images per reference run)
    max_regression_pct: float
    comparisons: list[Comparison]
    only_in_current: list[str] = field(default_factory=list)  # configurations the baseline does not have
    only_in_baseline: list[str] = field(default_factory=list)  # baseline configurations this run did not do

    @property
    def failed(self) -> bool:
        return any(c.regressed for c in self.comparisons)


def config_key(row: dict[str, Any]) -> tuple:
    """The identity of a row: its configuration, with 'cuda:1' reduced to 'cuda' and the size as (height, width)
    (a square row written before sizes had two sides matches one that names them). A train row never matches an
    inference row, so an inference baseline never judges a train row."""
    values = [row.get(name, DEFAULTS.get(name)) for name in KEY_FIELDS]
    for flag in ("cast", "features", "grad_checkpointing"):
        values[KEY_FIELDS.index(flag)] = bool(row.get(flag))
    size = row_size(row)
    values[KEY_FIELDS.index("resolution")] = (size.height, size.width)
    values[KEY_FIELDS.index("device")] = str(values[KEY_FIELDS.index("device")]).split(":")[0]
    return tuple(values)


def config_label(row: dict[str, Any]) -> str:
    """'s12/ours cpu bs2 128px fp32' ('800x1333px' for height x width) plus the options set (see options_suffix)."""
    label = (f"{row.get('model')}/{row.get('impl')} {str(row.get('device')).split(':')[0]} "
             f"bs{row.get('batch_size')} {row_size(row)}px {row.get('precision')}")
    return label + options_suffix(row)


def options_suffix(row: dict[str, Any]) -> str:
    """' train(sgd)' and ' ckpt' (a train row, with gradient checkpointing), ' CL' (channels_last), ' cast'
    (weights in the precision, no autocast), ' features' (the backbone alone), ' compiled' or
    ' compiled(max-autotune)' - for a row dict or a BenchConfig's asdict."""
    mode = row.get("compile_mode")
    train = (f" train({row.get('optimizer') or 'sgd'})" + (" ckpt" if row.get("grad_checkpointing") else "")
             if row.get("mode") == "train" else "")
    return (train + (" CL" if row.get("channels_last") else "") + (" cast" if row.get("cast") else "")
            + (" features" if row.get("features") else "")
            + ((f" compiled({mode})" if mode and mode != "default" else " compiled") if row.get("compile") else ""))


def load_results(path: str | Path) -> dict[str, Any]:
    """A result file written by `poolformer bench --output`: {"env": {...}, "results": [...]}."""
    path = Path(path).expanduser()
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"baseline file {str(path)!r} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"cannot read baseline file {str(path)!r}: {err}") from None
    if not isinstance(document, dict) or not isinstance(document.get("results"), list):
        raise ConfigError(f"{str(path)!r} is not a poolformer bench result file (no \"results\" list)")
    for row in document["results"]:
        if not isinstance(row, dict) or any(name not in row for name in (*REQUIRED_FIELDS, "status", "throughput")):
            raise ConfigError(f"{str(path)!r} has a result row without the fields {', '.join(REQUIRED_FIELDS)}")
    return document


def _metric_value(row: dict[str, Any], metric: str) -> float | None:
    value = row.get(metric)
    return float(value) if row.get("status") == "ok" and value is not None else None


def compare(baseline_rows: list[dict[str, Any]], current_rows: list[dict[str, Any]], max_regression_pct: float,
            normalised: bool = False) -> RegressionReport:
    """Compare every current configuration that the baseline measured successfully."""
    if not 0 <= max_regression_pct < 100:
        raise ConfigError(f"--max-regression must be a percentage in [0, 100), got {max_regression_pct:g}")
    metric = "relative_throughput" if normalised else "throughput"
    baseline_by_key = {config_key(row): row for row in baseline_rows if row.get("status") == "ok"}
    if normalised and any(row.get(metric) is None for row in baseline_by_key.values()):
        raise ConfigError("the baseline has no reference-workload timings; record it with `poolformer bench "
                          "--normalised --output FILE`, or compare without --normalised")
    report = RegressionReport(metric=metric, max_regression_pct=max_regression_pct, comparisons=[])
    seen = set()
    for row in current_rows:
        key = config_key(row)
        if key not in baseline_by_key:
            report.only_in_current.append(config_label(row))
            continue
        seen.add(key)
        report.comparisons.append(_compare_row(baseline_by_key[key], row, metric, max_regression_pct))
    report.only_in_baseline = [config_label(row) for key, row in baseline_by_key.items() if key not in seen]
    if not report.comparisons:
        raise ConfigError("no configuration of this run was measured in the baseline; run the same models, modes, "
                          "batch sizes, resolutions and precisions as the baseline file")
    return report


def _compare_row(baseline: dict[str, Any], current: dict[str, Any], metric: str, max_pct: float) -> Comparison:
    before = _metric_value(baseline, metric)
    after = _metric_value(current, metric)
    label = config_label(current)
    differences = gpu_differences(baseline.get("telemetry"), current.get("telemetry"))
    if after is None:
        note = f"status {current.get('status')}" if current.get("status") != "ok" else f"no {metric} recorded"
        return Comparison(label, before, None, None, regressed=True, note=note, gpu_differences=differences)
    change_pct = (after - before) / before * 100.0
    p_value, note = step_test(baseline, current, normalised=metric == "relative_throughput")
    significant = p_value is None or p_value < ALPHA
    return Comparison(label, before, after, change_pct, regressed=change_pct < -max_pct and significant, note=note,
                      p_value=p_value, gpu_differences=differences)


def recheck(report: RegressionReport, baseline_rows: list[dict[str, Any]], current_rows: list[dict[str, Any]],
            remeasure: Callable[[list[dict[str, Any]]], list[dict[str, Any]]], retries: int,
            normalised: bool = False) -> tuple[RegressionReport, list[dict[str, Any]]]:
    """Measure the configurations that regressed again, up to `retries` times, and keep the newest rows: a
    configuration fails only when every measurement of it regressed. `remeasure(rows)` returns a fresh row
    for each row it is given, in order. A slowdown of the machine that lasts a few seconds fails one
    measurement, not two (on the H200, 2 of 10 unchanged runs at batch 64 once lost 16%); a slower model fails
    every one. Each comparison measured again says so in its note, with the earlier changes."""
    if retries < 0:
        raise ConfigError(f"--retries must be >= 0, got {retries}")
    rows = list(current_rows)
    earlier: dict[str, list[float | None]] = {}
    for _ in range(retries):
        failing = {c.label: c.change_pct for c in report.comparisons if c.regressed}
        indices = [i for i, row in enumerate(rows) if config_label(row) in failing]
        if not indices:
            break
        for i in indices:
            earlier.setdefault(config_label(rows[i]), []).append(failing[config_label(rows[i])])
        fresh = remeasure([rows[i] for i in indices])
        if len(fresh) != len(indices):
            raise RuntimeError(f"remeasure returned {len(fresh)} rows for {len(indices)}")
        for i, row in zip(indices, fresh):
            rows[i] = row
        report = compare(baseline_rows, rows, report.max_regression_pct, normalised)
    for comparison in report.comparisons:
        if comparison.label in earlier:
            changes = ", ".join("-" if c is None else f"{c:+.1f}%" for c in earlier[comparison.label])
            runs = len(earlier[comparison.label]) + 1
            summary = (f"regressed in all {runs} measurements (earlier: {changes})" if comparison.regressed
                       else f"passed when measured again (measurement {runs}; earlier: {changes})")
            comparison.note = "; ".join(filter(None, [summary, comparison.note]))
    return report, rows


# ------------------------------------------------------------------------------------------ step-time test


def _steps(row: dict[str, Any], normalised: bool) -> list[float]:
    """Per-step samples where larger means slower: latencies (ms), or in normalised mode model / reference
    latency of each step pair (the inverse of images per reference run)."""
    steps = (row.get("latency_ms") or {}).get("steps") or []
    if not normalised:
        return [float(v) for v in steps]
    references = row.get("reference_steps_ms") or []
    return [float(step) / float(ref) for step, ref in zip(steps, references) if ref]


def step_test(baseline: dict[str, Any], current: dict[str, Any], normalised: bool) -> tuple[float | None, str | None]:
    """(p-value, note) of "the current steps are slower than the baseline's"; (None, why) where untestable."""
    before, after = _steps(baseline, normalised), _steps(current, normalised)
    if not before or not after:
        return None, "no step times stored: threshold only"
    if smallest_p_value(len(after), len(before)) >= ALPHA:
        return None, f"{len(after)} vs {len(before)} steps cannot reach p < {ALPHA}: threshold only"
    return mann_whitney_u(after, before, alternative="greater")[1], None


def _normal_sf(z: float) -> float:
    return 0.5 * math.erfc(z / math.sqrt(2.0))


def mann_whitney_u(x: list[float], y: list[float], alternative: str = "two-sided") -> tuple[float, float]:
    """(U of x, p-value) of the Mann-Whitney U test, by the normal approximation with tie and continuity
    corrections (scipy.stats.mannwhitneyu(..., method="asymptotic") gives the same). alternative: "greater"
    (x tends to be larger than y), "less", or "two-sided"."""
    if alternative not in ("greater", "less", "two-sided"):
        raise ValueError(f"alternative must be greater, less or two-sided, not {alternative!r}")
    n1, n2 = len(x), len(y)
    if n1 == 0 or n2 == 0:
        raise ValueError("the Mann-Whitney U test needs samples on both sides")
    combined = sorted([(v, 0) for v in x] + [(v, 1) for v in y])
    ranks = [0.0] * len(combined)
    tie_term, i = 0.0, 0
    while i < len(combined):  # average ranks over runs of equal values
        j = i
        while j + 1 < len(combined) and combined[j + 1][0] == combined[i][0]:
            j += 1
        for k in range(i, j + 1):
            ranks[k] = (i + j) / 2.0 + 1.0
        tied = j - i + 1
        tie_term += tied**3 - tied
        i = j + 1
    u1 = sum(r for r, (_, side) in zip(ranks, combined) if side == 0) - n1 * (n1 + 1) / 2.0
    n = n1 + n2
    mean = n1 * n2 / 2.0
    sigma = math.sqrt(n1 * n2 / 12.0 * ((n + 1) - tie_term / (n * (n - 1))))
    if sigma == 0.0:  # every value equal: no evidence either way
        return u1, 1.0
    u = {"greater": u1, "less": n1 * n2 - u1, "two-sided": max(u1, n1 * n2 - u1)}[alternative]
    p = _normal_sf((u - mean - 0.5) / sigma)
    return u1, min(1.0, 2.0 * p if alternative == "two-sided" else p)


def smallest_p_value(n1: int, n2: int) -> float:
    """The one-sided p-value of completely separated samples of these sizes: the best the test can do."""
    return mann_whitney_u([float(v) for v in range(n2, n2 + n1)], [float(v) for v in range(n2)], "greater")[1]


# ------------------------------------------------------------------------------------------ GPU state


def gpu_differences(before: dict[str, Any] | None, after: dict[str, Any] | None) -> list[str]:
    """How the GPU ran differently in the current row than in the baseline row (NVML telemetry summaries):
    SM or memory clock off by more than CLOCK_CHANGE, peak temperature by TEMPERATURE_CHANGE_C or more,
    throttle reasons that appeared or went away. Empty where either side has no telemetry."""
    if not before or not after or not before.get("available") or not after.get("available"):
        return []
    found = []
    for key, name in (("sm_clock_mhz_median", "SM clock"), ("mem_clock_mhz_median", "memory clock")):
        old, new = before.get(key), after.get(key)
        if old and new and abs(new - old) / old > CLOCK_CHANGE:
            found.append(f"{name} {old:,.0f} -> {new:,.0f} MHz")
    old_t, new_t = before.get("temperature_c_max"), after.get("temperature_c_max")
    if old_t is not None and new_t is not None and abs(new_t - old_t) >= TEMPERATURE_CHANGE_C:
        found.append(f"peak temperature {old_t} -> {new_t} C")
    old_r, new_r = set(before.get("throttle_reasons") or []), set(after.get("throttle_reasons") or [])
    if new_r - old_r:
        found.append("throttled now: " + ", ".join(sorted(new_r - old_r)))
    if old_r - new_r:
        found.append("throttled in the baseline only: " + ", ".join(sorted(old_r - new_r)))
    return found
