"""The device and precision names every engine shares."""

from __future__ import annotations

import pytest
import torch

from poolformer import ConfigError
from poolformer.devices import autocast, resolve_device


def test_auto_picks_the_gpu_when_present_else_the_cpu():
    expected = "cuda:0" if torch.cuda.is_available() else "cpu"
    assert str(resolve_device("auto")) == str(resolve_device(None)) == expected


def test_kinds_limit_what_a_caller_accepts():
    assert resolve_device("mps").type == "mps"  # predict/eval take any torch device kind
    with pytest.raises(ConfigError, match="unknown device 'mps'; use cpu, cuda"):
        resolve_device("mps", kinds=("cpu", "cuda"))  # bench times only what it can synchronise
    with pytest.raises(ConfigError, match="unknown device 'gpu'"):
        resolve_device("gpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_without_a_gpu_says_use_cpu():
    with pytest.raises(ConfigError, match="no CUDA GPU is available.*use --device cpu"):
        resolve_device("cuda:1")


def test_autocast_runs_the_named_dtype_and_fp32_runs_without_it():
    with autocast("cpu", "bf16"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    with autocast(torch.device("cpu"), "fp32"):
        assert not torch.is_autocast_enabled("cpu")


def test_the_cli_offers_exactly_the_library_precisions():
    from poolformer.devices import PRECISIONS
    from poolformer_cli.common import PRECISION_NAMES

    assert PRECISION_NAMES == tuple(PRECISIONS)
