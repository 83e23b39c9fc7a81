"""One launch of each Triton kernel (or the PyTorch operator between them) on a given tile, recorded into the
forward's `Recorder`. Every activation is a contiguous channels-last [B, H, W, C] tensor; the per-sample
statistics travel as `Partials`. Choosing the tile is `forward.TritonForward`'s job, not this module's."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ... import settings
from .. import cpu
from ..folding import FeatureNorm
from .availability import kernels, triton_interprets
from .instrument import Recorder
from .tiles import (
    GEMM_STATS_BLOCK_ROWS, MIN_CHANNELS, GemmMlp, MlpConfig, MlpForm, Partials, SplitMlp, Tile, cdiv,
    channel_split, elementwise_tile, gemm_stats_in_epilogue, gemm_tile_for, new_partials, new_partials_shape,
    next_power_of_two, segments_for, slot_rows_for,
)
from .weights import STEM_BLOCK_K, TritonBlock, norm_after_fc1

ACTIVATION_CODES = {"gelu": 0, "relu": 1, "silu": 2, "starrelu": 3}
GELU_ENV = "POOLFORMER_TRITON_GELU"  # erf (the default: libdevice's erff) | poly (see fused_activation_code)
ACTIVATION_BLOCK = 4096
LAYER_NORM_ELEMENTS = 4096  # per program of layer_norm_kernel: 16-64 rows of C = 256-64
STEM_STRIDE, STEM_PADDING = 4, 2
STEM_BLOCK_M = 128


def fused_activation_code(activation: str) -> int:
    """The fused MLP kernel's ACT code. POOLFORMER_TRITON_GELU=poly computes GELU's erf with Abramowitz & Stegun
    7.1.26 (|error| < 5e-7, within float32's 1e-4 target) instead of libdevice's erff, whose cost rivalled the
    fused MLP's matmuls (benchmarks/results/gpu/README.md); off by default, for A/B timing."""
    if activation == "gelu" and settings.choice(GELU_ENV) == "poly":
        return 4
    return ACTIVATION_CODES[activation]


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision for operands of `dtype`: "ieee" keeps float32 exact (no TF32); bf16/fp16
    ignore it."""
    return "ieee" if dtype == torch.float32 else "tf32"


def stats(recorder: Recorder, x: torch.Tensor, tile: Tile, name: str = "stats") -> Partials:
    """Partials of a contiguous [B, H, W, C] activation, on `stats_kernel`."""
    batch, height, width, channels = x.shape
    rows = batch * height * width
    out = new_partials(rows, height * width, tile.block_rows, x.device)
    kernels().stats_kernel[(out.buffer.shape[0],)](
        x, out.buffer, rows, height * width, channels, out.slot_rows,
        BLOCK_R=tile.block_rows, BLOCK_C=tile.block_channels, SEGS=out.segs, num_warps=tile.num_warps)
    recorder.record(name, [x], [out.buffer])
    return out


def group_norm(recorder: Recorder, x: torch.Tensor, stats_in: Partials, norm: FeatureNorm,
               tile: Tile) -> torch.Tensor:
    """A features-only model's output norm on a stage's map x [B, H, W, C] -> a new [B, H, W, C] in x's dtype, on
    `group_norm_kernel`, from x's partials `stats_in`."""
    batch, height, width, channels = x.shape
    rows, hw = batch * height * width, height * width
    slots, segs = new_partials_shape(rows, hw, tile.block_rows)
    y = torch.empty_like(x)
    kernels().group_norm_kernel[(slots,)](
        x, y, stats_in.buffer, norm.weight, norm.bias if norm.bias is not None else norm.weight, rows, hw, channels,
        slot_rows_for(hw, tile.block_rows), stats_in.slot_rows, norm.eps, BLOCK_R=tile.block_rows,
        BLOCK_C=tile.block_channels, SEGS=segs, IN_SEGS=stats_in.segs, IN_MAX_SLOTS=stats_in.max_slots,
        HAS_B=norm.bias is not None, num_warps=tile.num_warps)
    recorder.record("feature_norm", [x, stats_in.buffer, norm.weight, norm.bias], [y])
    return y


def pool_mix(recorder: Recorder, x: torch.Tensor, stats_in: Partials, block: TritonBlock, pool_size: int,
             tile: Tile) -> tuple[torch.Tensor, Partials]:
    """The token mixer on x [B, H, W, C] -> (x1 [B, H, W, C], x1's partials), on `pool_mix_kernel`."""
    batch, height, width, channels = x.shape
    rows = batch * height * width
    y = torch.empty_like(x)
    out = new_partials(rows, height * width, tile.block_rows, x.device)
    skip = block.skip_scale1
    kernels().pool_mix_kernel[(out.buffer.shape[0],)](
        x, y, stats_in.buffer, out.buffer, block.mix_scale, skip if skip is not None else block.mix_scale,
        rows, height, width, channels, out.slot_rows, stats_in.slot_rows, block.norm1_eps,
        POOL=pool_size, HAS_SKIP=skip is not None, BLOCK_R=tile.block_rows, BLOCK_C=tile.block_channels,
        SEGS=out.segs, IN_SEGS=stats_in.segs, IN_MAX_SLOTS=stats_in.max_slots, WHOLE_SLOTS=tile.whole_slots,
        num_warps=tile.num_warps)
    recorder.record("pool_mix", [x, stats_in.buffer, block.mix_scale, skip], [y, out.buffer])
    return y, out


def mlp(recorder: Recorder, x1: torch.Tensor, stats_in: Partials, block: TritonBlock, activation: str,
        emit_stats: bool, form: MlpForm) -> tuple[torch.Tensor, Partials | None]:
    """The block's second half on x1 [B, H, W, C] in `form` -> (y [B, H, W, C], y's partials or None)."""
    launch = {SplitMlp: split_mlp, GemmMlp: gemm_mlp}.get(type(form), fused_mlp)
    return launch(recorder, x1, stats_in, block, activation, emit_stats, form)


def fused_mlp(recorder: Recorder, x1: torch.Tensor, stats_in: Partials, block: TritonBlock, activation: str,
              emit_stats: bool, config: MlpConfig) -> tuple[torch.Tensor, Partials | None]:
    """The MLP on `mlp_kernel`, its hidden activation never leaving the chip."""
    batch, height, width, channels = x1.shape
    rows, hidden = batch * height * width, block.fc1_weight.shape[1]
    y = torch.empty_like(x1)
    out = new_partials(rows, height * width, config.block_rows, x1.device)
    part_a, part_b = channel_split(channels)
    placeholder = block.mix_scale  # a valid pointer for arguments a constexpr switches off
    after_fc1 = norm_after_fc1(x1.dtype, channels)
    colsum = block.fc1_colsum if after_fc1 else None
    if after_fc1 and colsum is None:
        raise ValueError("the block was prepared for another dtype: fc1's column sums are missing")
    kernels().mlp_kernel[(out.buffer.shape[0],)](
        x1, y, stats_in.buffer, out.buffer, block.fc1_weight,
        block.fc1_bias if block.fc1_bias is not None else placeholder,
        colsum if colsum is not None else placeholder, block.fc2_weight,
        block.fc2_bias if block.fc2_bias is not None else placeholder,
        block.skip_scale2 if block.skip_scale2 is not None else placeholder,
        rows, height * width, channels, hidden, out.slot_rows, stats_in.slot_rows, block.norm2_eps,
        CA=part_a, CB=part_b, BLOCK_R=config.block_rows, BLOCK_D=config.block_hidden, SEGS=out.segs,
        IN_SEGS=stats_in.segs, IN_MAX_SLOTS=stats_in.max_slots, ACT=fused_activation_code(activation),
        HAS_B1=block.fc1_bias is not None, HAS_B2=block.fc2_bias is not None,
        HAS_SKIP=block.skip_scale2 is not None, EMIT_STATS=emit_stats, NORM_AFTER_FC1=colsum is not None,
        PRECISION=dot_precision(x1.dtype), DOT_UPCAST=triton_interprets(),
        num_warps=config.num_warps, num_stages=config.num_stages)
    recorder.record("mlp", [x1, stats_in.buffer, block.fc1_weight, block.fc1_bias, colsum, block.fc2_weight,
                            block.fc2_bias, block.skip_scale2], [y] + ([out.buffer] if emit_stats else []),
                    flops=4 * rows * channels * hidden)
    return y, (out if emit_stats else None)


def _activation(recorder: Recorder, h: torch.Tensor, activation: str) -> torch.Tensor:
    """The split form's activation on fc1's output, in one pass: PyTorch's own kernels where one op does it
    (GELU, ReLU, SiLU), `activation_kernel` in place for StarReLU's relu(h)^2 (two in-place passes in PyTorch)."""
    if activation == "gelu":
        h = F.gelu(h)
    elif activation == "relu":
        h = h.relu_()
    elif activation == "silu":
        h = F.silu(h, inplace=True)
    else:
        kernels().activation_kernel[(cdiv(h.numel(), ACTIVATION_BLOCK),)](
            h, h.numel(), ACT=ACTIVATION_CODES[activation], BLOCK=ACTIVATION_BLOCK, num_warps=4)
    recorder.record("act", [h], [h])
    return h


def split_mlp(recorder: Recorder, x1: torch.Tensor, stats_in: Partials, block: TritonBlock, activation: str,
              emit_stats: bool, split: SplitMlp) -> tuple[torch.Tensor, Partials | None]:
    """The MLP split around cuBLAS (see SplitMlp): normalising kernel, fc1, activation, fc2 onto the residual
    base, then the output's statistics when the next block needs them."""
    batch, height, width, channels = x1.shape
    rows, hidden, hw = batch * height * width, block.fc1_weight.shape[1], height * width
    slots, segs = new_partials_shape(rows, hw, split.block_rows)
    x = x1.view(rows, channels)
    normed = torch.empty_like(x)
    write_base = block.skip_scale2 is not None or block.fc2_bias is not None
    base = torch.empty_like(x) if write_base else x
    placeholder = block.mix_scale
    kernels().mlp_norm_kernel[(slots,)](
        x, normed, base, stats_in.buffer, block.skip_scale2 if block.skip_scale2 is not None else placeholder,
        block.fc2_bias if block.fc2_bias is not None else placeholder, rows, hw, channels,
        slot_rows_for(hw, split.block_rows), stats_in.slot_rows, block.norm2_eps, BLOCK_R=split.block_rows,
        BLOCK_C=split.block_channels, SEGS=segs, IN_SEGS=stats_in.segs, IN_MAX_SLOTS=stats_in.max_slots,
        HAS_SKIP=block.skip_scale2 is not None, HAS_B2=block.fc2_bias is not None, WRITE_BASE=write_base,
        num_warps=split.num_warps)
    recorder.record("mlp norm", [x, stats_in.buffer, block.skip_scale2, block.fc2_bias],
                    [normed] + ([base] if write_base else []))
    if block.fc1_bias_compute is not None:
        h = torch.addmm(block.fc1_bias_compute, normed, block.fc1_weight)
    else:
        h = normed @ block.fc1_weight
    recorder.record("fc1", [normed, block.fc1_weight, block.fc1_bias_compute], [h],
                    flops=2 * rows * channels * hidden)
    h = _activation(recorder, h, activation)
    y = torch.addmm(base, h, block.fc2_weight)
    recorder.record("fc2", [h, block.fc2_weight, base], [y], flops=2 * rows * channels * hidden)
    y = y.view(batch, height, width, channels)
    if not emit_stats:
        return y, None
    return y, stats(recorder, y, Tile(split.block_rows, split.block_channels, split.num_warps), "mlp stats")


def gemm_mlp(recorder: Recorder, x1: torch.Tensor, stats_in: Partials, block: TritonBlock, activation: str,
             emit_stats: bool, tile: GemmMlp) -> tuple[torch.Tensor, Partials | None]:
    """The MLP as two Triton GEMMs carrying the norm, activation and residual (see GemmMlp)."""
    batch, height, width, channels = x1.shape
    rows, hidden, hw = batch * height * width, block.fc1_weight.shape[1], height * width
    x = x1.view(rows, channels)
    placeholder = block.mix_scale  # a valid pointer for arguments a constexpr switches off
    precision, upcast = dot_precision(x1.dtype), triton_interprets()
    block_n, block_k = gemm_tile_for(tile, hidden, channels)
    h = torch.empty(rows, hidden, device=x1.device, dtype=x1.dtype)
    kernels().fc1_kernel[(cdiv(rows, tile.block_m) * cdiv(hidden, block_n),)](
        x, block.fc1_weight, block.fc1_bias if block.fc1_bias is not None else placeholder, h, stats_in.buffer,
        rows, hw, channels, hidden, stats_in.slot_rows, block.norm2_eps,
        BLOCK_M=tile.block_m, BLOCK_N=block_n, BLOCK_K=block_k, SEGS=segments_for(tile.block_m, hw),
        IN_SEGS=stats_in.segs, IN_MAX_SLOTS=stats_in.max_slots, ACT=fused_activation_code(activation),
        HAS_B1=block.fc1_bias is not None, PRECISION=precision, DOT_UPCAST=upcast,
        num_warps=tile.num_warps, num_stages=tile.num_stages)
    recorder.record("fc1 norm act", [x, stats_in.buffer, block.fc1_weight, block.fc1_bias], [h],
                    flops=2 * rows * channels * hidden)
    block_n, block_k = gemm_tile_for(tile, channels, hidden)
    y = torch.empty_like(x1)
    in_epilogue = emit_stats and gemm_stats_in_epilogue(tile, hw, channels, hidden)
    out = new_partials(rows, hw, tile.block_m, x1.device) if in_epilogue else None
    kernels().fc2_kernel[(cdiv(rows, tile.block_m) * cdiv(channels, block_n),)](
        h, block.fc2_weight, x, block.skip_scale2 if block.skip_scale2 is not None else placeholder,
        block.fc2_bias if block.fc2_bias is not None else placeholder, y,
        out.buffer if out is not None else placeholder, rows, hw, channels, hidden,
        BLOCK_M=tile.block_m, BLOCK_N=block_n, BLOCK_K=block_k, HAS_SKIP=block.skip_scale2 is not None,
        HAS_B2=block.fc2_bias is not None, EMIT_STATS=in_epilogue, SEGS=out.segs if out is not None else 1,
        PRECISION=precision, DOT_UPCAST=upcast, num_warps=tile.num_warps, num_stages=tile.num_stages)
    recorder.record("fc2 residual", [h, block.fc2_weight, x, block.skip_scale2, block.fc2_bias],
                    [y] + ([out.buffer] if out is not None else []), flops=2 * rows * channels * hidden)
    if not emit_stats or out is not None:
        return y, out
    stats_tile = Tile(GEMM_STATS_BLOCK_ROWS, elementwise_tile(rows, channels).block_channels)
    return y, stats(recorder, y, stats_tile, "mlp stats")


def conv(recorder: Recorder, name: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
         stride: int, padding: int) -> torch.Tensor:
    """A downsampling convolution on cuDNN; in float32 without TF32 (cuDNN's default allows it for
    convolutions, which would cost the float32 path its 1e-4 exactness)."""
    previous = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = previous and x.dtype != torch.float32
    try:
        out = cpu.conv_channels_last(x, weight, bias, stride, padding)
    finally:
        torch.backends.cudnn.allow_tf32 = previous
    recorder.record(name, [x, weight, bias], [out], flops=2 * (out.numel() // weight.shape[0]) * weight.numel())
    return out


def layer_norm(recorder: Recorder, name: str, x: torch.Tensor, weight: torch.Tensor | None,
               eps: float) -> torch.Tensor:
    """LayerNorm over the last dimension of a [B, H, W, C] activation on `layer_norm_kernel`."""
    x = x.contiguous()
    channels = x.shape[-1]
    rows = x.numel() // channels
    width = next_power_of_two(channels)
    block_rows = max(1, (LAYER_NORM_ELEMENTS if not triton_interprets() else 65536) // width)
    out = torch.empty_like(x)
    kernels().layer_norm_kernel[(cdiv(rows, block_rows),)](
        x, out, weight if weight is not None else x, rows, channels, eps,
        BLOCK_R=block_rows, BLOCK_C=width, HAS_W=weight is not None, num_warps=4)
    recorder.record(name, [x, weight], [out])
    return out


def stem(recorder: Recorder, x: torch.Tensor, matrix: torch.Tensor, bias: torch.Tensor,
         kernel_size: int) -> torch.Tensor:
    """Images [B, 3, H, W] (any strides, any float dtype) -> the stem's output [B, H/4, W/4, C0] channels-last in
    the compute dtype (matrix's: see weights.stem_matrix; bias float32), on stem_kernel: the input is read once
    as it is, with no conversion pass."""
    batch, in_channels, height, width = x.shape
    out_h = (height + 2 * STEM_PADDING - kernel_size) // STEM_STRIDE + 1
    out_w = (width + 2 * STEM_PADDING - kernel_size) // STEM_STRIDE + 1
    out_channels = matrix.shape[1]
    y = torch.empty(batch, out_h, out_w, out_channels, device=x.device, dtype=matrix.dtype)
    rows = batch * out_h * out_w
    kernels().stem_kernel[(cdiv(rows, STEM_BLOCK_M),)](
        x, matrix, bias, y, batch, height, width, out_h, out_w, out_channels, *x.stride(),
        CIN=in_channels, KSIZE=kernel_size, STRIDE=STEM_STRIDE, PAD=STEM_PADDING, K_PAD=matrix.shape[0],
        BLOCK_M=STEM_BLOCK_M, BLOCK_K=STEM_BLOCK_K, BLOCK_N=max(MIN_CHANNELS, next_power_of_two(out_channels)),
        PRECISION=dot_precision(matrix.dtype), DOT_UPCAST=triton_interprets(), num_warps=4)
    recorder.record("stem", [x, matrix, bias], [y],
                    flops=2 * rows * out_channels * in_channels * kernel_size * kernel_size)
    return y
