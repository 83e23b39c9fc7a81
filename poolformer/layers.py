"""Building blocks of the MetaFormer: token mixers, norms, activations, MLP and scales.

Every module here takes and gives tensors of shape [B, C, H, W] (channels first), so PoolFormer v1, v2
and the ablations share one block. Registries map the names used in `zoo.ArchConfig` to constructors.
"""

from __future__ import annotations

import difflib
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError


class _ChannelAffineNorm(nn.Module):
    """A normalisation with a per-channel weight and optional bias (the two norms below differ only in which
    axes their statistics cover)."""

    def __init__(self, dim: int, eps: float = 1e-5, bias: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None


class GroupNorm1(_ChannelAffineNorm):
    """GroupNorm with one group: statistics over (C, H, W) of each sample, affine per channel.

    This is the PoolFormer paper's "Modified Layer Normalization". Input/output: [B, C, H, W].
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, 1, self.weight, self.bias, self.eps)


class LayerNormChannels(_ChannelAffineNorm):
    """LayerNorm over channels only, independently at every position. Input/output: [B, C, H, W].

    written_out=True computes it from mean, variance and sqrt, as the PoolFormer paper's LayerNormChannel
    does: the same values, and MAC counters see it as the authors' published counts did (fvcore charges these
    elementary ops nothing), so the paper's hybrids reproduce their figures. Otherwise F.layer_norm, as timm's
    PoolFormerV2 (bit-identical logits there).
    """

    def __init__(self, dim: int, eps: float = 1e-5, bias: bool = True, written_out: bool = False):
        super().__init__(dim, eps, bias)
        self.written_out = written_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.written_out:
            x = F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], self.weight, self.bias, self.eps)
            return x.permute(0, 3, 1, 2)
        centred = x - x.mean(1, keepdim=True)
        x = centred / torch.sqrt(centred.pow(2).mean(1, keepdim=True) + self.eps)
        x = x * self.weight.view(1, -1, 1, 1)
        return x + self.bias.view(1, -1, 1, 1) if self.bias is not None else x


def _no_norm(dim: int) -> nn.Module:
    return nn.Identity()


NORMS: dict[str, Callable[[int], nn.Module]] = {
    "groupnorm": partial(GroupNorm1, eps=1e-5),
    "groupnorm_nobias": partial(GroupNorm1, eps=1e-6, bias=False),
    "layernorm": partial(LayerNormChannels, eps=1e-5, written_out=True),  # the PoolFormer paper's
    "layernorm_eps6": partial(LayerNormChannels, eps=1e-6),
    "layernorm_nobias": partial(LayerNormChannels, eps=1e-6, bias=False),
    "batchnorm": nn.BatchNorm2d,
    "none": _no_norm,
}


class StarReLU(nn.Module):
    """s * relu(x)**2 + b with learnable scalars s and b (MetaFormer Baselines)."""

    def __init__(self, scale: float = 1.0, bias: float = 0.0):
        super().__init__()
        self.scale = nn.Parameter(torch.full((1,), scale))
        self.bias = nn.Parameter(torch.full((1,), bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * F.relu(x) ** 2 + self.bias


ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "gelu": nn.GELU,
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "starrelu": StarReLU,
}


class Pooling(nn.Module):
    """PoolFormer's token mixer: avg_pool(x) - x, the pool ignoring padded positions.

    Subtracting x lets the block's residual carry the input unchanged. Input/output: [B, C, H, W].
    """

    def __init__(self, dim: int, pool_size: int = 3, **_):
        super().__init__()
        self.pool = nn.AvgPool2d(pool_size, stride=1, padding=pool_size // 2, count_include_pad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(x) - x


def window_counts(length: int, radius: int) -> torch.Tensor:
    """[length] float64: how many positions of a (2 radius + 1) window lie inside the axis, the divisor of
    `Pooling`'s average along it (padding is not counted)."""
    index = torch.arange(length)
    return ((index + radius).clamp(max=length - 1) - (index - radius).clamp(min=0) + 1).double()


class DepthwiseConvMixer(nn.Module):
    """Ablation mixer: a 3x3 depthwise convolution with bias. Input/output: [B, C, H, W]."""

    def __init__(self, dim: int, kernel_size: int = 3, **_):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def _check_tokens(module: nn.Module, x: torch.Tensor, num_tokens: int) -> None:
    if x.shape[-2] * x.shape[-1] != num_tokens:
        raise ConfigError(
            f"{type(module).__name__} was built for {num_tokens} tokens but the input has "
            f"{x.shape[-2]}x{x.shape[-1]}; build the model with img_size= the input resolution"
        )


class RandomMixing(nn.Module):
    """Ablation mixer: a frozen, row-softmaxed random token-mixing matrix [N, N] (N = H*W at img_size).

    Input/output: [B, C, H, W]; H*W must equal N.
    """

    def __init__(self, dim: int, num_tokens: int, **_):
        super().__init__()
        self.num_tokens = num_tokens
        self.random_matrix = nn.Parameter(torch.softmax(torch.rand(num_tokens, num_tokens), dim=-1), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_tokens(self, x, self.num_tokens)
        b, c, h, w = x.shape
        return torch.matmul(x.reshape(b, c, h * w), self.random_matrix.t()).reshape(b, c, h, w)


class SpatialFC(nn.Module):
    """Hybrid-model mixer: one fully connected layer (no bias) over the token dimension.

    Input/output: [B, C, H, W]; H*W must equal the num_tokens it was built for.
    """

    def __init__(self, dim: int, num_tokens: int, **_):
        super().__init__()
        self.num_tokens = num_tokens
        self.fc = nn.Linear(num_tokens, num_tokens, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_tokens(self, x, self.num_tokens)
        b, c, h, w = x.shape
        return self.fc(x.reshape(b, c, h * w)).reshape(b, c, h, w)


class Attention(nn.Module):
    """Multi-head self-attention over the H*W tokens; head_dim 32, no qkv bias. Input/output: [B, C, H, W]."""

    def __init__(self, dim: int, head_dim: int = 32, **_):
        super().__init__()
        self.num_heads = max(dim // head_dim, 1)
        self.head_dim = dim // self.num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)  # [B, N, C]
        qkv = self.qkv(tokens).reshape(b, h * w, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each [B, heads, N, head_dim]
        attn = torch.matmul(q * self.scale, k.transpose(-2, -1)).softmax(dim=-1)
        out = torch.matmul(attn, v).transpose(1, 2).reshape(b, h * w, c)
        return self.proj(out).transpose(1, 2).reshape(b, c, h, w)


def _identity_mixer(dim: int, **_) -> nn.Module:
    return nn.Identity()


TOKEN_MIXERS: dict[str, Callable[..., nn.Module]] = {
    "pooling": Pooling,
    "identity": _identity_mixer,
    "random": RandomMixing,
    "dwconv": DepthwiseConvMixer,
    "attention": Attention,
    "spatial_fc": SpatialFC,
}


def lookup(registry: dict[str, Callable], kind: str, name: str) -> Callable:
    """registry[name], or a ConfigError that names the closest valid choices."""
    if name in registry:
        return registry[name]
    close = difflib.get_close_matches(name, registry, n=3, cutoff=0.5)
    hint = f"did you mean: {', '.join(close)}?" if close else f"choose from: {', '.join(registry)}"
    raise ConfigError(f"unknown {kind} {name!r}; {hint}")


class Scale(nn.Module):
    """Learnable per-channel scale (LayerScale or ResScale). Input/output: [B, C, H, W]."""

    def __init__(self, dim: int, init_value: float):
        super().__init__()
        self.scale = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale.view(1, -1, 1, 1)


class Mlp(nn.Module):
    """Channel MLP as two 1x1 convolutions: [B, C, H, W] -> [B, hidden, H, W] -> [B, C, H, W]."""

    def __init__(self, dim: int, hidden: int, act: Callable[[], nn.Module], bias: bool = True):
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden, 1, bias=bias)
        self.act = act()
        self.fc2 = nn.Conv2d(hidden, dim, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DropPath(nn.Module):
    """Stochastic depth: during training, zero a sample's residual branch with probability p."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"
