"""Interchangeable implementations of the same zoo model, for side-by-side runs (`--impl`), behind one interface.

- ``ours``: `poolformer.model.MetaFormer`, the reference semantics.
- ``timm``: timm's own `poolformer_*` / `poolformerv2_*` model carrying the same weights (v1/v2 only).
  Note: timm's v1 head pools before normalising, so its v1 logits differ from the original's.
- ``fast``: `poolformer.fast.optimize(model)`, the folded inference-only form (v1/v2), same logits.
- ``onnxruntime`` / ``openvino``: the model run by that runtime (`poolformer.runtimes`), converted per input
  shape on the first call: exported to ONNX for ONNX Runtime, converted by OpenVINO's own PyTorch frontend for
  OpenVINO (its fastest form of the model); an exported file (.onnx, or OpenVINO IR .xml) runs the same way.
Peers (`timm:NAME`, see poolformer.peers) run as timm builds them, under ``ours`` or ``timm``.

An `Implementation` builds a model, prepares it for a `Target` (device, cast or autocast, memory format,
torch.compile) and describes what ran for results. bench, predict, eval and profile use only these three, so a
new implementation is one class and one entry in `IMPLEMENTATIONS`. `implementation_for(name, impl, weights)`
picks the one that runs a request (a peer, or an exported file, runs in its own).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from .devices import PRECISIONS
from .errors import ConfigError
from .model import MetaFormer, create_model
from .sizes import Size
from .zoo import get_spec


@dataclass(frozen=True)
class Target:
    """Where and how a model is to run. precision: the autocast precision, or with `cast` the dtype weights and
    input are converted to (no autocast). compile: torch.compile with `compile_mode` and `compile_backend`.
    batch_size, resolution: the input [batch_size, 3, height, width] (resolution a `Size`), where known (bench)."""

    device: str = "cpu"
    precision: str = "fp32"
    cast: bool = False
    channels_last: bool = False
    compile: bool = False
    compile_mode: str | None = None
    compile_backend: str = "inductor"
    batch_size: int | None = None
    resolution: Size | None = None

    def __post_init__(self) -> None:
        if self.resolution is not None:  # an int is a square
            object.__setattr__(self, "resolution", Size.of(self.resolution))

    @property
    def cast_dtype(self) -> torch.dtype | None:
        """The dtype weights and input are converted to, or None (fp32, or autocast)."""
        return PRECISIONS[self.precision] if self.cast else None


@dataclass(frozen=True)
class Description:
    """What a result says about the implementation that ran."""

    backend: str | None = None  # the fast path: the kernels a forward runs (triton, openvino-folded, onednn, ...)
    backend_note: str | None = None  # the fast path: why it did not run its Triton kernels on a GPU
    bytes_per_image: float | None = None  # the fast path on Triton: bytes its kernels move per image (roofline)
    compile_mode: str | None = None  # torch.compile's mode of a compiled model ("default" when none was given)
    input_size: tuple[int, int] | None = None  # (H, W) the model only takes (an exported file); None: any
    note: str | None = None  # how this implementation's model differs from ours, for reading its row fairly


class Implementation:
    """The reference model as it is (``ours``). Other implementations override what they do differently:
    `convert` (most), and `cast`, `compile` or `describe` where their module needs it."""

    reference = "ours"  # the fp32 eager implementation a row's logits are checked against (bench)
    trains = True  # bench --mode train: forward, backward and optimizer step (the fast path and runtimes only infer)
    builds_features = True  # whether it can run a features-only model (a backbone), see check_features

    def build(self, name: str, **create_kwargs: Any) -> nn.Module:
        """The zoo model `name` (`create_model`'s arguments: weights, num_classes, overrides) in this
        implementation, in eval mode on the CPU."""
        return self.convert(create_model(name, **create_kwargs))

    def convert(self, model: MetaFormer) -> nn.Module:
        """This implementation of `model`, with its weights."""
        return model

    def prepare(self, module: nn.Module, target: Target) -> nn.Module:
        """`module` ready to run as `target` asks: eval mode on its device, cast to its precision, channels_last,
        compiled. A module prepared again (evaluate adds channels_last to predict's) only gains what is new."""
        module = module.eval().to(target.device)
        if target.cast_dtype is not None:
            module = self.cast(module, target.cast_dtype)
        if target.channels_last:
            module = module.to(memory_format=torch.channels_last)
        if target.compile:
            # Each compile is of a new model, and dynamo keeps compiling the same forward for new instances only up
            # to its recompile limit (8), then silently runs them eagerly; the previous model's graphs are done with.
            torch._dynamo.reset()
            module = self.compile(module, target)
        return module

    def prepare_training(self, module: nn.Module, target: Target, grad_checkpointing: bool = False) -> nn.Module:
        """`module` ready to train as `target` asks: training mode on its device, channels_last, stochastic depth off
        (see training.disable_stochastic_depth), gradient checkpointing, torch.compile without freezing (the
        weights change). Precision is autocast's: weights and optimizer state stay fp32."""
        from .training import disable_stochastic_depth, set_grad_checkpointing

        if not self.trains:
            raise ConfigError("this implementation is inference-only")
        if target.cast:
            raise ConfigError("train rows run under autocast, with fp32 weights; --cast is for inference rows")
        module = module.train().to(target.device)
        if target.channels_last:
            module = module.to(memory_format=torch.channels_last)
        disable_stochastic_depth(module)
        if grad_checkpointing:
            set_grad_checkpointing(module)
        if target.compile:
            torch._dynamo.reset()
            module = torch.compile(module, backend=target.compile_backend, mode=target.compile_mode)
        return module

    def cast(self, module: nn.Module, dtype: torch.dtype) -> nn.Module:
        """Weights in `dtype` (timm's `--model-dtype`; GroupNorm then runs in it too, where autocast keeps fp32)."""
        return module.to(dtype)

    def compile(self, module: nn.Module, target: Target) -> nn.Module:
        """torch.compile; on the CPU with inductor's freezing (`Frozen`: weights as constants, packed once)."""
        if torch.device(target.device).type == "cpu":
            from .fast.compiled import Frozen

            return Frozen(module, target.compile_mode, target.compile_backend)
        return torch.compile(module, backend=target.compile_backend, mode=target.compile_mode)

    def describe(self, module: nn.Module, target: Target) -> Description:
        """What ran, for a result: here only torch.compile's mode."""
        return Description(compile_mode=(target.compile_mode or "default") if target.compile else None)


class Timm(Implementation):
    """timm's own model of a v1/v2 zoo model, with the same weights; checked against itself (its v1 head differs
    from the original by design). A features-only model becomes timm's `features_only=True` model: the same
    backbone and four maps, but without the per-output norms (a fair speed peer that does a little less)."""

    reference = "timm"
    FEATURES_NOTE = "timm's features_only model has no output norms (ours normalises each of the four maps)"

    def convert(self, model: MetaFormer) -> nn.Module:
        import timm

        from .weights import export_state_dict

        spec = model.spec
        if spec.family not in ("v1", "v2") or model.arch != get_spec(spec.name).arch:
            raise ConfigError(f"timm has no implementation of {spec.name} with these options; use --impl ours")
        weights = export_state_dict(model, "timm")
        if model.features_only:
            twin = timm.create_model(spec.name, pretrained=False, features_only=True)
            # timm's feature wrapper names the stages stages_0..stages_3; it has no norms on its outputs
            twin.load_state_dict({re.sub(r"^stages\.(\d+)\.", r"stages_\1.", key): value
                                  for key, value in weights.items() if not key.startswith("feature_norms.")})
            return twin.eval()
        twin = timm.create_model(spec.name, pretrained=False, num_classes=model.num_classes)
        twin.load_state_dict(weights)
        return twin.eval()

    def describe(self, module: nn.Module, target: Target) -> Description:
        described = super().describe(module, target)
        return replace(described, note=self.FEATURES_NOTE) if _is_feature_list(module) else described


def _is_feature_list(module: nn.Module) -> bool:
    """timm's features_only wrapper (FeatureListNet and kin): they all carry `feature_info`."""
    return hasattr(module, "feature_info") and not hasattr(module, "forward_head")


class Fast(Implementation):
    """`poolformer.fast.optimize(model)`. It runs a cast dtype throughout, compiles its folded graph (backend
    "inductor"), and says which kernels ran. A module some other build gave for "fast" is treated as ours."""

    trains = False

    def convert(self, model: MetaFormer) -> nn.Module:
        from .fast import optimize

        return optimize(model)

    def cast(self, module: nn.Module, dtype: torch.dtype) -> nn.Module:
        if not _is_fast(module):
            return super().cast(module, dtype)
        module.dtype = dtype
        return module

    def compile(self, module: nn.Module, target: Target) -> nn.Module:
        if not _is_fast(module):
            return super().compile(module, target)
        return module.compile_with(target.compile_mode, target.compile_backend)

    def describe(self, module: nn.Module, target: Target) -> Description:
        described = super().describe(module, target)
        if not _is_fast(module):
            return described
        dtype, device = PRECISIONS[target.precision] or module.dtype, target.device
        traffic = None
        if target.batch_size is not None and target.resolution is not None:
            size = target.resolution
            traffic = module.bytes_per_image(target.batch_size, size.height, size.width, dtype, device)
        return replace(described, backend=module.backend_for(dtype, device),
                       backend_note=module.backend_note(dtype, device), bytes_per_image=traffic)


def _is_fast(module: nn.Module) -> bool:
    from .fast import FastPoolFormer

    return isinstance(module, FastPoolFormer)


class Runtime(Implementation):
    """The model run by ONNX Runtime or OpenVINO (`poolformer.runtimes.sessions.RuntimeModule`), or an exported file
    given as weights (the model name then only gives the preprocessing: crop, mean, std). Classifiers only."""

    builds_features = False
    trains = False

    def __init__(self, runtime: str):
        self.runtime = runtime

    def build(self, name: str, **create_kwargs: Any) -> nn.Module:
        check_features(name, self.runtime, create_kwargs.get("features_only", False))
        if not is_exported_file(create_kwargs.get("weights")):
            return super().build(name, **create_kwargs)
        from .runtimes.sessions import RuntimeModule

        module = RuntimeModule.from_file(self.runtime, str(create_kwargs["weights"]))
        module.spec = get_spec(name)
        return module

    def convert(self, model: MetaFormer) -> nn.Module:
        check_features(getattr(model.spec, "name", ""), self.runtime, model.features_only)
        from .runtimes.exporting import onnx_exporter, openvino_converter
        from .runtimes.sessions import RuntimeModule

        if self.runtime == "openvino":
            module = RuntimeModule(self.runtime, build=openvino_converter(model), num_classes=model.num_classes)
        else:
            module = RuntimeModule(self.runtime, export=onnx_exporter(model), num_classes=model.num_classes)
        module.spec = getattr(model, "spec", None)
        return module

    def describe(self, module: nn.Module, target: Target) -> Description:
        signature = getattr(module, "signature", None)  # set for an exported file, whose input size is fixed
        size = None if signature is None else (signature.height, signature.width)
        return replace(super().describe(module, target), input_size=size)


class Peer(Implementation):
    """A timm model named `timm:NAME` (poolformer.peers), random weights; only img_size and num_classes apply.
    `reference`: the name it runs under (ours and timm both build timm's model, so a row is its own reference)."""

    def __init__(self, reference: str):
        self.reference = reference

    def build(self, name: str, **create_kwargs: Any) -> nn.Module:
        from .peers import create_peer

        check_features(name, self.reference, create_kwargs.get("features_only", False))
        if create_kwargs.get("weights") is not None or create_kwargs.get("pretrained"):
            raise ConfigError(f"{name} is a peer for speed and cost comparisons and runs with random weights; "
                              "checkpoints load into PoolFormer models only")
        return create_peer(name, num_classes=create_kwargs.get("num_classes", 1000),
                           img_size=create_kwargs.get("img_size"))


IMPLEMENTATIONS: dict[str, Implementation] = {
    "ours": Implementation(), "timm": Timm(), "fast": Fast(),
    "onnxruntime": Runtime("onnxruntime"), "openvino": Runtime("openvino"),
}


def is_exported_file(weights: Any) -> bool:
    """An exported model rather than a checkpoint: ONNX (.onnx) or OpenVINO IR (.xml)."""
    return weights is not None and str(weights).lower().endswith((".onnx", ".xml"))


def _file_runtime(path: str, impl: str) -> str:
    """The runtime that runs an exported file under `impl`: .onnx with onnxruntime or openvino ("ours" means
    onnxruntime), OpenVINO IR .xml with openvino ("ours" means openvino)."""
    if str(path).lower().endswith(".xml"):
        if impl not in ("ours", "openvino"):
            raise ConfigError(f"an OpenVINO IR .xml file runs with --impl openvino, not {impl}")
        return "openvino"
    runtime = "onnxruntime" if impl == "ours" else impl
    if runtime not in ("onnxruntime", "openvino"):
        raise ConfigError(f"an exported .onnx file runs with --impl onnxruntime or openvino, not {impl}")
    return runtime


def implementation_for(name: str, impl: str = "ours", weights: Any = None) -> Implementation:
    """The implementation that runs model `name` as `impl` with `weights`: the registered one, a peer's, or for an
    exported file the runtime that runs it. ConfigError for combinations that do not run."""
    if impl not in IMPLEMENTATIONS:
        raise ConfigError(f"unknown implementation {impl!r}; choose from: {', '.join(IMPLEMENTATIONS)}")
    from .peers import is_peer

    if is_peer(name):
        if impl not in ("ours", "timm"):
            raise ConfigError(f"--impl {impl} runs PoolFormer models only; {name} runs as timm builds it (--impl ours)")
        return Peer(impl)
    if is_exported_file(weights):
        return Runtime(_file_runtime(str(weights), impl))
    return IMPLEMENTATIONS[impl]


def check_features(name: str, impl: str, features: bool) -> None:
    """ConfigError unless `impl` can build `name` as a features-only backbone (when `features`): PoolFormer
    models in the implementations that build them (not the runtimes, which run classifiers); not timm peers."""
    if not features:
        return
    from .peers import is_peer

    if is_peer(name):
        raise ConfigError(f"--features builds PoolFormer backbones; {name} is a timm peer")
    implementation = IMPLEMENTATIONS.get(impl)
    if implementation is not None and not implementation.builds_features:
        able = ", ".join(n for n, i in IMPLEMENTATIONS.items() if i.builds_features)
        raise ConfigError(f"--features runs with --impl {able}, not {impl} (it runs classifiers)")


def build(name: str, impl: str = "ours", **kwargs: Any) -> nn.Module:
    """`create_model(name, **kwargs)` in the requested implementation, in eval mode, same weights.
    A peer (`timm:NAME`) is timm's model with random weights; only img_size and num_classes apply to it."""
    return implementation_for(name, impl, kwargs.get("weights")).build(name, **kwargs)


def resolution_kwargs(name: str, resolution: Size | int) -> dict[str, Any]:
    """The arguments that build `name` for inputs of `resolution` (a Size; an int is a square): parts with a
    fixed token count (random and spatial-FC mixers, a peer's fixed token grid: ViT, Swin, Mixer) are sized for
    it, height and width; every other part runs at any size, so the model is built as published."""
    from .peers import is_peer

    size = Size.of(resolution)
    if is_peer(name) or {"random", "spatial_fc"} & set(get_spec(name).arch.token_mixers):
        return {"img_size": size.img_size}
    return {}
