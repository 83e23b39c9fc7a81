"""Shared fixtures: small inputs and checkpoints made here from random initialisation (nothing is downloaded)."""

from __future__ import annotations

import os

import torch

# Where there is no CUDA GPU, the Triton kernels of the fast path run in Triton's interpreter on CPU tensors (see
# poolformer.fast.triton.availability); on a GPU they are compiled and run on it. Triton picks interpreting or
# compiling once, when it is first imported (torchvision imports it), so the switches are set before anything
# imports Triton; torch itself, and asking it for a GPU, does not.
if not torch.cuda.is_available():
    os.environ.setdefault("POOLFORMER_TRITON_INTERPRET", "1")
if "POOLFORMER_TRITON_INTERPRET" in os.environ:
    os.environ.setdefault("TRITON_INTERPRET", os.environ["POOLFORMER_TRITON_INTERPRET"])

# Under pytest-xdist (`-n auto`, the documented test command) the workers share the cores: each gets its share of
# threads, and so do the processes its tests start, since OpenMP threads spinning on a busy core slow everyone.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    _threads = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ.setdefault("OMP_NUM_THREADS", str(_threads))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

import pytest  # noqa: E402

from poolformer import create_model  # noqa: E402
from poolformer.model import randomize_  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """Tests marked gpu need CUDA: without it they are skipped, not failed (the markers: pyproject.toml)."""
    if torch.cuda.is_available():
        return
    no_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(no_gpu)


def triton_kernel_device() -> torch.device | None:
    """Where this test process runs the Triton kernels: the CPU in Triton's interpreter, the CUDA GPU compiled,
    or None (no Triton, or neither mode possible here)."""
    from poolformer.fast.triton import availability

    try:
        interprets = availability.triton_interprets()
    except ImportError:
        return None
    if interprets:
        return torch.device("cpu") if availability.interpreter_enabled() else None
    return torch.device("cuda") if torch.cuda.is_available() else None


@pytest.fixture
def kernel_device() -> torch.device:
    """The device the Triton tests put their tensors on (see triton_kernel_device); skips where there is none."""
    device = triton_kernel_device()
    if device is None:
        pytest.skip("the Triton kernels cannot run in this process (no Triton, or neither a GPU nor the interpreter)")
    return device


@pytest.fixture(autouse=True)
def _own_tile_cache(tmp_path, monkeypatch):
    """Autotuned Triton tiles go to each test's own file, never the user's ~/.cache, and no test sees another's."""
    monkeypatch.setenv("POOLFORMER_TRITON_TILE_CACHE", str(tmp_path / "triton_tiles.json"))


@pytest.fixture
def one_thread():
    """One intra-op thread for the test, and the process's own count back after it: small inputs gain nothing
    from a second thread spinning on shared cores, and `--threads` changes a process-wide setting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def s12_random() -> torch.nn.Module:
    return randomize_(create_model("s12"))


@pytest.fixture
def s12_checkpoint(tmp_path, s12_random):
    """A poolformer_s12 checkpoint in the official sail-sg layout, written as a plain state_dict .pth.tar."""
    from poolformer.weights import export_state_dict

    path = tmp_path / "poolformer_s12.pth.tar"
    torch.save(export_state_dict(s12_random, "official"), path)
    return path


def marked_slow(values: list, *slow: object) -> list:
    """Cases for @pytest.mark.parametrize with the ones in `slow` marked slow, so that the quick loop
    (-m "not slow") still runs the check on the others."""
    return [pytest.param(value, marks=pytest.mark.slow) if value in slow else value for value in values]


def assert_one_line_error(result, message: str, exit_code: int = 2) -> None:
    """A CliRunner result that failed the way every bad input must: the exit code, one line naming the
    problem, no traceback."""
    assert result.exit_code == exit_code, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
