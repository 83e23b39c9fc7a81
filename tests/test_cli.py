"""The CLI skeleton as a user meets it: start-up cost, --version, list, unknown names."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import typer
from typer.testing import CliRunner

from poolformer import list_models
from poolformer_cli.app import app
from poolformer_cli.common import resolve_model

runner = CliRunner()


def test_help_and_version_do_not_import_torch():
    code = ("import sys; from poolformer_cli.app import app; from typer.testing import CliRunner; "
            "r = CliRunner().invoke(app, ['--help']); assert r.exit_code == 0, r.output; "
            "r = CliRunner().invoke(app, ['--version']); assert r.exit_code == 0; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


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
