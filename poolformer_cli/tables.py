"""Tables that fit the width they are printed in, without cutting a number or a name.

A command declares its columns once, with `name`, `number`, `count` or `prose`: a header, how a cell reads
(exact first, then shorter forms) and a priority (1 = always shown). `print_table` then takes the first of
these layouts that fits the console (a terminal's width; COLUMNS, else 80, when output is piped):

1. the declared frame ("heavy": Rich's rules around every cell, or "light"), every column in its first form;
2. the light frame: a rule under the header, two spaces between columns;
3. shorter forms, column by column, the least important (highest priority number, then rightmost) first:
   `102,760,448` -> `102.8M`, `stages.0.blocks.1` -> `blocks.1` indented under its parent;
4. columns of priority 2 and above left out, the least important first, named in a line under the table.

Numbers and names never wrap; prose and headers wrap between words only. A table that still does not fit is
printed wider than the console rather than cut. Full precision is always in --json and --csv.

Nothing here imports torch.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Sequence, Union

from rich import box
from rich.cells import cell_len
from rich.console import Console
from rich.measure import Measurement
from rich.segment import Segments
from rich.table import Table
from rich.text import Text

from .common import console, human

Cell = Union[str, Text]
Form = Callable[[Any], Cell]  # a row -> its cell in this column

FRAMES = {
    "heavy": {"box": box.HEAVY_HEAD},  # Rich's default look
    "light": {"box": box.SIMPLE_HEAD, "show_edge": False, "pad_edge": False, "collapse_padding": True},
}
PROSE_MIN_WIDTH = 20  # narrower prose reads a word or two a line: first shorten or leave out other columns


@dataclass(frozen=True)
class Column:
    header: str
    forms: tuple[Form, ...]  # widest first; each must identify the same thing (a shorter form, never a cut one)
    justify: str = "right"
    wrap: bool = False  # prose: may break between words; numbers and names never break
    priority: int = 1  # 1: always shown; 2, 3, ...: shortened, then left out, the highest number first


def number(header: str, *forms: Form, priority: int = 1) -> Column:
    """A right-aligned column of figures; give the exact form first and a compact one after it."""
    return Column(header, forms, "right", False, priority)


def count(header: str, value: Callable[[Any], Optional[int]], priority: int = 1) -> Column:
    """An integer shown exactly (`102,760,448`) where it fits, else compact (`102.8M`); None as '-'."""
    return number(header, lambda row: _exact(value(row)), lambda row: human(value(row)), priority=priority)


def name(header: str, *forms: Form, priority: int = 1) -> Column:
    """A left-aligned name that identifies the row (model, layer path, configuration): never cut or wrapped."""
    return Column(header, forms, "left", False, priority)


def prose(header: str, *forms: Form, priority: int = 1, justify: str = "left") -> Column:
    """Words that may wrap onto more lines (descriptions, notes); numbers in them stay whole."""
    return Column(header, forms, justify, True, priority)


def shared_words(labels: Sequence[str]) -> list[str]:
    """The words every label has after its first (which names the row), in the first label's order: a table
    can say them once in its title and show each label without them (`s12/ours bs32 224px fp32` -> `s12/ours
    bs32` under a title that says `224px fp32`)."""
    if not labels:
        return []
    others = [set(label.split()[1:]) for label in labels]
    return [word for word in labels[0].split()[1:] if all(word in words for words in others)]


def without_words(label: str, words: Sequence[str]) -> str:
    """`label` without `words` (never its first word)."""
    first, *rest = label.split()
    return " ".join([first, *(word for word in rest if word not in words)])


def _exact(value: Optional[int]) -> str:
    return "-" if value is None else f"{value:,}"


def _text(cell: Cell) -> Text:
    return cell if isinstance(cell, Text) else Text(str(cell))


@dataclass
class _Measured:
    """One column in one form: its cells, and its content width at most (one line each) and at least."""
    column: Column
    cells: list[Text]
    natural: int
    minimum: int


def _measure(column: Column, form: Form, rows: Sequence[Any], show_header: bool, prose_floor: int) -> _Measured:
    cells = [_text(form(row)) for row in rows]
    lines = [line for cell in cells for line in cell.plain.split("\n")]
    words = [word for line in lines for word in line.split()] if column.wrap else lines
    header_lines = column.header.split("\n") if show_header else []
    header_words = [word for line in header_lines for word in line.split()]
    natural = max([cell_len(line) for line in lines + header_lines] or [1])
    minimum = max([cell_len(word) for word in words + header_words] or [1])
    if column.wrap:
        minimum = max(minimum, min(natural, prose_floor))
    return _Measured(column, cells, max(natural, minimum), minimum)


@functools.lru_cache(maxsize=None)
def _chrome(frame: str, n_columns: int, show_header: bool) -> int:
    """Columns of frame and padding a table with this look adds to its content (measured by Rich itself)."""
    table = Table(show_header=show_header, **FRAMES[frame])
    for _ in range(n_columns):
        table.add_column(width=1)
    wide = Console(width=10_000)
    return Measurement.get(wide, wide.options, table).maximum - n_columns


def _layouts(columns: Sequence[Column], frame: str) -> Iterable[tuple[str, list[Optional[int]]]]:
    """(frame, form index per column or None where left out), from the fullest table to the narrowest."""
    forms: list[Optional[int]] = [0] * len(columns)
    yield frame, list(forms)
    yield "light", list(forms)
    giving_way = sorted(range(len(columns)), key=lambda i: (-columns[i].priority, -i))
    for i in giving_way:
        for form in range(1, len(columns[i].forms)):
            forms[i] = form
            yield "light", list(forms)
    for i in giving_way:
        if columns[i].priority > 1:
            forms[i] = None
            yield "light", list(forms)


def _shrink(measured: list[_Measured], excess: int) -> list[int]:
    """Content widths: each column's natural width, the widest shrinkable one narrowed a column at a time
    (never below its minimum) until `excess` columns are saved or nothing can give. A column that is not
    prose only gives by wrapping its header, so it then takes just the width of its widest line."""
    widths = [m.natural for m in measured]
    while excess > 0:
        room = [(widths[i], i) for i, m in enumerate(measured) if widths[i] > m.minimum]
        if not room:
            break
        widths[max(room)[1]] -= 1
        excess -= 1
    for i, m in enumerate(measured):
        if not m.column.wrap and widths[i] < m.natural:
            cells = max([cell_len(line) for cell in m.cells for line in cell.plain.split("\n")] or [1])
            widths[i] = max(cells, _wrapped_width(m.column.header, widths[i]))
    return widths


def _wrapped_width(text: str, width: int) -> int:
    """The widest line of `text` wrapped between words at `width` (a word wider than that on its own line)."""
    lines: list[str] = []
    for word in text.split():
        if lines and cell_len(lines[-1]) + 1 + cell_len(word) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return max([cell_len(line) for line in lines] or [1])


@dataclass
class _Layout:
    frame: str
    forms: list[Optional[int]]  # per declared column: the form shown, None where left out
    measured: list[_Measured]  # the columns shown
    chrome: int

    @property
    def minimum(self) -> int:
        return sum(m.minimum for m in self.measured) + self.chrome


def _fit(columns: Sequence[Column], rows: Sequence[Any], width: int, frame: str,
         show_header: bool) -> tuple[_Layout, int]:
    """The first layout that fits `width` with its prose columns at least PROSE_MIN_WIDTH wide; failing that,
    the first that fits with prose down to its longest word; failing that, the narrowest. And the width the
    narrowest layout showing every column needs."""
    every_column = 0
    for prose_floor in (PROSE_MIN_WIDTH, 0):
        for look, forms in _layouts(columns, frame):
            measured = [_measure(column, column.forms[form], rows, show_header, prose_floor)
                        for column, form in zip(columns, forms) if form is not None]
            layout = _Layout(look, forms, measured, _chrome(look, len(measured), show_header))
            if None not in forms:
                every_column = layout.minimum
            if layout.minimum <= width:
                return layout, every_column
    return layout, every_column


def print_table(columns: Sequence[Column], rows: Iterable[Any], title: Optional[str] = None,
                frame: str = "heavy", show_header: bool = True, out: Optional[Console] = None) -> None:
    """Print `rows` in the widest of the layouts above that fits `out`'s width (the stdout console by default).

    A title is printed above the table on its own, wrapped like any line of text (see print_words)."""
    out = out or console
    rows = list(rows)
    width = out.width
    layout, every_column = _fit(columns, rows, width, frame, show_header)
    widths = _shrink(layout.measured, sum(m.natural for m in layout.measured) + layout.chrome - width)
    table = Table(show_header=show_header, **FRAMES[layout.frame])
    for m, content_width in zip(layout.measured, widths):  # headers wrap between words in every column
        table.add_column(Text(m.column.header, no_wrap=False), justify=m.column.justify, width=content_width,
                         no_wrap=not m.column.wrap)
    for i in range(len(rows)):
        table.add_row(*(m.cells[i] for m in layout.measured))
    if title:
        print_words(title, style="table.title", out=out)
    needed = sum(widths) + layout.chrome
    if needed <= width:
        out.print(table)
    else:  # nothing narrower keeps every number and name whole: wider than the console, not cut
        out.print(Segments(out.render(table, out.options.update_width(needed))), crop=False)
    left_out = [c.header for c, form in zip(columns, layout.forms) if form is None]
    if left_out:
        out.print(f"not shown at {width} columns: {', '.join(left_out)} (all columns fit in {every_column})",
                  style="dim")


def print_words(text: str, style: Optional[str] = None, out: Optional[Console] = None) -> None:
    """A line wrapped between words at the console's width; a word wider than the console (a long path) stays
    whole on a line of its own rather than cut or folded."""
    (out or console).print(Text(text, style=style or "", overflow="ignore"), crop=False)
