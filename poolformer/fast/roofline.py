"""Roofline of the fast path on a GPU: the bytes its kernels move per image, from the kernels' own reads and
writes (tensor shapes x element sizes), and the memory bandwidth a measured speed implies.

Each kernel is charged every tensor it reads and writes once: the ideal DRAM traffic of the schedule in
`poolformer.fast.triton.forward` (pooling's neighbouring rows, the MLP's residual re-read and the weights that
every program streams are assumed to come from L1/L2). Measured DRAM bytes (Nsight Compute) can only be
higher; comparing the two is how a GPU session checks the kernels' caching.

Per block the kernels move about 4 C-wide activations per token (mixer: read x, write x1; MLP: read x1, write
y) plus the weights once per batch, against about 39 for an unfused eager block (GroupNorm 3, pooling 2,
subtract 3, LayerScale 2, residual add 3, twice; fc1 5, GELU 8 on the 4C-wide hidden tensor, fc2 5). The
split MLP (`SplitMlp`) and the GEMM form (`GemmMlp`) add their hidden tensor's round trips: they
trade bytes for GEMM tiles that keep the tensor cores busy.

`time_kernels` times each launch of a forward on its own (CUDA events), so the bytes and FLOPs of every kernel
meet its measured time: where the forward's time goes, kernel by kernel.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch

from .folding import FeatureNorm, FoldedModel, Plan
from .triton.availability import REFERENCE_SM_COUNT
from .triton.chooser import TileChooser
from .triton.instrument import KernelTraffic
from .triton.tiles import (
    GemmMlp, SplitMlp, cdiv, elementwise_tile, gemm_partials_rows, gemm_stats_in_epilogue, mlp_candidates,
    new_partials_shape,
)
from .triton.weights import STEM_BLOCK_K, norm_after_fc1


def _conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def _partials_bytes(rows: int, hw: int, block_rows: int) -> int:
    slots, segs = new_partials_shape(rows, hw, block_rows)
    return slots * segs * 3 * 4


def fast_traffic(folded: FoldedModel, plan: Plan, batch_size: int, height: int, width: int, dtype: torch.dtype,
                 input_dtype: torch.dtype = torch.float32, features_only: bool = False,
                 interpret: bool = False, tiles: TileChooser | None = None,
                 sm_count: int = REFERENCE_SM_COUNT) -> list[KernelTraffic]:
    """The kernels (and PyTorch operators) of one forward of the Triton backend on a [batch_size, 3, height,
    width] input of `input_dtype` (the stem kernel reads it as it is), with the bytes each reads and writes.
    `folded` is the float32 folded model; `dtype` the compute dtype; interpret: size the statistics buffers for
    the interpreter's tiles instead of the GPU's. Each MLP is counted in the form `tiles` runs it in, where it
    ran; else in the first of its candidates for a GPU of `sm_count` multiprocessors. features_only: a
    `forward_features` (the last map, no head); a features-only model's forward counts its output norms (and
    the partials each stage's last block writes for them) instead of a head."""
    norms = plan.features_only and not features_only
    size = torch.empty(0, dtype=dtype).element_size()
    input_size = torch.empty(0, dtype=input_dtype).element_size()
    traffic: list[KernelTraffic] = []
    batch = batch_size
    pixels = batch * 3 * height * width
    h, w = _conv_out(height, 7, 4, 2), _conv_out(width, 7, 4, 2)
    channels = folded.stem_weight.shape[0]
    stem_rows = cdiv(folded.stem_weight[0].numel(), STEM_BLOCK_K) * STEM_BLOCK_K  # stem_matrix's padded K
    stem_weights = stem_rows * channels * size
    traffic.append(KernelTraffic("stem", pixels * input_size + stem_weights + channels * 4,
                                 batch * h * w * channels * size))
    if folded.stem_norm_weight is not None:
        activation = batch * h * w * channels * size
        traffic.append(KernelTraffic("stem_norm", activation + channels * size, activation))
    for stage_index, stage in enumerate(folded.stages):
        norm = folded.feature_norms[stage_index] if norms else None
        if stage.down_weight is not None:
            if plan.down_norm_eps is not None:
                activation = batch * h * w * channels * size
                traffic.append(KernelTraffic("down_norm", activation, activation))
            weight_bytes = stage.down_weight.numel() * size
            bias_bytes = stage.down_bias.numel() * size if stage.down_bias is not None else 0
            read = batch * h * w * channels * size + weight_bytes + bias_bytes
            h, w, channels = _conv_out(h, 3, 2, 1), _conv_out(w, 3, 2, 1), stage.down_weight.shape[0]
            traffic.append(KernelTraffic("down", read, batch * h * w * channels * size))
        rows, hw = batch * h * w, h * w
        activation = rows * channels * size
        tile_rows = elementwise_tile(rows, channels, interpret).block_rows
        if not stage.blocks:
            if norms:  # the map's statistics, then its output norm
                traffic.append(KernelTraffic("stats", activation, _partials_bytes(rows, hw, tile_rows)))
                traffic.append(_feature_norm_traffic(activation, _partials_bytes(rows, hw, tile_rows), norm))
            continue
        hidden = stage.blocks[0].fc1_weight.shape[0]
        form = ((tiles.mlp_form_in_use(rows, channels, hidden, dtype) if tiles is not None else None)
                or mlp_candidates(rows, channels, hidden, dtype, sm_count, interpret)[0])
        elementwise_partials = _partials_bytes(rows, hw, tile_rows)
        in_epilogue = isinstance(form, GemmMlp) and gemm_stats_in_epilogue(form, hw, channels, hidden)
        mlp_partials = _partials_bytes(rows, hw, gemm_partials_rows(form, hw, channels, hidden)
                                       if isinstance(form, GemmMlp) else form.block_rows)
        traffic.append(KernelTraffic("stats", activation, elementwise_partials))
        incoming = elementwise_partials
        for index, block in enumerate(stage.blocks):
            vector = channels * 4  # scales and biases stay float32
            mixer_reads = activation + incoming + vector * (1 + (block.skip_scale1 is not None))
            traffic.append(KernelTraffic("pool_mix", mixer_reads, activation + elementwise_partials))
            weights = 2 * hidden * channels * size + 4 * (
                hidden * (block.fc1_bias is not None) + hidden * norm_after_fc1(dtype, channels)
                + channels * (block.fc2_bias is not None) + channels * (block.skip_scale2 is not None))
            emits = index < len(stage.blocks) - 1 or norms
            if isinstance(form, SplitMlp):
                traffic += _split_mlp_traffic(block, rows, channels, hidden, size, elementwise_partials,
                                              mlp_partials if emits else None)
            elif isinstance(form, GemmMlp):
                traffic += _gemm_mlp_traffic(block, rows, channels, hidden, size, elementwise_partials,
                                             mlp_partials if emits else None, in_epilogue)
            else:
                traffic.append(KernelTraffic("mlp", activation + elementwise_partials + weights,
                                             activation + (mlp_partials if emits else 0)))
            incoming = mlp_partials
        if norms:
            traffic.append(_feature_norm_traffic(activation, incoming, norm))
    if not features_only and not plan.features_only:
        classes = folded.head_bias.numel()
        head_reads = batch * h * w * channels * size + (folded.head_weight.numel() + classes) * 4
        traffic.append(KernelTraffic("head", head_reads, batch * classes * 4))
    return traffic


def _feature_norm_traffic(activation: int, partials: int, norm: FeatureNorm) -> KernelTraffic:
    """A features-only model's output norm of one stage: the map, its partials and the float32 affine in, the
    normalised map out."""
    vectors = 4 * (norm.weight.numel() + (norm.bias.numel() if norm.bias is not None else 0))
    return KernelTraffic("feature_norm", activation + partials + vectors, activation)


def _split_mlp_traffic(block, rows: int, channels: int, hidden: int, size: int, incoming: int,
                       emitted: int | None) -> list[KernelTraffic]:
    """The launches of the split MLP (SplitMlp): the normalising pass, fc1, the activation, fc2
    and, when the next block needs them, the output's statistics."""
    activation, wide = rows * channels * size, rows * hidden * size
    vectors = 4 * channels * ((block.skip_scale2 is not None) + (block.fc2_bias is not None))
    base = activation if vectors else 0  # the residual base is written only when there is a scale or a bias
    bias = hidden * size if block.fc1_bias is not None else 0
    weight = hidden * channels * size
    traffic = [KernelTraffic("mlp norm", activation + incoming + vectors, activation + base),
               KernelTraffic("fc1", activation + weight + bias, wide),
               KernelTraffic("act", wide, wide),
               KernelTraffic("fc2", wide + weight + activation, activation)]
    if emitted is not None:
        traffic.append(KernelTraffic("mlp stats", activation, emitted))
    return traffic


def _gemm_mlp_traffic(block, rows: int, channels: int, hidden: int, size: int, incoming: int,
                      emitted: int | None, in_epilogue: bool) -> list[KernelTraffic]:
    """The launches of the GEMM form (GemmMlp): fc1 normalising its input and applying the
    activation, fc2 adding the residual, and, when the next block needs them, the output's statistics (from
    fc2's epilogue when `in_epilogue`, else a statistics pass)."""
    activation, wide = rows * channels * size, rows * hidden * size
    weight = hidden * channels * size
    bias = 4 * hidden if block.fc1_bias is not None else 0
    vectors = 4 * channels * ((block.skip_scale2 is not None) + (block.fc2_bias is not None))
    fc2_partials = emitted if emitted is not None and in_epilogue else 0
    traffic = [KernelTraffic("fc1 norm act", activation + incoming + weight + bias, wide),
               KernelTraffic("fc2 residual", wide + weight + activation + vectors, activation + fc2_partials)]
    if emitted is not None and not in_epilogue:
        traffic.append(KernelTraffic("mlp stats", activation, emitted))
    return traffic


def bytes_per_image(traffic: list[KernelTraffic], batch_size: int) -> float:
    """Total bytes read and written, divided by the batch size."""
    return sum(k.read_bytes + k.write_bytes for k in traffic) / batch_size


def achieved_tb_per_s(bytes_per_image_: float, images_per_s: float) -> float:
    """The memory bandwidth (10^12 bytes/s) a speed of images_per_s implies for that traffic."""
    return bytes_per_image_ * images_per_s / 1e12


# ------------------------------------------------------------------------------------ per-kernel times


@dataclass(frozen=True)
class KernelTime:
    """One launch of a forward on the Triton backend: its place, median time over the repeats, the bytes it
    reads and writes (as `fast_traffic` counts them) and its FLOPs (2 per multiply-add; 0 where not counted)."""

    index: int
    name: str
    stage: int | None  # 0 the stem (and v2's norm after it), 1-4 the stages, None the head
    ms: float
    read_bytes: int
    write_bytes: int
    flops: int

    @property
    def tb_per_s(self) -> float | None:
        return (self.read_bytes + self.write_bytes) / (self.ms * 1e-3) / 1e12 if self.ms > 0 else None

    @property
    def tflop_per_s(self) -> float | None:
        return self.flops / (self.ms * 1e-3) / 1e12 if self.ms > 0 and self.flops else None


@dataclass(frozen=True)
class KernelTimes:
    """time_kernels' answer: every launch, and whether the host stayed ahead of the GPU in every repeat (if not,
    some gaps between marks include host time and the launch times are upper bounds)."""

    launches: list[KernelTime]
    repeats: int
    host_ahead: bool

    @property
    def total_ms(self) -> float:
        return sum(k.ms for k in self.launches)


FALLBACK_GPU_CYCLES_PER_MS = 2_000_000  # about a Hopper's SM clock, where the device does not report its own


def gpu_cycles_per_ms(device: torch.device) -> int:
    """The SM clock of a CUDA `device` in cycles per millisecond (torch.cuda._sleep counts cycles): its
    properties' clock_rate, which is in kHz, where this torch reports it; else FALLBACK_GPU_CYCLES_PER_MS."""
    clock_khz = getattr(torch.cuda.get_device_properties(device), "clock_rate", None)
    return int(clock_khz) if clock_khz else FALLBACK_GPU_CYCLES_PER_MS


def time_kernels(fast, x: torch.Tensor, repeats: int = 10, queue_ahead_ms: float = 40.0) -> KernelTimes:
    """Time each kernel of `fast`'s forward (a FastPoolFormer on the Triton backend) on input `x`: CUDA events
    after every launch, CUDA graphs off, with the GPU first held busy for `queue_ahead_ms` (torch.cuda._sleep)
    so the host queues the whole forward before the GPU reaches it and each gap between two events is GPU time
    only. On a CPU (Triton's interpreter) the marks are host clocks. The first forward, which compiles or tunes,
    is not timed."""
    cuda = x.device.type == "cuda"
    graphs, fast.cuda_graphs = fast.cuda_graphs, False
    runs: list[list[float]] = []
    host_ahead = True
    traffic: list[KernelTraffic] = []
    try:
        with torch.inference_mode():
            fast(x)
            for _ in range(repeats):
                if cuda:
                    torch.cuda.synchronize(x.device)
                    torch.cuda._sleep(int(queue_ahead_ms * gpu_cycles_per_ms(x.device)))
                with fast.recorder.record_traffic() as traffic, fast.recorder.mark_launches(x.device) as marks:
                    fast(x)
                if cuda:
                    host_ahead &= not marks[0].mark.query()  # the GPU had not yet reached the forward
                    torch.cuda.synchronize(x.device)
                    runs.append([a.mark.elapsed_time(b.mark) for a, b in zip(marks, marks[1:])])
                else:
                    runs.append([(b.mark - a.mark) * 1e3 for a, b in zip(marks, marks[1:])])
    finally:
        fast.cuda_graphs = graphs
    if not traffic or len(traffic) != len(runs[0]):
        raise RuntimeError("this forward did not run on the Triton backend: nothing to time kernel by kernel")
    launches = [KernelTime(i, t.name, m.stage, statistics.median(run[i] for run in runs), t.read_bytes,
                           t.write_bytes, m.flops)
                for i, (t, m) in enumerate(zip(traffic, marks[1:]))]
    return KernelTimes(launches, repeats, host_ahead)


def kernel_table(times: KernelTimes) -> list[dict]:
    """The launches grouped by (stage, kernel name) in forward order: launches, total ms, share of the forward,
    bytes, achieved TB/s and TFLOP/s (over the group's summed time)."""
    groups: dict[tuple, list[KernelTime]] = {}
    for k in times.launches:
        groups.setdefault((k.stage, k.name), []).append(k)
    total = times.total_ms or 1.0
    rows = []
    for (stage, name), ks in groups.items():
        ms = sum(k.ms for k in ks)
        moved = sum(k.read_bytes + k.write_bytes for k in ks)
        flops = sum(k.flops for k in ks)
        rows.append({"stage": "head" if stage is None else stage, "kernel": name, "launches": len(ks), "ms": ms,
                     "share": ms / total, "bytes": moved, "tb_per_s": moved / (ms * 1e-3) / 1e12 if ms > 0 else None,
                     "tflop_per_s": flops / (ms * 1e-3) / 1e12 if ms > 0 and flops else None})
    return rows
