"""The folded model's weights as the Triton kernels take them (`prepare`): per-channel vectors in float32, fc
weights in the compute dtype and transposed so each kernel streams contiguous rows, and the stem's weights as
the implicit GEMM's matrix."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ... import settings
from ..folding import FoldedBlock, FoldedModel
from .tiles import cdiv

# One folded block as the kernels take it: a FoldedBlock whose scales and biases are float32 [C] / [D] and whose
# fc weights are in the compute dtype and transposed: fc1_weight [C, D], fc2_weight [D, C] (see `prepare`).
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
    """Whether the fused MLP kernel feeds fc1 the activation as stored and applies norm2's per-sample statistics
    to fc1's sums: fc1((x - mu) / sigma) = (x @ W1 - mu * colsum(W1)) / sigma. It keeps the normalised copy of x
    out of registers, which spills less at C 96-384 and more at 512 and wider (ptxas for sm_90a:
    benchmarks/results/gpu/triton_sm90_triton36.md against triton_sm90_triton36_normalise_first.md), so wider
    stages normalise first (channels None: whether the dtype allows it at all). bf16/fp16 only: in float32 the
    subtraction after the matmul would lose digits when |mu| >> sigma, against the 1e-4 target. Off unless
    POOLFORMER_TRITON_NORM_AFTER_FC1=1 is set before the model's first call: it timed slower than normalising
    first (benchmarks/results/gpu/README.md)."""
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
