"""ImageNet-style accuracy: top-1 / top-5 over a class-folder dataset, on one process or sharded across many
(`torchrun --nproc-per-node N`). Returns an `EvalResult`; never prints (progress goes to a callback).

Counting: an image is scored when it could be read; top-1 is correct when the most probable output is the
image's class, top-5 when the class is among the five most probable (min(5, classes) for tiny heads).
Unreadable images are skipped and listed, never counted as wrong and never fatal. Under torchrun each
process takes every world_size-th image and the counts are summed with all_reduce, so the totals are the
same as a single process's.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .data import DEFAULT_MAX_PIXELS, ClassFolders, ImageDataset, Preprocess, spread_subset
from .devices import PRECISIONS, autocast
from .distributed import Distributed
from .errors import ConfigError
from .implementations import Target
from .predict import Classifier

TOP_K = 5


# --- results -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SkippedImage:
    index: int  # position in the (limited) dataset
    path: str
    error: str


@dataclass(frozen=True)
class ImageOutcome:
    """One scored image: its class and the model's top-5 (indices and softmax probabilities)."""

    index: int  # position in the (limited) dataset, for a stable order across processes
    path: str
    target: int
    top_indices: tuple[int, ...]
    top_probabilities: tuple[float, ...]

    @property
    def correct_top1(self) -> bool:
        return self.top_indices[0] == self.target

    @property
    def correct_top5(self) -> bool:
        return self.target in self.top_indices


@dataclass(frozen=True)
class EvalProgress:
    """This process's progress after a batch (under torchrun each process sees its own shard)."""

    done: int  # images read or skipped so far
    total: int
    scored: int
    correct_top1: int
    elapsed_s: float

    @property
    def top1(self) -> float:
        return 100.0 * self.correct_top1 / self.scored if self.scored else 0.0

    @property
    def images_per_s(self) -> float:
        return self.done / self.elapsed_s if self.elapsed_s > 0 else 0.0


@dataclass
class EvalResult:
    """Totals over every process. top1/top5 are percentages of scored images."""

    model: str
    impl: str
    weights: str
    root: str
    mapping: str  # how folders map to outputs: imagenet-wnid, class-map or sorted
    device: str
    precision: str
    channels_last: bool
    batch_size: int
    world_size: int
    images: int  # scored
    correct_top1: int
    correct_top5: int
    wall_s: float  # the evaluation loop (reading, preprocessing, inference), slowest process
    skipped: list[SkippedImage] = field(default_factory=list)
    outcomes: list[ImageOutcome] = field(default_factory=list)  # filled when asked for (keep_outcomes)

    @property
    def top1(self) -> float:
        return 100.0 * self.correct_top1 / self.images if self.images else 0.0

    @property
    def top5(self) -> float:
        return 100.0 * self.correct_top5 / self.images if self.images else 0.0

    @property
    def throughput(self) -> float:
        """Images scored per second of wall time (end to end, data loading included)."""
        return self.images / self.wall_s if self.wall_s > 0 else 0.0


# --- processes ---------------------------------------------------------------------------------------

def _combine(procs: Distributed, counts: list[int], wall_s: float, skipped: list, outcomes: list):
    """Sum counts, take the slowest wall time, and gather the per-image lists from every process."""
    if not procs.active:
        return counts, wall_s, skipped, outcomes
    import torch.distributed as dist

    # gloo reduces CPU tensors, nccl device tensors
    where = procs.device if procs.device.type == "cuda" else torch.device("cpu")
    summed = torch.tensor(counts, dtype=torch.int64, device=where)
    dist.all_reduce(summed, op=dist.ReduceOp.SUM)
    slowest = torch.tensor([wall_s], dtype=torch.float64, device=where)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    gathered: list = [None] * procs.world_size
    dist.all_gather_object(gathered, (skipped, outcomes))
    all_skipped = sorted((s for part, _ in gathered for s in part), key=lambda s: s.index)
    all_outcomes = sorted((o for _, part in gathered for o in part), key=lambda o: o.index)
    return summed.tolist(), float(slowest.item()), all_skipped, all_outcomes


# --- the loop ----------------------------------------------------------------------------------------

def _loader(dataset: ImageDataset, batch_size: int, workers: int, device: torch.device):
    from torch.utils.data import DataLoader

    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                      pin_memory=device.type == "cuda", drop_last=False)


@torch.inference_mode()
def evaluate(
    classifier: Classifier,
    dataset: ClassFolders,
    *,
    batch_size: int = 64,
    workers: int | None = None,
    limit: int | None = None,
    precision: str = "fp32",
    channels_last: bool = False,
    keep_outcomes: bool = False,
    procs: Distributed | None = None,
    progress: Callable[[EvalProgress], None] | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> EvalResult:
    """Top-1 / top-5 of `classifier` on `dataset`.

    workers: DataLoader processes decoding images (default: the CPU count, at most 8; 0 decodes in this one).
    limit: evaluate only this many images, spread evenly over the sorted dataset (every class represented).
    procs: this process's place in a torchrun job (see `distributed`); each takes every world_size-th image.
    keep_outcomes: also return every scored image's top-5, for a per-image report.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; choose from: {', '.join(PRECISIONS)}")
    workers = min(8, os.cpu_count() or 1) if workers is None else workers
    if batch_size < 1 or workers < 0 or (limit is not None and limit < 1):
        raise ConfigError("batch size and limit must be >= 1 and workers >= 0")
    procs = procs or Distributed(0, 1, classifier.device)
    samples = spread_subset(dataset.samples, limit)
    shard = list(range(procs.rank, len(samples), procs.world_size))
    data = ImageDataset([samples[i] for i in shard], Preprocess.for_spec(classifier.spec), max_pixels)
    device = classifier.device
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = classifier.implementation.prepare(classifier.module, Target(str(device), precision,
                                                                        channels_last=channels_last))
    k = min(TOP_K, classifier.num_classes)

    done = scored = correct1 = correct5 = 0
    skipped: list[SkippedImage] = []
    outcomes: list[ImageOutcome] = []
    start = time.perf_counter()
    if progress is not None:
        progress(EvalProgress(0, len(data), 0, 0, 0.0))
    for images, targets, local, errors in _loader(data, batch_size, workers, device):
        readable = torch.tensor([not e for e in errors], dtype=torch.bool)
        skipped.extend(SkippedImage(shard[i], samples[shard[i]].path, e) for i, e in zip(local.tolist(), errors) if e)
        done += len(errors)
        if readable.any():
            x = images[readable].to(device, non_blocking=True).contiguous(memory_format=memory_format)
            y = targets[readable].to(device)
            with autocast(device, precision):
                logits = model(x)
            probabilities, top = logits.float().softmax(dim=-1).topk(k, dim=-1)
            hits = top == y[:, None]
            scored += int(y.numel())
            correct1 += int(hits[:, 0].sum())
            correct5 += int(hits.any(dim=1).sum())
            if keep_outcomes:
                for i, t, idx, p in zip(local[readable].tolist(), y.tolist(), top.tolist(), probabilities.tolist()):
                    outcomes.append(ImageOutcome(shard[i], samples[shard[i]].path, t, tuple(idx), tuple(p)))
        if progress is not None:
            progress(EvalProgress(done, len(data), scored, correct1, time.perf_counter() - start))
    wall_s = time.perf_counter() - start

    (scored, correct1, correct5), wall_s, skipped, outcomes = _combine(
        procs, [scored, correct1, correct5], wall_s, skipped, outcomes)
    return EvalResult(
        model=classifier.spec.name, impl=classifier.impl, weights=classifier.weights, root=dataset.root,
        mapping=dataset.mapping, device=str(device), precision=precision, channels_last=channels_last,
        batch_size=batch_size, world_size=procs.world_size, images=scored, correct_top1=correct1,
        correct_top5=correct5, wall_s=wall_s, skipped=skipped, outcomes=outcomes,
    )
