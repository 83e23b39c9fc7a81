"""poolformer.regression and `poolformer bench --baseline`: matching, thresholds, normalised mode, exit codes."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from poolformer.errors import ConfigError
from poolformer.regression import compare, config_key, load_results
from poolformer_cli.app import app

runner = CliRunner()
FAST = ["s12", "--device", "cpu", "--resolutions", "64", "--batch-sizes", "1", "--warmup", "1", "--iters", "3",
        "--threads", "1"]


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def row(throughput, batch_size=1, status="ok", device="cpu", reference_ms=None, **config):
    base = dict(model="poolformer_s12", impl="ours", device=device, batch_size=batch_size, resolution=224,
                precision="fp32", channels_last=False, compile=False)
    base.update(config)
    relative = None if throughput is None or reference_ms is None else throughput * reference_ms / 1000
    return {**base, "status": status, "throughput": throughput, "reference_ms": reference_ms,
            "relative_throughput": relative}


@pytest.mark.parametrize("current, regressed", [(100.0, False), (91.0, False), (89.0, True), (150.0, False)])
def test_threshold(current, regressed):
    report = compare([row(100.0)], [row(current)], max_regression_pct=10)
    (comparison,) = report.comparisons
    assert comparison.change_pct == pytest.approx(current - 100.0)
    assert comparison.regressed is regressed and report.failed is regressed


def test_configurations_match_on_every_field_but_the_device_index():
    baseline = [row(100.0, batch_size=1, device="cuda:0"), row(50.0, batch_size=8, device="cuda:0"),
                row(70.0, batch_size=1, device="cuda:0", precision="bf16")]
    current = [row(100.0, batch_size=8, device="cuda:1"), row(10.0, batch_size=1, device="cuda:1", precision="fp16")]
    report = compare(baseline, current, max_regression_pct=5)
    assert [(c.baseline, c.current) for c in report.comparisons] == [(50.0, 100.0)]
    assert len(report.only_in_current) == 1 and "fp16" in report.only_in_current[0]
    assert len(report.only_in_baseline) == 2
    assert config_key(row(1.0, device="cuda:3")) == config_key(row(2.0, device="cuda"))


def test_a_configuration_that_now_fails_is_a_regression():
    report = compare([row(100.0), row(80.0, batch_size=2)], [row(None, status="oom"), row(80.0, batch_size=2)], 10)
    assert [c.regressed for c in report.comparisons] == [True, False]
    assert report.comparisons[0].note == "status oom"


def test_failed_baseline_rows_are_not_compared():
    with pytest.raises(ConfigError, match="no configuration"):
        compare([row(None, status="oom")], [row(100.0)], 10)


def test_normalised_mode_cancels_a_slower_machine():
    """The whole machine runs at half speed: raw throughput halves, relative throughput does not."""
    baseline = [row(100.0, reference_ms=10.0)]
    half_speed = [row(50.0, reference_ms=20.0)]
    assert compare(baseline, half_speed, 10).failed
    normalised = compare(baseline, half_speed, 10, normalised=True)
    assert not normalised.failed and normalised.metric == "relative_throughput"
    assert normalised.comparisons[0].change_pct == pytest.approx(0.0)
    code_got_slower = [row(40.0, reference_ms=20.0)]  # same half-speed machine, and 20% slower code
    assert compare(baseline, code_got_slower, 10, normalised=True).comparisons[0].change_pct == pytest.approx(-20.0)


def test_normalised_mode_needs_reference_timings_in_the_baseline():
    with pytest.raises(ConfigError, match="no reference-workload timings"):
        compare([row(100.0)], [row(100.0, reference_ms=5.0)], 10, normalised=True)


@pytest.mark.parametrize("pct", [-1, 100, 250])
def test_bad_threshold(pct):
    with pytest.raises(ConfigError, match="--max-regression"):
        compare([row(1.0)], [row(1.0)], pct)


@pytest.mark.parametrize("text, message", [("{not json", "cannot read"), ('{"env": {}}', "no \"results\" list"),
                                           ('{"results": [{"model": "x"}]}', "without the fields")])
def test_load_results_rejects_bad_files(tmp_path, text, message):
    path = tmp_path / "baseline.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_results(path)


# ------------------------------------------------------------------------------------------ the command


def _scaled_baseline(tmp_path, factor: float, normalised: bool) -> str:
    """Measure once, then scale the stored numbers: factor 100 = 'the baseline was 100x faster'."""
    path = tmp_path / "baseline.json"
    args = [*FAST, "--output", str(path)] + (["--normalised"] if normalised else [])
    assert runner.invoke(app, ["bench", *args]).exit_code == 0
    document = json.loads(path.read_text())
    for r in document["results"]:
        r["throughput"] *= factor
        if r.get("relative_throughput") is not None:
            r["relative_throughput"] *= factor
    path.write_text(json.dumps(document))
    return str(path)


@pytest.mark.parametrize("normalised", [False, True])
def test_cli_exit_1_on_regression_and_0_otherwise(tmp_path, normalised):
    flag = ["--normalised"] if normalised else []
    slow = runner.invoke(app, ["bench", *FAST, *flag, "--baseline", _scaled_baseline(tmp_path, 100.0, normalised),
                               "--max-regression", "20"])
    assert slow.exit_code == 1, slow.output
    assert "REGRESSED" in slow.stdout and "regressed by more than 20%" in slow.stdout
    fine = runner.invoke(app, ["bench", *FAST, *flag, "--baseline", _scaled_baseline(tmp_path, 0.01, normalised),
                               "--max-regression", "20"])
    assert fine.exit_code == 0, fine.output
    assert "no regression beyond 20%" in fine.stdout


def test_cli_normalised_against_a_plain_baseline_is_a_usage_error(tmp_path):
    result = runner.invoke(app, ["bench", *FAST, "--normalised", "--baseline", _scaled_baseline(tmp_path, 1, False)])
    assert result.exit_code == 2 and "no reference-workload timings" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_cli_regression_report_goes_to_stderr_with_json(tmp_path):
    result = runner.invoke(app, ["bench", *FAST, "--json", "--baseline", _scaled_baseline(tmp_path, 0.01, False)])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["results"][0]["status"] == "ok"  # stdout stays pure JSON
    assert "no regression" in result.stderr
