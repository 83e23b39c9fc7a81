"""One general MetaFormer; every zoo entry (PoolFormer v1, v2, ablations, hybrids) is a configuration of it."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .errors import ConfigError
from .layers import ACTIVATIONS, NORMS, TOKEN_MIXERS, DropPath, Mlp, Scale, lookup
from .zoo import ArchConfig, ModelSpec, get_spec

STEM_STRIDE = 4  # then each later stage halves the resolution: strides 4, 8, 16, 32


class MetaFormerBlock(nn.Module):
    """x + LayerScale(TokenMixer(Norm(x))), then x + LayerScale(Mlp(Norm(x))); ResScale may scale the skip.

    Input/output: [B, C, H, W].
    """

    def __init__(self, dim: int, arch: ArchConfig, stage: int, drop_path: float, num_tokens: int):
        super().__init__()
        norm = lookup(NORMS, "norm", arch.norms[stage])
        mixer = lookup(TOKEN_MIXERS, "token mixer", arch.token_mixers[stage])
        act = lookup(ACTIVATIONS, "activation", arch.act)
        layer_scale, res_scale = arch.layer_scale_init, arch.res_scale_init[stage]

        self.norm1 = norm(dim)
        self.token_mixer = mixer(dim, pool_size=arch.pool_size, num_tokens=num_tokens)
        self.drop_path = DropPath(drop_path)
        self.layer_scale1 = Scale(dim, layer_scale) if layer_scale is not None else nn.Identity()
        self.res_scale1 = Scale(dim, res_scale) if res_scale is not None else nn.Identity()
        self.norm2 = norm(dim)
        self.mlp = Mlp(dim, int(dim * arch.mlp_ratio), act, bias=arch.mlp_bias)
        self.layer_scale2 = Scale(dim, layer_scale) if layer_scale is not None else nn.Identity()
        self.res_scale2 = Scale(dim, res_scale) if res_scale is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.res_scale1(x) + self.layer_scale1(self.drop_path(self.token_mixer(self.norm1(x))))
        return self.res_scale2(x) + self.layer_scale2(self.drop_path(self.mlp(self.norm2(x))))


class Stem(nn.Module):
    """7x7 stride-4 patch embedding: [B, 3, H, W] -> [B, C, H/4, W/4] (optionally normalised after)."""

    def __init__(self, in_chans: int, dim: int, norm: str):
        super().__init__()
        self.conv = nn.Conv2d(in_chans, dim, 7, stride=STEM_STRIDE, padding=2)
        self.norm = lookup(NORMS, "norm", norm)(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


class Downsample(nn.Module):
    """(Optional norm, then) 3x3 stride-2 conv between stages: [B, C, H, W] -> [B, C', ceil(H/2), ceil(W/2)]."""

    def __init__(self, in_dim: int, out_dim: int, norm: str):
        super().__init__()
        self.norm = lookup(NORMS, "norm", norm)(in_dim)
        self.conv = nn.Conv2d(in_dim, out_dim, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.norm(x))


def img_sides(img_size: int | tuple[int, int]) -> tuple[int, int]:
    """ArchConfig.img_size as (height, width): the side of a square, or the pair itself."""
    return (img_size, img_size) if isinstance(img_size, int) else (int(img_size[0]), int(img_size[1]))


def stage_side(size: int, stage: int) -> int:
    """Side of stage `stage`'s map for an input side `size`: the 7x7/4 stem (padding 2), then a 3x3/2 conv
    (padding 1) per later stage. Equals size // (4 * 2**stage) only when size is a multiple of 32."""
    side = (size + 2 * 2 - 7) // STEM_STRIDE + 1
    for _ in range(stage):
        side = (side + 2 * 1 - 3) // 2 + 1
    return side


def stage_output_names(stages: int = 4) -> tuple[str, ...]:
    """The names a features-only model's outputs carry in exported files: stage1 .. stageN, the stage maps at
    strides 4, 8, 16, 32 through their output norms."""
    return tuple(f"stage{i}" for i in range(1, stages + 1))


class MetaFormerStage(nn.Module):
    """Downsampling (stages 2-4), an optional learned position embedding, then `depth` blocks."""

    def __init__(self, arch: ArchConfig, stage: int, drop_paths: Sequence[float], pos_embed: bool):
        super().__init__()
        dim = arch.dims[stage]
        height, width = (stage_side(side, stage) for side in img_sides(arch.img_size))
        self.downsample = Downsample(arch.dims[stage - 1], dim, arch.downsample_norm) if stage > 0 else nn.Identity()
        self.pos_embed = nn.Parameter(torch.zeros(1, dim, height, width)) if pos_embed else None
        self.blocks = nn.Sequential(
            *[MetaFormerBlock(dim, arch, stage, drop_paths[j], height * width) for j in range(arch.depths[stage])]
        )
        self.grad_checkpointing = False  # see MetaFormer.set_grad_checkpointing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.pos_embed is not None:
            pos = self.pos_embed
            if pos.shape[-2:] != x.shape[-2:]:
                pos = F.interpolate(pos, size=x.shape[-2:], mode="bicubic", align_corners=False)
            x = x + pos
        if self.grad_checkpointing and torch.is_grad_enabled():
            for block in self.blocks:
                x = checkpoint(block, x, use_reentrant=False)
            return x
        return self.blocks(x)


class Head(nn.Module):
    """Final norm, global average pool and classifier: [B, C, H, W] -> [B, num_classes].

    norm_on="map" (PoolFormer v1, as in the original code): normalise the 4-D map, then average.
    norm_on="pooled" (PoolFormerV2): average, then normalise the [B, C] vector.
    """

    def __init__(self, dim: int, num_classes: int, norm: str, norm_on: str):
        super().__init__()
        if norm_on not in ("map", "pooled"):
            raise ConfigError(f"head_norm_on must be 'map' or 'pooled', not {norm_on!r}")
        self.norm_on = norm_on
        self.norm = lookup(NORMS, "norm", norm)(dim)
        self.fc = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.norm_on == "map":
            x = self.norm(x).mean((-2, -1))
        else:
            x = self.norm(x.mean((-2, -1), keepdim=True)).flatten(1)
        return x if pre_logits else self.fc(x)


class MetaFormer(nn.Module):
    """The MetaFormer meta-architecture: stem, four stages of blocks, head. Input: [B, 3, H, W], any H, W.

    `forward` gives logits [B, num_classes]; `forward_stages` the four maps at strides 4, 8, 16, 32 (for
    detection and segmentation backbones); `forward_features` the last one.

    features_only: a backbone for dense tasks, as the original code's `fork_feat=True`: no head, and `forward`
    gives the four stage maps each through its own norm (`feature_norms`, the stage's block norm: GroupNorm(1)
    for v1, the official `norm0`/`norm2`/`norm4`/`norm6`).
    """

    def __init__(self, arch: ArchConfig, num_classes: int = 1000, features_only: bool = False):
        super().__init__()
        _validate(arch)
        self.arch = arch
        self.features_only = features_only
        self.num_classes = 0 if features_only else num_classes
        total = sum(arch.depths)
        rates = [arch.drop_path_rate * i / max(total - 1, 1) for i in range(total)]  # linear in depth
        first_attention = next((i for i, m in enumerate(arch.token_mixers) if m == "attention"), None)

        self.stem = Stem(arch.in_chans, arch.dims[0], arch.stem_norm)
        stages, start = [], 0
        for i, depth in enumerate(arch.depths):
            stages.append(MetaFormerStage(arch, i, rates[start : start + depth], pos_embed=i == first_attention))
            start += depth
        self.stages = nn.Sequential(*stages)
        if features_only:
            self.head = None
            self.feature_norms = nn.ModuleList(lookup(NORMS, "norm", norm)(dim)
                                               for norm, dim in zip(arch.norms, arch.dims))
        else:
            self.head = Head(arch.dims[-1], num_classes, arch.head_norm, arch.head_norm_on)
        self.apply(_init_weights)
        for stage in self.stages:
            if stage.pos_embed is not None:
                nn.init.trunc_normal_(stage.pos_embed, std=0.02)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Gradient checkpointing, as timm's `set_grad_checkpointing`: each block of every stage keeps only its
        input for backward and recomputes the rest there (less memory, about one more forward of time)."""
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @property
    def stage_strides(self) -> tuple[int, ...]:
        return tuple(STEM_STRIDE * 2**i for i in range(len(self.stages)))

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Multi-scale features: one [B, C_i, H/s_i, W/s_i] map per stage, s_i = 4, 8, 16, 32."""
        x = self.stem(x)
        maps = []
        for stage in self.stages:
            x = stage(x)
            maps.append(x)
        return maps

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> the last stage's map [B, C_4, H/32, W/32] (before the head's norm)."""
        return self.stages(self.stem(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.head is None:
            raise ConfigError("a features-only model has no head")
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """Logits [B, num_classes]; with features_only the four normalised stage maps (strides 4-32)."""
        if self.head is None:
            return [norm(m) for norm, m in zip(self.feature_norms, self.forward_stages(x))]
        return self.head(self.forward_features(x))


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def _validate(arch: ArchConfig) -> None:
    n = len(arch.depths)
    for field in ("dims", "token_mixers", "norms", "res_scale_init"):
        if len(getattr(arch, field)) != n:
            raise ConfigError(f"{field} needs one entry per stage ({n}), got {getattr(arch, field)!r}")
    if n < 1 or min(arch.depths) < 0 or min(arch.dims) < 1:
        raise ConfigError("depths must be >= 0 and dims >= 1, with at least one stage")
    if arch.pool_size < 1 or arch.pool_size % 2 == 0:
        raise ConfigError(f"pool_size must be a positive odd number, not {arch.pool_size}")
    min_size = STEM_STRIDE * 2 ** (n - 1)
    if not isinstance(arch.img_size, int) and len(arch.img_size) != 2:
        raise ConfigError(f"img_size is one side or (height, width), not {arch.img_size!r}")
    if min(img_sides(arch.img_size)) < min_size:
        raise ConfigError(f"img_size must be at least {min_size} on every side for {n} stages, not {arch.img_size}")


# Overrides that take one value and set a per-stage field for every stage.
_PER_STAGE = {"token_mixer": "token_mixers", "norm": "norms"}


def apply_overrides(arch: ArchConfig, overrides: dict[str, Any]) -> ArchConfig:
    """A copy of `arch` with user overrides: any ArchConfig field, plus token_mixer= and norm= (one name for
    every stage, or a sequence with one per stage). Following the original code, norm= also sets the head's
    norm when the head normalises the 4-D map (v1)."""
    changes: dict[str, Any] = {}
    fields = {f.name for f in dataclasses.fields(ArchConfig)}
    for key, value in overrides.items():
        target = _PER_STAGE.get(key, key)
        if target not in fields:
            known = ", ".join(sorted(fields | set(_PER_STAGE)))
            raise ConfigError(f"unknown model option {key!r}; known: {known}")
        if target in ("token_mixers", "norms", "res_scale_init", "depths", "dims"):
            value = tuple(value) if isinstance(value, (list, tuple)) else (value,) * len(arch.depths)
        if target == "img_size" and isinstance(value, list):
            value = tuple(value)  # (height, width), hashable like the rest of ArchConfig
        changes[target] = value
    if "norm" in overrides and "head_norm" not in overrides and arch.head_norm_on == "map":
        changes["head_norm"] = changes["norms"][-1]
    return dataclasses.replace(arch, **changes)


def create_model(
    name: str,
    *,
    weights: str | None = None,
    pretrained: bool = False,
    num_classes: int = 1000,
    features_only: bool = False,
    **overrides: Any,
) -> MetaFormer:
    """Build a zoo model by name or alias, in eval mode.

    weights: a checkpoint file in any supported layout (official sail-sg, timm, Hugging Face transformers;
        .pth/.pth.tar/.safetensors), loaded safely. pretrained: download the published weights (or use the
        cached copy). overrides: architecture changes such as token_mixer="dwconv", pool_size=5,
        norm="batchnorm", act="relu", img_size=384 or (800, 1333) (see `ArchConfig`).
    features_only: the backbone of a detection or segmentation model (see `MetaFormer`); it loads the
        official mmdet/mmseg checkpoints (the backbone's keys; the task heads' are set aside) and, for a
        backbone to fine-tune, classification weights (their head set aside, the feature norms left at
        weight 1, bias 0).
    The returned model carries `model.spec`, its `ModelSpec` with the overrides applied, and `model.load_report`
    (None unless weights were loaded).
    """
    spec = get_spec(name)
    arch = apply_overrides(spec.arch, overrides)
    if num_classes < 0:
        raise ConfigError(f"num_classes must be >= 0, not {num_classes}")
    model = MetaFormer(arch, num_classes=num_classes, features_only=features_only)
    model.spec = dataclasses.replace(spec, arch=arch)
    model.load_report = None
    if weights is not None:
        from .weights import load_checkpoint

        model.load_report = load_checkpoint(model, weights)
    elif pretrained:
        from .weights import load_pretrained

        model.load_report = load_pretrained(model, spec)
    return model.eval()


def spec_of(model: nn.Module) -> ModelSpec | None:
    return getattr(model, "spec", None)


def randomize_(model: nn.Module, seed: int = 0, std: float = 0.2) -> nn.Module:
    """Give every parameter random, non-trivial values in place and return the model: a helper for tests and
    benchmarks, where no weights can be downloaded. The init's ones and zeros (norms' affines, biases) and
    LayerScale's 1e-5 would make blocks nearly the identity, so a comparison against another implementation
    would pass whatever those parameters did. Each parameter becomes N(0, std²) noise, plus 1 for the 1-D ones
    (norm scales and shifts, biases, layer and residual scales). Deterministic for a seed (CPU generator)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * std + (1.0 if p.ndim == 1 else 0.0))
    return model
