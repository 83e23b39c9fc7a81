"""Writing a file so that no reader ever sees half of it: a temporary file beside the target, renamed over it."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Callable


def new_file_mode() -> int:
    """The permissions a newly created file gets here (0o666 less the umask): mkstemp's files are 0o600."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def replace_atomically(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call write(temporary path) for a file in path's folder (same suffix, a new file's usual permissions), then
    rename it over path. On any failure the temporary file is removed, the old file (if any) stays, and the
    error propagates (OSError for the file system's own failures)."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        os.chmod(tmp, new_file_mode())
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
