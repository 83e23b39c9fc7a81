"""The zoo's models against independent implementations (transformers, timm) and the published figures."""

from __future__ import annotations

import pytest
import timm
import torch
from transformers import PoolFormerConfig, PoolFormerForImageClassification

from poolformer import ConfigError, UnknownModelError, create_model, get_spec, list_models
from poolformer.model import randomize_
from poolformer.weights import export_state_dict

from .conftest import marked_slow

V1 = ["poolformer_s12", "poolformer_s24", "poolformer_s36", "poolformer_m36", "poolformer_m48"]
V2 = [f"poolformerv2_{s}" for s in ("s12", "s24", "s36", "m36", "m48")]

# Exact counts from the official repository (REFERENCE.md section 1).
OFFICIAL_PARAMS = {
    "poolformer_s12": 11_915_176, "poolformer_s24": 21_388_968, "poolformer_s36": 30_862_760,
    "poolformer_m36": 56_172_520, "poolformer_m48": 73_473_448,
}
# The paper's Table 5, in thousands of parameters.
HYBRID_PARAMS_K = {"pppa": 14_038, "ppaa": 16_536, "pppf": 11_920, "ppff": 12_150}


def n_params(model: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


@pytest.mark.parametrize("name", marked_slow(V1, "poolformer_m36", "poolformer_m48"))
def test_v1_parameter_counts_are_exact(name):
    assert n_params(create_model(name)) == OFFICIAL_PARAMS[name]


@pytest.mark.parametrize("name", marked_slow(V2, *V2[1:]))
def test_v2_parameter_counts_match_timm(name):
    assert n_params(create_model(name)) == n_params(timm.create_model(name))


@pytest.mark.parametrize("code", HYBRID_PARAMS_K)
def test_hybrid_parameter_counts_within_0_01m_of_the_paper(code):
    assert abs(n_params(create_model(f"poolformer_s12_{code}")) - HYBRID_PARAMS_K[code] * 1000) <= 10_000


@pytest.mark.parametrize("name", list_models())
def test_listed_parameter_counts_equal_the_built_models(name):
    """`poolformer list` shows zoo.PARAM_COUNTS without building anything; they must be the models' own."""
    from poolformer.catalog import count_params
    from poolformer.zoo import PARAM_COUNTS

    assert PARAM_COUNTS[name] == count_params(get_spec(name))


def test_every_zoo_model_has_listed_parameter_counts():
    from poolformer.zoo import PARAM_COUNTS

    assert list(PARAM_COUNTS) == list_models()


def test_random_mixing_matrices_are_frozen_extra_parameters():
    model = create_model("s12_random")
    assert n_params(model, trainable_only=True) == OFFICIAL_PARAMS["poolformer_s12"]
    frozen = n_params(model) - n_params(model, trainable_only=True)
    assert 20e6 < frozen < 22e6  # the paper's "+21M" frozen parameters


def _transformers_twin(ours) -> PoolFormerForImageClassification:
    cfg = PoolFormerConfig(depths=list(ours.arch.depths), hidden_sizes=list(ours.arch.dims), num_labels=1000,
                           layer_scale_init_value=ours.arch.layer_scale_init)
    twin = PoolFormerForImageClassification(cfg).eval()
    twin.load_state_dict(export_state_dict(ours, "transformers"), strict=True)
    return twin


@pytest.mark.parametrize("name", marked_slow(V1, *V1[1:]))
def test_v1_logits_match_transformers(name):
    ours = randomize_(create_model(name), seed=1)
    twin = _transformers_twin(ours)
    size = 224 if name == "poolformer_s12" else 96
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours_logits, twin_logits = ours(x), twin(x).logits
    assert ours_logits.shape == (2, 1000)
    torch.testing.assert_close(ours_logits, twin_logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", marked_slow(V1, *V1[1:]))
def test_v1_stage_features_match_timm_and_only_its_head_differs(name):
    ours = randomize_(create_model(name), seed=2)
    twin = timm.create_model(name).eval()
    twin.load_state_dict(export_state_dict(ours, "timm"))
    x = torch.randn(1, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours_maps = ours.forward_stages(x)
        twin_maps = twin.forward_intermediates(x, intermediates_only=True)
        logit_gap = (ours(x) - twin(x)).abs().max().item()
    for a, b in zip(ours_maps, twin_maps, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # timm normalises after pooling; the original normalises the map first (REFERENCE.md section 2).
    assert logit_gap > 1e-3


@pytest.mark.parametrize("name", marked_slow(V2, *V2[1:]))
def test_v2_logits_match_timm(name):
    ours = randomize_(create_model(name), seed=3)
    twin = timm.create_model(name).eval()
    twin.load_state_dict(export_state_dict(ours, "timm"))
    size = 224 if name == "poolformerv2_s12" else 96
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), twin(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("size", [(224, 224), (97, 131), pytest.param((256, 320), marks=pytest.mark.slow), (32, 32)])
def test_any_resolution_gives_four_stage_maps_at_strides_4_to_32(size):
    model = create_model("s12")
    h, w = size
    with torch.no_grad():
        maps = model.forward_stages(torch.randn(1, 3, h, w))
        logits = model(torch.randn(1, 3, h, w))
    assert model.stage_strides == (4, 8, 16, 32)
    expected_hw = []
    side_h, side_w = (h + 2 * 2 - 7) // 4 + 1, (w + 2 * 2 - 7) // 4 + 1  # the 7x7/4 stem, padding 2
    for i in range(4):
        if i:
            side_h, side_w = (side_h - 1) // 2 + 1, (side_w - 1) // 2 + 1  # 3x3/2 conv, padding 1
        expected_hw.append((side_h, side_w))
    assert [tuple(m.shape[-2:]) for m in maps] == expected_hw
    assert [m.shape[1] for m in maps] == [64, 128, 320, 512]
    assert logits.shape == (1, 1000)


@pytest.mark.parametrize("name", marked_slow([n for n in list_models() if get_spec(n).family in ("ablation", "hybrid")],
                                              "poolformer_s12_ppaa"))
def test_every_ablation_and_hybrid_runs(name):
    model = create_model(name)
    with torch.no_grad():
        out = model(torch.randn(1, 3, 224, 224))
    assert out.shape == (1, 1000) and torch.isfinite(out).all()


def test_hybrids_put_one_position_embedding_before_the_first_attention_stage():
    model = create_model("s12_ppaa")
    has_pos = [stage.pos_embed is not None for stage in model.stages]
    assert has_pos == [False, False, True, False]
    with torch.no_grad():  # other resolutions interpolate it
        assert model(torch.randn(1, 3, 288, 288)).shape == (1, 1000)


def test_token_count_mixers_follow_img_size_and_refuse_other_sizes():
    model = create_model("s12_pppf", img_size=256)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 256, 256)).shape == (1, 1000)
        with pytest.raises(ConfigError, match="img_size"):
            model(torch.randn(1, 3, 224, 224))


@pytest.mark.parametrize("size", [230, pytest.param(97, marks=pytest.mark.slow)])
def test_token_count_mixers_are_sized_by_the_real_stage_maps(size):
    """230 is not a multiple of 32: its stage maps are 58, 29, 15, 8 (not 230 // stride)."""
    for name in ("s12_ppff", "s12_random", "s12_ppaa"):
        model = create_model(name, img_size=size)
        with torch.no_grad():
            maps = model.forward_stages(torch.randn(1, 3, size, size))
        pos = [st.pos_embed for st in model.stages if st.pos_embed is not None]
        for stage_map, stage in zip(maps, model.stages):
            mixer = stage.blocks[0].token_mixer
            if hasattr(mixer, "num_tokens"):
                assert mixer.num_tokens == stage_map.shape[-2] * stage_map.shape[-1]
        assert all(p.shape[-2:] == maps[2].shape[-2:] for p in pos)


@pytest.mark.slow
def test_attention_hybrids_follow_the_authors_norms_and_crops():
    """sail-sg/poolformer models/metaformer.py: the attention hybrids use LayerNormChannel everywhere (their
    default norm_layer) and crop 0.95; pppf uses GroupNorm and crop 0.9; ppff GroupNorm and crop 0.95."""
    from poolformer.layers import GroupNorm1, LayerNormChannels

    for code, norm, crop in (("pppa", LayerNormChannels, 0.95), ("ppaa", LayerNormChannels, 0.95),
                             ("pppf", GroupNorm1, 0.9), ("ppff", GroupNorm1, 0.95)):
        model = create_model(f"s12_{code}")
        assert type(model.head.norm) is norm and type(model.stages[0].blocks[0].norm1) is norm
        assert model.spec.crop_pct == crop


def test_channel_layernorm_equals_torch_layer_norm_over_channels():
    from poolformer.layers import LayerNormChannels

    x = torch.randn(2, 24, 5, 7) * 3 + 1
    for written_out in (True, False):
        norm = randomize_(LayerNormChannels(24, written_out=written_out))
        expected = torch.nn.functional.layer_norm(x.permute(0, 2, 3, 1), (24,), norm.weight, norm.bias, 1e-5)
        torch.testing.assert_close(norm(x), expected.permute(0, 3, 1, 2), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_overrides_build_the_zoo_ablations():
    built = create_model("s12", token_mixer="dwconv", pool_size=5, norm="batchnorm", act="silu")
    assert built.arch.token_mixers == ("dwconv",) * 4 and built.arch.pool_size == 5
    assert isinstance(built.stages[0].blocks[0].norm1, torch.nn.BatchNorm2d)
    assert isinstance(built.head.norm, torch.nn.BatchNorm2d)  # the original's norm_layer covers the head too
    assert isinstance(built.stages[0].blocks[0].mlp.act, torch.nn.SiLU)
    assert create_model("s12", pool_size=7).arch == create_model("s12_pool7").arch
    per_stage = create_model("s12", token_mixer=["pooling", "pooling", "pooling", "attention"], norm="layernorm")
    assert per_stage.stages[3].pos_embed is not None


def test_pool_size_changes_the_pooling_window():
    model = create_model("s12", pool_size=9)
    pool = model.stages[0].blocks[0].token_mixer.pool
    assert pool.kernel_size == 9 and pool.padding == 4 and pool.count_include_pad is False


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"token_mixer": "poling"}, "did you mean: pooling"),
        ({"norm": "groupnrom"}, "did you mean: groupnorm"),
        ({"act": "gelu2"}, "unknown activation"),
        ({"colour": 3}, "unknown model option 'colour'"),
        ({"pool_size": 4}, "pool_size must be a positive odd"),
        ({"token_mixer": ["pooling"] * 3}, "one entry per stage"),
    ],
)
def test_bad_overrides_are_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        create_model("s12", **overrides)


def test_unknown_model_suggests_the_closest_names():
    with pytest.raises(UnknownModelError) as err:
        create_model("s13")
    assert str(err.value) == "unknown model 's13'; did you mean: s12, s36?"


def test_unknown_models_picks_out_the_names_the_zoo_does_not_have():
    from poolformer.zoo import unknown_models

    assert unknown_models(["s12", "S13", "poolformer-m36", "v2_s12", "resnet50"]) == ["S13", "resnet50"]
    assert unknown_models([]) == []


def test_aliases_and_case_resolve_to_the_same_model():
    assert get_spec("S24").name == get_spec("poolformer-s24").name == "poolformer_s24"
    assert get_spec("v2_m48").name == "poolformerv2_m48"


@pytest.mark.slow
def test_models_come_in_eval_mode_and_drop_path_only_acts_in_training():
    model = create_model("s12", drop_path_rate=0.5)
    assert not model.training
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
        model.train()
        torch.manual_seed(0)
        assert not torch.equal(model(x), model(x))


def test_num_classes_and_feature_only_head():
    model = create_model("s12", num_classes=10)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 10)
    features = create_model("s12", num_classes=0)
    assert features(torch.randn(1, 3, 64, 64)).shape == (1, 512)
