"""poolformer.implementations: every `--impl` builds, prepares and describes itself through one interface, and the
engines that run them (bench, predict, eval, profile) know no implementation by its type."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from poolformer.errors import ConfigError
from poolformer.implementations import (
    IMPLEMENTATIONS, Description, Implementation, Peer, Runtime, Target, implementation_for, resolution_kwargs,
)
from poolformer.runtimes.sessions import available

ROOT = Path(__file__).resolve().parent.parent


def _registered() -> list:
    """Every registered name, skipped where its runtime is not installed."""
    params = []
    for name, impl in IMPLEMENTATIONS.items():
        runtime = getattr(impl, "runtime", None)
        missing = runtime is not None and not available(runtime)
        params.append(pytest.param(name, marks=pytest.mark.skipif(missing, reason=f"{runtime} is not installed")))
    return params


def _seeded(impl: Implementation) -> nn.Module:
    torch.manual_seed(0)
    return impl.build("s12")


@pytest.mark.parametrize("name", _registered())
def test_every_implementation_builds_prepares_and_describes_itself(name):
    impl = IMPLEMENTATIONS[name]
    target = Target("cpu", batch_size=2, resolution=64)
    module = impl.prepare(_seeded(impl), target)
    reference = IMPLEMENTATIONS[impl.reference]
    expected_module = reference.prepare(_seeded(reference), Target("cpu"))
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        got, expected = module(x), expected_module(x)
    assert got.shape == (2, 1000) and not module.training
    assert (got - expected).abs().max().item() < 1e-4 * max(1.0, expected.abs().max().item())  # same weights
    described = impl.describe(module, target)
    assert isinstance(described, Description) and described.compile_mode is None and described.input_size is None
    assert (described.backend is not None) == (name == "fast")  # only the fast path picks kernels of its own


@pytest.mark.parametrize("name", ["ours", "fast"])
def test_prepare_casts_converts_the_memory_format_and_compiles(name):
    impl = IMPLEMENTATIONS[name]
    target = Target("cpu", "bf16", cast=True, channels_last=True, compile=True, compile_backend="eager",
                    batch_size=1, resolution=64)
    assert target.cast_dtype == torch.bfloat16 and Target("cpu", "bf16").cast_dtype is None  # autocast: no cast
    module = impl.prepare(_seeded(impl), target)
    if name == "fast":  # runs the cast dtype throughout and compiles its folded graph
        assert module.dtype == torch.bfloat16 and module.backend == "inductor" and module.compiler == "eager"
    else:  # weights in bf16, compiled with inductor's freezing on the CPU
        from poolformer.fast.compiled import Frozen

        assert isinstance(module, Frozen) and next(module.parameters()).dtype == torch.bfloat16
        assert next(p for p in module.parameters() if p.ndim == 4).is_contiguous(memory_format=torch.channels_last)
    assert impl.describe(module, target).compile_mode == "default"


def test_a_module_the_fast_path_did_not_build_is_prepared_and_described_like_ours():
    """bench's build_model may hand any module for a row (a wrapped or patched model): nothing of the fast path's
    own is asked of it."""
    fast, target = IMPLEMENTATIONS["fast"], Target("cpu", "bf16", cast=True, batch_size=1, resolution=64)
    module = fast.prepare(nn.Linear(3, 4), target)
    assert module.weight.dtype == torch.bfloat16
    assert fast.describe(module, target) == Description()


def test_requests_resolve_to_the_implementation_that_runs_them():
    assert implementation_for("s12", "fast") is IMPLEMENTATIONS["fast"]
    assert implementation_for("s12", "ours", "w.pth") is IMPLEMENTATIONS["ours"]  # a checkpoint loads into ours
    for weights, impl, runtime in (("m.onnx", "ours", "onnxruntime"), ("m.onnx", "openvino", "openvino"),
                                   ("m.xml", "ours", "openvino")):
        chosen = implementation_for("s12", impl, weights)
        assert isinstance(chosen, Runtime) and chosen.runtime == runtime
    peer = implementation_for("timm:resnet10t", "timm")
    assert isinstance(peer, Peer) and peer.reference == "timm"  # a peer row is its own reference
    for name, impl, weights, message in (("s12", "tvm", None, "unknown implementation 'tvm'"),
                                         ("timm:resnet10t", "fast", None, "runs PoolFormer models only"),
                                         ("s12", "onnxruntime", "m.xml", "runs with --impl openvino"),
                                         ("s12", "fast", "m.onnx", "runs with --impl onnxruntime or openvino")):
        with pytest.raises(ConfigError, match=message):
            implementation_for(name, impl, weights)


def test_a_peer_builds_prepares_and_describes_itself():
    peer = implementation_for("timm:resnet10t")
    module = peer.prepare(peer.build("timm:resnet10t", num_classes=7), Target("cpu"))
    with torch.inference_mode():
        assert module(torch.randn(1, 3, 64, 64)).shape == (1, 7)
    assert peer.describe(module, Target("cpu")) == Description()
    with pytest.raises(ConfigError, match="random weights"):
        peer.build("timm:resnet10t", weights="w.pth")


def test_models_are_sized_for_the_resolution_only_where_their_shape_depends_on_it():
    assert resolution_kwargs("s12", 288) == {} and resolution_kwargs("s12_pppa", 288) == {}  # any size runs
    assert resolution_kwargs("s12_random", 288) == {"img_size": 288}  # a token-count sized mixing matrix
    assert resolution_kwargs("timm:vit_tiny_patch16_224", 288) == {"img_size": 288}  # a fixed token grid


ENGINES = [*(f"poolformer/bench/{p.name}" for p in sorted((ROOT / "poolformer" / "bench").glob("*.py"))),
           "poolformer/predict.py", "poolformer/evaluate.py", "poolformer/profiling.py",
           "poolformer_cli/bench.py", "poolformer_cli/predict.py", "poolformer_cli/evaluate.py",
           "poolformer_cli/common.py"]
CONCRETE = ("FastPoolFormer", "RuntimeModule", "Frozen", "compile_with", "backend_for", "backend_note(", ".signature",
            '"signature"')


@pytest.mark.parametrize("path", ENGINES)
def test_the_engines_know_no_implementation_by_its_type(path):
    """bench, predict, eval and profile (and their commands) run every implementation through the interface: no
    check of a concrete class, and none of a concrete module's own methods."""
    text = (ROOT / path).read_text()
    assert [name for name in CONCRETE if name in text] == []
