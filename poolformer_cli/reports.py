"""CI-native renderings of a bench run: the JSON github-action-benchmark reads, and a Markdown report for a job
summary or a pull-request comment. Both are functions of the result document (and the regression report)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    from poolformer.regression import RegressionReport


def _label(row: dict[str, Any]) -> str:
    from poolformer.regression import config_label

    return config_label(row)


def github_benchmark(document: dict[str, Any]) -> list[dict[str, Any]]:
    """Entries for github-action-benchmark's `customBiggerIsBetter` tool: {name, unit, value, range, extra}.

    One entry per row in images/s (range: the spread of the per-step latencies, IQR, as ± img/s), plus one in
    images per reference run for normalised rows. A row that failed is charted as 0 with its status, so the
    action's alert fires on it like on any other drop."""
    env = document.get("env", {})
    where = ", ".join(str(v) for v in (env.get("device_name"), f"torch {env.get('torch')}",
                                       f"commit {env.get('git_commit')}") if v)
    entries = []
    for row in document["results"]:
        name = _label(row)
        if row["status"] != "ok":
            entries.append({"name": name, "unit": "img/s", "value": 0,
                            "extra": f"status {row['status']}: {row.get('error') or ''}".strip().rstrip(":")})
            continue
        latency = row["latency_ms"]
        spread = row["throughput"] * latency["iqr"] / latency["median"] if latency["median"] else 0.0
        extra = (f"median {latency['median']:.2f} ms, p90 {latency['p90']:.2f} ms per batch; "
                 f"peak memory {(row.get('peak_memory_bytes') or 0) / 1e6:,.0f} MB; {where}")
        entries.append({"name": name, "unit": "img/s", "value": round(row["throughput"], 3),
                        "range": f"± {spread:.3f}", "extra": extra})
        if row.get("relative_throughput") is not None:
            entries.append({"name": f"{name} (normalised)", "unit": "img per reference run",
                            "value": round(row["relative_throughput"], 4),
                            "extra": "throughput relative to a reference workload timed in the same run"})
    return entries


def _cell(value: Optional[float], fmt: str = "{:,.1f}") -> str:
    return "-" if value is None else fmt.format(value)


def markdown(document: dict[str, Any], report: Optional[RegressionReport], hardware: str = "") -> str:
    """The run as Markdown: a results table, then the regression verdict and its table when a baseline was given."""
    env = document.get("env", {})
    lines = [f"### poolformer bench on {env.get('device', '?')}" + (f" ({hardware})" if hardware else ""), "",
             f"torch {env.get('torch')}, timm {env.get('timm')}, poolformer {env.get('poolformer')}, "
             f"commit `{env.get('git_commit')}`, {env.get('date')}", "",
             "| configuration | status | img/s | median ms | p90 ms | IQR | peak MB |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for row in document["results"]:
        latency = row.get("latency_ms") or {}
        iqr = (f"{latency['iqr'] / latency['median']:.1%}" if latency.get("median") else "-")
        peak = None if row.get("peak_memory_bytes") is None else row["peak_memory_bytes"] / 1e6
        lines.append(f"| {_label(row)} | {row['status']} | {_cell(row.get('throughput'))} | "
                     f"{_cell(latency.get('median'), '{:.2f}')} | {_cell(latency.get('p90'), '{:.2f}')} | {iqr} | "
                     f"{_cell(peak, '{:,.0f}')} |")
    if report is None:
        return "\n".join(lines) + "\n"
    from poolformer.regression import ALPHA

    regressed = sum(c.regressed for c in report.comparisons)
    verdict = (f":x: **{regressed} of {len(report.comparisons)} configuration(s) regressed**" if regressed else
               f":white_check_mark: **no regression** ({len(report.comparisons)} configuration(s) compared)")
    lines += ["", f"#### Regression check: {verdict}", "",
              f"Metric {report.metric}; a configuration regresses when it lost more than "
              f"{report.max_regression_pct:g}% and its step times are slower than the baseline's (one-sided "
              f"Mann-Whitney U, p < {ALPHA:g}).", "",
              "| configuration | baseline | current | change | p | verdict |", "|---|---:|---:|---:|---:|---|"]
    for c in report.comparisons:
        details = "; ".join(filter(None, [c.note, *c.gpu_differences]))
        lines.append(f"| {c.label} | {c.baseline:,.3f} | {_cell(c.current, '{:,.3f}')} | "
                     f"{_cell(c.change_pct, '{:+.1f}%')} | {_cell(c.p_value, '{:.3g}')} | "
                     f"{'**REGRESSED**' if c.regressed else 'ok'}{' (' + details + ')' if details else ''} |")
    for label in report.only_in_baseline:
        lines.append(f"\nnot measured in this run: {label}")
    return "\n".join(lines) + "\n"
