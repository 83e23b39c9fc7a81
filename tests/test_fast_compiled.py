"""The fast path's compiled backend ("inductor", `poolformer.fast.compiled`) against the reference model.

The folded graph is checked eagerly (every operator it hands to the compiler) at odd shapes and every variant,
then traced by torch.compile's aot_eager backend (quick: the same graph, no C++), then compiled for real by
inductor with freezing where a C++ compiler is installed (each shape ~10 s on 2 cores, so only a few).
"""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

from poolformer import ConfigError, create_model, optimize
from poolformer import bench
from poolformer.fast import compiled as fast_compiled
from poolformer.fast import fold
from poolformer.fast.compiled import FoldedGraph, Frozen
from poolformer.fast.module import explain_backend
from poolformer.model import randomize_
from poolformer_cli.app import app

from .conftest import marked_slow
from .test_fast import _seeded, v1_model, v2_model  # noqa: F401  (the same seeded, randomised models)

TOLERANCE = 1e-4  # fp32 logits, absolute (or twice the reference's own fp32 error against float64)
HAS_CXX = any(shutil.which(name) for name in ("c++", "g++", "clang++"))
needs_cxx = pytest.mark.skipif(not HAS_CXX, reason="inductor compiles C++ on the CPU and no compiler is installed")


def _assert_as_exact_as_reference(model, got: torch.Tensor, x: torch.Tensor) -> None:
    with torch.no_grad():
        expected = model(x)
        assert got.dtype == torch.float32 and got.shape == expected.shape
        if (got - expected).abs().max().item() < TOLERANCE:
            return
        exact = copy.deepcopy(model).double()(x.double())
    error, reference_error = (got - exact).abs().max().item(), (expected - exact).abs().max().item()
    assert error <= max(TOLERANCE, 2 * reference_error), (error, reference_error)


def _graph(model, dtype=torch.float32) -> FoldedGraph:
    return FoldedGraph(*fold(model), dtype)


# ------------------------------------------------------------------------------ the graph, eagerly


@pytest.mark.parametrize("family", ["v1", "v2"])
@pytest.mark.parametrize(("batch", "height", "width"), [(1, 64, 64), (3, 97, 75), (2, 33, 47)])
def test_folded_graph_matches_reference(family, batch, height, width, v1_model, v2_model):
    model = v1_model if family == "v1" else v2_model
    x = torch.randn(batch, 3, height, width)
    with torch.no_grad():
        _assert_as_exact_as_reference(model, _graph(model)(x), x)


@pytest.mark.parametrize("variant", marked_slow(
    ["poolformer_s12_pool5", "poolformer_s12_relu", "poolformer_s12_silu", "v2_s24"],
    "poolformer_s12_pool5", "poolformer_s12_silu", "v2_s24"))
def test_folded_graph_matches_every_supported_variant(variant):
    model = randomize_(create_model(variant), seed=3)
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        _assert_as_exact_as_reference(model, _graph(model)(x), x)


def test_folded_graph_keeps_weights_as_buffers_in_its_dtype(v2_model):
    """Buffers are what freezing turns into constants; tensors held elsewhere would be graph inputs."""
    graph = _graph(v2_model, torch.bfloat16)
    blocks = sum(len(stage) for stage in graph.stages)
    assert blocks == 12 and not list(graph.parameters())
    fc = [b for name, b in graph.named_buffers() if name.endswith("fc1_weight") or name.endswith("fc2_weight")]
    assert len(fc) == 2 * blocks and all(b.dtype == torch.bfloat16 and b.ndim == 4 for b in fc)
    assert graph.head_weight.dtype == torch.float32  # the head stays float32, as in every fast backend


@pytest.mark.parametrize("family", ["v1", "v2"])
def test_folded_graph_in_bf16_agrees_with_fp32(family, v1_model, v2_model):
    model = v1_model if family == "v1" else v2_model
    x = torch.randn(16, 3, 64, 64)
    with torch.no_grad():
        expected, got = model(x), _graph(model, torch.bfloat16)(x)
    assert got.dtype == torch.float32
    assert (got - expected).abs().max().item() < 0.1 * expected.std().item()
    assert (got.argmax(1) == expected.argmax(1)).float().mean().item() >= 0.9


# ------------------------------------------------------------------------------ the backend


@pytest.mark.slow
def test_inductor_backend_traced_runs_the_folded_graph(v2_model):
    """Through optimize(): aot_eager traces the same graph torch.compile would hand inductor."""
    fast = optimize(v2_model, backend="inductor")
    fast.compiler = "aot_eager"
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        got = fast(x)
        assert fast.backend_for() == "inductor"
        prepared = fast.prepared(torch.float32, x.device)
        assert isinstance(prepared.graph, Frozen)
        torch.testing.assert_close(got, _graph(v2_model)(x), rtol=0, atol=1e-6)
        features = fast.forward_features(x)  # maps never come from the compiled graph: oneDNN or portable
        torch.testing.assert_close(features, optimize(v2_model).forward_features(x), rtol=0, atol=0)
    _assert_as_exact_as_reference(v2_model, got, x)


@pytest.mark.slow
def test_compile_with_switches_the_backend_and_drops_prepared_forms(v1_model):
    fast = optimize(v1_model)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        fast(x)
        assert fast.backend_for() != "inductor"
        assert fast.compile_with(compiler="aot_eager") is fast
        fast(x)
    assert fast.backend_for() == "inductor" and fast.prepared(torch.float32, x.device).backend == "inductor"


def test_frozen_compiles_with_freezing_during_the_call(monkeypatch):
    seen = []

    def fake_compile(module, **kwargs):
        def run(x):
            from torch._inductor import config

            seen.append((config.freezing, torch.is_grad_enabled(), kwargs))
            return module(x)
        return run

    monkeypatch.setattr(torch, "compile", fake_compile)
    frozen = Frozen(torch.nn.Linear(3, 2), mode="max-autotune", compiler="inductor")
    frozen(torch.randn(1, 3))
    from torch._inductor import config

    assert seen == [(True, False, {"backend": "inductor", "mode": "max-autotune", "dynamic": False})]
    assert config.freezing is False  # only during the call


@pytest.mark.parametrize(("dtype", "device", "message"), [
    (torch.float16, "cpu", "runs float32 and bfloat16, not float16"),
    (torch.float32, "cuda", "runs on the CPU, not cuda"),
])
def test_inductor_backend_where_it_cannot_run_is_a_config_error(dtype, device, message):
    with pytest.raises(ConfigError, match=f"the inductor backend cannot run here: it {message}"):
        explain_backend("inductor", dtype, torch.device(device))


def test_inductor_backend_without_a_cxx_compiler_is_a_config_error(monkeypatch, v1_model):
    monkeypatch.setattr(fast_compiled.shutil, "which", lambda name: None)
    with pytest.raises(ConfigError, match="needs a C\\+\\+ compiler"):
        optimize(v1_model, backend="inductor")(torch.randn(1, 3, 32, 32))


def test_auto_never_takes_the_compiled_backend(v1_model):
    for dtype in (torch.float32, torch.bfloat16):
        assert optimize(v1_model).backend_for(dtype) != "inductor"


@pytest.mark.slow
@needs_cxx
def test_inductor_compiles_the_folded_graph_exactly(v1_model):
    """The real thing: inductor with freezing, two input shapes (each compiles on its first call)."""
    fast = optimize(v1_model, backend="inductor")
    for shape in [(1, 3, 64, 64), (3, 3, 48, 80)]:
        x = torch.randn(shape)
        with torch.inference_mode():
            got = fast(x)
        _assert_as_exact_as_reference(v1_model, got, x)


@pytest.mark.slow
@needs_cxx
@pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="bf16 is emulated on this CPU (slow)")
def test_inductor_compiles_bf16_under_autocast(v2_model):
    fast = optimize(v2_model, backend="inductor")
    x = torch.randn(8, 3, 64, 64)
    with torch.inference_mode():
        expected = v2_model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = fast(x)
    assert fast.prepared(torch.bfloat16, x.device).backend == "inductor" and got.dtype == torch.float32
    assert (got - expected).abs().max().item() < 0.1 * expected.std().item()
    assert (got.argmax(1) == expected.argmax(1)).float().mean().item() >= 0.75


# ------------------------------------------------------------------------------ bench --compile


@pytest.mark.slow
def test_bench_compiles_the_fast_paths_folded_graph():
    config = bench.BenchConfig("s12", "fast", "cpu", batch_size=2, resolution=64, compile=True)
    settings = bench.BenchSettings(warmup=0, iters=2, compile_backend="aot_eager")
    model = bench.prepare_model(config, compile_backend="aot_eager")
    assert model.backend == "inductor" and model.compiler == "aot_eager"
    result = bench.run_config(config, settings)
    row = result.to_row()
    assert row["status"] == "ok" and row["compile"] and row["backend"] == "inductor", row
    assert row["parity"]["ok"] and row["parity"]["max_abs_diff"] < 1e-4 and row["parity"]["top1_agreement"] == 1.0


def test_bench_compiles_other_cpu_models_with_freezing():
    config = bench.BenchConfig("s12", "timm", "cpu", batch_size=1, resolution=64, compile=True)
    model = bench.prepare_model(config, compile_backend="eager", compile_mode=None)
    assert isinstance(model, Frozen)


@pytest.mark.slow
def test_bench_cli_fast_compile_row(tmp_path):
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(app, ["bench", "s12", "--device", "cpu", "--impl", "fast", "--compile",
                                      "--compile-backend", "aot_eager", "--batch-sizes", "1", "--resolutions", "64",
                                      "--warmup", "0", "--iters", "2", "--threads", "1", "--output", str(out)])
    assert result.exit_code == 0, result.output
    (row,) = json.loads(out.read_text())["results"]
    assert row["status"] == "ok" and row["compile"] and row["backend"] == "inductor" and row["compile_ms"] > 0


@pytest.mark.slow
def test_every_compiled_bench_row_compiles_past_dynamos_recompile_limit():
    """dynamo compiles one forward for at most 8 new instances, then runs the rest eagerly without a word;
    every bench row builds a new model, so a long sweep of compiled rows must not reach that limit."""
    graphs = []

    def counting_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    for batch in range(1, 12):
        config = bench.BenchConfig("s12", "ours", "cpu", batch_size=batch % 2 + 1, resolution=32, compile=True)
        model = bench.prepare_model(config, compile_backend=counting_backend)
        with torch.inference_mode():
            model(torch.randn(config.batch_size, 3, 32, 32))
    assert len(graphs) >= 11
