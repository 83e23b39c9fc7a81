"""Interchangeable implementations of the same zoo model, for side-by-side runs (`--impl`).

- ``ours``: `poolformer.model.MetaFormer`, the reference semantics.
- ``timm``: timm's own `poolformer_*` / `poolformerv2_*` model carrying the same weights (v1/v2 only).
  Note: timm's v1 head pools before normalising, so its v1 logits differ from the original's.
- ``fast``: `poolformer.fast.optimize(model)`, the folded inference-only form (v1/v2), same logits.

A new implementation is one function `(model: MetaFormer) -> nn.Module` added to `IMPLEMENTATIONS`.
"""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

from .errors import ConfigError
from .model import MetaFormer, create_model
from .zoo import get_spec


def _ours(model: MetaFormer) -> nn.Module:
    return model


def _timm(model: MetaFormer) -> nn.Module:
    import timm

    from .weights import export_state_dict

    spec = model.spec
    if spec.family not in ("v1", "v2") or model.arch != get_spec(spec.name).arch:
        raise ConfigError(f"timm has no implementation of {spec.name} with these options; use --impl ours")
    twin = timm.create_model(spec.name, pretrained=False, num_classes=model.num_classes)
    twin.load_state_dict(export_state_dict(model, "timm"))
    return twin.eval()


def _fast(model: MetaFormer) -> nn.Module:
    from .fast import optimize

    return optimize(model)


IMPLEMENTATIONS: dict[str, Callable[[MetaFormer], nn.Module]] = {"ours": _ours, "timm": _timm, "fast": _fast}


def build(name: str, impl: str = "ours", **kwargs: Any) -> nn.Module:
    """`create_model(name, **kwargs)` in the requested implementation, in eval mode, same weights."""
    if impl not in IMPLEMENTATIONS:
        raise ConfigError(f"unknown implementation {impl!r}; choose from: {', '.join(IMPLEMENTATIONS)}")
    return IMPLEMENTATIONS[impl](create_model(name, **kwargs))
