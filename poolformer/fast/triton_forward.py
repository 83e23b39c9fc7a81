"""The folded PoolFormer forward on Triton kernels (`poolformer.fast.triton_kernels`): two kernels per block.

Per block, on channels-last activations [B, H, W, C] (= rows [R, C], R = B*H*W):
1. `pool_mix_kernel`: x1 = skip1 * x + (mix_scale / sigma_b(x)) * (avg_pool(x) - x); one read of x, one write
   of x1, plus x1's per-sample partial moments;
2. `mlp_kernel`: y = skip2 * x1 + fc2(act(fc1((x1 - mu_b(x1)) / sigma_b(x1)))); one read of x1 (and an L2
   re-read for the residual), one write of y, plus y's partial moments for the next block's mixer. The
   4C-wide hidden activation lives only in registers/shared memory, BLOCK_D columns at a time. Where cuBLAS
   does better (wide stages in bf16/fp16, see `SplitMlp`), the MLP runs split instead: a normalising kernel,
   fc1 and fc2 as GEMMs, the activation between them, and the output's statistics (`mlp_candidates`). A third
   form, `GemmMlp`, runs fc1 and fc2 as Triton GEMMs with the norm, activation and residual in their
   prologue and epilogues; autotuning decides among the three.
A stage's first block gets its input's moments from `stats_kernel` (one extra read per stage). The stem is an
implicit GEMM over the caller's images as they are (`stem_kernel`), v2's LayerNorms run on
`layer_norm_kernel`; the downsampling convolutions and the head are PyTorch operators (cuDNN on a GPU).

With POOLFORMER_TRITON_INTERPRET=1 (tests, debugging) the same kernels run in Triton's interpreter, on CPU
tensors: Triton chooses between compiling and interpreting once per process, at its first import, so with the
switch set every Triton kernel of the process is interpreted (CUDA tensors too, through host copies).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F

from .. import settings
from ..errors import ConfigError
from ..files import replace_atomically
from . import cpu
from .folding import FoldedBlock, FoldedModel, Plan

INTERPRET_ENV = "POOLFORMER_TRITON_INTERPRET"
MIN_CHANNELS = 16  # tl.dot needs every block dimension >= 16
MAX_SLOTS_PER_SAMPLE = 64  # producers size their slots so one sample's partials fit one gather in the consumer
ACTIVATION_CODES = {"gelu": 0, "relu": 1, "silu": 2, "starrelu": 3}
GELU_ENV = "POOLFORMER_TRITON_GELU"  # erf (the default: libdevice's erff) | poly (see fused_activation_code)


def fused_activation_code(activation: str) -> int:
    """The fused MLP kernel's ACT code. POOLFORMER_TRITON_GELU=poly computes GELU's erf with Abramowitz & Stegun
    7.1.26 (|error| < 5e-7, within float32's 1e-4 target) instead of libdevice's erff: on the H200 the GELU of
    s12's fused MLP cost about as much as both its matmuls (s12's stage-1 MLP 0.57 ms, v2_s12's with StarReLU
    0.29). Untimed: a switch for the next A/B on a GPU, off by default."""
    if activation == "gelu" and settings.choice(GELU_ENV) == "poly":
        return 4
    return ACTIVATION_CODES[activation]


# ------------------------------------------------------------------------------------ availability


def interpreter_enabled() -> bool:
    """Whether POOLFORMER_TRITON_INTERPRET=1 lets the kernels run on CPU tensors (Triton's interpreter)."""
    return settings.flag(INTERPRET_ENV)


def unavailable_reason(dtype: torch.dtype, device: torch.device) -> str | None:
    """Why the Triton kernels cannot run `dtype` on `device` here, in one line; None when they can."""
    if device.type not in ("cuda", "cpu"):
        return f"the Triton kernels run on CUDA GPUs (and on the CPU in Triton's interpreter), not on {device.type}"
    if device.type == "cpu" and not interpreter_enabled():
        return (f"the Triton kernels run on CUDA GPUs; on the CPU only in Triton's interpreter "
                f"(set {INTERPRET_ENV}=1, for testing: it is very slow)")
    try:
        interprets = triton_interprets()
    except ImportError as err:
        return f"Triton is not importable ({err})"
    if device.type == "cpu" and not interprets:
        return (f"Triton was imported before {INTERPRET_ENV}=1 took effect (torch.compile imports it), so it "
                f"compiles instead of interpreting; set {INTERPRET_ENV}=1 before starting Python")
    if device.type == "cuda" and not interprets:
        major, minor = torch.cuda.get_device_capability(device)
        if dtype == torch.bfloat16 and major < 8:
            return f"bf16 Triton kernels need a GPU of compute capability 8.0 or newer, this one is {major}.{minor}"
    return None


def unsupported_model_reason(folded: FoldedModel, plan: Plan) -> str | None:
    """Why the kernels cannot run this folded model (shapes they do not cover); None when they can."""
    if plan.pool_size % 2 == 0:
        return f"the Triton token mixer needs an odd pool size, not {plan.pool_size}"
    for stage in folded.stages:
        for block in stage.blocks:
            channels = block.fc1_weight.shape[1]
            if channels < MIN_CHANNELS:
                return f"the Triton MLP kernel needs at least {MIN_CHANNELS} channels, not {channels}"
    return None


@contextlib.contextmanager
def _triton_interpret_env(interpret: bool) -> Iterator[None]:
    """TRITON_INTERPRET set to `interpret` for the duration (Triton reads it when it decorates a function)."""
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = previous


def _import_triton() -> ModuleType:
    """Triton, imported so that POOLFORMER_TRITON_INTERPRET=1 takes effect: Triton decides between compiling
    and interpreting when it decorates its own library, at its first import, so the switch must be seen before
    anything imports Triton (torch.compile does); after that the process's mode is fixed, and TRITON_INTERPRET=1
    stays set (parts of Triton imported later check it)."""
    if "triton" not in sys.modules and interpreter_enabled():
        os.environ["TRITON_INTERPRET"] = "1"
    import triton

    return triton


def triton_interprets() -> bool:
    """Whether this process's Triton runs kernels in its interpreter (fixed when Triton was first imported)."""
    return type(_import_triton().language.cdiv).__name__ == "InterpretedFunction"


def kernels() -> ModuleType:
    """The kernels, decorated in the same mode as Triton's own library (whatever TRITON_INTERPRET says now)."""
    if "poolformer.fast.triton_kernels" not in sys.modules:
        with _triton_interpret_env(triton_interprets()):
            from . import triton_kernels  # noqa: F401
    return sys.modules["poolformer.fast.triton_kernels"]


# ------------------------------------------------------------------------------------ prepared weights


# One folded block as the kernels take it: a FoldedBlock whose scales and biases are float32 [C] / [D] and whose
# fc weights are in the compute dtype and transposed, so that each kernel streams contiguous rows:
# fc1_weight [C, D], fc2_weight [D, C] (see `prepare`).
TritonBlock = FoldedBlock


@dataclass(frozen=True)
class TritonModel:
    """`folded` in the compute dtype (downsampling and head run as PyTorch operators), the blocks of each stage
    for the kernels, and the stem's weights as stem_kernel's [K_PAD, C0] matrix with its float32 bias."""

    folded: FoldedModel
    blocks: tuple[tuple[TritonBlock, ...], ...]
    stem_matrix: torch.Tensor | None = None
    stem_bias: torch.Tensor | None = None


STEM_BLOCK_K = 32  # stem_kernel's K step: 7 * 7 * 3 = 147 weights per output channel, padded to 160


def stem_matrix(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[C0, CIN, K, K] -> [K_PAD, C0]: row (ky * K + kx) * CIN + ci, zero rows up to a multiple of STEM_BLOCK_K."""
    out_channels = weight.shape[0]
    matrix = weight.permute(2, 3, 1, 0).reshape(-1, out_channels)
    padded = torch.zeros(cdiv(matrix.shape[0], STEM_BLOCK_K) * STEM_BLOCK_K, out_channels, dtype=matrix.dtype,
                         device=matrix.device)
    padded[:matrix.shape[0]] = matrix
    return padded.to(dtype).contiguous()


NORM_AFTER_FC1_MAX_CHANNELS = 384  # see norm_after_fc1
NORM_AFTER_FC1_ENV = "POOLFORMER_TRITON_NORM_AFTER_FC1"  # 1: apply the statistics after fc1 (off by default)


def norm_after_fc1(dtype: torch.dtype, channels: int | None = None) -> bool:
    """Whether the MLP kernel feeds fc1 the activation as stored and applies norm2's per-sample statistics to
    fc1's sums: fc1((x - mu) / sigma) = (x @ W1 - mu * colsum(W1)) / sigma. It skips rounding the normalised x
    to the dtype and keeps that copy out of registers. ptxas for sm_90a (benchmarks/triton_sm90.py, every
    candidate tile of s12 and m36) says where that pays: at C 96-384 the 64-row (wgmma) tiles spill less or not
    at all (s12 stage 2: 304 bytes to 0, stage 3: 432 to 128), at C 512 and 768 they spill more, so wider
    stages keep normalising first (channels None: whether the dtype allows it at all). In bf16/fp16 only: in
    float32 the subtraction after the matmul would lose digits when |mu| >> sigma, against the 1e-4 target.
    Fewer spills did not make it faster: timed on an H200 (benchmarks/results/gpu, autotuned tiles both ways),
    the fused MLP of s12's stages 1-2 took 7% longer with it than normalising first. So it is off unless
    POOLFORMER_TRITON_NORM_AFTER_FC1=1 is set before the model's first call (for the next A/B timing)."""
    if dtype not in (torch.bfloat16, torch.float16) or not settings.flag(NORM_AFTER_FC1_ENV):
        return False
    return channels is None or channels <= NORM_AFTER_FC1_MAX_CHANNELS


def prepare(folded: FoldedModel, dtype: torch.dtype, device: torch.device) -> TritonModel:
    """The float32 folded model converted for the kernels in `dtype` on `device`."""

    def vector(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(device=device, dtype=torch.float32).contiguous()

    def block(b: FoldedBlock) -> TritonBlock:
        fc1 = b.fc1_weight.t().to(device=device, dtype=dtype).contiguous()
        # bf16/fp16: the MLP kernel applies norm2's statistics after fc1 (see norm_after_fc1), which needs the
        # column sums of fc1's weights as the kernel multiplies them (already rounded to the dtype)
        colsum = fc1.float().sum(0).contiguous() if norm_after_fc1(dtype, fc1.shape[0]) else None
        bias_compute = None if b.fc1_bias is None else b.fc1_bias.to(device=device, dtype=dtype).contiguous()
        return replace(
            b, mix_scale=vector(b.mix_scale), skip_scale1=vector(b.skip_scale1),
            fc1_weight=fc1, fc1_bias=vector(b.fc1_bias), fc1_bias_compute=bias_compute,
            fc2_weight=b.fc2_weight.t().to(device=device, dtype=dtype).contiguous(), fc2_bias=vector(b.fc2_bias),
            skip_scale2=vector(b.skip_scale2), fc1_colsum=colsum)

    return TritonModel(folded.to(dtype, device), tuple(tuple(block(b) for b in s.blocks) for s in folded.stages),
                       stem_matrix(folded.stem_weight.to(device), dtype), vector(folded.stem_bias))


# ------------------------------------------------------------------------------------ launch configuration


def next_power_of_two(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class Partials:
    """Per-sample partial moments written by a kernel: buffer [slots, segs, 3] float32 of (count, mean, M2)
    for each slot of `slot_rows` consecutive rows and each sample it touches; `hw` rows per sample."""

    buffer: torch.Tensor
    slot_rows: int
    segs: int
    hw: int

    @property
    def max_slots(self) -> int:
        """A power of two >= the number of slots one sample's rows touch (the consumer's gather width)."""
        return next_power_of_two(cdiv(self.hw, self.slot_rows) + 1)


def slot_rows_for(hw: int, block_rows: int) -> int:
    """Rows per slot: the smallest multiple of block_rows such that one sample's rows touch at most
    MAX_SLOTS_PER_SAMPLE slots (large maps get longer slots, so consumers gather a bounded number)."""
    tiles = max(1, cdiv(cdiv(hw, MAX_SLOTS_PER_SAMPLE - 1), block_rows))
    return tiles * block_rows


def segments_for(slot_rows: int, hw: int) -> int:
    """A power of two >= the number of samples a slot of `slot_rows` rows can touch."""
    return max(2, next_power_of_two(cdiv(slot_rows - 1, hw) + 1))


def new_partials_shape(rows: int, hw: int, block_rows: int) -> tuple[int, int]:
    """(slots, segments per slot) of the partials a kernel with tiles of `block_rows` rows writes."""
    slot_rows = slot_rows_for(hw, block_rows)
    return cdiv(rows, slot_rows), segments_for(slot_rows, hw)


def new_partials(rows: int, hw: int, block_rows: int, device: torch.device) -> Partials:
    slots, segs = new_partials_shape(rows, hw, block_rows)
    buffer = torch.empty(slots, segs, 3, device=device, dtype=torch.float32)
    return Partials(buffer, slot_rows_for(hw, block_rows), segs, hw)


@dataclass(frozen=True)
class Tile:
    """Tile of the elementwise kernels (statistics, token mixer): rows per step, channels per step, warps, and
    whether the token mixer sums the statistics of slots inside one sample in registers (pool_mix_kernel's
    WHOLE_SLOTS)."""

    block_rows: int
    block_channels: int
    num_warps: int = 4
    whole_slots: bool = False


def elementwise_tile(rows: int, channels: int, interpret: bool = False) -> Tile:
    """32 rows x the largest power of two <= 64 dividing C (no masked lanes; else 64): 4-16 KB per load, small
    enough that neighbouring rows of the pooling window stay in L1/L2. Triton's interpreter pays per operation,
    not per element, so there the tiles are as large as possible."""
    if interpret:
        return Tile(min(128, max(16, next_power_of_two(rows))), min(512, next_power_of_two(channels)))
    for block in (64, 32, 16):
        if channels % block == 0:
            return Tile(32, block)
    return Tile(32, 64)


def channel_split(channels: int) -> tuple[int, int]:
    """C = CA + rest with CA the largest power of two <= C and the rest padded to a power of two (0 if none):
    320 -> (256, 64), 96 -> (64, 32), 512 -> (512, 0)."""
    high = 1 << (channels.bit_length() - 1)
    rest = channels - high
    return high, (max(MIN_CHANNELS, next_power_of_two(rest)) if rest else 0)


@dataclass(frozen=True)
class MlpConfig:
    """Tile of the fused MLP kernel: rows per tile, hidden columns per step, warps, software-pipeline stages."""

    block_rows: int
    block_hidden: int
    num_warps: int
    num_stages: int


SHARED_MEMORY_BUDGET_BYTES = 160 * 1024  # of an H100's 228 KB per SM, with room for the compiler's own buffers


def mlp_configs(rows: int, channels: int, hidden: int, dtype: torch.dtype, interpret: bool = False) -> list[MlpConfig]:
    """The fused kernel's candidate tiles, best first in the order the H200's autotuning gave
    (POOLFORMER_TRITON_AUTOTUNE=1 times them all; benchmarks/fast_gpu.py does). Each stage of the pipeline holds
    a [C, BLOCK_D] slice of fc1 and a [BLOCK_D, C] slice of fc2; the accumulator [BLOCK_R, C] stays in
    registers (<= ~128 float32 per thread)."""
    if interpret:  # the interpreter pays per operation: few, large steps
        return [MlpConfig(min(128, max(16, next_power_of_two(rows))), min(1024, next_power_of_two(hidden)), 4, 1)]
    width = sum(channel_split(channels))
    size = torch.tensor([], dtype=dtype).element_size()
    candidates = []
    # the order follows the H200's autotuning in bf16 (benchmarks/results/gpu, runs 3-4): up to 128 channels 32
    # hidden columns won at every batch; wider, 64 columns won or came within 4%; 16-row tiles won from 512
    # channels at batch 1 and 256, and below 1,024 rows (batch 1's stages 2-4). 16 columns won one shape, by 1%
    # (batch 1, C=320): left out of bf16/fp16, so autotuning compiles fewer tiles
    hidden_order = ((32, 64) if width <= 128 else (64, 32)) if size < 4 else (32, 16)
    for block_rows in ((16, 32, 64) if width >= 512 or rows < 1024 else (64, 32, 16)):
        if block_rows == 64 and rows < 64 * 132:  # fewer tiles than a GPU has SMs: shorter tiles, more programs
            continue
        warps = 8 if width * block_rows > 64 * 128 else 4
        for block_hidden in hidden_order:
            for stages in (3, 2, 1):
                staged = stages * 2 * width * block_hidden * size
                resident = block_rows * width * size + block_rows * block_hidden * size
                if staged + resident <= SHARED_MEMORY_BUDGET_BYTES:
                    candidates.append(MlpConfig(block_rows, block_hidden, warps, stages))
                    break
    return candidates or [MlpConfig(16, 16, 4, 1)]


@dataclass(frozen=True)
class SplitMlp:
    """The MLP's other form: `mlp_norm_kernel` (normalised x and the residual base in one pass over x), then fc1
    and fc2 as cuBLAS GEMMs with the activation between them, and `stats_kernel` on the output when the next
    block needs its statistics. The hidden tensor makes a round trip through memory, but the GEMMs run at
    cuBLAS's speed: on an H200 in bf16 at batch 256 (benchmarks/results/gpu) the fused kernel, whose row tiles
    are bounded by the [rows, C] accumulator it keeps in registers, took 2.5x (C=320) and 3.9x (C=512) as long
    as this form. The fields are the normalising kernel's tile."""

    block_rows: int
    block_channels: int
    num_warps: int = 4


@dataclass(frozen=True)
class GemmMlp:
    """The MLP's third form: fc1 and fc2 as two Triton GEMMs (`fc1_kernel`, `fc2_kernel`) that carry the
    elementwise work in their prologue and epilogues. fc1 normalises its A tiles as it loads them and applies
    bias and activation to its sums; fc2 adds the residual skip * x + b2 to its sums. Like SplitMlp the hidden
    tensor goes through memory (ordinary GEMM tiles, not the fused kernel's [rows, C] accumulator), but the
    normalising pass, the activation's pass and the residual base are gone: 2-3 launches instead of 5, and on
    s12's stage 3 about half the memory traffic per block (387 against 740 MB at batch 256 in bf16). The
    output's statistics come from fc2's epilogue where one column tile covers all channels (see
    gemm_stats_in_epilogue), else from `stats_kernel`. The fields are both GEMMs' tile (each GEMM clips its
    columns and K steps to its own shape: see gemm_tile_for). Untimed on a GPU when added: a candidate for
    autotuning, after the measured forms."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


GEMM_STATS_BLOCK_ROWS = 32  # stats_kernel's rows per step after fc2, where its epilogue cannot write them


def gemm_stats_in_epilogue(tile: GemmMlp, hw: int, channels: int, hidden: int) -> bool:
    """Whether fc2's epilogue writes the output's partials (a slot per row tile): when one column tile holds
    every channel (s12's stages 1-2) and a sample spans few enough row tiles for the consumer's gather."""
    return (gemm_tile_for(tile, channels, hidden)[0] >= channels
            and cdiv(hw, tile.block_m) + 1 <= MAX_SLOTS_PER_SAMPLE)


def gemm_partials_rows(tile: GemmMlp, hw: int, channels: int, hidden: int) -> int:
    """The block_rows that size the GEMM form's output partials (new_partials_shape's argument): the row tile
    when fc2's epilogue writes them, stats_kernel's tile otherwise."""
    return tile.block_m if gemm_stats_in_epilogue(tile, hw, channels, hidden) else GEMM_STATS_BLOCK_ROWS


def gemm_tile_for(tile: GemmMlp, columns: int, depth: int) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_K) of one of the GEMM form's matmuls, [rows, depth] @ [depth, columns]: the tile's
    columns clipped to the output's width and, where a power of two >= 32 divides it, to that divisor (C = 320
    takes 64-column tiles: no masked lanes), and K steps no longer than the depth (>= 16, tl.dot's minimum)."""
    block_n = min(tile.block_n, max(MIN_CHANNELS, next_power_of_two(columns)))
    divisor = next((n for n in (256, 128, 64, 32) if n <= block_n and columns % n == 0), None)
    return (divisor or block_n), min(tile.block_k, max(MIN_CHANNELS, next_power_of_two(depth)))


def gemm_configs(rows: int, channels: int, hidden: int, dtype: torch.dtype,
                 interpret: bool = False) -> list[GemmMlp]:
    """The GEMM form's candidate tiles. bf16/fp16: tensor-core tiles of 64-128 rows (wgmma wants 64-row
    multiples per warp group) with 3-4 pipeline stages, within the shared-memory budget. ptxas for sm_90a
    (benchmarks/triton_sm90.py --all-tiles: s12, v2_s12 and m36 at batch 256, Triton 3.6 as on the H200) puts
    every one of them on wgmma without spills (fc1 136-202 registers, fc2 48-170 with the statistics in its
    epilogue); a 128 x 256 fc1 tile spilled 96-100 bytes in its GELU epilogue (Triton 3.8), so it is not
    offered. float32 (exact: FMA, no TF32): smaller tiles. The interpreter: one large tile (it pays per
    operation)."""
    if interpret:
        return [GemmMlp(min(128, max(16, next_power_of_two(rows))), min(1024, next_power_of_two(hidden)),
                        min(1024, next_power_of_two(hidden)), 4, 1)]
    size = torch.tensor([], dtype=dtype).element_size()
    if size < 4:
        tiles = [GemmMlp(128, 128, 64, 8, 3), GemmMlp(128, 64, 64, 4, 4), GemmMlp(64, 128, 64, 4, 4)]
        if rows < 128 * 132:  # fewer row tiles than SMs (batch 1): shorter tiles first
            tiles = tiles[2:] + tiles[:2]
    else:
        tiles = [GemmMlp(64, 64, 32, 4, 2), GemmMlp(32, 64, 32, 4, 2)]
    return [t for t in tiles
            if t.num_stages * (t.block_m * t.block_k + t.block_k * t.block_n) * size <= SHARED_MEMORY_BUDGET_BYTES]


MLP_ENV = "POOLFORMER_TRITON_MLP"  # fused | split | gemm | auto (the default): which MLP forms are candidates
SPLIT_FIRST_MIN_CHANNELS = 256  # in bf16/fp16 on a GPU the split form goes first from this width (see SplitMlp)
SPLIT_FIRST_MIN_ROWS = 64 * 132  # ... and from this many rows: at batch 1 (196 rows at C=320) the fused kernel won


MLP_FORMS = tuple(f for f in settings.SETTINGS[MLP_ENV].choices if f != "auto")  # ("fused", "split", "gemm")


def mlp_form_setting() -> str:
    """POOLFORMER_TRITON_MLP: one of MLP_FORMS, or "auto" (also when unset). Anything else is a ConfigError: an
    A/B timing that silently ran the default forms would measure the wrong thing."""
    return settings.choice(MLP_ENV)


def split_mlp_exact(dtype: torch.dtype) -> bool:
    """cuBLAS keeps float32 exact only without TF32 (torch's "highest" float32 matmul precision)."""
    return dtype != torch.float32 or torch.get_float32_matmul_precision() == "highest"


def mlp_candidates(rows: int, channels: int, hidden: int, dtype: torch.dtype,
                   interpret: bool = False) -> list[MlpConfig | SplitMlp | GemmMlp]:
    """The forms of the MLP, best first by design: the split form first in bf16/fp16 on a GPU from
    SPLIT_FIRST_MIN_CHANNELS channels and SPLIT_FIRST_MIN_ROWS rows, else the fused tiles first; the GEMM form's
    tiles last (not yet timed on a GPU: autotuning decides). POOLFORMER_TRITON_MLP=fused, =split or =gemm keeps
    one form only (for A/B timing and tests). In Triton's interpreter only the fused form unless one is asked
    for; in float32 where cuBLAS would use TF32, no split form."""
    fused = mlp_configs(rows, channels, hidden, dtype, interpret)
    tile = elementwise_tile(rows, channels, interpret)
    split = [SplitMlp(tile.block_rows, tile.block_channels, tile.num_warps)]
    gemm = gemm_configs(rows, channels, hidden, dtype, interpret)
    setting = mlp_form_setting()
    if setting != "auto":
        return {"fused": fused, "split": split, "gemm": gemm}[setting]
    if interpret:
        return fused
    if not split_mlp_exact(dtype):
        return fused + gemm
    if dtype != torch.float32 and channels >= SPLIT_FIRST_MIN_CHANNELS and rows >= SPLIT_FIRST_MIN_ROWS:
        return split + fused + gemm
    return fused + split + gemm


# ------------------------------------------------------------------------------------ traffic records


@dataclass(frozen=True)
class KernelTraffic:
    """Bytes one kernel (or PyTorch operator) reads and writes, each tensor it touches counted once."""

    name: str
    read_bytes: int
    write_bytes: int


_traffic_log: list[KernelTraffic] | None = None


@contextlib.contextmanager
def record_traffic() -> Iterator[list[KernelTraffic]]:
    """Within this context every forward on the Triton backend lists its kernels' traffic (for the roofline
    and its tests)."""
    global _traffic_log
    previous, _traffic_log = _traffic_log, []
    try:
        yield _traffic_log
    finally:
        _traffic_log = previous


@dataclass(frozen=True)
class LaunchMark:
    """One kernel (or PyTorch operator) of a timed forward: its name, stage (0 = stem, then 1-4, None = head),
    the multiply-add FLOPs it does (2 per MAC; 0 where not counted), and the mark recorded right after it was
    launched (a CUDA event on a GPU, time.perf_counter() seconds on a CPU)."""

    name: str
    stage: int | None
    flops: int
    mark: Any


_timing_log: list[LaunchMark] | None = None
_stage_index: int | None = 0


def _mark(device: torch.device) -> Any:
    if device.type == "cuda":
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event
    return time.perf_counter()


@contextlib.contextmanager
def mark_launches(device: torch.device) -> Iterator[list[LaunchMark]]:
    """Within this context every forward on the Triton backend lists a LaunchMark per kernel, after a first
    mark named "start": on a GPU the time between two marks is the GPU time of the launch between them, as long
    as the host stays ahead of the GPU (poolformer.fast.roofline.time_kernels sees to that)."""
    global _timing_log
    previous, _timing_log = _timing_log, [LaunchMark("start", None, 0, _mark(torch.device(device)))]
    try:
        yield _timing_log
    finally:
        _timing_log = previous


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _record(name: str, reads, writes, flops: int = 0) -> None:
    if _traffic_log is not None:
        _traffic_log.append(KernelTraffic(name, _nbytes(reads), _nbytes(writes)))
    if _timing_log is not None:
        _timing_log.append(LaunchMark(name, _stage_index, flops, _mark(writes[0].device)))


# ------------------------------------------------------------------------------------ launches


def stage_input_stats(x: torch.Tensor, tile: Tile | None = None) -> Partials:
    """Partials of a contiguous [B, H, W, C] activation."""
    batch, height, width, channels = x.shape
    rows = batch * height * width
    return _partials_of(x, tile or elementwise_tile(rows, channels, triton_interprets()), "stats")


def _partials_of(x: torch.Tensor, tile: Tile, name: str) -> Partials:
    batch, height, width, channels = x.shape
    rows = batch * height * width
    out = new_partials(rows, height * width, tile.block_rows, x.device)
    kernels().stats_kernel[(out.buffer.shape[0],)](
        x, out.buffer, rows, height * width, channels, out.slot_rows,
        BLOCK_R=tile.block_rows, BLOCK_C=tile.block_channels, SEGS=out.segs, num_warps=tile.num_warps)
    _record(name, [x], [out.buffer])
    return out


def elementwise_tiles(rows: int, channels: int, interpret: bool = False) -> list[Tile]:
    """The token mixer's candidate tiles, the design-time one first, for autotuning. ptxas for sm_90a with
    Triton 3.6 (the H200's) gives the default 32 x 64 tile 201 registers at 4 warps and 115 at 8: twice the
    warps per SM for a kernel that waits on memory. Which is faster is the GPU's to say. The last two sum a
    one-sample slot's statistics in registers (WHOLE_SLOTS): in the PTX for sm_90a their loop over tiles has
    no barrier, against 6 (16-row tiles) or 9 (32-row) per tile the other way, for 9 once per slot. Untimed
    when added: the H200 ran the token mixer at 0.8-1.1 TB/s in run 4."""
    first = elementwise_tile(rows, channels, interpret)
    if interpret:
        return [first]
    others = [Tile(first.block_rows, first.block_channels, 8), Tile(16, first.block_channels, 4),
              Tile(64, first.block_channels, 8), Tile(16, first.block_channels, 4, whole_slots=True),
              Tile(32, first.block_channels, 8, whole_slots=True)]
    return [first] + [t for t in others if t != first]


_working_pool_tile: dict[tuple, Tile] = {}  # (rows, H, W, C, pool, dtype, device) -> the tile in use


def pool_mix(x: torch.Tensor, stats: Partials, block: TritonBlock, pool_size: int,
             tile: Tile | None = None) -> tuple[torch.Tensor, Partials]:
    """The token mixer on a contiguous [B, H, W, C] activation -> (x1 [B, H, W, C], x1's partials). Without
    `tile`: the design-time tile, or with autotuning on the fastest of `elementwise_tiles` (kept in the tile
    cache like the MLP's; a tile from the cache is used without timing)."""
    batch, height, width, channels = x.shape
    rows = batch * height * width
    if tile is not None:
        return _launch_pool_mix(x, stats, block, pool_size, tile)
    return _run_with_tile(
        _working_pool_tile, (rows, height, width, channels, pool_size, x.dtype, x.device),
        (f"pool_mix {pool_size}x{pool_size}", rows, channels, None, x.dtype, x.device),
        lambda: elementwise_tiles(rows, channels, triton_interprets()),
        lambda t: _launch_pool_mix(x, stats, block, pool_size, t), f"token-mixer tile fits this GPU for C={channels}")


def _launch_pool_mix(x: torch.Tensor, stats: Partials, block: TritonBlock, pool_size: int,
                     tile: Tile) -> tuple[torch.Tensor, Partials]:
    batch, height, width, channels = x.shape
    rows = batch * height * width
    y = torch.empty_like(x)
    out = new_partials(rows, height * width, tile.block_rows, x.device)
    skip = block.skip_scale1
    kernels().pool_mix_kernel[(out.buffer.shape[0],)](
        x, y, stats.buffer, out.buffer, block.mix_scale, skip if skip is not None else block.mix_scale,
        rows, height, width, channels, out.slot_rows, stats.slot_rows, block.norm1_eps,
        POOL=pool_size, HAS_SKIP=skip is not None, BLOCK_R=tile.block_rows, BLOCK_C=tile.block_channels,
        SEGS=out.segs, IN_SEGS=stats.segs, IN_MAX_SLOTS=stats.max_slots, WHOLE_SLOTS=tile.whole_slots,
        num_warps=tile.num_warps)
    _record("pool_mix", [x, stats.buffer, block.mix_scale, skip], [y, out.buffer])
    return y, out


_working_mlp_config: dict[tuple, MlpConfig | SplitMlp] = {}  # (rows, C, D, dtype, device) -> the form in use
AUTOTUNE_ENV = "POOLFORMER_TRITON_AUTOTUNE"
AUTOTUNE_REPEATS = 5


def autotune_enabled() -> bool:
    """POOLFORMER_TRITON_AUTOTUNE=1: time every candidate tile of the MLP kernel on the first call of each shape
    (a few seconds of compiling per shape) instead of taking the first that compiles."""
    return settings.flag(AUTOTUNE_ENV)


TILE_CACHE_ENV = "POOLFORMER_TRITON_TILE_CACHE"


def tile_cache_path() -> Path | None:
    """Where autotuned MLP tiles are kept between processes: POOLFORMER_TRITON_TILE_CACHE (a JSON file; 0 turns
    the cache off), else $XDG_CACHE_HOME/poolformer/triton_tiles.json (~/.cache when unset)."""
    return settings.path(TILE_CACHE_ENV, settings.default_tile_cache())


def _tile_cache_key(kind: str, rows: int, channels: int, hidden: int | None, dtype: torch.dtype,
                    device: torch.device) -> str:
    """The kernel, the GPU (by name), Triton's version and the shape: a tile timed on one of them says nothing of
    another."""
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton's interpreter)"
    return (f"{kind} | {gpu} | triton {_import_triton().__version__} | {str(dtype).replace('torch.', '')} | "
            f"rows {rows} C {channels}" + (f" D {hidden}" if hidden is not None else ""))


def _read_tile_cache(path: Path) -> dict[str, dict]:
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # none yet, unreadable or corrupt: tiles are a speed hint, never a reason to fail
    return entries if isinstance(entries, dict) else {}


def cached_tile(key: str, kinds: tuple[type, ...]):
    """The tile (one of `kinds`: MlpConfig, SplitMlp, Tile) an earlier autotuned run chose for `key`, if the
    cache holds a valid one; an entry names its kind (entries without one are of the first kind)."""
    path = tile_cache_path()
    entry = _read_tile_cache(path).get(key) if path is not None else None
    if not isinstance(entry, dict):
        return None
    fields = dict(entry)
    name = fields.pop("kind", kinds[0].__name__)
    kind = next((k for k in kinds if k.__name__ == name), None)
    try:
        return kind(**fields) if kind is not None else None
    except TypeError:
        return None


def remember_tile(key: str, tile: MlpConfig | SplitMlp | Tile) -> None:
    """Add an autotuned tile to the cache (read, merged, renamed over the old file). A cache that cannot be
    written is skipped: the tile still serves this process."""
    path = tile_cache_path()
    if path is None:
        return
    entries = {**_read_tile_cache(path), key: {"kind": type(tile).__name__, **asdict(tile)}}

    def write(tmp: str) -> None:
        Path(tmp).write_text(json.dumps(entries, indent=1, sort_keys=True), encoding="utf-8")

    with contextlib.suppress(OSError):
        replace_atomically(path, write)


def mlp(x1: torch.Tensor, stats: Partials, block: TritonBlock, activation: str, emit_stats: bool,
        config: MlpConfig | SplitMlp | GemmMlp | None = None) -> tuple[torch.Tensor, Partials | None]:
    """The block's second half on a contiguous [B, H, W, C] activation -> (y [B, H, W, C], y's partials or
    None). Without `config`, the first candidate of `mlp_candidates` (a fused tile, the split form or a
    GEMM-form tile) that the GPU accepts (shared memory, registers) is used and remembered - or, with
    autotuning on, the fastest of them, which is also kept in the tile cache (tile_cache_path), so that later
    processes on the same GPU start from it without timing."""
    batch, height, width, channels = x1.shape
    rows, hidden = batch * height * width, block.fc1_weight.shape[1]

    def launch(form: MlpConfig | SplitMlp | GemmMlp):
        form_launch = {SplitMlp: _launch_split_mlp, GemmMlp: _launch_gemm_mlp}.get(type(form), _launch_mlp)
        return form_launch(x1, stats, block, activation, emit_stats, form)

    if config is not None:
        return launch(config)
    return _run_with_tile(
        _working_mlp_config, (rows, channels, hidden, x1.dtype, x1.device),
        ("mlp", rows, channels, hidden, x1.dtype, x1.device),
        lambda: mlp_candidates(rows, channels, hidden, x1.dtype, triton_interprets()), launch,
        f"MLP tile fits this GPU for C={channels}, D={hidden}")


def _run_with_tile(working: dict, key: tuple, cache_key: tuple, candidates: Callable[[], list],
                   launch: Callable[[Any], Any], what: str):
    """launch(tile) with the shape's tile, the one mechanism of both kernels: the tile already in use for `key`
    in this process; else, with autotuning on, the fastest of `candidates()` (kept in the tile cache under
    _tile_cache_key(*cache_key)); else the cache's tile ahead of the design-time order. A tile the compiler
    refuses (out of resources) gives way to the next; the one that ran is remembered for `key`."""
    if key in working:
        order = [working[key]]
    else:
        cache_name, tiles = _tile_cache_key(*cache_key), candidates()  # first call of the shape only
        if autotune_enabled():
            order = [_fastest(tiles, launch, cache_key[-1], what, log_key=cache_name)]
            remember_tile(cache_name, order[0])
        else:
            cached = cached_tile(cache_name, tuple(dict.fromkeys(type(t) for t in tiles)))
            order = ([cached] if cached is not None else []) + [t for t in tiles if t != cached]
    for index, tile in enumerate(order):
        try:
            result = launch(tile)
        except Exception as err:  # only the compiler's "out of resource" moves on to the next tile
            if not _out_of_resources(err) or index == len(order) - 1:
                raise
            continue
        working[key] = tile
        return result
    raise AssertionError("unreachable")


def pool_tiles_in_use() -> list[dict]:
    """The token mixer's tile in use for each shape run so far in this process (see mlp_tiles_in_use)."""
    return [{"rows": rows, "height": height, "width": width, "channels": channels, "pool": pool,
             "dtype": str(dtype).replace("torch.", ""), "device": str(device), **asdict(tile)}
            for (rows, height, width, channels, pool, dtype, device), tile in _working_pool_tile.items()]


def mlp_tiles_in_use() -> list[dict]:
    """The MLP tile in use for each shape run so far in this process (the autotuned one where autotuning was on):
    what a GPU run records, so the design-time order of `mlp_configs` can follow what won."""
    return [{"rows": rows, "channels": channels, "hidden": hidden, "dtype": str(dtype).replace("torch.", ""),
             "device": str(device), "kind": type(tile).__name__, **asdict(tile)}
            for (rows, channels, hidden, dtype, device), tile in _working_mlp_config.items()]


def _out_of_resources(err: Exception) -> bool:
    """Triton's compile-time refusal of a tile (too much shared memory or too many registers for this GPU)."""
    return type(err).__name__ == "OutOfResources"


_autotune_log: dict[str, dict[str, float | None]] = {}  # tile cache key -> each candidate's median ms (None: refused)


def autotune_timings() -> dict[str, dict[str, float | None]]:
    """Every candidate tile timed so far in this process, per shape: what a GPU run records, so the design-time
    order can follow the measurements (None: the compiler refused the tile)."""
    return {key: dict(timings) for key, timings in _autotune_log.items()}


def median_ms(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    """The median of `repeats` timings of fn() in milliseconds, each call on its own: between two CUDA events,
    waited for before the next call, on a GPU; host clocks elsewhere."""
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            started = time.perf_counter()
            fn()
            times.append((time.perf_counter() - started) * 1e3)
    return sorted(times)[len(times) // 2]


def _fastest(candidates: list, launch: Callable[[Any], Any], device: torch.device, what: str,
             log_key: str | None = None):
    """The candidate with the lowest median time over AUTOTUNE_REPEATS launches (after one that compiles it);
    candidates the GPU refuses (out of resources) are skipped. `what` ends the error when none fits: "no {what}".
    With log_key, every candidate's time is kept for autotune_timings()."""
    timings = {}
    log = _autotune_log.setdefault(log_key, {}) if log_key is not None else {}
    for candidate in candidates:
        try:
            launch(candidate)
        except Exception as err:
            if not _out_of_resources(err):
                raise
            log[_tile_name(candidate)] = None
            continue
        timings[candidate] = log[_tile_name(candidate)] = median_ms(lambda: launch(candidate), device,
                                                                    AUTOTUNE_REPEATS)
    if not timings:
        raise RuntimeError(f"no {what}")
    return min(timings, key=timings.get)


def _tile_name(tile: MlpConfig | SplitMlp | GemmMlp | Tile) -> str:
    form = {SplitMlp: "split ", GemmMlp: "gemm "}.get(type(tile), "")
    return form + " ".join(f"{k}={v}" for k, v in asdict(tile).items())


def in_use_mlp_form(rows: int, channels: int, hidden: int,
                    dtype: torch.dtype) -> MlpConfig | SplitMlp | GemmMlp | None:
    """The MLP form this process runs for that shape and dtype (on any device), if it ran one yet."""
    return next((tile for (r, c, d, t, _), tile in _working_mlp_config.items() if (r, c, d, t) == (
        rows, channels, hidden, dtype)), None)


ACTIVATION_BLOCK = 4096


def _apply_activation(h: torch.Tensor, activation: str) -> torch.Tensor:
    """The activation of the split form, on fc1's output, in one pass: PyTorch's own kernels where one op does
    it (GELU, ReLU, SiLU), `activation_kernel` in place for StarReLU's relu(h)^2 (two in-place passes in
    PyTorch; they took 0.78 ms of poolformerv2_s12's 5.36 on an H200)."""
    if activation == "gelu":
        return F.gelu(h)
    if activation == "relu":
        return h.relu_()
    if activation == "silu":
        return F.silu(h, inplace=True)
    kernels().activation_kernel[(cdiv(h.numel(), ACTIVATION_BLOCK),)](
        h, h.numel(), ACT=ACTIVATION_CODES[activation], BLOCK=ACTIVATION_BLOCK, num_warps=4)
    return h


def _launch_split_mlp(x1, stats, block, activation, emit_stats, split: SplitMlp):
    batch, height, width, channels = x1.shape
    rows, hidden, hw = batch * height * width, block.fc1_weight.shape[1], height * width
    slots, segs = new_partials_shape(rows, hw, split.block_rows)
    x = x1.view(rows, channels)
    normed = torch.empty_like(x)
    write_base = block.skip_scale2 is not None or block.fc2_bias is not None
    base = torch.empty_like(x) if write_base else x
    placeholder = block.mix_scale
    kernels().mlp_norm_kernel[(slots,)](
        x, normed, base, stats.buffer, block.skip_scale2 if block.skip_scale2 is not None else placeholder,
        block.fc2_bias if block.fc2_bias is not None else placeholder, rows, hw, channels,
        slot_rows_for(hw, split.block_rows), stats.slot_rows, block.norm2_eps, BLOCK_R=split.block_rows,
        BLOCK_C=split.block_channels, SEGS=segs, IN_SEGS=stats.segs, IN_MAX_SLOTS=stats.max_slots,
        HAS_SKIP=block.skip_scale2 is not None, HAS_B2=block.fc2_bias is not None, WRITE_BASE=write_base,
        num_warps=split.num_warps)
    _record("mlp norm", [x, stats.buffer, block.skip_scale2, block.fc2_bias], [normed] + ([base] if write_base else []))
    if block.fc1_bias_compute is not None:
        h = torch.addmm(block.fc1_bias_compute, normed, block.fc1_weight)
    else:
        h = normed @ block.fc1_weight
    _record("fc1", [normed, block.fc1_weight, block.fc1_bias_compute], [h], flops=2 * rows * channels * hidden)
    h = _apply_activation(h, activation)
    _record("act", [h], [h])
    y = torch.addmm(base, h, block.fc2_weight)
    _record("fc2", [h, block.fc2_weight, base], [y], flops=2 * rows * channels * hidden)
    y = y.view(batch, height, width, channels)
    if not emit_stats:
        return y, None
    return y, _partials_of(y, Tile(split.block_rows, split.block_channels, split.num_warps), "mlp stats")


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision for operands of `dtype`: "ieee" keeps float32 exact (no TF32); bf16/fp16
    ignore it."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _launch_gemm_mlp(x1, stats, block, activation, emit_stats, tile: GemmMlp):
    batch, height, width, channels = x1.shape
    rows, hidden, hw = batch * height * width, block.fc1_weight.shape[1], height * width
    x = x1.view(rows, channels)
    placeholder = block.mix_scale  # a valid pointer for arguments a constexpr switches off
    precision, upcast = dot_precision(x1.dtype), triton_interprets()
    block_n, block_k = gemm_tile_for(tile, hidden, channels)
    h = torch.empty(rows, hidden, device=x1.device, dtype=x1.dtype)
    kernels().fc1_kernel[(cdiv(rows, tile.block_m) * cdiv(hidden, block_n),)](
        x, block.fc1_weight, block.fc1_bias if block.fc1_bias is not None else placeholder, h, stats.buffer,
        rows, hw, channels, hidden, stats.slot_rows, block.norm2_eps,
        BLOCK_M=tile.block_m, BLOCK_N=block_n, BLOCK_K=block_k, SEGS=segments_for(tile.block_m, hw),
        IN_SEGS=stats.segs, IN_MAX_SLOTS=stats.max_slots, ACT=fused_activation_code(activation),
        HAS_B1=block.fc1_bias is not None, PRECISION=precision, DOT_UPCAST=upcast,
        num_warps=tile.num_warps, num_stages=tile.num_stages)
    _record("fc1 norm act", [x, stats.buffer, block.fc1_weight, block.fc1_bias], [h],
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
    _record("fc2 residual", [h, block.fc2_weight, x, block.skip_scale2, block.fc2_bias],
            [y] + ([out.buffer] if out is not None else []), flops=2 * rows * channels * hidden)
    if not emit_stats or out is not None:
        return y, out
    stats_tile = Tile(GEMM_STATS_BLOCK_ROWS, elementwise_tile(rows, channels).block_channels)
    return y, _partials_of(y, stats_tile, "mlp stats")


def _launch_mlp(x1, stats, block, activation, emit_stats, config: MlpConfig):
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
        x1, y, stats.buffer, out.buffer, block.fc1_weight,
        block.fc1_bias if block.fc1_bias is not None else placeholder,
        colsum if colsum is not None else placeholder, block.fc2_weight,
        block.fc2_bias if block.fc2_bias is not None else placeholder,
        block.skip_scale2 if block.skip_scale2 is not None else placeholder,
        rows, height * width, channels, hidden, out.slot_rows, stats.slot_rows, block.norm2_eps,
        CA=part_a, CB=part_b, BLOCK_R=config.block_rows, BLOCK_D=config.block_hidden, SEGS=out.segs,
        IN_SEGS=stats.segs, IN_MAX_SLOTS=stats.max_slots, ACT=fused_activation_code(activation),
        HAS_B1=block.fc1_bias is not None, HAS_B2=block.fc2_bias is not None,
        HAS_SKIP=block.skip_scale2 is not None, EMIT_STATS=emit_stats, NORM_AFTER_FC1=colsum is not None,
        PRECISION=dot_precision(x1.dtype), DOT_UPCAST=triton_interprets(),
        num_warps=config.num_warps, num_stages=config.num_stages)
    _record("mlp", [x1, stats.buffer, block.fc1_weight, block.fc1_bias, colsum, block.fc2_weight, block.fc2_bias,
                    block.skip_scale2], [y] + ([out.buffer] if emit_stats else []), flops=4 * rows * channels * hidden)
    return y, (out if emit_stats else None)


# ------------------------------------------------------------------------------------ the model


def _conv(name: str, x: torch.Tensor, weight: torch.Tensor, bias, stride: int, padding: int) -> torch.Tensor:
    """A downsampling convolution on cuDNN; in float32 without TF32 (cuDNN's default allows it for
    convolutions, which would cost the float32 path its 1e-4 exactness)."""
    previous = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = previous and x.dtype != torch.float32
    try:
        out = cpu.conv_channels_last(x, weight, bias, stride, padding)
    finally:
        torch.backends.cudnn.allow_tf32 = previous
    _record(name, [x, weight, bias], [out], flops=2 * (out.numel() // weight.shape[0]) * weight.numel())
    return out


LAYER_NORM_ELEMENTS = 4096  # per program of layer_norm_kernel: 16-64 rows of C = 256-64


def _layer_norm(name: str, x: torch.Tensor, weight, eps: float) -> torch.Tensor:
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
    _record(name, [x, weight], [out])
    return out


STEM_STRIDE, STEM_PADDING = 4, 2
STEM_BLOCK_M = 128


def stem(x: torch.Tensor, matrix: torch.Tensor, bias: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Images [B, 3, H, W] (any strides, any float dtype) -> the stem's output [B, H/4, W/4, C0] channels-last in
    the compute dtype (matrix's: see stem_matrix; bias float32), on stem_kernel: the input is read once as it
    is, with no conversion pass."""
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
    _record("stem", [x, matrix, bias], [y],
            flops=2 * rows * out_channels * in_channels * kernel_size * kernel_size)
    return y


def features_forward(images: torch.Tensor, model: TritonModel, plan: Plan) -> torch.Tensor:
    """Images [B, 3, H, W] (any layout and float dtype: the stem kernel reads them as they are) -> last map
    [B, H/32, W/32, C] (contiguous) in the compute dtype."""
    global _stage_index
    folded = model.folded
    _stage_index = 0
    x = stem(images, model.stem_matrix, model.stem_bias, folded.stem_weight.shape[-1])
    if folded.stem_norm_weight is not None:
        x = _layer_norm("stem_norm", x, folded.stem_norm_weight, plan.stem_norm_eps)
    for _stage_index, (stage, blocks) in enumerate(zip(folded.stages, model.blocks), start=1):
        if stage.down_weight is not None:
            if plan.down_norm_eps is not None:
                x = _layer_norm("down_norm", x, None, plan.down_norm_eps)
            x = _conv("down", x, stage.down_weight, stage.down_bias, stride=2, padding=1)
        if not blocks:
            continue
        x = x.contiguous()
        stats = stage_input_stats(x)
        for index, block in enumerate(blocks):
            x1, mixed_stats = pool_mix(x, stats, block, plan.pool_size)
            x, stats = mlp(x1, mixed_stats, block, plan.activation, emit_stats=index < len(blocks) - 1)
    return x


def head_forward(x: torch.Tensor, model: TritonModel, plan: Plan) -> torch.Tensor:
    """Last map [B, H, W, C] -> float32 logits (PyTorch operators; see poolformer.fast.cpu.head_forward)."""
    global _stage_index
    logits = cpu.head_forward(x, model.folded, plan)
    _stage_index = None
    _record("head", [x, model.folded.head_weight, model.folded.head_bias], [logits],
            flops=2 * logits.shape[0] * model.folded.head_weight.numel())
    return logits
