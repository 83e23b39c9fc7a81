"""Autotuning's two tools: timing candidate tiles (`fastest`, `median_ms`) and the tile cache file that keeps
the winners between processes (`cached_tile`, `remember_tile`). `chooser.TileChooser` decides when to use them.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch

from ... import settings
from ...files import replace_atomically
from .tiles import MlpForm, Tile, tile_name

AUTOTUNE_ENV = "POOLFORMER_TRITON_AUTOTUNE"
AUTOTUNE_REPEATS = 5
TILE_CACHE_ENV = "POOLFORMER_TRITON_TILE_CACHE"

T = TypeVar("T")


def autotune_enabled() -> bool:
    """POOLFORMER_TRITON_AUTOTUNE=1: time every candidate tile on the first call of each shape (a few seconds of
    compiling per shape) instead of taking the first that compiles."""
    return settings.flag(AUTOTUNE_ENV)


def tile_cache_path() -> Path | None:
    """Where autotuned tiles are kept between processes: POOLFORMER_TRITON_TILE_CACHE (a JSON file; 0 turns the
    cache off), else $XDG_CACHE_HOME/poolformer/triton_tiles.json (~/.cache when unset)."""
    return settings.path(TILE_CACHE_ENV, settings.default_tile_cache())


def _read_tile_cache(path: Path) -> dict[str, dict]:
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # none yet, unreadable or corrupt: tiles are a speed hint, never a reason to fail
    return entries if isinstance(entries, dict) else {}


def cached_tile(path: Path | None, key: str, kinds: tuple[type, ...]) -> MlpForm | Tile | None:
    """The tile (one of `kinds`: MlpConfig, SplitMlp, GemmMlp, Tile) an earlier autotuned run kept in the cache
    file `path` under `key`, if it holds a valid one; an entry names its kind (entries without one are of the
    first kind). None without a cache."""
    entry = _read_tile_cache(path).get(key) if path is not None else None
    if not isinstance(entry, dict):
        return None
    fields = dict(entry)
    name = fields.pop("kind", kinds[0].__name__)
    kind = next((k for k in kinds if k.__name__ == name), None)
    try:
        return kind(**fields) if kind is not None else None
    except TypeError:
        return None


def remember_tile(path: Path | None, key: str, tile: MlpForm | Tile) -> None:
    """Add an autotuned tile to the cache file (read, merged, renamed over the old file). A cache that cannot be
    written is skipped: the tile still serves this process."""
    if path is None:
        return
    entries = {**_read_tile_cache(path), key: {"kind": type(tile).__name__, **asdict(tile)}}

    def write(tmp: str) -> None:
        Path(tmp).write_text(json.dumps(entries, indent=1, sort_keys=True), encoding="utf-8")

    with contextlib.suppress(OSError):
        replace_atomically(path, write)


def median_ms(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    """The median of `repeats` timings of fn() in milliseconds, each call on its own: between two CUDA events,
    waited for before the next call, on a GPU; host clocks elsewhere."""
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            started = time.perf_counter()
            fn()
            times.append((time.perf_counter() - started) * 1e3)
    return sorted(times)[len(times) // 2]


def out_of_resources(err: Exception) -> bool:
    """Triton's compile-time refusal of a tile (too much shared memory or too many registers for this GPU)."""
    return type(err).__name__ == "OutOfResources"


def fastest(candidates: list[T], launch: Callable[[T], Any], device: torch.device, what: str,
            timings: dict[str, float | None]) -> T:
    """The candidate with the lowest median time over AUTOTUNE_REPEATS launches (after one that compiles it);
    candidates the GPU refuses (out of resources) are skipped. Every candidate's median ms goes into `timings`
    under its tile_name (None: refused). `what` ends the error when none fits: "no {what}"."""
    measured = {}
    for candidate in candidates:
        try:
            launch(candidate)
        except Exception as err:
            if not out_of_resources(err):
                raise
            timings[tile_name(candidate)] = None
            continue
        measured[candidate] = timings[tile_name(candidate)] = median_ms(lambda: launch(candidate), device,
                                                                        AUTOTUNE_REPEATS)
    if not measured:
        raise RuntimeError(f"no {what}")
    return min(measured, key=measured.get)
