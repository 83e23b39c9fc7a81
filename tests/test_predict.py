"""`poolformer predict` through the CLI, against an independent path: timm's eval transform, the model the
checkpoint was made from, and timm's ImageNet class names."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from poolformer import create_model
from poolformer.model import randomize_
from poolformer.weights import export_state_dict
from poolformer_cli.app import app

skdata = pytest.importorskip("skimage.data")
runner = CliRunner()


@pytest.fixture
def photos(tmp_path):
    """Three real photographs saved as files in a folder of their own."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("astronaut", "chelsea", "coffee"):
        Image.fromarray(getattr(skdata, name)()).save(folder / f"{name}.jpg", quality=90)
    return folder


def _timm_top_k(model: torch.nn.Module, path, k: int) -> tuple[list[int], list[float]]:
    """The oracle: timm's transform for the same model config, one image at a time."""
    import timm
    from timm.data import create_transform, resolve_data_config

    transform = create_transform(**resolve_data_config(model=timm.create_model("poolformer_s12")))
    with torch.no_grad():
        probabilities = model(transform(Image.open(path).convert("RGB"))[None]).softmax(-1)[0]
    values, indices = probabilities.topk(k)
    return indices.tolist(), values.tolist()


def _predict(*args: str):
    return runner.invoke(app, ["predict", *map(str, args)])


@pytest.mark.slow
def test_json_matches_independent_pipeline(photos, s12_random, s12_checkpoint):
    from timm.data import ImageNetInfo

    result = _predict(photos / "astronaut.jpg", photos / "chelsea.jpg", "--weights", s12_checkpoint,
                      "--top-k", "3", "--json", "--device", "cpu", "--batch-size", "2")
    assert result.exit_code == 0, result.output
    entries = json.loads(result.stdout)
    assert [e["image"] for e in entries] == [str(photos / "astronaut.jpg"), str(photos / "chelsea.jpg")]
    info = ImageNetInfo()
    for entry in entries:
        indices, probabilities = _timm_top_k(s12_random, entry["image"], 3)
        assert "error" not in entry
        assert [p["index"] for p in entry["predictions"]] == indices
        assert [p["probability"] for p in entry["predictions"]] == pytest.approx(probabilities, abs=1e-5)
        assert [p["label"] for p in entry["predictions"]] == [info.index_to_description(i) for i in indices]


@pytest.mark.slow
def test_table_per_image_and_batch_size_does_not_change_results(photos, s12_checkpoint):
    table = _predict(photos, "--weights", s12_checkpoint, "--top-k", "2")
    assert table.exit_code == 0, table.output
    for name in ("astronaut.jpg", "chelsea.jpg", "coffee.jpg"):
        assert name in table.stdout
    assert "rank" in table.stdout and "probability" in table.stdout and "%" in table.stdout
    one = json.loads(_predict(photos, "--weights", s12_checkpoint, "--json", "--batch-size", "1").stdout)
    three = json.loads(_predict(photos, "--weights", s12_checkpoint, "--json", "--batch-size", "3").stdout)
    assert [[p["index"] for p in e["predictions"]] for e in one] == [[p["index"] for p in e["predictions"]] for e in three]
    assert len(one) == 3 and all(len(e["predictions"]) == 5 for e in one)


@pytest.mark.slow
def test_directory_glob_and_failures(photos, s12_checkpoint):
    (photos / "broken.jpg").write_bytes((photos / "coffee.jpg").read_bytes()[:2000])
    (photos / "notes.txt").write_text("not an image, and not picked up from the directory")
    result = _predict(photos / "broken.jpg", str(photos / "a*.jpg"), photos / "missing.jpg",
                      str(photos / "zzz*.png"), "--weights", s12_checkpoint, "--json", "--top-k", "1")
    assert result.exit_code == 1
    entries = json.loads(result.stdout)
    assert [e["image"] for e in entries] == [str(photos / "broken.jpg"), str(photos / "astronaut.jpg"),
                                             str(photos / "missing.jpg"), str(photos / "zzz*.png")]
    assert "truncated" in entries[0]["error"] and entries[0]["predictions"] == []
    assert "error" not in entries[1] and len(entries[1]["predictions"]) == 1
    assert entries[2]["error"] == "no such file"
    assert "no files match" in entries[3]["error"]

    table = _predict(photos, "--weights", s12_checkpoint)
    assert table.exit_code == 1
    assert "broken.jpg" in table.stderr and "notes.txt" not in table.output
    assert "astronaut.jpg" in table.stdout


@pytest.mark.slow
def test_other_class_count_shows_indices_or_labels_file(tmp_path, photos):
    model = randomize_(create_model("s12", num_classes=10), seed=3)
    checkpoint = tmp_path / "ten_classes.pth"
    torch.save(export_state_dict(model, "timm"), checkpoint)
    indices, _ = _timm_top_k(model, photos / "chelsea.jpg", 3)

    plain = json.loads(_predict(photos / "chelsea.jpg", "--weights", checkpoint, "--json", "-k", "3").stdout)
    assert [(p["index"], p["label"]) for p in plain[0]["predictions"]] == [(i, str(i)) for i in indices]

    labels = tmp_path / "labels.txt"
    labels.write_text("".join(f"class-{c}\n" for c in "abcdefghij"))
    named = json.loads(_predict(photos / "chelsea.jpg", "--weights", checkpoint, "--labels", labels, "--json",
                                "-k", "3").stdout)
    assert [p["label"] for p in named[0]["predictions"]] == [f"class-{'abcdefghij'[i]}" for i in indices]

    labels.write_text("only\ntwo\n")
    wrong = _predict(photos / "chelsea.jpg", "--weights", checkpoint, "--labels", labels)
    assert wrong.exit_code == 2 and "2 names but the model has 10 classes" in wrong.stderr


def test_refuses_without_weights_and_bad_options(photos, s12_checkpoint):
    image = photos / "chelsea.jpg"
    cases = [
        ([image, "--model", "s12_random"], "poolformer_s12_random has no published weights: pass a checkpoint"),
        ([image, "--weights", s12_checkpoint, "--impl", "nope"], "unknown implementation 'nope'"),
        ([image, "--weights", s12_checkpoint, "--model", "s13"], "unknown model 's13'"),
        ([image, "--weights", s12_checkpoint, "--top-k", "0"], "--top-k"),
        ([image, "--weights", s12_checkpoint, "--device", "tpu9"], "device"),
        ([image, "--weights", s12_checkpoint, "--pretrained"], "not both"),
    ]
    for args, message in cases:
        result = _predict(*args)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.output


def _offline_cli(tmp_path, *args) -> subprocess.CompletedProcess:
    """The command line in a fresh process, offline, with empty weight caches under tmp_path (Hugging Face reads
    its cache folder once, at import)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), TORCH_HOME=str(tmp_path / "torch"),
               PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    return subprocess.run([sys.executable, "-m", "poolformer_cli", *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.subprocess
def test_predict_runs_the_published_weights_by_default(tmp_path, photos, s12_random, s12_checkpoint):
    """No --weights: the published weights, from the cache when offline; not cached: one line naming the file to
    download and --weights, exit 1, nothing on stdout."""
    missing = _offline_cli(tmp_path, "predict", photos / "chelsea.jpg")
    assert missing.returncode == 1 and missing.stdout == ""
    assert len(missing.stderr.strip().splitlines()) == 1
    assert "poolformer_s12.pth.tar" in missing.stderr and "--weights PATH" in missing.stderr

    cache = tmp_path / "torch" / "hub" / "checkpoints"  # where the authors' release file is kept once downloaded
    cache.mkdir(parents=True)
    torch.save(export_state_dict(s12_random, "official"), cache / "poolformer_s12.pth.tar")
    published = _offline_cli(tmp_path, "predict", photos / "chelsea.jpg", "--json", "-k", "3")
    assert published.returncode == 0, published.stderr
    given = _predict(photos / "chelsea.jpg", "--weights", s12_checkpoint, "--json", "-k", "3")
    default, explicit = json.loads(published.stdout)[0], json.loads(given.stdout)[0]
    # Same weights, another process: the same classes, probabilities up to float32 reduction order (threads).
    assert [(p["index"], p["label"]) for p in default["predictions"]] == [
        (p["index"], p["label"]) for p in explicit["predictions"]]
    assert [p["probability"] for p in default["predictions"]] == pytest.approx(
        [p["probability"] for p in explicit["predictions"]], rel=1e-5)


@pytest.mark.slow
def test_impl_choices_are_read_at_run_time(photos, s12_checkpoint, monkeypatch):
    """A newly registered implementation (as issue #6 adds "fast") is accepted without touching predict."""
    from poolformer import implementations

    built = []

    class Twin(implementations.Implementation):
        def convert(self, model):
            built.append(type(model).__name__)
            return model

    monkeypatch.setitem(implementations.IMPLEMENTATIONS, "twin", Twin())
    result = _predict(photos / "chelsea.jpg", "--weights", s12_checkpoint, "--impl", "twin", "--json")
    assert result.exit_code == 0, result.output
    assert built == ["MetaFormer"]


@pytest.mark.slow
def test_timm_implementation_runs_the_timm_model(photos, s12_random, s12_checkpoint):
    import timm

    twin = timm.create_model("poolformer_s12")
    twin.load_state_dict(export_state_dict(s12_random, "timm"))
    twin.eval()
    indices, probabilities = _timm_top_k(twin, photos / "coffee.jpg", 3)
    result = _predict(photos / "coffee.jpg", "--weights", s12_checkpoint, "--impl", "timm", "--json", "-k", "3")
    assert result.exit_code == 0, result.output
    predictions = json.loads(result.stdout)[0]["predictions"]
    assert [p["index"] for p in predictions] == indices
    assert np.allclose([p["probability"] for p in predictions], probabilities, atol=1e-5)
