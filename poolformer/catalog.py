"""The zoo as rows for listing: published figures next to the parameter counts of our own models.

Listing needs no torch: the counts are data (`zoo.PARAM_COUNTS`); `count_params` builds a model to count them
(tests use it to keep the table true)."""

from __future__ import annotations

from dataclasses import dataclass

from .zoo import MODELS, PARAM_COUNTS, ModelSpec


@dataclass(frozen=True)
class ZooEntry:
    name: str
    aliases: tuple[str, ...]
    family: str
    description: str
    params: int  # every nn.Parameter of our model, frozen ones included
    trainable_params: int
    published_params: int | None
    macs: int | None  # published, fvcore at 224x224: one multiply-add counts 1
    top1: float | None  # published ImageNet-1k top-1, %
    crop_pct: float
    weights: str  # primary source: hf-hub:<repo> (timm layout), or the release URL
    weights_url: str | None  # the authors' release file, the fallback


def count_params(spec: ModelSpec) -> tuple[int, int]:
    """(all parameters, trainable parameters) of the model, built on the meta device (no memory, fast)."""
    import torch

    from .model import MetaFormer

    with torch.device("meta"):
        model = MetaFormer(spec.arch)
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def catalog(family: str | None = None) -> list[ZooEntry]:
    rows = []
    for spec in MODELS.values():
        if family is not None and spec.family != family:
            continue
        total, trainable = PARAM_COUNTS[spec.name]
        rows.append(ZooEntry(
            name=spec.name, aliases=spec.aliases, family=spec.family, description=spec.description,
            params=total, trainable_params=trainable, published_params=spec.published.params,
            macs=spec.published.macs, top1=spec.published.top1, crop_pct=spec.crop_pct,
            weights=spec.weights_source, weights_url=spec.url,
        ))
    return rows
