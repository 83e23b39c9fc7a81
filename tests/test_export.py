"""`poolformer export` and poolformer.export: portable and folded forms, parity against ONNX Runtime and OpenVINO,
files written only when they match."""

from __future__ import annotations

import json
import re

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from poolformer import CheckpointError, ConfigError, Size, create_model
from poolformer import export as exporting
from poolformer.export import export_model
from poolformer.fast.folded_export import FoldedExport
from poolformer.model import randomize_
from poolformer.runtimes.export_forms import mean_pool, portable_form
from poolformer.runtimes.exporting import export_onnx
from poolformer_cli.app import app

from .conftest import assert_one_line_error, marked_slow

runner = CliRunner()


@pytest.fixture(scope="module")
def s12():
    return randomize_(create_model("s12"), seed=7)


def _photographs(size: int) -> torch.Tensor:
    """scikit-image's astronaut, coffee and chelsea, ImageNet-normalised: [3, 3, size, size]."""
    data = pytest.importorskip("skimage.data")
    pixels = [torch.from_numpy(getattr(data, n)()).permute(2, 0, 1).float()[None] / 255
              for n in ("astronaut", "coffee", "chelsea")]
    x = torch.cat([F.interpolate(p, size=(size, size), mode="bilinear", antialias=True) for p in pixels])
    return (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


@pytest.mark.parametrize("pool_size", [3, 5])
@pytest.mark.parametrize(("height", "width"), [(7, 6), (13, 17), (2, 9)])
def test_conv_pooling_is_avg_pool_without_padding(pool_size, height, width):
    x = torch.randn(2, 5, height, width)
    expected = F.avg_pool2d(x, pool_size, 1, pool_size // 2, count_include_pad=False)
    torch.testing.assert_close(mean_pool(x, pool_size), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", marked_slow(["s12", "v2_s12", "s12_pool5", "s12_relu"],
                                              "v2_s12", "s12_pool5", "s12_relu"))
def test_portable_and_folded_forms_give_the_models_logits(name):
    model = randomize_(create_model(name), seed=3)
    x = torch.randn(2, 3, 97, 75)
    with torch.no_grad():
        expected = model(x)
        scale = max(1.0, expected.abs().max().item())
        assert (portable_form(model)(x) - expected).abs().max().item() < 1e-5 * scale
        assert (FoldedExport(model)(x) - expected).abs().max().item() < 1e-5 * scale


@pytest.mark.slow
def test_exported_graph_avoids_the_operators_runtimes_get_wrong(tmp_path, s12):
    """No GroupNormalization / InstanceNormalization (TensorRT's one-group trap) and no AveragePool
    (count_include_pad traps): plain reductions, element-wise ops and convolutions."""
    for name, module in (("portable", portable_form(s12)), ("folded", FoldedExport(s12))):
        path = tmp_path / f"{name}.onnx"
        export_onnx(module, path, (1, 3, 64, 64))
        ops = {node.op_type for node in onnx.load(path).graph.node}
        assert not ops & {"GroupNormalization", "InstanceNormalization", "AveragePool", "LayerNormalization"}, ops
        assert {"Conv", "ReduceMean"} <= ops


@pytest.mark.parametrize("fast", [pytest.param(False, marks=pytest.mark.slow), True])
def test_export_passes_on_both_runtimes_and_writes_the_file(tmp_path, s12, fast):
    path = tmp_path / "out" / "s12.onnx"
    report = export_model(s12, path, resolution=64, dynamic_batch=True, fast=fast, images=_photographs(64))
    assert report.passed and report.written and path.stat().st_size == report.size_bytes
    assert {(c.runtime, c.inputs) for c in report.checks} == {
        (r, i) for r in ("onnxruntime", "openvino") for i in ("random", "images")}
    assert all(c.max_abs_diff < 1e-4 * max(1.0, c.max_abs_logit) and c.top1_agreement == 1.0 for c in report.checks)
    assert [p.name for p in path.parent.iterdir()] == ["s12.onnx"]  # no temporary left


@pytest.mark.slow
def test_a_file_that_does_not_match_is_not_written(tmp_path, s12, monkeypatch):
    real = exporting._run_file
    monkeypatch.setattr(exporting, "_run_file", lambda *a: real(*a) + np.float32(0.01))  # a runtime off by 0.01
    path = tmp_path / "s12.onnx"
    path.write_text("the previous file")
    report = export_model(s12, path, resolution=64)
    assert not report.passed and not report.written and "max |diff|" in report.reason
    assert path.read_text() == "the previous file" and [p.name for p in tmp_path.iterdir()] == ["s12.onnx"]


@pytest.mark.slow
def test_pt2_export_round_trips_through_torch_export(tmp_path, s12):
    path = tmp_path / "s12.pt2"
    report = export_model(s12, path, fmt="pt2", resolution=64, dynamic_batch=True)
    assert report.passed and report.written and [c.runtime for c in report.checks] == ["torch"]
    program = torch.export.load(str(path))
    x = torch.randn(5, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), s12(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fast", [pytest.param(False, marks=pytest.mark.slow), True])
def test_openvino_ir_export_writes_the_xml_and_its_weights_and_runs_at_any_batch(tmp_path, s12, fast):
    """IR is the graph `--impl fast` runs on a CPU (fast: built from OpenVINO's operators, one MVN per norm) or
    OpenVINO's own conversion; written only after OpenVINO ran it, the weights beside it in float32."""
    pytest.importorskip("openvino")
    from poolformer.runtimes.sessions import RuntimeModule

    path = tmp_path / "out" / "s12.xml"
    report = export_model(s12, path, fmt="openvino", resolution=64, dynamic_batch=True, fast=fast,
                          images=_photographs(64))
    assert report.passed and report.written and report.opset is None
    assert {(c.runtime, c.inputs) for c in report.checks} == {("openvino", "random"), ("openvino", "images")}
    assert sorted(p.name for p in path.parent.iterdir()) == ["s12.bin", "s12.xml"]  # no temporaries left
    assert report.size_bytes == path.stat().st_size + path.with_suffix(".bin").stat().st_size
    assert path.with_suffix(".bin").stat().st_size > 4 * 11_000_000  # s12's ~11.9M parameters, not fp16
    module = RuntimeModule.from_file("openvino", path)
    for batch in (1, 3):
        x = torch.randn(batch, 3, 64, 64)
        with torch.no_grad():
            expected = s12(x)
        assert (module(x) - expected).abs().max().item() < 1e-4 * max(1.0, expected.abs().max().item())


@pytest.mark.slow
def test_an_openvino_ir_that_does_not_match_leaves_the_old_files(tmp_path, s12, monkeypatch):
    pytest.importorskip("openvino")
    real = exporting._run_file
    monkeypatch.setattr(exporting, "_run_file", lambda *a: real(*a) + np.float32(0.01))
    path = tmp_path / "s12.xml"
    path.write_text("the previous graph")
    path.with_suffix(".bin").write_text("the previous weights")
    report = export_model(s12, path, fmt="openvino", resolution=64)
    assert not report.written and path.read_text() == "the previous graph"
    assert path.with_suffix(".bin").read_text() == "the previous weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s12.bin", "s12.xml"]


@pytest.mark.slow
def test_export_cli_reports_parity_as_json(tmp_path, s12_checkpoint):
    path = tmp_path / "s12.onnx"
    result = runner.invoke(app, ["export", "s12", "--weights", str(s12_checkpoint), "--output", str(path),
                                 "--resolution", "64", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["written"] and report["passed"] and report["resolution"] == 64 and path.is_file()
    assert {c["inputs"] for c in report["checks"]} == {"random", "images"}


@pytest.mark.parametrize("fast", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_export_at_height_x_width_takes_that_input(tmp_path, s12, fast):
    """A file for 64 x 96 (the dense tasks' rectangles, small): its input is [1, 3, 64, 96] and it matches."""
    path = tmp_path / "s12.onnx"
    report = export_model(s12, path, resolution=(64, 96), fast=fast, runtimes=("onnxruntime",))
    assert report.passed and report.written, report.reason
    shape = [d.dim_value for d in onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim]
    assert shape == [1, 3, 64, 96]
    assert {k: report.as_json()[k] for k in ("resolution", "height", "width")} == {
        "resolution": "64x96", "height": 64, "width": 96}


@pytest.mark.slow
def test_export_cli_at_height_x_width_checks_photographs_of_that_size(tmp_path):
    path = tmp_path / "s12.onnx"
    result = runner.invoke(app, ["export", "s12", "--output", str(path), "--resolution", "64x96", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["written"] and (report["height"], report["width"]) == (64, 96)
    assert {c["inputs"] for c in report["checks"]} == {"random", "images"}
    table = runner.invoke(app, ["export", "s12", "--output", str(path), "--resolution", "64x96"])
    assert table.exit_code == 0 and "64x96 px" in table.stdout


@pytest.mark.slow
def test_export_cli_exits_1_and_writes_nothing_on_mismatch(tmp_path, monkeypatch):
    real = exporting._run_file
    monkeypatch.setattr(exporting, "_run_file", lambda *a: real(*a) * np.float32(-1.0))
    path = tmp_path / "s12.onnx"
    result = runner.invoke(app, ["export", "s12", "--output", str(path), "--resolution", "64"])
    assert result.exit_code == 1 and "not written: the exported file does not match" in result.stderr
    assert not path.exists() and "Traceback" not in result.output


@pytest.mark.parametrize(("args", "message"), [
    (["s12", "--output", "x.onnx", "--format", "tflite"], "unknown format 'tflite'"),
    (["s12", "--output", "x.onnx", "--format", "pt2"], "a --format pt2 file should end in .pt2"),
    (["s12", "--output", "x.onnx", "--format", "openvino"], "a --format openvino file should end in .xml"),
    (["s12", "--output", "x.xml", "--format", "openvino", "--opset", "18"], "--opset applies to ONNX exports only"),
    (["s12_dwconv", "--output", "x.onnx", "--fast"], "--fast: the fast path handles pooling token mixers only"),
    (["s12", "--output", "x.onnx", "--opset", "9", "--resolution", "64"], "--opset must be between 13 and 20"),
    (["s12", "--output", "x.onnx", "--resolution", "16"], "--resolution: size '16': every side must be at least 32"),
    (["s12", "--output", "x.onnx", "--resolution", "64x16"], "every side must be at least 32"),
    (["s12", "--output", "x.onnx", "--resolution", "800*1333"], "HEIGHTxWIDTH"),
    (["s12", "--output", "x.onnx", "--resolution", "64,96"], "one value"),
    (["s12", "--output", "x.onnx", "--dynamic-size"], "--dynamic-size applies to --features exports"),
    (["s12_pppf", "--output", "x.onnx", "--features", "--dynamic-size", "--resolution", "64"],
     "poolformer_s12_pppf cannot be exported for any input size: its SpatialFC token mixer is built for 4 tokens"),
    (["s12_dwconv", "--output", "x.onnx", "--features", "--fast"],
     "--fast: the fast path handles pooling token mixers only"),
    (["s13", "--output", "x.onnx"], "unknown model 's13'"),
])
def test_export_bad_input_is_one_line(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    assert_one_line_error(runner.invoke(app, ["export", *args]), message)
    assert not (tmp_path / "x.onnx").exists()


def test_export_output_path_is_checked_first(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert_one_line_error(runner.invoke(app, ["export", "s12", "--output", str(blocker / "x.onnx")]),
                          "is a file, not a folder")


@pytest.mark.slow
def test_attention_hybrids_export_through_the_reference_model(tmp_path):
    model = randomize_(create_model("s12_pppa", img_size=64), seed=2)
    report = export_model(model, tmp_path / "pppa.onnx", resolution=64, runtimes=("onnxruntime",))
    assert report.passed and report.written


@pytest.mark.parametrize("fast", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_an_export_made_under_autocast_holds_the_float32_graph(tmp_path, s12, fast):
    """A runtime's first call under a bf16 bench row exports there: the file must not freeze bf16 casts in."""
    ort = pytest.importorskip("onnxruntime")
    module = FoldedExport(s12) if fast else portable_form(s12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        export_onnx(module, tmp_path / "m.onnx", (1, 3, 64, 64))
    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    assert not [n for n in graph.node if n.op_type == "Cast"]
    x = torch.randn(1, 3, 64, 64)
    got = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"]).run(None, {"images": x.numpy()})[0]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), s12(x), atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------ backbones (--features)

STAGES = ["stage1", "stage2", "stage3", "stage4"]


@pytest.fixture(scope="module")
def backbone():
    return randomize_(create_model("s12", features_only=True), seed=8)


def _assert_maps_match(got: list, model, x: torch.Tensor) -> None:
    with torch.no_grad():
        expected = model(x)
    assert len(got) == len(expected) == 4
    for out, want in zip(got, expected):
        out = torch.as_tensor(out)
        assert out.shape == want.shape
        assert (out - want).abs().max().item() <= 1e-4 * max(1.0, want.abs().max().item())


@pytest.mark.parametrize("fast", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_a_backbone_exports_four_named_maps_each_checked_at_two_sizes(tmp_path, backbone, fast):
    """--features --dynamic-size: outputs stage1..stage4, each checked on every runtime at the export size and at
    an odd, non-square one; the file then runs at any other size and batch."""
    ort = pytest.importorskip("onnxruntime")
    path = tmp_path / "backbone.onnx"
    report = export_model(backbone, path, resolution=64, dynamic_batch=True, dynamic_size=True, fast=fast)
    assert report.passed and report.written and report.outputs == STAGES and report.dynamic_size
    assert {(c.runtime, c.inputs, c.output) for c in report.checks} == {
        (r, i, o) for r in ("onnxruntime", "openvino") for i in ("random", "random 95x97") for o in STAGES}
    assert all(c.top1_agreement is None for c in report.checks)
    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == ["images"] and [o.name for o in graph.output] == STAGES
    assert "AveragePool" not in {node.op_type for node in graph.node}
    x = torch.randn(3, 3, 71, 103)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    _assert_maps_match(session.run(None, {"images": x.numpy()}), backbone, x)


@pytest.mark.parametrize("fmt, fast", [pytest.param("pt2", True, marks=pytest.mark.slow),
                                       pytest.param("openvino", False, marks=pytest.mark.slow), ("openvino", True)])
def test_backbone_programs_and_ir_take_any_size(tmp_path, backbone, fmt, fast):
    if fmt == "openvino":
        pytest.importorskip("openvino")
    path = tmp_path / f"backbone.{'xml' if fmt == 'openvino' else fmt}"
    report = export_model(backbone, path, fmt=fmt, resolution=64, dynamic_batch=True, dynamic_size=True, fast=fast)
    assert report.passed and report.written and report.outputs == STAGES
    x = torch.randn(2, 3, 75, 49)
    if fmt == "pt2":
        with torch.no_grad():
            got = torch.export.load(str(path)).module()(x)
    else:
        from poolformer.runtimes.sessions import make_runner

        runner = make_runner("openvino", str(path), features=True)
        assert [o.get_any_name() for o in runner.compiled.outputs] == STAGES
        got = runner.run_all(x.numpy())
    _assert_maps_match(got, backbone, x)


@pytest.mark.slow
def test_a_backbone_file_off_in_one_map_is_not_written(tmp_path, backbone, monkeypatch):
    real = exporting._run_file

    def third_map_off(*args):
        maps = real(*args)
        return [m + np.float32(0.01) if i == 2 else m for i, m in enumerate(maps)]

    monkeypatch.setattr(exporting, "_run_file", third_map_off)
    report = export_model(backbone, tmp_path / "backbone.onnx", resolution=64, runtimes=("onnxruntime",))
    assert not report.written and [c.output for c in report.checks if not c.passed] == ["stage3"]
    assert report.reason.startswith("onnxruntime on random inputs, output stage3: max |diff|")
    assert "top-1" not in report.reason and list(tmp_path.iterdir()) == []


def test_a_dynamic_size_file_is_also_checked_at_an_odd_size_near_its_own():
    """Near the export's height and width, odd on both sides and never square (the pooling's border factors and
    the stride-2 roundings differ from the export size's)."""
    assert exporting.second_size(Size(64, 64)) == (95, 97)
    assert exporting.second_size(Size(64, 96)) == (95, 145)
    assert exporting.second_size(Size(800, 1333)) == (831, 1999)


def test_dynamic_size_is_for_backbones_whose_parts_take_any_size(tmp_path, s12):
    with pytest.raises(ConfigError, match="a dynamic input size is for features-only exports"):
        export_model(s12, tmp_path / "s12.onnx", resolution=64, dynamic_size=True)
    hybrid = create_model("s12_pppf", features_only=True, img_size=64)
    with pytest.raises(ConfigError, match="SpatialFC token mixer is built for 4 tokens"):
        export_model(hybrid, tmp_path / "pppf.onnx", resolution=64, dynamic_size=True)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_export_cli_writes_a_detection_checkpoints_backbone(tmp_path):
    """--features --weights takes an mmdet checkpoint (its backbone; neck and heads set aside); the JSON report
    lists the outputs. predict, eval and the runtime module then refuse the file in one line."""
    from poolformer.runtimes.sessions import RuntimeModule

    from .test_features import _dense_checkpoint

    checkpoint = tmp_path / "retinanet_poolformer_s12.pth"
    torch.save(_dense_checkpoint(randomize_(create_model("s12", features_only=True), seed=3), "retinanet"),
               checkpoint)
    path = tmp_path / "backbone.onnx"
    result = runner.invoke(app, ["export", "s12", "--features", "--dynamic-size", "--weights", str(checkpoint),
                                 "--output", str(path), "--resolution", "64", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["written"] and report["outputs"] == STAGES and report["dynamic_size"]
    assert {c["output"] for c in report["checks"]} == set(STAGES)
    message = "a features-only export (4 feature maps, no logits)"
    image = tmp_path / "noise.png"
    from PIL import Image

    Image.fromarray((torch.rand(40, 48, 3) * 255).byte().numpy()).save(image)
    for command in (["predict", str(image)], ["eval", str(tmp_path)]):
        assert_one_line_error(runner.invoke(app, [*command, "--model", "s12", "--weights", str(path)]), message, 1)
    with pytest.raises(CheckpointError, match=re.escape(message)):
        RuntimeModule.from_file("onnxruntime", path)


def test_export_cli_shows_a_row_per_output(tmp_path):
    path = tmp_path / "backbone.xml"
    result = runner.invoke(app, ["export", "s12", "--features", "--format", "openvino", "--fast", "--output",
                                 str(path), "--resolution", "64"])
    assert result.exit_code == 0, result.output
    assert "features stage1 stage2 stage3 stage4" in " ".join(result.stdout.split())
    assert all(stage in result.stdout for stage in STAGES) and "top-1" not in result.stdout
    assert path.is_file()
