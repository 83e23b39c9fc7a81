"""The CLI skeleton as a user meets it: start-up cost, --version, list, unknown names."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import typer
from typer.testing import CliRunner

from poolformer import list_models
from poolformer_cli.app import app
from poolformer_cli.common import resolve_model

runner = CliRunner()


COMMANDS = ["list", "summary", "flops", "predict", "eval", "bench", "profile", "compare", "export"]


def _imports_after(invocations: list[list[str]]) -> set[str]:
    """Which of torch / timm / matplotlib a fresh interpreter has imported after running the CLI with each
    argument list in turn (each must exit 0)."""
    code = ("import sys; from poolformer_cli.app import app; from typer.testing import CliRunner\n"
            f"for args in {invocations!r}:\n"
            "    r = CliRunner().invoke(app, args); assert r.exit_code == 0, (args, r.output)\n"
            "print(' '.join(m for m in ('torch', 'timm', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


@pytest.mark.subprocess
def test_help_version_and_list_do_not_import_torch():
    invocations = [["--help"], ["--version"], ["list"], ["list", "--json"], ["list", "--family", "v2"]]
    invocations += [[command, "--help"] for command in COMMANDS]
    assert _imports_after(invocations) == set()


def test_every_command_is_covered_by_the_torch_free_help_check():
    from typer.main import get_command

    assert sorted(get_command(app).commands) == sorted(COMMANDS)


@pytest.mark.subprocess
def test_module_entry_point_prints_the_version():
    out = subprocess.run([sys.executable, "-m", "poolformer_cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("poolformer ")


def test_list_json_has_every_model_with_counted_params():
    result = runner.invoke(app, ["list", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["name"] for r in rows] == list_models()
    by_name = {r["name"]: r for r in rows}
    s12 = by_name["poolformer_s12"]
    assert {"name", "aliases", "params", "macs", "top1", "crop_pct"} <= s12.keys()
    assert s12["aliases"] == ["s12"] and s12["params"] == 11_915_176 and s12["macs"] == 1_822_580_736
    assert s12["top1"] == 77.2 and s12["crop_pct"] == 0.9
    assert by_name["poolformer_m36"]["crop_pct"] == 0.95
    assert by_name["poolformerv2_s12"]["crop_pct"] == 1.0
    # frozen random matrices count as parameters, but not as trainable ones
    random = by_name["poolformer_s12_random"]
    assert random["params"] > 30_000_000 and random["trainable_params"] == 11_915_176


def test_list_table_and_family_filter():
    result = runner.invoke(app, ["list", "--family", "hybrid"])
    assert result.exit_code == 0
    assert "poolformer_s12_ppaa" in result.stdout and "poolformer_s24" not in result.stdout
    bad = runner.invoke(app, ["list", "--family", "v3"])
    assert bad.exit_code == 2 and "unknown family 'v3'" in bad.output


def test_unknown_model_names_exit_2_with_suggestions(capsys):
    with pytest.raises(typer.Exit) as exit_info:
        resolve_model("s13")
    assert exit_info.value.exit_code == 2
    assert "unknown model 's13'; did you mean: s12, s36?" in capsys.readouterr().err
    assert resolve_model("M48") == "poolformer_m48"


def test_write_atomic_replaces_whole_files_with_normal_permissions(tmp_path):
    import os
    import stat

    from poolformer_cli.common import write_atomic

    target = tmp_path / "sub" / "out.json"
    write_atomic(target, "first")
    write_atomic(target, "second")
    assert target.read_text() == "second"
    assert [p.name for p in target.parent.iterdir()] == ["out.json"]  # no temporary left behind
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~mask


# Every option that names a file to write, with arguments that would otherwise start real work. The dataset
# and checkpoint given to eval do not exist: the output check must come first, before anything is read.
FILE_OPTIONS = [
    (["summary", "s12"], "--csv"),
    (["bench", "s12", "--device", "cpu", "--batch-sizes", "1", "--resolutions", "32", "--iters", "1"], "--output"),
    (["bench", "s12", "--device", "cpu", "--batch-sizes", "1", "--resolutions", "32", "--iters", "1"], "--csv"),
    (["profile", "s12", "--device", "cpu", "--batch-size", "1", "--resolution", "32"], "--trace"),
    (["eval", "no-such-dataset", "--weights", "no-such.pth"], "--output"),
    (["eval", "no-such-dataset", "--weights", "no-such.pth"], "--predictions"),
]


@pytest.mark.parametrize(("command", "option"), FILE_OPTIONS, ids=lambda v: v if isinstance(v, str) else v[0])
def test_unwritable_output_paths_fail_before_work(tmp_path, command, option):
    from .conftest import assert_one_line_error

    blocker = tmp_path / "results"
    blocker.write_text("a file where a folder should be")
    result = runner.invoke(app, [*command, option, str(blocker / "out.file")])
    assert_one_line_error(result, f"{option} ", exit_code=2)
    assert "is a file, not a folder" in result.output
    result = runner.invoke(app, [*command, option, str(tmp_path)])
    assert_one_line_error(result, "is a directory; give a file name", exit_code=2)


def test_check_writable_accepts_new_nested_folders(tmp_path):
    from poolformer_cli.common import check_writable

    check_writable(tmp_path / "new" / "deeper" / "out.json", "--output")  # created when written
    check_writable(None, "--output")


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere; see the test below")
def test_check_writable_refuses_a_read_only_folder(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    from .conftest import assert_one_line_error

    assert_one_line_error(runner.invoke(app, ["summary", "s12", "--csv", str(locked / "out.csv")]),
                          "no permission to write in", exit_code=2)


def test_check_writable_refuses_a_folder_the_user_cannot_write(tmp_path, monkeypatch):
    """The same refusal on any host (root may write anywhere): the folder's write permission is denied."""
    from .conftest import assert_one_line_error

    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access

    def deny_writes_to(denied):
        return lambda path, mode: False if str(path) == str(denied) and mode & os.W_OK else real_access(path, mode)

    monkeypatch.setattr(os, "access", deny_writes_to(locked))
    assert_one_line_error(runner.invoke(app, ["summary", "s12", "--csv", str(locked / "new" / "out.csv")]),
                          "no permission to write in", exit_code=2)
    existing = tmp_path / "existing.csv"
    existing.write_text("old")
    monkeypatch.setattr(os, "access", deny_writes_to(existing))
    assert_one_line_error(runner.invoke(app, ["summary", "s12", "--csv", str(existing)]),
                          "cannot be overwritten: permission denied", exit_code=2)


def test_write_atomic_failure_is_one_line_and_keeps_the_old_file(tmp_path, monkeypatch, capsys):
    from poolformer_cli import common

    target = tmp_path / "out.json"
    target.write_text("old")

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(common.os, "replace", full)
    with pytest.raises(typer.Exit) as exit_info:
        common.write_atomic(target, "new")
    assert exit_info.value.exit_code == 1
    assert "No space left on device" in capsys.readouterr().err
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_error_messages_keep_their_square_brackets(capsys):
    """Rich markup must not eat a shape like [1, 3, 64, 64] out of a message."""
    from poolformer_cli.common import fail

    with pytest.raises(typer.Exit):
        fail("takes [1, 3, 64, 64] inputs, not [4, 3, 224, 224]")
    assert "takes [1, 3, 64, 64] inputs, not [4, 3, 224, 224]" in capsys.readouterr().err


HELP_WIDTH = 80


@pytest.mark.parametrize("command", COMMANDS)
def test_help_reads_as_its_docstring_in_paragraphs_and_ends_with_an_example(command, monkeypatch):
    """At 80 columns the description above the option panels is the docstring's paragraphs, each wrapped
    only where the next word would not fit (no break mid-sentence), and its last paragraph is an example."""
    from poolformer_cli.app import COMMANDS as FUNCTIONS, help_text

    monkeypatch.setenv("COLUMNS", str(HELP_WIDTH))
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.split("╭")[0].splitlines()
    description = [line.strip() for line in lines[next(i for i, line in enumerate(lines) if "Usage:" in line) + 1:]]
    paragraphs = [block.splitlines() for block in "\n".join(description).strip().split("\n\n")]
    expected = help_text(FUNCTIONS[command].__doc__).split("\n\n")
    assert [" ".join(paragraph) for paragraph in paragraphs] == expected
    room = max(len(line) for line in description)  # the width Typer wraps help text to
    assert room <= HELP_WIDTH
    for paragraph in paragraphs:
        for line, following in zip(paragraph, paragraph[1:]):
            assert len(line) + 1 + len(following.split()[0]) > room, f"{line!r} breaks before it has to"
    assert expected[-1].startswith(f"Example: poolformer {command} ")


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_help_is_whole_at_80_columns(command, monkeypatch):
    """The option panels fit 80 columns without cutting a word: no "…", and no "--no-X" twin column taking the
    room (every flag here is off by default or named for what it turns off)."""
    monkeypatch.setenv("COLUMNS", str(HELP_WIDTH))
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "…" not in result.stdout, result.stdout
    assert max(len(line) for line in result.stdout.splitlines()) <= HELP_WIDTH
    flags = re.findall(r"--no-[a-z-]+", result.stdout)
    assert all(f"--{flag[5:]} " not in result.stdout for flag in flags), flags


def test_the_root_help_lists_every_command_in_one_sentence_each(monkeypatch):
    monkeypatch.setenv("COLUMNS", str(HELP_WIDTH))
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0 and "Example: poolformer summary s24" in result.stdout
    for command in COMMANDS:
        assert f"│ {command} " in result.stdout
    assert max(len(line) for line in result.stdout.splitlines()) <= HELP_WIDTH


@pytest.mark.parametrize("argv, message", [
    (["predict", "img.jpg", "--features"], "No such option: --features; see 'poolformer predict -h'"),
    (["eval"], "Missing argument 'data'; see 'poolformer eval -h'"),
    (["nosuch"], "No such command 'nosuch'"),
    (["summary", "s12", "--csv"], "Option '--csv' requires an argument"),
])
def test_the_console_script_gives_usage_errors_in_one_line(argv, message, monkeypatch, capsys):
    """Click frames a usage error in a box over several lines; the console script says it in one, exit 2, and
    keeps help without arguments as it was."""
    from poolformer_cli.app import main

    monkeypatch.setattr(sys, "argv", ["poolformer", *argv])
    with pytest.raises(SystemExit) as exited:
        main()
    captured = capsys.readouterr()
    assert exited.value.code == 2 and captured.out == ""
    assert captured.err == f"error: {captured.err[7:].strip()}\n" and message in captured.err


def test_the_console_script_without_arguments_prints_help(monkeypatch, capsys):
    from poolformer_cli.app import main

    monkeypatch.setattr(sys, "argv", ["poolformer"])
    with pytest.raises(SystemExit):
        main()
    assert "Usage: poolformer" in capsys.readouterr().out
