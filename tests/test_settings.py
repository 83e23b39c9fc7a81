"""One settings module owns every POOLFORMER_* variable, parses each kind one way, and docs/environment.md lists
exactly those variables."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from poolformer import settings
from poolformer.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
NAME = re.compile(r"POOLFORMER_[A-Z0-9_]*[A-Z0-9]")


def _names_in(paths) -> set[str]:
    found: set[str] = set()
    for path in paths:
        found.update(NAME.findall(path.read_text(encoding="utf-8")))
    return found


def test_docs_list_exactly_the_settings():
    documented = set(re.findall(r"^\| `(POOLFORMER_[A-Z0-9_]+)` \|", (ROOT / "docs/environment.md").read_text(),
                                re.M))
    assert documented == set(settings.SETTINGS)


def test_the_code_reads_no_variable_the_settings_module_does_not_own():
    sources = [p for folder in ("poolformer", "poolformer_cli", "benchmarks") for p in (ROOT / folder).rglob("*.py")]
    assert _names_in(sources) <= set(settings.SETTINGS)


@pytest.mark.parametrize("text, expected", [("1", True), ("TRUE", True), (" yes ", True), ("On", True),
                                            ("0", False), ("false", False), ("No", False), ("off", False)])
def test_a_flag_takes_the_same_words_everywhere(monkeypatch, text, expected):
    for name in [s.name for s in settings.SETTINGS.values() if s.kind == "flag"]:
        monkeypatch.setenv(name, text)
        assert settings.flag(name) is expected


def test_unset_or_empty_gives_the_default(monkeypatch):
    for setting in settings.SETTINGS.values():
        monkeypatch.setenv(setting.name, "")
        if setting.kind == "flag":
            assert settings.flag(setting.name) is setting.default
        elif setting.kind == "choice":
            assert settings.choice(setting.name) == setting.default
        else:
            assert settings.path(setting.name, Path("/d")) == Path("/d")


@pytest.mark.parametrize("name", sorted(n for n, s in settings.SETTINGS.items() if s.kind != "path"))
def test_an_unknown_value_is_a_one_line_error_naming_the_variable(monkeypatch, name):
    """(A path setting takes any text as a file name.)"""
    setting = settings.SETTINGS[name]
    monkeypatch.setenv(name, "maybe")
    read = settings.flag if setting.kind == "flag" else settings.choice
    with pytest.raises(ConfigError) as caught:
        read(name)
    message = str(caught.value)
    assert message.startswith(f"{name}='maybe' is not") and "\n" not in message


def test_a_choice_is_case_insensitive_and_a_path_can_be_turned_off(monkeypatch, tmp_path):
    monkeypatch.setenv("POOLFORMER_TRITON_MLP", " Gemm ")
    assert settings.choice("POOLFORMER_TRITON_MLP") == "gemm"
    monkeypatch.setenv("POOLFORMER_TRITON_TILE_CACHE", "off")
    assert settings.path("POOLFORMER_TRITON_TILE_CACHE", tmp_path) is None
    monkeypatch.setenv("POOLFORMER_TRITON_TILE_CACHE", "~/tiles.json")
    assert settings.path("POOLFORMER_TRITON_TILE_CACHE", tmp_path) == Path("~/tiles.json").expanduser()


def test_offline_reads_both_variables_with_the_same_words(monkeypatch):
    monkeypatch.delenv("POOLFORMER_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "on")
    assert settings.offline()
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert not settings.offline()
    monkeypatch.setenv("POOLFORMER_OFFLINE", "yes")
    assert settings.offline()


def test_the_users_of_a_setting_raise_its_error(monkeypatch):
    """A bad value reaches the user through the code that reads it, not a silent default."""
    from poolformer.fast import cuda, module

    monkeypatch.setenv("POOLFORMER_CUDA_GRAPHS", "sometimes")
    with pytest.raises(ConfigError, match="POOLFORMER_CUDA_GRAPHS"):
        cuda.graphs_enabled_by_env()
    monkeypatch.setenv("POOLFORMER_FAST_BACKEND", "avx9000")
    with pytest.raises(ConfigError, match="POOLFORMER_FAST_BACKEND='avx9000' is not one of: auto, triton"):
        module.requested_backend("auto")
