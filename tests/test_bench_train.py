"""`bench --mode train`: train rows in the engine and the command, their gradient parity, the regression gate's
keys, the largest batch that trains, and DistributedDataParallel under torchrun.

s12 at batch 2, 64x64 and a few steps; nothing here asserts a wall-clock value.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from torch import nn
from typer.testing import CliRunner

from poolformer import bench
from poolformer.errors import ConfigError
from poolformer.implementations import IMPLEMENTATIONS, Implementation
from poolformer.regression import compare, config_label
from poolformer_cli.app import app
from tests.conftest import assert_one_line_error

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]
QUICK = bench.BenchSettings(warmup=1, iters=2)
TINY = ["--device", "cpu", "--resolutions", "64", "--batch-sizes", "2", "--warmup", "1", "--iters", "2",
        "--threads", "1"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _train_rows(models, impls, **options):
    configs = bench.expand_configs(models, impls, "cpu", [2], [64], options.pop("precisions", ["fp32"]), False,
                                   False, modes=["train"], **options)
    return list(bench.run_benchmark(configs, QUICK))


@pytest.mark.slow
def test_train_rows_match_the_other_implementation_in_loss_and_gradients():
    rows = _train_rows(["poolformer_s12", "poolformerv2_s12"], ["ours", "timm"])
    assert [(r.config.model, r.config.impl) for r in rows] == [
        ("poolformer_s12", "ours"), ("poolformer_s12", "timm"), ("poolformerv2_s12", "ours"),
        ("poolformerv2_s12", "timm")]
    for row in rows:
        assert row.status == "ok", row.error
        assert row.throughput > 0 and row.latency_ms.median > 0 and row.peak_memory_bytes > 0
        parity = row.grad_parity
        assert parity.ok and parity.reference == ("timm" if row.config.impl == "ours" else "ours")
        assert parity.grad_relative_diff < 1e-4 and parity.loss_relative_diff < 1e-5
        json_row = row.to_row()
        assert json_row["mode"] == "train" and json_row["optimizer"] == "sgd" and json_row["world_size"] == 1
        assert json_row["grad_parity"]["ok"] and json_row["scaling_efficiency"] is None


@pytest.mark.slow
def test_checkpointed_rows_sit_beside_the_plain_ones_and_bf16_trains_within_tolerance():
    rows = _train_rows(["poolformer_s12"], ["ours"], grad_checkpointing=(False, True), precisions=["bf16"], optimizer="adamw")
    assert [r.config.grad_checkpointing for r in rows] == [False, True]
    assert all(r.status == "ok" and r.grad_parity.ok for r in rows), [(r.error, r.grad_parity) for r in rows]
    assert all(r.config.optimizer == "adamw" and r.config.precision == "bf16" for r in rows)
    assert " train(adamw) ckpt" in config_label(rows[1].to_row())


class _Scaled(Implementation):
    """Our model with its logits scaled by 1.5: it trains, but its loss and gradients are not the model's."""

    def convert(self, model):
        class Scaled(nn.Module):
            def __init__(self, inner):
                super().__init__()
                self.inner, self.num_classes = inner, inner.num_classes

            def forward(self, x):
                return 1.5 * self.inner(x)

            def state_dict(self, *args, **kwargs):  # the reference loads these weights: the inner model's
                return self.inner.state_dict(*args, **kwargs)

        return Scaled(model)


def test_wrong_gradients_make_a_mismatch_not_a_speed_result(monkeypatch):
    monkeypatch.setitem(IMPLEMENTATIONS, "scaled", _Scaled())
    row = _train_rows(["poolformer_s12"], ["scaled"])[0]
    assert row.status == "mismatch"
    assert row.grad_parity.reference == "ours" and not row.grad_parity.ok
    assert row.grad_parity.loss_relative_diff > 1e-3


def test_peers_train_without_a_reference_and_say_why():
    row = _train_rows(["timm:resnet18"], ["ours"])[0]
    assert row.status == "ok" and row.grad_parity is None
    assert row.parity_note == "not checked: a timm peer has no independent model"


@pytest.mark.slow
def test_train_rows_take_height_x_width_and_refuse_a_backbone():
    """A train row at 64x96 trains on [1, 3, 64, 96] images (its gradients checked as at a square); a features-only
    row cannot train: the step's loss is cross-entropy on logits, and a backbone has none."""
    configs = bench.expand_configs(["poolformer_s12"], ["ours"], "cpu", [1], ["64x96"], ["fp32"], False, False,
                                   modes=["train"])
    (row,) = bench.run_benchmark(configs, QUICK)
    assert row.status == "ok" and row.grad_parity.ok, (row.error, row.grad_parity)
    json_row = row.to_row()
    assert (json_row["resolution"], json_row["height"], json_row["width"]) == ("64x96", 64, 96)
    assert config_label(json_row) == "poolformer_s12/ours cpu bs1 64x96px fp32 train(sgd)"
    with pytest.raises(ConfigError, match="--features times inference only"):
        bench.check_config(replace(configs[0], features=True))


def test_the_largest_batch_that_trains():
    config = bench.BenchConfig("poolformer_s12", resolution=64, mode="train", optimizer="sgd")
    found = bench.search_max_batch(config, limit=4)
    assert found.batch_size == 4 and found.limited_by == "the limit (4)"


def test_an_inference_baseline_never_judges_a_train_row():
    inference = _row("inference", 100.0)
    train = _row("train", 10.0)
    with pytest.raises(ConfigError, match="no configuration of this run was measured in the baseline"):
        compare([inference], [train], 10.0)
    mixed = compare([inference], [train, _row("inference", 100.0)], 10.0)
    assert len(mixed.comparisons) == 1 and mixed.only_in_current == [config_label(train)]
    slower = compare([train], [_row("train", 5.0)], 10.0)
    assert slower.failed and slower.comparisons[0].label.endswith("train(sgd)")


def _row(mode: str, throughput: float) -> dict:
    config = bench.BenchConfig("poolformer_s12", resolution=64, mode=mode, optimizer="sgd" if mode == "train" else None)
    return bench.BenchResult(config=config, status="ok", throughput=throughput).to_row()


def test_old_baselines_without_mode_fields_still_match_inference_rows():
    row = _row("inference", 100.0)
    old = {k: v for k, v in row.items() if k not in ("mode", "optimizer", "grad_checkpointing", "cast")}
    report = compare([old], [row], 10.0)
    assert len(report.comparisons) == 1 and not report.failed


def test_the_command_prints_train_rows_with_their_gradient_parity(tmp_path):
    out = tmp_path / "train.json"
    markdown = tmp_path / "train.md"
    result = runner.invoke(app, ["bench", "s12", "--mode", "inference,train", "--impl", "ours", *TINY,
                                 "--output", str(out), "--markdown", str(markdown)])
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())["results"]
    assert [r["mode"] for r in rows] == ["inference", "train"]
    assert "∇ " in result.stdout and "train(sgd)" in result.stdout
    assert "train(sgd)" in markdown.read_text()


@pytest.mark.parametrize("args, message", [
    (["--mode", "training"], "unknown mode 'training' for --mode; choose from: inference, train"),
    (["--mode", "train", "--optimizer", "lamb"], "unknown optimizer 'lamb' for --optimizer"),
    (["--grad-checkpointing"], "apply to train rows; add --mode train"),
    (["--mode", "train", "--impl", "fast"], "--impl fast is inference-only"),
    (["--mode", "train", "--impl", "onnxruntime", "--grad-checkpointing"], "--impl onnxruntime is inference-only"),
    (["--mode", "train", "--precision", "bf16", "--cast-model"], "--cast-model is for inference rows"),
    (["--mode", "train", "--features"], "--features times inference only"),
])
def test_bad_train_options_are_one_line(args, message):
    assert_one_line_error(runner.invoke(app, ["bench", "s12", *TINY, *args]), message)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(tmp_path, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
               str(_free_port()),
               "-m", "poolformer_cli", "bench", "s12", *TINY, *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)


@pytest.mark.slow
@pytest.mark.subprocess
def test_torchrun_trains_in_ddp_and_reports_the_scaling_efficiency(tmp_path):
    out = tmp_path / "ddp.json"
    result = _torchrun(tmp_path, "--mode", "train", "--output", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    document = json.loads(out.read_text())
    row = document["results"][0]
    assert document["env"]["world_size"] == 2 and row["world_size"] == 2 and row["status"] == "ok"
    assert row["single_process_throughput"] > 0
    assert row["scaling_efficiency"] == pytest.approx(row["throughput"] / (2 * row["single_process_throughput"]))
    assert row["grad_parity"]["ok"]
    assert result.stdout.count("poolformer bench on cpu") == 1  # rank 0 prints, rank 1 only trains
    assert "2 processes" in result.stdout and "scaling efficiency" in result.stdout


@pytest.mark.slow
@pytest.mark.subprocess
def test_torchrun_refuses_inference_rows(tmp_path):
    result = _torchrun(tmp_path, "--mode", "inference")
    assert result.returncode != 0
    assert "error: under torchrun bench measures train rows" in result.stderr
    assert str(ROOT / "poolformer") not in result.stderr  # torchrun reports the exit; no frame of ours


def test_single_process_rows_keep_their_batch(tmp_path):
    row = _train_rows(["poolformer_s12"], ["ours"])[0]
    assert row.throughput == pytest.approx(2 * 1000.0 / row.latency_ms.median)
    assert replace(row.config, mode="inference", optimizer=None) != row.config


def test_plot_and_github_benchmark_keep_train_rows_apart_from_inference_rows():
    """A train row and an inference row of the same model, impl and batch are separate series in the picture and
    separate entries for github-action-benchmark (their names say train(sgd) / ckpt)."""
    from poolformer.plots import bench_figure
    from poolformer_cli.reports import github_benchmark

    rows = []
    for mode, ckpt, speed in (("inference", False, 100.0), ("train", False, 30.0), ("train", True, 20.0)):
        for batch in (1, 2):
            config = bench.BenchConfig("poolformer_s12", batch_size=batch, resolution=64, mode=mode,
                                       optimizer="sgd" if mode == "train" else None, grad_checkpointing=ckpt)
            stats = bench.LatencyStats.from_steps([1000.0 * batch / speed] * 3)
            rows.append(bench.BenchResult(config=config, status="ok", throughput=speed, latency_ms=stats).to_row())
    figure = bench_figure(rows)
    labels = [line.get_label() for line in figure.axes[0].get_lines()]
    assert labels == ["poolformer_s12/ours fp32", "poolformer_s12/ours fp32 train(sgd)",
                      "poolformer_s12/ours fp32 train(sgd) ckpt"]
    names = [entry["name"] for entry in github_benchmark({"env": {}, "results": rows})]
    assert len(names) == len(set(names)) == 6
    assert sum("train(sgd) ckpt" in n for n in names) == 2 and sum("train" not in n for n in names) == 2
