"""`poolformer export` and poolformer.export: portable and folded forms, parity against ONNX Runtime and OpenVINO,
files written only when they match."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from poolformer import create_model
from poolformer import export as exporting
from poolformer.export import export_model
from poolformer.fast.folded_export import FoldedExport
from poolformer.runtimes.export_forms import mean_pool, portable_form
from poolformer.runtimes.exporting import export_onnx
from poolformer_cli.app import app

from .conftest import assert_one_line_error, randomize_

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


@pytest.mark.parametrize("name", ["s12", "v2_s12", "s12_pool5", "s12_relu"])
def test_portable_and_folded_forms_give_the_models_logits(name):
    model = randomize_(create_model(name), seed=3)
    x = torch.randn(2, 3, 97, 75)
    with torch.no_grad():
        expected = model(x)
        scale = max(1.0, expected.abs().max().item())
        assert (portable_form(model)(x) - expected).abs().max().item() < 1e-5 * scale
        assert (FoldedExport(model)(x) - expected).abs().max().item() < 1e-5 * scale


def test_exported_graph_avoids_the_operators_runtimes_get_wrong(tmp_path, s12):
    """No GroupNormalization / InstanceNormalization (TensorRT's one-group trap) and no AveragePool
    (count_include_pad traps): plain reductions, element-wise ops and convolutions."""
    for name, module in (("portable", portable_form(s12)), ("folded", FoldedExport(s12))):
        path = tmp_path / f"{name}.onnx"
        export_onnx(module, path, (1, 3, 64, 64))
        ops = {node.op_type for node in onnx.load(path).graph.node}
        assert not ops & {"GroupNormalization", "InstanceNormalization", "AveragePool", "LayerNormalization"}, ops
        assert {"Conv", "ReduceMean"} <= ops


@pytest.mark.parametrize("fast", [False, True])
def test_export_passes_on_both_runtimes_and_writes_the_file(tmp_path, s12, fast):
    path = tmp_path / "out" / "s12.onnx"
    report = export_model(s12, path, resolution=64, dynamic_batch=True, fast=fast, images=_photographs(64))
    assert report.passed and report.written and path.stat().st_size == report.size_bytes
    assert {(c.runtime, c.inputs) for c in report.checks} == {
        (r, i) for r in ("onnxruntime", "openvino") for i in ("random", "images")}
    assert all(c.max_abs_diff < 1e-4 * max(1.0, c.max_abs_logit) and c.top1_agreement == 1.0 for c in report.checks)
    assert [p.name for p in path.parent.iterdir()] == ["s12.onnx"]  # no temporary left


def test_a_file_that_does_not_match_is_not_written(tmp_path, s12, monkeypatch):
    real = exporting._run_file
    monkeypatch.setattr(exporting, "_run_file", lambda *a: real(*a) + np.float32(0.01))  # a runtime off by 0.01
    path = tmp_path / "s12.onnx"
    path.write_text("the previous file")
    report = export_model(s12, path, resolution=64)
    assert not report.passed and not report.written and "max |diff|" in report.reason
    assert path.read_text() == "the previous file" and [p.name for p in tmp_path.iterdir()] == ["s12.onnx"]


def test_pt2_export_round_trips_through_torch_export(tmp_path, s12):
    path = tmp_path / "s12.pt2"
    report = export_model(s12, path, fmt="pt2", resolution=64, dynamic_batch=True)
    assert report.passed and report.written and [c.runtime for c in report.checks] == ["torch"]
    program = torch.export.load(str(path))
    x = torch.randn(5, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), s12(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fast", [False, True])
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


def test_export_cli_reports_parity_as_json(tmp_path, s12_checkpoint):
    path = tmp_path / "s12.onnx"
    result = runner.invoke(app, ["export", "s12", "--weights", str(s12_checkpoint), "--output", str(path),
                                 "--resolution", "64", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["written"] and report["passed"] and report["resolution"] == 64 and path.is_file()
    assert {c["inputs"] for c in report["checks"]} == {"random", "images"}


@pytest.mark.parametrize("fast", [False, True])
def test_export_at_height_x_width_takes_that_input(tmp_path, s12, fast):
    """A file for 64 x 96 (the dense tasks' rectangles, small): its input is [1, 3, 64, 96] and it matches."""
    path = tmp_path / "s12.onnx"
    report = export_model(s12, path, resolution=(64, 96), fast=fast, runtimes=("onnxruntime",))
    assert report.passed and report.written, report.reason
    shape = [d.dim_value for d in onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim]
    assert shape == [1, 3, 64, 96]
    assert {k: report.as_json()[k] for k in ("resolution", "height", "width")} == {
        "resolution": "64x96", "height": 64, "width": 96}


def test_export_cli_at_height_x_width_checks_photographs_of_that_size(tmp_path):
    path = tmp_path / "s12.onnx"
    result = runner.invoke(app, ["export", "s12", "--output", str(path), "--resolution", "64x96", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["written"] and (report["height"], report["width"]) == (64, 96)
    assert {c["inputs"] for c in report["checks"]} == {"random", "images"}
    table = runner.invoke(app, ["export", "s12", "--output", str(path), "--resolution", "64x96"])
    assert table.exit_code == 0 and "64x96 px" in table.stdout


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


def test_attention_hybrids_export_through_the_reference_model(tmp_path):
    model = randomize_(create_model("s12_pppa", img_size=64), seed=2)
    report = export_model(model, tmp_path / "pppa.onnx", resolution=64, runtimes=("onnxruntime",))
    assert report.passed and report.written


@pytest.mark.parametrize("fast", [False, True])
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
