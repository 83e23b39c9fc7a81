"""The fast path (`poolformer.optimize`) on features-only models, the dense tasks' backbones: the four normalised
stage maps on every backend, map by map against the reference model, at the odd and non-square sizes detection
inputs have (800x1333 scaled down)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from poolformer import ConfigError, create_model, optimize
from poolformer.fast import cpu as fast_cpu
from poolformer.fast import fold
from poolformer.fast import runtime_backends
from poolformer.fast.compiled import FoldedGraph
from poolformer.fast.cuda import CapturedGraph, GraphCache
from poolformer.fast.folding import FeatureNorm
from poolformer.fast.triton import tiles
from poolformer.model import randomize_

from .conftest import marked_slow
from .test_fast import _photographs
from .test_fast_triton import _predicted_traffic

TOLERANCE = 1e-4  # fp32, relative to max(1, the map's largest |value|)
SIZES = [(2, 97, 131), (1, 100, 167)]  # odd and non-square; 800x1333 at 1/8


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def v1_backbone():
    return randomize_(create_model("s12", features_only=True), seed=1)


@pytest.fixture(scope="module")
def v2_backbone():
    return randomize_(create_model("v2_s12", features_only=True), seed=2)


def _backbone(family, v1_backbone, v2_backbone):
    return v1_backbone if family == "v1" else v2_backbone


def _assert_maps_as_exact_as_reference(model, maps: list[torch.Tensor], x: torch.Tensor) -> None:
    """Each fp32 map within TOLERANCE of the reference's (relative to max(1, max |value|)), or, where random
    weights grow activations so far that the fp32 reference itself is off by more, within twice the reference's
    own error of a float64 run."""
    with torch.no_grad():
        expected = model(x)
        exact = None
        assert len(maps) == len(expected) == 4
        for index, (got, want) in enumerate(zip(maps, expected)):
            assert got.dtype == torch.float32 and got.shape == want.shape, (index, got.shape, want.shape)
            got = got.cpu()
            scale = max(1.0, want.abs().max().item())
            if (got - want).abs().max().item() <= TOLERANCE * scale:
                continue
            exact = exact or copy.deepcopy(model).double()(x.double())
            error, reference_error = (got - exact[index]).abs().max().item(), (want - exact[index]).abs().max().item()
            assert error <= max(TOLERANCE * scale, 2 * reference_error), (index, error, reference_error)


def _assert_bf16_maps_close(model, maps: list[torch.Tensor], x: torch.Tensor) -> None:
    """bf16 maps as close to the fp32 reference as bf16 storage allows: measured 0.4-3% of the largest |value|
    at most and 0.3-2.5% on average (random v2 weights the worst); allowed 8% and 5%."""
    with torch.no_grad():
        expected = model(x)
    for got, want in zip(maps, expected, strict=True):
        assert got.shape == want.shape
        diff = (got.float().cpu() - want).abs()
        assert diff.max().item() <= 0.08 * want.abs().max().item()
        assert diff.mean().item() <= 0.05 * want.abs().mean().item()


# ------------------------------------------------------------------------------ folding and the output norm


def test_fold_keeps_one_output_norm_per_stage_and_no_head(v1_backbone, v2_backbone):
    for model, bias, eps in ((v1_backbone, True, 1e-5), (v2_backbone, False, 1e-6)):
        folded, plan = fold(model)
        assert plan.features_only and not plan.has_classifier and folded.head_weight is None
        assert [n.weight.shape[0] for n in folded.feature_norms] == list(model.arch.dims)
        assert all((n.bias is not None) == bias and n.eps == eps for n in folded.feature_norms)
        converted = folded.to(torch.bfloat16, "cpu")  # the norms' affines stay float32, as the head does
        assert all(n.weight.dtype == torch.float32 for n in converted.feature_norms)
    folded, plan = fold(randomize_(create_model("s12")))
    assert folded.feature_norms == () and not plan.features_only


@pytest.mark.parametrize("offset", [0.0, 100.0])
@pytest.mark.parametrize("bias", [True, False])
def test_output_norm_is_groupnorm_of_the_channels_last_map(offset, bias):
    """Also on a map far from zero mean, where E[x^2] - E[x]^2 in float32 (and PyTorch's channels-last
    group_norm) lose digits of the variance: within twice group_norm's own float32 error on NCHW."""
    x = torch.randn(3, 64, 13, 17) * 0.5 + offset
    weight, bias_vector = torch.randn(64), torch.randn(64) if bias else None
    norm = FeatureNorm(weight, bias_vector, 1e-5)
    exact = F.group_norm(x.double(), 1, weight.double(), None if bias_vector is None else bias_vector.double(), 1e-5)
    reference_error = (F.group_norm(x, 1, weight, bias_vector, 1e-5).double() - exact).abs().max().item()
    got = fast_cpu.feature_norm_forward(x.permute(0, 2, 3, 1).contiguous(), norm)
    assert got.shape == x.shape and got.is_contiguous(memory_format=torch.channels_last)
    assert (got.double() - exact).abs().max().item() <= max(2 * reference_error, 1e-6)
    low = fast_cpu.feature_norm_forward(x.permute(0, 2, 3, 1).contiguous().bfloat16(), norm)
    assert low.dtype == torch.bfloat16 and low.shape == x.shape
    rounded_input = F.group_norm(x.bfloat16().double(), 1, weight.double(),
                                 None if bias_vector is None else bias_vector.double(), 1e-5)
    # float32 inside, one rounding to bf16 at the end: within 2 bf16 ulps of the exact norm of the bf16 input
    assert (low.double() - rounded_input).abs().max().item() <= 2 * 2**-8 * rounded_input.abs().max().item()


# ------------------------------------------------------------------------------ the PyTorch-operator backends


@pytest.mark.parametrize("backend", ["onednn", "portable"])
@pytest.mark.parametrize("family", ["v1", "v2"])
@pytest.mark.parametrize(("batch", "height", "width"), SIZES)
def test_operator_backends_give_each_map_exactly(backend, family, batch, height, width, v1_backbone, v2_backbone):
    model = _backbone(family, v1_backbone, v2_backbone)
    fast = optimize(model, backend=backend)
    x = torch.randn(batch, 3, height, width)
    with torch.no_grad():
        maps = fast(x)
    assert fast.features_only and fast.backend_for(torch.float32) == backend
    assert all(m.is_contiguous(memory_format=torch.channels_last) for m in maps)
    _assert_maps_as_exact_as_reference(model, maps, x)


def test_forward_features_is_still_the_last_map_before_its_norm(v1_backbone):
    x = torch.randn(1, 3, 97, 131)
    with torch.no_grad():
        got, expected = optimize(v1_backbone, backend="portable").forward_features(x), v1_backbone.forward_features(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_a_stage_without_blocks_is_normalised_too():
    model = randomize_(create_model("s12", features_only=True, depths=(2, 0, 1, 1)), seed=5)
    x = torch.randn(2, 3, 75, 97)
    with torch.no_grad():
        maps = optimize(model, backend="portable")(x)
    _assert_maps_as_exact_as_reference(model, maps, x)


@pytest.mark.parametrize("backend", ["portable", pytest.param("onednn", marks=pytest.mark.skipif(
    not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="oneDNN has no bf16 on this CPU"))])
@pytest.mark.parametrize("family", ["v1", "v2"])
def test_bf16_maps_stay_close_to_fp32(backend, family, v1_backbone, v2_backbone):
    model = _backbone(family, v1_backbone, v2_backbone)
    x = _photographs(96)
    fast = optimize(model, backend=backend)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            maps = fast(x)
        explicit = optimize(model, dtype=torch.bfloat16, backend=backend)(x)
    assert all(m.dtype == torch.bfloat16 for m in maps)  # maps come in the compute dtype
    for a, b in zip(maps, explicit, strict=True):
        torch.testing.assert_close(a, b)  # autocast and dtype= take the same path
    _assert_bf16_maps_close(model, maps, x)


# ------------------------------------------------------------------------------ whole-graph backends


def _needs(runtime: str):
    return pytest.mark.skipif(not runtime_backends.available(runtime), reason=f"{runtime} is not installed")


def _runtime_cases() -> list:
    """Each runtime where installed; ONNX Runtime's per-shape exports (~9 s) only outside the quick loop."""
    return [pytest.param(r, marks=[_needs(r)] + ([pytest.mark.slow] if r == "onnxruntime" else []))
            for r in runtime_backends.RUNTIMES]


@pytest.mark.parametrize("runtime", _runtime_cases())
@pytest.mark.parametrize("family", marked_slow(["v1", "v2"], "v2"))
def test_runtime_backends_give_the_four_maps(runtime, family, v1_backbone, v2_backbone):
    model = _backbone(family, v1_backbone, v2_backbone)
    backend = runtime_backends.BACKEND_NAMES[runtime]
    fast = optimize(model, backend=backend)
    for batch, height, width in SIZES:  # one session per shape, each exact
        x = torch.randn(batch, 3, height, width)
        with torch.no_grad():
            maps = fast(x)
        _assert_maps_as_exact_as_reference(model, maps, x)
    assert fast.prepared(torch.float32, torch.device("cpu")).backend == backend


@_needs("openvino")
def test_auto_takes_openvino_for_backbones_as_for_classifiers(v1_backbone):
    fast = optimize(v1_backbone)
    assert fast.backend_for(torch.float32) == "openvino-folded"
    x = torch.randn(1, 3, 100, 167)
    with torch.no_grad():
        _assert_maps_as_exact_as_reference(v1_backbone, fast(x), x)


@_needs("openvino")
@pytest.mark.slow
@pytest.mark.skipif(not runtime_backends.runs("openvino", torch.bfloat16, torch.device("cpu")),
                    reason="OpenVINO computes bf16 only on CPUs with native bf16")
def test_openvino_bf16_maps_stay_close_to_fp32(v2_backbone):
    x = _photographs(96)
    with torch.no_grad():
        maps = optimize(v2_backbone, dtype=torch.bfloat16, backend="openvino-folded")(x)
    assert all(m.dtype == torch.float32 for m in maps)  # the runtimes hand back float32
    _assert_bf16_maps_close(v2_backbone, maps, x)


@_needs("openvino")
def test_openvino_graph_normalises_each_map_with_one_mvn(v1_backbone):
    from poolformer.fast.openvino_graph import build_model

    folded, plan = fold(v1_backbone)
    graph = build_model(folded, plan, (1, 3, 64, 64))
    kinds = [op.get_type_name() for op in graph.get_ordered_ops()]
    blocks = sum(len(stage.blocks) for stage in folded.stages)
    assert kinds.count("MVN") == 2 * blocks + 4 and "ReduceMean" not in kinds and "MatMul" not in kinds
    assert [o.get_any_name() for o in graph.outputs] == ["stage1", "stage2", "stage3", "stage4"]


@pytest.mark.parametrize("family", marked_slow(["v1", "v2"], "v1"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_compiled_backends_graph_gives_the_four_maps(family, dtype, v1_backbone, v2_backbone):
    """The inductor backend's folded graph, eagerly (every operator it hands the compiler), then traced by
    torch.compile's aot_eager backend (the same graph, no C++)."""
    model = _backbone(family, v1_backbone, v2_backbone)
    x = torch.randn(2, 3, 75, 97)
    with torch.no_grad():
        maps = FoldedGraph(*fold(model), dtype)(x)
        if dtype == torch.float32:
            _assert_maps_as_exact_as_reference(model, maps, x)
            traced = optimize(model).compile_with(compiler="aot_eager")(x)
            for a, b in zip(traced, maps, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        else:
            assert all(m.dtype == torch.bfloat16 for m in maps)
            _assert_bf16_maps_close(model, maps, x)


# ------------------------------------------------------------------------------ what the fast path refuses


@pytest.mark.parametrize(("name", "overrides", "message"), [
    ("s12", {"token_mixer": "dwconv"}, "pooling token mixers only"),
    ("s12_layernorm", {}, "needs GroupNorm in the blocks"),
    ("s12_pppa", {}, "pooling token mixers only"),
])
def test_backbones_the_fast_path_does_not_cover_are_one_line_config_errors(name, overrides, message):
    with pytest.raises(ConfigError, match=message) as caught:
        optimize(create_model(name, features_only=True, **overrides))
    assert "\n" not in str(caught.value)


# ------------------------------------------------------------------------------ Triton kernels


@pytest.mark.interpreter
@pytest.mark.parametrize("family", marked_slow(["v1", "v2"], "v2"))
def test_triton_kernels_give_each_map_exactly(kernel_device, family, v1_backbone, v2_backbone):
    """The stage's last block writes its output's partial moments; group_norm_kernel normalises the map from
    them. Odd, non-square maps whose samples share slots."""
    model = _backbone(family, v1_backbone, v2_backbone)
    fast = optimize(model, backend="triton")
    x = torch.randn(2, 3, 49, 75)
    with fast.recorder.record_traffic() as recorded, torch.no_grad():
        maps = fast(x.to(kernel_device))
    assert fast.backend_for(device=kernel_device) == "triton"
    _assert_maps_as_exact_as_reference(model, maps, x)
    assert [k.name for k in recorded].count("feature_norm") == 4 and "head" not in [k.name for k in recorded]
    assert list(recorded) == _predicted_traffic(fast, x.to(kernel_device), tiles=fast.tiles)


@pytest.mark.interpreter
@pytest.mark.parametrize("form", marked_slow(["split", "gemm"], "gemm"))
def test_triton_maps_on_the_other_mlp_forms(monkeypatch, kernel_device, form, v2_backbone):
    """Every block's MLP in the split form (cuBLAS GEMMs, then stats_kernel) or the GEMM form (statistics in
    fc2's epilogue or after it): the last block's partials serve the output norm just the same."""
    monkeypatch.setenv(tiles.MLP_ENV, form)
    fast = optimize(v2_backbone, backend="triton")
    x = torch.randn(2, 3, 45, 67)
    with fast.recorder.record_traffic() as recorded, torch.no_grad():
        maps = fast(x.to(kernel_device))
    _assert_maps_as_exact_as_reference(v2_backbone, maps, x)
    assert list(recorded) == _predicted_traffic(fast, x.to(kernel_device), tiles=fast.tiles)


@pytest.mark.interpreter
@pytest.mark.slow
def test_triton_bf16_maps_are_as_close_as_the_portable_paths(kernel_device, v1_backbone):
    x = torch.randn(1, 3, 49, 75, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = v1_backbone(x)
        triton = optimize(v1_backbone, dtype=torch.bfloat16, backend="triton")(x.to(kernel_device))
        portable = optimize(v1_backbone, dtype=torch.bfloat16, backend="portable")(x)
    for got, near, want in zip(triton, portable, reference, strict=True):
        assert got.dtype == torch.bfloat16
        error, portable_error = ((got.float().cpu() - want).abs().max().item(),
                                 (near.float() - want).abs().max().item())
        assert error <= 2 * portable_error + 1e-3, (error, portable_error)


@pytest.mark.interpreter
def test_triton_normalises_a_stage_without_blocks(kernel_device):
    model = randomize_(create_model("s12", features_only=True, depths=(1, 0, 1, 1)), seed=6)
    x = torch.randn(2, 3, 41, 37)
    with torch.no_grad():
        maps = optimize(model, backend="triton")(x.to(kernel_device))
    _assert_maps_as_exact_as_reference(model, maps, x)


def test_cuda_graph_cache_replays_a_list_of_maps():
    """A features-only model's forward gives a list: captured as a list of static outputs, replayed into them, and
    handed back as copies the next replay leaves alone."""
    def capture(forward, example):  # what a CUDA graph does, on the CPU
        static_input = example.clone()
        static_output = forward(static_input)

        def replay():
            for buffer, fresh in zip(static_output, forward(static_input)):
                buffer.copy_(fresh)

        return CapturedGraph(static_input, static_output, replay)

    cache = GraphCache(capture=capture, warmup_calls=1)
    for step in range(3):
        x = torch.full((2, 3), float(step))
        first, second = cache(lambda t: [t * 2, t + 1], x)
        torch.testing.assert_close(first, x * 2)
        torch.testing.assert_close(second, x + 1)
    assert cache.captures == 1
    kept = cache(lambda t: [t * 2, t + 1], torch.ones(2, 3))
    cache(lambda t: [t * 2, t + 1], torch.zeros(2, 3))
    torch.testing.assert_close(kept[0], torch.full((2, 3), 2.0))
