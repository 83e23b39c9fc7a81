"""poolformer.bench and profiling at any height x width and on features-only backbones (the dense tasks' settings):
the input each row runs, how rows name sizes, parity map by map, and old square baselines still matching.

Small shapes only (s12, 64x96, batch 1-2, a few steps); nothing asserts a wall-clock value.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from poolformer import Size, bench
from poolformer.implementations import IMPLEMENTATIONS, Implementation
from poolformer.regression import compare, config_key, config_label, load_results
from poolformer_cli.app import app

runner = CliRunner()
FAST = ["--device", "cpu", "--warmup", "0", "--iters", "2", "--threads", "1"]
QUICK = bench.BenchSettings(warmup=0, iters=2)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


class _Seen(Implementation):
    """Ours, wrapped so every forward notes its input's shape (and, with `bump`, shifts one output map)."""

    def __init__(self, seen: list, bump: int | None = None):
        self.seen, self.bump = seen, bump

    def convert(self, model):
        seen, bump = self.seen, self.bump

        class Wrapped(nn.Module):
            def __init__(self):
                super().__init__()
                self.model = model

            def forward(self, x):
                seen.append(tuple(x.shape))
                out = self.model(x)
                if bump is not None:
                    out = [m + 0.5 if i == bump else m for i, m in enumerate(out)]
                return out

        return Wrapped()


def test_a_row_runs_height_x_width_and_names_both_sides(monkeypatch):
    seen = []
    monkeypatch.setitem(IMPLEMENTATIONS, "seen", _Seen(seen))
    config = bench.BenchConfig("poolformer_s12", "seen", "cpu", batch_size=2, resolution=Size(64, 96))
    result = bench.run_config(config, QUICK)
    assert result.status == "ok", result.error
    assert set(seen) == {(2, 3, 64, 96)}
    row = result.to_row()
    assert (row["resolution"], row["height"], row["width"], row["features"]) == ("64x96", 64, 96, False)
    assert config_label(row) == "poolformer_s12/seen cpu bs2 64x96px fp32"
    assert json.loads(json.dumps(row))["height"] == 64  # plain JSON, no Size objects left


def test_ints_stay_squares_and_old_keys_read_the_same():
    config = bench.BenchConfig("poolformer_s12", resolution=64)
    assert config.resolution == Size(64, 64) and config.as_json()["resolution"] == 64
    assert bench.expand_configs(["poolformer_s12"], ["ours"], "cpu", [1], [64, (64, 96)], ["fp32"], False,
                                False)[1].resolution == Size(64, 96)


@pytest.mark.slow
def test_features_rows_time_the_backbone_and_check_every_map(monkeypatch):
    seen = []
    monkeypatch.setitem(IMPLEMENTATIONS, "seen", _Seen(seen))
    configs = bench.expand_configs(["poolformer_s12"], ["seen"], "cpu", [2], [(64, 96)], ["fp32", "bf16"], False,
                                   False, features=True)
    fp32, bf16 = list(bench.run_benchmark(configs, QUICK))
    assert fp32.status == bf16.status == "ok", (fp32.error, bf16.error)
    for result in (fp32, bf16):
        parity = result.parity
        assert parity.reference == "ours" and parity.top1_agreement is None and parity.ok
        assert len(parity.map_relative_diffs) == 4 and parity.relative_diff == max(parity.map_relative_diffs)
    assert max(bf16.parity.map_relative_diffs) > 0 and bf16.to_row()["features"] is True


def test_a_backbone_off_in_one_map_is_a_mismatch_naming_that_map(monkeypatch):
    monkeypatch.setitem(IMPLEMENTATIONS, "off", _Seen([], bump=2))
    config = bench.BenchConfig("poolformer_s12", "off", "cpu", 1, Size(64, 96), features=True)
    result = bench.run_config(config, QUICK)
    assert result.status == "mismatch"
    diffs = result.parity.map_relative_diffs
    assert diffs[2] > result.parity.tolerance and diffs[0] == diffs[1] == diffs[3] == 0.0


def test_timm_backbone_is_a_peer_without_output_norms_checked_against_itself():
    config = bench.BenchConfig("poolformer_s12", "timm", "cpu", 1, Size(64, 96), features=True)
    result = bench.run_config(config, QUICK)
    assert result.status == "ok", result.error
    assert result.parity.reference == "timm" and result.parity.ok and len(result.parity.map_relative_diffs) == 4
    assert "no output norms" in result.impl_note and result.to_row()["impl_note"] == result.impl_note
    ours = bench.prepare_model(bench.BenchConfig("poolformer_s12", "ours", "cpu", 1, Size(64, 96), features=True))
    twin = bench.prepare_model(config)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():  # same seeded weights: timm's maps are ours before the output norms
        for a, b in zip(ours.forward_stages(x), twin(x), strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_the_cli_names_sizes_in_the_table_json_and_csv(tmp_path):
    csv_path = tmp_path / "rows.csv"
    result = runner.invoke(app, ["bench", "s12", *FAST, "--features", "--resolutions", "64x96,64", "--batch-sizes",
                                 "1", "--impl", "ours,timm", "--json", "--csv", str(csv_path)])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["results"]
    assert [(r["impl"], r["resolution"], r["height"], r["width"], r["features"]) for r in rows] == [
        ("ours", "64x96", 64, 96, True), ("ours", 64, 64, 64, True),
        ("timm", "64x96", 64, 96, True), ("timm", 64, 64, 64, True)]
    assert all(r["status"] == "ok" and r["parity"]["ok"] for r in rows)
    first = next(csv.DictReader(io.StringIO(csv_path.read_text())))
    assert (first["resolution"], first["height"], first["width"], first["features"]) == ("64x96", "64", "96", "True")
    table = runner.invoke(app, ["bench", "s12", *FAST, "--features", "--resolutions", "64x96", "--batch-sizes", "1",
                                "--impl", "timm"])
    assert table.exit_code == 0, table.output
    assert "64x96px" in table.stdout and "features" in table.stdout and "no output norms" in table.stdout


def test_a_square_row_still_matches_the_committed_old_baseline():
    """benchmarks/results/ci_baseline_cpu.json predates height/width and --features: its rows must match the rows
    bench writes now for the same configurations, and the regression gate must compare them."""
    committed = load_results(Path(__file__).resolve().parents[1] / "benchmarks/results/ci_baseline_cpu.json")
    old = [row for row in committed["results"] if row["status"] == "ok"]
    assert old and all("height" not in row and "features" not in row for row in old)
    fresh = []
    for row in old:
        config = bench.BenchConfig(row["model"], row["impl"], row["device"], row["batch_size"], row["resolution"],
                                   row["precision"], row["channels_last"], row["compile"])
        result = bench.BenchResult(config=config, status="ok", throughput=row["throughput"],
                                   latency_ms=bench.LatencyStats(1.0, 1.0, 0.0, 1.0, 1.0))
        new = result.to_row()
        assert new["resolution"] == row["resolution"] and isinstance(new["resolution"], int)
        assert config_key(new) == config_key(row) and config_label(new) == config_label(row)
        fresh.append(new)
    report = compare(old, fresh, max_regression_pct=10.0)
    assert len(report.comparisons) == len(old) and not report.only_in_current and not report.failed


def test_sizes_and_features_keep_rows_apart_in_the_regression_gate():
    row = {"model": "poolformer_s12", "impl": "ours", "device": "cpu", "batch_size": 2, "resolution": 512,
           "precision": "fp32", "channels_last": False, "compile": False}
    assert config_key(row) == config_key({**row, "height": 512, "width": 512, "features": False})
    assert config_key(row) != config_key({**row, "features": True})
    wide = {**row, "resolution": "512x640", "height": 512, "width": 640}
    assert config_key(wide) != config_key(row) and config_key(wide) == config_key({**row, "resolution": "512x640"})
    assert config_label({**wide, "features": True}) == "poolformer_s12/ours cpu bs2 512x640px fp32 features"


def test_profile_a_backbone_at_height_x_width():
    from poolformer.profiling import profile_model

    config = bench.BenchConfig("s12", batch_size=1, resolution=Size(64, 96), features=True)
    report = profile_model(config, warmup=0, steps=1)
    names = {op.name: op for op in report.operators}
    assert names["aten::native_group_norm"].calls == 24 + 4  # two per block and the four output norms, no head
    result = runner.invoke(app, ["profile", "s12", "--device", "cpu", "--features", "--resolution", "64x96",
                                 "--batch-size", "1", "--warmup", "0", "--steps", "1", "--json"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert {k: document["config"][k] for k in ("resolution", "height", "width", "features")} == {
        "resolution": "64x96", "height": 64, "width": 96, "features": True}


@pytest.mark.parametrize("args, message", [
    (["--resolutions", "800x16"], "every side must be at least 32"),
    (["--resolutions", "800x"], "HEIGHTxWIDTH"),
    (["--resolutions", "800*1333"], "HEIGHTxWIDTH"),
    (["--resolutions", "x512"], "HEIGHTxWIDTH"),
    (["--resolutions", "0x512"], "every side must be at least 32"),
    (["--resolutions", "64,"], "HEIGHTxWIDTH"),
    (["timm:resnet18", "--features"], "is a timm peer"),
    (["--features", "--impl", "onnxruntime"], "--features runs with --impl ours, timm, fast"),
])
def test_bench_bad_sizes_and_features_are_one_line(args, message):
    result = runner.invoke(app, ["bench", "s12", *FAST, *args])
    assert result.exit_code == 2, result.output
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("args, message", [
    (["profile", "s12", "--resolution", "64x"], "HEIGHTxWIDTH"),
    (["profile", "s12", "--resolution", "64,96"], "one value"),
    (["profile", "s12", "--resolution", "64x16"], "at least 32"),
    (["profile", "timm:resnet18", "--features"], "timm peer"),
    (["profile", "s12", "--features", "--impl", "openvino"], "--features runs with --impl"),
])
def test_profile_bad_sizes_are_one_line(args, message):
    result = runner.invoke(app, [*args, "--device", "cpu"])
    assert result.exit_code == 2, result.output
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
