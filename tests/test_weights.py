"""Checkpoint layouts both ways, safe loading, clear errors, and published-weights downloads offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from transformers import PoolFormerConfig, PoolFormerForImageClassification

from poolformer import CheckpointError, create_model, get_spec
from poolformer.model import randomize_
from poolformer.weights import LAYOUTS, convert_state_dict, export_state_dict, load_checkpoint, read_checkpoint

from .conftest import marked_slow

V1 = ["s12", "s24", "s36", "m36", "m48"]
V2 = [f"v2_{s}" for s in V1]
# Key counts of the official release files (REFERENCE.md section 2).
OFFICIAL_KEY_COUNTS = {"s12": 132, "s24": 252, "s36": 372, "m36": 372, "m48": 492}


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("size", marked_slow(V1, *V1[1:]))
def test_official_layout_round_trips_for_every_v1_size(size):
    ours = randomize_(create_model(size))
    official = export_state_dict(ours, "official")
    assert len(official) == OFFICIAL_KEY_COUNTS[size]
    assert {"patch_embed.proj.weight", "network.0.0.layer_scale_1", "network.1.proj.weight", "norm.weight",
            "head.weight"} <= official.keys()
    assert f"network.6.{get_spec(size).arch.depths[3] - 1}.mlp.fc2.bias" in official
    converted, layout = convert_state_dict(official, create_model(size))
    assert layout == "official"
    fresh = create_model(size)
    fresh.load_state_dict(converted)
    assert _same_weights(fresh, ours)


@pytest.mark.parametrize("size", marked_slow(V1, *V1[1:]))
def test_transformers_layout_round_trips_for_every_v1_size(size):
    ours = randomize_(create_model(size))
    spec = get_spec(size)
    twin = PoolFormerForImageClassification(PoolFormerConfig(
        depths=list(spec.arch.depths), hidden_sizes=list(spec.arch.dims), num_labels=1000))
    twin.load_state_dict(export_state_dict(ours, "transformers"), strict=True)  # ours -> theirs
    converted, layout = convert_state_dict(twin.state_dict(), create_model(size))  # theirs -> ours
    assert layout == "transformers"
    fresh = create_model(size)
    fresh.load_state_dict(converted)
    assert _same_weights(fresh, ours)


@pytest.mark.parametrize("size", marked_slow(V1 + V2, *V1[1:], *V2[1:]))
def test_timm_layout_round_trips_through_timms_own_model(size):
    spec = get_spec(size)
    ours = randomize_(create_model(size))
    twin = timm.create_model(spec.name)
    twin.load_state_dict(export_state_dict(ours, "timm"), strict=True)
    converted, layout = convert_state_dict(twin.state_dict(), create_model(size))
    assert layout == "poolformer"  # timm's names are ours
    fresh = create_model(size)
    fresh.load_state_dict(converted)
    assert _same_weights(fresh, ours)


@pytest.mark.parametrize("size", marked_slow(V2, *V2[1:]))
def test_metaformer_v2_layout_uses_linear_mlps_and_round_trips(size):
    ours = randomize_(create_model(size))
    official = export_state_dict(ours, "metaformer")
    assert official["stages.0.0.mlp.fc1.weight"].ndim == 2  # sail-sg/metaformer stores Linear weights
    assert "downsample_layers.0.post_norm.weight" in official and "downsample_layers.1.pre_norm.weight" in official
    # timm's own converter for sail-sg/metaformer files is an independent reading of that layout.
    from timm.models.metaformer import checkpoint_filter_fn

    twin = timm.create_model(get_spec(size).name)
    twin.load_state_dict(checkpoint_filter_fn(dict(official), twin), strict=True)
    converted, layout = convert_state_dict(official, create_model(size))
    assert layout == "metaformer"
    fresh = create_model(size)
    fresh.load_state_dict(converted)
    assert _same_weights(fresh, ours)
    assert _same_weights(fresh, twin)


@pytest.mark.slow
def test_official_v1_files_agree_with_timms_converter():
    """timm's checkpoint_filter_fn reads official sail-sg files independently of our rules."""
    from timm.models.metaformer import checkpoint_filter_fn

    ours = randomize_(create_model("s12"))
    twin = timm.create_model("poolformer_s12")
    twin.load_state_dict(checkpoint_filter_fn(export_state_dict(ours, "official"), twin), strict=True)
    assert _same_weights(twin, ours)


@pytest.mark.parametrize("wrap", marked_slow([None, "state_dict", "model"], "state_dict", "model"))
def test_official_files_load_plain_or_wrapped(tmp_path, s12_random, wrap):
    sd = export_state_dict(s12_random, "official")
    obj = sd if wrap is None else {wrap: sd, "epoch": 300, "arch": "poolformer_s12"}
    path = tmp_path / "ckpt.pth.tar"
    torch.save(obj, path)
    model = create_model("s12", weights=str(path))
    assert _same_weights(model, s12_random)


@pytest.mark.slow
def test_ddp_prefixed_checkpoints_load(tmp_path, s12_random):
    path = tmp_path / "ddp.pth"
    torch.save({"module." + k: v for k, v in export_state_dict(s12_random, "official").items()}, path)
    assert _same_weights(create_model("s12", weights=path), s12_random)


@pytest.mark.parametrize("suffix", marked_slow([".safetensors", ".pth", ".bin"], ".pth", ".bin"))
def test_timm_files_load_as_safetensors_and_pth(tmp_path, s12_random, suffix):
    path = tmp_path / f"model{suffix}"
    sd = {k: v.contiguous() for k, v in export_state_dict(s12_random, "timm").items()}
    save_file(sd, str(path)) if suffix != ".pth" else torch.save(sd, path)
    report = load_checkpoint(model := create_model("s12"), path)
    assert report.layout == "poolformer" and report.num_tensors == 132
    assert _same_weights(model, s12_random)


@pytest.mark.slow
def test_transformers_checkpoint_gives_transformers_logits(tmp_path):
    twin = PoolFormerForImageClassification(PoolFormerConfig(num_labels=1000)).eval()
    randomize_(twin)
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in twin.state_dict().items()}, str(path))
    ours = create_model("s12", weights=path)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), twin(x).logits, atol=1e-5, rtol=1e-5)


class _Payload:
    """Unpickling this would create a file: proof of code execution if it ever appears."""

    marker = ""

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_a_pickle_that_would_run_code_is_refused_and_nothing_runs(tmp_path, s12_random):
    marker = tmp_path / "pwned"
    payload = _Payload()
    payload.marker = str(marker)
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": export_state_dict(s12_random, "official"), "hook": payload}, path)
    with pytest.raises(CheckpointError, match="refusing to load"):
        create_model("s12", weights=path)
    assert not marker.exists()


def test_truncated_and_non_checkpoint_files_are_clear_errors(tmp_path, s12_checkpoint):
    data = s12_checkpoint.read_bytes()
    truncated = tmp_path / "truncated.pth.tar"
    truncated.write_bytes(data[: len(data) // 2])
    text = tmp_path / "notes.pth"
    text.write_text("these are not weights\n")
    hostname = tmp_path / "hostname.pth"  # text whose first byte the unpickler reads as an opcode
    hostname.write_text("valhalla\n")
    noise = tmp_path / "noise.bin"
    noise.write_bytes(bytes(range(256)) * 4)
    bad_safetensors = tmp_path / "broken.safetensors"
    bad_safetensors.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    for path in (truncated, text, hostname, noise, bad_safetensors):
        with pytest.raises(CheckpointError) as err:
            read_checkpoint(path)
        message = str(err.value)
        assert "\n" not in message and str(path) in message
        assert "refusing" not in message  # junk is not mistaken for a code-running pickle
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        read_checkpoint(tmp_path / "missing.pth")


def test_a_file_of_non_tensors_is_refused(tmp_path):
    path = tmp_path / "meta.pth"
    torch.save({"epoch": 3, "lr": 0.1}, path)
    with pytest.raises(CheckpointError, match="no state_dict of tensors"):
        read_checkpoint(path)


@pytest.mark.slow
def test_wrong_architecture_lists_missing_and_unexpected_keys(tmp_path):
    path = tmp_path / "s24.pth"
    torch.save(export_state_dict(create_model("s24"), "official"), path)
    with pytest.raises(CheckpointError) as err:
        create_model("s12", weights=path)
    message = str(err.value)
    assert "\n" not in message
    assert "poolformer_s12" in message and "detected layout: official" in message
    assert "120 unexpected keys (network.0.2." in message  # s24's extra blocks, abbreviated
    assert "more)" in message


def test_wrong_class_count_reports_mis_shaped_keys(tmp_path, s12_checkpoint):
    with pytest.raises(CheckpointError, match=r"2 mis-shaped \(head.weight: checkpoint \[1000, 512\] vs model \[10, 512\]"):
        create_model("s12", weights=s12_checkpoint, num_classes=10)


@pytest.mark.slow
def test_v1_weights_into_v2_model_are_refused(s12_checkpoint):
    with pytest.raises(CheckpointError, match="does not fit poolformerv2_s12"):
        create_model("v2_s12", weights=s12_checkpoint)


def test_unrelated_state_dicts_match_no_layout(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(1000, 2048)}, path)
    with pytest.raises(CheckpointError, match="match no known layout"):
        create_model("s12", weights=path)


@pytest.mark.parametrize("code, expected", [
    # The authors' hybrids keep the position embedding as its own `network` entry (AddPositionEmb) before
    # the first attention stage, shifting later entries by one (sail-sg/poolformer models/metaformer.py).
    pytest.param("ppaa", ["network.3.proj.weight", "network.4.pos_embed", "network.5.5.token_mixer.qkv.weight",
                          "network.6.proj.weight", "network.7.1.token_mixer.proj.bias", "norm.weight"],
                 marks=pytest.mark.slow),
    pytest.param("pppa", ["network.5.proj.weight", "network.6.pos_embed", "network.7.0.token_mixer.qkv.weight",
                          "network.4.5.layer_scale_2"], marks=pytest.mark.slow),
    ("ppff", ["network.4.0.token_mixer.fc.weight", "network.6.1.token_mixer.fc.weight", "network.5.proj.bias"]),
])
def test_official_hybrid_files_round_trip_with_the_position_embedding_slot(tmp_path, code, expected):
    ours = randomize_(create_model(f"s12_{code}"))
    official = export_state_dict(ours, "official")
    assert set(expected) <= official.keys()
    path = tmp_path / f"metaformer_{code}_s12_224.pth.tar"
    torch.save(official, path)
    assert _same_weights(create_model(f"s12_{code}", weights=path), ours)


def test_every_layout_names_every_v1_key_uniquely():
    model = create_model("s12")
    for layout in LAYOUTS:
        foreign = export_state_dict(model, layout)
        assert len(foreign) == len(model.state_dict())


_DOWNLOAD_SCRIPT = """
import json, sys
from poolformer import create_model, PoolformerError
try:
    model = create_model(sys.argv[1], pretrained=True)
    print(json.dumps({"ok": True, "bias0": float(model.head.fc.bias[0])}))
except PoolformerError as err:
    print(json.dumps({"ok": False, "error": str(err)}))
"""


def _run_offline(tmp_path, name: str) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), TORCH_HOME=str(tmp_path / "torch"),
               PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    out = subprocess.run([sys.executable, "-c", _DOWNLOAD_SCRIPT, name], env=env, capture_output=True, text=True,
                         timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.subprocess
@pytest.mark.slow
def test_pretrained_offline_without_cache_says_what_to_pass(tmp_path):
    result = _run_offline(tmp_path, "s12")
    assert not result["ok"]
    assert "--weights PATH" in result["error"]
    assert "poolformer_s12.pth.tar" in result["error"]  # the file to download


@pytest.mark.subprocess
@pytest.mark.slow
def test_pretrained_offline_uses_the_hub_cache(tmp_path, s12_random):
    snapshot = tmp_path / "hf" / "hub" / "models--timm--poolformer_s12.sail_in1k"
    commit = "0" * 40
    (snapshot / "refs").mkdir(parents=True)
    (snapshot / "refs" / "main").write_text(commit)
    (snapshot / "snapshots" / commit).mkdir(parents=True)
    sd = {k: v.contiguous() for k, v in export_state_dict(s12_random, "timm").items()}
    save_file(sd, str(snapshot / "snapshots" / commit / "model.safetensors"))
    result = _run_offline(tmp_path, "s12")
    assert result == {"ok": True, "bias0": pytest.approx(s12_random.head.fc.bias[0].item())}


@pytest.mark.subprocess
@pytest.mark.slow
def test_pretrained_offline_uses_the_release_file_in_torch_cache(tmp_path, s12_random):
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(export_state_dict(s12_random, "official"), cache / "poolformer_s12.pth.tar")
    result = _run_offline(tmp_path, "s12")
    assert result == {"ok": True, "bias0": pytest.approx(s12_random.head.fc.bias[0].item())}


def test_models_without_published_weights_say_so():
    with pytest.raises(Exception, match="no published weights; pass a checkpoint with --weights"):
        create_model("s12_random", pretrained=True)
