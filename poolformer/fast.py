"""Fast exact inference for PoolFormer v1 and v2: `optimize(model)` gives the same logits, faster.

No retraining and no new weights: the reference model's weights are rewritten once, by algebra, into a
form with fewer and cheaper passes over memory.

1. The pooling token mixer needs only one statistic. GroupNorm with one group is, per sample b,
   GN(x) = gamma * (x - mu_b) / sigma_b + beta with sigma_b = sqrt(var_b + eps). Average pooling with
   count_include_pad=False is linear, acts per channel and maps a constant to itself, so
   pool(GN(x)) - GN(x) = (gamma / sigma_b) * (pool(x) - x): mu and beta cancel. The block's first half is
   x1 = res_scale1 * x + (layer_scale1 * gamma1 / sigma_b) * (pool(x) - x), and only sigma_b is computed.
   pool(x) - x itself is one depthwise convolution (weights 1/k^2, centre 1/k^2 - 1; oneDNN runs it several
   times faster than avg_pool2d), exact inside the map; on the border strips, where count_include_pad=False
   averages fewer positions, the result is rescaled in place: pool = (k^2 / count) * pool_including_pad.
   Then one fused multiply-add gives x1.
2. norm2's affine folds into fc1 (fc1' = fc1 * gamma2, b1' = b1 + fc1 @ beta2), leaving a plain
   standardisation; LayerScale folds into fc2 (fc2' = ls2 * fc2); StarReLU's scale and bias fold into
   fc2 too (fc2 @ (s * relu(h)^2 + b) = (s * fc2) @ relu(h)^2 + b * fc2.sum(1)), leaving relu then square.
3. Layout is channels-last ([B, H, W, C] in memory), so every 1x1 convolution is one matrix multiply on
   [B*H*W, C]. On CPU, oneDNN's fused primitives (`torch.ops.mkldnn._linear_pointwise`) run fc1 with its
   activation and fc2 with the residual add, so neither the 4C-wide hidden tensor nor the residual take
   an extra pass; their weights are reordered once into oneDNN's blocked layout (10-20% faster matmuls).
   Very large hidden tensors are processed in row chunks (see MLP_SINGLE_PASS_MAX_BYTES). v2's
   downsampling LayerNorm (no bias) folds into the following convolution.
4. The heads fold too: v1 normalises the map then averages, which equals normalising the averaged map
   with the map's statistics; both heads' affines fold into the classifier.

Precision: the module runs in float32 by default. Under `torch.autocast("cpu", dtype=torch.bfloat16)`
(how `poolformer bench --precision bf16` runs a model), or with `optimize(model, dtype=torch.bfloat16)`,
it runs in bfloat16 with weights converted once and cached; statistics are accumulated in float32 and
the head runs in float32. Logits are always returned as float32.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError
from .layers import GroupNorm1, LayerNormChannels, StarReLU
from .model import MetaFormer

SUPPORTED_ACTIVATIONS = {"gelu": "gelu", "relu": "relu", "silu": "swish", "starrelu": "relu"}  # -> oneDNN name
MKLDNN_DTYPES = (torch.float32, torch.bfloat16)


@dataclass(frozen=True)
class FoldedBlock:
    """One PoolFormer block after folding. C channels, hidden width D.

    mix_scale [C]: layer_scale1 * gamma1, to be divided by the sample's sigma.
    skip_scale1 / skip_scale2 [C] or None: ResScale on the two skips (v2, stages 3-4).
    fc1_weight [D, C], fc1_bias [D] or None: norm2's affine folded in.
    fc2_weight [C, D], fc2_bias [C] or None: LayerScale (and StarReLU's scale and bias) folded in.
    norm1_eps / norm2_eps: the GroupNorms' eps, inside the square root: sigma = sqrt(var + eps).
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


@dataclass(frozen=True)
class FoldedStage:
    """Downsampling convolution ([C_out, C_in, 3, 3], v2's LayerNorm weight folded in), the depthwise
    weight [C, 1, k, k] that computes pool(x) - x (zero padding counted), and the blocks."""

    down_weight: torch.Tensor | None
    down_bias: torch.Tensor | None
    pool_minus_identity: torch.Tensor
    blocks: tuple[FoldedBlock, ...]


@dataclass(frozen=True)
class FoldedModel:
    """All tensors the fast forward needs, in one dtype on one device."""

    stem_weight: torch.Tensor  # [C0, 3, 7, 7]
    stem_bias: torch.Tensor
    stem_norm_weight: torch.Tensor | None  # v2: LayerNorm over channels after the stem (no bias)
    stages: tuple[FoldedStage, ...]
    head_weight: torch.Tensor  # [num_classes, C]; the head norm's affine folded in (identity if no classifier)
    head_bias: torch.Tensor

    def to(self, dtype: torch.dtype, device: torch.device) -> FoldedModel:
        """A copy with every tensor converted; the head stays float32 (it is tiny and sets the logits).
        Where oneDNN runs the MLP, its weights are also reordered once into oneDNN's blocked layout."""
        converted = _convert(self, dtype, device, keep_float=("head_weight", "head_bias"))
        if not _mkldnn_runs(dtype, torch.device(device)):
            return converted
        return replace(converted, stages=tuple(
            replace(stage, blocks=tuple(_pack_mlp(block) for block in stage.blocks)) for stage in converted.stages))


def _pack_mlp(block: FoldedBlock) -> FoldedBlock:
    """fc1/fc2 weights in oneDNN's own layout (an opaque mkldnn tensor): saves a reorder on every call."""
    pack = torch.ops.mkldnn._reorder_linear_weight
    return replace(block, fc1_weight=pack(block.fc1_weight), fc2_weight=pack(block.fc2_weight))


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
    head_norm_eps: float
    head_norm_on: str  # "map" (v1) or "pooled" (v2)
    activation: str  # a key of SUPPORTED_ACTIVATIONS
    has_classifier: bool


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


def fold(model: MetaFormer) -> tuple[FoldedModel, Plan]:
    """The folded float32 tensors and the plan of a supported MetaFormer (raises ConfigError otherwise)."""
    _check_supported(model)
    arch = model.arch
    stem_norm = model.stem.norm
    down_norms = [s.downsample.norm for s in list(model.stages)[1:]]
    head_weight, head_bias = _fold_head(model)
    folded = FoldedModel(
        stem_weight=model.stem.conv.weight.detach().float(),
        stem_bias=model.stem.conv.bias.detach().float(),
        stem_norm_weight=stem_norm.weight.detach().float() if isinstance(stem_norm, LayerNormChannels) else None,
        stages=tuple(_fold_stage(s, arch.pool_size) for s in model.stages),
        head_weight=head_weight,
        head_bias=head_bias,
    )
    plan = Plan(
        pool_size=arch.pool_size,
        stem_norm_eps=stem_norm.eps if isinstance(stem_norm, LayerNormChannels) else None,
        down_norm_eps=down_norms[0].eps if down_norms and isinstance(down_norms[0], LayerNormChannels) else None,
        head_norm_eps=model.head.norm.eps,
        head_norm_on=arch.head_norm_on,
        activation=arch.act,
        has_classifier=isinstance(model.head.fc, nn.Linear),
    )
    return folded, plan


# ---------------------------------------------------------------------------------------------- kernels


def per_sample_inv_sigma(x: torch.Tensor, eps: float) -> torch.Tensor:
    """1 / sqrt(var + eps) over all of each sample's elements: [B, ...] -> [B] float32.

    float32: from the sum and the sum of squares (one read each, accumulated in float32). Reduced precision:
    LayerNorm's kernel, which keeps the statistics in float32 (the reductions above are slower there).
    """
    flat = x.reshape(x.shape[0], -1)
    count = flat.shape[1]
    if x.dtype != torch.float32:
        return torch.native_layer_norm(flat, [count], None, None, eps)[2].view(-1).float()
    mean = flat.sum(1) / count
    mean_square = torch.linalg.vector_norm(flat, dim=1).square() / count
    return torch.rsqrt((mean_square - mean.square()).clamp_min(0.0) + eps)


def _clipped_spans(length: int, radius: int) -> tuple[list[slice], slice]:
    """Along one axis: the spans where a window of `radius` is clipped by the border, and the span between."""
    if length <= 2 * radius:
        return [slice(0, length)], slice(0, 0)
    return [slice(0, radius), slice(length - radius, length)], slice(radius, length - radius)


def _window_counts(length: int, radius: int) -> torch.Tensor:
    """[length] float64: how many positions of a (2 radius + 1) window lie inside the axis."""
    index = torch.arange(length)
    return ((index + radius).clamp(max=length - 1) - (index - radius).clamp(min=0) + 1).double()


@lru_cache(maxsize=64)
def _border_factor(height: int, width: int, pool_size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[H, W, 1]: k^2 / (positions of the window inside the map), 1 away from the border."""
    radius = pool_size // 2
    counts = _window_counts(height, radius)[:, None] * _window_counts(width, radius)[None, :]
    return (pool_size**2 / counts).to(device=device, dtype=dtype)[..., None]


def pool_minus_identity(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """avg_pool(x, k, stride 1, count_include_pad=False) - x for channels-last x [B, H, W, C] -> [B, H, W, C].

    A depthwise convolution gives the zero-padded average minus x; where the window is clipped (border
    strips, radius k//2 wide) the average is rescaled by k^2 / count: q = f * (q + x) - x with f >= 1.
    """
    pool_size = weight.shape[-1]
    radius = pool_size // 2
    out = F.conv2d(x.permute(0, 3, 1, 2), weight, None, padding=radius, groups=x.shape[-1])
    out = out.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)
    if radius == 0:
        return out
    height, width = x.shape[1:3]
    factor = _border_factor(height, width, pool_size, x.dtype, x.device)
    row_spans, middle_rows = _clipped_spans(height, radius)
    column_spans, _ = _clipped_spans(width, radius)
    regions = [(rows, slice(None)) for rows in row_spans] + [(middle_rows, cols) for cols in column_spans]
    for rows, cols in regions:
        strip, inputs = out[:, rows, cols], x[:, rows, cols]
        strip.add_(inputs).mul_(factor[rows, cols]).sub_(inputs)
    return out


def pool_mix(x: torch.Tensor, block: FoldedBlock, pool_weight: torch.Tensor) -> torch.Tensor:
    """The block's first half: [B, H, W, C] -> [B, H, W, C],
    x1 = skip_scale1 * x + (mix_scale / sigma_b) * (pool(x) - x)."""
    batch, channels = x.shape[0], x.shape[-1]
    inv_sigma = per_sample_inv_sigma(x, block.norm1_eps)
    scale = (block.mix_scale.float()[None, :] * inv_sigma[:, None]).to(x.dtype).view(batch, 1, 1, channels)
    mixed = pool_minus_identity(x, pool_weight)
    skip = x if block.skip_scale1 is None else x * block.skip_scale1
    return torch.addcmul(skip, scale, mixed)


def _mkldnn_runs(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the MLP runs on oneDNN's fused primitives for tensors of this dtype on this device."""
    return device.type == "cpu" and dtype in MKLDNN_DTYPES and torch.backends.mkldnn.is_available()


def _use_mkldnn(x: torch.Tensor) -> bool:
    return _mkldnn_runs(x.dtype, x.device)


def linear_act(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str) -> torch.Tensor:
    """act(x @ weight.T + bias) for x [N, C], weight [D, C] -> [N, D]; StarReLU leaves relu(.)^2."""
    if _use_mkldnn(x):
        out = torch.ops.mkldnn._linear_pointwise(x, weight, bias, SUPPORTED_ACTIVATIONS[activation], [], "none")
    else:
        out = F.linear(x, weight, bias)
        out = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu, "starrelu": F.relu}[activation](out)
    return out.square_() if activation == "starrelu" else out


def linear_add(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
               ) -> torch.Tensor:
    """residual + x @ weight.T + bias for x [N, D], residual [N, C], weight [C, D] -> [N, C]."""
    if _use_mkldnn(x):
        return torch.ops.mkldnn._linear_pointwise.binary(x, residual, weight, bias, "add")
    return torch.addmm(residual if bias is None else residual + bias, x, weight.t())


# Above this size a hidden tensor [rows, D] is a fresh mmap (glibc's largest mmap threshold is 32 MiB) whose
# pages fault in on every call; the MLP then runs over row chunks of MLP_CHUNK_BYTES of hidden activations.
MLP_SINGLE_PASS_MAX_BYTES = 32 << 20
MLP_CHUNK_BYTES = 8 << 20


def mlp_with_residual(
    standardised: torch.Tensor, skip: torch.Tensor, block: FoldedBlock, activation: str
) -> torch.Tensor:
    """skip + fc2(act(fc1(standardised))) for rows [N, C] -> [N, C], in row chunks when the hidden [N, D] is
    big (rows are independent: chunks change only the matmul kernels' rounding)."""
    rows = standardised.shape[0]
    hidden_row_bytes = block.fc1_weight.shape[0] * standardised.element_size()
    if rows * hidden_row_bytes <= MLP_SINGLE_PASS_MAX_BYTES:
        hidden = linear_act(standardised, block.fc1_weight, block.fc1_bias, activation)
        return linear_add(hidden, skip, block.fc2_weight, block.fc2_bias)
    chunk = max(1, MLP_CHUNK_BYTES // hidden_row_bytes)
    out = torch.empty_like(skip)
    for start in range(0, rows, chunk):
        part = slice(start, start + chunk)
        hidden = linear_act(standardised[part], block.fc1_weight, block.fc1_bias, activation)
        out[part] = linear_add(hidden, skip[part], block.fc2_weight, block.fc2_bias)
    return out


def block_forward(x: torch.Tensor, block: FoldedBlock, pool_weight: torch.Tensor, plan: Plan) -> torch.Tensor:
    """One folded PoolFormer block on channels-last x [B, H, W, C] -> [B, H, W, C]."""
    batch, height, width, channels = x.shape
    x1 = pool_mix(x, block, pool_weight)
    standardised = F.layer_norm(x1.reshape(batch, -1), (height * width * channels,), eps=block.norm2_eps)
    skip = x1 if block.skip_scale2 is None else x1 * block.skip_scale2
    out = mlp_with_residual(standardised.view(-1, channels), skip.view(-1, channels), block, plan.activation)
    return out.view_as(x)


def _conv_channels_last(x: torch.Tensor, weight: torch.Tensor, bias, stride: int, padding: int) -> torch.Tensor:
    """Convolution of [B, H, W, C] (as memory) -> [B, H', W', C']."""
    out = F.conv2d(x.permute(0, 3, 1, 2), weight, bias, stride=stride, padding=padding)
    return out.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)


def head_forward(x: torch.Tensor, folded: FoldedModel, plan: Plan) -> torch.Tensor:
    """[B, H, W, C] -> logits [B, num_classes] in float32.

    v1 ("map"): mean_hw(GN(x)) = gamma * (mean_hw(x) - mu) / sigma + beta, mu and sigma of the whole map.
    v2 ("pooled"): LayerNorm of mean_hw(x). Either way the affine is folded into the classifier.
    """
    x = x.float()
    pooled = x.mean((1, 2))  # [B, C]
    if plan.head_norm_on == "map":
        mean = pooled.mean(1, keepdim=True)  # every channel has H*W positions: the map's mean
        normalised = (pooled - mean) * per_sample_inv_sigma(x, plan.head_norm_eps)[:, None]
    else:
        normalised = F.layer_norm(pooled, pooled.shape[-1:], eps=plan.head_norm_eps)
    return F.linear(normalised, folded.head_weight, folded.head_bias)


def features_forward(x: torch.Tensor, folded: FoldedModel, plan: Plan) -> torch.Tensor:
    """Stem and stages: images [B, 3, H, W] in the compute dtype -> last map [B, H/32, W/32, C] channels-last."""
    x = _conv_channels_last(x.permute(0, 2, 3, 1), folded.stem_weight, folded.stem_bias, stride=4, padding=2)
    if folded.stem_norm_weight is not None:
        x = F.layer_norm(x, x.shape[-1:], folded.stem_norm_weight, None, plan.stem_norm_eps)
    for stage in folded.stages:
        if stage.down_weight is not None:
            if plan.down_norm_eps is not None:
                x = F.layer_norm(x, x.shape[-1:], eps=plan.down_norm_eps)
            x = _conv_channels_last(x, stage.down_weight, stage.down_bias, stride=2, padding=1)
        for block in stage.blocks:
            x = block_forward(x, block, stage.pool_minus_identity, plan)
    return x


# ---------------------------------------------------------------------------------------------- module


class FastPoolFormer(nn.Module):
    """Inference-only PoolFormer with the reference model's outputs. Input [B, 3, H, W] (any H, W >= 32),
    output float32 logits [B, num_classes].

    Runs in `dtype` (float32 unless given), or in bfloat16 when called under CPU bf16 autocast.
    Weights are converted to each (dtype, device) it meets once and cached.
    """

    def __init__(self, model: MetaFormer, dtype: torch.dtype | None = None):
        super().__init__()
        if dtype is not None and dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ConfigError(f"optimize() runs in float32, bfloat16 or float16, not {dtype}")
        self.folded, self.plan = fold(model)
        self.dtype = dtype or torch.float32
        self.spec = getattr(model, "spec", None)
        self.arch = model.arch
        self.num_classes = model.num_classes
        self._cache: dict[tuple[torch.dtype, torch.device], FoldedModel] = {}
        self.eval()

    def compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        """bfloat16/float16 under autocast on x's device, else the dtype given to optimize()."""
        if torch.is_autocast_enabled(x.device.type):
            return torch.get_autocast_dtype(x.device.type)
        return self.dtype

    def folded_for(self, dtype: torch.dtype, device: torch.device) -> FoldedModel:
        key = (dtype, device)
        if key not in self._cache:
            self._cache[key] = self.folded.to(dtype, device)
        return self._cache[key]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, C, H/32, W/32] (a channels-last view), like MetaFormer.forward_features."""
        return self._run(x, features_only=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x, features_only=False)

    def _run(self, x: torch.Tensor, features_only: bool) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.folded.stem_weight.shape[1]:
            raise ConfigError(f"expected images [B, {self.folded.stem_weight.shape[1]}, H, W], got {list(x.shape)}")
        dtype = self.compute_dtype(x)
        folded = self.folded_for(dtype, x.device)
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
            images = x.to(dtype).contiguous(memory_format=torch.channels_last)
            features = features_forward(images, folded, self.plan)
            if features_only:
                return features.permute(0, 3, 1, 2)
            return head_forward(features, folded, self.plan)

    def extra_repr(self) -> str:
        name = self.spec.name if self.spec is not None else "MetaFormer"
        return f"{name}, dtype={self.dtype}, blocks={sum(len(s.blocks) for s in self.folded.stages)}"


def optimize(model: MetaFormer, dtype: torch.dtype | None = None) -> FastPoolFormer:
    """An inference-only form of a PoolFormer v1/v2 `model` with the same logits, faster (see module doc).

    dtype: run in this dtype (float32 default; torch.bfloat16 for the fast bf16 path on CPUs with
    AVX512-BF16/AMX). Under CPU bf16 autocast the module switches to bfloat16 by itself.
    Raises ConfigError for models the fast path does not cover (non-pooling token mixers, other norms).
    """
    return FastPoolFormer(model, dtype=dtype)
