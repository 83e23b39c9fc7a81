"""The Triton kernels of the fast path (`poolformer.fast.triton`), compiled on a CUDA GPU or, where there is
none, run in Triton's interpreter on CPU tensors (conftest sets POOLFORMER_TRITON_INTERPRET=1 then, before
Triton is imported): checked against plain PyTorch operators at odd shapes, then whole models against the
reference. Also the CUDA graph cache (with a stand-in capture) and the roofline's byte count.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from poolformer import ConfigError, create_model, optimize
from poolformer.fast.cuda import CapturedGraph, GraphCache, graphs_enabled_by_env
from poolformer.fast.roofline import (
    achieved_tb_per_s, bytes_per_image, fast_traffic, kernel_table, time_kernels,
)
from poolformer.fast.triton import autotune, availability, forward, launches, tiles, weights
from poolformer.fast.triton.chooser import TileChooser
from poolformer.fast.triton.forward import TritonForward
from poolformer.fast.triton.instrument import Recorder
from poolformer.fast.triton.tiles import GemmMlp, MlpConfig, Partials, SplitMlp, Tile
from poolformer.fast.triton.weights import TritonBlock

from poolformer.model import randomize_

from .conftest import triton_kernel_device

pytestmark = [pytest.mark.interpreter,
              pytest.mark.skipif(triton_kernel_device() is None,
                                 reason="the Triton kernels cannot run in this process (see tests/conftest.py)")]

SHAPES = [(1, 7, 7, 64), (3, 13, 17, 64), (3, 7, 7, 320), (1, 13, 17, 320)]  # B, H, W, C


H200_SM_COUNT = 132  # the GPU of benchmarks/results/gpu/, whose measurements the design-time order follows


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)


@pytest.fixture
def run() -> TritonForward:
    """A forward on the kernels with its own tile chooser (this test's tile cache) and recorder."""
    return TritonForward(TileChooser.from_settings())


def _sample_moments(partials: Partials, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample (mean, variance) combined from a kernel's partials in float64, independently of the
    kernels' own combination: slot s holds rows [s * slot_rows, (s + 1) * slot_rows), its segment k the rows
    of sample s * slot_rows // hw + k."""
    buffer = partials.buffer.double().cpu().numpy()
    count, total, squares = np.zeros(batch), np.zeros(batch), np.zeros(batch)
    for slot in range(buffer.shape[0]):
        first = slot * partials.slot_rows // partials.hw
        for k in range(partials.segs):
            n, mean, m2 = buffer[slot, k]
            if n == 0:
                continue
            sample = first + k
            count[sample] += n
            total[sample] += n * mean
            squares[sample] += m2 + n * mean * mean  # sum of x^2 of the segment, in float64
    mean = total / count
    return mean, squares / count - mean * mean


def _reference_moments(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    flat = x.double().reshape(x.shape[0], -1)
    return flat.mean(1).cpu().numpy(), flat.var(1, unbiased=False).cpu().numpy()


def _block(channels: int, hidden: int, dtype=torch.float32, skip: bool = True, bias: bool = True,
           device: torch.device | str = "cpu") -> TritonBlock:
    def vec(n, around=0.0):
        return (torch.randn(n) * 0.3 + around).to(device).contiguous()

    fc1 = (torch.randn(channels, hidden) / math.sqrt(channels)).to(device, dtype).contiguous()
    fc1_bias = vec(hidden) if bias else None
    return TritonBlock(
        mix_scale=vec(channels, 1.0), skip_scale1=vec(channels, 1.0) if skip else None,
        fc1_weight=fc1, fc1_colsum=fc1.float().sum(0) if weights.norm_after_fc1(dtype, channels) else None,
        fc1_bias=fc1_bias, fc1_bias_compute=None if fc1_bias is None else fc1_bias.to(dtype),
        fc2_weight=(torch.randn(hidden, channels) / math.sqrt(hidden)).to(device, dtype).contiguous(),
        fc2_bias=vec(channels) if bias else None, skip_scale2=vec(channels, 1.0) if skip else None,
        norm1_eps=1e-5, norm2_eps=1e-6)


def _inv_sigma(x: torch.Tensor, eps: float) -> torch.Tensor:
    var = x.double().reshape(x.shape[0], -1).var(1, unbiased=False)
    return (1 / torch.sqrt(var + eps)).view(-1, 1, 1, 1)


def _reference_pool_mix(x: torch.Tensor, block: TritonBlock, pool: int) -> torch.Tensor:
    """skip * x + mix_scale / sigma * (avg_pool(x) - x), count_include_pad=False, in float64 (NHWC in/out)."""
    x64 = x.double()
    nchw = x64.permute(0, 3, 1, 2)
    pooled = F.avg_pool2d(nchw, pool, 1, pool // 2, count_include_pad=False).permute(0, 2, 3, 1)
    skip = x64 * block.skip_scale1.double() if block.skip_scale1 is not None else x64
    return skip + block.mix_scale.double() * _inv_sigma(x, block.norm1_eps) * (pooled - x64)


ACTIVATIONS = {"gelu": lambda h: F.gelu(h), "relu": F.relu, "silu": F.silu, "starrelu": lambda h: F.relu(h) ** 2}


def _reference_mlp(x: torch.Tensor, block: TritonBlock, activation: str) -> torch.Tensor:
    x64 = x.double()
    mean = x64.reshape(x.shape[0], -1).mean(1).view(-1, 1, 1, 1)
    normed = (x64 - mean) * _inv_sigma(x, block.norm2_eps)
    hidden = normed @ block.fc1_weight.double()
    if block.fc1_bias is not None:
        hidden = hidden + block.fc1_bias.double()
    out = ACTIVATIONS[activation](hidden) @ block.fc2_weight.double()
    if block.fc2_bias is not None:
        out = out + block.fc2_bias.double()
    skip = x64 * block.skip_scale2.double() if block.skip_scale2 is not None else x64
    return skip + out


def _predicted_traffic(fast, x: torch.Tensor, dtype: torch.dtype = torch.float32, tiles=None) -> list:
    """fast_traffic of fast's forward on x as this process runs it: the interpreter's tiles or those of x's GPU,
    and the MLP forms `tiles` (a TileChooser) ran, where given."""
    batch, _, height, width = x.shape
    return fast_traffic(fast.folded, fast.plan, batch, height, width, dtype, interpret=availability.triton_interprets(),
                        tiles=tiles, sm_count=availability.multiprocessor_count(x.device))


# ------------------------------------------------------------------------------ kernels, one by one


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_stats_kernel_gives_each_samples_mean_and_variance(run, kernel_device, shape):
    x = (torch.randn(shape) * torch.rand(shape[0], 1, 1, 1) * 3 + torch.randn(shape[0], 1, 1, 1)).to(kernel_device)
    mean, var = _sample_moments(run.stage_input_stats(x.contiguous()), shape[0])
    expected_mean, expected_var = _reference_moments(x)
    np.testing.assert_allclose(mean, expected_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(var, expected_var, rtol=1e-5)


def test_statistics_stay_exact_for_a_large_map_far_from_zero(run, kernel_device):
    """56x56x64 per sample (stage 1 at 224) around 1000 with unit spread: E[x^2] - E[x]^2 in float32 would be
    off by ~10% (1e6 * 2^-24 per term); centred partial moments are not."""
    x = (torch.randn(2, 56, 56, 64) + 1000.0).to(kernel_device).contiguous()
    _, var = _sample_moments(run.stage_input_stats(x), 2)
    np.testing.assert_allclose(var, _reference_moments(x)[1], rtol=1e-4)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("skip", [True, False], ids=["skip-scale", "plain-skip"])
def test_pool_mix_kernel_matches_pooling_and_groupnorm(run, kernel_device, shape, skip):
    x = (torch.randn(shape) * 2 + 0.5).to(kernel_device).contiguous()
    block = _block(shape[-1], 4 * shape[-1], skip=skip, device=kernel_device)
    y, partials = run.pool_mix(x, run.stage_input_stats(x), block, pool_size=3)
    expected = _reference_pool_mix(x, block, 3)
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)
    # the partials it writes are y's moments (what the MLP kernel normalises with)
    mean, var = _sample_moments(partials, shape[0])
    np.testing.assert_allclose(mean, _reference_moments(y)[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(var, _reference_moments(y)[1], rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("whole_slots", [False, True], ids=["per-tile", "whole-slots"])
@pytest.mark.parametrize("tile", [Tile(16, 64), Tile(16, 32)], ids=["one-chunk", "two-chunks"])
@pytest.mark.parametrize("height, width", [(31, 33), (32, 32)], ids=["slots-cross-samples", "slots-in-samples"])
def test_pool_mix_statistics_stay_exact_far_from_zero_over_many_tiles(run, kernel_device, tile, whole_slots, height,
                                                                      width):
    """The token mixer's output moments for a map around 1000 whose mean the skip scales move by tens of
    sigmas: centred tile by tile, or (WHOLE_SLOTS, slots inside one sample) summed about the slot's first tile's
    mean, so nothing cancels; two 16-row tiles per 32-row slot, the channels in one or two chunks per tile, and
    slots that cross samples (31x33: the per-tile way either way) or never do (32x32)."""
    x = (torch.randn(2, height, width, 64) + 1000.0).to(kernel_device).contiguous()
    block = _block(64, 256, skip=True, device=kernel_device)
    tile = Tile(tile.block_rows, tile.block_channels, whole_slots=whole_slots)
    y, partials = run.pool_mix(x, run.stage_input_stats(x), block, pool_size=3, tile=tile)
    assert partials.slot_rows > tile.block_rows
    assert (height * width % partials.slot_rows != 0) == (height == 31)
    mean, var = _sample_moments(partials, 2)
    expected_mean, expected_var = _reference_moments(y)
    np.testing.assert_allclose(mean, expected_mean, rtol=1e-6)
    np.testing.assert_allclose(var, expected_var, rtol=1e-4)


@pytest.mark.parametrize("shape", [SHAPES[0], *(pytest.param(s, marks=pytest.mark.slow) for s in SHAPES[1:]),
                                   (2, 8, 8, 64), pytest.param((3, 8, 8, 96), marks=pytest.mark.slow)],
                         ids=lambda s: "x".join(map(str, s)))
def test_pool_mix_whole_slots_give_the_same_output_and_moments(run, kernel_device, shape):
    """WHOLE_SLOTS (an autotuning candidate) changes only how the output's moments are summed: the same y,
    bitwise, and the same moments to float32 rounding; at odd shapes (slots crossing samples, masked channel
    chunks: the per-tile way) and with every slot inside one sample (8x8 maps, 16-row slots), C = 96 in three
    32-channel chunks."""
    x = (torch.randn(shape) * 2 + 0.5).to(kernel_device).contiguous()
    block = _block(shape[-1], 4 * shape[-1], device=kernel_device)
    stats = run.stage_input_stats(x)
    y, partials = run.pool_mix(x, stats, block, 3, tile=Tile(16, 32))
    y_whole, partials_whole = run.pool_mix(x, stats, block, 3, tile=Tile(16, 32, whole_slots=True))
    assert torch.equal(y, y_whole)
    for got, expected in zip(_sample_moments(partials_whole, shape[0]), _reference_moments(y)):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pool", [1, 5, 7])
def test_pool_mix_kernel_other_pool_sizes_at_the_borders(run, kernel_device, pool):
    x = torch.randn(3, 7, 9, 64).to(kernel_device).contiguous()
    block = _block(64, 256, device=kernel_device)
    y, _ = run.pool_mix(x, run.stage_input_stats(x), block, pool_size=pool)
    torch.testing.assert_close(y.double(), _reference_pool_mix(x, block, pool), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("activation", ["gelu", "starrelu"])
def test_mlp_kernel_matches_norm_fc1_activation_fc2_residual(run, kernel_device, shape, activation):
    x = (torch.randn(shape) * 1.5 - 0.3).to(kernel_device).contiguous()
    block = _block(shape[-1], 4 * shape[-1], bias=activation == "gelu", skip=activation == "gelu",
                   device=kernel_device)
    y, partials = run.mlp(x, run.stage_input_stats(x), block, activation, emit_stats=True)
    expected = _reference_mlp(x, block, activation)
    torch.testing.assert_close(y.double(), expected, rtol=1e-4, atol=1e-4)
    mean, var = _sample_moments(partials, shape[0])
    np.testing.assert_allclose(var, _reference_moments(y)[1], rtol=1e-5)
    np.testing.assert_allclose(mean, _reference_moments(y)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_polynomial_gelu_switch_stays_within_the_float32_target(run, kernel_device, monkeypatch):
    """POOLFORMER_TRITON_GELU=poly (for an A/B timing): the fused kernel's GELU from Abramowitz & Stegun's erf,
    within 1e-4 of the float64 reference like the default, and not the same code path (ACT 4)."""
    x = (torch.randn(3, 13, 17, 64) * 2).to(kernel_device).contiguous()
    block = _block(64, 256, device=kernel_device)
    y_erf, _ = run.mlp(x, run.stage_input_stats(x), block, "gelu", emit_stats=False, form=MlpConfig(16, 256, 4, 1))
    monkeypatch.setenv(launches.GELU_ENV, "poly")
    assert launches.fused_activation_code("gelu") == 4 and launches.fused_activation_code("starrelu") == 3
    y_poly, _ = run.mlp(x, run.stage_input_stats(x), block, "gelu", emit_stats=False, form=MlpConfig(16, 256, 4, 1))
    expected = _reference_mlp(x, block, "gelu")
    torch.testing.assert_close(y_poly.double(), expected, rtol=1e-4, atol=1e-4)
    assert not torch.equal(y_poly, y_erf) and (y_poly - y_erf).abs().max() < 1e-4
    monkeypatch.delenv(launches.GELU_ENV)
    assert launches.fused_activation_code("gelu") == 0


@pytest.mark.parametrize("activation", ["relu", "silu"])
def test_mlp_kernel_other_activations(run, kernel_device, activation):
    x = torch.randn(3, 7, 7, 64).to(kernel_device).contiguous()
    block = _block(64, 256, device=kernel_device)
    y, partials = run.mlp(x, run.stage_input_stats(x), block, activation, emit_stats=False)
    assert partials is None
    torch.testing.assert_close(y.double(), _reference_mlp(x, block, activation), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_kernels_keep_float32_statistics(run, kernel_device, dtype):
    """Activations stored in bf16/fp16, statistics and sums in float32: within the storage format's rounding of
    the float64 result."""
    x = torch.randn(3, 13, 17, 64).to(kernel_device, dtype).contiguous()
    block = _block(64, 256, dtype=dtype, device=kernel_device)
    stats = run.stage_input_stats(x)
    _, var = _sample_moments(stats, 3)
    np.testing.assert_allclose(var, _reference_moments(x)[1], rtol=1e-5)  # exact moments of the stored values
    x1, mixed = run.pool_mix(x, stats, block, 3)
    y, _ = run.mlp(x1, mixed, block, "gelu", emit_stats=True)
    assert x1.dtype == y.dtype == dtype
    resolution = 2 ** -8 if dtype == torch.bfloat16 else 2 ** -11
    expected_x1 = _reference_pool_mix(x, block, 3)
    assert ((x1.double() - expected_x1).abs() / (expected_x1.abs() + 1)).max() < 2 * resolution
    expected_y = _reference_mlp(x1, block, "gelu")  # from the kernel's own x1: isolates the MLP's error
    assert ((y.double() - expected_y).abs() / (expected_y.abs() + 1)).max() < 8 * resolution


@pytest.mark.parametrize("offset", [0.0, 30.0])
def test_bf16_mlp_applies_the_statistics_after_fc1(run, kernel_device, monkeypatch, offset):
    """POOLFORMER_TRITON_NORM_AFTER_FC1=1, bf16/fp16: fc1 multiplies x as stored and the kernel subtracts
    mu * colsum(w1) from its float32 sums. Far from zero (mean 30, unit spread) the subtraction must not cost more
    than the storage format's rounding; C = 96 runs the masked second channel group (64 + 32)."""
    monkeypatch.setenv(weights.NORM_AFTER_FC1_ENV, "1")
    assert weights.norm_after_fc1(torch.bfloat16, 96) and weights.norm_after_fc1(torch.float16, 384)
    assert not weights.norm_after_fc1(torch.float32, 64)  # fp32 normalises first: the 1e-4 target has no room for it
    assert not weights.norm_after_fc1(torch.bfloat16, 512)  # wide stages spill more with it (ptxas, sm_90a)
    x = (torch.randn(2, 9, 11, 96) + offset).to(kernel_device, torch.bfloat16).contiguous()
    block = _block(96, 384, dtype=torch.bfloat16, device=kernel_device)
    y, _ = run.mlp(x, run.stage_input_stats(x), block, "gelu", emit_stats=False)
    expected = _reference_mlp(x, block, "gelu")
    assert ((y.double() - expected).abs() / (expected.abs() + 1)).max() < 8 * 2 ** -8
    missing = TritonBlock(**{**block.__dict__, "fc1_colsum": None})
    with pytest.raises(ValueError, match="column sums"):
        run.mlp(x, run.stage_input_stats(x), missing, "gelu", emit_stats=False)


@pytest.mark.parametrize("layout", ["nchw", "channels-last", "strided", "bf16-input"])
@pytest.mark.parametrize("size, out_channels", [((31, 45), 64), ((64, 64), 96)])
def test_stem_kernel_is_the_7x7_stride_4_convolution_read_straight_from_the_images(kernel_device, layout, size,
                                                                                    out_channels):
    """The stem as an implicit GEMM over the caller's tensor as it is (any strides, float32 or bf16), padded
    borders and odd sizes included, against F.conv2d in float64."""
    weight = (torch.randn(out_channels, 3, 7, 7) * 0.1).to(kernel_device)
    bias = torch.randn(out_channels).to(kernel_device)
    images = torch.randn(2, 3, size[0] + 5, size[1] + 3).to(kernel_device)
    x = images[:, :, 2:2 + size[0], 1:1 + size[1]]  # a view with the parent's strides
    if layout == "nchw":
        x = x.contiguous()
    elif layout == "channels-last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "bf16-input":
        x = x.to(torch.bfloat16)
    got = launches.stem(Recorder(), x, weights.stem_matrix(weight, torch.float32), bias, 7)
    expected = F.conv2d(x.double(), weight.double(), bias.double(), stride=4, padding=2).permute(0, 2, 3, 1)
    assert got.shape == expected.shape and got.is_contiguous()
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype, tf32", [(torch.float32, False), (torch.bfloat16, True)])
def test_float32_downsampling_never_runs_on_tf32(monkeypatch, kernel_device, dtype, tf32):
    """cuDNN allows TF32 for convolutions by default; the float32 path turns it off around its convolutions
    (and restores the setting), lower precisions leave it as it is."""
    seen = []
    real = launches.cpu.conv_channels_last
    monkeypatch.setattr(launches.cpu, "conv_channels_last",
                        lambda *args: seen.append(torch.backends.cudnn.allow_tf32) or real(*args))
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    x = torch.randn(1, 8, 8, 16).to(kernel_device, dtype)
    launches.conv(Recorder(), "down", x, torch.randn(32, 16, 3, 3).to(kernel_device, dtype), None, stride=2,
                  padding=1)
    assert seen == [tf32] and torch.backends.cudnn.allow_tf32


def test_stem_matrix_orders_the_weights_as_the_kernel_reads_them():
    weight = torch.randn(8, 3, 7, 7)
    matrix = weights.stem_matrix(weight, torch.float32)
    assert matrix.shape == (160, 8) and matrix[147:].abs().sum() == 0
    assert torch.equal(matrix[(2 * 7 + 5) * 3 + 1], weight[:, 1, 2, 5])


@pytest.mark.parametrize("shape", [(1, 7, 7, 64), (3, 13, 17, 96), (2, 5, 3, 320)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("weighted", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_norm_kernel_matches_pytorch(kernel_device, shape, weighted, dtype):
    x = (torch.randn(shape) * 2 + 5).to(kernel_device, dtype)
    weight = (torch.randn(shape[-1]) * 0.3 + 1).to(kernel_device, dtype) if weighted else None
    got = launches.layer_norm(Recorder(), "norm", x, weight, 1e-6)
    expected = F.layer_norm(x.double(), shape[-1:], None if weight is None else weight.double(), None, 1e-6)
    assert got.dtype == dtype and got.shape == x.shape
    torch.testing.assert_close(got.double(), expected, rtol=1e-5 if dtype == torch.float32 else 2 ** -7,
                               atol=1e-5 if dtype == torch.float32 else 2 ** -7)


def _split(x: torch.Tensor) -> SplitMlp:
    """The split form's design-time tile for x (the interpreter's or the GPU's)."""
    tile = tiles.elementwise_tile(x.numel() // x.shape[-1], x.shape[-1], availability.triton_interprets())
    return SplitMlp(tile.block_rows, tile.block_channels, tile.num_warps)


def _bf16_mlp_within_storage_rounding(run, device, form, offset: float):
    """An s12 stage-3 MLP in bf16 on `form`'s config, its input `offset` from zero: the output is within bf16's
    storage rounding of the float64 reference. Returns the input, block, output and reference."""
    x = (torch.randn(2, 9, 11, 320) + offset).to(device, torch.bfloat16).contiguous()
    block = _block(320, 1280, dtype=torch.bfloat16, device=device)
    y, _ = run.mlp(x, run.stage_input_stats(x), block, "gelu", emit_stats=False, form=form(x))
    assert y.dtype == torch.bfloat16
    expected = _reference_mlp(x, block, "gelu")
    assert ((y.double() - expected).abs() / (expected.abs() + 1)).max() < 8 * 2 ** -8
    return x, block, y, expected


@pytest.mark.parametrize("offset", [0.0, 30.0])
def test_bf16_split_mlp_is_within_the_storage_rounding(run, kernel_device, offset):
    _bf16_mlp_within_storage_rounding(run, kernel_device, _split, offset)


def _gemm(x: torch.Tensor) -> GemmMlp:
    """The GEMM form's first candidate tile for x (the interpreter's or the GPU's)."""
    rows, channels = x.numel() // x.shape[-1], x.shape[-1]
    return tiles.gemm_configs(rows, channels, 4 * channels, x.dtype, availability.multiprocessor_count(x.device),
                              availability.triton_interprets())[0]


@pytest.mark.parametrize("form", [_split, _gemm], ids=["split", "gemm"])
@pytest.mark.parametrize("shape", [*SHAPES[:2], *(pytest.param(s, marks=pytest.mark.slow) for s in SHAPES[2:])],
                         ids=lambda s: "x".join(map(str, s)))  # C = 320 is slow
@pytest.mark.parametrize("activation", ["gelu", "starrelu", "relu", "silu"])
def test_other_mlp_forms_match_norm_fc1_activation_fc2_residual(run, kernel_device, shape, activation, form):
    """The split form (normalising kernel, GEMMs, activation, GEMM adding the residual base, statistics kernel)
    and the GEMM form (fc1 normalising its A tiles and applying the activation, fc2 adding the residual, then the
    statistics) give the block's MLP in float32 and its output's moments; with and without scale and biases."""
    x = (torch.randn(shape) * 1.5 - 0.3).to(kernel_device).contiguous()
    full = activation in ("gelu", "silu")
    block = _block(shape[-1], 4 * shape[-1], bias=full, skip=full, device=kernel_device)
    y, partials = run.mlp(x, run.stage_input_stats(x), block, activation, emit_stats=True, form=form(x))
    torch.testing.assert_close(y.double(), _reference_mlp(x, block, activation), rtol=1e-4, atol=1e-4)
    mean, var = _sample_moments(partials, shape[0])
    np.testing.assert_allclose(var, _reference_moments(y)[1], rtol=1e-5)
    np.testing.assert_allclose(mean, _reference_moments(y)[0], rtol=1e-5, atol=1e-5)
    y2, none = run.mlp(x, run.stage_input_stats(x), block, activation, emit_stats=False, form=form(x))
    assert none is None and torch.equal(y, y2)


@pytest.mark.parametrize("shape, tile, in_epilogue", [
    # 10 row tiles (the last masked), 20 + 5 column tiles
    pytest.param((3, 7, 7, 320), GemmMlp(16, 64, 32, 4, 1), False, marks=pytest.mark.slow),
    ((2, 5, 3, 96), GemmMlp(16, 128, 64, 4, 1), False),  # C = 96: 32-column fc2 tiles, a masked K step in fc1
    ((3, 7, 7, 64), GemmMlp(16, 64, 32, 4, 1), True),  # one column tile: fc2's epilogue writes the partials
    ((1, 13, 17, 72), GemmMlp(32, 128, 32, 4, 1), True),  # C = 72 in one masked 128-column tile
], ids=["320-small-tiles", "96-masked", "64-stats-in-epilogue", "72-masked-stats-in-epilogue"])
def test_gemm_mlp_small_tiles_walk_every_row_column_and_k_step(run, kernel_device, shape, tile, in_epilogue):
    """GPU-sized tiles smaller than the matrices: every (row tile, column tile) program and every K step of both
    GEMMs, with masked edges, rows whose tile spans several samples (7x7 maps, 16-row tiles), and float32 sums;
    the output's moments from fc2's epilogue where one column tile covers C, else from the statistics kernel."""
    x = (torch.randn(shape) * 1.5 + 0.7).to(kernel_device).contiguous()
    block = _block(shape[-1], 4 * shape[-1], device=kernel_device)
    with run.recorder.record_traffic() as recorded:
        y, partials = run.mlp(x, run.stage_input_stats(x), block, "gelu", emit_stats=True, form=tile)
    torch.testing.assert_close(y.double(), _reference_mlp(x, block, "gelu"), rtol=1e-4, atol=1e-4)
    mean, var = _sample_moments(partials, shape[0])
    np.testing.assert_allclose(var, _reference_moments(y)[1], rtol=1e-5)
    np.testing.assert_allclose(mean, _reference_moments(y)[0], rtol=1e-5, atol=1e-5)
    names = [k.name for k in recorded]
    assert names[-2:] == (["fc1 norm act", "fc2 residual"] if in_epilogue else ["fc2 residual", "mlp stats"])
    assert (partials.slot_rows == tile.block_m) == in_epilogue
    assert tiles.gemm_stats_in_epilogue(tile, shape[1] * shape[2], shape[-1], 4 * shape[-1]) == in_epilogue


def test_gemm_stats_leave_the_epilogue_when_a_sample_spans_too_many_row_tiles():
    """fc2's epilogue writes a slot per row tile; a map with more row tiles per sample than the consumer
    gathers (MAX_SLOTS_PER_SAMPLE) leaves the statistics to stats_kernel, whose slots are longer."""
    tile = GemmMlp(64, 64, 64, 4, 4)
    assert tiles.gemm_stats_in_epilogue(tile, 56 * 56, 64, 256)
    assert not tiles.gemm_stats_in_epilogue(tile, 96 * 96, 64, 256)  # 144 row tiles per sample
    assert not tiles.gemm_stats_in_epilogue(tile, 56 * 56, 320, 1280)  # 5 column tiles
    assert tiles.gemm_partials_rows(tile, 96 * 96, 64, 256) == tiles.GEMM_STATS_BLOCK_ROWS


@pytest.mark.parametrize("offset", [0.0, pytest.param(30.0, marks=pytest.mark.slow)])
def test_bf16_gemm_mlp_is_within_the_storage_rounding(run, kernel_device, offset):
    """bf16, far from zero too: within the storage rounding of float64, and rounding where the fused kernel rounds
    (the normalised input, the activated hidden tile, the output once), so within an ulp or so of it."""
    x, block, y, expected = _bf16_mlp_within_storage_rounding(run, kernel_device, _gemm, offset)
    fused_tile = tiles.mlp_configs(x.numel() // 320, 320, 1280, torch.bfloat16,
                                   availability.multiprocessor_count(x.device), availability.triton_interprets())[0]
    fused, _ = run.mlp(x, run.stage_input_stats(x), block, "gelu", emit_stats=False, form=fused_tile)
    assert ((y.double() - fused.double()).abs() / (expected.abs() + 1)).max() < 2 ** -8


@pytest.mark.parametrize("columns, depth, tile, expected", [
    (1280, 320, GemmMlp(128, 128, 64, 8, 3), (128, 64)),
    (320, 1280, GemmMlp(128, 128, 64, 8, 3), (64, 64)),  # 320 = 5 x 64: no masked columns
    (320, 1280, GemmMlp(128, 256, 64, 8, 3), (64, 64)),
    (64, 256, GemmMlp(128, 256, 64, 8, 3), (64, 64)),
    (96, 384, GemmMlp(128, 128, 64, 8, 3), (32, 64)),
    (72, 8, GemmMlp(64, 128, 64, 4, 4), (128, 16)),  # nothing divides 72: one masked 128-column tile
])
def test_gemm_tiles_clip_to_each_matmul(columns, depth, tile, expected):
    assert tiles.gemm_tile_for(tile, columns, depth) == expected


def test_design_time_order_starts_from_what_the_h200_measured(monkeypatch):
    """Without autotuning the first candidate runs: for every bf16 MLP shape the H200 timed (run 4's committed
    autotune timings), it is the split form exactly where that won, and otherwise a fused tile within 5% of the
    fastest fused one."""
    monkeypatch.delenv(tiles.MLP_ENV, raising=False)
    results = Path(__file__).resolve().parents[1] / "benchmarks/results/gpu/h200_run4_fast_gpu.json"
    timings = json.loads(results.read_text())["autotune_timings"]
    checked = 0
    for key, times in timings.items():
        if not key.startswith("mlp |"):
            continue
        rows, channels, hidden = (int(v) for v in key.split("rows ")[1].replace("C ", "").replace("D ", "").split())
        first = tiles.mlp_candidates(rows, channels, hidden, torch.bfloat16, H200_SM_COUNT)[0]
        measured = {name: ms for name, ms in times.items() if ms is not None}
        split_won = min(measured, key=measured.get).startswith("split")
        assert isinstance(first, SplitMlp) == split_won, key
        if not split_won:
            fused = {name: ms for name, ms in measured.items() if not name.startswith("split")}
            assert measured[tiles.tile_name(first)] <= 1.05 * min(fused.values()), (key, first)
        checked += 1
    assert checked == 8  # s12's four stages at batch 256 and at batch 1


def test_mlp_candidates_order_the_forms(monkeypatch):
    """On a GPU in bf16/fp16 the split form goes first from 256 channels (the H200's measurements), after the
    fused tiles below, and the GEMM form (autotuning decides where it wins) comes last; float32 offers the split
    form only without TF32; the interpreter and POOLFORMER_TRITON_MLP=fused keep the fused form only, =split and
    =gemm theirs."""
    monkeypatch.delenv(tiles.MLP_ENV, raising=False)
    rows = 256 * 14 * 14

    def kinds(channels, dtype, interpret=False):
        return [type(c).__name__ for c in tiles.mlp_candidates(rows, channels, 4 * channels, dtype, H200_SM_COUNT,
                                                                interpret)]

    def forms(channels, dtype, rows_=rows):  # each form once, in the order of its first candidate
        candidates = tiles.mlp_candidates(rows_, channels, 4 * channels, dtype, H200_SM_COUNT)
        return list(dict.fromkeys(type(c).__name__ for c in candidates))

    assert forms(320, torch.bfloat16) == ["SplitMlp", "MlpConfig", "GemmMlp"]
    assert forms(320, torch.bfloat16, rows_=196) == ["MlpConfig", "SplitMlp", "GemmMlp"]  # batch 1: fused first
    assert forms(128, torch.float16) == ["MlpConfig", "SplitMlp", "GemmMlp"]
    assert forms(512, torch.float32) == ["MlpConfig", "SplitMlp", "GemmMlp"]
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "high")  # TF32 allowed: not exact
    assert forms(512, torch.float32) == ["MlpConfig", "GemmMlp"] and "SplitMlp" in forms(512, torch.bfloat16)
    assert set(kinds(512, torch.bfloat16, interpret=True)) == {"MlpConfig"}
    monkeypatch.setenv(tiles.MLP_ENV, "fused")
    assert set(kinds(512, torch.bfloat16)) == {"MlpConfig"}
    monkeypatch.setenv(tiles.MLP_ENV, "split")
    assert kinds(64, torch.float32, interpret=True) == ["SplitMlp"]
    monkeypatch.setenv(tiles.MLP_ENV, "gemm")
    assert set(kinds(64, torch.bfloat16)) == {"GemmMlp"} and kinds(64, torch.float32, interpret=True) == ["GemmMlp"]


@pytest.mark.parametrize("form, kind, launch", [
    ("split", "SplitMlp", "fc2"), pytest.param("gemm", "GemmMlp", "fc2 residual", marks=pytest.mark.slow)])
@pytest.mark.parametrize("name", ["s12", "v2_s12"])
def test_whole_model_on_the_other_mlp_forms_is_exact_and_its_traffic_is_counted(monkeypatch, kernel_device, name,
                                                                                 form, kind, launch):
    """POOLFORMER_TRITON_MLP=split (or =gemm) runs every block's MLP in that form: fp32 logits within 1e-4 of the
    reference, and the roofline's byte count follows the form in use, launch by launch."""
    monkeypatch.setenv(tiles.MLP_ENV, form)
    model = randomize_(create_model(name), seed=4).eval()
    fast = optimize(model, backend="triton")
    x = torch.randn(2, 3, 64, 64)
    with fast.recorder.record_traffic() as recorded, torch.no_grad():
        got = fast(x.to(kernel_device)).cpu()
        expected = model(x)  # on the CPU: exact float32 (cuDNN's convolutions may take TF32 on a GPU)
    assert (got - expected).abs().max().item() <= 1e-4 * max(1.0, expected.abs().max().item())
    assert {t["kind"] for t in fast.tiles.mlp_tiles_in_use()} == {kind}
    predicted = _predicted_traffic(fast, x.to(kernel_device), tiles=fast.tiles)
    assert [k.name for k in recorded] == [k.name for k in predicted] and launch in {k.name for k in recorded}
    assert recorded == predicted


def test_the_tile_cache_keeps_the_form_of_the_mlp(tmp_path):
    """An autotuned split form comes back from the cache as a split form; an older entry without a kind reads as
    the first kind asked for."""
    cache = tmp_path / "tiles.json"
    autotune.remember_tile(cache, "a", SplitMlp(32, 64, 4))
    autotune.remember_tile(cache, "b", MlpConfig(64, 32, 4, 3))
    autotune.remember_tile(cache, "c", GemmMlp(128, 128, 64, 8, 3))
    assert autotune.cached_tile(cache, "c", (MlpConfig, SplitMlp, GemmMlp)) == GemmMlp(128, 128, 64, 8, 3)
    assert tiles.tile_name(GemmMlp(128, 128, 64, 8, 3)).startswith("gemm block_m=128 ")
    assert autotune.cached_tile(cache, "a", (MlpConfig, SplitMlp)) == SplitMlp(32, 64, 4)
    assert autotune.cached_tile(cache, "b", (MlpConfig, SplitMlp)) == MlpConfig(64, 32, 4, 3)
    assert autotune.cached_tile(cache, "a", (MlpConfig,)) is None  # a form this shape does not offer
    cache.write_text(json.dumps({"old": {"block_rows": 16, "block_hidden": 16, "num_warps": 4, "num_stages": 1}}))
    assert autotune.cached_tile(cache, "old", (MlpConfig, SplitMlp)) == MlpConfig(16, 16, 4, 1)


@pytest.mark.slow
@pytest.mark.parametrize("setting", [None, "0", "1"])
def test_statistics_after_fc1_only_when_switched_on(monkeypatch, kernel_device, setting):
    """Normalising first is the default (it timed faster on an H200); POOLFORMER_TRITON_NORM_AFTER_FC1=1 turns the
    other form on (column sums prepared up to 384 channels). Either way the whole bf16 model stays as close to
    fp32 as the portable path."""
    if setting is None:
        monkeypatch.delenv(weights.NORM_AFTER_FC1_ENV, raising=False)
    else:
        monkeypatch.setenv(weights.NORM_AFTER_FC1_ENV, setting)
    on = setting == "1"
    assert weights.norm_after_fc1(torch.bfloat16, 64) == on and not weights.norm_after_fc1(torch.float32, 64)
    model = randomize_(create_model("s12"), seed=3).eval()
    fast = optimize(model, dtype=torch.bfloat16, backend="triton")
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        error = (fast(x.to(kernel_device)).cpu() - model(x)).abs().max().item()
        portable = (optimize(model, dtype=torch.bfloat16, backend="portable")(x) - model(x)).abs().max().item()
    assert error <= 2 * portable + 1e-3
    blocks = [b for stage in weights.prepare(fast.folded, torch.bfloat16, torch.device("cpu")).blocks for b in stage]
    assert [b.fc1_colsum is not None for b in blocks] == [on and b.fc1_weight.shape[0] <= 384 for b in blocks]


# ------------------------------------------------------------------------------ whole models


@pytest.mark.slow
@pytest.mark.parametrize("name, seed", [("s12", 1), ("v2_s12", 2)])
@pytest.mark.parametrize("batch, height, width", [(1, 64, 64), (3, 71, 97)])
def test_triton_backend_is_exact_in_fp32(kernel_device, name, seed, batch, height, width):
    model = randomize_(create_model(name), seed=seed).eval()
    fast = optimize(model, backend="triton")
    assert fast.backend_for(device=kernel_device) == "triton"
    x = torch.randn(batch, 3, height, width)  # the references on the CPU: exact float32
    with torch.no_grad():
        got, expected = fast(x.to(kernel_device)).cpu(), model(x)
        features, expected_features = fast.forward_features(x.to(kernel_device)).cpu(), model.forward_features(x)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    scale = expected.abs().max().item()
    assert (got - expected).abs().max().item() <= 1e-4 * max(1.0, scale)  # the 1e-4 relative
    torch.testing.assert_close(features, expected_features, rtol=1e-4, atol=1e-4 * expected_features.abs().max().item())


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_backend_low_precision_is_as_close_as_the_portable_path(kernel_device, dtype):
    """bf16/fp16 logits are as far from fp32 as the portable path's in the same dtype (same rounding points)."""
    model = randomize_(create_model("s12"), seed=3).eval()
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))  # bf16: 1.6-1.8x over 5 inputs
    with torch.no_grad():
        reference = model(x)
        fast = optimize(model, dtype=dtype, backend="triton")
        triton_error = (fast(x.to(kernel_device)).cpu() - reference).abs().max().item()
        portable_error = (optimize(model, dtype=dtype, backend="portable")(x) - reference).abs().max().item()
    assert triton_error <= 2 * portable_error + 1e-3, (triton_error, portable_error)


@pytest.mark.slow
def test_triton_backend_under_autocast_runs_the_autocast_dtype(kernel_device):
    model = randomize_(create_model("s12"), seed=4).eval()
    fast = optimize(model, backend="triton")
    x = torch.randn(1, 3, 64, 64)
    on_device = x.to(kernel_device)
    with torch.no_grad(), torch.autocast(kernel_device.type, dtype=torch.bfloat16):
        got = fast(on_device)
    assert got.dtype == torch.float32
    assert (torch.bfloat16, on_device.device) in fast._cache
    with torch.no_grad():
        reference = model(x)
    assert (got.cpu() - reference).abs().max().item() < 0.1 * reference.abs().max().item()


# ------------------------------------------------------------------------------ backend choice


@pytest.mark.slow
def test_auto_never_picks_the_interpreter_on_the_cpu(v1_random):
    assert optimize(v1_random).backend_for(torch.float32, "cpu") != "triton"
    assert optimize(v1_random).backend_note(torch.float32, "cpu") is None


def test_triton_on_the_cpu_without_the_switch_is_a_clear_error(monkeypatch, v1_random):
    monkeypatch.delenv(availability.INTERPRET_ENV, raising=False)
    reason = availability.unavailable_reason(torch.float32, torch.device("cpu"))
    assert reason is not None and availability.INTERPRET_ENV in reason
    with pytest.raises(ConfigError, match="Triton backend cannot run here"):
        optimize(v1_random, backend="triton")(torch.randn(1, 3, 32, 32))


def test_models_the_kernels_do_not_cover_fall_back_with_a_note(monkeypatch, v1_random):
    fast = optimize(v1_random)
    monkeypatch.setattr(availability, "unavailable_reason", lambda dtype, device: None)  # as on a GPU
    monkeypatch.setattr(availability, "unsupported_model_reason", lambda folded, plan: "the Triton token mixer needs X")
    assert fast.backend_for(torch.float32, "cuda") == "portable"
    assert "needs X" in fast.backend_note(torch.float32, "cuda")
    with pytest.raises(ConfigError, match="cannot run this model"):
        optimize(v1_random, backend="triton").backend_for(torch.float32, "cuda")


def test_auto_on_a_gpu_without_triton_says_why(monkeypatch, v1_random):
    monkeypatch.setattr(availability, "unavailable_reason", lambda dtype, device: "Triton is not importable (test)")
    fast = optimize(v1_random)
    assert fast.backend_for(torch.float32, "cuda") == "portable"
    assert "Triton is not importable" in fast.backend_note(torch.float32, "cuda")


def test_unsupported_model_reason_covers_even_pool_sizes_and_narrow_channels():
    folded, plan = optimize(create_model("s12")).folded, optimize(create_model("s12")).plan
    assert availability.unsupported_model_reason(folded, plan) is None
    even_pool = type(plan)(**{**plan.__dict__, "pool_size": 4})
    assert "odd pool size" in availability.unsupported_model_reason(folded, even_pool)


@pytest.fixture(scope="module")
def v1_random():
    return randomize_(create_model("s12"), seed=5).eval()


# ------------------------------------------------------------------------------ launch geometry


@pytest.mark.parametrize("hw", [1, 7 * 7, 13 * 17, 56 * 56, 128 * 128])
@pytest.mark.parametrize("block_rows", [16, 32, 128])
def test_partials_geometry_bounds_the_consumers_gather(hw, block_rows):
    slot_rows = tiles.slot_rows_for(hw, block_rows)
    assert slot_rows % block_rows == 0
    # every slot of `slot_rows` rows touches at most `segs` samples, wherever it starts
    segs = tiles.segments_for(slot_rows, hw)
    assert max(((start + slot_rows - 1) // hw) - (start // hw) + 1 for start in range(0, 3 * hw, slot_rows)) <= segs
    # one sample's rows touch at most max_slots slots, wherever the sample starts
    partials = Partials(torch.empty(0), slot_rows, segs, hw)
    touched = max(((b + 1) * hw - 1) // slot_rows - (b * hw) // slot_rows + 1 for b in range(0, 64))
    assert touched <= partials.max_slots <= 2 * tiles.MAX_SLOTS_PER_SAMPLE


@pytest.mark.parametrize("channels, split", [(64, (64, 0)), (320, (256, 64)), (96, (64, 32)), (72, (64, 16))])
def test_channel_split_covers_every_channel(channels, split):
    assert tiles.channel_split(channels) == split
    assert sum(split) >= channels


def test_mlp_tiles_fit_the_shared_memory_budget():
    for channels in (64, 128, 320, 512, 768):
        for dtype in (torch.float32, torch.bfloat16):
            configs = tiles.mlp_configs(256 * 56 * 56, channels, 4 * channels, dtype, H200_SM_COUNT)
            assert configs
            size = torch.tensor([], dtype=dtype).element_size()
            width = sum(tiles.channel_split(channels))
            for c in configs[:-1] if configs[-1] == MlpConfig(16, 16, 4, 1) else configs:
                staged = c.num_stages * 2 * width * c.block_hidden * size
                assert staged + c.block_rows * (width + c.block_hidden) * size <= tiles.SHARED_MEMORY_BUDGET_BYTES
            gemms = tiles.gemm_configs(256 * 56 * 56, channels, 4 * channels, dtype, H200_SM_COUNT)
            assert gemms and all(g.num_stages * (g.block_m * g.block_k + g.block_k * g.block_n) * size
                                 <= tiles.SHARED_MEMORY_BUDGET_BYTES for g in gemms)


# ------------------------------------------------------------------------------ roofline


@pytest.mark.slow
@pytest.mark.parametrize("name", ["s12", "v2_s12"])
def test_roofline_count_equals_the_traffic_the_kernels_record(kernel_device, name):
    """The analytic byte count (what bench reports on a GPU) equals what the launches themselves record."""
    model = randomize_(create_model(name), seed=6).eval()
    fast = optimize(model, backend="triton")
    x = torch.randn(2, 3, 64, 64).to(kernel_device)
    with fast.recorder.record_traffic() as recorded, torch.no_grad():
        fast(x)
    predicted = _predicted_traffic(fast, x)
    assert [k.name for k in recorded] == [k.name for k in predicted]
    assert recorded == predicted


@pytest.mark.slow
@pytest.mark.parametrize("name", ["s12", "v2_s12"])
def test_time_kernels_lists_every_launch_with_its_stage_bytes_and_flops(kernel_device, name):
    """Kernel-by-kernel times: one entry per launch in forward order, the bytes the roofline counts, the
    stages in order, the MLP's and convolutions' FLOPs from their shapes, and a table whose shares add up."""
    model = randomize_(create_model(name), seed=6).eval()
    fast = optimize(model, backend="triton")
    x = torch.randn(2, 3, 64, 64).to(kernel_device)
    times = time_kernels(fast, x, repeats=2)
    predicted = _predicted_traffic(fast, x)
    assert [(k.name, k.read_bytes, k.write_bytes) for k in times.launches] == [
        (k.name, k.read_bytes, k.write_bytes) for k in predicted]
    assert all(k.ms >= 0 for k in times.launches) and times.repeats == 2 and fast.cuda_graphs
    stages = [k.stage for k in times.launches]
    assert stages[-1] is None and stages[:-1] == sorted(stages[:-1]) and set(stages[:-1]) == {0, 1, 2, 3, 4}
    hw = {1: 16 * 16, 2: 8 * 8, 3: 4 * 4, 4: 2 * 2}
    for k in times.launches:
        if k.name == "mlp":
            c = fast.folded.stages[k.stage - 1].blocks[0].fc1_weight.shape[1]
            assert k.flops == 4 * 2 * hw[k.stage] * c * 4 * c
        elif k.name in ("pool_mix", "stats"):
            assert k.flops == 0
    stem = next(k for k in times.launches if k.name == "stem")
    assert stem.flops == 2 * 2 * 16 * 16 * fast.folded.stem_weight.numel()
    table = kernel_table(times)
    assert sum(r["share"] for r in table) == pytest.approx(1.0)
    assert sum(r["launches"] for r in table) == len(times.launches)
    assert [(r["stage"], r["kernel"]) for r in table if r["kernel"] == "mlp"] == [(s, "mlp") for s in (1, 2, 3, 4)]


def test_time_kernels_refuses_a_forward_off_the_triton_backend():
    fast = optimize(randomize_(create_model("s12"), seed=6).eval(), backend="portable")
    with pytest.raises(RuntimeError, match="Triton backend"):
        time_kernels(fast, torch.randn(1, 3, 64, 64), repeats=1)


def test_roofline_fused_blocks_move_far_less_than_an_eager_block():
    """Per block about 4 activations of traffic (plus weights), not the ~39 of an unfused eager block."""
    fast = optimize(create_model("s12"))
    traffic = fast_traffic(fast.folded, fast.plan, 256, 224, 224, torch.bfloat16)
    activation = 256 * 56 * 56 * 64 * 2  # stage 1, bf16
    first_mixer = next(k for k in traffic if k.name == "pool_mix")
    assert activation * 2 <= first_mixer.read_bytes + first_mixer.write_bytes < activation * 2.1
    per_image = bytes_per_image(traffic, 256)
    assert 10e6 < per_image < 40e6  # s12's bf16 activations, ~2 reads + 2 writes per block, stem and head
    assert achieved_tb_per_s(per_image, 10_000) == pytest.approx(per_image * 1e4 / 1e12)


# ------------------------------------------------------------------------------ CUDA graphs


class _FakeGraphs:
    """Stands in for torch.cuda graphs: a 'capture' records the forward, 'replay' re-runs it on the static
    input into the static output, as a real graph does."""

    def __init__(self):
        self.captured = 0
        self.replays = 0

    def __call__(self, forward, example):
        self.captured += 1
        static_input = example.clone()
        static_output = forward(static_input)

        def replay():
            self.replays += 1
            static_output.copy_(forward(static_input))

        return CapturedGraph(static_input, static_output, replay)


def test_graph_cache_warms_up_captures_once_and_replays():
    fake = _FakeGraphs()
    cache = GraphCache(capture=fake, warmup_calls=2)
    eager_calls = []

    def forward(x):
        eager_calls.append(1)
        return x * 2

    for step in range(5):
        x = torch.full((2, 3), float(step))
        out = cache(forward, x)
        torch.testing.assert_close(out, x * 2)
    assert fake.captured == 1 and fake.replays == 3 and cache.captures == 1
    # the returned tensor is the caller's: the next replay does not overwrite it
    first = cache(forward, torch.ones(2, 3))
    cache(forward, torch.zeros(2, 3))
    torch.testing.assert_close(first, torch.full((2, 3), 2.0))


def test_graph_cache_keys_on_shape_dtype_and_extra_and_drops_the_oldest():
    fake = _FakeGraphs()
    cache = GraphCache(capture=fake, warmup_calls=0, max_graphs=2)
    for shape in [(1, 3), (2, 3), (1, 3), (3, 3)]:
        cache(lambda x: x + 1, torch.zeros(shape))
    assert fake.captured == 3 and list(cache.graphs) == [GraphCache.key(torch.zeros(1, 3)), GraphCache.key(torch.zeros(3, 3))]
    cache(lambda x: x + 1, torch.zeros(1, 3), extra="bf16")
    assert fake.captured == 4


def test_graphs_switch(monkeypatch):
    monkeypatch.setenv("POOLFORMER_CUDA_GRAPHS", "0")
    assert not graphs_enabled_by_env()
    assert optimize(create_model("s12")).cuda_graphs is False
    monkeypatch.delenv("POOLFORMER_CUDA_GRAPHS")
    assert graphs_enabled_by_env()
    assert optimize(create_model("s12"), cuda_graphs=False).cuda_graphs is False


# ------------------------------------------------------------------------------------------ in bench


@pytest.mark.slow
def test_bench_fast_rows_on_the_kernels_report_backend_and_roofline(monkeypatch, tmp_path, kernel_device):
    """A fast row that ran the Triton kernels (compiled, or in the interpreter) records its backend and the bytes
    its kernels moved per image; the table adds the roofline line."""
    from typer.testing import CliRunner

    from poolformer_cli.app import app

    monkeypatch.setenv("POOLFORMER_FAST_BACKEND", "triton")
    out = tmp_path / "r.json"
    device = kernel_device.type
    result = CliRunner().invoke(app, ["bench", "s12", "--impl", "fast", "--device", device, "--resolutions", "64",
                                      "--batch-sizes", "2", "--warmup", "0", "--iters", "2", "--output", str(out)])
    assert result.exit_code == 0, result.output
    row = __import__("json").loads(out.read_text())["results"][0]
    assert row["status"] == "ok" and row["backend"] == "triton" and row["parity"]["ok"]
    fast = optimize(create_model("s12"))
    images = torch.empty(2, 3, 64, 64, device=device)
    assert row["bytes_per_image"] == bytes_per_image(_predicted_traffic(fast, images), 2)
    assert row["achieved_tb_per_s"] == pytest.approx(row["bytes_per_image"] * row["throughput"] / 1e12)
    assert "roofline" in result.stdout and "MB moved per image" in result.stdout


@pytest.mark.slow
def test_profile_kernels_times_each_fast_kernel(monkeypatch, kernel_device):
    """`profile --impl fast --kernels` on the Triton backend (compiled, or in the interpreter): a row per (stage,
    kernel) with launches, time, share, bytes; the JSON form's shares add up; anything not on the kernels is one
    line, exit 2, and so is --trace with it."""
    from typer.testing import CliRunner

    from poolformer_cli.app import app

    monkeypatch.setenv("POOLFORMER_FAST_BACKEND", "triton")
    device = kernel_device.type
    args = ["profile", "s12", "--impl", "fast", "--device", device, "--batch-size", "1", "--resolution", "64",
            "--steps", "1", "--kernels"]
    shown = CliRunner().invoke(app, args)
    assert shown.exit_code == 0, shown.output
    assert f"fast kernels on {device}" in shown.stdout and "pool_mix" in shown.stdout and "TFLOP/s" in shown.stdout
    document = json.loads(CliRunner().invoke(app, args + ["--json"]).stdout)
    kernels = document["kernels"]
    assert sum(k["share"] for k in kernels) == pytest.approx(1.0)
    assert [k["kernel"] for k in kernels if k["stage"] == 1] == ["stats", "pool_mix", "mlp"]
    assert document["total_ms"] == pytest.approx(sum(k["ms"] for k in kernels))
    ours = ["profile", "s12", "--impl", "ours", "--device", "cpu", "--resolution", "64", "--kernels"]
    for bad, message in ((ours, "use --impl fast"), (args + ["--trace", "t.json"], "choose one")):
        result = CliRunner().invoke(app, bad)
        assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
    monkeypatch.setenv("POOLFORMER_FAST_BACKEND", "portable")
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "'portable' backend" in result.output


def test_predict_and_eval_print_why_the_fast_path_skipped_its_kernels(monkeypatch, v1_random):
    from poolformer.implementations import IMPLEMENTATIONS
    from poolformer.predict import Classifier
    from poolformer_cli.common import err_console, print_classifier_notes

    monkeypatch.setattr(availability, "unavailable_reason", lambda dtype, device: "Triton is not importable (test)")
    classifier = Classifier(optimize(v1_random), v1_random.spec, "fast", 1000, [], torch.device("cuda"), "pretrained",
                            IMPLEMENTATIONS["fast"])
    with err_console.capture() as captured:
        print_classifier_notes(classifier, "bf16")
    assert "not its Triton kernels: Triton is not importable (test)" in captured.get()
    classifier.device = torch.device("cpu")  # on a CPU nothing was passed over: no note
    with err_console.capture() as captured:
        print_classifier_notes(classifier, "fp32")
    assert captured.get() == ""


@pytest.mark.slow
def test_auto_falls_back_when_the_kernels_fail_on_this_gpu(monkeypatch, v1_random):
    """A GPU or Triton version the kernels do not compile on: backend="auto" answers on PyTorch operators and
    says why; backend="triton" (asked for by name) raises."""
    from poolformer.fast import module

    monkeypatch.setattr(module, "explain_backend", lambda requested, dtype, device: ("triton", None))
    monkeypatch.setattr(availability, "triton_interprets", lambda: False)  # as compiled kernels on a GPU

    def broken(*args, **kwargs):
        raise RuntimeError("PassManager::run failed\nmore detail")

    monkeypatch.setattr(TritonForward, "features", broken)
    x = torch.randn(2, 3, 64, 64)
    fast = optimize(v1_random)
    with torch.no_grad():
        got, expected = fast(x), v1_random(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert fast.backend_for() in ("onednn", "portable")
    assert fast.backend_note() == ("the fast path runs on PyTorch operators: its Triton kernels failed here "
                                   "(RuntimeError: PassManager::run failed)")
    with pytest.raises(RuntimeError, match="PassManager"):
        optimize(v1_random, backend="triton")(x)


def test_a_misspelt_mlp_form_is_a_configuration_error_not_a_fallback(monkeypatch, v1_random):
    """POOLFORMER_TRITON_MLP=gem (for gemm): a one-line ConfigError naming the forms, also under backend="auto"
    on a GPU, where other kernel failures fall back to PyTorch operators (an A/B timing must not silently run
    the default forms)."""
    from poolformer.fast import module

    monkeypatch.setenv(tiles.MLP_ENV, "gem")
    with pytest.raises(ConfigError, match="POOLFORMER_TRITON_MLP='gem' is not one of: auto, fused, split, gemm"):
        tiles.mlp_candidates(256, 64, 256, torch.bfloat16, H200_SM_COUNT)
    monkeypatch.setattr(module, "explain_backend", lambda requested, dtype, device: ("triton", None))
    monkeypatch.setattr(availability, "triton_interprets", lambda: False)  # as compiled kernels on a GPU
    # the forward reaches the setting at its first MLP (no GPU here to compile the kernels before it)
    monkeypatch.setattr(TritonForward, "features",
                        lambda *args: tiles.mlp_candidates(256, 64, 256, torch.float32, H200_SM_COUNT))
    fast = optimize(v1_random)
    with torch.no_grad(), pytest.raises(ConfigError, match="POOLFORMER_TRITON_MLP=.* is not one of"):
        fast(torch.randn(1, 3, 64, 64))
    for value in ("", "auto", "Fused", " gemm "):
        monkeypatch.setenv(tiles.MLP_ENV, value)
        assert tiles.mlp_form_setting() in ("auto", "fused", "gemm")


@pytest.mark.slow
def test_autotune_times_every_tile_and_keeps_the_fastest(monkeypatch, run, kernel_device):
    """POOLFORMER_TRITON_AUTOTUNE=1: each candidate tile runs (and gives the same answer); the fastest is kept
    for the shape, and later calls reuse it without timing again."""
    candidates = [MlpConfig(16, 16, 4, 1), MlpConfig(32, 64, 4, 1)]
    monkeypatch.setenv(autotune.AUTOTUNE_ENV, "1")
    monkeypatch.setattr(tiles, "mlp_configs", lambda *args, **kwargs: list(candidates))
    launched = []
    real_launch = launches.fused_mlp
    monkeypatch.setattr(launches, "fused_mlp", lambda *args: launched.append(args[-1]) or real_launch(*args))
    x = torch.randn(3, 7, 7, 64).to(kernel_device).contiguous()
    block = _block(64, 256, device=kernel_device)
    y, _ = run.mlp(x, run.stage_input_stats(x), block, "gelu", emit_stats=True)
    torch.testing.assert_close(y.double(), _reference_mlp(x, block, "gelu"), rtol=1e-4, atol=1e-4)
    assert set(launched) == set(candidates) and len(launched) == 2 * (1 + autotune.AUTOTUNE_REPEATS) + 1
    chosen = run.tiles.mlp_form_in_use(147, 64, 256, torch.float32)
    assert chosen in candidates and len(run.tiles.mlp_tiles_in_use()) == 1
    timed = [t for key, t in run.tiles.autotune_timings().items() if "rows 147 C 64 D 256" in key]
    assert timed and set(timed[-1]) == {"block_rows=16 block_hidden=16 num_warps=4 num_stages=1",
                                        "block_rows=32 block_hidden=64 num_warps=4 num_stages=1"}
    assert min(timed[-1], key=timed[-1].get) == tiles.tile_name(chosen)
    launched.clear()
    run.mlp(x, run.stage_input_stats(x), block, "gelu", emit_stats=True)
    assert launched == [chosen]


def test_autotuned_tiles_are_kept_for_later_processes(monkeypatch, tmp_path, kernel_device):
    """The autotuned tile goes to the tile cache under the GPU, Triton version and shape; a later process (here:
    a new TileChooser, from the setting as it is then) without autotuning launches it first. A corrupt cache is
    ignored, and POOLFORMER_TRITON_TILE_CACHE=0 keeps nothing."""
    cache = tmp_path / "tiles.json"
    monkeypatch.setenv(autotune.TILE_CACHE_ENV, str(cache))
    candidates = [MlpConfig(16, 16, 4, 1), MlpConfig(32, 64, 4, 1)]
    monkeypatch.setattr(tiles, "mlp_configs", lambda *args, **kwargs: list(candidates))
    monkeypatch.setattr(autotune, "fastest", lambda *args, **kwargs: candidates[1])  # as if it had won the timing
    launched = []
    real_launch = launches.fused_mlp
    monkeypatch.setattr(launches, "fused_mlp", lambda *args: launched.append(args[-1]) or real_launch(*args))
    x = torch.randn(1, 7, 7, 64).to(kernel_device).contiguous()
    block = _block(64, 256, device=kernel_device)

    def fresh_process_run():
        run = TritonForward(TileChooser.from_settings())
        launched.clear()
        run.mlp(x, run.stage_input_stats(x), block, "gelu", emit_stats=False)
        return launched[0]

    monkeypatch.setenv(autotune.AUTOTUNE_ENV, "1")
    assert fresh_process_run() == candidates[1]
    (key,) = json.loads(cache.read_text())
    assert "triton " in key and "rows 49 C 64 D 256" in key and "float32" in key
    monkeypatch.delenv(autotune.AUTOTUNE_ENV)
    assert fresh_process_run() == candidates[1]  # from the cache, ahead of the design-time order
    cache.write_text("{not json")
    assert fresh_process_run() == candidates[0]
    monkeypatch.setenv(autotune.TILE_CACHE_ENV, "0")
    monkeypatch.setenv(autotune.AUTOTUNE_ENV, "1")
    fresh_process_run()
    assert cache.read_text() == "{not json" and autotune.tile_cache_path() is None


@pytest.mark.slow
def test_autotune_times_the_token_mixer_tiles_too(monkeypatch, kernel_device):
    """POOLFORMER_TRITON_AUTOTUNE=1 also times the token mixer's candidate tiles (same output from each), keeps
    the fastest for the shape and in the tile cache; without autotuning a cached tile is used untimed."""
    candidates = [Tile(16, 64, 4), Tile(32, 64, 8)]
    monkeypatch.setattr(forward, "elementwise_tiles", lambda *args, **kwargs: list(candidates))
    launched = []
    real_launch = launches.pool_mix
    monkeypatch.setattr(launches, "pool_mix", lambda *args: launched.append(args[-1]) or real_launch(*args))
    x = torch.randn(2, 7, 9, 64).to(kernel_device).contiguous()
    block = _block(64, 256, device=kernel_device)
    monkeypatch.setenv(autotune.AUTOTUNE_ENV, "1")
    run = TritonForward(TileChooser.from_settings())
    y, _ = run.pool_mix(x, run.stage_input_stats(x), block, 3)
    torch.testing.assert_close(y.double(), _reference_pool_mix(x, block, 3), rtol=1e-4, atol=1e-4)
    assert set(launched) == set(candidates) and len(launched) == 2 * (1 + autotune.AUTOTUNE_REPEATS) + 1
    (in_use,) = run.tiles.pool_tiles_in_use()
    chosen = Tile(in_use["block_rows"], in_use["block_channels"], in_use["num_warps"], in_use["whole_slots"])
    assert chosen in candidates
    assert [in_use[k] for k in ("rows", "height", "width", "channels", "pool")] == [126, 7, 9, 64, 3]
    monkeypatch.delenv(autotune.AUTOTUNE_ENV)
    run = TritonForward(TileChooser.from_settings())  # a new chooser: nothing in use yet
    launched.clear()
    run.pool_mix(x, run.stage_input_stats(x), block, 3)
    assert launched == [chosen]  # from the tile cache, untimed
