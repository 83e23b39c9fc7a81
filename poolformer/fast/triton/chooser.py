"""`TileChooser`: which tile each kernel launch runs with, per shape, and what autotuning measured on the way.

A FastPoolFormer holds one (benchmarks may share one between models): the choices live as long as the model,
never in module state, so two models in one process choose and report independently.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch

from . import autotune
from .availability import import_triton
from .tiles import MlpForm, Tile

R = TypeVar("R")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


@dataclass(frozen=True)
class KernelShape:
    """What a tile is chosen for: the MLP (`hidden` wide) or the token mixer (a `height` x `width` map, `pool`
    window) on `rows` x `channels` activations of `dtype` on `device`."""

    kernel: str  # "mlp" | "pool_mix"
    rows: int
    channels: int
    dtype: torch.dtype
    device: torch.device
    hidden: int | None = None
    height: int | None = None
    width: int | None = None
    pool: int | None = None

    @classmethod
    def mlp(cls, x1: torch.Tensor, hidden: int) -> KernelShape:
        """The MLP on x1 [B, H, W, C]."""
        batch, height, width, channels = x1.shape
        return cls("mlp", batch * height * width, channels, x1.dtype, x1.device, hidden=hidden)

    @classmethod
    def pool_mix(cls, x: torch.Tensor, pool: int) -> KernelShape:
        """The token mixer on x [B, H, W, C]."""
        batch, height, width, channels = x.shape
        return cls("pool_mix", batch * height * width, channels, x.dtype, x.device, height=height, width=width,
                   pool=pool)

    def cache_key(self) -> str:
        """The kernel, the GPU (by name), Triton's version and the shape: a tile timed on one of them says nothing
        of another."""
        gpu = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu (Triton's interpreter)"
        kernel = self.kernel + (f" {self.pool}x{self.pool}" if self.pool is not None else "")
        return (f"{kernel} | {gpu} | triton {import_triton().__version__} | {_dtype_name(self.dtype)} | "
                f"rows {self.rows} C {self.channels}" + (f" D {self.hidden}" if self.hidden is not None else ""))

    def no_tile_fits(self) -> str:
        """What autotuning says when the GPU refuses every candidate ("no ..." ends it)."""
        if self.hidden is None:
            return f"token-mixer tile fits this GPU for C={self.channels}"
        return f"MLP tile fits this GPU for C={self.channels}, D={self.hidden}"


class TileChooser:
    """The tile in use for each KernelShape, every candidate autotuning timed (per tile cache key), and the tile
    cache file (`cache_path`; None: nothing kept between processes)."""

    def __init__(self, cache_path: Path | None = None) -> None:
        self.cache_path = cache_path
        self._in_use: dict[KernelShape, MlpForm | Tile] = {}
        self._timings: dict[str, dict[str, float | None]] = {}

    @classmethod
    def from_settings(cls) -> TileChooser:
        """A chooser with the tile cache POOLFORMER_TRITON_TILE_CACHE names now (see autotune.tile_cache_path)."""
        return cls(autotune.tile_cache_path())

    def launch_with_tile(self, shape: KernelShape, candidates: Callable[[], list[Any]],
                         launch: Callable[[Any], R]) -> R:
        """launch(tile) with `shape`'s tile: the tile in use for the shape; else, on the shape's first call, the
        fastest of candidates() when autotuning is on (kept in the tile cache), or the cached tile ahead of
        candidates()'s design-time order. A tile the compiler refuses (out of resources) gives way to the next;
        the tile that ran stays in use for the shape."""
        order = self._tiles_to_try(shape, candidates, launch)
        for index, tile in enumerate(order):
            try:
                result = launch(tile)
            except Exception as err:  # only the compiler's "out of resource" moves on to the next tile
                if not autotune.out_of_resources(err) or index == len(order) - 1:
                    raise
                continue
            self._in_use[shape] = tile
            return result
        raise AssertionError("unreachable")

    def _tiles_to_try(self, shape: KernelShape, candidates: Callable[[], list[Any]],
                      launch: Callable[[Any], Any]) -> list[Any]:
        if shape in self._in_use:
            return [self._in_use[shape]]
        key, tiles = shape.cache_key(), candidates()  # the shape's first call only
        if autotune.autotune_enabled():
            best = autotune.fastest(tiles, launch, shape.device, shape.no_tile_fits(),
                                    self._timings.setdefault(key, {}))
            autotune.remember_tile(self.cache_path, key, best)
            return [best]
        cached = autotune.cached_tile(self.cache_path, key, tuple(dict.fromkeys(type(t) for t in tiles)))
        return ([cached] if cached is not None else []) + [t for t in tiles if t != cached]

    def mlp_form_in_use(self, rows: int, channels: int, hidden: int, dtype: torch.dtype) -> MlpForm | None:
        """The MLP form this chooser runs for that shape and dtype (on any device), if it ran one yet."""
        return next((tile for shape, tile in self._in_use.items() if shape.kernel == "mlp" and (
            shape.rows, shape.channels, shape.hidden, shape.dtype) == (rows, channels, hidden, dtype)), None)

    def pool_tiles_in_use(self) -> list[dict]:
        """The token mixer's tile in use for each shape run so far (see mlp_tiles_in_use)."""
        return [{"rows": s.rows, "height": s.height, "width": s.width, "channels": s.channels, "pool": s.pool,
                 "dtype": _dtype_name(s.dtype), "device": str(s.device), **asdict(tile)}
                for s, tile in self._in_use.items() if s.kernel == "pool_mix"]

    def mlp_tiles_in_use(self) -> list[dict]:
        """The MLP form in use for each shape run so far (the autotuned one where autotuning was on): what a GPU
        run records, so the design-time order of the candidates can follow what won."""
        return [{"rows": s.rows, "channels": s.channels, "hidden": s.hidden, "dtype": _dtype_name(s.dtype),
                 "device": str(s.device), "kind": type(tile).__name__, **asdict(tile)}
                for s, tile in self._in_use.items() if s.kernel == "mlp"]

    def autotune_timings(self) -> dict[str, dict[str, float | None]]:
        """Every candidate tile timed so far, per tile cache key: each one's median ms (None: the compiler refused
        it), so the design-time order can follow the measurements."""
        return {key: dict(timings) for key, timings in self._timings.items()}
