"""Any timm model as a peer: `timm:NAME` wherever a model name goes (bench, flops, summary, compare).

A peer is built by timm with random weights (speed and cost do not depend on the values), so it is compared
with our models on equal terms. Published ImageNet-1k top-1 for the models the PoolFormer and MetaFormer
Baselines papers compare against is kept here as data with its source, so that `poolformer compare` can
draw them beside the zoo.

Importing this module does not import timm or torch; they are imported when a peer is built or named.
"""

from __future__ import annotations

import difflib
import fnmatch
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError, UnknownModelError

PREFIX = "timm:"

# Where the figures below come from: timm's evaluation of its own released weights.
TIMM_RESULTS = ("huggingface/pytorch-image-models results/results-imagenet.csv "
                "(commit 0173a139a2c66db3a41ebfe1d8ac4fb02483642e)")


@dataclass(frozen=True)
class PeerFigures:
    """ImageNet-1k validation figures of one released timm weight of a peer architecture."""

    weights: str  # the timm tag the figures belong to, e.g. resnet50.a1h_in1k
    top1: float  # %
    params_m: float  # millions, as timm's results list them
    eval_size: int  # the resolution timm evaluated at (224 unless the weights were tuned for more)
    source: str = TIMM_RESULTS


# The comparison families of the PoolFormer paper (ResNet, DeiT, PVT, Swin, ResMLP, MLP-Mixer, gMLP) and of
# MetaFormer Baselines (ConvNeXt, ConvFormer, CAFormer), one released weight each, evaluated at 224 where
# timm has such a weight. PVT v1 is not in timm: PVTv2 stands in.
PUBLISHED: dict[str, PeerFigures] = {
    "resnet18": PeerFigures("resnet18.tv_in1k", 69.760, 11.69, 224),
    "resnet50": PeerFigures("resnet50.a1h_in1k", 80.676, 25.56, 224),
    "resnet101": PeerFigures("resnet101.tv2_in1k", 81.890, 44.55, 224),
    "resnet152": PeerFigures("resnet152.tv2_in1k", 82.288, 60.19, 224),
    "deit_tiny_patch16_224": PeerFigures("deit_tiny_patch16_224.fb_in1k", 72.172, 5.72, 224),
    "deit_small_patch16_224": PeerFigures("deit_small_patch16_224.fb_in1k", 79.844, 22.05, 224),
    "deit_base_patch16_224": PeerFigures("deit_base_patch16_224.fb_in1k", 81.992, 86.57, 224),
    "pvt_v2_b1": PeerFigures("pvt_v2_b1.in1k", 78.702, 14.01, 224),
    "pvt_v2_b2": PeerFigures("pvt_v2_b2.in1k", 82.086, 25.36, 224),
    "swin_tiny_patch4_window7_224": PeerFigures("swin_tiny_patch4_window7_224.ms_in1k", 81.376, 28.29, 224),
    "swin_small_patch4_window7_224": PeerFigures("swin_small_patch4_window7_224.ms_in1k", 83.208, 49.61, 224),
    "resmlp_12_224": PeerFigures("resmlp_12_224.fb_in1k", 76.648, 15.35, 224),
    "resmlp_24_224": PeerFigures("resmlp_24_224.fb_in1k", 79.374, 30.02, 224),
    "resmlp_36_224": PeerFigures("resmlp_36_224.fb_in1k", 79.772, 44.69, 224),
    "mixer_b16_224": PeerFigures("mixer_b16_224.goog_in21k_ft_in1k", 76.602, 59.88, 224),
    "gmlp_s16_224": PeerFigures("gmlp_s16_224.ra3_in1k", 79.644, 19.42, 224),
    "convnext_tiny": PeerFigures("convnext_tiny.fb_in1k", 82.698, 28.59, 288),
    "convformer_s18": PeerFigures("convformer_s18.sail_in1k", 82.986, 26.77, 224),
    "caformer_s18": PeerFigures("caformer_s18.sail_in1k", 83.656, 26.34, 224),
    "efficientnet_b0": PeerFigures("efficientnet_b0.ra_in1k", 77.694, 5.29, 224),
    "resnet10t": PeerFigures("resnet10t.c3_in1k", 68.358, 5.44, 224),
}


def is_peer(name: str) -> bool:
    return name.strip().lower().startswith(PREFIX)


def architecture(name: str) -> str:
    """'timm:ResNet50' -> 'resnet50' (timm's names are lower case)."""
    return name.strip()[len(PREFIX):].strip().lower()


def _timm_names(pattern: str = "") -> list[str]:
    import timm

    return list(timm.list_models(pattern)) if pattern else list(timm.list_models())


def resolve_peer(name: str) -> list[str]:
    """'timm:resnet50' -> ['timm:resnet50']; a glob ('timm:convnext_*') -> every timm architecture it
    matches. UnknownModelError (with the closest timm names) when nothing matches."""
    arch = architecture(name)
    if not arch:
        raise ConfigError(f"{name!r} names no model; write timm:NAME, e.g. timm:resnet50")
    if any(c in arch for c in "*?["):
        matches = _timm_names(arch)
        if not matches:
            raise UnknownModelError(name, [])
        return [PREFIX + m for m in matches]
    known = _timm_names()
    if arch not in known:
        close = difflib.get_close_matches(arch, known, n=3, cutoff=0.6)
        raise UnknownModelError(name, [PREFIX + c for c in close])
    return [PREFIX + arch]


def matches(pattern: str, name: str) -> bool:
    return fnmatch.fnmatchcase(name.lower(), pattern.lower())


def create_peer(name: str, *, num_classes: int = 1000, img_size: int | tuple[int, int] | None = None) -> Any:
    """timm's model for a peer name, random weights, eval mode. img_size (a side, or (height, width)): for models
    with a fixed token grid (ViT, DeiT, Swin, MLP-Mixer) build it for this input; models that take any size
    ignore it."""
    import timm

    arch = architecture(name)
    kwargs: dict[str, Any] = {"pretrained": False, "num_classes": num_classes}
    if img_size is not None and img_size != _default_size(arch):
        try:
            model = timm.create_model(arch, img_size=img_size, **kwargs)
        except TypeError:  # the architecture takes any input size and has no img_size argument
            model = timm.create_model(arch, **kwargs)
    else:
        model = timm.create_model(arch, **kwargs)
    model.peer = PREFIX + arch
    return model.eval()


def _default_size(arch: str) -> int:
    import timm

    try:
        return int(timm.models.get_pretrained_cfg(arch).input_size[-1])
    except (AttributeError, RuntimeError, TypeError, ValueError):
        return 224


def published(name: str) -> PeerFigures | None:
    return PUBLISHED.get(architecture(name))
