"""`poolformer summary`: totals against timm and torch counters, per-layer rows against real forwards."""

from __future__ import annotations

import csv
import json

import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode
from typer.testing import CliRunner

from poolformer import create_model
from poolformer.summary import summarize, summarize_model
from poolformer.zoo import get_spec
from poolformer_cli.app import app
from tests.conftest import assert_one_line_error

runner = CliRunner()


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _param_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_s24_totals_21_388_968_parameters_like_timm():
    with torch.device("meta"):
        reference = _param_count(timm.create_model("poolformer_s24"))
    assert summarize("s24").total_params == reference == 21_388_968


def test_layer_scale_and_frozen_parameters_are_counted():
    """s12_random: the frozen N x N mixing matrices count as parameters but not as trainable ones."""
    result = summarize("s12_random", resolution=64)
    sides = [16, 8, 4, 2]  # 64 / 4, then halved three times
    frozen = sum(depth * (side * side) ** 2 for depth, side in zip(get_spec("s12").arch.depths, sides))
    assert result.total_params - result.trainable_params == frozen
    block = next(r for r in summarize("s12", resolution=64).layers if r.name == "stages.0.blocks.0")
    c = 64  # norms (weight + bias) x2, fc1 and fc2 with bias, two LayerScales
    assert block.params == 2 * 2 * c + (c * 4 * c + 4 * c) + (4 * c * c + c) + 2 * c


def test_macs_match_torch_flop_counter_and_stages_add_up():
    model = create_model("s12_pppa", img_size=64)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(2, 3, 64, 64))
    result = summarize_model(model, 64, batch_size=2)
    assert 2 * result.total_macs == counter.get_total_flops()
    assert sum(s.macs for s in result.stages) == result.total_macs
    assert sum(s.params for s in result.stages) == result.total_params
    assert [s.stage for s in result.stages] == ["stem", "1", "2", "3", "4", "head"]
    stem = next(r for r in result.layers if r.name == "stem.conv")
    assert stem.macs == 2 * 64 * 3 * 7 * 7 * 16 * 16  # batch 2, [64, 3, 7, 7] kernel on a 16x16 output


def test_output_shapes_and_sizes_match_a_real_forward():
    model = create_model("s12")
    maps = model.forward_stages(torch.zeros(3, 3, 96, 96))
    result = summarize("s12", resolution=96, batch_size=3)
    assert result.input_shape == (3, 3, 96, 96)
    by_name = {r.name: r for r in result.layers}
    for i, feature in enumerate(maps):
        row = by_name[f"stages.{i}"]
        assert row.output_shape == tuple(feature.shape)
        assert row.activation_bytes == feature.numel() * feature.element_size()
    stage_rows = {s.stage: s for s in result.stages}
    assert [stage_rows[str(i + 1)].tokens for i in range(4)] == [m.shape[2] * m.shape[3] for m in maps]
    assert by_name["head"].output_shape == (3, 1000)
    assert result.param_bytes == 4 * result.total_params


def test_depth_controls_which_rows_appear():
    names = lambda depth: [r.name for r in summarize("s12", resolution=64, depth=depth).layers]  # noqa: E731
    assert names(1) == ["stem", "stages.0", "stages.1", "stages.2", "stages.3", "head"]
    assert "stages.2.blocks.5" in names(2) and "stages.2.blocks.5.mlp" not in names(2)
    assert "stages.2.blocks.5.mlp.fc1" in names(4)


def test_summary_leaves_the_model_as_it_was():
    model = create_model("s12_batchnorm").train()
    model.head.eval()
    modes = {n: m.training for n, m in model.named_modules()}
    keys = sorted(model.state_dict())
    summarize_model(model, 64)
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert sorted(model.state_dict()) == keys
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_cli_json_and_csv_agree(tmp_path):
    path = tmp_path / "out" / "s12.csv"
    result = runner.invoke(app, ["summary", "s12", "--resolution", "64", "--json", "--csv", str(path)])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    for key in ("model", "input_shape", "total_params", "trainable_params", "total_macs", "layers"):
        assert key in data
    assert data["model"] == "poolformer_s12" and data["input_shape"] == [1, 3, 64, 64]
    assert data["total_params"] == _param_count(create_model("s12"))
    for layer in data["layers"]:
        assert {"name", "type", "output_shape", "params", "macs"} <= set(layer)
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["name"] for r in rows] == [layer["name"] for layer in data["layers"]]
    assert [int(r["macs"]) for r in rows] == [layer["macs"] for layer in data["layers"]]
    assert not [p for p in path.parent.iterdir() if p.name != "s12.csv"]  # no temporary file left


def test_cli_table_shows_totals_and_stages(monkeypatch):
    from poolformer_cli.common import console

    monkeypatch.setattr(console, "width", 200)
    result = runner.invoke(app, ["summary", "s24"])
    assert result.exit_code == 0, result.output
    assert "21,388,968" in result.output
    for text in ("Per stage", "stages.2.blocks.11", "trainable parameters", "activation memory", "FLOPs"):
        assert text in result.output


def test_a_backbone_at_height_x_width_matches_its_forward_and_ends_with_its_output_norms():
    model = create_model("s12", features_only=True)
    maps = model(torch.zeros(2, 3, 64, 96))
    result = summarize("s12", resolution=(64, 96), batch_size=2, features=True)
    assert result.features and result.input_shape == (2, 3, 64, 96)
    assert result.as_json()["height"] == 64 and result.as_json()["width"] == 96
    assert result.as_json()["resolution"] == "64x96" and result.as_json()["features"] is True
    by_name = {r.name: r for r in result.layers}
    assert "head" not in by_name
    for i, feature in enumerate(maps):
        assert by_name[f"feature_norms.{i}"].output_shape == tuple(feature.shape)
    assert [s.stage for s in result.stages] == ["stem", "1", "2", "3", "4", "norms"]
    assert [s.tokens for s in result.stages[1:5]] == [m.shape[2] * m.shape[3] for m in maps]
    norms = result.stages[-1]
    assert norms.params == sum(p.numel() for p in model.feature_norms.parameters()) == 2 * (64 + 128 + 320 + 512)
    assert sum(s.params for s in result.stages) == result.total_params == _param_count(model)
    assert sum(s.macs for s in result.stages) == result.total_macs


def test_token_count_mixers_are_sized_for_height_x_width():
    """random and spatial-FC mixers take one token count per stage: built for 64 x 96, they mix (16 x 24) tokens in
    stage 1 of the random ablation and (4 x 6) in stage 3 of the spatial-FC hybrid."""
    random = summarize("s12_random", resolution=(64, 96), depth=4)
    matrix = next(r for r in random.layers if r.name == "stages.0.blocks.0.token_mixer")
    assert matrix.output_shape == (1, 64, 16, 24)
    assert random.total_params == _param_count(create_model("s12_random", img_size=(64, 96)))
    assert (16 * 24) ** 2 * 2 < random.total_params - summarize("s12", resolution=(64, 96)).total_params
    hybrid = create_model("s12_ppff", img_size=(64, 96))
    assert hybrid.stages[2].blocks[0].token_mixer.fc.weight.shape == (4 * 6, 4 * 6)
    with torch.no_grad():
        assert hybrid(torch.zeros(1, 3, 64, 96)).shape == (1, 1000)


def test_cli_names_both_sides_and_shows_the_output_norms(monkeypatch):
    from poolformer_cli.common import console

    monkeypatch.setattr(console, "width", 200)
    result = runner.invoke(app, ["summary", "s12", "--features", "--resolution", "64x96", "--depth", "1"])
    assert result.exit_code == 0, result.output
    assert "input 1x3x64x96" in result.output and "backbone (features only)" in result.output
    assert "output norms" in result.output and "feature_norms.3" in result.output and "head" not in result.output
    data = json.loads(runner.invoke(app, ["summary", "s12", "--resolution", "64x96", "--json"]).stdout)
    assert (data["resolution"], data["height"], data["width"], data["features"]) == ("64x96", 64, 96, False)
    assert data["input_shape"] == [1, 3, 64, 96]


@pytest.mark.parametrize("args, message", [
    (["summary", "s13"], "unknown model"),
    (["summary", "s12", "--resolution", "800x"], "HEIGHTxWIDTH"),
    (["summary", "s12", "--resolution", "800*1333"], "HEIGHTxWIDTH"),
    (["summary", "s12", "--resolution", "x512"], "HEIGHTxWIDTH"),
    (["summary", "s12", "--resolution", "0x512"], "at least 32"),
    (["summary", "s12", "--resolution", "512x31"], "at least 32"),
    (["summary", "timm:resnet18", "--features"], "timm peer"),
    (["summary", "s12", "--resolution", "31"], "at least 32"),
    (["summary", "s12", "--resolution", "big"], "--resolution"),
    (["summary", "s12", "--resolution", "224,384"], "one value"),
    (["summary", "s12", "--batch-size", "0"], "--batch-size"),
    (["summary", "s12", "--batch-size", "two"], "--batch-size"),
    (["summary", "s12", "--depth", "0"], "--depth"),
])
def test_cli_bad_input_is_one_line_and_exit_2(args, message):
    assert_one_line_error(runner.invoke(app, args), message)


@pytest.mark.parametrize(("name", "resolution", "batch"), [("s12", 64, 2), ("s12_ppaa", 64, 1), ("s12_random", 96, 1),
                                                           ("v2_s12", 97, 1), ("s12_batchnorm", 64, 1),
                                                           ("s12_ppff", (64, 96), 1)])
def test_cpu_trace_equals_meta_trace(name, resolution, batch):
    """summary traces small models on the CPU (zero weights) to skip the meta device's torch._dynamo import; the
    result must be exactly the meta trace's."""
    on_cpu = summarize(name, resolution=resolution, batch_size=batch, depth=4, device="cpu").as_json()
    on_meta = summarize(name, resolution=resolution, batch_size=batch, depth=4, device="meta").as_json()
    cpu_training, meta_training = on_cpu.pop("training"), on_meta.pop("training")
    assert on_cpu == on_meta
    if name != "s12_batchnorm":
        assert cpu_training == meta_training
    else:  # eval-mode batch_norm on the meta device saves a little more for backward than the CPU kernel does
        assert 1 <= meta_training["activations_bytes"] / cpu_training["activations_bytes"] < 1.03
    features = [summarize(name, resolution=resolution, batch_size=batch, depth=4, device=device, features=True)
                for device in ("cpu", "meta")] if name == "s12" else []
    assert all(f.as_json() == features[0].as_json() for f in features)


def test_trace_device_keeps_big_work_on_the_meta_device():
    from poolformer.summary import CPU_TRACE_MAX_MACS, trace_device
    from poolformer.zoo import get_spec

    assert trace_device(get_spec("s24"), 224, 1) == "cpu"
    assert trace_device(get_spec("m48"), 224, 64) == "meta"
    # attention's cost grows with the square of the token count: 4x the resolution is 256x the estimate
    spec = get_spec("s12_ppaa")
    assert spec.published.macs * 4**4 > CPU_TRACE_MAX_MACS
    assert trace_device(spec, 896, 1) == "meta"


@pytest.mark.subprocess
@pytest.mark.slow
def test_summary_leaves_no_dynamo_import_behind():
    """The analytic counter opts out of dynamo.disable; the first call would otherwise import torch._dynamo."""
    import subprocess
    import sys

    code = "import sys; from poolformer.summary import summarize; summarize('s12'); print('torch._dynamo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
