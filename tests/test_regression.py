"""poolformer.regression and `poolformer bench --baseline`: matching, thresholds, normalised mode, exit codes."""

from __future__ import annotations

import json
import re

import pytest
import torch
from typer.testing import CliRunner

from poolformer.errors import ConfigError
from poolformer.regression import compare, config_key, load_results, recheck
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
        r["latency_ms"]["steps"] = [step / factor for step in r["latency_ms"]["steps"]]
        if r.get("relative_throughput") is not None:
            r["relative_throughput"] *= factor
    path.write_text(json.dumps(document))
    return str(path)


@pytest.mark.parametrize("normalised", [False, pytest.param(True, marks=pytest.mark.slow)])
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


# ------------------------------------------------------------------------------------------ measuring again


def test_a_configuration_that_passes_when_measured_again_does_not_fail():
    """A transient slowdown fails one measurement: measured again it passes, and the note keeps the first one."""
    baseline = [row(100.0), row(100.0, batch_size=8)]
    current = [row(80.0), row(99.0, batch_size=8)]
    asked = []

    def remeasure(rows):
        asked.append([r["batch_size"] for r in rows])
        return [row(98.0, batch_size=r["batch_size"]) for r in rows]

    report, rows = recheck(compare(baseline, current, 10.0), baseline, current, remeasure, retries=2)
    assert asked == [[1]]  # only the configuration that regressed, once: it passed
    assert not report.failed and rows[0]["throughput"] == 98.0 and rows[1] is current[1]
    first = report.comparisons[0]
    assert "passed when measured again" in first.note and "-20.0%" in first.note
    assert "measured again" not in report.comparisons[1].note


def test_a_configuration_fails_only_when_every_measurement_regressed():
    baseline, current = [row(100.0)], [row(70.0)]
    calls = []

    def remeasure(rows):
        calls.append(len(rows))
        return [row(75.0) for _ in rows]

    report, _ = recheck(compare(baseline, current, 10.0), baseline, current, remeasure, retries=2)
    assert report.failed and calls == [1, 1]
    assert "regressed in all 3 measurements (earlier: -30.0%, -25.0%)" in report.comparisons[0].note
    untouched, _ = recheck(compare(baseline, current, 10.0), baseline, current, remeasure, retries=0)
    assert untouched.failed and calls == [1, 1] and "measurements" not in untouched.comparisons[0].note
    with pytest.raises(ConfigError, match="--retries must be >= 0"):
        recheck(compare(baseline, current, 10.0), baseline, current, remeasure, retries=-1)


@pytest.mark.slow
def test_cli_retries_measure_a_regressed_configuration_again(tmp_path):
    slow = runner.invoke(app, ["bench", *FAST, "--baseline", _scaled_baseline(tmp_path, 100.0, False),
                               "--max-regression", "20", "--retries", "1", "--output", str(tmp_path / "run.json"),
                               "--markdown", str(tmp_path / "run.md")])
    assert slow.exit_code == 1, slow.output
    assert "measuring again: poolformer_s12/ours cpu bs1 64px fp32" in slow.stderr
    # the baseline is this machine's speed x 100: each measurement lost about 99%, whatever the machine did
    assert re.search(r"regressed in all 2 measurements \(earlier: -9\d\.\d%\)", (tmp_path / "run.md").read_text())
    saved = json.loads((tmp_path / "run.json").read_text())["results"]
    assert len(saved) == 1 and saved[0]["status"] == "ok"  # the newest measurement, saved in place of the first
    alone = runner.invoke(app, ["bench", *FAST, "--retries", "1"])
    assert alone.exit_code == 2 and "--retries needs --baseline" in alone.stderr


# ------------------------------------------------------------------------------------------ the step-time test


def stepped(throughput, steps_ms, reference_steps_ms=None, **config):
    """A row with stored per-step latencies (and reference-workload steps in normalised mode)."""
    r = row(throughput, reference_ms=1.0 if reference_steps_ms else None, **config)
    r["latency_ms"] = {"median": sorted(steps_ms)[len(steps_ms) // 2], "steps": steps_ms}
    if reference_steps_ms:
        r["reference_steps_ms"] = reference_steps_ms
        r["relative_throughput"] = throughput / 100.0
    return r


@pytest.mark.parametrize("alternative", ["greater", "less", "two-sided"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mann_whitney_u_equals_scipy(alternative, seed):
    from random import Random

    stats = pytest.importorskip("scipy.stats")
    from poolformer.regression import mann_whitney_u

    rng = Random(seed)
    x = [round(rng.gauss(10.0, 1.0), 1) for _ in range(5 + seed * 7)]  # rounded: ties, as real step times have
    y = [round(rng.gauss(10.4, 1.0), 1) for _ in range(9 + seed * 3)]
    expected = stats.mannwhitneyu(x, y, alternative=alternative, method="asymptotic")
    u, p = mann_whitney_u(x, y, alternative)
    assert u == pytest.approx(float(expected.statistic)) and p == pytest.approx(float(expected.pvalue), rel=1e-9)


def test_a_drop_past_the_threshold_with_overlapping_steps_is_noise_not_a_regression():
    """The medians moved 15% but the step distributions overlap: not significant, no alarm."""
    baseline = stepped(100.0, [10.0, 11.5, 9.0, 12.0, 10.5, 9.5, 11.0, 10.0])
    noisy = stepped(85.0, [11.8, 9.2, 12.1, 10.2, 11.9, 9.4, 11.7, 10.9])
    (c,) = compare([baseline], [noisy], 10).comparisons
    assert c.change_pct < -10 and c.p_value > 0.05 and not c.regressed


def test_a_drop_past_the_threshold_with_separated_steps_regresses():
    baseline = stepped(100.0, [10.0, 10.2, 9.9, 10.1, 10.0, 10.3])
    slower = stepped(80.0, [12.5, 12.4, 12.6, 12.7, 12.5, 12.6])
    (c,) = compare([baseline], [slower], 10).comparisons
    assert c.p_value < 0.01 and c.regressed


def test_a_significant_but_small_change_is_within_the_threshold():
    baseline = stepped(100.0, [10.0, 10.01, 10.02, 10.0, 10.01])
    slightly = stepped(98.0, [10.2, 10.21, 10.22, 10.2, 10.21])
    (c,) = compare([baseline], [slightly], 10).comparisons
    assert c.p_value < 0.05 and not c.regressed


def test_without_steps_or_with_too_few_the_threshold_decides_alone():
    (c,) = compare([row(100.0)], [row(50.0)], 10).comparisons
    assert c.regressed and c.p_value is None and "threshold only" in c.note
    (c,) = compare([stepped(100.0, [10.0, 10.0])], [stepped(50.0, [20.0, 20.0])], 10).comparisons
    assert c.regressed and c.p_value is None and "cannot reach" in c.note


def test_normalised_mode_tests_the_per_step_ratios():
    """Every model step took twice as long, but so did the reference run right after it: not slower."""
    baseline = stepped(100.0, [10.0, 10.1, 9.9, 10.0, 10.2], reference_steps_ms=[5.0, 5.05, 4.95, 5.0, 5.1])
    busy = stepped(80.0, [20.0, 20.2, 19.8, 20.0, 20.4], reference_steps_ms=[10.0, 10.1, 9.9, 10.0, 10.2])
    (c,) = compare([baseline], [busy], 10, normalised=True).comparisons
    assert c.change_pct == pytest.approx(-20.0) and c.p_value > 0.05 and not c.regressed


TELEMETRY = {"available": True, "samples": 20, "sm_clock_mhz_min": 1900, "sm_clock_mhz_median": 1980.0,
             "temperature_c_max": 55, "power_w_mean": 500.0, "throttle_reasons": []}


def test_gpu_state_differences_are_named():
    from poolformer.regression import gpu_differences

    hot = {**TELEMETRY, "sm_clock_mhz_median": 1410.0, "temperature_c_max": 84,
           "throttle_reasons": ["sw_thermal_slowdown"]}
    assert gpu_differences(TELEMETRY, hot) == ["SM clock 1,980 -> 1,410 MHz", "peak temperature 55 -> 84 C",
                                               "throttled now: sw_thermal_slowdown"]
    assert gpu_differences(TELEMETRY, {**TELEMETRY, "sm_clock_mhz_median": 1960.0, "temperature_c_max": 60}) == []
    assert gpu_differences(TELEMETRY, {"available": False, "reason": "no NVML"}) == []
    assert gpu_differences(None, TELEMETRY) == []


def test_the_verdict_says_when_the_gpu_ran_differently(monkeypatch):
    import io

    from rich.console import Console

    from poolformer_cli import bench as bench_cli

    wide = Console(file=io.StringIO(), width=400)
    monkeypatch.setattr(bench_cli, "console", wide)

    baseline = {**stepped(100.0, [10.0, 10.1, 9.9, 10.0, 10.1, 10.0], device="cuda:0"), "telemetry": TELEMETRY}
    throttled = {**stepped(70.0, [14.0, 14.1, 13.9, 14.2, 14.0, 14.1], device="cuda:0"),
                 "telemetry": {**TELEMETRY, "throttle_reasons": ["hw_slowdown"]}}
    report = compare([baseline], [throttled], 10)
    (c,) = report.comparisons
    assert c.regressed and c.gpu_differences == ["throttled now: hw_slowdown"]
    bench_cli._print_regression(report, to_stderr=False)
    shown = wide.file.getvalue()
    assert "throttled now: hw_slowdown" in shown and "may come from the machine, not the code" in shown
