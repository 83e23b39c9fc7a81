"""Checkpoints at the edge: reading files safely, mapping foreign key layouts, downloading published weights.

A layout is data: a list of (our-key regex, foreign-key template) rules. Mapping one of our keys to a
layout is the first rule that matches; mapping back is the inverse of that table over the model's keys,
so both directions come from the same rules. Layouts:

- ``poolformer``: ours, the same names as timm's (``stem.conv``, ``stages.i.blocks.j.*``, ``head.fc``).
- ``official``: sail-sg/poolformer release files (``patch_embed.proj``, ``network.{0..6}``, ``norm``, ``head``);
  a features-only model's per-output norms are the dense-task backbones' ``norm0/2/4/6``.
- ``metaformer``: sail-sg/metaformer (PoolFormerV2) files (``downsample_layers.i``, ``stages.i.j``).
- ``transformers``: Hugging Face ``PoolFormerForImageClassification``.

Where a layout stores an MLP as Linear [out, in] and we use a 1x1 conv [out, in, 1, 1], tensors are
reshaped when their element counts agree.

Dense-task checkpoints (mmdet RetinaNet / Mask R-CNN, mmseg Semantic FPN) keep the backbone under
``backbone.`` beside the task's own modules (``neck``, ``bbox_head``, ``decode_head``, ...): the backbone is
loaded and the rest set aside, counted in the `LoadReport`. A features-only model takes classification
weights too (their head set aside, the per-output norms left as initialised), the usual start of fine-tuning.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from .errors import CheckpointError, WeightsUnavailableError
from .zoo import ModelSpec

_B = r"stages\.(?P<s>\d+)\.blocks\.(?P<j>\d+)\."  # a block's prefix in our layout
_P = r"(?P<p>\w+)$"  # a final parameter name

LAYOUTS: dict[str, list[tuple[str, str]]] = {
    "poolformer": [(r"(?P<key>.+)", "{key}")],
    "official": [
        (r"stem\.conv\." + _P, "patch_embed.proj.{p}"),
        (r"stages\.(?P<s>\d+)\.downsample\.conv\." + _P, "network.{down}.proj.{p}"),
        (r"stages\.(?P<s>\d+)\.pos_embed$", "network.{pos}.pos_embed"),
        (_B + r"layer_scale(?P<n>[12])\.scale$", "network.{net}.{j}.layer_scale_{n}"),
        (_B + r"(?P<rest>.+)", "network.{net}.{j}.{rest}"),
        (r"head\.norm\." + _P, "norm.{p}"),
        (r"head\.fc\." + _P, "head.{p}"),
        (r"feature_norms\.(?P<f>\d+)\." + _P, "norm{fnet}.{p}"),
    ],
    "metaformer": [
        (r"stem\.conv\." + _P, "downsample_layers.0.conv.{p}"),
        (r"stem\.norm\." + _P, "downsample_layers.0.post_norm.{p}"),
        (r"stages\.(?P<s>\d+)\.downsample\.conv\." + _P, "downsample_layers.{s}.conv.{p}"),
        (r"stages\.(?P<s>\d+)\.downsample\.norm\." + _P, "downsample_layers.{s}.pre_norm.{p}"),
        (_B + r"(?P<rest>.+)", "stages.{s}.{j}.{rest}"),
        (r"head\.norm\." + _P, "norm.{p}"),
        (r"head\.fc\." + _P, "head.{p}"),
    ],
    "transformers": [
        (r"stem\.conv\." + _P, "poolformer.encoder.patch_embeddings.0.projection.{p}"),
        (r"stages\.(?P<s>\d+)\.downsample\.conv\." + _P, "poolformer.encoder.patch_embeddings.{s}.projection.{p}"),
        (_B + r"norm1\." + _P, "poolformer.encoder.block.{s}.{j}.before_norm.{p}"),
        (_B + r"norm2\." + _P, "poolformer.encoder.block.{s}.{j}.after_norm.{p}"),
        (_B + r"layer_scale(?P<n>[12])\.scale$", "poolformer.encoder.block.{s}.{j}.layer_scale_{n}"),
        (_B + r"mlp\.fc(?P<n>[12])\." + _P, "poolformer.encoder.block.{s}.{j}.output.conv{n}.{p}"),
        (r"head\.norm\." + _P, "norm.{p}"),
        (r"head\.fc\." + _P, "classifier.{p}"),
    ],
}
# timm uses our names; it is listed so users can name it.
LAYOUTS["timm"] = LAYOUTS["poolformer"]

# Containers that training scripts wrap a state_dict in; prefixes that wrappers (DDP, torch.compile) add.
_WRAPPERS = ("state_dict", "model", "model_state_dict")
_PREFIXES = ("module.", "_orig_mod.")


def _foreign_key(key: str, layout: str, pos_stage: int | None = None) -> str | None:
    """`key` in `layout`. The official files number stages and downsamplings in one list (`network`: blocks
    at 2s, downsampling at 2s-1), where a hybrid's position embedding takes its own slot before the blocks of
    stage `pos_stage`, shifting everything after it by one."""
    for pattern, template in LAYOUTS[layout]:
        m = re.fullmatch(pattern, key)
        if m:
            fields = m.groupdict()
            if "s" in fields:
                s = int(fields["s"])
                after_pos = pos_stage is not None and s >= pos_stage
                fields.update(net=2 * s + after_pos, down=2 * s - 1 + (after_pos and s > pos_stage), pos=2 * s)
            if "f" in fields:  # fork_feat's output norms are numbered by their stage's slot in `network`
                fields.update(fnet=2 * int(fields["f"]))
            return template.format(**fields)
    return None


def key_map(model: nn.Module, layout: str) -> dict[str, str] | None:
    """{our key: the layout's key} for every entry of the model's state_dict, or None if the layout cannot
    name some of them (e.g. v2's stem norm in the transformers layout)."""
    stages = getattr(model, "stages", [])
    pos_stage = next((i for i, st in enumerate(stages) if getattr(st, "pos_embed", None) is not None), None)
    mapping = {}
    for key in model.state_dict():
        foreign = _foreign_key(key, layout, pos_stage)
        if foreign is None:
            return None
        mapping[key] = foreign
    return mapping


def export_state_dict(model: nn.Module, layout: str = "official") -> dict[str, torch.Tensor]:
    """The model's weights under another layout's key names (Linear-shaped where the layout uses Linear)."""
    if layout not in LAYOUTS:
        raise CheckpointError(f"unknown layout {layout!r}; choose from: {', '.join(LAYOUTS)}")
    mapping = key_map(model, layout)
    if mapping is None:
        raise CheckpointError(f"the {layout} layout cannot express {type(model).__name__} {_model_name(model)}")
    linear_mlp = layout == "metaformer"
    out = {}
    for ours, tensor in model.state_dict().items():
        if linear_mlp and re.search(r"\.mlp\.fc[12]\.weight$", ours):
            tensor = tensor.flatten(1)
        out[mapping[ours]] = tensor
    return out


@dataclass(frozen=True)
class LoadReport:
    """What loading a checkpoint did. set_aside: keys of the file the model does not take, by group (a
    dense-task file's neck and heads; a classifier's head in a features-only model), with their counts."""

    path: str
    layout: str
    num_tensors: int
    set_aside: tuple[tuple[str, int], ...] = ()
    initialised: tuple[str, ...] = ()  # our keys the file has no value for, left as initialised

    @property
    def set_aside_count(self) -> int:
        return sum(count for _, count in self.set_aside)

    def note(self) -> str | None:
        """One line for a user when the file was not taken whole, else None."""
        if not self.set_aside and not self.initialised:
            return None
        parts = []
        if self.set_aside:
            groups = ", ".join(f"{name} {count}" for name, count in self.set_aside)
            parts.append(f"set aside {self.set_aside_count} keys the model does not use ({groups})")
        if self.initialised:
            parts.append(f"{len(self.initialised)} tensors not in the file left as initialised "
                         f"({_abbreviate(list(self.initialised))})")
        return f"{Path(self.path).name} ({self.layout} layout): " + "; ".join(parts)


def _model_name(model: nn.Module) -> str:
    spec = getattr(model, "spec", None)
    return spec.name if spec is not None else type(model).__name__


def _abbreviate(items: list[str], limit: int = 3) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... (+{len(items) - limit} more)" if len(items) > limit else "")


def detect_layout(model: nn.Module, keys: set[str]) -> tuple[str, dict[str, str]]:
    """The layout whose key names cover the most of `keys`, with its {our key: foreign key} map."""
    best: tuple[int, str, dict[str, str]] | None = None
    for layout in ("poolformer", "official", "metaformer", "transformers"):
        mapping = key_map(model, layout)
        if mapping is None:
            continue
        hits = len(keys & set(mapping.values()))
        if best is None or hits > best[0]:
            best = (hits, layout, mapping)
    if best is None or best[0] == 0:
        raise CheckpointError(
            f"checkpoint keys match no known layout for {_model_name(model)} (first keys: "
            f"{_abbreviate(sorted(keys))}); expected official sail-sg, timm or transformers PoolFormer weights"
        )
    return best[1], best[2]


_BACKBONE = "backbone."  # dense-task checkpoints (mmdet, mmseg) keep the backbone under this prefix


def split_backbone(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """(the backbone's keys without their prefix, {task module: key count} set aside) of a dense-task
    checkpoint; the state_dict unchanged and nothing set aside for any other file."""
    if not any(key.startswith(_BACKBONE) for key in state_dict):
        return dict(state_dict), {}
    backbone, aside = {}, {}
    for key, tensor in state_dict.items():
        if key.startswith(_BACKBONE):
            backbone[key[len(_BACKBONE):]] = tensor
        else:
            group = key.split(".", 1)[0]
            aside[group] = aside.get(group, 0) + 1
    return backbone, aside


def _classifier_keys(model: nn.Module, keys: set[str]) -> set[str]:
    """A features-only model loading classification weights: the file's head and final-norm keys, which it
    does not take (official `norm.*`/`head.*`, timm `head.norm.*`/`head.fc.*`, transformers `classifier.*`)."""
    if getattr(model, "head", True) is not None:
        return set()
    return {k for k in keys if k.startswith(("head.", "classifier.")) or k in ("norm.weight", "norm.bias")}


def convert_state_dict(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> tuple[dict[str, torch.Tensor], str]:
    """Map a checkpoint's state_dict in any known layout onto the model's keys.

    Returns (state_dict in our layout, detected layout name). Raises CheckpointError listing missing,
    unexpected and mis-shaped keys (abbreviated) when the checkpoint is for another architecture.
    """
    converted, layout, _ = _convert(state_dict, model)
    return converted, layout


def _convert(state_dict: Mapping[str, torch.Tensor],
             model: nn.Module) -> tuple[dict[str, torch.Tensor], str, LoadReport]:
    """convert_state_dict, with what was set aside or left initialised as a LoadReport (path left empty)."""
    state_dict, aside = split_backbone(_strip_prefixes(dict(state_dict)))
    head_keys = _classifier_keys(model, set(state_dict))
    if head_keys:
        aside["classifier head"] = len(head_keys)
        state_dict = {k: v for k, v in state_dict.items() if k not in head_keys}
    layout, mapping = detect_layout(model, set(state_dict))
    expected = model.state_dict()
    converted, missing, misshaped = {}, [], []
    for ours, foreign in mapping.items():
        if foreign not in state_dict:
            missing.append(foreign)
            continue
        tensor, want = state_dict[foreign], expected[ours]
        if tensor.shape != want.shape:
            if tensor.numel() != want.numel():
                misshaped.append(f"{foreign}: checkpoint {list(tensor.shape)} vs model {list(want.shape)}")
                continue
            tensor = tensor.reshape(want.shape)
        converted[ours] = tensor
    unexpected = sorted(set(state_dict) - set(mapping.values()))
    initialised = ()
    new_norms = r"norm\d+\.\w+|feature_norms\.\d+\.\w+"  # a features-only model's own, in any layout
    if head_keys and missing and all(re.fullmatch(new_norms, k) for k in missing):
        # classification weights in a backbone: the per-output norms are new, as when fine-tuning starts
        initialised = tuple(ours for ours, foreign in mapping.items() if foreign in missing)
        missing = []
    if missing or unexpected or misshaped:
        parts = [f"{len(v)} {label} ({_abbreviate(v)})" for label, v in
                 (("missing keys", missing), ("unexpected keys", unexpected), ("mis-shaped", misshaped)) if v]
        hint = ""
        dense = any(re.fullmatch(r"norm[0246]\.\w+", k) for k in unexpected)
        if dense and getattr(model, "head", None) is not None:
            hint = ("; it is a detection/segmentation backbone: load it into a features-only model "
                    "(--features, create_model(..., features_only=True))")
        raise CheckpointError(
            f"checkpoint does not fit {_model_name(model)} (detected layout: {layout}): " + "; ".join(parts) + hint
        )
    report = LoadReport("", layout, len(converted), tuple(aside.items()), initialised)
    return converted, layout, report


def _strip_prefixes(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in _PREFIXES:
        if state_dict and all(k.startswith(prefix) for k in state_dict):
            state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
    return state_dict


def read_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A flat {key: tensor} dict from a .safetensors or PyTorch file, never unpickling arbitrary objects.

    PyTorch files are read with ``weights_only=True``: a pickle that would import or call anything but
    tensors and plain containers is refused before it can run. Wrapped checkpoints (``state_dict``,
    ``model``) are unwrapped.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors" or _is_safetensors(path):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(f"could not read safetensors file {path}: {_one_line(err)}") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's safe unpickler says "Unsupported global" when the pickle wants to import a callable or
        # class (how pickled code runs); garbage bytes fail with other messages.
        if "unsupported global" in str(err).lower():
            raise CheckpointError(
                f"refusing to load {path}: its pickle wants to import or run code, which is never done for "
                "untrusted files (weights_only=True); convert it to safetensors in an environment you trust"
            ) from None
        raise CheckpointError(
            f"could not read checkpoint {path}: not a PyTorch or safetensors checkpoint, or corrupt or truncated"
        ) from None
    except Exception as err:  # torch.load on arbitrary bytes raises many types (IndexError, EOFError, ...)
        detail = _one_line(err)  # some say only a number (the bytes read as pickle's magic number)
        detail = "" if detail.isdigit() else f" ({detail})"
        raise CheckpointError(
            f"could not read checkpoint {path}: not a PyTorch or safetensors checkpoint, or truncated{detail}"
        ) from None
    for wrapper in _WRAPPERS:
        if isinstance(obj, dict) and wrapper in obj and isinstance(obj[wrapper], dict):
            obj = obj[wrapper]
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} holds no state_dict of tensors (found {type(obj).__name__})")
    return obj


def _is_safetensors(path: Path) -> bool:
    """safetensors files start with an 8-byte little-endian header length, then a JSON object."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 100_000_000


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:200] if text else type(err).__name__


def load_checkpoint(model: nn.Module, path: str | os.PathLike) -> LoadReport:
    """Load a checkpoint file in any supported layout into `model` (strictly: every key must fit)."""
    state_dict = read_checkpoint(path)
    converted, _, report = _convert(state_dict, model)
    model.load_state_dict(converted, strict=not report.initialised)
    return dataclasses.replace(report, path=str(path))


# --- published weights --------------------------------------------------------------------------------

def _offline() -> bool:
    from .settings import offline

    return offline()


def _reachable(url: str, timeout_s: float = 3.0) -> bool:
    """Whether the URL's host accepts a TCP connection: a quick probe, so that an offline machine fails in
    seconds instead of sitting through a download client's retries."""
    import socket
    from urllib.parse import urlparse

    parsed = urlparse(url)
    try:
        with socket.create_connection((parsed.hostname, parsed.port or 443), timeout=timeout_s):
            return True
    except OSError:
        return False


def _release_cache_path(spec: ModelSpec) -> Path:
    """Where the authors' release file lives in torch's standard cache (~/.cache/torch/hub/checkpoints)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(spec.url or spec.name).name


def download_weights(spec: ModelSpec) -> Path:
    """A local path to the published weights of `spec`, downloading them into the standard caches if needed.

    Tries the timm-layout safetensors on the Hugging Face hub (its cache works offline), then the authors'
    release URL (torch hub's checkpoint cache). Raises WeightsUnavailableError saying what to pass instead.
    """
    if not spec.has_weights:
        raise WeightsUnavailableError(f"{spec.name} has no published weights; pass a checkpoint with --weights PATH")
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    # Cached copies first, so a machine without network never waits on a download attempt.
    if spec.hf_hub_id:
        cached_hub = try_to_load_from_cache(spec.hf_hub_id, "model.safetensors")
        if isinstance(cached_hub, str):
            return Path(cached_hub)
    cached_release = _release_cache_path(spec)
    if spec.url and cached_release.is_file():
        return cached_release

    failures = []
    if spec.hf_hub_id:
        if _offline() or not _reachable("https://huggingface.co"):
            failures.append(f"hf-hub {spec.hf_hub_id} (offline)")
        else:
            try:
                return Path(hf_hub_download(spec.hf_hub_id, "model.safetensors"))
            except Exception as err:  # unreachable hub, missing repo: all mean "try the next source"
                failures.append(f"hf-hub {spec.hf_hub_id} ({type(err).__name__})")
    if spec.url:
        if _offline() or not _reachable(spec.url):
            failures.append(f"{spec.url} (offline)")
        else:
            try:
                cached_release.parent.mkdir(parents=True, exist_ok=True)
                torch.hub.download_url_to_file(spec.url, str(cached_release), progress=False)
                return cached_release
            except Exception as err:
                failures.append(f"{spec.url} ({type(err).__name__})")
    where = spec.url or f"https://huggingface.co/{spec.hf_hub_id}"
    raise WeightsUnavailableError(
        f"could not download weights for {spec.name}: tried {'; '.join(failures)}. Download {where} "
        f"yourself and pass it with --weights PATH (weights=PATH in Python), or put it at {_release_cache_path(spec)}"
    )


def load_pretrained(model: nn.Module, spec: ModelSpec) -> LoadReport:
    return load_checkpoint(model, download_weights(spec))
