"""The folded forward written for torch.compile: the fast path's ``inductor`` backend (CPU).

Eager, the oneDNN path (`poolformer.fast.cpu`) spends about 40% of a bf16 batch-1 forward outside its matrix
multiplies: some 310 operator calls for pooling, statistics, scaling and residuals. Compiled by inductor with
freezing, the same algebra keeps oneDNN's packed convolutions (weights become constants, reordered once) and
turns everything between them into a few generated C++ loops: on a 2-core Zen 5, s12 bf16 ran at 1.09x the
eager oneDNN backend and 1.03-1.16x timm compiled, and at 0.87-0.98x auto's OpenVINO backend in fp32 and bf16
(benchmarks/results/runtimes_cpu_avx512_bf16.md; runs move by 5-20% on that machine).
The price is compilation: ~10-15 s per input shape with a C++ compiler, so "auto" never picks it; it is what
`bench --impl fast --compile` (and `optimize(model, backend="inductor")`) runs.

The graph: channels-last activations; per block the sample's sigma (float32 statistics), pool(x) - x with
avg_pool2d(count_include_pad=False) scaled by mix_scale / sigma, norm2 as a plain standardisation (its affine
is folded into fc1), fc1 -> activation -> fc2 as 1x1 convolutions (oneDNN's packed primitive under freezing;
float32 linears went to a slower MKL kernel) and the residual. Element-wise work runs in float32 and is stored
in the compute dtype. A features-only model's graph ends in its four output norms (GroupNorm(1) of each
stage's map) instead of the head.
"""

from __future__ import annotations

import logging
import shutil

import torch
import torch.nn.functional as F
from torch import nn

from .folding import FoldedBlock, FoldedModel, Plan

ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu, "starrelu": F.relu}  # starrelu: relu(.)^2 after folding
DTYPES = (torch.float32, torch.bfloat16)


def unavailable_reason(dtype: torch.dtype, device: torch.device) -> str | None:
    """Why the compiled backend cannot run `dtype` on `device` here, or None when it can."""
    if device.type != "cpu":
        return f"it runs on the CPU, not {device.type} (on CUDA the fast path's Triton kernels are the fused form)"
    if dtype not in DTYPES:
        return f"it runs float32 and bfloat16, not {str(dtype).removeprefix('torch.')}"
    if not any(shutil.which(name) for name in ("c++", "g++", "clang++")):
        return "inductor needs a C++ compiler on the CPU and none was found (c++, g++ or clang++)"
    return None


def _buffer(module: nn.Module, name: str, tensor: torch.Tensor | None) -> None:
    module.register_buffer(name, None if tensor is None else tensor.detach().clone())


class _Block(nn.Module):
    def __init__(self, block: FoldedBlock, pool_size: int, activation: str):
        super().__init__()
        self.pool_size, self.activation = pool_size, activation
        self.eps1, self.eps2 = block.norm1_eps, block.norm2_eps
        _buffer(self, "mix_scale", block.mix_scale.float().view(1, -1, 1, 1))
        _buffer(self, "skip1", None if block.skip_scale1 is None else block.skip_scale1.float().view(1, -1, 1, 1))
        _buffer(self, "skip2", None if block.skip_scale2 is None else block.skip_scale2.float().view(1, -1, 1, 1))
        _buffer(self, "fc1_weight", block.fc1_weight[:, :, None, None].contiguous(memory_format=torch.channels_last))
        _buffer(self, "fc1_bias", block.fc1_bias)
        _buffer(self, "fc2_weight", block.fc2_weight[:, :, None, None].contiguous(memory_format=torch.channels_last))
        _buffer(self, "fc2_bias", block.fc2_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wide = x.float()
        inv_sigma = _inv_sigma(wide, self.eps1)
        pooled = F.avg_pool2d(x, self.pool_size, 1, self.pool_size // 2, count_include_pad=False).float()
        skip = wide if self.skip1 is None else wide * self.skip1
        x1 = skip + (pooled - wide) * (self.mix_scale * inv_sigma)
        var, mean = torch.var_mean(_samples(x1), dim=1, correction=0)
        standardised = (x1 - mean.view(-1, 1, 1, 1)) * torch.rsqrt(var + self.eps2).view(-1, 1, 1, 1)
        hidden = ACTIVATIONS[self.activation](F.conv2d(standardised.to(x.dtype), self.fc1_weight, self.fc1_bias))
        if self.activation == "starrelu":
            hidden = hidden * hidden
        residual = x1 if self.skip2 is None else x1 * self.skip2
        return F.conv2d(hidden, self.fc2_weight, self.fc2_bias) + residual.to(x.dtype)


def _samples(x: torch.Tensor) -> torch.Tensor:
    """Channels-last [B, C, H, W] -> [B, H*W*C] in memory order: inductor's reductions over it read memory
    straight (over x.flatten(1) they stride through it; s12 bf16 batch 1 ran at half the speed)."""
    return x.permute(0, 2, 3, 1).flatten(1)


def _inv_sigma(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Channels-last [B, C, H, W] float32 -> [B, 1, 1, 1]: 1 / sqrt(var + eps) over each sample."""
    var = torch.var_mean(_samples(x), dim=1, correction=0)[0]
    return torch.rsqrt(var + eps).view(-1, 1, 1, 1)


def _group_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """GroupNorm(1) of a channels-last [B, C, H, W] map (a features-only model's output norm): statistics and
    affine in float32, stored in x's dtype."""
    wide = x.float()
    var, mean = torch.var_mean(_samples(wide), dim=1, correction=0)
    out = (wide - mean.view(-1, 1, 1, 1)) * (torch.rsqrt(var + eps).view(-1, 1, 1, 1) * weight.view(1, -1, 1, 1))
    return (out if bias is None else out + bias.view(1, -1, 1, 1)).to(x.dtype)


def _channel_layer_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """LayerNorm over channels of [B, C, H, W] (v2's stem and downsampling norms; no bias), in float32."""
    wide = x.float()
    var, mean = torch.var_mean(wide, dim=1, keepdim=True, correction=0)
    out = (wide - mean) * torch.rsqrt(var + eps)
    return (out if weight is None else out * weight.float().view(1, -1, 1, 1)).to(x.dtype)


class FoldedGraph(nn.Module):
    """The folded model in `dtype` as a module of plain operators over channels-last [B, C, H, W] tensors, its
    weights as buffers (constants under inductor's freezing). Input images [B, 3, H, W], output float32 logits
    (a features-only model: the list of its four normalised stage maps, in `dtype`). Runs eagerly too (that is
    how the tests check it without compiling)."""

    def __init__(self, folded: FoldedModel, plan: Plan, dtype: torch.dtype):
        super().__init__()
        folded = folded.to(dtype, "cpu")
        self.plan, self.dtype = plan, dtype
        _buffer(self, "stem_weight", folded.stem_weight)
        _buffer(self, "stem_bias", folded.stem_bias)
        _buffer(self, "stem_norm_weight", folded.stem_norm_weight)
        self.downs = nn.ModuleList()
        self.stages = nn.ModuleList()
        for stage in folded.stages:
            down = nn.Module()
            _buffer(down, "weight", stage.down_weight)
            _buffer(down, "bias", stage.down_bias)
            self.downs.append(down)
            self.stages.append(nn.Sequential(*(_Block(b, plan.pool_size, plan.activation) for b in stage.blocks)))
        _buffer(self, "head_weight", folded.head_weight)
        _buffer(self, "head_bias", folded.head_bias)
        self.feature_norms = nn.ModuleList()
        for norm in folded.feature_norms:
            module = nn.Module()
            _buffer(module, "weight", norm.weight)
            _buffer(module, "bias", norm.bias)
            module.eps = norm.eps
            self.feature_norms.append(module)
        self.eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        plan = self.plan
        maps = []
        x = images.to(self.dtype).contiguous(memory_format=torch.channels_last)
        x = F.conv2d(x, self.stem_weight, self.stem_bias, stride=4, padding=2)
        if self.stem_norm_weight is not None:
            x = _channel_layer_norm(x, self.stem_norm_weight, plan.stem_norm_eps)
        for down, blocks in zip(self.downs, self.stages):
            if down.weight is not None:
                if plan.down_norm_eps is not None:
                    x = _channel_layer_norm(x, None, plan.down_norm_eps)
                x = F.conv2d(x, down.weight, down.bias, stride=2, padding=1)
            x = blocks(x)
            maps.append(x)
        if plan.features_only:
            return [_group_norm(m, norm.weight, norm.bias, norm.eps) for m, norm in zip(maps, self.feature_norms)]
        return self._head(x.float())

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        """v1: mean_hw(GN(x)) with the map's statistics; v2: LayerNorm of mean_hw(x); affines are in the classifier."""
        pooled = x.mean((2, 3))
        if self.plan.head_norm_on == "map":
            normalised = (pooled - pooled.mean(1, keepdim=True)) * _inv_sigma(x, self.plan.head_norm_eps).view(-1, 1)
        else:
            normalised = F.layer_norm(pooled, pooled.shape[-1:], eps=self.plan.head_norm_eps)
        return F.linear(normalised, self.head_weight, self.head_bias)


class Frozen(nn.Module):
    """`module` under torch.compile for inference, with inductor's freezing: its weights become constants of the
    graph (on the CPU oneDNN's convolution and linear weights are then reordered once, not on every call). One
    graph per input shape (no dynamic shapes: a shape compiles on its first call). `compiler`: torch.compile's
    backend ("eager"/"aot_eager" only trace, quickly); `mode`: its mode (e.g. "max-autotune", which on CPUs also
    tries inductor's own GEMM kernels). The weights must not change after the first call."""

    def __init__(self, module: nn.Module, mode: str | None = None, compiler: str = "inductor"):
        super().__init__()
        self.module = module.eval()
        self.compiled = torch.compile(self.module, backend=compiler, mode=mode, dynamic=False)
        _quiet_cuda_home_warning()

    def forward(self, *args, **kwargs):
        from torch._inductor import config

        with torch.no_grad(), config.patch(freezing=True):  # read when a shape compiles, i.e. during the call
            return self.compiled(*args, **kwargs)


def compile_folded(folded: FoldedModel, plan: Plan, dtype: torch.dtype, mode: str | None = None,
                   compiler: str = "inductor") -> Frozen:
    """The folded model in `dtype` compiled for inference (`FoldedGraph` under `Frozen`)."""
    return Frozen(FoldedGraph(folded, plan, dtype), mode, compiler)


class _NoCudaRuntimeFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No CUDA runtime is found")


def _quiet_cuda_home_warning() -> None:
    """Inductor's C++ build logs "No CUDA runtime is found, using CUDA_HOME=..." on CPU-only machines with the
    CUDA wheels of torch: irrelevant to a CPU graph, and it lands in the middle of the command line's tables."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    if not any(isinstance(f, _NoCudaRuntimeFilter) for f in logger.filters):
        logger.addFilter(_NoCudaRuntimeFilter())
