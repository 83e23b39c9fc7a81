"""The model zoo as data: one `ModelSpec` per variant, built by the one `MetaFormer` in `model.py`.

Importing this module does not import torch, so listing models and resolving names stay fast.
Published figures come from the papers and the official repositories (see REFERENCE.md in shared/).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field, replace

from .errors import UnknownModelError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

V1_RELEASE = "https://github.com/sail-sg/poolformer/releases/download/v1.0/{name}.pth.tar"
V2_RELEASE = "https://huggingface.co/sail/dl/resolve/main/poolformerv2/{name}.pth"


@dataclass(frozen=True)
class ArchConfig:
    """Everything `MetaFormer` needs to build a network. Per-stage fields are tuples with one entry a stage.

    token_mixers: per stage, one of pooling, identity, random, dwconv, attention, spatial_fc.
    norms: per stage block norm: groupnorm (one group over C,H,W, eps 1e-5, the paper's "Modified
        LayerNorm"), groupnorm_nobias (eps 1e-6), layernorm (over channels at each position),
        layernorm_nobias (eps 1e-6), batchnorm, none.
    head_norm_on: "map" normalises the 4-D map before global pooling (PoolFormer v1);
        "pooled" normalises the pooled vector (PoolFormerV2).
    img_size: the input size that sizes the token-count dependent parts (random and spatial_fc mixers, the
        hybrids' position embedding): one side for squares or (height, width); other sizes still run where the
        mixers allow it.
    """

    depths: tuple[int, ...]
    dims: tuple[int, ...]
    token_mixers: tuple[str, ...] = ("pooling",) * 4
    pool_size: int = 3
    norms: tuple[str, ...] = ("groupnorm",) * 4
    act: str = "gelu"
    mlp_ratio: float = 4.0
    mlp_bias: bool = True
    layer_scale_init: float | None = 1e-5
    res_scale_init: tuple[float | None, ...] = (None,) * 4
    stem_norm: str = "none"
    downsample_norm: str = "none"
    head_norm: str = "groupnorm"
    head_norm_on: str = "map"
    drop_path_rate: float = 0.0
    img_size: int | tuple[int, int] = 224
    in_chans: int = 3


@dataclass(frozen=True)
class Published:
    """Figures as the authors report them. MACs are fvcore counts at 224x224 (one multiply-add = 1)."""

    params: int | None = None
    macs: int | None = None
    top1: float | None = None


@dataclass(frozen=True)
class ModelSpec:
    name: str
    arch: ArchConfig
    family: str  # v1, v2, ablation, hybrid
    description: str
    aliases: tuple[str, ...] = ()
    published: Published = field(default_factory=Published)
    crop_pct: float = 0.9
    input_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bicubic"
    hf_hub_id: str | None = None  # timm-layout safetensors on the Hugging Face hub
    url: str | None = None  # the authors' release file

    @property
    def has_weights(self) -> bool:
        return bool(self.hf_hub_id or self.url)

    @property
    def weights_source(self) -> str:
        if self.hf_hub_id:
            return f"hf-hub:{self.hf_hub_id}"
        return self.url or "none (random init)"


def _v1(size: str, depths, dims, layer_scale, drop_path, crop_pct, params, macs, top1) -> ModelSpec:
    name = f"poolformer_{size}"
    return ModelSpec(
        name=name,
        aliases=(size,),
        family="v1",
        description=f"PoolFormer-{size.upper()} (CVPR 2022)",
        arch=ArchConfig(depths=depths, dims=dims, layer_scale_init=layer_scale, drop_path_rate=drop_path),
        published=Published(params, macs, top1),
        crop_pct=crop_pct,
        hf_hub_id=f"timm/{name}.sail_in1k",
        url=V1_RELEASE.format(name=name),
    )


def _v2(size: str, depths, dims, drop_path, params, macs, top1) -> ModelSpec:
    name = f"poolformerv2_{size}"
    return ModelSpec(
        name=name,
        aliases=(f"v2_{size}", f"{size}v2"),
        family="v2",
        description=f"PoolFormerV2-{size.upper()} (MetaFormer Baselines): StarReLU, no-bias norms, ResScale",
        arch=ArchConfig(
            depths=depths,
            dims=dims,
            norms=("groupnorm_nobias",) * 4,
            act="starrelu",
            mlp_bias=False,
            layer_scale_init=None,
            res_scale_init=(None, None, 1.0, 1.0),
            stem_norm="layernorm_nobias",
            downsample_norm="layernorm_nobias",
            head_norm="layernorm_eps6",
            head_norm_on="pooled",
            drop_path_rate=drop_path,
        ),
        published=Published(params, macs, top1),
        crop_pct=1.0,
        hf_hub_id=f"timm/{name}.sail_in1k",
        url=V2_RELEASE.format(name=name),
    )


S_DEPTHS = {"s12": (2, 2, 6, 2), "s24": (4, 4, 12, 4), "s36": (6, 6, 18, 6), "m36": (6, 6, 18, 6), "m48": (8, 8, 24, 8)}
S_DIMS, M_DIMS = (64, 128, 320, 512), (96, 192, 384, 768)

_V1 = [
    _v1("s12", S_DEPTHS["s12"], S_DIMS, 1e-5, 0.1, 0.9, 11_915_176, 1_822_580_736, 77.2),
    _v1("s24", S_DEPTHS["s24"], S_DIMS, 1e-5, 0.1, 0.9, 21_388_968, 3_412_900_000, 80.3),
    _v1("s36", S_DEPTHS["s36"], S_DIMS, 1e-6, 0.2, 0.9, 30_862_760, 5_003_100_000, 81.4),
    _v1("m36", S_DEPTHS["m36"], M_DIMS, 1e-6, 0.3, 0.95, 56_172_520, 8_801_900_000, 82.1),
    _v1("m48", S_DEPTHS["m48"], M_DIMS, 1e-6, 0.4, 0.95, 73_473_448, 11_590_700_000, 82.5),
]

# PoolFormerV2: params are the released models' exact counts; MACs are the MetaFormer Baselines paper's
# rounded figures.
_V2 = [
    _v2("s12", S_DEPTHS["s12"], S_DIMS, 0.1, 11_891_712, 1_800_000_000, 78.0),
    _v2("s24", S_DEPTHS["s24"], S_DIMS, 0.1, 21_341_464, 3_400_000_000, 80.7),
    _v2("s36", S_DEPTHS["s36"], S_DIMS, 0.2, 30_791_216, 5_000_000_000, 81.6),
    _v2("m36", S_DEPTHS["m36"], M_DIMS, 0.3, 56_077_168, 8_800_000_000, 82.2),
    _v2("m48", S_DEPTHS["m48"], M_DIMS, 0.4, 73_346_056, 11_500_000_000, 82.6),
]

_S12 = _V1[0]


def _s12_variant(suffix: str, family: str, description: str, params: int, macs: int, top1: float,
                 crop_pct: float = _S12.crop_pct, release: str | None = None, **arch) -> ModelSpec:
    """A Table 5 variant of PoolFormer-S12 (paper ablations and hybrids); `release` names the authors'
    release file where one was published."""
    return ModelSpec(
        name=f"poolformer_s12_{suffix}",
        aliases=(f"s12_{suffix}",),
        family=family,
        description=description,
        arch=replace(_S12.arch, **arch),
        published=Published(params, macs, top1),
        crop_pct=crop_pct,
        url=V1_RELEASE.format(name=release) if release else None,
    )


_ABLATIONS = [
    _s12_variant("identity", "ablation", "token mixer = identity", 11_900_000, 1_800_000_000, 74.3,
                 release="metaformer_id_s12", token_mixers=("identity",) * 4),
    _s12_variant("random", "ablation", "token mixer = frozen global random matrix (+21M frozen params)",
                 11_900_000, 3_300_000_000, 75.8, token_mixers=("random",) * 4),
    _s12_variant("dwconv", "ablation", "token mixer = 3x3 depthwise conv", 11_900_000, 1_800_000_000, 78.1,
                 token_mixers=("dwconv",) * 4),
    *[
        _s12_variant(f"pool{k}", "ablation", f"pooling size {k}", 11_900_000, 1_800_000_000, top1, pool_size=k)
        for k, top1 in ((5, 77.2), (7, 77.1), (9, 76.8))
    ],
    *[
        _s12_variant(suffix, "ablation", description, 11_900_000, 1_800_000_000, top1,
                     norms=(norm,) * 4, head_norm=norm)
        for suffix, norm, description, top1 in (
            ("layernorm", "layernorm", "norm = LayerNorm over channels", 76.5),
            ("batchnorm", "batchnorm", "norm = BatchNorm", 76.4),
            ("nonorm", "none", "no normalisation", 46.1),
        )
    ],
    _s12_variant("relu", "ablation", "activation = ReLU", 11_900_000, 1_800_000_000, 76.4, act="relu"),
    _s12_variant("silu", "ablation", "activation = SiLU", 11_900_000, 1_800_000_000, 77.2, act="silu"),
]


def _hybrid(code: str, params: int, macs: int, top1: float, crop_pct: float) -> ModelSpec:
    """As in the authors' models/metaformer.py: the attention hybrids normalise every stage and the head with
    channel LayerNorm, the spatial-FC ones with GroupNorm."""
    mixer_of = {"p": "pooling", "a": "attention", "f": "spatial_fc"}
    label_of = {"p": "Pool", "a": "Attention", "f": "SpatialFC"}
    mixers = tuple(mixer_of[c] for c in code)
    norm = "layernorm" if "attention" in mixers else "groupnorm"
    return _s12_variant(code, "hybrid", "hybrid [" + ", ".join(label_of[c] for c in code) + "]",
                        params, macs, top1, crop_pct=crop_pct, release=f"metaformer_{code}_s12_224",
                        token_mixers=mixers, norms=(norm,) * 4, head_norm=norm)


_HYBRIDS = [
    _hybrid("pppa", 14_038_000, 1_900_000_000, 78.3, crop_pct=0.95),
    _hybrid("ppaa", 16_536_000, 2_500_000_000, 81.0, crop_pct=0.95),
    _hybrid("pppf", 11_920_000, 1_800_000_000, 77.5, crop_pct=0.9),
    _hybrid("ppff", 12_150_000, 1_900_000_000, 77.9, crop_pct=0.95),
]

MODELS: dict[str, ModelSpec] = {spec.name: spec for spec in (*_V1, *_V2, *_ABLATIONS, *_HYBRIDS)}

# (all parameters, trainable parameters) of our own models as built by MetaFormer, kept as data so that
# `poolformer list` needs no torch; tests/test_models.py counts the real models and checks every entry.
# Frozen parameters count in the first figure: the random-mixing ablation's 21M fixed matrix entries.
PARAM_COUNTS: dict[str, tuple[int, int]] = {
    "poolformer_s12": (11_915_176, 11_915_176),
    "poolformer_s24": (21_388_968, 21_388_968),
    "poolformer_s36": (30_862_760, 30_862_760),
    "poolformer_m36": (56_172_520, 56_172_520),
    "poolformer_m48": (73_473_448, 73_473_448),
    "poolformerv2_s12": (11_891_712, 11_891_712),
    "poolformerv2_s24": (21_341_464, 21_341_464),
    "poolformerv2_s36": (30_791_216, 30_791_216),
    "poolformerv2_m36": (56_077_168, 56_077_168),
    "poolformerv2_m48": (73_346_056, 73_346_056),
    "poolformer_s12_identity": (11_915_176, 11_915_176),
    "poolformer_s12_random": (33_048_778, 11_915_176),
    "poolformer_s12_dwconv": (11_948_456, 11_948_456),
    "poolformer_s12_pool5": (11_915_176, 11_915_176),
    "poolformer_s12_pool7": (11_915_176, 11_915_176),
    "poolformer_s12_pool9": (11_915_176, 11_915_176),
    "poolformer_s12_layernorm": (11_915_176, 11_915_176),
    "poolformer_s12_batchnorm": (11_915_176, 11_915_176),
    "poolformer_s12_nonorm": (11_900_840, 11_900_840),
    "poolformer_s12_relu": (11_915_176, 11_915_176),
    "poolformer_s12_silu": (11_915_176, 11_915_176),
    "poolformer_s12_pppa": (14_038_440, 14_038_440),
    "poolformer_s12_ppaa": (16_535_592, 16_535_592),
    "poolformer_s12_pppf": (11_919_978, 11_919_978),
    "poolformer_s12_ppff": (12_150_474, 12_150_474),
}
_ALIASES: dict[str, str] = {alias: spec.name for spec in MODELS.values() for alias in spec.aliases}


def list_models(family: str | None = None) -> list[str]:
    """Canonical model names in zoo order, optionally only one family (v1, v2, ablation, hybrid)."""
    return [name for name, spec in MODELS.items() if family is None or spec.family == family]


def get_spec(name: str) -> ModelSpec:
    """The spec for a canonical name or alias (case-insensitive, '-' and '_' alike)."""
    key = name.strip().lower().replace("-", "_")
    if key in MODELS:
        return MODELS[key]
    if key in _ALIASES:
        return MODELS[_ALIASES[key]]
    raise UnknownModelError(name, suggest(key))


def unknown_models(names: list[str]) -> list[str]:
    """The names among `names` that are neither a model nor an alias (for checking a list before any work)."""
    unknown = []
    for name in names:
        try:
            get_spec(name)
        except UnknownModelError:
            unknown.append(name)
    return unknown


def suggest(name: str, limit: int = 3) -> list[str]:
    """The known names closest to `name`, best first (ties in zoo order)."""
    candidates = [*_ALIASES, *MODELS]
    scored = [(difflib.SequenceMatcher(None, name, c).ratio(), i, c) for i, c in enumerate(candidates)]
    close = sorted((s for s in scored if s[0] >= 0.6), key=lambda s: (-s[0], s[1]))
    return [c for _, _, c in close[:limit]]
