"""Counting the work a model does, four ways, and saying why the counts differ.

Units, always named:
- MACs: multiply-accumulates (one multiply + one add = 1 MAC). fvcore calls these "flops" and the authors
  publish fvcore counts, so published PoolFormer figures are MACs. fvcore also charges 5 per element for
  normalisation layers and skips (lists as unsupported) pooling, elementwise ops and activations.
- FLOPs: floating-point operations; torch's `FlopCounterMode` counts 2 per MAC, and only for conv/matmul.
- ops: our analytic count of every arithmetic operation (1 MAC = 2 ops; one add, multiply, divide, max or
  transcendental function on one element = 1 op); see `_ELEMENTWISE_OPS` and `_op_cost`.
- bytes: what each operator reads and writes in eager execution (inputs + outputs, every tensor once per
  operator, no cache reuse); ops / bytes is the arithmetic intensity.

The analytic count is traced at the aten level (`TorchDispatchMode`) so every operator a model runs is
charged from its shapes; `AnalyticCount.uncosted_ops` lists any operator we have no formula for.
fvcore and thop are imported inside the functions that use them. Nothing here prints.
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from .errors import ConfigError
from .model import STEM_STRIDE, stage_side
from .sizes import Size
from .zoo import get_spec

MIN_RESOLUTION = STEM_STRIDE * 2**3  # four downsamplings: strides 4, 8, 16, 32

# ops per element for activations and other pointwise functions (a transcendental counts as one op).
_ELEMENTWISE_OPS = {
    "gelu": 5,  # x * 0.5 * (1 + erf(x / sqrt 2)): divide, erf, add, multiply, multiply
    "relu": 1,  # max(x, 0)
    "silu": 4,  # x / (1 + exp(-x)): exp, add, divide, multiply
    "sigmoid": 3,
    "tanh": 1,
    "pow": 1,
    "sqrt": 1,
    "rsqrt": 1,
    "exp": 1,
    "neg": 1,
    "add": 1,
    "sub": 1,
    "mul": 1,
    "div": 1,
    "rsub": 1,
}
# ops per element of a normalisation: mean (add), variance (sub, square, add), normalise (sub, multiply).
_NORM_STATS_OPS = 6
# eval-mode BatchNorm uses running statistics: subtract mean, multiply by 1/std.
_NORM_RUNNING_OPS = 2
# softmax per element: max, subtract, exp, sum, divide.
_SOFTMAX_OPS = 5
# bicubic interpolation: 16 taps, one multiply-add each, per output element.
_BICUBIC_OPS = 32

# Operators that only move or reinterpret data: no arithmetic; views touch no memory.
_VIEWS = {
    "view", "_unsafe_view", "reshape", "permute", "transpose", "t", "expand", "unbind", "squeeze",
    "unsqueeze", "flatten", "alias", "detach", "select", "slice", "split", "as_strided", "unflatten",
}
_COPIES = {"clone", "copy_", "_to_copy", "contiguous", "cat", "stack"}
_FREE = {"empty", "zeros", "ones", "full", "empty_like", "zeros_like", "ones_like", "lift_fresh"}


@dataclass
class OpCost:
    """Cost of one operator (or one module) summed over its calls."""

    calls: int = 0
    macs: int = 0  # multiply-accumulates in conv / linear / matmul
    ops: int = 0  # every arithmetic operation, 1 MAC = 2 ops
    bytes: int = 0  # read + written by the operator(s)
    written_bytes: int = 0  # the part of `bytes` that is new tensors the operator(s) produced

    def add(self, other: OpCost) -> None:
        self.calls += other.calls
        self.macs += other.macs
        self.ops += other.ops
        self.bytes += other.bytes
        self.written_bytes += other.written_bytes

    @property
    def intensity(self) -> float:
        """Arithmetic intensity, ops per byte moved."""
        return self.ops / self.bytes if self.bytes else 0.0


@dataclass
class ModuleOutput:
    """What a module returned in the traced forward."""

    shape: tuple[int, ...]
    bytes: int


@dataclass
class AnalyticCount:
    """Our complete count. by_module is keyed by the innermost module that ran the operator ("" = model)."""

    macs: int
    ops: int
    bytes: int
    written_bytes: int  # every new tensor the forward produced: the activations
    by_operator: dict[str, OpCost]
    by_module: dict[str, OpCost]
    outputs: dict[str, ModuleOutput]
    uncosted_ops: dict[str, int]

    @property
    def intensity(self) -> float:
        return self.ops / self.bytes if self.bytes else 0.0


@dataclass
class FvcoreCount:
    """fvcore's FlopCountAnalysis. Its "flops" are MACs (1 per multiply-add; norms 5 per element)."""

    macs: int
    by_operator: dict[str, int]
    by_module: dict[str, int]
    unsupported_ops: dict[str, int]  # aten op -> number of calls fvcore did not count

    @property
    def norm_macs(self) -> int:
        """What fvcore charges normalisation layers (5 per element). Implementations that write a norm out
        of elementary ops (the authors' LayerNormChannel: mean, pow, sqrt) get 0 here instead."""
        return sum(v for k, v in self.by_operator.items() if k.endswith("_norm"))


@dataclass
class ThopCount:
    """ultralytics-thop's profile: MACs of the nn.Module types it knows, and parameters."""

    macs: int
    params: int


@dataclass
class TorchCount:
    """torch.utils.flop_counter.FlopCounterMode: FLOPs (2 per MAC), conv and matmul only."""

    flops: int
    by_operator: dict[str, int]
    by_module: dict[str, int]  # subtree totals


@dataclass
class SkippedOp:
    """An operator fvcore left out, and what our analytic count charges for it."""

    op: str  # fvcore's name, e.g. aten::avg_pool2d
    calls: int
    analytic_ops: int | None  # None: our trace has no operator of that name


@dataclass
class OperatorRow:
    """One operator family across the counters. fvcore_macs None: fvcore skipped it (unsupported)."""

    op: str
    fvcore_macs: int | None
    torch_flops: int
    analytic: OpCost


@dataclass
class ModuleRow:
    """One module's own work (work inside listed descendants is in their rows, so rows add up)."""

    name: str
    fvcore_macs: int
    torch_flops: int
    analytic: OpCost


@dataclass
class FlopsReport:
    model: str
    resolution: Size  # the input's height and width
    batch_size: int
    params: int
    tokens: int  # tokens the first stage mixes, (H/4) * (W/4)
    fvcore: FvcoreCount
    thop: ThopCount
    torch: TorchCount
    analytic: AnalyticCount
    fvcore_skipped: list[SkippedOp] = field(default_factory=list)
    operators: list[OperatorRow] = field(default_factory=list)
    modules: list[ModuleRow] = field(default_factory=list)
    published_macs: int | None = None
    published_top1: float | None = None
    impl: str = "ours"  # which implementation was counted (poolformer.implementations)
    features: bool = False  # the features-only backbone (no head; four normalised maps out)

    def as_json(self) -> dict[str, Any]:
        """The machine-readable shape documented for `poolformer flops --json`: the size as `resolution` (224 for
        a square, "800x1333" otherwise), `height` and `width`."""
        return {
            "model": self.model,
            **self.resolution.json_fields(),
            "features": self.features,
            "counters": {
                "fvcore": {"macs": self.fvcore.macs, "unsupported_ops": dict(self.fvcore.unsupported_ops)},
                "thop": {"macs": self.thop.macs, "params": self.thop.params},
                "torch": {"flops": self.torch.flops},
                "analytic": {"macs": self.analytic.macs, "ops": self.analytic.ops, "bytes": self.analytic.bytes},
            },
        }


# ---------------------------------------------------------------------------------------------------------
# Analytic count: charge every aten operator from its shapes.


def op_name(func: Any) -> str:
    """aten.native_group_norm.default -> 'group_norm'; aten.add.Tensor -> 'add'."""
    name = str(getattr(func, "overloadpacket", func)).split(".")[-1]  # aten.add.Tensor -> aten.add -> add
    for prefix in ("native_", "_native_"):
        if name.startswith(prefix):
            name = name[len(prefix):]
    if name.startswith("batch_norm") or name.startswith("_batch_norm"):
        return "batch_norm"
    if name == "convolution" or name == "_convolution":
        return "conv"
    return name.lstrip("_") if name not in _VIEWS else name


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)


def _nbytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in _tensors(tensors))


def _window_sum(size: int, kernel: int, stride: int, padding: int, out: int) -> int:
    """Sum over output positions of how many input positions (not padding) each 1-D window covers."""
    total = 0
    for i in range(out):
        start = i * stride - padding
        total += min(start + kernel, size) - max(start, 0)
    return total


def _pool_ops(args: tuple, out: torch.Tensor) -> int:
    """avg_pool2d: per output, (valid inputs - 1) adds and one divide = valid inputs ops."""
    x, kernel = args[0], args[1]
    stride = args[2] if len(args) > 2 and args[2] else kernel
    padding = args[3] if len(args) > 3 else (0, 0)
    kernel, stride, padding = (_pair(v) for v in (kernel, stride, padding))
    rows = _window_sum(x.shape[-2], kernel[0], stride[0], padding[0], out.shape[-2])
    cols = _window_sum(x.shape[-1], kernel[1], stride[1], padding[1], out.shape[-1])
    planes = math.prod(out.shape[:-2])
    return planes * rows * cols


def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    v = tuple(v)
    return (v[0], v[0]) if len(v) == 1 else (v[0], v[1])


def _affine_ops(weight: Any, bias: Any) -> int:
    return int(weight is not None) + int(bias is not None)


def _op_cost(name: str, args: tuple, kwargs: dict, out: Any) -> tuple[int, int] | None:
    """(MACs, ops) of one operator call, or None when we have no formula for it."""
    first = next(_tensors(out), None)
    out_numel = first.numel() if first is not None else 0
    if name == "conv":
        weight, bias = args[1], args[2]
        macs = out_numel * math.prod(weight.shape[1:])  # weight: [C_out, C_in / groups, kh, kw]
        return macs, 2 * macs + (out_numel if bias is not None else 0)
    if name in ("mm", "bmm"):
        macs = out_numel * args[0].shape[-1]
        return macs, 2 * macs
    if name in ("addmm", "baddbmm"):
        macs = out_numel * args[1].shape[-1]
        return macs, 2 * macs + out_numel
    if name == "avg_pool2d":
        return 0, _pool_ops(args, first)
    if name in ("group_norm", "layer_norm"):
        weight, bias = (args[1], args[2]) if name == "group_norm" else (args[2], args[3])
        return 0, args[0].numel() * (_NORM_STATS_OPS + _affine_ops(weight, bias))
    if name == "batch_norm":
        weight, bias = args[1], args[2]
        training = args[5] if len(args) > 5 and isinstance(args[5], bool) else False
        per_element = _NORM_STATS_OPS if training else _NORM_RUNNING_OPS
        return 0, args[0].numel() * (per_element + _affine_ops(weight, bias))
    if name in ("mean", "sum"):
        return 0, args[0].numel() + (out_numel if name == "mean" else 0)
    if name == "softmax":
        return 0, _SOFTMAX_OPS * out_numel
    if name == "upsample_bicubic2d":
        return 0, _BICUBIC_OPS * out_numel
    if name in _ELEMENTWISE_OPS:
        return 0, _ELEMENTWISE_OPS[name] * out_numel
    if name in _VIEWS or name in _COPIES or name in _FREE:
        return 0, 0
    return None


class _AnalyticMode(TorchDispatchMode):
    """Charges each aten operator to the innermost module running when it is called."""

    def __init__(self, module_stack: list[str]):
        super().__init__()
        self.module_stack = module_stack
        self.by_operator: dict[str, OpCost] = defaultdict(OpCost)
        self.by_module: dict[str, OpCost] = defaultdict(OpCost)
        self.uncosted: Counter[str] = Counter()

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # Newer torch wraps a mode's __torch_dispatch__ in dynamo.disable unless this says False, and the
        # wrapper's first call imports torch._dynamo (~1.5 s on 2 cores). Counting never runs under
        # torch.compile, so there is nothing to disable.
        return False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = op_name(func)
        cost = _op_cost(name, args, kwargs, out)
        if cost is None:
            self.uncosted[name] += 1
            cost = (0, 0)
        touches_memory = name not in _VIEWS and name not in _FREE
        results = out
        if name == "batch_norm" and isinstance(out, (tuple, list)) and not torch.is_grad_enabled():
            # inference batch norm returns its saved statistics too: empty from the CPU kernel, [C]-sized on
            # the meta device; only the normalised map is really written
            results = out[0]
        written = _nbytes(results) if touches_memory else 0
        read = _nbytes(args) + _nbytes(kwargs) if touches_memory else 0
        call = OpCost(calls=1, macs=cost[0], ops=cost[1], bytes=read + written, written_bytes=written)
        self.by_operator[name].add(call)
        self.by_module[self.module_stack[-1]].add(call)
        return out


@contextlib.contextmanager
def eval_and_restored(model: nn.Module) -> Iterator[nn.Module]:
    """Run in eval mode (DropPath off, BatchNorm on running stats) and give every submodule its own
    training flag back afterwards, even on error."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        for module, training in modes.items():
            module.training = training


def count_analytic(model: nn.Module, x: torch.Tensor) -> AnalyticCount:
    """Trace one forward of `model` on x [B, 3, H, W] and charge every operator. Works on meta tensors.

    Forward hooks track which module runs each operator and record each module's output shape; they
    are removed before returning.
    """
    names = {module: name for name, module in model.named_modules()}
    stack = [""]
    outputs: dict[str, ModuleOutput] = {}

    def enter(module, inputs):
        stack.append(names[module])

    def leave(module, inputs, output):
        stack.pop()
        first = next(_tensors(output), None)
        if first is not None:
            outputs[names[module]] = ModuleOutput(tuple(first.shape), _nbytes(output))

    handles = []
    try:
        for module in names:
            if module is not model:
                handles.append(module.register_forward_pre_hook(enter))
                handles.append(module.register_forward_hook(leave))
        mode = _AnalyticMode(stack)
        with eval_and_restored(model), mode:
            out = model(x)
        first = next(_tensors(out))  # logits, or a features-only model's first map
        outputs[""] = ModuleOutput(tuple(first.shape), _nbytes(out))
    finally:
        for handle in handles:
            handle.remove()
    total = OpCost()
    for cost in mode.by_operator.values():
        total.add(cost)
    return AnalyticCount(
        macs=total.macs, ops=total.ops, bytes=total.bytes, written_bytes=total.written_bytes,
        by_operator=dict(mode.by_operator), by_module=dict(mode.by_module),
        outputs=outputs, uncosted_ops=dict(mode.uncosted),
    )


# ---------------------------------------------------------------------------------------------------------
# The independent counters.


def count_fvcore(model: nn.Module, x: torch.Tensor) -> FvcoreCount:
    """fvcore's FlopCountAnalysis (it traces with torch.jit; counts are MACs)."""
    with warnings.catch_warnings():  # fvcore's import and tracing warn about torch.jit deprecations
        warnings.simplefilter("ignore")
        from fvcore.nn import FlopCountAnalysis

    with eval_and_restored(model), _quiet("fvcore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        analysis = FlopCountAnalysis(model, x)
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
        total = int(analysis.total())
        by_operator = {k: int(v) for k, v in analysis.by_operator().items()}
        by_module = {k: int(v) for k, v in analysis.by_module().items()}
        unsupported = {k: int(v) for k, v in analysis.unsupported_ops().items()}
    return FvcoreCount(macs=total, by_operator=by_operator, by_module=by_module, unsupported_ops=unsupported)


def count_thop(model: nn.Module, x: torch.Tensor) -> ThopCount:
    """ultralytics-thop's profile. It adds `total_ops`/`total_params` buffers and hooks to every module;
    we check they are gone afterwards and remove any that are not."""
    import thop

    with eval_and_restored(model):
        try:
            macs, params = thop.profile(model, inputs=(x,), verbose=False)
        finally:
            _remove_thop_state(model)
    return ThopCount(macs=int(macs), params=int(params))


def _remove_thop_state(model: nn.Module) -> None:
    for module in model.modules():
        for key in ("total_ops", "total_params"):
            module._buffers.pop(key, None)


def count_torch(model: nn.Module, x: torch.Tensor) -> TorchCount:
    """torch's FlopCounterMode: FLOPs = 2 x MACs of convolutions and matrix products, nothing else."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with eval_and_restored(model), counter:
        model(x)
    root = type(model).__name__
    by_module, by_operator = {}, {}
    for key, per_op in counter.get_flop_counts().items():
        if key == "Global":
            by_operator = {op_name(op): int(flops) for op, flops in per_op.items()}
            continue
        name = "" if key == root else key.removeprefix(root + ".")
        by_module[name] = int(sum(per_op.values()))
    return TorchCount(flops=int(counter.get_total_flops()), by_operator=by_operator, by_module=by_module)


@contextlib.contextmanager
def _quiet(logger: str) -> Iterator[None]:
    """fvcore logs a warning per skipped op; the report lists them instead."""
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def fvcore_skipped(fvcore: FvcoreCount, analytic: AnalyticCount) -> list[SkippedOp]:
    """fvcore's unsupported ops with the ops our analytic count charges to operators of the same name."""
    skipped = []
    for op, calls in sorted(fvcore.unsupported_ops.items()):
        base = op.removeprefix("aten::").strip("_")
        cost = analytic.by_operator.get(base)
        skipped.append(SkippedOp(op=op, calls=calls, analytic_ops=cost.ops if cost else None))
    return skipped


# ---------------------------------------------------------------------------------------------------------
# Breakdowns: the counters side by side per operator family and per module.

_MATMULS = {"addmm", "mm", "bmm", "baddbmm", "linear", "matmul", "einsum"}


def operator_family(name: str) -> str:
    """One name per kind of work across counters: fvcore says linear/matmul, the aten trace addmm/mm/bmm."""
    name = name.removeprefix("aten::").strip("_")
    if name in _MATMULS:
        return "matmul/linear"
    if name in ("convolution", "conv"):
        return "conv"
    return name


def operator_rows(fvcore: FvcoreCount, torch_count: TorchCount, analytic: AnalyticCount) -> list[OperatorRow]:
    """Rows by operator family, costliest (analytic ops) first; data-movement-only operators left out."""
    fv: Counter[str] = Counter()
    for op, macs in fvcore.by_operator.items():
        fv[operator_family(op)] += macs
    th: Counter[str] = Counter()
    for op, flops in torch_count.by_operator.items():
        th[operator_family(op)] += flops
    ours: dict[str, OpCost] = defaultdict(OpCost)
    for op, cost in analytic.by_operator.items():
        if op not in _VIEWS and op not in _FREE:
            ours[operator_family(op)].add(cost)
    rows = [
        OperatorRow(op=family, fvcore_macs=fv[family] if family in fv else None, torch_flops=th[family],
                    analytic=cost)
        for family, cost in ours.items()
    ]
    return sorted(rows, key=lambda r: -r.analytic.ops)


def module_levels(model: nn.Module) -> dict[str, int]:
    """Nesting level of each module, not counting plain containers: stem=1, stages.0=1,
    stages.0.blocks.1=2, stages.0.blocks.1.mlp=3."""
    containers = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
    levels = {"": 0}
    for name, module in model.named_modules():
        if name:
            parent = name.rsplit(".", 1)[0] if "." in name else ""
            levels[name] = levels[parent] + (0 if isinstance(module, containers) else 1)
    return levels


def module_rows(model: nn.Module, fvcore: FvcoreCount, torch_count: TorchCount, analytic: AnalyticCount,
                depth: int = 2) -> list[ModuleRow]:
    """Work grouped by the deepest module at nesting level <= depth (levels as in `module_levels`).
    Each row has its module's own work only, so the rows add up to the model's total for every counter."""
    levels = module_levels(model)
    containers = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
    kept = {n for n, m in model.named_modules() if levels[n] <= depth and not isinstance(m, containers)}

    def group_of(name: str) -> str:
        while name and name not in kept:
            name = name.rsplit(".", 1)[0] if "." in name else ""
        return name

    ours: dict[str, OpCost] = defaultdict(OpCost)
    for name, cost in analytic.by_module.items():
        ours[group_of(name)].add(cost)
    groups = [n for n, _ in model.named_modules() if n in ours or (n in kept and n in fvcore.by_module
                                                                    and fvcore.by_module[n])]

    def own(subtree_totals: dict[str, int], name: str) -> int:
        """Subtree total minus the subtree totals of the groups directly below it."""
        below = [g for g in groups if g != name and group_of(g.rsplit(".", 1)[0] if "." in g else "") == name]
        return subtree_totals.get(name, 0) - sum(subtree_totals.get(g, 0) for g in below)

    rows = [ModuleRow(name=g or "(model)", fvcore_macs=own(fvcore.by_module, g),
                      torch_flops=own(torch_count.by_module, g), analytic=ours.get(g, OpCost()))
            for g in groups]
    return [r for r in rows if r.fvcore_macs or r.torch_flops or r.analytic.ops or r.analytic.bytes]


# ---------------------------------------------------------------------------------------------------------
# Entry points.


def check_resolution(resolution: Size | int | str) -> Size:
    """The input size as a `Size` (an int is a square); ConfigError when a side is under MIN_RESOLUTION."""
    if isinstance(resolution, bool) or not isinstance(resolution, (Size, int, str, tuple)):
        raise ConfigError(f"a resolution is an integer or a Size, not {resolution!r}")
    return Size.of(resolution).check(MIN_RESOLUTION)


def model_for_resolution(name: str, resolution: Size | int, device: str | torch.device = "cpu",
                         features: bool = False) -> nn.Module:
    """Build a zoo model (or a peer) for inputs of `resolution` (height and width; an int is a square): parts with
    a fixed token count are sized for it, everything else is size independent (see
    implementations.resolution_kwargs). features: the features-only backbone (no head, four maps out)."""
    size = check_resolution(resolution)
    from .implementations import build, check_features, resolution_kwargs

    check_features(name, "ours", features)
    extra = {"features_only": True} if features else {}
    with torch.device(device):
        return build(name, **resolution_kwargs(name, size), **extra)


def first_stage_tokens(resolution: Size | int) -> int:
    """Tokens of the stride-4 stage: (H/4) * (W/4), rounded as the stem rounds."""
    size = Size.of(resolution)
    return stage_side(size.height, 0) * stage_side(size.width, 0)


def count_all(model: nn.Module, resolution: Size | int, batch_size: int = 1, name: str | None = None) -> FlopsReport:
    """Every counter on `model` for a [batch_size, 3, height, width] input (random values, fixed seed)."""
    size = check_resolution(resolution)
    if batch_size < 1:
        raise ConfigError(f"batch size must be >= 1, got {batch_size}")
    x = torch.randn(batch_size, 3, size.height, size.width, generator=torch.Generator().manual_seed(0))
    spec = getattr(model, "spec", None)
    analytic = count_analytic(model, x)
    fvcore = count_fvcore(model, x)
    torch_count = count_torch(model, x)
    return FlopsReport(
        model=name or (spec.name if spec else type(model).__name__),
        resolution=size,
        batch_size=batch_size,
        params=sum(p.numel() for p in model.parameters()),
        tokens=first_stage_tokens(size),
        fvcore=fvcore,
        thop=count_thop(model, x),
        torch=torch_count,
        analytic=analytic,
        fvcore_skipped=fvcore_skipped(fvcore, analytic),
        operators=operator_rows(fvcore, torch_count, analytic),
        modules=module_rows(model, fvcore, torch_count, analytic),
        published_macs=(spec.published.macs if spec and size == Size.of(spec.input_size)
                        and not getattr(model, "features_only", False) else None),
        published_top1=spec.published.top1 if spec else _peer_top1(model),
        features=bool(getattr(model, "features_only", False)),
    )


def _peer_top1(model: nn.Module) -> float | None:
    from .peers import published

    figures = published(getattr(model, "peer", ""))
    return figures.top1 if figures else None


def analyse(name: str, resolution: Size | int | None = None, batch_size: int = 1, impl: str = "ours",
            features: bool = False) -> FlopsReport:
    """All counters for zoo model `name` (default resolution: the model's own). impl="timm" counts timm's
    twin instead (v1/v2 only): its head pools before normalising, which is what the published v1 MACs
    were counted on. features: the features-only backbone (for timm, its features_only model: no output
    norms)."""
    from .peers import is_peer

    if is_peer(name):
        if impl not in ("ours", "timm"):
            raise ConfigError(f"--impl {impl} applies to PoolFormer models; {name} is counted as timm builds it")
        resolution = 224 if resolution is None else resolution
        report = count_all(model_for_resolution(name, resolution, features=features), resolution, batch_size,
                           name=name)
        report.impl = "timm"
        return report
    spec = get_spec(name)
    resolution = spec.input_size if resolution is None else resolution
    model = model_for_resolution(spec.name, resolution, features=features)
    if impl != "ours":
        from .implementations import IMPLEMENTATIONS

        if impl not in IMPLEMENTATIONS:
            raise ConfigError(f"unknown implementation {impl!r}; choose from: {', '.join(IMPLEMENTATIONS)}")
        twin = IMPLEMENTATIONS[impl].convert(model)
        twin.spec = model.spec
        twin.features_only = model.features_only
        model = twin
    report = count_all(model, resolution, batch_size, name=spec.name)
    report.impl = impl
    return report
