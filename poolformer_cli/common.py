"""What every command shares: consoles, one-line errors with exit codes, model-name and list options.

Nothing here imports torch.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, NoReturn

import typer
from rich.console import Console

from poolformer.errors import PoolformerError, UnknownModelError
from poolformer.zoo import get_spec

# poolformer.devices.PRECISIONS' names, written here so that --help needs no torch (a test keeps them equal).
PRECISION_NAMES = ("fp32", "bf16", "fp16")

console = Console()
err_console = Console(stderr=True, highlight=False)


def fail(message: str, code: int = 2) -> NoReturn:
    """Print `error: message` on stderr as one line and exit with `code`."""
    from rich.markup import escape

    err_console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True, markup=True)
    raise typer.Exit(code)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn the library's errors (and Ctrl-C) into one-line messages with their exit codes, no traceback."""
    try:
        yield
    except PoolformerError as err:
        fail(str(err), err.exit_code)
    except KeyboardInterrupt:
        fail("interrupted", 130)


def resolve_model(name: str) -> str:
    """The canonical name for a model name or alias, or exit 2 with the closest names."""
    try:
        return get_spec(name).name
    except UnknownModelError as err:
        fail(str(err), 2)


def _is_glob(text: str) -> bool:
    return any(c in text for c in "*?[")


def resolve_models(arguments: list[str], peers: bool = True) -> list[str]:
    """Canonical names for model arguments, in order, without repeats: names and aliases; glob patterns over
    names and aliases (`'poolformer_s*'`, `'v2_*'`, case-insensitive, zoo order); `timm:NAME` peers and
    `timm:` patterns (when `peers`). A name or pattern that matches nothing: one line, exit 2."""
    from poolformer.zoo import MODELS

    found: list[str] = []
    for argument in arguments:
        text = argument.strip()
        if text.lower().startswith("timm:"):
            if not peers:
                fail(f"{text!r}: this command takes PoolFormer models only, not timm peers")
            from poolformer.peers import resolve_peer

            with user_errors():
                found.extend(resolve_peer(text))
        elif _is_glob(text):
            from poolformer.peers import matches

            hits = [name for name, spec in MODELS.items()
                    if matches(text, name) or any(matches(text, alias) for alias in spec.aliases)]
            if not hits:
                fail(f"no model matches {text!r}; see `poolformer list` (patterns: * ? [...])")
            found.extend(hits)
        else:
            found.append(resolve_model(text))
    return list(dict.fromkeys(found))


def check_precision_name(precision: str) -> None:
    if precision not in PRECISION_NAMES:
        fail(f"unknown precision {precision!r} for --precision; choose from: {', '.join(PRECISION_NAMES)}")


def print_precision_note(device, precision: str) -> None:
    """One line on stderr where the hardware does not run `precision` natively (it still runs)."""
    from poolformer.devices import precision_note

    note = precision_note(device, precision)
    if note:
        err_console.print(f"[yellow]note[/] {note}", soft_wrap=True)


def print_classifier_notes(classifier, precision: str) -> None:
    """The precision note, and for --impl fast on a GPU why it did not run its Triton kernels (one line each)."""
    print_precision_note(classifier.device, precision)
    note = classifier.describe(precision).backend_note
    if note:
        err_console.print(f"[yellow]note[/] {note}", soft_wrap=True)


def parse_int_list(text: str, option: str, minimum: int = 1) -> list[int]:
    """'224,288' -> [224, 288]; exit 2 naming the option on anything that is not an integer >= minimum."""
    values = []
    for part in text.split(","):
        part = part.strip()
        try:
            value = int(part)
        except ValueError:
            fail(f"{option} takes integers separated by commas, got {part!r}")
        if value < minimum:
            fail(f"{option} values must be >= {minimum}, got {value}")
        values.append(value)
    return values


def check_writable(path: str | os.PathLike | None, option: str) -> None:
    """Exit 2 before any work starts when `path` (given to `option`) could not be written later: it is a
    folder, a file stands where one of its folders should be, or the folder it would go in is not writable.
    Folders that do not exist yet are fine: they are created when the file is written."""
    if path is None:
        return
    target = Path(path).expanduser()
    shown = str(path)
    if target.is_dir():
        fail(f"{option} {shown!r} is a directory; give a file name")
    if target.exists() and not os.access(target, os.W_OK):
        fail(f"{option} {shown!r} cannot be overwritten: permission denied")
    folder = target.parent
    while not folder.exists() and folder != folder.parent:  # climb to the nearest thing that exists
        folder = folder.parent
    if not folder.is_dir():
        fail(f"{option} {shown!r} cannot be written: {str(folder)!r} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        fail(f"{option} {shown!r} cannot be written: no permission to write in {str(folder)!r}")


def write_atomic(path: str | os.PathLike, text: str) -> None:
    """Write text to path via a temporary file in the same folder and a rename: never a half-written file.
    A failure (disk full, a folder removed meanwhile) exits 1 with one line; the old file, if any, stays."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)

    replace_atomically(path, write)


def replace_atomically(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """poolformer.files.replace_atomically, with a failure of the file system as one line and exit 1."""
    from poolformer import files

    path = Path(path).expanduser()
    try:
        files.replace_atomically(path, write)
    except OSError as err:
        fail(f"cannot write {str(path)!r}: {err.strerror or err}", 1)


PLOT_SUFFIXES = (".png", ".svg")


def check_plot_path(path: str | os.PathLike | None, option: str = "--plot") -> None:
    """Exit 2 before any work unless `path` is a writable .png or .svg file name."""
    if path is None:
        return
    if Path(path).suffix.lower() not in PLOT_SUFFIXES:
        fail(f"{option} {str(path)!r}: give a .png or .svg file name")
    check_writable(path, option)


def save_figure(figure: Any, path: str | os.PathLike) -> None:
    """Save a matplotlib figure atomically, in the format its suffix names (.png or .svg)."""
    suffix = Path(path).suffix.lower().lstrip(".")
    replace_atomically(path, lambda tmp: figure.savefig(tmp, format=suffix, bbox_inches="tight"))


def print_json(value: Any) -> None:
    """Machine-readable output on stdout, untouched by Rich."""
    sys.stdout.write(json.dumps(value, indent=2) + "\n")
    sys.stdout.flush()


def human(n: float | None, unit: str = "") -> str:
    """1822580736 -> '1.82G' (decimal prefixes); None -> '-'."""
    if n is None:
        return "-"
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= factor:
            return f"{n / factor:.2f}{prefix}{unit}"
    return f"{n:g}{unit}"
