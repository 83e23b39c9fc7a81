"""The fast inference path (`poolformer.optimize`, `--impl fast`) against the reference model.

Every algebraic rewrite is checked on its own against the reference modules with randomised weights, then
whole models of every v1/v2 size, odd resolutions and batch sizes; bf16 against fp32 on real photographs.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from poolformer import ConfigError, create_model, list_models, optimize
from poolformer.capabilities import cpu_capabilities
from poolformer.fast import fold, pool_minus_identity_weight
from poolformer.fast import cpu as fast_cpu
from poolformer.fast import runtime_backends
from poolformer.fast.cpu import block_forward, head_forward, per_sample_inv_sigma, pool_minus_identity, pool_mix
from poolformer.implementations import IMPLEMENTATIONS, build
from poolformer.model import randomize_
from poolformer_cli.app import app

from .conftest import marked_slow

TOLERANCE = 1e-4  # fp32 logits, absolute


def _nhwc(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 2, 3, 1).contiguous()


def _assert_as_exact_as_reference(model, x: torch.Tensor, features: bool = False, backend: str = "onednn",
                                  fast=None) -> None:
    """Fast fp32 output (of `fast`, or of the model optimized for `backend`) within TOLERANCE of the reference's,
    or (where random weights grow activations so far that the fp32 reference itself is that far off) within
    TOLERANCE, or twice the reference's own fp32 error, of a float64 run of the reference."""
    run = (lambda m, t: m.forward_features(t)) if features else (lambda m, t: m(t))
    with torch.no_grad():
        got, expected = run(fast or optimize(model, backend=backend), x), run(model, x)
        assert got.dtype == torch.float32 and got.shape == expected.shape
        if (got - expected).abs().max().item() < TOLERANCE:
            return
        exact = run(copy.deepcopy(model).double(), x.double())
    fast_error, reference_error = (got - exact).abs().max().item(), (expected - exact).abs().max().item()
    assert fast_error <= max(TOLERANCE, 2 * reference_error), (fast_error, reference_error)


@pytest.fixture(autouse=True)
def _seeded():
    """Random inputs, but the same ones on every run: a failure here is reproducible."""
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def v1_model():
    return randomize_(create_model("s12"), seed=1)


@pytest.fixture(scope="module")
def v2_model():
    return randomize_(create_model("v2_s12"), seed=2)


# ------------------------------------------------------------------------------ the algebra, step by step


def test_inv_sigma_is_groupnorm_statistic_with_eps_inside_the_root():
    x = torch.randn(3, 8, 5, 7) * 0.01 + 0.3  # variance ~1e-4: eps=1e-3 changes sigma a lot
    var = x.var(dim=(1, 2, 3), unbiased=False)
    expected = 1 / torch.sqrt(var + 1e-3)
    torch.testing.assert_close(per_sample_inv_sigma(x, 1e-3), expected, rtol=1e-4, atol=0)
    # the same statistic group_norm uses: standardising with it reproduces F.group_norm
    inv = per_sample_inv_sigma(x, 1e-3)
    mean = x.mean(dim=(1, 2, 3))
    manual = (x - mean.view(-1, 1, 1, 1)) * inv.view(-1, 1, 1, 1)
    torch.testing.assert_close(manual, F.group_norm(x, 1, eps=1e-3), rtol=1e-4, atol=1e-4)


# (onednn, BORDER_GATHER_MAX_ELEMENTS) choosing each way pool(x) - x is computed (oneDNN: avg_pool2d on the
# small maps of these tests; otherwise the depthwise convolution with either border fix)
POOL_PATHS = {"depthwise, border gathered": (False, 1 << 40), "depthwise, border in bands": (False, 0),
              "oneDNN, avg_pool": (True, 0)}


def _use_pool_path(monkeypatch, path: str) -> bool:
    """Set the border limit for `path`; returns the `onednn` argument that takes it."""
    onednn, border_limit = POOL_PATHS[path]
    monkeypatch.setattr(fast_cpu, "AVG_POOL_MAX_ELEMENTS", 1 << 40)
    monkeypatch.setattr(fast_cpu, "BORDER_GATHER_MAX_ELEMENTS", border_limit)
    return onednn


@pytest.mark.parametrize("path", POOL_PATHS)
@pytest.mark.parametrize("pool_size", [1, 3, 5, 9])
@pytest.mark.parametrize(("height", "width"), [(7, 6), (1, 5), (3, 11), (4, 4)])
def test_pool_minus_identity_is_avg_pool_without_padding_on_every_path(monkeypatch, path, pool_size, height, width):
    onednn = _use_pool_path(monkeypatch, path)
    x = torch.randn(2, 5, height, width)
    expected = F.avg_pool2d(x, pool_size, 1, pool_size // 2, count_include_pad=False) - x
    got = pool_minus_identity(_nhwc(x), pool_minus_identity_weight(5, pool_size), onednn)
    torch.testing.assert_close(got, _nhwc(expected), rtol=1e-5, atol=1e-5)
    assert got.is_contiguous()  # channels-last [B, H, W, C] in memory, as the next operators expect


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_both_border_paths_give_the_same_bits(monkeypatch, dtype):
    x = _nhwc(torch.randn(3, 64, 23, 17)).to(dtype)
    weight = pool_minus_identity_weight(64, 3).to(dtype)
    results = []
    for path in ("depthwise, border gathered", "depthwise, border in bands"):
        _use_pool_path(monkeypatch, path)
        results.append(pool_minus_identity(x, weight))
    assert torch.equal(*results)


def test_onednn_takes_avg_pool_on_small_maps_only_and_the_portable_path_never(monkeypatch):
    calls, avg_pool2d = [], F.avg_pool2d
    monkeypatch.setattr(fast_cpu.F, "avg_pool2d", lambda *a, **k: calls.append("avg_pool") or avg_pool2d(*a, **k))
    weight = pool_minus_identity_weight(64, 3)
    for side in (14, 56):  # 12.5k and 200k elements: either side of the limit
        before = len(calls)
        pool_minus_identity(torch.randn(1, side, side, 64), weight, onednn=True)
        assert (len(calls) > before) == (side * side * 64 <= fast_cpu.AVG_POOL_MAX_ELEMENTS)
    assert calls == ["avg_pool"]
    pool_minus_identity(torch.randn(1, 14, 14, 64), weight)  # portable: the Triton kernels' rounding points
    assert calls == ["avg_pool"]


@pytest.mark.parametrize("path", POOL_PATHS)
def test_pool_in_bf16_is_within_bf16_rounding(monkeypatch, path):
    onednn = _use_pool_path(monkeypatch, path)
    x = torch.randn(2, 8, 9, 10, generator=torch.Generator().manual_seed(0)).bfloat16().float()  # exact in bf16
    expected = F.avg_pool2d(x, 3, 1, 1, count_include_pad=False) - x
    got = pool_minus_identity(_nhwc(x).bfloat16(), pool_minus_identity_weight(8, 3).bfloat16(), onednn)
    # corners average 4 of 9 positions: the rescale (add, multiply by 9/4, subtract, each rounded to bf16)
    # amplifies rounding at most 9/4 times; allow 4 bf16 ulps of the largest input at that scale
    torch.testing.assert_close(got.float(), _nhwc(expected), rtol=0, atol=9 / 4 * 4 * 2**-8 * x.abs().max().item())


@pytest.mark.parametrize("family", ["v1", "v2"])
@pytest.mark.parametrize("eps", [None, 0.05])
def test_pool_mixer_needs_only_sigma(family, eps, v1_model, v2_model):
    """res_scale1 * x + ls1 * (pool(GN(x)) - GN(x)) == skip * x + (ls1 * gamma / sigma) * (pool(x) - x)."""
    model = v1_model if family == "v1" else v2_model
    block = model.stages[2].blocks[0]  # v2: the stage with ResScale
    original_eps = block.norm1.eps
    x = torch.randn(2, block.norm1.weight.shape[0], 9, 11) * 0.1 + 0.5  # small variance: eps matters
    try:
        if eps is not None:
            block.norm1.eps = eps
        folded_block = fold(model)[0].stages[2].blocks[0]
        with torch.no_grad():
            expected = block.res_scale1(x) + block.layer_scale1(block.token_mixer(block.norm1(x)))
        weight = fold(model)[0].stages[2].pool_minus_identity
        got = pool_mix(_nhwc(x), folded_block, weight)
    finally:
        block.norm1.eps = original_eps
    torch.testing.assert_close(got, _nhwc(expected), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["v1", "v2"])
def test_whole_block_with_folded_norm_scales_and_activation(family, v1_model, v2_model):
    model = v1_model if family == "v1" else v2_model
    folded, plan = fold(model)
    for stage_index in (0, 3):  # v2: without and with ResScale
        block = model.stages[stage_index].blocks[1]
        x = torch.randn(2, block.norm1.weight.shape[0], 7, 6)
        with torch.no_grad():
            expected = block(x)
        stage = folded.stages[stage_index]
        got = block_forward(_nhwc(x), stage.blocks[1], stage.pool_minus_identity, plan)
        # random v2 weights grow the last stage's values to ~1e3, where fp32 itself is only good to ~1e-3
        torch.testing.assert_close(got, _nhwc(expected), rtol=1e-4, atol=1e-6 * expected.abs().max().item())


@pytest.mark.parametrize("family", ["v1", "v2"])
def test_head_norm_folds_into_classifier(family, v1_model, v2_model):
    model = v1_model if family == "v1" else v2_model
    folded, plan = fold(model)
    x = torch.randn(3, model.arch.dims[-1], 3, 4) * 2 + 1
    with torch.no_grad():
        expected = model.forward_head(x)
    torch.testing.assert_close(head_forward(_nhwc(x), folded, plan), expected, rtol=1e-4, atol=1e-4)


def test_mlp_in_row_chunks_equals_one_pass(monkeypatch, v2_model):
    x = torch.randn(2, 3, 64, 64)
    fast = optimize(v2_model)
    with torch.no_grad():
        one_pass = fast(x)
        monkeypatch.setattr(fast_cpu, "MLP_SINGLE_PASS_MAX_BYTES", 0)
        monkeypatch.setattr(fast_cpu, "MLP_CHUNK_BYTES", 4096)  # uneven chunks of a few rows
        chunked = fast(x)
    assert (chunked - one_pass).abs().max().item() < TOLERANCE


@pytest.mark.parametrize("family", ["v1", pytest.param("v2", marks=pytest.mark.slow)])
def test_portable_path_without_onednn_matches(monkeypatch, family, v1_model, v2_model):
    """The plain-PyTorch MLP (used off CPU, or where oneDNN is missing) gives the same logits too."""
    monkeypatch.setenv("POOLFORMER_FAST_BACKEND", "portable")
    _assert_as_exact_as_reference(v1_model if family == "v1" else v2_model, torch.randn(2, 3, 64, 48))


@pytest.mark.slow
def test_each_norms_own_eps_is_used():
    model = randomize_(create_model("s12"), seed=4)
    model.stages[1].blocks[0].norm1.eps = 0.5  # large enough to move the logits far beyond the tolerance
    model.stages[2].blocks[3].norm2.eps = 0.3
    _assert_as_exact_as_reference(model, torch.randn(2, 3, 64, 64))


def test_fold_leaves_reference_model_untouched(v2_model):
    before = {k: v.clone() for k, v in v2_model.state_dict().items()}
    optimize(v2_model)
    assert all(torch.equal(before[k], v) for k, v in v2_model.state_dict().items())


# ------------------------------------------------------------------------------ whole models


@pytest.mark.parametrize("family", ["v1", "v2"])
@pytest.mark.parametrize(("batch", "resolution"),
                         [(1, 64), (3, 97), pytest.param(2, 225, marks=pytest.mark.slow), (1, 33)])
def test_logits_match_reference(family, batch, resolution, v1_model, v2_model):
    model = v1_model if family == "v1" else v2_model
    _assert_as_exact_as_reference(model, torch.randn(batch, 3, resolution, resolution))


@pytest.mark.slow
def test_logits_match_reference_at_224(v1_model):
    _assert_as_exact_as_reference(v1_model, torch.randn(2, 3, 224, 224))


OTHER_SIZES = [n for n in list_models("v1") + list_models("v2") if not n.endswith("s12")]


@pytest.mark.parametrize("name", marked_slow(OTHER_SIZES, *OTHER_SIZES[1:]))
def test_every_size_matches_reference(name):
    _assert_as_exact_as_reference(randomize_(create_model(name), seed=3), torch.randn(1, 3, 64, 64))


@pytest.mark.slow
def test_features_and_headless_models_match(v2_model):
    x = torch.randn(2, 3, 64, 80)
    _assert_as_exact_as_reference(v2_model, x, features=True)
    _assert_as_exact_as_reference(randomize_(create_model("s12", num_classes=0)), x)


@pytest.mark.parametrize("variant", marked_slow(["poolformer_s12_pool5", "poolformer_s12_relu", "poolformer_s12_silu"],
                                                 "poolformer_s12_pool5", "poolformer_s12_silu"))
def test_supported_ablations_match(variant):
    _assert_as_exact_as_reference(randomize_(create_model(variant)), torch.randn(1, 3, 64, 64))


@pytest.mark.parametrize(("name", "overrides"), [("s12", {"token_mixer": "dwconv"}), ("s12_layernorm", {}),
                                                 ("s12_pppa", {}), ("s12_batchnorm", {})])
def test_unsupported_models_raise_config_error(name, overrides):
    with pytest.raises(ConfigError, match="fast path"):
        optimize(create_model(name, **overrides))


def test_rejects_non_metaformer_and_bad_input(v1_model):
    with pytest.raises(ConfigError):
        optimize(torch.nn.Linear(2, 2))
    with pytest.raises(ConfigError, match="expected images"):
        optimize(v1_model)(torch.randn(1, 4, 32, 32))


# ------------------------------------------------------------------------------ the runtime backends


def _needs(runtime: str):
    return pytest.mark.skipif(not runtime_backends.available(runtime), reason=f"{runtime} is not installed")


@pytest.mark.parametrize("runtime", [pytest.param(r, marks=_needs(r)) for r in runtime_backends.RUNTIMES])
@pytest.mark.parametrize("family", ["v1", "v2"])
@pytest.mark.parametrize(("batch", "height", "width"), [(1, 64, 64), pytest.param(3, 97, 75, marks=pytest.mark.slow)])
def test_runtime_backends_run_the_folded_graph_exactly(runtime, family, batch, height, width, v1_model, v2_model):
    model = v1_model if family == "v1" else v2_model
    backend = runtime_backends.BACKEND_NAMES[runtime]
    _assert_as_exact_as_reference(model, torch.randn(batch, 3, height, width), backend=backend)


def test_the_runtime_backends_are_named_apart_from_the_runtime_implementations():
    """`--impl openvino` runs OpenVINO's conversion of the reference model; the fast path's backend on OpenVINO runs
    its folded graph: one name each, everywhere (the backend a bench row reports, POOLFORMER_FAST_BACKEND)."""
    from poolformer.implementations import IMPLEMENTATIONS
    from poolformer.settings import SETTINGS

    names = set(runtime_backends.BACKEND_NAMES.values())
    assert names == {"openvino-folded", "onnxruntime-folded"} and not names & set(IMPLEMENTATIONS)
    assert set(SETTINGS["POOLFORMER_FAST_BACKEND"].choices).isdisjoint(IMPLEMENTATIONS)


@_needs("openvino")
@pytest.mark.parametrize("name", marked_slow(
    ["poolformer_s12_pool5", "poolformer_s12_relu", "poolformer_s12_silu", "headless"], "poolformer_s12_silu"))
def test_openvino_graph_matches_reference_for_every_supported_form(name):
    """The graph built from OpenVINO's operators (poolformer.fast.openvino_graph) for the forms the v1/v2 tests
    above do not reach: other pool sizes and activations, and a model without a classifier."""
    model = create_model("s12", num_classes=0) if name == "headless" else create_model(name)
    _assert_as_exact_as_reference(randomize_(model, seed=4), torch.randn(2, 3, 64, 80), backend="openvino-folded")


@_needs("openvino")
@pytest.mark.parametrize("family", ["v1", pytest.param("v2", marks=pytest.mark.slow)])
def test_openvino_graph_stays_exact_reshaped_to_each_new_shape(family, v1_model, v2_model):
    """One fast model meeting new batch sizes and resolutions reshapes the graph it built first (the runtime
    module builds once) and stays as exact at each."""
    model = v1_model if family == "v1" else v2_model
    fast = optimize(model, backend="openvino-folded")
    for shape in [(1, 3, 64, 64), (3, 3, 97, 75), (2, 3, 64, 80), (1, 3, 64, 64)]:
        _assert_as_exact_as_reference(model, torch.randn(shape), fast=fast)


@_needs("openvino")
@pytest.mark.parametrize("family", ["v1", "v2"])
def test_openvino_graph_is_one_mvn_per_norm(family, v1_model, v2_model):
    """Each GroupNorm(1) (and v2's channel LayerNorms) is one MVN node: no ReduceMean chains left but the head's
    spatial mean."""
    from poolformer.fast.openvino_graph import build_model

    folded, plan = fold(v1_model if family == "v1" else v2_model)
    kinds = [op.get_type_name() for op in build_model(folded, plan, (1, 3, 64, 64)).get_ordered_ops()]
    blocks = sum(len(stage.blocks) for stage in folded.stages)
    channel_norms = 0 if family == "v1" else 1 + (len(folded.stages) - 1)  # v2: after the stem, before downsampling
    assert kinds.count("MVN") == 2 * blocks + channel_norms + 1  # + the head's norm
    assert kinds.count("ReduceMean") == 1 and kinds.count("AvgPool") == blocks


@_needs("openvino")
@pytest.mark.parametrize("offset", [0.0, 100.0])
def test_openvino_mvn_statistics_are_as_accurate_as_torch_group_norm(offset):
    """The standardisation the graph relies on, on maps far from zero mean (where E[x^2] - E[x]^2 in float32 loses
    three digits of the variance): within twice PyTorch's own group_norm error of a float64 standardisation."""
    import openvino as ov

    from poolformer.fast.openvino_graph import ALL_BUT_BATCH, _Builder
    from poolformer.runtimes.sessions import openvino_core

    builder = _Builder()
    images = builder.ops.parameter([3, 64, 13, 17], ov.Type.f32)
    graph = ov.Model([builder.standardise(images, ALL_BUT_BATCH, 1e-5)], [images])
    x = torch.randn(3, 64, 13, 17) * 0.5 + offset
    exact = F.group_norm(x.double(), 1, eps=1e-5)
    got = torch.from_numpy(openvino_core().compile_model(graph, "CPU").create_infer_request().infer({0: x.numpy()})[0])
    torch_error = (F.group_norm(x, 1, eps=1e-5).double() - exact).abs().max().item()
    assert (got.double() - exact).abs().max().item() <= max(2 * torch_error, 1e-6)


@pytest.mark.slow
@_needs("openvino")
def test_openvino_is_the_default_cpu_backend_and_features_fall_back(v2_model):
    fast = optimize(v2_model)
    assert fast.backend_for(torch.float32) == "openvino-folded"
    native = cpu_capabilities().native_bf16  # OpenVINO's bf16 is only ever the native one
    assert (fast.backend_for(torch.bfloat16) == "openvino-folded") == native  # else oneDNN or the portable path
    x = torch.randn(2, 3, 64, 64)
    _assert_as_exact_as_reference(v2_model, x, features=True, backend="auto")  # maps: oneDNN, not the runtime
    with torch.no_grad():
        logits = fast(x)
    session = fast.prepared(torch.float32, x.device).session
    assert fast.prepared(torch.float32, x.device).backend == "openvino-folded" and logits.shape == (2, 1000)
    assert len(session._runners) == 1  # one export and compiled model per input shape
    fast(torch.randn(1, 3, 64, 64))
    assert len(session._runners) == 2


@_needs("openvino")
@pytest.mark.skipif(not cpu_capabilities().native_bf16, reason="OpenVINO computes bf16 only on CPUs with native bf16")
def test_openvino_bf16_computes_in_bf16(v1_model):
    """Not a float32 run under a bf16 label: its logits differ from fp32 by bf16 rounding (the agreement tests
    below bound how much)."""
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        got, fp32 = optimize(v1_model, dtype=torch.bfloat16, backend="openvino-folded")(x), v1_model(x)
    assert got.dtype == torch.float32 and (got - fp32).abs().max().item() > 1e-4 * fp32.abs().max().item()


@pytest.mark.parametrize("backend", runtime_backends.BACKEND_NAMES.values())
def test_asking_for_a_runtime_where_it_cannot_run_is_a_config_error(backend, v1_model, monkeypatch):
    from poolformer.capabilities import CpuCapabilities

    monkeypatch.setattr("poolformer.capabilities.cpu_capabilities", lambda: CpuCapabilities(
        model="Test CPU", architecture="x86_64", isa=("avx2",), torch_vector_isa=None, onednn=True,
        onednn_bf16=False, onednn_fp16=False))
    for dtype in (torch.bfloat16, torch.float16):
        with pytest.raises(ConfigError, match=f"{backend} backend runs float32"):
            optimize(v1_model, dtype=dtype, backend=backend)(torch.randn(1, 3, 32, 32))


# ------------------------------------------------------------------------------ bf16


def _photographs(size: int = 160) -> torch.Tensor:
    """scikit-image's astronaut, chelsea (a cat) and coffee, resized and ImageNet-normalised: [3, 3, size, size]."""
    skimage_data = pytest.importorskip("skimage.data")
    images = []
    for name in ("astronaut", "chelsea", "coffee"):
        pixels = torch.from_numpy(getattr(skimage_data, name)()).permute(2, 0, 1).float()[None] / 255
        images.append(F.interpolate(pixels, size=(size, size), mode="bilinear", antialias=True))
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (torch.cat(images) - mean) / std


def _agree_or_near_tie(reference: torch.Tensor, other: torch.Tensor, tie: float) -> bool:
    """Same top-1 per row, unless fp32 itself rates the two choices within `tie` of each other."""
    chosen = other.argmax(1)
    gap = reference.max(1).values - reference.gather(1, chosen[:, None])[:, 0]
    return bool(((chosen == reference.argmax(1)) | (gap < tie)).all())


ONEDNN_BF16 = pytest.param("onednn", marks=pytest.mark.skipif(
    not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="oneDNN has no bf16 on this CPU (needs AVX-512 or AVX-NE-CONVERT)"))
OPENVINO_BF16 = pytest.param("openvino-folded", marks=pytest.mark.skipif(
    not runtime_backends.runs("openvino", torch.bfloat16, torch.device("cpu")),
    reason="OpenVINO computes bf16 only on CPUs with native bf16 (and where it is installed)"))
# auto: OpenVINO where it computes bf16, else oneDNN where it runs bf16, else the portable path
BF16_BACKENDS = ["auto", "portable", ONEDNN_BF16, OPENVINO_BF16]


@pytest.mark.parametrize("backend", BF16_BACKENDS)
@pytest.mark.parametrize("family", ["v1", pytest.param("v2", marks=pytest.mark.slow)])
def test_bf16_autocast_agrees_with_fp32_on_photographs(family, backend, v1_model, v2_model):
    model = v1_model if family == "v1" else v2_model
    x = _photographs()
    fast = optimize(model, backend=backend)
    with torch.no_grad():
        expected = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = fast(x)
        explicit = optimize(model, dtype=torch.bfloat16, backend=backend)(x)
    assert got.dtype == torch.float32
    assert fast.prepared(torch.bfloat16, x.device).backend == fast.backend_for(torch.bfloat16)
    torch.testing.assert_close(got, explicit)  # autocast and dtype= take the same path
    assert (got - expected).abs().max().item() < 0.1 * expected.std().item()
    assert _agree_or_near_tie(expected, got, tie=0.01 * expected.std().item())


@pytest.mark.parametrize("backend", BF16_BACKENDS)
def test_bf16_top1_agreement_on_random_inputs(backend, v2_model):
    x = torch.randn(64, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = v2_model(x).argmax(1)
        got = optimize(v2_model, dtype=torch.bfloat16, backend=backend)(x).argmax(1)
    assert (got == expected).float().mean().item() >= 0.9


def test_fp16_runs_on_the_portable_path_and_agrees(v1_model):
    x = _photographs(96)
    with torch.no_grad():
        expected = v1_model(x)
        fast = optimize(v1_model, dtype=torch.float16)
        got = fast(x)
    assert fast.backend_for(torch.float16) == "portable" and got.dtype == torch.float32
    assert _agree_or_near_tie(expected, got, tie=0.01 * expected.std().item())


@pytest.mark.parametrize("family", ["v1", "v2"])
def test_onednn_and_portable_paths_agree_in_fp32(family, v1_model, v2_model):
    """Both CPU paths run on every host in fp32; they differ only in matmul kernels' rounding."""
    model = v1_model if family == "v1" else v2_model
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        onednn, portable = optimize(model, backend="onednn")(x), optimize(model, backend="portable")(x)
    assert optimize(model, backend="onednn").backend_for(torch.float32) == "onednn"
    assert (onednn - portable).abs().max().item() < TOLERANCE * max(1.0, onednn.abs().max().item())


@pytest.mark.parametrize("family", ["v1", "v2"])
def test_onednn_packed_convolutions_equal_plain_ones_per_input_shape(monkeypatch, family, v1_model, v2_model):
    """The stem and downsampling convolutions run on weights packed once per input shape; the result is the
    plain convolution's up to the kernels' rounding, for every shape met, and the cache starts again past its
    bound."""
    import dataclasses

    model = v1_model if family == "v1" else v2_model
    fast, plain = optimize(model, backend="onednn"), optimize(model, backend="onednn")
    cpu_device = torch.device("cpu")
    prepared = plain.prepared(torch.float32, cpu_device)
    plain._cache[(torch.float32, cpu_device)] = dataclasses.replace(prepared, packs=None)
    packs = fast.prepared(torch.float32, cpu_device).packs
    dense_convs = 1 + sum(stage.down_weight is not None for stage in fast.folded.stages)
    with torch.no_grad():
        for shape in [(2, 3, 64, 80), (1, 3, 97, 65), (2, 3, 64, 80)]:
            x = torch.randn(*shape)
            got, expected = fast(x), plain(x)
            assert (got - expected).abs().max().item() < TOLERANCE * max(1.0, expected.abs().max().item())
        assert len(packs) == 2 * dense_convs  # one packed weight per convolution and distinct shape
        monkeypatch.setattr(fast_cpu.ConvPacks, "MAX_ENTRIES", dense_convs + 1)
        x = torch.randn(1, 3, 48, 48)
        got, expected = fast(x), plain(x)
        assert (got - expected).abs().max().item() < TOLERANCE * max(1.0, expected.abs().max().item())
        assert len(packs) <= dense_convs + 1


# ------------------------------------------------------------------------------ --impl fast


def test_registered_as_implementation():
    assert "fast" in IMPLEMENTATIONS
    model = build("s12", "fast")
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


@pytest.mark.slow
def test_bench_cli_runs_fast_impl(tmp_path):
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(app, ["bench", "s12", "--device", "cpu", "--impl", "ours,fast", "--batch-sizes", "1",
                                      "--resolutions", "64", "--warmup", "1", "--iters", "2", "--threads", "1",
                                      "--precision", "fp32,bf16", "--output", str(out)])
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())["results"]
    assert {(r["impl"], r["precision"]) for r in rows if r["status"] == "ok"} == {
        (impl, precision) for impl in ("ours", "fast") for precision in ("fp32", "bf16")}


@pytest.mark.slow
def test_predict_cli_with_fast_impl_matches_ours(tmp_path, s12_checkpoint):
    from PIL import Image

    image = tmp_path / "noise.png"
    Image.fromarray((torch.rand(80, 96, 3) * 255).byte().numpy()).save(image)
    outputs = {}
    for impl in ("ours", "fast"):
        result = CliRunner().invoke(app, ["predict", str(image), "--weights", str(s12_checkpoint), "--device", "cpu",
                                          "--impl", impl, "--json", "--top-k", "3"])
        assert result.exit_code == 0, result.output
        outputs[impl] = json.loads(result.stdout)
    fast, ours = outputs["fast"][0]["predictions"], outputs["ours"][0]["predictions"]
    assert [p["index"] for p in fast] == [p["index"] for p in ours]
    assert [p["probability"] for p in fast] == pytest.approx([p["probability"] for p in ours], abs=1e-5)


def test_unsupported_model_through_cli_is_one_line_error():
    result = CliRunner().invoke(app, ["bench", "s12_dwconv", "--device", "cpu", "--impl", "fast", "--batch-sizes", "1",
                                      "--resolutions", "64", "--iters", "1", "--warmup", "0"])
    assert result.exit_code != 0
    assert "fast path" in result.output and "Traceback" not in result.output
