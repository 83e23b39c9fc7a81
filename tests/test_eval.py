"""`poolformer eval` on generated datasets whose answer is known in advance.

A random-weights checkpoint is made here; an independent pipeline (timm's eval transform and the model
itself, one image at a time) ranks the classes for each image. Images are then filed under their top-1
class, under their 2nd or 5th most probable class (top-5 but not top-1), or under their 6th or 500th (neither),
so the exact top-1 and top-5 are known before `eval` runs, with both edges of the top-5 exercised.
"""

from __future__ import annotations

import csv
import functools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from poolformer import create_model
from poolformer.labels import imagenet_wnids
from poolformer.model import randomize_
from poolformer.weights import export_state_dict
from poolformer_cli.app import app

skdata = pytest.importorskip("skimage.data")
runner = CliRunner()

# image i goes under the class at this rank (0 = top-1) of its own prediction
RANK_FOR_IMAGE = (0, 0, 1, 4, 5, 499)
EXPECTED = {"images": 6, "correct_top1": 2, "correct_top5": 4, "skipped": 1}


def _crops():
    """Small crops of real photographs (cheap: 64x80 pixels before the resize to 248)."""
    sources = [skdata.astronaut(), skdata.coffee(), skdata.chelsea(), skdata.rocket()]
    for i in range(40):
        photo = sources[i % len(sources)]
        top, left = (37 * i) % (photo.shape[0] - 64), (53 * i) % (photo.shape[1] - 80)
        yield Image.fromarray(photo[top:top + 64, left:left + 80])


@functools.lru_cache(maxsize=1)
def _timm_transform():
    import timm
    from timm.data import create_transform, resolve_data_config

    return create_transform(**resolve_data_config(model=timm.create_model("poolformer_s12")))


def _rankings(model, images):
    """Logits [num_classes] of each image, from timm's transform, one image at a time."""
    with torch.no_grad():
        return [model(_timm_transform()(img)[None])[0] for img in images]


def _clear_ranking(logits, rank: int) -> bool:
    """True when the top-1 and top-5 boundaries and the class at `rank` are far from ties, so rounding
    differences between batch sizes cannot reorder them."""
    ordered = logits.sort(descending=True).values
    gaps = ordered[:-1] - ordered[1:]  # gaps[r]: between rank r and rank r + 1
    return all(gaps[r] > 1e-3 for r in {0, 4, rank, max(rank - 1, 0)})


@pytest.fixture(scope="module")
def known(tmp_path_factory):
    """A checkpoint, six images and, for each, its class ranking (logits sorted by the oracle)."""
    folder = tmp_path_factory.mktemp("known")
    model = randomize_(create_model("s12"), seed=5)
    checkpoint = folder / "s12_random.pth.tar"
    torch.save(export_state_dict(model, "official"), checkpoint)
    images, rankings = [], []
    for img in _crops():
        logits = _rankings(model, [img])[0]
        if _clear_ranking(logits, RANK_FOR_IMAGE[len(images)]):
            images.append(img)
            rankings.append(logits.argsort(descending=True).tolist())
        if len(images) == len(RANK_FOR_IMAGE):
            break
    assert len(images) == len(RANK_FOR_IMAGE)
    return checkpoint, images, rankings


def _imagenet_tree(root, known):
    """root/val/<wnid>/img<i>.JPEG as RANK_FOR_IMAGE says, one unreadable file, and a train/ folder."""
    _, images, rankings = known
    wnids = imagenet_wnids()
    targets = {}
    for i, (img, ranking) in enumerate(zip(images, rankings)):
        target = ranking[RANK_FOR_IMAGE[i]]
        (root / "val" / wnids[target]).mkdir(parents=True, exist_ok=True)
        path = root / "val" / wnids[target] / f"img{i}.JPEG"
        img.save(path, quality=95)
        targets[str(path)] = (target, ranking)
    broken = root / "val" / wnids[rankings[0][0]] / "broken.JPEG"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "train").mkdir()
    return targets, broken


def _eval(*args):
    return runner.invoke(app, ["eval", *map(str, args)])


def _check_summary(document, expected=EXPECTED):
    assert document["images"] == expected["images"]
    assert document["correct_top1"] == expected["correct_top1"]
    assert document["correct_top5"] == expected["correct_top5"]
    assert document["skipped"] == expected["skipped"]
    assert document["top1"] == pytest.approx(100 * expected["correct_top1"] / expected["images"])
    assert document["top5"] == pytest.approx(100 * expected["correct_top5"] / expected["images"])
    assert document["throughput"] > 0


@pytest.mark.slow
def test_imagenet_layout_exact_top1_top5_and_files(tmp_path, known):
    checkpoint = known[0]
    targets, broken = _imagenet_tree(tmp_path / "imagenet", known)
    out, predictions = tmp_path / "out" / "summary.json", tmp_path / "out" / "per_image.csv"
    result = _eval(tmp_path / "imagenet", "--weights", checkpoint, "--workers", "2", "--batch-size", "4",
                   "--device", "cpu", "--output", out, "--predictions", predictions)
    assert result.exit_code == 0, result.output
    document = json.loads(out.read_text())
    _check_summary(document)
    assert document["mapping"] == "imagenet-wnid" and document["root"].endswith("val")
    assert document["skipped_files"] == [{"path": str(broken), "error": document["skipped_files"][0]["error"]}]
    assert "top-1" in result.stdout and "33.333%" in result.stdout and "66.667%" in result.stdout
    assert str(broken) in result.stderr

    rows = list(csv.DictReader(predictions.open()))
    scored = {r["path"]: r for r in rows if not r["error"]}
    assert set(scored) == set(targets)
    for path, (target, ranking) in targets.items():
        row = scored[path]
        assert int(row["target"]) == target and int(row["top1"]) == ranking[0]
        assert [int(i) for i in row["top5"].split()] == ranking[:5]
        assert row["correct_top1"] == str(int(ranking[0] == target))
        assert row["correct_top5"] == str(int(target in ranking[:5]))
    assert [r["path"] for r in rows if r["error"]] == [str(broken)]


@pytest.mark.slow
@pytest.mark.subprocess
def test_eval_runs_the_published_weights_by_default(tmp_path, known):
    """No --weights: the published s12 weights, here the release file in torch hub's cache (offline), give the
    same counts as the checkpoint passed by name."""
    checkpoint = known[0]
    _imagenet_tree(tmp_path / "data", known)
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    shutil.copy(checkpoint, cache / "poolformer_s12.pth.tar")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), TORCH_HOME=str(tmp_path / "torch"),
               PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    result = subprocess.run([sys.executable, "-m", "poolformer_cli", "eval", str(tmp_path / "data"), "--json",
                             "--workers", "0", "--device", "cpu"], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    _check_summary(json.loads(result.stdout))


@pytest.mark.slow
def test_options_keep_the_answer(tmp_path, known):
    """channels_last, another batch size, bf16 autocast and --json change nothing that is counted."""
    _imagenet_tree(tmp_path, known)
    result = _eval(tmp_path / "val", "--weights", known[0], "--workers", "0", "--batch-size", "3",
                   "--channels-last", "--json")
    assert result.exit_code == 0, result.output
    _check_summary(json.loads(result.stdout))
    low = _eval(tmp_path, "--weights", known[0], "--workers", "0", "--precision", "bf16", "--json")
    assert low.exit_code == 0, low.output
    assert json.loads(low.stdout)["images"] == 6 and json.loads(low.stdout)["precision"] == "bf16"


@pytest.mark.slow
def test_limit_takes_images_spread_over_the_dataset(tmp_path, known):
    targets, broken = _imagenet_tree(tmp_path, known)
    in_order = sorted([*targets, str(broken)], key=lambda p: (p.split("/")[-2], p))  # class folder, then file
    chosen = [in_order[0], in_order[len(in_order) // 2]]  # limit 2 of 7: positions 0 and 3
    result = _eval(tmp_path, "--weights", known[0], "--workers", "0", "--limit", "2", "--json")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    expected_skipped = [p for p in chosen if p == str(broken)]
    assert document["images"] + document["skipped"] == 2
    assert [s["path"] for s in document["skipped_files"]] == expected_skipped
    scored = [p for p in chosen if p != str(broken)]
    assert document["correct_top1"] == sum(targets[p][0] == targets[p][1][0] for p in scored)


@pytest.mark.slow
def test_class_map_for_any_folder_names(tmp_path, known):
    checkpoint, images, rankings = known
    mapping = {}
    for i, (img, ranking) in enumerate(zip(images, rankings)):
        (tmp_path / "data" / f"photo-{i}").mkdir(parents=True)
        img.save(tmp_path / "data" / f"photo-{i}" / "x.png")
        mapping[f"photo-{i}"] = ranking[RANK_FOR_IMAGE[i]]
    (tmp_path / "map.json").write_text(json.dumps(mapping))
    without = _eval(tmp_path / "data", "--weights", checkpoint)
    assert without.exit_code == 2 and "--class-map" in without.stderr
    result = _eval(tmp_path / "data", "--weights", checkpoint, "--class-map", tmp_path / "map.json",
                   "--workers", "0", "--json")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    _check_summary(document, {**EXPECTED, "skipped": 0})
    assert document["mapping"] == "class-map"


@pytest.mark.slow
def test_sorted_folders_when_count_equals_classes(tmp_path, known):
    _, images, _ = known
    model = randomize_(create_model("s12", num_classes=10), seed=8)
    checkpoint = tmp_path / "ten.safetensors"
    from safetensors.torch import save_file

    save_file(export_state_dict(model, "timm"), str(checkpoint))
    names = sorted(f"kind_{c}" for c in "qwertyuiop")  # sorted order decides the index
    top1 = [int(logits.argmax()) for logits in _rankings(model, images[:3])]
    for name in names:
        (tmp_path / "data" / name).mkdir(parents=True)
    for i, (img, predicted) in enumerate(zip(images[:3], top1)):
        target = predicted if i < 2 else (predicted + 1) % 10  # two right, one wrong
        img.save(tmp_path / "data" / names[target] / f"{i}.png")
    result = _eval(tmp_path / "data", "--weights", checkpoint, "--workers", "0", "--json")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["mapping"] == "sorted" and document["images"] == 3 and document["correct_top1"] == 2


@pytest.mark.subprocess
@pytest.mark.slow
def test_torchrun_two_processes_match_one(tmp_path, known):
    _imagenet_tree(tmp_path / "data", known)
    single_json, single_csv = tmp_path / "one.json", tmp_path / "one.csv"
    result = _eval(tmp_path / "data", "--weights", known[0], "--workers", "0", "--batch-size", "2",
                   "--output", single_json, "--predictions", single_csv, "--no-progress")
    assert result.exit_code == 0, result.output
    double_json, double_csv = tmp_path / "two.json", tmp_path / "two.csv"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "poolformer_cli", "eval", str(tmp_path / "data"), "--weights", str(known[0]), "--workers", "0",
         "--batch-size", "2", "--device", "cpu", "--output", str(double_json), "--predictions", str(double_csv),
         "--no-progress"],
        capture_output=True, text=True, env=env, timeout=180,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    one, two = json.loads(single_json.read_text()), json.loads(double_json.read_text())
    assert two["world_size"] == 2 and one["world_size"] == 1
    for key in ("images", "skipped", "correct_top1", "correct_top5", "top1", "top5", "skipped_files"):
        assert two[key] == one[key], key
    _check_summary(two)
    assert run.stdout.count("top-1") == 1  # only rank 0 reports

    def without_probability(path):
        return [{k: v for k, v in row.items() if k != "top1_probability"} for row in csv.DictReader(path.open())]

    assert without_probability(double_csv) == without_probability(single_csv)


def test_bad_input_is_one_line_and_exit_2(tmp_path, known):
    checkpoint = known[0]
    (tmp_path / "empty").mkdir()
    (tmp_path / "loose").mkdir()
    known[1][0].save(tmp_path / "loose" / "a.png")
    (tmp_path / "unknown" / "n99999999").mkdir(parents=True)
    known[1][0].save(tmp_path / "unknown" / "n99999999" / "a.png")
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "outdir").mkdir()
    cases = [
        ([tmp_path / "missing"], "not found"),
        ([tmp_path / "empty"], "no class folders"),
        ([tmp_path / "loose"], "no class folders"),
        ([tmp_path / "unknown"], "not ImageNet-1k wnids: n99999999"),
        ([tmp_path / "unknown", "--class-map", tmp_path / "bad.json"], "not valid JSON"),
        ([tmp_path / "unknown", "--precision", "fp8"], "unknown precision"),
        ([tmp_path / "unknown", "--impl", "nope"], "unknown implementation"),
        ([tmp_path / "unknown", "--output", tmp_path / "outdir"], "is a directory"),
        ([tmp_path / "unknown", "--limit", "0"], "--limit"),
    ]
    for args, message in cases:
        result = _eval(*args, "--weights", checkpoint)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.output
    (tmp_path / "unreadable" / imagenet_wnids()[7]).mkdir(parents=True)
    (tmp_path / "unreadable" / imagenet_wnids()[7] / "a.JPEG").write_text("not an image")
    nothing = _eval(tmp_path / "unreadable", "--weights", checkpoint, "--workers", "0")
    assert nothing.exit_code == 1 and "none of the 1 images could be read" in nothing.stderr
    assert "images skipped" in nothing.stdout and "a.JPEG" in nothing.stderr
    no_weights = _eval(tmp_path / "unknown", "--model", "s12_random")
    assert no_weights.exit_code == 2 and "has no published weights: pass a checkpoint" in no_weights.stderr
