"""Launch geometry of the Triton kernels: the per-sample partial moments the kernels pass along, the tiles of
the token mixer and of the MLP's three forms (`MlpConfig` fused, `SplitMlp`, `GemmMlp`), and each kernel's
candidate tiles in their design-time order (what runs first without autotuning).

The design-time order follows what won an H200's autotuning (benchmarks/results/gpu/); where a rule depends on
the GPU's size it takes the multiprocessor count (`sm_count`) of the device it launches on.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Union

import torch

from ... import settings

MIN_CHANNELS = 16  # tl.dot needs every block dimension >= 16
MAX_SLOTS_PER_SAMPLE = 64  # producers size their slots so one sample's partials fit one gather in the consumer
SHARED_MEMORY_BUDGET_BYTES = 160 * 1024  # of an H100's 228 KB per SM, with room for the compiler's own buffers


def next_power_of_two(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ------------------------------------------------------------------------------------ partial moments


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


# ------------------------------------------------------------------------------------ elementwise tiles


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


def elementwise_tiles(rows: int, channels: int, interpret: bool = False) -> list[Tile]:
    """The token mixer's candidate tiles, the design-time one first, for autotuning: 8 warps (fewer registers
    per thread, more warps per SM for a kernel that waits on memory), 16 and 64 rows, and two that sum a
    one-sample slot's statistics in registers (WHOLE_SLOTS: no barrier in their loop over tiles; ptxas's view in
    benchmarks/results/gpu/triton_sm90_triton36_all_tiles.md). Which is fastest is the GPU's to say."""
    first = elementwise_tile(rows, channels, interpret)
    if interpret:
        return [first]
    others = [Tile(first.block_rows, first.block_channels, 8), Tile(16, first.block_channels, 4),
              Tile(64, first.block_channels, 8), Tile(16, first.block_channels, 4, whole_slots=True),
              Tile(32, first.block_channels, 8, whole_slots=True)]
    return [first] + [t for t in others if t != first]


# ------------------------------------------------------------------------------------ the MLP's forms


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


@dataclass(frozen=True)
class SplitMlp:
    """The MLP's second form: `mlp_norm_kernel` (normalised x and the residual base in one pass over x), then
    fc1 and fc2 as cuBLAS GEMMs with the activation between them, and `stats_kernel` on the output when the next
    block needs its statistics. The hidden tensor makes a round trip through memory, but the GEMMs run at
    cuBLAS's speed, where the fused kernel, whose row tiles are bounded by the [rows, C] accumulator it keeps in
    registers, re-reads the weights for every few rows (wide stages: benchmarks/results/gpu/README.md). The
    fields are the normalising kernel's tile."""

    block_rows: int
    block_channels: int
    num_warps: int = 4


@dataclass(frozen=True)
class GemmMlp:
    """The MLP's third form: fc1 and fc2 as two Triton GEMMs (`fc1_kernel`, `fc2_kernel`) that carry the
    elementwise work in their prologue and epilogues. fc1 normalises its A tiles as it loads them and applies
    bias and activation to its sums; fc2 adds the residual skip * x + b2 to its sums. Like SplitMlp the hidden
    tensor goes through memory, but the normalising pass, the activation's pass and the residual base are gone:
    2-3 launches instead of 5, and about half the split form's traffic per block. The output's statistics come
    from fc2's epilogue where one column tile covers all channels (see gemm_stats_in_epilogue), else from
    `stats_kernel`. The fields are both GEMMs' tile (each GEMM clips its columns and K steps to its own shape:
    see gemm_tile_for)."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


MlpForm = Union[MlpConfig, SplitMlp, GemmMlp]  # one form of the MLP with its tile


def tile_name(tile: MlpForm | Tile) -> str:
    """A tile in words, its form first ("split ", "gemm ", nothing for a fused tile or the token mixer's)."""
    form = {SplitMlp: "split ", GemmMlp: "gemm "}.get(type(tile), "")
    return form + " ".join(f"{k}={v}" for k, v in asdict(tile).items())


def mlp_configs(rows: int, channels: int, hidden: int, dtype: torch.dtype, sm_count: int,
                interpret: bool = False) -> list[MlpConfig]:
    """The fused kernel's candidate tiles, best first. Each stage of the pipeline holds a [C, BLOCK_D] slice of
    fc1 and a [BLOCK_D, C] slice of fc2; the accumulator [BLOCK_R, C] stays in registers (<= ~128 float32 per
    thread). The order is what won the H200's autotuning in bf16 (benchmarks/results/gpu/h200_run4_fast_gpu.json):
    32 hidden columns first up to 128 channels, 64 wider; 16-row tiles first from 512 channels and for few rows.
    16 columns, never clearly ahead there, are not offered in bf16/fp16 (fewer tiles to compile)."""
    if interpret:  # the interpreter pays per operation: few, large steps
        return [MlpConfig(min(128, max(16, next_power_of_two(rows))), min(1024, next_power_of_two(hidden)), 4, 1)]
    width = sum(channel_split(channels))
    size = torch.tensor([], dtype=dtype).element_size()
    candidates = []
    hidden_order = ((32, 64) if width <= 128 else (64, 32)) if size < 4 else (32, 16)
    for block_rows in ((16, 32, 64) if width >= 512 or rows < 1024 else (64, 32, 16)):
        if block_rows == 64 and rows < 64 * sm_count:  # fewer tiles than the GPU has SMs: shorter tiles
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


GEMM_STATS_BLOCK_ROWS = 32  # stats_kernel's rows per step after fc2, where its epilogue cannot write them


def gemm_tile_for(tile: GemmMlp, columns: int, depth: int) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_K) of one of the GEMM form's matmuls, [rows, depth] @ [depth, columns]: the tile's
    columns clipped to the output's width and, where a power of two >= 32 divides it, to that divisor (C = 320
    takes 64-column tiles: no masked lanes), and K steps no longer than the depth (>= 16, tl.dot's minimum)."""
    block_n = min(tile.block_n, max(MIN_CHANNELS, next_power_of_two(columns)))
    divisor = next((n for n in (256, 128, 64, 32) if n <= block_n and columns % n == 0), None)
    return (divisor or block_n), min(tile.block_k, max(MIN_CHANNELS, next_power_of_two(depth)))


def gemm_stats_in_epilogue(tile: GemmMlp, hw: int, channels: int, hidden: int) -> bool:
    """Whether fc2's epilogue writes the output's partials (a slot per row tile): when one column tile holds
    every channel (s12's stages 1-2) and a sample spans few enough row tiles for the consumer's gather."""
    return (gemm_tile_for(tile, channels, hidden)[0] >= channels
            and cdiv(hw, tile.block_m) + 1 <= MAX_SLOTS_PER_SAMPLE)


def gemm_partials_rows(tile: GemmMlp, hw: int, channels: int, hidden: int) -> int:
    """The block_rows that size the GEMM form's output partials (new_partials_shape's argument): the row tile
    when fc2's epilogue writes them, stats_kernel's tile otherwise."""
    return tile.block_m if gemm_stats_in_epilogue(tile, hw, channels, hidden) else GEMM_STATS_BLOCK_ROWS


def gemm_configs(rows: int, channels: int, hidden: int, dtype: torch.dtype, sm_count: int,
                 interpret: bool = False) -> list[GemmMlp]:
    """The GEMM form's candidate tiles. bf16/fp16: tensor-core tiles of 64-128 rows (wgmma wants 64-row
    multiples per warp group) with 3-4 pipeline stages, within the shared-memory budget; ptxas for sm_90a puts
    each on wgmma without spills (benchmarks/results/gpu/triton_sm90_triton36_all_tiles.md), while a 128 x 256
    fc1 tile spilled in its GELU epilogue and is not offered. float32 (exact: FMA, no TF32): smaller tiles.
    The interpreter: one large tile (it pays per operation)."""
    if interpret:
        return [GemmMlp(min(128, max(16, next_power_of_two(rows))), min(1024, next_power_of_two(hidden)),
                        min(1024, next_power_of_two(hidden)), 4, 1)]
    size = torch.tensor([], dtype=dtype).element_size()
    if size < 4:
        tiles = [GemmMlp(128, 128, 64, 8, 3), GemmMlp(128, 64, 64, 4, 4), GemmMlp(64, 128, 64, 4, 4)]
        if rows < 128 * sm_count:  # fewer 128-row tiles than SMs (batch 1): shorter tiles first
            tiles = tiles[2:] + tiles[:2]
    else:
        tiles = [GemmMlp(64, 64, 32, 4, 2), GemmMlp(32, 64, 32, 4, 2)]
    return [t for t in tiles
            if t.num_stages * (t.block_m * t.block_k + t.block_k * t.block_n) * size <= SHARED_MEMORY_BUDGET_BYTES]


MLP_ENV = "POOLFORMER_TRITON_MLP"  # fused | split | gemm | auto (the default): which MLP forms are candidates
MLP_FORMS = tuple(f for f in settings.SETTINGS[MLP_ENV].choices if f != "auto")  # ("fused", "split", "gemm")
SPLIT_FIRST_MIN_CHANNELS = 256  # in bf16/fp16 on a GPU the split form goes first from this width (see SplitMlp)
SPLIT_FIRST_ROWS_PER_SM = 64  # ... and from a 64-row tile per SM: with fewer rows (batch 1) the fused kernel won


def mlp_form_setting() -> str:
    """POOLFORMER_TRITON_MLP: one of MLP_FORMS, or "auto" (also when unset). Anything else is a ConfigError: an
    A/B timing that silently ran the default forms would measure the wrong thing."""
    return settings.choice(MLP_ENV)


def split_mlp_exact(dtype: torch.dtype) -> bool:
    """cuBLAS keeps float32 exact only without TF32 (torch's "highest" float32 matmul precision)."""
    return dtype != torch.float32 or torch.get_float32_matmul_precision() == "highest"


def mlp_candidates(rows: int, channels: int, hidden: int, dtype: torch.dtype, sm_count: int,
                   interpret: bool = False) -> list[MlpForm]:
    """The forms of the MLP, best first by design: the split form first in bf16/fp16 on a GPU from
    SPLIT_FIRST_MIN_CHANNELS channels and SPLIT_FIRST_ROWS_PER_SM rows per SM, else the fused tiles first; the
    GEMM form's tiles last (autotuning decides where they win). POOLFORMER_TRITON_MLP=fused, =split or =gemm
    keeps one form only (for A/B timing and tests). In Triton's interpreter only the fused form unless one is
    asked for; in float32 where cuBLAS would use TF32, no split form."""
    fused = mlp_configs(rows, channels, hidden, dtype, sm_count, interpret)
    tile = elementwise_tile(rows, channels, interpret)
    split = [SplitMlp(tile.block_rows, tile.block_channels, tile.num_warps)]
    gemm = gemm_configs(rows, channels, hidden, dtype, sm_count, interpret)
    setting = mlp_form_setting()
    if setting != "auto":
        return {"fused": fused, "split": split, "gemm": gemm}[setting]
    if interpret:
        return fused
    if not split_mlp_exact(dtype):
        return fused + gemm
    if (dtype != torch.float32 and channels >= SPLIT_FIRST_MIN_CHANNELS
            and rows >= SPLIT_FIRST_ROWS_PER_SM * sm_count):
        return split + fused + gemm
    return fused + split + gemm
