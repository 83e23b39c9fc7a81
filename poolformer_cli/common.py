"""What every command shares: consoles, one-line errors with exit codes, model-name and list options.

Nothing here imports torch.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping, NoReturn, Optional, Sequence

import typer
from rich.console import Console

from poolformer.errors import PoolformerError, UnknownModelError
from poolformer.zoo import get_spec

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from poolformer.sizes import Size

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


def short_model_name(name: str) -> str:
    """The zoo's first alias ('s12' for poolformer_s12), for tables too narrow for whole names; a timm: peer
    or a model without an alias keeps its name."""
    from poolformer.peers import is_peer

    aliases = () if is_peer(name) else get_spec(name).aliases
    return aliases[0] if aliases else name


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


def check_impl(impl: str) -> None:
    """Exit 2 unless `impl` is one of the implementations registered at run time."""
    from poolformer.implementations import IMPLEMENTATIONS

    if impl not in IMPLEMENTATIONS:
        fail(f"unknown implementation {impl!r} for --impl; choose from: {', '.join(IMPLEMENTATIONS)}")


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


def one_int(text: str, option: str) -> int:
    """A single integer >= 1 for `option`, or a one-line error and exit 2 (typer's own is a boxed panel)."""
    try:
        value = int(text.strip())
    except ValueError:
        fail(f"{option} takes one integer >= 1, got {text!r}")
    if value < 1:
        fail(f"{option} must be >= 1, got {value}")
    return value


def parse_sizes(text: str, option: str) -> list[Size]:
    """'800x1333,512' -> [Size(800, 1333), Size(512, 512)] (a bare number is a square); exit 2 naming the option
    on anything else ('800x', 'x512', '800*1333', '0x512') or a side under 32 (four downsamplings)."""
    from poolformer.sizes import parse_sizes as parse

    try:
        return parse(text)
    except PoolformerError as err:
        fail(f"{option}: {err}")


def one_size(text: Optional[str], option: str, command: str) -> Optional[Size]:
    """The size for a command that takes one (None when not given); exit 2 on several or a bad one."""
    if text is None:
        return None
    sizes = parse_sizes(text, option)
    if len(sizes) != 1:
        fail(f"{option} takes one value for {command}, got {len(sizes)} sizes")
    return sizes[0]


def check_features_models(names: Sequence[str], features: bool) -> None:
    """Exit 2 when --features is asked of a timm peer: only PoolFormer models build a features-only backbone."""
    peers = [name for name in names if name.lower().startswith("timm:")]
    if features and peers:
        fail(f"--features builds PoolFormer backbones; {peers[0]} is a timm peer")


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


def save_figure(figure: Figure, path: str | os.PathLike) -> None:
    """Save a matplotlib figure atomically, in the format its suffix names (.png or .svg)."""
    suffix = Path(path).suffix.lower().lstrip(".")
    replace_atomically(path, lambda tmp: figure.savefig(tmp, format=suffix, bbox_inches="tight"))


def csv_text(columns: Sequence[str], rows: Iterable[Mapping[str, Any]]) -> str:
    """CSV text: a header of `columns`, then one line per row in that order (a row's other keys left out)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def print_json(value: Any) -> None:
    """Machine-readable output on stdout, untouched by Rich."""
    sys.stdout.write(json.dumps(value, indent=2) + "\n")
    sys.stdout.flush()


def human(n: float | None, unit: str = "") -> str:
    """Four significant digits and a decimal prefix, at most six characters before the unit, so a column of
    them lines up: 1822580736 -> '1.823G', 102760448 -> '102.8M', 802816 B -> '802.8KB', 512 -> '512';
    None -> '-'."""
    if n is None:
        return "-"
    if abs(n) < 999.95:
        return f"{n:.4g}{unit}"
    factor, prefix = next((factor, prefix) for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K"))
                          if abs(n) >= factor * 0.99995)  # 999,996 reads '1.000M', not '1000.0K'
    value = n / factor
    return f"{value:.{3 if abs(value) < 9.9995 else 2 if abs(value) < 99.995 else 1}f}{prefix}{unit}"
