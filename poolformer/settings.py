"""Every `POOLFORMER_*` environment variable: its name, kind, default and meaning, and the one parser for each kind.

Settings are read when they are used (never cached), so a test or a script can change one between calls.
An unknown value is a one-line `ConfigError` naming the variable and what it takes: a run that silently used
the default would measure or compute something else than was asked. `docs/environment.md` lists exactly
these variables (a test keeps the two equal).

Kinds:
- ``flag``: true for 1/true/yes/on, false for 0/false/no/off (any case), the default when unset or empty;
- ``choice``: one of `choices` (any case), the default when unset or empty;
- ``path``: a file name (``~`` expanded); 0/false/no/off turn the feature off (None); the default when unset.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError

TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")


@dataclass(frozen=True)
class Setting:
    """One environment variable. default: the value when unset (a flag's bool, a choice's name, or for a path
    the text shown in the docs; the real default path comes from `default_tile_cache`)."""

    name: str
    kind: str  # flag | choice | path
    default: bool | str | None
    meaning: str
    choices: tuple[str, ...] = ()


SETTINGS: dict[str, Setting] = {s.name: s for s in (
    Setting("POOLFORMER_OFFLINE", "flag", False,
            "Never download published weights: use the cached copy, or fail in one line naming the file to pass "
            "with --weights. HF_HUB_OFFLINE=1 has the same effect."),
    Setting("POOLFORMER_FAST_BACKEND", "choice", "auto",
            "Force the kernels `--impl fast` / `poolformer.optimize` run on, everywhere (tests use it to cover "
            "every path on any host).",
            ("auto", "triton", "openvino-folded", "onnxruntime-folded", "inductor", "onednn", "portable")),
    Setting("POOLFORMER_CUDA_GRAPHS", "flag", True,
            "Replay the fast path's forward as CUDA graphs for repeated input shapes (off: for debugging)."),
    Setting("POOLFORMER_TRITON_INTERPRET", "flag", False,
            "Run the fast path's Triton kernels in Triton's interpreter, on CPU tensors (tests, debugging; very "
            "slow). Must be set before Python starts: Triton decides at its first import."),
    Setting("POOLFORMER_TRITON_AUTOTUNE", "flag", False,
            "Time every candidate tile of the Triton kernels on the first call of each shape and keep the "
            "fastest in the tile cache (a few seconds of compiling per shape)."),
    Setting("POOLFORMER_TRITON_TILE_CACHE", "path", "$XDG_CACHE_HOME/poolformer/triton_tiles.json",
            "The JSON file where autotuned tiles are kept between processes (default under ~/.cache when "
            "XDG_CACHE_HOME is unset); 0 turns the cache off."),
    Setting("POOLFORMER_TRITON_MLP", "choice", "auto",
            "Which forms of the Triton MLP are candidates: auto (all, in the design-time order), or only the "
            "fused kernel, the split form around cuBLAS, or the two Triton GEMMs (A/B timing, tests).",
            ("auto", "fused", "split", "gemm")),
    Setting("POOLFORMER_TRITON_GELU", "choice", "erf",
            "How the fused Triton MLP computes GELU's erf: libdevice's erff, or a polynomial (Abramowitz & "
            "Stegun 7.1.26, |error| < 5e-7) for A/B timing.",
            ("erf", "poly")),
    Setting("POOLFORMER_TRITON_NORM_AFTER_FC1", "flag", False,
            "bf16/fp16 fused Triton MLP: apply norm2's statistics to fc1's sums instead of normalising fc1's "
            "input (for A/B timing; measured slower on an H200)."),
)}


def _lookup(name: str, kind: str) -> tuple[Setting, str]:
    setting = SETTINGS[name]
    if setting.kind != kind:
        raise TypeError(f"{name} is a {setting.kind} setting, not a {kind}")
    return setting, os.environ.get(name, "").strip()


def flag(name: str) -> bool:
    """The boolean value of a flag setting (see the module docstring for the words it takes)."""
    setting, text = _lookup(name, "flag")
    if not text:
        return bool(setting.default)
    if text.lower() in TRUE_WORDS:
        return True
    if text.lower() in FALSE_WORDS:
        return False
    raise ConfigError(f"{name}={text!r} is not a yes/no value; use one of: {', '.join(TRUE_WORDS + FALSE_WORDS)}")


def choice(name: str) -> str:
    """The value of a choice setting, lower-cased; one of its choices."""
    setting, text = _lookup(name, "choice")
    if not text:
        return str(setting.default)
    if text.lower() not in setting.choices:
        raise ConfigError(f"{name}={text!r} is not one of: {', '.join(setting.choices)}")
    return text.lower()


def path(name: str, default: Path) -> Path | None:
    """The file a path setting names (``~`` expanded), `default` when unset, None when turned off."""
    _, text = _lookup(name, "path")
    if not text:
        return default
    if text.lower() in FALSE_WORDS:
        return None
    return Path(text).expanduser()


def default_tile_cache() -> Path:
    """$XDG_CACHE_HOME/poolformer/triton_tiles.json, ~/.cache when XDG_CACHE_HOME is unset."""
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "poolformer" / "triton_tiles.json"


def offline() -> bool:
    """POOLFORMER_OFFLINE, or Hugging Face's own HF_HUB_OFFLINE (read with the same words)."""
    hub = os.environ.get("HF_HUB_OFFLINE", "").strip().lower()
    return flag("POOLFORMER_OFFLINE") or hub in TRUE_WORDS
