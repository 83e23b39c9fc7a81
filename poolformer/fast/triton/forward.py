"""The folded PoolFormer forward on the Triton kernels (`TritonForward`): two kernels per block.

Per block, on channels-last activations [B, H, W, C] (= rows [R, C], R = B*H*W):
1. the token mixer: x1 = skip1 * x + (mix_scale / sigma_b(x)) * (avg_pool(x) - x); one read of x, one write
   of x1, plus x1's per-sample partial moments;
2. the MLP: y = skip2 * x1 + fc2(act(fc1((x1 - mu_b(x1)) / sigma_b(x1)))), in one of three forms (see
   `tiles`): fused in one kernel with the 4C-wide hidden activation on chip, split around cuBLAS GEMMs, or
   two Triton GEMMs carrying the norm, activation and residual; plus y's partial moments for the next mixer.
A stage's first block gets its input's moments from `stats_kernel` (one extra read per stage). The stem is an
implicit GEMM over the caller's images as they are, v2's LayerNorms run on their own kernel; the downsampling
convolutions and the head are PyTorch operators (cuDNN on a GPU). A features-only model's output norms
(GroupNorm(1) of each stage's map) run on `group_norm_kernel`, from the partials the stage's last block then
writes too: one read and one write of each map.
"""

from __future__ import annotations

import torch

from .. import cpu
from ..folding import Plan
from . import launches
from .availability import multiprocessor_count, triton_interprets
from .chooser import KernelShape, TileChooser
from .instrument import Recorder
from .tiles import MlpForm, Partials, Tile, elementwise_tile, elementwise_tiles, mlp_candidates
from .weights import TritonBlock, TritonModel


class TritonForward:
    """A forward on the kernels: each kernel's tile from `tiles` (the tile in use for its shape, else the cached,
    autotuned or design-time one) and each launch recorded into `recorder`. Holds no tensors; a FastPoolFormer
    makes one per call around its own chooser and recorder."""

    def __init__(self, tiles: TileChooser | None = None, recorder: Recorder | None = None) -> None:
        self.tiles = tiles if tiles is not None else TileChooser.from_settings()
        self.recorder = recorder if recorder is not None else Recorder()

    def stage_input_stats(self, x: torch.Tensor, tile: Tile | None = None) -> Partials:
        """Partials of a contiguous [B, H, W, C] activation (the design-time tile unless given)."""
        batch, height, width, channels = x.shape
        tile = tile or elementwise_tile(batch * height * width, channels, triton_interprets())
        return launches.stats(self.recorder, x, tile)

    def pool_mix(self, x: torch.Tensor, stats: Partials, block: TritonBlock, pool_size: int,
                 tile: Tile | None = None) -> tuple[torch.Tensor, Partials]:
        """The token mixer on a contiguous [B, H, W, C] activation -> (x1 [B, H, W, C], x1's partials), on `tile`
        or the chooser's tile for the shape (one of `elementwise_tiles`)."""
        def launch(t: Tile) -> tuple[torch.Tensor, Partials]:
            return launches.pool_mix(self.recorder, x, stats, block, pool_size, t)

        if tile is not None:
            return launch(tile)
        shape = KernelShape.pool_mix(x, pool_size)
        return self.tiles.launch_with_tile(
            shape, lambda: elementwise_tiles(shape.rows, shape.channels, triton_interprets()), launch)

    def mlp(self, x1: torch.Tensor, stats: Partials, block: TritonBlock, activation: str, emit_stats: bool,
            form: MlpForm | None = None) -> tuple[torch.Tensor, Partials | None]:
        """The block's second half on a contiguous [B, H, W, C] activation -> (y [B, H, W, C], y's partials or
        None), in `form` or the chooser's form for the shape (one of `mlp_candidates`: a fused tile, the split
        form or a GEMM-form tile)."""
        def launch(f: MlpForm) -> tuple[torch.Tensor, Partials | None]:
            return launches.mlp(self.recorder, x1, stats, block, activation, emit_stats, f)

        if form is not None:
            return launch(form)
        shape = KernelShape.mlp(x1, block.fc1_weight.shape[1])
        return self.tiles.launch_with_tile(shape, lambda: mlp_candidates(
            shape.rows, shape.channels, shape.hidden, x1.dtype, multiprocessor_count(x1.device),
            triton_interprets()), launch)

    def features(self, images: torch.Tensor, model: TritonModel, plan: Plan) -> torch.Tensor:
        """Images [B, 3, H, W] (any layout and float dtype: the stem kernel reads them as they are) -> last map
        [B, H/32, W/32, C] (contiguous) in the compute dtype."""
        return self.stages(images, model, plan)[-1]

    def feature_maps(self, images: torch.Tensor, model: TritonModel, plan: Plan) -> list[torch.Tensor]:
        """A features-only model's outputs: images [B, 3, H, W] -> each stage's map through its output norm,
        [B, H_i, W_i, C_i] (contiguous) in the compute dtype."""
        return self.stages(images, model, plan, normalise=True)

    def stages(self, images: torch.Tensor, model: TritonModel, plan: Plan,
               normalise: bool = False) -> list[torch.Tensor]:
        """Each stage's output map [B, H_i, W_i, C_i] (contiguous, compute dtype); `normalise`: through the
        stage's output norm, from the partials its last block then writes too (a stage without blocks gets
        them from `stats_kernel`), right after the stage, while its map is fresh in the cache."""
        folded, recorder = model.folded, self.recorder
        outputs = []
        recorder.stage = 0
        x = launches.stem(recorder, images, model.stem_matrix, model.stem_bias, folded.stem_weight.shape[-1])
        if folded.stem_norm_weight is not None:
            x = launches.layer_norm(recorder, "stem_norm", x, folded.stem_norm_weight, plan.stem_norm_eps)
        for stage_index, (stage, blocks) in enumerate(zip(folded.stages, model.blocks), start=1):
            recorder.stage = stage_index
            if stage.down_weight is not None:
                if plan.down_norm_eps is not None:
                    x = launches.layer_norm(recorder, "down_norm", x, None, plan.down_norm_eps)
                x = launches.conv(recorder, "down", x, stage.down_weight, stage.down_bias, stride=2, padding=1)
            x = x.contiguous()
            stats = self.stage_input_stats(x) if blocks or normalise else None
            for index, block in enumerate(blocks):
                x1, mixed_stats = self.pool_mix(x, stats, block, plan.pool_size)
                x, stats = self.mlp(x1, mixed_stats, block, plan.activation,
                                    emit_stats=normalise or index < len(blocks) - 1)
            if not normalise:
                outputs.append(x)
                continue
            batch, height, width, channels = x.shape
            tile = elementwise_tile(batch * height * width, channels, triton_interprets())
            outputs.append(launches.group_norm(recorder, x, stats, folded.feature_norms[stage_index - 1], tile))
        return outputs

    def head(self, x: torch.Tensor, model: TritonModel, plan: Plan) -> torch.Tensor:
        """Last map [B, H, W, C] -> float32 logits (PyTorch operators; see poolformer.fast.cpu.head_forward)."""
        logits = cpu.head_forward(x, model.folded, plan)
        self.recorder.stage = None
        self.recorder.record("head", [x, model.folded.head_weight, model.folded.head_bias], [logits],
                             flops=2 * logits.shape[0] * model.folded.head_weight.numel())
        return logits
