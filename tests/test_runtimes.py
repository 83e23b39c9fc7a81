"""ONNX Runtime and OpenVINO as implementations (bench, predict, eval), exported files as --weights, and the
parity check on every bench row."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from poolformer import CheckpointError, ConfigError, create_model
from poolformer.bench import BenchConfig, BenchSettings, run_config
from poolformer.implementations import build
from poolformer.model import randomize_
from poolformer.regression import compare
from poolformer.export import export_model
from poolformer.runtimes.sessions import RuntimeModule, available, make_runner
from poolformer_cli.app import app

from .conftest import assert_one_line_error, marked_slow

runner = CliRunner()
QUICK = BenchSettings(warmup=0, iters=2)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A 10-class s12 checkpoint, its export at 64 px with a dynamic batch, and an image."""
    from PIL import Image

    from poolformer.weights import export_state_dict

    folder = tmp_path_factory.mktemp("exported")
    model = randomize_(create_model("s12", num_classes=10), seed=11)
    checkpoint = folder / "s12_10.pth"
    torch.save(export_state_dict(model, "official"), checkpoint)
    onnx_path = folder / "s12_10.onnx"
    assert export_model(model, onnx_path, resolution=64, dynamic_batch=True).written
    assert export_model(model, folder / "s12_10_224.onnx", resolution=224, dynamic_batch=True).written
    image = folder / "img.png"
    Image.fromarray((torch.rand(70, 90, 3) * 255).byte().numpy()).save(image)
    return checkpoint, onnx_path, image


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["onnxruntime", "openvino"])
def test_runtime_rows_match_our_model_and_time_session_creation_as_the_first_call(impl):
    result = run_config(BenchConfig("v2_s12", impl, "cpu", 2, 64), QUICK)
    assert result.status == "ok", result.error
    assert result.parity.ok and result.parity.reference == "ours" and result.parity.top1_agreement == 1.0
    assert result.parity.relative_diff < 1e-5
    assert result.first_call_ms > result.latency_ms.median  # export + session creation happen on the first call


def _seeded(name: str, *impls: str) -> list[torch.nn.Module]:
    """`name` in each implementation, each built after the same seed: the same weights, as bench builds them."""
    models = []
    for impl in impls:
        torch.manual_seed(0)
        models.append(build(name, impl))
    return models


def test_same_name_same_weights_in_every_implementation():
    """Models are built after seeding, so each implementation's row compares against the same reference."""
    ours, fast = _seeded("s12", "ours", "fast")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert (ours(x) - fast(x)).abs().max().item() < 1e-4


def _broken_fast(name, impl, **kwargs):
    """A 'fast' implementation with a bug: its logits are shifted for one class."""
    model = build(name, impl, **kwargs)
    if impl != "fast":
        return model

    class Shifted(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            out = self.inner(x).clone()
            out[:, 3] += 5.0
            return out

    return Shifted(model)


@pytest.mark.slow
def test_a_row_with_wrong_outputs_is_a_mismatch_not_a_speed_result():
    result = run_config(BenchConfig("s12", "fast", "cpu", 2, 64), QUICK, build_model=_broken_fast)
    assert result.status == "mismatch" and not result.parity.ok and result.parity.max_abs_diff == pytest.approx(5.0, abs=0.01)
    good = run_config(BenchConfig("s12", "fast", "cpu", 2, 64), QUICK)
    assert good.status == "ok" and good.parity.ok
    report = compare([good.to_row()], [result.to_row()], max_regression_pct=10)
    assert report.comparisons[0].regressed and report.comparisons[0].note == "status mismatch"


@pytest.mark.slow
def test_timm_rows_are_checked_against_timm():
    """timm's v1 head normalises after pooling: its logits differ from ours by design, not by mistake."""
    result = run_config(BenchConfig("s12", "timm", "cpu", 2, 64, channels_last=True), QUICK)
    assert result.status == "ok" and result.parity.reference == "timm" and result.parity.relative_diff < 1e-5


@pytest.mark.parametrize(("impl", "message"), [("onnxruntime", "fp32 only"), ("openvino", "native support")])
def test_runtimes_refuse_a_precision_they_would_not_compute(impl, message, monkeypatch):
    from poolformer import capabilities

    from .test_capabilities import caps

    monkeypatch.setattr(capabilities, "cpu_capabilities", lambda: caps(("avx2",), onednn_bf16=False))
    result = run_config(BenchConfig("s12", impl, "cpu", 1, 64, precision="bf16"), QUICK)
    assert result.status == "error" and message in result.error


@pytest.mark.slow
def test_bench_cli_runs_an_exported_file(exported):
    _, onnx_path, _ = exported
    result = runner.invoke(app, ["bench", "s12", "--weights", str(onnx_path), "--impl", "onnxruntime,openvino",
                                 "--device", "cpu", "--batch-sizes", "1,3", "--resolutions", "64", "--warmup", "0",
                                 "--iters", "2", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["results"]
    assert [r["status"] for r in rows] == ["ok"] * 4
    assert all(r["parity"] is None and "inside the exported file" in r["parity_note"] for r in rows)
    wrong_size = runner.invoke(app, ["bench", "s12", "--weights", str(onnx_path), "--impl", "onnxruntime",
                                     "--device", "cpu", "--batch-sizes", "1", "--resolutions", "96", "--iters", "1",
                                     "--warmup", "0", "--json"])
    assert wrong_size.exit_code == 1 and "export it for this shape" in json.loads(wrong_size.stdout)["results"][0]["error"]


@pytest.mark.slow
@pytest.mark.parametrize("runtime", ["onnxruntime", pytest.param("openvino", marks=pytest.mark.skipif(
    not available("openvino"), reason="openvino is not installed"))])
def test_a_fixed_batch_file_refuses_another_batch_after_running_its_own(tmp_path, runtime):
    """A file exported for batch 1 runs batch 1, then refuses batch 2 in one line: the session made for its
    height and width serves every batch of a dynamic-batch file, and must not take this one to the runtime."""
    path = tmp_path / "fixed.onnx"
    export_model(create_model("s12", num_classes=10).eval(), str(path), fmt="onnx", resolution=64)
    module = RuntimeModule.from_file(runtime, path)
    assert module(torch.randn(1, 3, 64, 64)).shape == (1, 10)
    with pytest.raises(ConfigError, match=r"takes \[1, 3, 64, 64\] inputs, not \[2, 3, 64, 64\]"):
        module(torch.randn(2, 3, 64, 64))


@pytest.mark.parametrize("impl", marked_slow(["ours", "onnxruntime", "openvino"], "onnxruntime", "openvino"))
def test_predict_with_an_exported_file_equals_the_checkpoint(exported, impl):
    checkpoint, small, image = exported
    onnx_path = small.with_name("s12_10_224.onnx")  # exported at the model's own 224 px, as the checkpoint runs
    predictions = {}
    for weights in (checkpoint, onnx_path):
        args = ["predict", str(image), "--weights", str(weights), "--device", "cpu", "--json", "--top-k", "3",
                "--model", "s12"]
        if weights == onnx_path:
            args += ["--impl", impl]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        predictions[weights.suffix] = json.loads(result.stdout)[0]["predictions"]
    assert [p["index"] for p in predictions[".onnx"]] == [p["index"] for p in predictions[".pth"]]
    assert [p["label"] for p in predictions[".onnx"]] == [str(p["index"]) for p in predictions[".onnx"]]  # 10 classes
    assert [p["probability"] for p in predictions[".onnx"]] == pytest.approx(
        [p["probability"] for p in predictions[".pth"]], abs=1e-5)


def test_predict_preprocesses_to_the_exported_files_size(exported):
    from poolformer.predict import load_classifier

    _, small, _ = exported
    classifier = load_classifier("s12", weights=small, impl="onnxruntime", device="cpu")
    assert classifier.spec.input_size == 64 and classifier.spec.crop_pct == 0.9 and classifier.num_classes == 10


@pytest.mark.slow
def test_eval_with_an_exported_file(exported, tmp_path):
    checkpoint, small, image = exported
    onnx_path = small.with_name("s12_10_224.onnx")
    for klass in range(10):  # a 10-class dataset: sorted folder names are the class indices
        folder = tmp_path / f"class{klass}"
        folder.mkdir()
        (folder / "a.png").write_bytes(image.read_bytes())
    counts = {}
    for weights, impl in ((checkpoint, "ours"), (onnx_path, "openvino")):
        result = runner.invoke(app, ["eval", str(tmp_path), "--weights", str(weights), "--impl", impl, "--device",
                                     "cpu", "--workers", "0", "--json", "--batch-size", "4"])
        assert result.exit_code == 0, result.output
        document = json.loads(result.stdout)
        counts[impl] = (document["images"], document["correct_top1"], document["correct_top5"])
    assert counts["openvino"] == counts["ours"] and counts["ours"][0] == 10


def test_foreign_and_corrupt_onnx_files_are_one_line_errors(tmp_path, exported):
    _, _, image = exported
    import onnx
    from onnx import TensorProto, helper

    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x07 not a protobuf of a model at all")
    assert_one_line_error(runner.invoke(app, ["predict", str(image), "--weights", str(corrupt)]),
                          "not an ONNX file", exit_code=1)
    adder = helper.make_model(helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["c"])], "adder",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, 4]), helper.make_tensor_value_info("b", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [1, 4])]))
    foreign = tmp_path / "adder.onnx"
    onnx.save(adder, foreign)
    assert_one_line_error(runner.invoke(app, ["predict", str(image), "--weights", str(foreign)]),
                          "not an image classifier export", exit_code=1)
    with pytest.raises(Exception, match="not a poolformer export"):
        RuntimeModule.from_file("onnxruntime", foreign)


def test_a_missing_runtime_is_a_one_line_error(monkeypatch, exported):
    _, onnx_path, image = exported
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino now raises ImportError
    with pytest.raises(ConfigError, match="openvino is not installed here"):
        make_runner("openvino", str(onnx_path))
    assert_one_line_error(runner.invoke(app, ["predict", str(image), "--weights", str(onnx_path), "--impl", "openvino"]),
                          "openvino is not installed here")
    result = run_config(BenchConfig("s12", "openvino", "cpu", 1, 64), QUICK)
    assert result.status == "error" and "openvino is not installed here" in result.error


@pytest.mark.subprocess
@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="OpenVINO's CPU plugin swaps the signal stack on Linux only")
def test_openvino_runners_freed_in_creation_order_leave_signals_deliverable(exported):
    """Each OpenVINO Core's CPU plugin puts its own signal stack on the thread that makes it and unmaps it when
    freed, restoring the stack it replaced only if its own is still current. Two Cores freed in the order they
    were made so left the thread on an unmapped signal stack, and the next signal with a Python handler (Ctrl-C,
    the SIGCHLD of DataLoader's workers) killed the process with SIGSEGV: the test suite's crash with OpenVINO as
    the fast path's default. Runners share one Core now."""
    import subprocess

    pytest.importorskip("openvino")
    _, onnx_path, _ = exported
    script = (
        "import gc, os, signal, sys\n"
        "from poolformer.runtimes.sessions import make_runner\n"
        "signal.signal(signal.SIGUSR1, lambda *_: print('handled', flush=True))\n"
        "first = make_runner('openvino', sys.argv[1], threads=1)\n"
        "second = make_runner('openvino', sys.argv[1], threads=1)\n"
        "del first; gc.collect(); del second; gc.collect()\n"
        "os.kill(os.getpid(), signal.SIGUSR1)\n"
        "print('survived', flush=True)\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(onnx_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-500:]}"
    assert done.stdout.split() == ["handled", "survived"]


@pytest.mark.skipif(not available("openvino"), reason="openvino is not installed")
def test_a_model_built_in_memory_runs_in_openvino_only():
    """OpenVINO compiles an `openvino.Model` as it is (the fast path's graph); the runtimes that read files
    refuse one, and a built model that is not a classifier gets the same error as such a file."""
    import openvino as ov
    import openvino.opset13 as ops

    with pytest.raises(ConfigError, match="only openvino runs a model built in memory"):
        RuntimeModule("onnxruntime", build=lambda shape: None)
    doubled = ops.parameter([2, 3, 8, 8], ov.Type.f32)
    model = ov.Model([ops.multiply(doubled, ops.constant(np.float32(2.0)))], [doubled], "doubler")
    with pytest.raises(CheckpointError, match="the built model 'doubler'.*not a poolformer export"):
        make_runner("openvino", model)


@pytest.mark.skipif(not available("openvino"), reason="openvino is not installed")
@pytest.mark.parametrize("frontend", [pytest.param("converts", marks=pytest.mark.slow), "cannot trace"])
def test_openvino_runs_its_own_conversion_of_the_model_or_the_onnx_export(monkeypatch, frontend):
    """`--impl openvino` is OpenVINO at its best: its own PyTorch frontend converts the model; where that frontend
    cannot trace a model, the portable ONNX export runs instead. Either way, our model's logits."""
    import openvino as ov

    calls = []
    convert = ov.convert_model

    def spy(*args, **kwargs):
        calls.append(kwargs["example_input"].shape)
        if frontend == "cannot trace":
            raise RuntimeError("Couldn't get TorchScript module by tracing.")
        return convert(*args, **kwargs)

    monkeypatch.setattr(ov, "convert_model", spy)
    ours, runtime = _seeded("v2_s12", "ours", "openvino")
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        expected, got = ours(x), runtime(x)
    assert calls == [torch.Size([2, 3, 64, 80])]  # one conversion for the shape
    assert (got - expected).abs().max().item() < 1e-5 * max(1.0, expected.abs().max().item())


@pytest.mark.slow
@pytest.mark.skipif(not available("openvino"), reason="openvino is not installed")
def test_openvino_builds_once_reshapes_for_each_shape_and_refuses_a_precision_before_building():
    """A bench sweep over shapes and precisions converts the model once (a conversion traces it: seconds), not
    once per row: each new shape reshapes the one built model and each precision compiles it, with our logits at
    every shape. A built graph that cannot be reshaped is built again for the shape; what cannot run here is
    refused before the build it would waste."""
    import openvino as ov
    import openvino.opset13 as ops

    from poolformer.capabilities import cpu_capabilities
    from poolformer.runtimes.exporting import openvino_converter

    torch.manual_seed(0)
    ours = create_model("s12", num_classes=10).eval()
    convert, builds = openvino_converter(ours), []

    def build(shape):
        builds.append(shape)
        return convert(shape)

    runtime = RuntimeModule("openvino", build=build, num_classes=10)
    with torch.no_grad():
        for shape in [(1, 3, 64, 64), (2, 3, 64, 64), (1, 3, 96, 80), (1, 3, 64, 64)]:
            x = torch.randn(shape)
            expected = ours(x)
            assert (runtime(x) - expected).abs().max().item() < 1e-5, shape
        assert builds == [(1, 3, 64, 64)]
        if cpu_capabilities().native_bf16:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                low = runtime(x)
            assert builds == [(1, 3, 64, 64)]  # the same model, compiled in bf16
            assert 0 < (low - expected).abs().max().item() < 0.05 * expected.abs().max().item()
            assert (runtime(x) - expected).abs().max().item() < 1e-5  # the fp32 session is as it was
        runtime.precision = "fp16"
        with pytest.raises(ConfigError, match="fp16 only on CPUs with native support"):
            runtime(torch.randn(3, 3, 64, 64))
    assert builds == [(1, 3, 64, 64)]

    def baked(shape):  # per-image channel means through a Reshape whose target holds the batch: not reshapeable
        builds.append(shape)
        images = ops.parameter(list(shape), ov.Type.f32)
        means = ops.reduce_mean(images, ops.constant(np.array([2, 3])), False)
        return ov.Model([ops.reshape(means, ops.constant(np.array([shape[0], 3])), False)], [images], "baked")

    builds.clear()
    runtime = RuntimeModule("openvino", build=baked, num_classes=3)
    for batch in (1, 2):
        x = torch.randn(batch, 3, 4, 4)
        assert torch.allclose(runtime(x), x.mean((2, 3)), atol=1e-6)
    assert builds == [(1, 3, 4, 4), (2, 3, 4, 4)]


@pytest.mark.skipif(not available("openvino"), reason="openvino is not installed")
@pytest.mark.parametrize(("content", "message"), [
    ("<xml/>", "not an OpenVINO IR file (its root element is <xml>, not <net>)"),
    ("garbage", "not an OpenVINO IR file (not XML: syntax error"),
    ("", "not an OpenVINO IR file (not XML: no element found"),
    # these two export a real IR first
    pytest.param("cut short", "OpenVINO cannot read it: Error parsing", marks=pytest.mark.slow),
    pytest.param("without weights", "OpenVINO cannot read it: Empty weights data in bin file or bin file cannot be found",
                 marks=pytest.mark.slow),
])
def test_a_bad_ir_file_is_one_line_that_says_what_is_wrong(tmp_path, capfd, content, message):
    """Not OpenVINO's first line ("Exception from src/inference/src/cpp/core.cpp:84:"), and a foreign .xml never
    reaches OpenVINO's other frontends, whose TensorFlow reader writes its parse errors to the process's stderr."""
    path = tmp_path / "model.xml"
    if content in ("cut short", "without weights"):  # a real IR, its .xml cut or its .bin gone
        export_model(create_model("s12", num_classes=10).eval(), str(path), fmt="openvino", resolution=64)
        if content == "cut short":
            path.write_bytes(path.read_bytes()[:2000])
        else:
            path.with_suffix(".bin").unlink()
    else:
        path.write_text(content)
    with pytest.raises(CheckpointError) as raised:
        RuntimeModule.from_file("openvino", path)
    assert str(raised.value).startswith(f"{path}: {message}")
    assert "\n" not in str(raised.value) and "src/" not in str(raised.value)
    assert "GraphDef" not in capfd.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(not available("openvino"), reason="openvino is not installed")
def test_an_openvino_ir_file_runs_as_weights_in_predict_and_bench(tmp_path, exported):
    """`poolformer export --format openvino` writes what predict and bench then run with --weights FILE.xml
    (OpenVINO only); a corrupt .xml file or another runtime is one line."""
    checkpoint, onnx_path, image = exported
    ir = tmp_path / "s12_10.xml"
    result = runner.invoke(app, ["export", "s12", "--weights", str(checkpoint), "--output", str(ir), "--format",
                                 "openvino", "--fast", "--resolution", "64", "--dynamic-batch"])
    assert result.exit_code == 0, result.output
    results = [runner.invoke(app, ["predict", str(image), "--model", "s12", "--weights", str(weights), "--json",
                                   "--device", "cpu", "--impl", "openvino"]) for weights in (ir, onnx_path)]
    assert all(r.exit_code == 0 for r in results), results[0].output + results[1].output
    ranked = [[p["index"] for p in json.loads(r.stdout)[0]["predictions"]] for r in results]
    assert ranked[0] == ranked[1] and len(ranked[0]) == 5  # the ONNX export of the same 10-class model at 64 px
    bench = run_config(BenchConfig("s12", "openvino", "cpu", 3, 64, weights=str(ir)), QUICK)
    assert bench.status == "ok", bench.error
    assert_one_line_error(runner.invoke(app, ["predict", str(image), "--model", "s12", "--weights", str(ir), "--impl",
                                              "onnxruntime"]), "runs with --impl openvino, not onnxruntime")
    corrupt = tmp_path / "corrupt.xml"
    corrupt.write_text("<net>not a graph")
    assert_one_line_error(runner.invoke(app, ["predict", str(image), "--model", "s12", "--weights", str(corrupt)]),
                          "OpenVINO cannot read it", exit_code=1)
