"""Training steps, their correctness against an independent model, and training memory.

A train step is what timm's `benchmark.py --bench train` times: forward, cross-entropy on fixed random labels,
backward, optimizer step, then `zero_grad(set_to_none=True)`. bf16/fp16 run under autocast (weights and
optimizer state stay fp32); fp16 scales the loss with a gradient scaler. Nothing here prints or times: bench
times the step (`poolformer.bench`), summary reports the memory estimate.

Training memory (`training_memory`) is counted, not measured: parameters, gradients, optimizer state, and the
activations autograd saves for backward, seen by `torch.autograd.graph.saved_tensors_hooks` during one
forward (each storage once, parameters excluded). With gradient checkpointing every block keeps only its
input, and backward recomputes one block at a time, so the estimate is the saved tensors outside blocks,
plus every block's input, plus the largest block's own saved tensors.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .devices import PRECISIONS
from .errors import ConfigError

MODES = ("inference", "train")
OPTIMIZERS = ("sgd", "adamw")
LEARNING_RATE = 1e-4  # timm's benchmark.py; the value does not change the speed
OPTIMIZER_STATE_TENSORS = {"sgd": 1, "adamw": 2}  # per parameter: momentum buffer; exp_avg and exp_avg_sq


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ConfigError(f"unknown mode {mode!r}; choose from: {', '.join(MODES)}")


def check_optimizer(name: str) -> None:
    if name not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer {name!r}; choose from: {', '.join(OPTIMIZERS)}")


def make_optimizer(name: str, parameters: Any) -> torch.optim.Optimizer:
    """sgd: SGD with momentum 0.9 (Nesterov, as timm's "sgd"); adamw: AdamW with weight decay 0.05 (the
    official PoolFormer recipe)."""
    check_optimizer(name)
    if name == "sgd":
        return torch.optim.SGD(parameters, lr=LEARNING_RATE, momentum=0.9, nesterov=True)
    return torch.optim.AdamW(parameters, lr=LEARNING_RATE, weight_decay=0.05)


def fixed_labels(batch_size: int, num_classes: int, device: str | torch.device, seed: int = 0) -> torch.Tensor:
    """Random class indices [batch_size], the same for the same seed (the labels every step trains on)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, max(num_classes, 1), (batch_size,), generator=generator).to(device)


def set_grad_checkpointing(model: nn.Module, enable: bool = True) -> None:
    """Turn on gradient checkpointing in our models and timm's (both name it set_grad_checkpointing)."""
    setter = getattr(model, "set_grad_checkpointing", None)
    if setter is None:
        raise ConfigError(f"{type(model).__name__} has no gradient checkpointing")
    setter(enable)


@dataclass
class TrainStep:
    """One training step of `model` on fixed images and labels; call it to run a step. The loss of the last
    step is kept (a detached scalar tensor, read only after timing: reading it would synchronise a GPU)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    images: torch.Tensor
    labels: torch.Tensor
    precision: str = "fp32"
    scaler: Any = None  # torch.amp.GradScaler for fp16
    last_loss: torch.Tensor | None = None

    def __call__(self) -> None:
        device_type = self.images.device.type
        dtype = PRECISIONS[self.precision]
        with torch.autocast(device_type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = F.cross_entropy(self.model(self.images), self.labels)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.last_loss = loss.detach()


def train_step(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, optimizer: str = "sgd",
               precision: str = "fp32") -> TrainStep:
    """A TrainStep for `model` (put in training mode) with a fresh optimizer; fp16 gets a gradient scaler."""
    model.train()
    scaler = torch.amp.GradScaler(images.device.type) if precision == "fp16" else None
    return TrainStep(model, make_optimizer(optimizer, model.parameters()), images, labels, precision, scaler)


# ----------------------------------------------------------------------------------- parity


@dataclass(frozen=True)
class GradParity:
    """A model's loss and gradients against a reference model with the same weights on the same batch.
    Relative differences: |a - b| / |b| for the loss; for the gradients the largest over parameters of
    max|a - b| / max|b|, where max|b| is at least GRAD_FLOOR of the largest gradient of any parameter (a
    parameter whose gradient is almost zero would otherwise divide rounding noise by almost nothing)."""

    reference: str
    samples: int
    loss_relative_diff: float
    grad_relative_diff: float
    worst_parameter: str | None
    tolerance: float
    ok: bool


# fp32 sums reordered (another implementation, compile, channels-last): ~1e-6 to 1e-4 relative. Under
# autocast the gradients keep two or three digits.
GRAD_TOLERANCE = {"fp32": 1e-3, "bf16": 0.2, "fp16": 0.2}
GRAD_FLOOR = 1e-4


def loss_and_grads(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, precision: str = "fp32",
                   forward: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None
                   ) -> tuple[float, dict[str, torch.Tensor]]:
    """One forward and backward without an optimizer step: the loss and {parameter name: fp32 gradient}.
    forward: how to get logits from the model (default: model(images)). The model's gradients are cleared.
    Stochastic depth draws from torch's generator: seed it alike before each call of models compared."""
    device_type = images.device.type
    dtype = PRECISIONS[precision]
    model.zero_grad(set_to_none=True)
    with torch.autocast(device_type, dtype=dtype or torch.float32, enabled=dtype is not None):
        logits = forward(model, images) if forward is not None else model(images)
        loss = F.cross_entropy(logits.float(), labels)
    loss.backward()
    grads = {name: p.grad.detach().float().clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.item(), grads


def compare_grads(got: tuple[float, dict[str, torch.Tensor]], expected: tuple[float, dict[str, torch.Tensor]],
                  reference: str, samples: int, precision: str,
                  rename: Callable[[str], str] | None = None) -> GradParity:
    """GradParity of `got` against `expected` (loss, grads); rename maps got's parameter names to expected's.
    A parameter with a gradient on one side only makes the parity fail."""
    loss, grads = got
    ref_loss, ref_grads = expected
    worst, worst_name = 0.0, None
    floor = GRAD_FLOOR * max((g.abs().max().item() for g in ref_grads.values()), default=0.0)
    names = {rename(n) if rename else n: n for n in grads}
    unmatched = set(names) ^ set(ref_grads)
    for ref_name, grad in ref_grads.items():
        if ref_name not in names:
            continue
        mine = grads[names[ref_name]]
        if mine.shape != grad.shape:
            mine = mine.reshape(grad.shape)
        relative = (mine - grad).abs().max().item() / max(grad.abs().max().item(), floor, 1e-30)
        if relative > worst:
            worst, worst_name = relative, ref_name
    loss_relative = abs(loss - ref_loss) / max(abs(ref_loss), 1e-30)
    tolerance = GRAD_TOLERANCE[precision]
    ok = not unmatched and worst <= tolerance and loss_relative <= tolerance
    if unmatched:
        worst_name = f"unmatched: {sorted(unmatched)[0]}"
    return GradParity(reference, samples, loss_relative, worst, worst_name, tolerance, ok)


# ----------------------------------------------------------------------------------- memory


@dataclass(frozen=True)
class TrainingMemory:
    """Memory one training step needs at a batch size and resolution, in bytes (fp32 weights; activations in
    the step's precision). activations: saved for backward without checkpointing; activations_checkpointed:
    with gradient checkpointing (None where the model has none)."""

    batch_size: int
    height: int
    width: int
    optimizer: str
    precision: str
    params_bytes: int
    grads_bytes: int
    optimizer_bytes: int
    activations_bytes: int
    activations_checkpointed_bytes: int | None

    @property
    def total_bytes(self) -> int:
        return self.params_bytes + self.grads_bytes + self.optimizer_bytes + self.activations_bytes

    @property
    def total_checkpointed_bytes(self) -> int | None:
        if self.activations_checkpointed_bytes is None:
            return None
        return self.params_bytes + self.grads_bytes + self.optimizer_bytes + self.activations_checkpointed_bytes

    def as_json(self) -> dict[str, Any]:
        return {"batch_size": self.batch_size, "height": self.height, "width": self.width,
                "optimizer": self.optimizer, "precision": self.precision, "params_bytes": self.params_bytes,
                "grads_bytes": self.grads_bytes, "optimizer_bytes": self.optimizer_bytes,
                "activations_bytes": self.activations_bytes,
                "activations_checkpointed_bytes": self.activations_checkpointed_bytes,
                "total_bytes": self.total_bytes, "total_checkpointed_bytes": self.total_checkpointed_bytes}


def _storage_key(t: torch.Tensor) -> tuple[Any, ...]:
    """What identifies the memory behind a tensor: its storage's address on real devices; on the meta device,
    where every storage is at 0, the identity of the tensor a view was taken of (two views of one meta tensor
    made by separate ops are then counted twice: an overestimate of a few percent at most)."""
    if t.device.type == "meta":
        return ("meta", id(t._base if t._base is not None else t))
    return (t.device, t.untyped_storage().data_ptr())


class _SavedTensors:
    """Counts the bytes autograd saves for backward, per block (the MetaFormerBlock or timm block running when
    a tensor was saved; None outside blocks), each storage once, parameters excluded."""

    def __init__(self, model: nn.Module, blocks: list[nn.Module]):
        self.seen: set[tuple[Any, ...]] = {_storage_key(p) for p in model.parameters()}
        self.by_block: dict[int | None, int] = {}
        self.block_inputs = 0
        self.current: int | None = None
        self.handles = []
        for index, block in enumerate(blocks):
            self.handles.append(block.register_forward_pre_hook(self._enter(index)))
            self.handles.append(block.register_forward_hook(self._leave))

    def _enter(self, index: int):
        def hook(module: nn.Module, args: tuple) -> None:
            self.current = index
            self.block_inputs += sum(a.untyped_storage().nbytes() for a in args if isinstance(a, torch.Tensor))

        return hook

    def _leave(self, module: nn.Module, args: tuple, output: Any) -> None:
        self.current = None

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key not in self.seen:
            self.seen.add(key)
            self.by_block[self.current] = self.by_block.get(self.current, 0) + t.untyped_storage().nbytes()
        return t

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The units gradient checkpointing recomputes: every block of every stage (ours and timm's MetaFormer)."""
    stages = getattr(model, "stages", None)
    if stages is None:
        return []
    return [block for stage in stages for block in getattr(stage, "blocks", [])]


def saved_activation_bytes(model: nn.Module, images: torch.Tensor, precision: str = "fp32") -> tuple[int, int | None]:
    """(bytes saved for backward by one forward, the same with gradient checkpointing or None without blocks).
    The model runs once in training mode with gradients on and checkpointing off (put back as it was after);
    nothing is kept."""
    blocks = _blocks(model)
    counter = _SavedTensors(model, blocks)
    dtype = PRECISIONS[precision]
    was_training = model.training
    stages = list(getattr(model, "stages", []))
    checkpointing = [getattr(stage, "grad_checkpointing", False) for stage in stages]
    for stage in stages:
        if hasattr(stage, "grad_checkpointing"):
            stage.grad_checkpointing = False
    model.train()
    try:
        autocast = (torch.autocast(images.device.type, dtype=dtype) if dtype is not None
                    else contextlib.nullcontext())
        with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t), torch.enable_grad(), autocast:
            out = model(images)
        del out
    finally:
        counter.close()
        model.train(was_training)
        for stage, enabled in zip(stages, checkpointing):
            if hasattr(stage, "grad_checkpointing"):
                stage.grad_checkpointing = enabled
    total = sum(counter.by_block.values())
    if not blocks:
        return total, None
    inside = [n for key, n in counter.by_block.items() if key is not None]
    outside = counter.by_block.get(None, 0)
    return total, outside + counter.block_inputs + max(inside, default=0)


def training_memory(model: nn.Module, batch_size: int, height: int, width: int, optimizer: str = "sgd",
                    precision: str = "fp32") -> TrainingMemory:
    """The memory a train step of `model` needs (see the module docstring), counted on the model's device (the
    meta device counts shapes only: no memory, no arithmetic, fp32 only) by forwards at batch 1 and 2."""
    check_optimizer(optimizer)
    trainable = [p for p in model.parameters() if p.requires_grad]
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    grads = sum(p.numel() * p.element_size() for p in trainable)
    state = OPTIMIZER_STATE_TENSORS[optimizer] * grads
    device = next(model.parameters()).device
    if batch_size <= 2:
        saved, checkpointed = saved_activation_bytes(model, torch.zeros(batch_size, 3, height, width, device=device),
                                                     precision)
    else:  # saved tensors grow linearly with the batch (autocast's weight copies do not): two points fix the line
        one, one_ckpt = saved_activation_bytes(model, torch.zeros(1, 3, height, width, device=device), precision)
        two, two_ckpt = saved_activation_bytes(model, torch.zeros(2, 3, height, width, device=device), precision)
        saved = one + (batch_size - 1) * (two - one)
        checkpointed = None if one_ckpt is None else one_ckpt + (batch_size - 1) * (two_ckpt - one_ckpt)
    return TrainingMemory(batch_size, height, width, optimizer, precision, params, grads, state, saved, checkpointed)
