"""Forms of a PoolFormer that export to ONNX as operators every runtime computes the same way.

Two known traps: GroupNorm with one group (TensorRT 10 computes ONNX GroupNormalization with num_groups=1
per channel, NVIDIA/TensorRT#4756; PyTorch's TorchScript exporter writes it as InstanceNormalization over a
reshape) and AveragePool's count_include_pad (mishandled by some backends: onnx/onnx-tensorrt#663,
microsoft/onnxruntime#16203). So the exported graph spells both out:

- GroupNorm(1): ReduceMean of x and of its centred square over (C, H, W), then Sub, Div by Sqrt(var + eps),
  and the per-channel affine: nothing but element-wise ops and reductions.
- pool(x) with count_include_pad=False: a depthwise convolution with weights 1/k^2 (zero padding), times a
  constant [H, W] map of k^2 / (window positions inside the map). The map is fixed by the input size, so these
  forms export for one resolution (the batch may stay dynamic), unless made with `dynamic_size`: then the graph
  computes the map from its input (the same convolution over a [1, 1, H, W] map of ones) and takes any H, W.

`portable_form(model)` rewrites a MetaFormer that way (same weights, same outputs: a features-only model's four
normalised stage maps instead of logits). The fast path's folded model is exported with the same operators
(`poolformer.fast.folded_export`).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import GroupNorm1, Pooling, window_counts
from ..model import MetaFormer


def border_factor(height: int, width: int, pool_size: int) -> torch.Tensor:
    """[1, 1, H, W]: k^2 / (positions of the k x k window inside the map); 1 away from the border."""
    radius = pool_size // 2
    counts = window_counts(height, radius)[:, None] * window_counts(width, radius)[None, :]
    return (pool_size**2 / counts).float()[None, None]


def mean_pool(x: torch.Tensor, pool_size: int, dynamic_size: bool = False) -> torch.Tensor:
    """avg_pool2d(x, k, stride 1, padding k//2, count_include_pad=False) as a depthwise conv and a constant map
    (dynamic_size: the map computed in the graph from x's shape, as the same convolution of ones)."""
    # plain ints: under tracing they become constants, so the exported kernel and map have known shapes
    channels = int(x.shape[1])
    weight = torch.full((channels, 1, pool_size, pool_size), 1.0 / pool_size**2, dtype=x.dtype)
    summed = F.conv2d(x, weight, padding=pool_size // 2, groups=channels)
    if dynamic_size:  # (positions of the window inside the map) / k^2, for any H, W
        inside = F.conv2d(torch.ones_like(x[:1, :1]), weight[:1], padding=pool_size // 2)
        return summed / inside
    height, width = int(x.shape[2]), int(x.shape[3])
    return summed * border_factor(height, width, pool_size).to(x.dtype)


def inverse_std(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x - mean, 1 / sqrt(var + eps)) with the statistics over each sample's (C, H, W)."""
    centred = x - x.mean(dim=(1, 2, 3), keepdim=True)
    variance = (centred * centred).mean(dim=(1, 2, 3), keepdim=True)
    return centred, 1.0 / torch.sqrt(variance + eps)


class ExplicitGroupNorm1(nn.Module):
    """GroupNorm with one group from reductions and element-wise ops. [B, C, H, W] -> [B, C, H, W]."""

    def __init__(self, norm: GroupNorm1):
        super().__init__()
        self.eps = norm.eps
        self.weight, self.bias = norm.weight, norm.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centred, inv = inverse_std(x, self.eps)
        out = centred * inv * self.weight.view(1, -1, 1, 1)
        return out + self.bias.view(1, -1, 1, 1) if self.bias is not None else out


class ConvPooling(nn.Module):
    """PoolFormer's mixer, pool(x) - x, with the pool as `mean_pool`. [B, C, H, W] -> [B, C, H, W]."""

    def __init__(self, pooling: Pooling, dynamic_size: bool = False):
        super().__init__()
        self.pool_size = pooling.pool.kernel_size
        self.dynamic_size = dynamic_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mean_pool(x, self.pool_size, self.dynamic_size) - x


def portable_form(model: MetaFormer, dynamic_size: bool = False) -> MetaFormer:
    """A copy of `model` whose GroupNorm(1)s and pooling mixers are `ExplicitGroupNorm1` and `ConvPooling`
    (same parameters, same outputs); everything else is left as it is. dynamic_size: see `mean_pool`."""
    twin = copy.deepcopy(model).eval()
    for parent in list(twin.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, GroupNorm1):
                setattr(parent, name, ExplicitGroupNorm1(child))
            elif isinstance(child, Pooling):
                setattr(parent, name, ConvPooling(child, dynamic_size))
    return twin
