"""Pictures (poolformer.plots) and the CI-native bench outputs: the figures' axes, lines and labels, the files."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from poolformer import plots
from poolformer_cli import reports
from poolformer_cli.app import app

from .conftest import assert_one_line_error

runner = CliRunner()
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def bench_row(batch, resolution=64, impl="ours", status="ok", throughput=None, median=10.0):
    throughput = batch * 1000.0 / median if throughput is None and status == "ok" else throughput
    latency = {"median": median, "p90": median * 1.2, "iqr": 1.0} if status == "ok" else \
        {"median": None, "p90": None, "iqr": None}
    return {"model": "poolformer_s12", "impl": impl, "device": "cpu", "batch_size": batch, "resolution": resolution,
            "precision": "fp32", "channels_last": False, "compile": False, "status": status, "throughput": throughput,
            "latency_ms": latency, "peak_memory_bytes": 1e9 + batch * 1e6 if status == "ok" else None,
            "error": None if status == "ok" else "CUDA out of memory"}


def test_bench_figure_has_a_panel_per_resolution_and_a_line_per_series_with_oom_marked():
    rows = [bench_row(b, r, impl) for r in (64, 96) for impl in ("ours", "fast") for b in (1, 2, 4)]
    rows.append(bench_row(8, 96, "fast", status="oom"))
    rows.append(bench_row(1, 64, "timm", status="error"))  # errors only: nothing drawn for that series
    figure = plots.bench_figure(rows)
    axes = figure.axes
    assert len(axes) == 6  # 3 rows (img/s, latency, memory) x 2 resolutions
    assert [axes[0].get_title(), axes[1].get_title()] == ["64x64 px", "96x96 px"]
    throughput_64 = axes[0]
    labels = [line.get_label() for line in throughput_64.get_lines()]
    assert labels == ["poolformer_s12/ours fp32", "poolformer_s12/fast fp32"]
    assert list(throughput_64.get_lines()[0].get_xdata()) == [1, 2, 4]
    assert list(throughput_64.get_lines()[0].get_ydata()) == pytest.approx([100.0, 200.0, 400.0])
    oom = [line for line in axes[1].get_lines() if line.get_label() == "out of memory"]
    assert len(oom) == 1 and list(oom[0].get_xdata()) == [8]
    assert "throughput" in throughput_64.get_ylabel() and "peak memory" in axes[4].get_ylabel()
    latency_lines = axes[2].get_lines()  # median and p90 per series
    assert len(latency_lines) == 4 and list(latency_lines[1].get_ydata()) == pytest.approx([12.0, 12.0, 12.0])


@pytest.mark.slow
def test_flops_figure_draws_every_counter_per_model():
    from poolformer.flops import analyse

    reports_ = [analyse("s12", resolution=r) for r in (32, 64)]
    figure = plots.flops_figure(reports_)
    counts, traffic = figure.axes
    labels = [line.get_label() for line in counts.get_lines()]
    assert labels == ["poolformer_s12: fvcore (MACs)", "poolformer_s12: thop (MACs)",
                      "poolformer_s12: torch FlopCounterMode (FLOPs)", "poolformer_s12: analytic (MACs)",
                      "poolformer_s12: analytic (ops)"]
    assert list(counts.get_lines()[0].get_ydata()) == [r.fvcore.macs for r in reports_]
    assert list(traffic.get_lines()[0].get_ydata()) == pytest.approx([r.analytic.bytes / 1e6 for r in reports_])


def test_compare_figure_labels_every_ranked_model_and_draws_the_fronts():
    from poolformer.compare import compare_models

    result = compare_models(["s12", "v2_s12", "timm:resnet10t", "timm:resnet14t"], resolution=32, device=None)
    figure = plots.compare_figure(result)
    assert len(figure.axes) == 2  # MACs and parameters: throughput was not measured
    labels = sorted(text.get_text() for text in figure.axes[0].texts)
    assert labels == ["s12", "timm:resnet10t", "v2_s12"]  # resnet14t has no published top-1
    front = [line for line in figure.axes[0].get_lines() if line.get_label() == "Pareto front"]
    assert len(front) == 1 and len(front[0].get_xdata()) == len(result.fronts["macs"])


@pytest.mark.parametrize("suffix", [".png", pytest.param(".svg", marks=pytest.mark.slow)])
def test_bench_plot_github_benchmark_and_markdown_files(tmp_path, suffix):
    plot, gb, md = tmp_path / f"b{suffix}", tmp_path / "gb.json", tmp_path / "r.md"
    result = runner.invoke(app, ["bench", "s12", "--device", "cpu", "--batch-sizes", "1,2", "--resolutions", "32",
                                 "--warmup", "0", "--iters", "3", "--threads", "1", "--output", str(tmp_path / "b.json"),
                                 "--plot", str(plot), "--github-benchmark", str(gb), "--markdown", str(md)])
    assert result.exit_code == 0, result.output
    content = plot.read_bytes()
    assert content.startswith(PNG_MAGIC) if suffix == ".png" else b"<svg" in content
    entries = json.loads(gb.read_text())
    assert [e["name"] for e in entries] == ["poolformer_s12/ours cpu bs1 32px fp32", "poolformer_s12/ours cpu bs2 32px fp32"]
    rows = json.loads((tmp_path / "b.json").read_text())["results"]
    assert [e["value"] for e in entries] == [round(r["throughput"], 3) for r in rows]
    assert all(e["unit"] == "img/s" and e["range"].startswith("± ") for e in entries)
    text = md.read_text()
    assert "| poolformer_s12/ours cpu bs2 32px fp32 | ok |" in text and "Regression check" not in text
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([plot.name, gb.name, md.name, "b.json"])


@pytest.mark.slow
def test_markdown_carries_the_regression_verdict(tmp_path):
    baseline = tmp_path / "base.json"
    args = ["bench", "s12", "--device", "cpu", "--batch-sizes", "1", "--resolutions", "32", "--warmup", "0",
            "--iters", "5", "--threads", "1"]
    assert runner.invoke(app, [*args, "--output", str(baseline)]).exit_code == 0
    document = json.loads(baseline.read_text())
    for row in document["results"]:  # a baseline 10x faster than today
        row["throughput"] *= 10
        row["latency_ms"]["steps"] = [s / 10 for s in row["latency_ms"]["steps"]]
    baseline.write_text(json.dumps(document))
    md = tmp_path / "r.md"
    result = runner.invoke(app, [*args, "--baseline", str(baseline), "--markdown", str(md)])
    assert result.exit_code == 1
    text = md.read_text()
    assert ":x: **1 of 1 configuration(s) regressed**" in text and "**REGRESSED**" in text


def test_failed_rows_chart_as_zero_for_github_benchmark():
    document = {"env": {"device_name": "GPU"}, "results": [bench_row(2), bench_row(4, status="oom")]}
    entries = reports.github_benchmark(document)
    assert entries[1]["value"] == 0 and "status oom" in entries[1]["extra"]
    normalised = dict(bench_row(2), relative_throughput=3.5)
    assert reports.github_benchmark({"env": {}, "results": [normalised]})[1]["unit"] == "img per reference run"


@pytest.mark.parametrize(("command", "option"), [(["bench", "s12"], "--plot"), (["flops", "s12"], "--plot"),
                                                 (["compare", "s12"], "--plot")])
def test_plot_paths_are_checked_before_work(tmp_path, command, option):
    assert_one_line_error(runner.invoke(app, [*command, option, str(tmp_path / "x.jpg")]), "give a .png or .svg")
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert_one_line_error(runner.invoke(app, [*command, option, str(blocker / "x.png")]), "is a file, not a folder")


@pytest.mark.parametrize("option", ["--github-benchmark", "--markdown"])
def test_report_paths_are_checked_before_work(tmp_path, option):
    assert_one_line_error(runner.invoke(app, ["bench", "s12", option, str(tmp_path)]), "is a directory")
