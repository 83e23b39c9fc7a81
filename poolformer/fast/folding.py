"""Folding: a PoolFormer v1/v2's weights rewritten once, by algebra, into the few tensors the fast
kernels need (no retraining, no new weights; the reference model is left untouched).

1. The pooling token mixer needs only one statistic. GroupNorm with one group is, per sample b,
   GN(x) = gamma * (x - mu_b) / sigma_b + beta with sigma_b = sqrt(var_b + eps). Average pooling with
   count_include_pad=False is linear, acts per channel and maps a constant to itself, so
   pool(GN(x)) - GN(x) = (gamma / sigma_b) * (pool(x) - x): mu and beta cancel. The block's first half is
   x1 = res_scale1 * x + (layer_scale1 * gamma1 / sigma_b) * (pool(x) - x), and only sigma_b is computed.
   pool(x) - x itself is one depthwise convolution (weights 1/k^2, centre 1/k^2 - 1), exact inside the
   map; on the border, where count_include_pad=False averages fewer positions, the result is rescaled:
   pool = (k^2 / count) * pool_including_pad.
2. norm2's affine folds into fc1 (fc1' = fc1 * gamma2, b1' = b1 + fc1 @ beta2), leaving a plain
   standardisation; LayerScale folds into fc2 (fc2' = ls2 * fc2); StarReLU's scale and bias fold into
   fc2 too (fc2 @ (s * relu(h)^2 + b) = (s * fc2) @ relu(h)^2 + b * fc2.sum(1)), leaving relu then square.
   v2's downsampling LayerNorm (no bias) folds its weight into the following convolution.
3. The heads fold too: v1 normalises the map then averages, which equals normalising the averaged map
   with the map's statistics; both heads' affines fold into the classifier.
4. A features-only model (the dense tasks' backbone) has no head but an output norm per stage, GroupNorm(1)
   over the stage's map: it needs that map's own per-sample statistics, so it stays a norm (`FeatureNorm`,
   the affine kept) applied to each stage's output; the maps the next stage reads are left unnormalised.

Everything is computed in float64 and stored in float32; `FoldedModel.to` converts for a compute dtype.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from torch import nn

from ..errors import ConfigError
from ..layers import GroupNorm1, LayerNormChannels, StarReLU
from ..model import MetaFormer

SUPPORTED_ACTIVATIONS = ("gelu", "relu", "silu", "starrelu")  # StarReLU runs as relu(.)^2 after folding


@dataclass(frozen=True)
class FoldedBlock:
    """One PoolFormer block after folding. C channels, hidden width D.

    mix_scale [C]: layer_scale1 * gamma1, to be divided by the sample's sigma.
    skip_scale1 / skip_scale2 [C] or None: ResScale on the two skips (v2, stages 3-4).
    fc1_weight [D, C], fc1_bias [D] or None: norm2's affine folded in.
    fc2_weight [C, D], fc2_bias [C] or None: LayerScale (and StarReLU's scale and bias) folded in.
    norm1_eps / norm2_eps: the GroupNorms' eps, inside the square root: sigma = sqrt(var + eps).
    fc1_colsum [D] or None, fc1_bias_compute [D] or None: the Triton kernels' form only (see
    poolformer.fast.triton.weights.prepare).
    """

    mix_scale: torch.Tensor
    skip_scale1: torch.Tensor | None
    fc1_weight: torch.Tensor
    fc1_bias: torch.Tensor | None
    fc2_weight: torch.Tensor
    fc2_bias: torch.Tensor | None
    skip_scale2: torch.Tensor | None
    norm1_eps: float
    norm2_eps: float
    fc1_colsum: torch.Tensor | None = None
    fc1_bias_compute: torch.Tensor | None = None


@dataclass(frozen=True)
class FoldedStage:
    """Downsampling convolution ([C_out, C_in, 3, 3], v2's LayerNorm weight folded in), the depthwise
    weight [C, 1, k, k] that computes pool(x) - x (zero padding counted), and the blocks."""

    down_weight: torch.Tensor | None
    down_bias: torch.Tensor | None
    pool_minus_identity: torch.Tensor
    blocks: tuple[FoldedBlock, ...]


@dataclass(frozen=True)
class FeatureNorm:
    """A features-only model's output norm of one stage (the official `norm0/2/4/6`): GroupNorm(1) over the
    stage's map [B, C, H, W], per-channel weight [C] and bias [C] (None for v2's bias-free norm), eps inside
    the root: y = weight * (x - mu_b) / sqrt(var_b + eps) + bias."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    eps: float


@dataclass(frozen=True)
class FoldedModel:
    """All tensors the fast forward needs, in one dtype on one device."""

    stem_weight: torch.Tensor  # [C0, 3, 7, 7]
    stem_bias: torch.Tensor
    stem_norm_weight: torch.Tensor | None  # v2: LayerNorm over channels after the stem (no bias)
    stages: tuple[FoldedStage, ...]
    # [num_classes, C]; the head norm's affine folded in (identity if no classifier); None: features-only model
    head_weight: torch.Tensor | None
    head_bias: torch.Tensor | None
    feature_norms: tuple[FeatureNorm, ...] = ()  # a features-only model's, one per stage; () for a classifier

    def to(self, dtype: torch.dtype, device: torch.device | str) -> FoldedModel:
        """A copy with every tensor converted and contiguous (convolution weights channels-last); the head
        and the output norms stay float32 (they are tiny, and set the logits or the maps' affine)."""
        return _convert(self, dtype, torch.device(device), keep_float=("head_weight", "head_bias", "feature_norms"))


def _convert(value, dtype, device, keep_float=()):
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=dtype).contiguous()
    if isinstance(value, tuple):
        return tuple(_convert(v, dtype, device) for v in value)
    if hasattr(value, "__dataclass_fields__"):
        changes = {}
        for f in fields(value):
            item = getattr(value, f.name)
            target = torch.float32 if f.name in keep_float else dtype
            changes[f.name] = _convert(item, target, device) if item is not None else None
        if "stem_weight" in changes:  # convolution weights in channels-last, as oneDNN prefers
            changes["stem_weight"] = changes["stem_weight"].contiguous(memory_format=torch.channels_last)
        for name in ("down_weight", "pool_minus_identity"):
            if changes.get(name) is not None:
                changes[name] = changes[name].contiguous(memory_format=torch.channels_last)
        return replace(value, **changes)
    return value


@dataclass(frozen=True)
class Plan:
    """Scalars of the architecture that the folded tensors do not carry."""

    pool_size: int
    stem_norm_eps: float | None
    down_norm_eps: float | None  # None: no norm before downsampling (v1)
    head_norm_eps: float | None  # None: features-only model (no head)
    head_norm_on: str  # "map" (v1) or "pooled" (v2)
    activation: str  # a key of SUPPORTED_ACTIVATIONS
    has_classifier: bool
    features_only: bool = False  # outputs: each stage's map through its FeatureNorm, not logits


# ---------------------------------------------------------------------------------------------- folding


def _is_bias_free_layernorm(module: nn.Module) -> bool:
    return isinstance(module, LayerNormChannels) and module.bias is None


def _check_supported(model: nn.Module) -> None:
    """ConfigError unless `model` is a MetaFormer whose every part has a folded form here."""
    if not isinstance(model, MetaFormer):
        raise ConfigError(f"optimize() takes a poolformer MetaFormer, not {type(model).__name__}")
    arch = model.arch
    if set(arch.token_mixers) != {"pooling"}:
        mixers = "/".join(sorted(set(arch.token_mixers)))
        raise ConfigError(f"the fast path handles pooling token mixers only, not {mixers}; use --impl ours")
    if not set(arch.norms) <= {"groupnorm", "groupnorm_nobias"}:
        norms = "/".join(sorted(set(arch.norms)))
        raise ConfigError(f"the fast path needs GroupNorm in the blocks, not {norms}; use --impl ours")
    if arch.act not in SUPPORTED_ACTIVATIONS:
        raise ConfigError(f"the fast path has no fused activation {arch.act!r}; use --impl ours")
    if not (isinstance(model.stem.norm, nn.Identity) or _is_bias_free_layernorm(model.stem.norm)):
        raise ConfigError("the fast path handles no norm or a bias-free LayerNorm after the stem; use --impl ours")
    for stage in list(model.stages)[1:]:
        if not (isinstance(stage.downsample.norm, nn.Identity) or _is_bias_free_layernorm(stage.downsample.norm)):
            raise ConfigError("the fast path handles no norm or a bias-free LayerNorm before downsampling")
    if model.head is None:
        if not all(isinstance(norm, GroupNorm1) for norm in model.feature_norms):
            raise ConfigError("the fast path handles GroupNorm output norms of a features-only model only")
    else:
        head_norm = GroupNorm1 if arch.head_norm_on == "map" else LayerNormChannels
        if not isinstance(model.head.norm, head_norm):
            raise ConfigError(f"the fast path does not handle a {type(model.head.norm).__name__} head norm")
    if any(stage.pos_embed is not None for stage in model.stages):
        raise ConfigError("the fast path does not handle position embeddings")


def _scale_vector(module: nn.Module) -> torch.Tensor | None:
    """A Scale's vector (LayerScale/ResScale) in float64, or None where the model has none."""
    return module.scale.detach().double() if hasattr(module, "scale") else None


def _fold_block(block: nn.Module) -> FoldedBlock:
    """Fold one MetaFormerBlock (see the module docstring). Computed in float64, stored as float32."""
    ones = torch.ones(block.norm1.weight.shape[0], dtype=torch.float64)
    layer_scale1 = _scale_vector(block.layer_scale1)
    layer_scale2 = _scale_vector(block.layer_scale2)
    gamma1 = block.norm1.weight.detach().double()
    mix_scale = gamma1 * (layer_scale1 if layer_scale1 is not None else ones)

    fc1 = block.mlp.fc1.weight.detach().double().flatten(1)  # [D, C]
    fc1_bias = block.mlp.fc1.bias.detach().double() if block.mlp.fc1.bias is not None else None
    gamma2 = block.norm2.weight.detach().double()
    beta2 = block.norm2.bias.detach().double() if block.norm2.bias is not None else None
    fc1_folded = fc1 * gamma2[None, :]
    if beta2 is not None:
        fc1_bias = (fc1_bias if fc1_bias is not None else 0.0) + fc1 @ beta2

    fc2 = block.mlp.fc2.weight.detach().double().flatten(1)  # [C, D]
    fc2_bias = block.mlp.fc2.bias.detach().double() if block.mlp.fc2.bias is not None else None
    if isinstance(block.mlp.act, StarReLU):
        act_scale, act_bias = block.mlp.act.scale.detach().double(), block.mlp.act.bias.detach().double()
        fc2_bias = (fc2_bias if fc2_bias is not None else 0.0) + act_bias * fc2.sum(1)
        fc2 = fc2 * act_scale
    if layer_scale2 is not None:
        fc2 = fc2 * layer_scale2[:, None]
        fc2_bias = fc2_bias * layer_scale2 if fc2_bias is not None else None

    def single(t):
        return t.float() if t is not None else None

    return FoldedBlock(
        mix_scale=single(mix_scale),
        skip_scale1=single(_scale_vector(block.res_scale1)),
        fc1_weight=single(fc1_folded),
        fc1_bias=single(fc1_bias),
        fc2_weight=single(fc2),
        fc2_bias=single(fc2_bias),
        skip_scale2=single(_scale_vector(block.res_scale2)),
        norm1_eps=block.norm1.eps,
        norm2_eps=block.norm2.eps,
    )


def pool_minus_identity_weight(channels: int, pool_size: int) -> torch.Tensor:
    """Depthwise weight [C, 1, k, k]: conv(x) = avg_pool(x, count_include_pad=True) - x."""
    weight = torch.full((channels, 1, pool_size, pool_size), 1.0 / pool_size**2, dtype=torch.float64)
    weight[:, :, pool_size // 2, pool_size // 2] -= 1.0
    return weight.float()


def _fold_stage(stage: nn.Module, pool_size: int) -> FoldedStage:
    down_weight = down_bias = None
    if not isinstance(stage.downsample, nn.Identity):
        conv = stage.downsample.conv
        down_weight = conv.weight.detach().double()
        norm = stage.downsample.norm
        if isinstance(norm, LayerNormChannels):  # conv(w * z) = conv_{weight * w along input channels}(z)
            down_weight = down_weight * norm.weight.detach().double()[None, :, None, None]
        down_weight = down_weight.float()
        down_bias = conv.bias.detach().float() if conv.bias is not None else None
    channels = stage.blocks[0].norm1.weight.shape[0] if len(stage.blocks) else 1
    return FoldedStage(down_weight, down_bias, pool_minus_identity_weight(channels, pool_size),
                       tuple(_fold_block(b) for b in stage.blocks))


def _fold_head(model: MetaFormer) -> tuple[torch.Tensor, torch.Tensor]:
    """Classifier with the head norm's affine folded in: fc(gamma * u + beta) = (W * gamma) u + (b + W beta)."""
    norm = model.head.norm
    dim = norm.weight.shape[0]
    gamma = norm.weight.detach().double()
    beta = norm.bias.detach().double() if norm.bias is not None else torch.zeros(dim, dtype=torch.float64)
    fc = model.head.fc
    if isinstance(fc, nn.Linear):
        weight, bias = fc.weight.detach().double(), fc.bias.detach().double()
    else:  # no classifier: the head gives the normalised pooled features
        weight, bias = torch.eye(dim, dtype=torch.float64), torch.zeros(dim, dtype=torch.float64)
    return (weight * gamma[None, :]).float(), (bias + weight @ beta).float()


def _feature_norm(norm: GroupNorm1) -> FeatureNorm:
    bias = norm.bias.detach().float() if norm.bias is not None else None
    return FeatureNorm(norm.weight.detach().float(), bias, norm.eps)


def fold(model: MetaFormer) -> tuple[FoldedModel, Plan]:
    """The folded float32 tensors and the plan of a supported MetaFormer (raises ConfigError otherwise)."""
    _check_supported(model)
    arch = model.arch
    stem_norm = model.stem.norm
    down_norms = [s.downsample.norm for s in list(model.stages)[1:]]
    features_only = model.head is None
    head_weight, head_bias = (None, None) if features_only else _fold_head(model)
    folded = FoldedModel(
        stem_weight=model.stem.conv.weight.detach().float(),
        stem_bias=model.stem.conv.bias.detach().float(),
        stem_norm_weight=stem_norm.weight.detach().float() if isinstance(stem_norm, LayerNormChannels) else None,
        stages=tuple(_fold_stage(s, arch.pool_size) for s in model.stages),
        head_weight=head_weight,
        head_bias=head_bias,
        feature_norms=tuple(_feature_norm(n) for n in model.feature_norms) if features_only else (),
    )
    plan = Plan(
        pool_size=arch.pool_size,
        stem_norm_eps=stem_norm.eps if isinstance(stem_norm, LayerNormChannels) else None,
        down_norm_eps=down_norms[0].eps if down_norms and isinstance(down_norms[0], LayerNormChannels) else None,
        head_norm_eps=None if features_only else model.head.norm.eps,
        head_norm_on=arch.head_norm_on,
        activation=arch.act,
        has_classifier=not features_only and isinstance(model.head.fc, nn.Linear),
        features_only=features_only,
    )
    return folded, plan
