"""Interchangeable implementations of the same zoo model, for side-by-side runs (`--impl`).

- ``ours``: `poolformer.model.MetaFormer`, the reference semantics.
- ``timm``: timm's own `poolformer_*` / `poolformerv2_*` model carrying the same weights (v1/v2 only).
  Note: timm's v1 head pools before normalising, so its v1 logits differ from the original's.
- ``fast``: `poolformer.fast.optimize(model)`, the folded inference-only form (v1/v2), same logits.
- ``onnxruntime`` / ``openvino``: the model run by that runtime (`poolformer.runtimes`), converted per input
  shape on the first call: exported to ONNX for ONNX Runtime, converted by OpenVINO's own PyTorch frontend for
  OpenVINO (its fastest form of the model); an exported file (.onnx, or OpenVINO IR .xml) runs the same way
  through `runtime_for_file`.

A new implementation is one function `(model: MetaFormer) -> nn.Module` added to `IMPLEMENTATIONS`.
Peers (`timm:NAME`, see poolformer.peers) have one implementation, timm's own, built by `build` as well.
"""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

from .errors import ConfigError
from .model import MetaFormer, create_model
from .zoo import get_spec


def _ours(model: MetaFormer) -> nn.Module:
    return model


def _timm(model: MetaFormer) -> nn.Module:
    import timm

    from .weights import export_state_dict

    spec = model.spec
    if spec.family not in ("v1", "v2") or model.arch != get_spec(spec.name).arch:
        raise ConfigError(f"timm has no implementation of {spec.name} with these options; use --impl ours")
    twin = timm.create_model(spec.name, pretrained=False, num_classes=model.num_classes)
    twin.load_state_dict(export_state_dict(model, "timm"))
    return twin.eval()


def _fast(model: MetaFormer) -> nn.Module:
    from .fast import optimize

    return optimize(model)


def _runtime(runtime: str) -> Callable[[MetaFormer], nn.Module]:
    def build_runtime(model: MetaFormer) -> nn.Module:
        from .runtimes.exporting import onnx_exporter, openvino_converter
        from .runtimes.sessions import RuntimeModule

        if runtime == "openvino":
            module = RuntimeModule(runtime, build=openvino_converter(model), num_classes=model.num_classes)
        else:
            module = RuntimeModule(runtime, export=onnx_exporter(model), num_classes=model.num_classes)
        module.spec = getattr(model, "spec", None)
        return module

    return build_runtime


IMPLEMENTATIONS: dict[str, Callable[[MetaFormer], nn.Module]] = {
    "ours": _ours, "timm": _timm, "fast": _fast,
    "onnxruntime": _runtime("onnxruntime"), "openvino": _runtime("openvino"),
}
RUNTIME_IMPLS = ("onnxruntime", "openvino")


def is_exported_file(weights: Any) -> bool:
    """An exported model rather than a checkpoint: ONNX (.onnx) or OpenVINO IR (.xml)."""
    return weights is not None and str(weights).lower().endswith((".onnx", ".xml"))


def runtime_for_file(path: str, impl: str) -> nn.Module:
    """An exported .onnx file run by `impl` (onnxruntime or openvino; "ours" means onnxruntime), or an OpenVINO IR
    .xml file run by openvino ("ours" means openvino)."""
    from .runtimes.sessions import RuntimeModule

    if str(path).lower().endswith(".xml"):
        if impl not in ("ours", "openvino"):
            raise ConfigError(f"an OpenVINO IR .xml file runs with --impl openvino, not {impl}")
        return RuntimeModule.from_file("openvino", path)
    runtime = "onnxruntime" if impl == "ours" else impl
    if runtime not in RUNTIME_IMPLS:
        raise ConfigError(f"an exported .onnx file runs with --impl onnxruntime or openvino, not {impl}")
    return RuntimeModule.from_file(runtime, path)


def build(name: str, impl: str = "ours", **kwargs: Any) -> nn.Module:
    """`create_model(name, **kwargs)` in the requested implementation, in eval mode, same weights.
    A peer (`timm:NAME`) is timm's model with random weights; only img_size and num_classes apply to it."""
    if impl not in IMPLEMENTATIONS:
        raise ConfigError(f"unknown implementation {impl!r}; choose from: {', '.join(IMPLEMENTATIONS)}")
    from .peers import create_peer, is_peer

    if is_peer(name):
        if impl not in ("ours", "timm"):
            raise ConfigError(f"--impl {impl} runs PoolFormer models only; {name} runs as timm builds it (--impl ours)")
        if kwargs.get("weights") is not None or kwargs.get("pretrained"):
            raise ConfigError(f"{name} is a peer for speed and cost comparisons and runs with random weights; "
                              "checkpoints load into PoolFormer models only")
        return create_peer(name, num_classes=kwargs.get("num_classes", 1000), img_size=kwargs.get("img_size"))
    if is_exported_file(kwargs.get("weights")):
        module = runtime_for_file(str(kwargs["weights"]), impl)
        module.spec = get_spec(name)
        return module
    return IMPLEMENTATIONS[impl](create_model(name, **kwargs))
