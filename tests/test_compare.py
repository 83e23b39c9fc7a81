"""`poolformer compare`: published top-1 against counted cost and measured speed, and the Pareto fronts."""

from __future__ import annotations

import csv
import json

import pytest
from typer.testing import CliRunner

from poolformer.bench import BenchSettings
from poolformer.compare import compare_models, pareto_front
from poolformer_cli.app import app

from .conftest import assert_one_line_error

runner = CliRunner()


def test_pareto_front_keeps_exactly_the_undominated_points():
    points = [("cheap", 1.0, 70.0), ("better", 2.0, 75.0), ("worse_and_dearer", 3.0, 74.0), ("tie", 2.0, 75.0),
              ("dominated", 2.5, 72.0), ("best", 4.0, 80.0)]
    assert pareto_front(points) == ["cheap", "better", "tie", "best"]
    # throughput: larger is better, so the fastest comes first
    speeds = [("fast", 300.0, 70.0), ("slow_accurate", 50.0, 80.0), ("slow_and_worse", 40.0, 75.0)]
    assert pareto_front(speeds, larger_cost_is_better=True) == ["fast", "slow_accurate"]
    assert pareto_front([("alone", 1.0, 1.0)]) == ["alone"]


@pytest.mark.slow
def test_compare_counts_costs_on_the_models_and_measures_speed():
    result = compare_models(["s12", "v2_s12", "timm:resnet10t", "s12_dwconv"], resolution=32, batch_size=1,
                            settings=BenchSettings(warmup=0, iters=2))
    rows = {r.model: r for r in result.rows}
    assert rows["poolformer_s12"].params == 11_915_176 and rows["poolformer_s12"].top1 == 77.2
    assert rows["poolformer_s12"].published_macs == 1_822_580_736 and rows["timm:resnet10t"].published_macs is None
    assert rows["timm:resnet10t"].top1 == pytest.approx(68.358) and "resnet10t.c3_in1k" in rows["timm:resnet10t"].top1_source
    assert rows["timm:resnet10t"].family == "peer"
    assert all(r.status == "ok" and r.throughput > 0 for r in result.rows)
    # s12 and v2_s12 have the same MACs; v2 is more accurate, so s12 is off the MACs front
    assert rows["poolformer_s12"].macs == rows["poolformerv2_s12"].macs
    assert "poolformer_s12" not in result.fronts["macs"] and "poolformerv2_s12" in result.fronts["macs"]
    for axis in ("macs", "params", "throughput"):
        attribute = axis
        points = [(r.model, getattr(r, attribute), r.top1) for r in result.rows]
        assert result.fronts[axis] == pareto_front(points, larger_cost_is_better=axis == "throughput")


def test_models_without_a_published_top1_are_listed_but_not_ranked():
    result = compare_models(["s12", "timm:resnet14t"], resolution=32, device=None)
    rows = {r.model: r for r in result.rows}
    assert rows["timm:resnet14t"].top1 is None and rows["timm:resnet14t"].status == "not measured"
    assert result.fronts == {"macs": ["poolformer_s12"], "params": ["poolformer_s12"]}


@pytest.mark.slow
def test_compare_cli_json_csv_and_plot(tmp_path):
    csv_path, plot = tmp_path / "c.csv", tmp_path / "c.svg"
    result = runner.invoke(app, ["compare", "s12", "timm:resnet10t", "--device", "cpu", "--resolution", "32",
                                 "--batch-size", "1", "--iters", "1", "--warmup", "0", "--json", "--csv", str(csv_path),
                                 "--plot", str(plot)])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert [r["model"] for r in document["rows"]] == ["poolformer_s12", "timm:resnet10t"]
    assert set(document["fronts"]) == {"macs", "params", "throughput"}
    rows = list(csv.DictReader(csv_path.open()))
    assert [r["model"] for r in rows] == ["poolformer_s12", "timm:resnet10t"]
    assert [int(r["pareto_macs"]) for r in rows] == [int(m in document["fronts"]["macs"]) for m in
                                                     ("poolformer_s12", "timm:resnet10t")]
    assert plot.read_text().lstrip().startswith("<?xml") and "<svg" in plot.read_text()


def test_compare_table_without_measuring():
    result = runner.invoke(app, ["compare", "s12", "v2_s12", "--no-measure", "--resolution", "32"])
    assert result.exit_code == 0, result.output
    assert "poolformerv2_s12" in result.stdout and "not measured" in result.stdout


@pytest.mark.slow
def test_compare_at_height_x_width_names_both_sides(monkeypatch):
    from poolformer_cli.common import console

    monkeypatch.setattr(console, "width", 200)
    args = ["compare", "s12", "timm:resnet10t", "--device", "cpu", "--resolution", "64x96", "--batch-size", "1",
            "--iters", "1", "--warmup", "0"]
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert (document["resolution"], document["height"], document["width"]) == ("64x96", 64, 96)
    rows = {r["model"]: r for r in document["rows"]}
    square = compare_models(["s12"], resolution=64, device=None).rows[0]
    assert rows["poolformer_s12"]["macs"] > square.macs  # 64x96 has 1.5x the pixels of 64x64
    assert all(r["status"] == "ok" for r in document["rows"])
    table = runner.invoke(app, args)
    assert table.exit_code == 0 and "accuracy vs cost at 64x96 px" in table.stdout


@pytest.mark.parametrize(("args", "message"), [
    (["s12", "--resolution", "64x"], "HEIGHTxWIDTH"),
    (["s12", "--resolution", "64x96,64"], "one value"),
    (["s12", "--resolution", "16x96"], "at least 32"),
    (["s12", "--plot", "out.pdf"], "give a .png or .svg file name"),
    (["s12", "--precision", "int8"], "unknown precision 'int8'"),
    (["s12", "--impl", "onnx"], "unknown implementation 'onnx'"),
    (["s12", "--batch-size", "0"], "--batch-size must be >= 1"),
])
def test_compare_bad_input_is_one_line(args, message):
    assert_one_line_error(runner.invoke(app, ["compare", *args]), message)
