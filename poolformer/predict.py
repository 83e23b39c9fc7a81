"""Classify image files: load a trained model, preprocess as the model was trained to expect, return the top-k
classes with probabilities. Returns plain dataclasses; never prints.

`load_classifier` is shared with the eval engine (`poolformer.evaluate`).
"""

from __future__ import annotations

import dataclasses
import glob
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from .data import DEFAULT_MAX_PIXELS, Preprocess, images_in, load_batch
from .devices import PRECISIONS, autocast, resolve_device
from .errors import ConfigError
from .implementations import Description, Implementation, Target, implementation_for, is_exported_file
from .labels import class_names
from .zoo import ModelSpec, get_spec

# Where each checkpoint layout keeps the classifier weight [num_classes, dim].
_CLASSIFIER_KEYS = ("head.fc.weight", "head.weight", "classifier.weight")


@dataclass
class Classifier:
    """A model ready for inference: the module (any implementation, eval mode, on `device`), its spec (for
    preprocessing), its class count and a name for every output."""

    module: nn.Module
    spec: ModelSpec
    impl: str
    num_classes: int
    labels: list[str]
    device: torch.device
    weights: str  # the checkpoint path, or "pretrained"
    implementation: Implementation  # what built the module; prepares it further (evaluate) and describes it

    def describe(self, precision: str) -> Description:
        """What runs a forward in `precision` (autocast) here: the fast path's backend and why it passed over
        its Triton kernels, an exported file's fixed input size (see Implementation.describe)."""
        return self.implementation.describe(self.module, Target(str(self.device), precision))


def checkpoint_num_classes(path: str | os.PathLike) -> int:
    """The class count a checkpoint's classifier was trained for (1000 for ImageNet weights); for an exported
    .onnx or OpenVINO IR .xml file, its logits' width."""
    if is_exported_file(path):
        return exported_num_classes(path)
    from .weights import read_checkpoint

    state_dict = read_checkpoint(path)
    for key, tensor in state_dict.items():
        bare = key.removeprefix("module.").removeprefix("_orig_mod.")
        if bare in _CLASSIFIER_KEYS and tensor.ndim == 2:
            return int(tensor.shape[0])
    return 1000  # no classifier found: let loading report what does not fit


def exported_num_classes(path: str | os.PathLike) -> int:
    """The width of an exported classifier's [batch, classes] output, read from the ONNX graph (or the OpenVINO IR
    .xml file)."""
    import onnx

    from .errors import CheckpointError

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file")
    if path.lower().endswith(".xml"):
        from .runtimes.sessions import ir_signature

        return ir_signature(path).num_classes
    try:
        graph = onnx.load(path, load_external_data=False).graph
    except Exception as err:  # onnx raises DecodeError and friends for files that are not ONNX
        raise CheckpointError(f"{path}: not an ONNX file ({type(err).__name__})") from None
    dims = [d.dim_value for d in graph.output[0].type.tensor_type.shape.dim] if graph.output else []
    if len(graph.input) == 1 and len(graph.output) > 1 and len(dims) == 4:  # `poolformer export --features`
        from .runtimes.sessions import features_export_error

        raise features_export_error(path, len(graph.output))
    if len(graph.input) != 1 or len(dims) != 2 or dims[1] < 1:
        raise CheckpointError(f"{path}: not an image classifier export (one input, [batch, classes] output)")
    return int(dims[1])


def uses_published_weights(model: str, *, weights: str | os.PathLike | None, pretrained: bool) -> bool:
    """Whether a classifier of `model` runs the published weights: asked for, or by default when no checkpoint is
    given. Refuses (ConfigError) both at once, and a model without published weights and no checkpoint: random
    weights would print confident nonsense."""
    if weights is not None and pretrained:
        raise ConfigError("pass either --weights PATH or --pretrained, not both")
    if weights is not None:
        return False
    spec = get_spec(model)
    if not spec.has_weights:
        raise ConfigError(f"{spec.name} has no published weights: pass a checkpoint with --weights PATH "
                          "(a randomly initialised model predicts nonsense)")
    return True


def trained_num_classes(model: str, *, weights: str | os.PathLike | None, pretrained: bool = False) -> int:
    """The class count of the trained model `load_classifier` would build (cheap: no model is built)."""
    if uses_published_weights(model, weights=weights, pretrained=pretrained):
        return 1000
    return checkpoint_num_classes(weights)


def load_classifier(
    model: str,
    *,
    weights: str | os.PathLike | None = None,
    pretrained: bool = False,
    impl: str = "ours",
    device: str | torch.device = "auto",
    labels_file: str | os.PathLike | None = None,
) -> Classifier:
    """Build `model` with trained weights in implementation `impl` on `device`: the checkpoint or exported file
    `weights`, else the published weights (downloaded once into the standard caches).

    The class count follows the checkpoint's classifier, so a fine-tuned 10-class checkpoint just works.
    Refuses (ConfigError) a model without published weights when no checkpoint is given.
    """
    spec = get_spec(model)
    pretrained = uses_published_weights(spec.name, weights=weights, pretrained=pretrained)
    num_classes = trained_num_classes(spec.name, weights=weights, pretrained=pretrained)
    where = device if isinstance(device, torch.device) else resolve_device(device)
    labels = class_names(num_classes, labels_file)
    weights_file = None if weights is None else str(weights)
    implementation = implementation_for(spec.name, impl, weights_file)
    module = implementation.build(spec.name, weights=weights_file, pretrained=pretrained, num_classes=num_classes)
    module = implementation.prepare(module, Target(str(where)))
    size = implementation.describe(module, Target(str(where))).input_size
    if size is not None:  # an exported file fixes the input size; the model name still gives crop, mean, std
        if size[0] != size[1]:
            raise ConfigError(f"{weights} takes {size[0]}x{size[1]} inputs; predict and eval preprocess to square "
                              "crops")
        spec = dataclasses.replace(spec, input_size=size[0])
    return Classifier(module, spec, impl, num_classes, labels, where, weights_file or "pretrained", implementation)


# --- which files -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ImageInput:
    """One entry of the work list: a file to classify, or an argument that named no usable file."""

    path: str
    error: str | None = None


def _has_glob(text: str) -> bool:
    return any(c in text for c in "*?[")


def collect_images(arguments: Sequence[str]) -> list[ImageInput]:
    """Expand IMAGE | DIR | GLOB arguments into files, in argument order.

    A directory gives its image files (not recursive); a glob gives every file it matches (`**` recurses);
    a plain path is used as it is. An argument that yields nothing is kept as an entry with an error.
    """
    entries: list[ImageInput] = []
    for arg in arguments:
        path = Path(arg).expanduser()
        if path.is_dir():
            found = images_in(path)
            entries.extend(ImageInput(str(p)) for p in found)
            if not found:
                entries.append(ImageInput(arg, "no image files in this directory"))
        elif path.exists() or not _has_glob(arg):
            entries.append(ImageInput(str(path)))  # a missing file fails when it is loaded
        else:
            matches = sorted(p for p in glob.glob(os.path.expanduser(arg), recursive=True) if Path(p).is_file())
            entries.extend(ImageInput(p) for p in matches)
            if not matches:
                entries.append(ImageInput(arg, "no files match this pattern"))
    return entries


# --- classifying -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Prediction:
    index: int
    label: str
    probability: float  # softmax over all outputs, 0..1


@dataclass
class ImageResult:
    image: str
    predictions: list[Prediction] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def top_k(logits: torch.Tensor, k: int, labels: Sequence[str]) -> list[list[Prediction]]:
    """logits [B, num_classes] -> for each row, the k most probable classes, most probable first."""
    probabilities = logits.float().softmax(dim=-1)
    values, indices = probabilities.topk(min(k, logits.shape[-1]), dim=-1)
    return [[Prediction(int(i), labels[int(i)], float(p)) for p, i in zip(row_p, row_i)]
            for row_p, row_i in zip(values.tolist(), indices.tolist())]


@torch.inference_mode()
def predict(
    classifier: Classifier,
    images: Sequence[ImageInput | str],
    *,
    top: int = 5,
    batch_size: int = 16,
    precision: str = "fp32",
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> list[ImageResult]:
    """Classify each image; one ImageResult per input, in order. A file that cannot be read gets its error
    and no predictions; the others are unaffected. precision: fp32, or bf16/fp16 under torch.autocast."""
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; choose from: {', '.join(PRECISIONS)}")
    if top < 1:
        raise ConfigError(f"top-k must be >= 1, not {top}")
    if batch_size < 1:
        raise ConfigError(f"batch size must be >= 1, not {batch_size}")
    entries = [e if isinstance(e, ImageInput) else ImageInput(str(e)) for e in images]
    transform = Preprocess.for_spec(classifier.spec)
    results: list[ImageResult] = []
    for start in range(0, len(entries), batch_size):
        chunk = entries[start:start + batch_size]
        readable = [e for e in chunk if e.error is None]
        tensors, errors = load_batch([e.path for e in readable], transform, max_pixels)
        loaded = {e.path: t for e, t in zip(readable, tensors) if t is not None}
        failures = {e.path: err for e, err in zip(readable, errors) if err is not None}
        ranked = {}
        if loaded:
            batch = torch.stack(list(loaded.values())).to(classifier.device)
            with autocast(classifier.device, precision):
                logits = classifier.module(batch)
            ranked = dict(zip(loaded, top_k(logits, top, classifier.labels)))
        for e in chunk:
            if e.error is not None:
                results.append(ImageResult(e.path, error=e.error))
            elif e.path in failures:
                results.append(ImageResult(e.path, error=failures[e.path]))
            else:
                results.append(ImageResult(e.path, ranked[e.path]))
    return results
