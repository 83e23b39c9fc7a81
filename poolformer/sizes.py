"""Input sizes: one `Size(height, width)` that every command and engine takes, and the one parser of its text.

"224" is a square; "800x1333" is height x width, as the dense tasks use them (COCO detection around 800x1333,
ADE20K segmentation at 512). Results name both sides (`height`, `width`) and keep `resolution` readable for
older consumers: the side of a square (an integer, as before sizes could be rectangles), else "800x1333".
Importing this module does not import torch, so the command line parses sizes before any heavy import.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError

MIN_SIDE = 32  # every side: four downsamplings to stride 32 (poolformer.flops.MIN_RESOLUTION, without torch)
_FORM = re.compile(r"(\d+)(?:[xX](\d+))?")


@dataclass(frozen=True, order=True)
class Size:
    """An input image's height and width in pixels. str() gives "224" for a square, else "800x1333"."""

    height: int
    width: int

    def __post_init__(self) -> None:
        for side in (self.height, self.width):
            if not isinstance(side, int) or isinstance(side, bool) or side < 1:
                raise ConfigError(f"a size needs two positive integer sides, got {self.height!r} x {self.width!r}")

    @classmethod
    def parse(cls, text: str) -> Size:
        """"224" -> Size(224, 224); "800x1333" -> Size(800, 1333). ConfigError, in one line, for anything else:
        "800x", "x512", "800*1333", "0x512", or a side under MIN_SIDE (see `check`)."""
        match = _FORM.fullmatch(str(text).strip())
        if match is None:
            raise ConfigError(f"size {str(text).strip()!r} is not a number (224) or HEIGHTxWIDTH (800x1333)")
        height = int(match.group(1))
        width = int(match.group(2)) if match.group(2) else height
        if min(height, width) < MIN_SIDE:
            raise ConfigError(f"size {str(text).strip()!r}: every side must be at least {MIN_SIDE} pixels (four "
                              "downsamplings to stride 32)")
        return cls(height, width)

    @classmethod
    def of(cls, value: Any) -> Size:
        """A Size from what callers hold: a Size, a square's side (int), "HxW" text, or (height, width)."""
        if isinstance(value, Size):
            return value
        if isinstance(value, str):
            return cls.parse(value)
        if isinstance(value, (tuple, list)) and len(value) == 2:
            return cls(*value)
        if isinstance(value, int) and not isinstance(value, bool):
            return cls(value, value)
        raise ConfigError(f"a size is an integer, HEIGHTxWIDTH text or (height, width), not {value!r}")

    def check(self, minimum: int = MIN_SIDE) -> Size:
        """self, or ConfigError when a side is under `minimum` (the models downsample four times)."""
        if min(self.height, self.width) < minimum:
            raise ConfigError(f"size {self}: every side must be at least {minimum} pixels (four downsamplings "
                              "to stride 32)")
        return self

    @property
    def is_square(self) -> bool:
        return self.height == self.width

    @property
    def pixels(self) -> int:
        return self.height * self.width

    @property
    def img_size(self) -> int | tuple[int, int]:
        """What `create_model(img_size=...)` and timm take: the side of a square, else (height, width)."""
        return self.height if self.is_square else (self.height, self.width)

    @property
    def resolution(self) -> int | str:
        """The `resolution` field of results: 224 (an int) for a square, "800x1333" otherwise."""
        return self.height if self.is_square else str(self)

    def json_fields(self) -> dict[str, Any]:
        """What a JSON result row says about its size: resolution (see above), height and width."""
        return {"resolution": self.resolution, "height": self.height, "width": self.width}

    def __str__(self) -> str:
        return str(self.height) if self.is_square else f"{self.height}x{self.width}"


def parse_sizes(text: str) -> list[Size]:
    """"800x1333,512" -> [Size(800, 1333), Size(512, 512)], in order, without repeats."""
    parts = [part.strip() for part in str(text).split(",")]
    if not any(parts):
        raise ConfigError("no size given: use a number (224) or HEIGHTxWIDTH (800x1333), comma-separated")
    return list(dict.fromkeys(Size.parse(part) for part in parts))


def row_size(row: dict[str, Any]) -> Size:
    """The size of a result row, new (height, width) or old (resolution alone: an int, or "HxW")."""
    if row.get("height") is not None and row.get("width") is not None:
        return Size(int(row["height"]), int(row["width"]))
    return Size.of(row.get("resolution"))
