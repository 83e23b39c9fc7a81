"""poolformer.files: the one atomic-replace mechanism of the library and the command line."""

from __future__ import annotations

import os

import pytest

from poolformer.files import new_file_mode, replace_atomically


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "deep" / "result.json"
    replace_atomically(target, lambda tmp: open(tmp, "w").write("first"))
    assert target.read_text() == "first" and (target.stat().st_mode & 0o777) == new_file_mode()

    def broken(tmp: str) -> None:
        open(tmp, "w").write("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        replace_atomically(target, broken)
    assert target.read_text() == "first" and os.listdir(target.parent) == ["result.json"]
