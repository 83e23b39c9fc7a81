"""Per-layer summary of a model: output shapes, parameters, MACs and activation sizes, plus per-stage totals.

MACs here are multiply-accumulates of convolutions, linear layers and matrix products (the analytic
count of `poolformer.flops`, equal to torch FlopCounterMode's FLOPs / 2). A model given by name is traced
on the meta device (no memory, no arithmetic) or, when that is quicker, on the CPU (see `trace_device`).
Nothing here prints.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from .errors import ConfigError
from .flops import AnalyticCount, OpCost, check_resolution, count_analytic, model_for_resolution, module_levels
from .layers import DropPath
from .sizes import Size
from .training import TrainingMemory, training_memory
from .zoo import ModelSpec, get_spec

DEFAULT_DEPTH = 2  # stem/stages/head, then their children: the blocks within each stage
# The first convolution on the meta device imports torch._dynamo (~2 s on 2 cores: meta kernels are Python
# prims wrapped in dynamo.disable). Up to about this much work a trace on the CPU, with zeroed weights and
# input, finishes sooner and gives the same shapes and counts.
CPU_TRACE_MAX_MACS = 20_000_000_000
PEER_CPU_TRACE_MAX_IMAGES = 4  # timm peers: up to this many 224x224 images' worth of input on the CPU
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
_HIDDEN = (nn.Identity, DropPath)  # no parameters, no work: rows would only be noise


@dataclass
class LayerRow:
    """One module. params and macs include its submodules; activation_bytes is its output's size."""

    name: str  # module path, e.g. stages.0.blocks.1
    type: str
    depth: int  # nesting level, not counting Sequential containers: stem=1, stages.0.blocks.1=2
    output_shape: tuple[int, ...]
    params: int
    macs: int
    activation_bytes: int


@dataclass
class StageRow:
    """stem, stage 1-4, head: where the parameters and MACs live."""

    stage: str
    tokens: int  # H * W of the stage's output map (1 for the head)
    channels: int
    blocks: int
    params: int
    macs: int


@dataclass
class ModelSummary:
    model: str
    input_shape: tuple[int, ...]  # [B, 3, H, W]
    depth: int
    total_params: int  # every nn.Parameter, LayerScale and frozen ones included
    trainable_params: int
    total_macs: int
    param_bytes: int
    activation_bytes: int  # every tensor the forward pass writes (what training would have to keep, at most)
    layers: list[LayerRow]
    stages: list[StageRow]
    training: TrainingMemory | None = None  # a training step's memory at this input (None: not counted)
    features: bool = False  # the features-only backbone: no head, the four stage maps through their norms

    @property
    def resolution(self) -> Size:
        return Size(self.input_shape[-2], self.input_shape[-1])

    def as_json(self) -> dict:
        return {
            "model": self.model,
            **self.resolution.json_fields(),
            "features": self.features,
            "input_shape": list(self.input_shape),
            "total_params": self.total_params,
            "trainable_params": self.trainable_params,
            "total_macs": self.total_macs,
            "param_bytes": self.param_bytes,
            "activation_bytes": self.activation_bytes,
            "depth": self.depth,
            "layers": [
                {"name": r.name, "type": r.type, "depth": r.depth, "output_shape": list(r.output_shape),
                 "params": r.params, "macs": r.macs, "activation_bytes": r.activation_bytes}
                for r in self.layers
            ],
            "stages": [vars(s).copy() for s in self.stages],
            "training": self.training.as_json() if self.training is not None else None,
        }


def summarize_model(model: nn.Module, resolution: Size | int, batch_size: int = 1, depth: int = DEFAULT_DEPTH,
                    name: str | None = None, optimizer: str | None = "sgd") -> ModelSummary:
    """Summarise `model` for a [batch_size, 3, height, width] input (`resolution`; an int is a square) on the
    model's device, with a training step's memory under `optimizer` (poolformer.training.training_memory; None:
    not counted)."""
    size = check_resolution(resolution)
    if batch_size < 1:
        raise ConfigError(f"batch size must be >= 1, got {batch_size}")
    if depth < 1:
        raise ConfigError(f"depth must be >= 1, got {depth}")
    device = next(model.parameters()).device
    x = torch.zeros(batch_size, 3, size.height, size.width, device=device)
    count = count_analytic(model, x)
    params = list(model.parameters())
    spec = getattr(model, "spec", None)
    return ModelSummary(
        model=name or (spec.name if spec else type(model).__name__),
        input_shape=tuple(x.shape),
        depth=depth,
        total_params=sum(p.numel() for p in params),
        trainable_params=sum(p.numel() for p in params if p.requires_grad),
        total_macs=count.macs,
        param_bytes=sum(p.numel() * p.element_size() for p in params),
        activation_bytes=count.written_bytes,
        layers=_layer_rows(model, count, depth),
        stages=_stage_rows(model, count),
        training=_training_memory(model, batch_size, size, optimizer) if optimizer is not None else None,
        features=bool(getattr(model, "features_only", False)),
    )


def _training_memory(model: nn.Module, batch_size: int, size: Size, optimizer: str) -> TrainingMemory:
    """training_memory, counted with one forward at batch 1 on the model's device: in fp32 every tensor autograd
    saves grows with the batch, so the count at the batch is batch_size times it (checked in the tests)."""
    one = training_memory(model, 1, size.height, size.width, optimizer)
    checkpointed = one.activations_checkpointed_bytes
    return dataclasses.replace(one, batch_size=batch_size, activations_bytes=batch_size * one.activations_bytes,
                               activations_checkpointed_bytes=None if checkpointed is None else batch_size * checkpointed)


def trace_device(spec: ModelSpec, resolution: Size | int, batch_size: int) -> str:
    """"cpu" when the forward's estimated MACs (the published figure scaled to this input) stay under
    CPU_TRACE_MAX_MACS, else "meta". Token-mixing matrices (attention, random, spatial FC) grow with the
    square of the token count, so their estimate grows with the square of the pixel count."""
    if spec.published.macs is None:
        return "meta"
    quadratic = set(spec.arch.token_mixers) - {"pooling", "identity", "dwconv"}
    scale = (Size.of(resolution).pixels / spec.input_size**2) ** (2 if quadratic else 1)
    return "cpu" if spec.published.macs * scale * batch_size <= CPU_TRACE_MAX_MACS else "meta"


def summarize(name: str, resolution: Size | int | None = None, batch_size: int = 1, depth: int = DEFAULT_DEPTH,
              device: str | None = None, optimizer: str | None = "sgd", features: bool = False) -> ModelSummary:
    """Summarise zoo model `name` (default resolution: the model's own; a Size or a square's side). device: where
    to trace ("meta" or "cpu"; default `trace_device`'s choice). On the CPU the weights are zeros: only shapes
    matter here. optimizer: whose state the training memory counts (sgd, adamw; None: no training memory).
    features: the features-only backbone (no head; the per-stage table ends with its norms)."""
    from .peers import is_peer

    if is_peer(name):  # timm's models: cost unknown beforehand; small inputs trace on the CPU
        size = check_resolution(224 if resolution is None else resolution)
        canonical = name
        small = batch_size * size.pixels / 224**2 <= PEER_CPU_TRACE_MAX_IMAGES
        device = device or ("cpu" if small else "meta")
    else:
        spec = get_spec(name)
        canonical = spec.name
        size = check_resolution(spec.input_size if resolution is None else resolution)
        device = device or trace_device(spec, size, batch_size)
    model = model_for_resolution(canonical, size, device="meta", features=features)
    if device != "meta":
        _zero_weights_on(model, torch.device(device))
    return summarize_model(model, size, batch_size, depth, name=canonical, optimizer=optimizer)


def _zero_weights_on(model: nn.Module, device: torch.device) -> None:
    """Give every parameter and buffer of a meta-device model zero values on `device`, all as views of one
    zero buffer the size of the largest: only shapes matter to a summary, nothing writes to the weights, and
    touching m48's 294 MB of fresh pages would cost more than the whole trace."""
    tensors = [*model.parameters(), *model.buffers()]
    zeros = torch.zeros(max((t.numel() for t in tensors), default=0), device=device)
    for module in model.modules():
        for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            value = zeros[:tensor.numel()].view(tensor.shape).to(tensor.dtype)
            if isinstance(tensor, nn.Parameter):
                value = nn.Parameter(value, requires_grad=tensor.requires_grad)
            setattr(module, name, value)


def _subtree_cost(by_module: dict[str, OpCost], prefix: str) -> OpCost:
    total = OpCost()
    for name, cost in by_module.items():
        if name == prefix or name.startswith(prefix + "."):
            total.add(cost)
    return total


def _layer_rows(model: nn.Module, count: AnalyticCount, depth: int) -> list[LayerRow]:
    levels = module_levels(model)
    rows = []
    for name, module in model.named_modules():
        if not name or isinstance(module, _CONTAINERS + _HIDDEN) or levels[name] > depth:
            continue
        output = count.outputs.get(name)
        if output is None:  # built but never called (e.g. a mixer path not taken)
            continue
        rows.append(LayerRow(
            name=name, type=type(module).__name__, depth=levels[name], output_shape=output.shape,
            params=sum(p.numel() for p in module.parameters()),
            macs=_subtree_cost(count.by_module, name).macs, activation_bytes=output.bytes,
        ))
    return rows


def _stage_rows(model: nn.Module, count: AnalyticCount) -> list[StageRow]:
    """stem, one row per stage, head; skipped for models without that layout."""
    if not all(hasattr(model, part) for part in ("stem", "stages", "head")):
        return []
    rows = []
    parts = [("stem", "stem", model.stem, 0)]
    parts += [(str(i + 1), f"stages.{i}", stage, len(stage.blocks)) for i, stage in enumerate(model.stages)]
    for label, path, module, blocks in parts:
        shape = count.outputs[path].shape  # [B, C, H, W]
        rows.append(StageRow(
            stage=label, tokens=shape[2] * shape[3], channels=shape[1], blocks=blocks,
            params=sum(p.numel() for p in module.parameters()), macs=_subtree_cost(count.by_module, path).macs,
        ))
    head_in = count.outputs[parts[-1][1]].shape
    if model.head is None:  # features-only: the per-output norms instead of a head
        rows.append(StageRow(
            stage="norms", tokens=0, channels=0, blocks=0,
            params=sum(p.numel() for p in model.feature_norms.parameters()),
            macs=_subtree_cost(count.by_module, "feature_norms").macs,
        ))
        return rows
    rows.append(StageRow(
        stage="head", tokens=1, channels=head_in[1], blocks=0,
        params=sum(p.numel() for p in model.head.parameters()), macs=_subtree_cost(count.by_module, "head").macs,
    ))
    return rows
