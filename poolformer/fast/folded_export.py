"""The folded model (`poolformer.fast.folding`) as a plain module for export: what the fast path's ONNX Runtime
backend runs and what `poolformer export --fast` writes to ONNX or pt2 (a features-only model: its four
normalised stage maps instead of logits).

No norm affines, no LayerScale, one statistic per norm, so a runtime has fewer operators to run than in the
reference model's export. The pooling and the per-sample statistics are spelled out with the operators every
runtime computes the same way (`poolformer.runtimes.export_forms`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..model import MetaFormer
from ..runtimes.export_forms import inverse_std, mean_pool
from .folding import FeatureNorm, FoldedModel, Plan, fold


class FoldedExport(nn.Module):
    """The folded model (see poolformer.fast.folding) in float32 with plain operators, for export.
    Input [B, 3, H, W], output logits [B, num_classes]; the same logits as the reference model (a features-only
    model: the same four normalised stage maps). dynamic_size: see `poolformer.runtimes.export_forms.mean_pool`."""

    def __init__(self, model: MetaFormer | None = None, folded: FoldedModel | None = None, plan: Plan | None = None,
                 dynamic_size: bool = False):
        super().__init__()
        if model is not None:
            folded, plan = fold(model)
        if folded is None or plan is None:
            raise ValueError("FoldedExport needs a model, or folded tensors and their plan")
        self.plan: Plan = plan
        self.folded: FoldedModel = folded.to(torch.float32, "cpu")
        self.dynamic_size = dynamic_size

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        f, plan = self.folded, self.plan
        maps = []
        x = F.conv2d(x, f.stem_weight, f.stem_bias, stride=4, padding=2)
        if f.stem_norm_weight is not None:
            x = _channel_layernorm(x, plan.stem_norm_eps) * f.stem_norm_weight.view(1, -1, 1, 1)
        for stage in f.stages:
            if stage.down_weight is not None:
                if plan.down_norm_eps is not None:
                    x = _channel_layernorm(x, plan.down_norm_eps)
                x = F.conv2d(x, stage.down_weight, stage.down_bias, stride=2, padding=1)
            for block in stage.blocks:
                x = self._block(x, block)
            maps.append(x)
        if plan.features_only:
            return [_group_norm(m, norm) for m, norm in zip(maps, f.feature_norms)]
        return self._head(x)

    def _block(self, x: torch.Tensor, block) -> torch.Tensor:
        _, inv1 = inverse_std(x, block.norm1_eps)
        mixed = (mean_pool(x, self.plan.pool_size, self.dynamic_size) - x) * (block.mix_scale.view(1, -1, 1, 1) * inv1)
        x1 = (x if block.skip_scale1 is None else x * block.skip_scale1.view(1, -1, 1, 1)) + mixed
        centred, inv2 = inverse_std(x1, block.norm2_eps)
        hidden = F.conv2d(centred * inv2, block.fc1_weight[:, :, None, None], block.fc1_bias)
        hidden = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}.get(self.plan.activation, F.relu)(hidden)
        if self.plan.activation == "starrelu":
            hidden = hidden * hidden
        out = F.conv2d(hidden, block.fc2_weight[:, :, None, None], block.fc2_bias)
        return out + (x1 if block.skip_scale2 is None else x1 * block.skip_scale2.view(1, -1, 1, 1))

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        pooled = x.mean(dim=(2, 3))
        if self.plan.head_norm_on == "map":
            _, inv = inverse_std(x, self.plan.head_norm_eps)
            normalised = (pooled - pooled.mean(dim=1, keepdim=True)) * inv.view(-1, 1)
        else:
            centred = pooled - pooled.mean(dim=1, keepdim=True)
            normalised = centred / torch.sqrt((centred * centred).mean(dim=1, keepdim=True) + self.plan.head_norm_eps)
        return F.linear(normalised, self.folded.head_weight, self.folded.head_bias)


def _group_norm(x: torch.Tensor, norm: FeatureNorm) -> torch.Tensor:
    """A features-only model's output norm, GroupNorm(1) with its affine. [B, C, H, W] -> [B, C, H, W]."""
    centred, inv = inverse_std(x, norm.eps)
    out = centred * inv * norm.weight.view(1, -1, 1, 1)
    return out if norm.bias is None else out + norm.bias.view(1, -1, 1, 1)


def _channel_layernorm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm over channels at each position, no affine. [B, C, H, W] -> [B, C, H, W]."""
    centred = x - x.mean(dim=1, keepdim=True)
    return centred / torch.sqrt((centred * centred).mean(dim=1, keepdim=True) + eps)
