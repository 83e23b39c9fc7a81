"""timm:NAME peers and glob patterns, wherever a model name goes."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from typer.testing import CliRunner

from poolformer import UnknownModelError
from poolformer.peers import PUBLISHED, create_peer, resolve_peer
from poolformer_cli.app import app

from .conftest import assert_one_line_error

runner = CliRunner()
TINY = "timm:resnet10t"  # 5M parameters: cheap everywhere


def test_peer_names_resolve_and_suggest():
    assert resolve_peer("timm:ResNet50") == ["timm:resnet50"]
    assert set(resolve_peer("timm:convnext_at*")) == {"timm:" + n for n in timm.list_models("convnext_at*")}
    with pytest.raises(UnknownModelError, match=r"did you mean: timm:resnet50"):
        resolve_peer("timm:resnt50")


def test_every_published_peer_is_a_timm_architecture_and_its_weights_exist():
    names = set(timm.list_models())
    pretrained = set(timm.list_models(pretrained=True))
    for arch, figures in PUBLISHED.items():
        assert arch in names, arch
        assert figures.weights in pretrained and figures.weights.split(".")[0] == arch
        assert 50 < figures.top1 < 90 and figures.source


def test_a_peer_is_timms_model_built_for_the_input_size():
    vit = create_peer("timm:deit_tiny_patch16_224", img_size=96)
    assert vit(torch.randn(1, 3, 96, 96)).shape == (1, 1000)  # a fixed token grid, sized for 96 px
    convnet = create_peer(TINY, img_size=96)  # takes any size: img_size is not passed on
    assert convnet(torch.randn(1, 3, 80, 80)).shape == (1, 1000)


@pytest.mark.slow
def test_summary_flops_and_bench_take_peers():
    result = runner.invoke(app, ["summary", TINY, "--resolution", "64", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["model"] == TINY
    assert summary["total_params"] == sum(p.numel() for p in timm.create_model("resnet10t").parameters())
    result = runner.invoke(app, ["flops", TINY, "--resolution", "64", "--json"])
    assert result.exit_code == 0, result.output
    counted = json.loads(result.stdout)["models"][0]
    assert counted["model"] == TINY and counted["counters"]["analytic"]["macs"] == summary["total_macs"]
    result = runner.invoke(app, ["bench", TINY, "s12", "--device", "cpu", "--batch-sizes", "1", "--resolutions", "64",
                                 "--warmup", "0", "--iters", "1", "--impl", "ours,fast", "--json"])
    assert result.exit_code == 0, result.output
    rows = {(r["model"], r["impl"]): r for r in json.loads(result.stdout)["results"]}
    assert rows[(TINY, "ours")]["status"] == "ok" and rows[("poolformer_s12", "fast")]["status"] == "ok"
    assert rows[(TINY, "fast")]["status"] == "error" and "PoolFormer models only" in rows[(TINY, "fast")]["error"]


def test_unknown_peer_is_one_line_error():
    assert_one_line_error(runner.invoke(app, ["summary", "timm:resnt50"]), "did you mean: timm:resnet50")


@pytest.mark.parametrize(("pattern", "expected"), [
    ("v2_*", ["poolformerv2_s12", "poolformerv2_s24", "poolformerv2_s36", "poolformerv2_m36", "poolformerv2_m48"]),
    ("poolformer_[sm]??", ["poolformer_s12", "poolformer_s24", "poolformer_s36", "poolformer_m36", "poolformer_m48"]),
    ("S12_POOL*", ["poolformer_s12_pool5", "poolformer_s12_pool7", "poolformer_s12_pool9"]),  # aliases, any case
])
def test_glob_patterns_select_models_in_zoo_order(pattern, expected):
    result = runner.invoke(app, ["list", pattern, "--json"])
    assert result.exit_code == 0, result.output
    assert [r["name"] for r in json.loads(result.stdout)] == expected


def test_patterns_work_in_summary_and_flops_and_repeats_collapse():
    result = runner.invoke(app, ["summary", "s12_pool*", "s12_pool5", "--resolution", "32", "--depth", "1", "--json"])
    assert result.exit_code == 0, result.output
    assert [d["model"] for d in json.loads(result.stdout)] == ["poolformer_s12_pool5", "poolformer_s12_pool7",
                                                              "poolformer_s12_pool9"]


@pytest.mark.parametrize("command", [["list"], ["summary"], ["flops"], ["bench", "--device", "cpu"], ["compare"]])
def test_a_pattern_that_matches_nothing_is_one_line_error(command):
    assert_one_line_error(runner.invoke(app, [*command, "poolformer_x*"]), "no model matches 'poolformer_x*'")


def test_list_shows_the_zoo_only():
    assert_one_line_error(runner.invoke(app, ["list", "timm:resnet50"]), "takes PoolFormer models only")
