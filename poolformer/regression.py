"""Throughput-regression checks: compare a run's rows with a baseline result file.

Rows match when they describe the same configuration (model, impl, device type, batch size, resolution,
precision, channels_last, compile); the device index is ignored so a baseline from cuda:0 applies to cuda:1.

Two metrics:
- ``throughput`` (images/s): right when baseline and run come from the same, quiet machine.
- ``relative_throughput`` (normalised mode): throughput x median latency of a fixed reference workload timed
  interleaved with the model in the same run (see poolformer.bench.reference_workload) = images per
  reference run. A machine that is uniformly faster, slower or busier moves both and cancels out; a change
  in this package's code moves only the model.

A configuration regresses when the current value is more than `max_regression_pct` percent below the
baseline's; a configuration that ran in the baseline but is now `oom` or `error` regresses too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

KEY_FIELDS = ("model", "impl", "device", "batch_size", "resolution", "precision", "channels_last", "compile")


@dataclass
class Comparison:
    """One configuration found in both files. Values are in the report's metric; change_pct < 0 is slower."""

    label: str
    baseline: float
    current: float | None
    change_pct: float | None
    regressed: bool
    note: str | None = None


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
    """The identity of a row: its configuration, with 'cuda:1' reduced to 'cuda'."""
    values = [row.get(name) for name in KEY_FIELDS]
    values[KEY_FIELDS.index("device")] = str(values[KEY_FIELDS.index("device")]).split(":")[0]
    return tuple(values)


def config_label(row: dict[str, Any]) -> str:
    """'s12/ours cpu bs2 128px fp32' plus ' CL' / ' compiled' when set."""
    label = (f"{row.get('model')}/{row.get('impl')} {str(row.get('device')).split(':')[0]} "
             f"bs{row.get('batch_size')} {row.get('resolution')}px {row.get('precision')}")
    return label + (" CL" if row.get("channels_last") else "") + (" compiled" if row.get("compile") else "")


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
        if not isinstance(row, dict) or any(name not in row for name in (*KEY_FIELDS, "status", "throughput")):
            raise ConfigError(f"{str(path)!r} has a result row without the fields {', '.join(KEY_FIELDS)}")
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
        raise ConfigError("no configuration of this run was measured in the baseline; run the same models, "
                          "batch sizes, resolutions and precisions as the baseline file")
    return report


def _compare_row(baseline: dict[str, Any], current: dict[str, Any], metric: str, max_pct: float) -> Comparison:
    before = _metric_value(baseline, metric)
    after = _metric_value(current, metric)
    label = config_label(current)
    if after is None:
        note = f"status {current.get('status')}" if current.get("status") != "ok" else f"no {metric} recorded"
        return Comparison(label, before, None, None, regressed=True, note=note)
    change_pct = (after - before) / before * 100.0
    return Comparison(label, before, after, change_pct, regressed=change_pct < -max_pct)
