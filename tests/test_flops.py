"""`poolformer flops`: our counts against fvcore, thop, torch FlopCounterMode, timm and hand-derived figures."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from poolformer import Size, create_model
from poolformer.flops import (
    count_all,
    count_analytic,
    count_fvcore,
    count_thop,
    count_torch,
    model_for_resolution,
)
from poolformer.zoo import MODELS, get_spec, list_models
from poolformer_cli.app import app
from tests.conftest import assert_one_line_error

runner = CliRunner()


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
G = 1e9


def _input(resolution: int, batch: int = 1, device: str = "cpu") -> torch.Tensor:
    return torch.randn(batch, 3, resolution, resolution, device=device)


def _sides(resolution: int) -> list[int]:
    """Map side of each stage: stem 7x7/4 pad 2, then 3x3/2 pad 1 convs."""
    side = (resolution + 4 - 7) // 4 + 1
    sides = [side]
    for _ in range(3):
        side = (side + 2 - 3) // 2 + 1
        sides.append(side)
    return sides


def _v1_dense_macs(name: str, resolution: int) -> int:
    """Multiply-accumulates of a PoolFormer v1's convs and classifier, derived from the architecture table:
    stem 7x7 conv, 3x3 downsampling convs, per block two 1x1 convs C -> 4C -> C, Linear C -> 1000."""
    arch = get_spec(name).arch
    tokens = [s * s for s in _sides(resolution)]
    dims, depths = arch.dims, arch.depths
    macs = dims[0] * 3 * 7 * 7 * tokens[0]
    macs += sum(dims[i] * dims[i - 1] * 9 * tokens[i] for i in range(1, 4))
    macs += sum(depths[i] * 2 * dims[i] * 4 * dims[i] * tokens[i] for i in range(4))
    return macs + dims[3] * 1000


# ----------------------------------------------------------------------------------------- published figures


@pytest.mark.slow
def test_s12_fvcore_reproduces_the_published_figure_exactly_on_timms_twin():
    """The published 1,822,580,736 was counted on timm's model; our count of timm's twin must equal it."""
    from poolformer.implementations import IMPLEMENTATIONS

    twin = IMPLEMENTATIONS["timm"].convert(create_model("s12"))
    assert count_fvcore(twin, _input(224)).macs == get_spec("s12").published.macs == 1_822_580_736


def test_our_v1_head_differs_from_timms_by_the_hand_derived_head_cost():
    """Ours: GroupNorm on the 512x7x7 map (fvcore: 5 per element), mean not counted. timm: adaptive average
    pool (1 per input element) then LayerNorm on 512 values (5 per element)."""
    ours = count_fvcore(create_model("s12"), _input(224)).macs
    c, hw = 512, 7 * 7
    assert ours - 1_822_580_736 == 5 * c * hw - (c * hw + 5 * c)


S12_AND_VARIANTS = [n for n in list_models() if n == "poolformer_s12" or MODELS[n].family in ("ablation", "hybrid")]
@pytest.mark.parametrize("name", S12_AND_VARIANTS)
def test_fvcore_macs_within_0_05g_of_published(name):
    model = model_for_resolution(name, 224)
    assert abs(count_fvcore(model, _input(224)).macs - MODELS[name].published.macs) <= 0.05 * G


@pytest.mark.parametrize("name", ["s24", "s36", "m36", "m48"])
def test_larger_v1_within_0_05g_of_published_by_fvcores_rules(name):
    """fvcore's rules (conv/linear MACs + 5 per normalised element), applied to torch FlopCounterMode's
    conv/linear count on the meta device (no compute) plus the hand-counted normalised elements:
    two GroupNorms per block and the head's GroupNorm on the 7x7 map. s12 checks the rules against fvcore."""
    arch = get_spec(name).arch
    tokens = [s * s for s in _sides(224)]
    normalised = sum(2 * d * c * t for d, c, t in zip(arch.depths, arch.dims, tokens)) + arch.dims[-1] * tokens[-1]
    torch_flops = count_torch(model_for_resolution(name, 224, "meta"), _input(224, device="meta")).flops
    assert torch_flops == 2 * _v1_dense_macs(name, 224)
    fvcore_rules = torch_flops // 2 + 5 * normalised
    assert abs(fvcore_rules - get_spec(name).published.macs) <= 0.05 * G
    if name == "s24":  # and fvcore itself agrees with its rules, once, on the smallest of these
        assert count_fvcore(create_model(name), _input(224)).macs == fvcore_rules


def _normalised_elements(name: str, resolution: int = 224) -> int:
    """Elements the norms of a v1-style model normalise: two per block, plus the head's norm on the last map."""
    tokens = [s * s for s in _sides(resolution)]
    arch = get_spec(name).arch
    return sum(2 * d * c * t for d, c, t in zip(arch.depths, arch.dims, tokens)) + arch.dims[-1] * tokens[-1]


@pytest.mark.parametrize("name", ["s12_pppa", "s12_ppaa", "s12_layernorm"])
def test_channel_layernorm_is_invisible_to_fvcore_as_in_the_authors_code(name):
    """sail-sg's LayerNormChannel is written as mean/pow/sqrt, which fvcore lists as unsupported; ours is
    written the same way, so fvcore charges its norms nothing (GroupNorm would cost 5 per element)."""
    fvcore = count_fvcore(model_for_resolution(name, 224), _input(224))
    assert fvcore.norm_macs == 0
    assert {"aten::pow", "aten::sqrt"} <= fvcore.unsupported_ops.keys()


def test_attention_hybrid_costs_exactly_the_hand_derived_attention_macs():
    """[Pool, Pool, Attention, Attention] minus S12 under fvcore: per attention block qkv (N*C*3C), proj (N*C*C),
    q@k^T and attn@v (N*N*C each), less S12's GroupNorm cost (5 per element), which the hybrid's written-out
    channel LayerNorm does not incur."""
    x = _input(224)
    delta = count_fvcore(create_model("s12_ppaa"), x).macs - count_fvcore(create_model("s12"), x).macs
    arch = get_spec("s12").arch
    expected = -5 * _normalised_elements("s12")
    for stage in (2, 3):
        n, c = _sides(224)[stage] ** 2, arch.dims[stage]
        expected += arch.depths[stage] * (4 * n * c * c + 2 * n * n * c)
    assert delta == expected


# ----------------------------------------------------------------------------------------- counters agree


@pytest.mark.parametrize("name", ["s12", "s24", "m36"])
def test_analytic_macs_equal_hand_formula_and_half_of_torch_flops(name):
    model = model_for_resolution(name, 64, device="meta")
    x = _input(64, device="meta")
    analytic = count_analytic(model, x)
    assert analytic.macs == _v1_dense_macs(name, 64)
    assert count_torch(model, x).flops == 2 * analytic.macs


@pytest.mark.parametrize("name", ["s12_ppaa", "s12_random", "s12_ppff", "s12_dwconv"])
def test_token_mixing_matmuls_match_torch_flop_counter(name):
    model = model_for_resolution(name, 64, device="meta")
    x = _input(64, device="meta")
    assert count_torch(model, x).flops == 2 * count_analytic(model, x).macs


@pytest.mark.parametrize("name", list(MODELS))
def test_every_operator_of_every_zoo_model_has_a_cost_formula(name):
    model = model_for_resolution(name, 64, device="meta")
    assert count_analytic(model, _input(64, device="meta")).uncosted_ops == {}


def test_analytic_charges_what_fvcore_skips_by_hand_formula():
    """S12 at 64x64: per block, pooling 3x3 without padded positions (per axis a window covers 3 positions,
    2 at the borders: 3n-2 in total), pool(x)-x, two LayerScale multiplies, two residual adds, GELU (5 ops)
    on the 4C hidden map; norms 8 ops per element (6 for statistics, 2 affine)."""
    model = create_model("s12")
    report = count_all(model, 64)
    arch = get_spec("s12").arch
    pool = sub = mul = add = gelu = norm = 0
    for side, c, depth in zip(_sides(64), arch.dims, arch.depths):
        hw = side * side
        pool += depth * c * (3 * side - 2) ** 2
        sub += depth * c * hw
        mul += depth * 2 * c * hw
        add += depth * 2 * c * hw
        gelu += depth * 5 * 4 * c * hw
        norm += depth * 2 * 8 * c * hw
    last = _sides(64)[-1] ** 2 * arch.dims[-1]
    norm += 8 * last  # the head's GroupNorm on the map
    ops = {op: cost.ops for op, cost in report.analytic.by_operator.items()}
    assert ops["avg_pool2d"] == pool
    assert ops["sub"] == sub
    assert ops["mul"] == mul
    assert ops["add"] == add
    assert ops["gelu"] == gelu
    assert ops["group_norm"] == norm
    assert ops["mean"] == last + arch.dims[-1]
    skipped = {s.op: s for s in report.fvcore_skipped}
    assert set(skipped) == {"aten::avg_pool2d", "aten::sub", "aten::mul", "aten::add", "aten::gelu", "aten::mean"}
    assert skipped["aten::avg_pool2d"].analytic_ops == pool
    assert skipped["aten::gelu"].calls == sum(arch.depths)


def test_bytes_of_a_convolution_are_its_input_weights_bias_and_output():
    analytic = count_analytic(model_for_resolution("s12", 64, device="meta"), _input(64, device="meta"))
    side = _sides(64)[0]
    floats = 3 * 64 * 64 + 64 * 3 * 7 * 7 + 64 + 64 * side * side
    stem = analytic.by_module["stem.conv"]
    assert stem.bytes == 4 * floats
    assert stem.written_bytes == 4 * 64 * side * side
    assert stem.ops == 2 * stem.macs + 64 * side * side  # + one bias add per output


def test_thop_counts_every_parameter_and_fvcore_counts_the_convs():
    model = create_model("s12")
    x = _input(64)
    assert count_thop(model, x).params == sum(p.numel() for p in model.parameters())
    assert count_fvcore(model, x).by_operator["conv"] == _v1_dense_macs("s12", 64) - 512 * 1000


def test_module_and_operator_rows_add_up_to_the_totals():
    report = count_all(create_model("s12_ppaa", img_size=64), 64)
    for rows in (report.modules, report.operators):
        assert sum(r.analytic.ops for r in rows) == report.analytic.ops
        assert sum(r.analytic.macs for r in rows) == report.analytic.macs
        assert sum(r.torch_flops for r in rows) == report.torch.flops
    assert sum(r.fvcore_macs for r in report.modules) == report.fvcore.macs
    assert sum(r.fvcore_macs or 0 for r in report.operators) == report.fvcore.macs


def test_attention_cost_grows_faster_than_tokens_pooling_cost_does_not():
    def macs(name, resolution):  # torch's counter on the meta device: shapes only, no compute
        return count_torch(model_for_resolution(name, resolution, "meta"), _input(resolution, device="meta")).flops

    pool_growth = macs("s12", 128) / macs("s12", 64)
    attention_growth = macs("s12_ppaa", 128) / macs("s12_ppaa", 64)
    tokens_growth = (_sides(128)[0] / _sides(64)[0]) ** 2
    assert math.isclose(pool_growth, tokens_growth, rel_tol=0.01)
    assert attention_growth > tokens_growth * 1.01


# ----------------------------------------------------------------------------------------- no state left behind


def _state(model: torch.nn.Module):
    return (
        {name: m.training for name, m in model.named_modules()},
        sorted(model.state_dict()),
        [(name, len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
         for name, m in model.named_modules()],
        {name: b.shape for name, b in model.named_buffers()},
    )


@pytest.mark.parametrize("counter", [count_analytic, count_fvcore, count_thop, count_torch])
def test_counters_leave_no_buffers_hooks_or_mode_change(counter):
    model = create_model("s12_batchnorm").train()
    model.stages[1].eval()  # a mixed state must come back exactly
    before = _state(model)
    params_before = [p.clone() for p in model.parameters()]
    counter(model, _input(64))
    assert _state(model) == before
    assert all(torch.equal(a, b) for a, b in zip(params_before, model.parameters()))
    assert not any("total_ops" in k or "total_params" in k for k in model.state_dict())


# ----------------------------------------------------------------------------------------- CLI


def test_cli_json_has_exactly_the_documented_shape():
    result = runner.invoke(app, ["flops", "s12", "s12_pppa", "--resolution", "64", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert list(data) == ["models"]
    assert [(m["model"], m["resolution"]) for m in data["models"]] == [("poolformer_s12", 64),
                                                                        ("poolformer_s12_pppa", 64)]
    for entry in data["models"]:
        assert set(entry) == {"model", "resolution", "height", "width", "features", "counters"}
        assert (entry["height"], entry["width"], entry["features"]) == (64, 64, False)
        counters = entry["counters"]
        assert set(counters) == {"fvcore", "thop", "torch", "analytic"}
        assert set(counters["fvcore"]) == {"macs", "unsupported_ops"}
        assert set(counters["thop"]) == {"macs", "params"}
        assert set(counters["torch"]) == {"flops"}
        assert set(counters["analytic"]) == {"macs", "ops", "bytes"}
        for group in counters.values():
            for key, value in group.items():
                if key == "unsupported_ops":
                    assert all(isinstance(v, int) for v in value.values())
                else:
                    assert isinstance(value, int) and value > 0
        assert counters["torch"]["flops"] == 2 * counters["analytic"]["macs"]
    s12_64 = data["models"][0]["counters"]
    assert s12_64["analytic"]["macs"] == _v1_dense_macs("s12", 64)
    assert s12_64["fvcore"]["unsupported_ops"]["aten::avg_pool2d"] == 12


@pytest.fixture
def wide_console(monkeypatch):
    from poolformer_cli.common import console

    monkeypatch.setattr(console, "width", 200)


def test_cli_tables_name_units_and_compare_models(wide_console):
    result = runner.invoke(app, ["flops", "s12", "s12_ppaa", "--resolution", "64", "--by", "operator"])
    assert result.exit_code == 0, result.output
    for text in ("MACs", "FLOPs", "ops/B", "aten::avg_pool2d", "Comparison", "MACs per top-1 point", "77.2",
                 "By operator", "skipped"):
        assert text in result.output


def test_cli_by_module_lists_blocks(wide_console):
    result = runner.invoke(app, ["flops", "s12", "--resolution", "64,128", "--by", "module"])
    assert result.exit_code == 0, result.output
    assert "stages.2.blocks.5" in result.output and "head.fc" in result.output
    assert "Growth with tokens" in result.output


# ----------------------------------------------------------------------------------------- backbones, any H x W


def _v1_backbone_macs(name: str, height: int, width: int) -> int:
    """The dense MACs of a v1 backbone at height x width: stem, downsampling and per-block MLP convs, no head."""
    arch = get_spec(name).arch
    tokens = [h * w for h, w in zip(_sides(height), _sides(width))]
    dims, depths = arch.dims, arch.depths
    macs = dims[0] * 3 * 7 * 7 * tokens[0]
    macs += sum(dims[i] * dims[i - 1] * 9 * tokens[i] for i in range(1, 4))
    return macs + sum(depths[i] * 2 * dims[i] * 4 * dims[i] * tokens[i] for i in range(4))


@pytest.mark.parametrize("impl", ["ours", "timm"])
def test_features_only_counts_agree_with_fvcore_on_the_same_module(impl):
    """A backbone returns four maps: every counter takes the list. fvcore's count = the analytic MACs + its 5 per
    normalised element (ours: two norms per block and the four output norms; timm's backbone has no output
    norms); torch's FLOPs = 2 x analytic MACs = 2 x the hand-derived convolutions at 64 x 96."""
    from poolformer.flops import analyse

    report = analyse("s12", resolution=(64, 96), impl=impl, features=True)
    arch = get_spec("s12").arch
    tokens = [h * w for h, w in zip(_sides(64), _sides(96))]
    normalised = sum(2 * d * c * t for d, c, t in zip(arch.depths, arch.dims, tokens))
    normalised += sum(c * t for c, t in zip(arch.dims, tokens)) if impl == "ours" else 0
    assert report.features and report.resolution == Size(64, 96) and report.published_macs is None
    assert report.analytic.macs == _v1_backbone_macs("s12", 64, 96)
    assert report.torch.flops == 2 * report.analytic.macs
    assert report.fvcore.norm_macs == 5 * normalised
    assert report.fvcore.macs == report.analytic.macs + report.fvcore.norm_macs
    assert report.thop.macs > 0 and report.analytic.outputs[""].shape == (1, 64, 16, 24)  # the stride-4 map


def test_features_only_counts_equal_fvcore_called_directly():
    """analyse's features model is exactly what create_model(features_only=True) builds: fvcore on it agrees."""
    from poolformer.flops import analyse

    x = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    direct = count_fvcore(create_model("s12", features_only=True), x)
    assert analyse("s12", resolution=Size(64, 96), features=True).fvcore.macs == direct.macs


def test_cli_counts_a_backbone_at_height_x_width(wide_console):
    result = runner.invoke(app, ["flops", "s12", "--features", "--resolutions", "64x96,64", "--json"])
    assert result.exit_code == 0, result.output
    models = json.loads(result.stdout)["models"]
    assert [(m["resolution"], m["height"], m["width"], m["features"]) for m in models] == [
        ("64x96", 64, 96, True), (64, 64, 64, True)]
    assert models[0]["counters"]["analytic"]["macs"] == _v1_backbone_macs("s12", 64, 96)
    table = runner.invoke(app, ["flops", "s12", "--features", "--resolution", "64x96", "--impl", "timm"])
    assert table.exit_code == 0, table.output
    assert "@ 64x96" in table.output and "backbone (features only)" in table.output
    assert "no output norms" in table.output


@pytest.mark.parametrize("args, message", [
    (["flops", "s13"], "unknown model"),
    (["flops", "s12", "--resolution", "800x"], "HEIGHTxWIDTH"),
    (["flops", "s12", "--resolutions", "64x16"], "at least 32"),
    (["flops", "timm:resnet18", "--features"], "timm peer"),
    (["flops", "s12", "--resolution", "16"], "at least 32"),
    (["flops", "s12", "--resolution", "0"], "--resolution"),
    (["flops", "s12", "--resolution", "224,abc"], "--resolution"),
    (["flops", "s12", "--resolution", "-64"], "--resolution"),
    (["flops", "s12", "--by", "layer"], "--by"),
    (["flops", "s12", "--impl", "onnx"], "--impl"),
    (["flops", "s12", "--batch-size", "1.5"], "--batch-size"),
    (["flops", "s12_pppf", "--impl", "timm"], "timm has no implementation"),
])
def test_cli_bad_input_is_one_line_and_exit_2(args, message):
    assert_one_line_error(runner.invoke(app, args), message)
