"""The folded model as an OpenVINO graph built node by node: what the fast path's ``openvino`` backend compiles.

Built from OpenVINO's own operators rather than read from an ONNX export, so that every GroupNorm(1) is one MVN
node (OpenVINO's fused mean-variance normalisation: mean, then the variance about it, eps inside the root, in
one kernel that writes the normalised map once), where the exported graph spells it out as two ReduceMeans and
two element-wise passes that each write a full map. Per block:

    n  = MVN(x)                                   norm1 without its affine (folded into mix_scale)
    x1 = skip1 * x + mix_scale * (AvgPool(n) - n)  AvgPool with exclude_pad: count_include_pad=False
    h  = act(conv1x1(MVN(x1), fc1) + b1)          norm2's affine is in fc1
    x  = conv1x1(h, fc2) + b2 + skip2 * x1        LayerScale (and StarReLU's affine) are in fc2

pool(n) - n equals (pool(x) - x) / sigma because pooling keeps constants (poolformer.fast.folding), so this is
the folded algebra with the standardisation done by MVN. v1's head is mean_hw(MVN(map)); v2's the LayerNorm
(MVN over channels) of mean_hw(map). v2's stem and downsampling LayerNorms are MVNs over the channel axis. A
features-only model's graph has four outputs instead of logits, `stage1` .. `stage4`: each stage's map through
its output norm, MVN(map) * weight + bias.

On a 2-core Zen 5 the built graph ran s12 at 1.08-1.11x the same algebra exported to ONNX, fp32 and bf16 at
batch 1 and 16, and level with OpenVINO's own conversion of the reference model (0.98-1.04x), which makes the
same MVNs and folds the same affines by itself (benchmarks/results/runtimes_cpu_avx512_bf16.md). Either way
86-94% of a forward is OpenVINO's convolutions (benchmarks/results/openvino_profile_avx512_bf16.md). Logits are
the reference's to float32 rounding; OpenVINO's MVN statistics are as accurate as PyTorch's group_norm
(tests/test_fast.py).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..errors import ConfigError
from ..model import stage_output_names
from .folding import FoldedBlock, FoldedModel, Plan

ALL_BUT_BATCH = (1, 2, 3)
CHANNELS = (1,)
SPATIAL = (2, 3)


class _Builder:
    """Node constructors over OpenVINO's opset, with the folded model's float32 tensors as constants."""

    def __init__(self):
        import openvino.opset13 as ops

        self.ops = ops

    def constant(self, tensor: torch.Tensor) -> Any:
        return self.ops.constant(np.ascontiguousarray(tensor.detach().to(torch.float32).cpu().numpy()))

    def channel_vector(self, tensor: torch.Tensor) -> Any:
        """[C] as a [1, C, 1, 1] constant, to scale a map per channel."""
        return self.constant(tensor.reshape(1, -1, 1, 1))

    def axes(self, axes: tuple[int, ...]) -> Any:
        return self.ops.constant(np.array(axes, dtype=np.int64))

    def standardise(self, x: Any, axes: tuple[int, ...], eps: float) -> Any:
        """(x - mean) / sqrt(var + eps) over `axes`: one MVN node."""
        return self.ops.mvn(x, self.axes(axes), True, float(eps), "inside_sqrt")

    def conv(self, x: Any, weight: torch.Tensor, bias: torch.Tensor | None, stride: int = 1, padding: int = 0) -> Any:
        out = self.ops.convolution(x, self.constant(weight), [stride, stride], [padding, padding],
                                   [padding, padding], [1, 1])
        return self.ops.add(out, self.channel_vector(bias)) if bias is not None else out

    def scaled(self, x: Any, scale: torch.Tensor | None) -> Any:
        return x if scale is None else self.ops.multiply(x, self.channel_vector(scale))

    def activation(self, x: Any, name: str) -> Any:
        ops = self.ops
        if name == "gelu":
            return ops.gelu(x, "erf")
        if name == "relu":
            return ops.relu(x)
        if name == "silu":
            return ops.swish(x)
        if name == "starrelu":  # scale and bias are folded into fc2: relu(x)^2 is left
            positive = ops.relu(x)
            return ops.multiply(positive, positive)
        raise ConfigError(f"the OpenVINO graph has no activation {name!r}")

    def block(self, x: Any, block: FoldedBlock, pool_size: int, activation: str) -> Any:
        ops, pad = self.ops, pool_size // 2
        normalised = self.standardise(x, ALL_BUT_BATCH, block.norm1_eps)
        pooled = ops.avg_pool(normalised, [1, 1], [pad, pad], [pad, pad], [pool_size, pool_size], True)  # exclude_pad
        mixed = ops.multiply(ops.subtract(pooled, normalised), self.channel_vector(block.mix_scale))
        x1 = ops.add(self.scaled(x, block.skip_scale1), mixed)
        hidden = self.conv(self.standardise(x1, ALL_BUT_BATCH, block.norm2_eps),
                           block.fc1_weight[:, :, None, None], block.fc1_bias)
        hidden = self.activation(hidden, activation)
        out = self.conv(hidden, block.fc2_weight[:, :, None, None], block.fc2_bias)
        return ops.add(out, self.scaled(x1, block.skip_scale2))

    def model(self, folded: FoldedModel, plan: Plan, shape: tuple[int, int, int, int], dynamic_batch: bool,
              dynamic_size: bool) -> Any:
        import openvino as ov

        ops = self.ops
        sides = [-1, -1] if dynamic_size else list(shape[2:])
        images = ops.parameter([-1 if dynamic_batch else shape[0], shape[1], *sides], ov.Type.f32, name="images")
        maps = []
        x = self.conv(images, folded.stem_weight, folded.stem_bias, stride=4, padding=2)
        if folded.stem_norm_weight is not None:
            x = self.scaled(self.standardise(x, CHANNELS, plan.stem_norm_eps), folded.stem_norm_weight)
        for stage in folded.stages:
            if stage.down_weight is not None:
                if plan.down_norm_eps is not None:
                    x = self.standardise(x, CHANNELS, plan.down_norm_eps)
                x = self.conv(x, stage.down_weight, stage.down_bias, stride=2, padding=1)
            for block in stage.blocks:
                x = self.block(x, block, plan.pool_size, plan.activation)
            maps.append(x)
        if plan.features_only:
            outputs = []
            for name, x, norm in zip(stage_output_names(len(maps)), maps, folded.feature_norms):
                out = self.scaled(self.standardise(x, ALL_BUT_BATCH, norm.eps), norm.weight)
                out = out if norm.bias is None else ops.add(out, self.channel_vector(norm.bias))
                out.output(0).get_tensor().set_names({name})
                outputs.append(out)
            return ov.Model(outputs, [images], "poolformer_folded_features")
        if plan.head_norm_on == "map":  # mean_hw(GN(x)) = mean_hw of the standardised map (affine in the classifier)
            pooled = ops.reduce_mean(self.standardise(x, ALL_BUT_BATCH, plan.head_norm_eps), self.axes(SPATIAL), False)
        else:
            pooled = self.standardise(ops.reduce_mean(x, self.axes(SPATIAL), False), CHANNELS, plan.head_norm_eps)
        logits = ops.add(ops.matmul(pooled, self.constant(folded.head_weight), False, True),
                         self.constant(folded.head_bias))
        logits.output(0).get_tensor().set_names({"logits"})
        return ov.Model([logits], [images], "poolformer_folded")


def build_model(folded: FoldedModel, plan: Plan, shape: tuple[int, ...], dynamic_batch: bool = False,
                dynamic_size: bool = False) -> Any:
    """An `openvino.Model` of the folded model taking float32 images of `shape` [B, 3, H, W] (static; with
    `dynamic_batch` any B, with `dynamic_size` any H, W) to float32 logits [B, num_classes], or a features-only
    model's four normalised maps. Needs openvino installed."""
    if len(shape) != 4:
        raise ConfigError(f"expected an image batch shape [B, 3, H, W], got {list(shape)}")
    return _Builder().model(folded, plan, tuple(int(v) for v in shape), dynamic_batch, dynamic_size)
