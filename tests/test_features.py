"""Features-only models (the dense tasks' backbones) and the official detection and segmentation checkpoints."""

from __future__ import annotations

import re

import pytest
import timm
import torch
import torch.nn.functional as F

from poolformer import CheckpointError, ConfigError, create_model, get_spec
from poolformer.weights import export_state_dict, load_checkpoint
from poolformer.model import randomize_

# official fork_feat backbone keys: the classifier's less norm.* and head.*, plus norm0/2/4/6
DENSE_KEY_COUNTS = {"s12": 132 - 4 + 8, "m36": 372 - 4 + 8}


def _images(h: int = 64, w: int = 96, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(0))


def _dense_checkpoint(backbone: torch.nn.Module, task: str) -> dict:
    """An mmdet/mmseg file as their save_checkpoint writes it: meta, the state_dict with the backbone under
    `backbone.` beside the task's modules, and optimizer state."""
    heads = {"retinanet": ("neck", "bbox_head"), "mask_rcnn": ("neck", "rpn_head", "roi_head"),
             "fpn": ("neck", "decode_head")}[task]
    state = {f"backbone.{k}": v for k, v in export_state_dict(backbone, "official").items()}
    for head in heads:
        for j in range(3):
            state[f"{head}.conv{j}.weight"] = torch.randn(8, 8, 3, 3)
    meta = {"epoch": 12, "CLASSES": ("person", "bicycle"), "mmdet_version": "2.28.2", "config": "model = dict()"}
    return {"meta": meta, "state_dict": state, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4}]}}


def test_a_features_only_model_gives_four_normalised_maps_and_no_head():
    model = randomize_(create_model("s12", features_only=True), seed=1)
    x = _images(97, 131)
    with torch.no_grad():
        maps = model(x)
        stages = model.forward_stages(x)
    assert model.head is None and model.num_classes == 0
    assert [m.shape[1] for m in maps] == [64, 128, 320, 512]
    assert [tuple(m.shape[-2:]) for m in maps] == [tuple(s.shape[-2:]) for s in stages]
    for norm, out, stage in zip(model.feature_norms, maps, stages):
        expected = F.group_norm(stage, 1, norm.weight, norm.bias, eps=1e-5)  # fork_feat's GroupNorm(1, C)
        torch.testing.assert_close(out, expected)
    with pytest.raises(ConfigError, match="no head"):
        model.forward_head(stages[-1])


@pytest.mark.parametrize("name", ["s12", pytest.param("m36", marks=pytest.mark.slow), "v2_s12"])
def test_backbone_maps_match_timms_features_only_model_before_the_norms(name):
    ours = randomize_(create_model(name, features_only=True), seed=2)
    twin = timm.create_model(get_spec(name).name, features_only=True).eval()
    # timm's feature wrapper names the stages stages_0..stages_3 and keeps no head
    weights = {re.sub(r"^stages\.(\d)\.", r"stages_\1.", k): v for k, v in export_state_dict(ours, "timm").items()
               if not k.startswith(("feature_norms.", "head."))}
    twin.load_state_dict(weights, strict=True)
    x = _images()
    with torch.no_grad():
        for a, b in zip(ours.forward_stages(x), twin(x), strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name, task", [("s12", "retinanet"), ("s12", "mask_rcnn"),
                                        pytest.param("m36", "fpn", marks=pytest.mark.slow)])
def test_official_dense_checkpoints_load_the_backbone_and_set_the_heads_aside(tmp_path, name, task):
    source = randomize_(create_model(name, features_only=True), seed=3)
    checkpoint = _dense_checkpoint(source, task)
    assert sum(k.startswith("backbone.") for k in checkpoint["state_dict"]) == DENSE_KEY_COUNTS[name]
    path = tmp_path / f"{task}_poolformer_{name}.pth"
    torch.save(checkpoint, path)
    model = create_model(name, features_only=True, weights=str(path))
    report = model.load_report
    assert report.layout == "official" and report.num_tensors == DENSE_KEY_COUNTS[name]
    heads = {"retinanet": 6, "mask_rcnn": 9, "fpn": 6}[task]
    assert report.set_aside_count == heads
    assert f"set aside {heads} keys" in report.note() and "neck 3" in report.note()
    x = _images()
    with torch.no_grad():
        for a, b in zip(model(x), source(x), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_dense_checkpoint_into_a_classifier_says_to_use_features(tmp_path):
    path = tmp_path / "retinanet.pth"
    torch.save(_dense_checkpoint(create_model("s12", features_only=True), "retinanet"), path)
    with pytest.raises(CheckpointError, match="detection/segmentation backbone: load it into a features-only"):
        create_model("s12", weights=str(path))


@pytest.mark.slow
def test_a_dense_checkpoint_of_another_size_is_refused(tmp_path):
    path = tmp_path / "fpn_m36.pth"
    torch.save(_dense_checkpoint(create_model("m36", features_only=True), "fpn"), path)
    with pytest.raises(CheckpointError, match="does not fit poolformer_s12 .*mis-shaped"):
        create_model("s12", features_only=True, weights=str(path))


def test_classification_weights_start_a_backbone_with_fresh_output_norms(tmp_path, s12_checkpoint, s12_random):
    model = create_model("s12", features_only=True, weights=str(s12_checkpoint))
    report = model.load_report
    assert report.set_aside == (("classifier head", 4),)
    assert len(report.initialised) == 8 and "feature_norms.0.weight" in report.initialised
    assert "left as initialised" in report.note()
    for norm in model.feature_norms:
        assert torch.equal(norm.weight, torch.ones_like(norm.weight))
        assert torch.equal(norm.bias, torch.zeros_like(norm.bias))
    x = _images()
    with torch.no_grad():
        for a, b in zip(model.forward_stages(x), s12_random.forward_stages(x), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_features_only_model_round_trips_its_own_file(tmp_path):
    source = randomize_(create_model("s12", features_only=True), seed=4)
    path = tmp_path / "backbone.pth"
    torch.save(source.state_dict(), path)
    model = create_model("s12", features_only=True)
    report = load_checkpoint(model, path)
    assert report.note() is None and report.layout == "poolformer"
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), source.state_dict().values()))
