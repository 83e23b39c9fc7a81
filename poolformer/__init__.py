"""poolformer: exact PoolFormer / MetaFormer models, weight loading and analysis engines.

The package imports lazily: `import poolformer` does not import torch until a model-building name is used,
so the command line starts fast.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from .errors import CheckpointError, ConfigError, PoolformerError, UnknownModelError, WeightsUnavailableError
from .sizes import Size
from .zoo import MODELS, ArchConfig, ModelSpec, get_spec, list_models

__version__ = "0.1.0"

# name -> module that defines it; imported on first use.
_LAZY = {
    "MetaFormer": ".model",
    "create_model": ".model",
    "apply_overrides": ".model",
    "load_checkpoint": ".weights",
    "read_checkpoint": ".weights",
    "convert_state_dict": ".weights",
    "export_state_dict": ".weights",
    "download_weights": ".weights",
    "optimize": ".fast",
}

__all__ = [
    "MODELS", "ArchConfig", "ModelSpec", "Size", "get_spec", "list_models", "__version__",
    "PoolformerError", "UnknownModelError", "ConfigError", "CheckpointError", "WeightsUnavailableError",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'poolformer' has no attribute {name!r}")
