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


def disable_stochastic_depth(model: nn.Module) -> None:
    """Stochastic depth off in our models and timm's, as in timm's train benchmark (its models default to none):
    every step then does the same work, and two implementations' gradients can be compared."""
    for module in model.modules():
        for attribute in ("p", "drop_prob"):  # ours: DropPath.p; timm: DropPath.drop_prob
            if type(module).__name__ == "DropPath" and hasattr(module, attribute):
                setattr(module, attribute, 0.0)


def original_head(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """A PoolFormer v1's logits with the original head (normalise the map with GroupNorm(1), then average, then
    the classifier) on any model that has `forward_features` and `head.norm`/`head.fc`: timm's v1, whose own head
    averages first and then normalises over channels."""
    norm = model.head.norm
    return model.head.fc(F.group_norm(model.forward_features(images), 1, norm.weight, norm.bias, 1e-5).mean((2, 3)))


def timm_v1_head(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """A PoolFormer v1's logits with timm's head (average, then LayerNorm over channels with eps 1e-6, then the
    classifier) on our model: what timm's v1 computes from the same weights."""
    norm = model.head.norm
    pooled = model.forward_features(images).mean((2, 3))
    return model.head.fc(F.layer_norm(pooled, pooled.shape[1:], norm.weight, norm.bias, 1e-6))


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


class SavedTensorCount:
    """Within this context, the forwards of `model` count the bytes autograd saves for backward, per block (the
    block of a stage running when a tensor was saved; None outside blocks), each storage once, parameters
    excluded. Gradient checkpointing is off inside (put back after). `total` and `checkpointed` (see the module
    docstring) read the count; the model runs as the caller runs it (summary counts during its own trace)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.blocks = _blocks(model)
        self.seen: set[tuple[Any, ...]] = {_storage_key(p) for p in model.parameters()}
        self.by_block: dict[int | None, int] = {}
        self.block_inputs = 0
        self.current: int | None = None
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> SavedTensorCount:
        for index, block in enumerate(self.blocks):
            self._stack.callback(block.register_forward_pre_hook(self._enter(index)).remove)
            self._stack.callback(block.register_forward_hook(self._leave).remove)
        for stage in getattr(self.model, "stages", []):
            if getattr(stage, "grad_checkpointing", False):
                stage.grad_checkpointing = False
                self._stack.callback(setattr, stage, "grad_checkpointing", True)
        self._stack.enter_context(torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t))
        self._stack.enter_context(torch.enable_grad())
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stack.close()

    def _enter(self, index: int):
        def hook(module: nn.Module, args: tuple) -> None:
            self.current = index
            self.block_inputs += sum(a.untyped_storage().nbytes() for a in args if isinstance(a, torch.Tensor))

        return hook

    def _leave(self, module: nn.Module, args: tuple, output: Any) -> None:
        self.current = None

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key not in self.seen:
            self.seen.add(key)
            self.by_block[self.current] = self.by_block.get(self.current, 0) + t.untyped_storage().nbytes()
        return t

    @property
    def total(self) -> int:
        """Bytes saved for backward without checkpointing."""
        return sum(self.by_block.values())

    @property
    def checkpointed(self) -> int | None:
        """With checkpointing: what is saved outside blocks, every block's input, and the largest block's own saved
        tensors (recomputed one block at a time in backward); None for a model without blocks."""
        if not self.blocks:
            return None
        inside = [n for key, n in self.by_block.items() if key is not None]
        return self.by_block.get(None, 0) + self.block_inputs + max(inside, default=0)


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The units gradient checkpointing recomputes: every block of every stage (ours and timm's MetaFormer)."""
    stages = getattr(model, "stages", None)
    if stages is None:
        return []
    return [block for stage in stages for block in getattr(stage, "blocks", [])]


def saved_activation_bytes(model: nn.Module, images: torch.Tensor, precision: str = "fp32") -> tuple[int, int | None]:
    """(bytes saved for backward by one forward, the same with gradient checkpointing or None without blocks).
    The model runs once with autograd on, in eval mode: no stochastic depth (as train rows run) and BatchNorm's
    running statistics untouched (its few per-channel statistics of training mode are not counted). Every
    module's mode is put back after; nothing is kept."""
    dtype = PRECISIONS[precision]
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        autocast = (torch.autocast(images.device.type, dtype=dtype) if dtype is not None
                    else contextlib.nullcontext())
        with SavedTensorCount(model) as count, autocast:
            model(images)
    finally:
        for module, training in modes.items():
            module.training = training
    return count.total, count.checkpointed


def training_memory(model: nn.Module, batch_size: int, height: int, width: int, optimizer: str = "sgd",
                    precision: str = "fp32", saved: tuple[int, int | None] | None = None) -> TrainingMemory:
    """The memory a train step of `model` needs (see the module docstring), counted on the model's device (the
    meta device counts shapes only: no memory, no arithmetic, fp32 only). In fp32 every saved tensor grows with
    the batch, and one forward at the batch counts them; under autocast the weights' low-precision copies do not,
    and forwards at batch 1 and 2 fix the line. saved: (total, checkpointed) already counted by the caller at this
    batch (summary counts during its own trace), instead of a forward here."""
    check_optimizer(optimizer)
    trainable = [p for p in model.parameters() if p.requires_grad]
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    grads = sum(p.numel() * p.element_size() for p in trainable)
    state = OPTIMIZER_STATE_TENSORS[optimizer] * grads
    device = next(model.parameters()).device
    if saved is not None:
        activations, checkpointed = saved
    elif precision == "fp32" or batch_size <= 2:
        activations, checkpointed = saved_activation_bytes(
            model, torch.zeros(batch_size, 3, height, width, device=device), precision)
    else:
        one, one_ckpt = saved_activation_bytes(model, torch.zeros(1, 3, height, width, device=device), precision)
        two, two_ckpt = saved_activation_bytes(model, torch.zeros(2, 3, height, width, device=device), precision)
        activations = one + (batch_size - 1) * (two - one)
        checkpointed = None if one_ckpt is None else one_ckpt + (batch_size - 1) * (two_ckpt - one_ckpt)
    return TrainingMemory(batch_size, height, width, optimizer, precision, params, grads, state, activations,
                          checkpointed)
