"""Class names for a model's outputs: ImageNet-1k names (from timm's ImageNetInfo), a user's labels file, or
plain indices for a model with any other class count."""

from __future__ import annotations

import functools
import os
from pathlib import Path

from .errors import ConfigError

IMAGENET_NUM_CLASSES = 1000


@functools.lru_cache(maxsize=1)
def _imagenet_info():
    from timm.data import ImageNetInfo

    return ImageNetInfo()


def imagenet_wnids() -> list[str]:
    """The 1000 ImageNet-1k WordNet ids in class-index order (sorted: index 0 is n01440764)."""
    return list(_imagenet_info().label_names())


def imagenet_names() -> list[str]:
    """The 1000 ImageNet-1k class names in class-index order, e.g. index 0 -> "tench, Tinca tinca"."""
    info = _imagenet_info()
    return [info.index_to_description(i) for i in range(IMAGENET_NUM_CLASSES)]


def read_labels_file(path: str | os.PathLike, num_classes: int) -> list[str]:
    """One class name per line, line i naming output i; blank lines at the end are ignored. The count must
    equal the model's class count."""
    path = Path(path).expanduser()
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read labels file {path}: {err.strerror if isinstance(err, OSError) else err}") from None
    while lines and not lines[-1].strip():
        lines.pop()
    names = [line.strip() for line in lines]
    if len(names) != num_classes:
        raise ConfigError(f"labels file {path} has {len(names)} names but the model has {num_classes} classes")
    return names


def class_names(num_classes: int, labels_file: str | os.PathLike | None = None) -> list[str]:
    """Names for each output: from labels_file when given, ImageNet's for 1000 classes, else "0", "1", ..."""
    if labels_file is not None:
        return read_labels_file(labels_file, num_classes)
    if num_classes == IMAGENET_NUM_CLASSES:
        return imagenet_names()
    return [str(i) for i in range(num_classes)]
