"""What a benchmark row is (`BenchConfig`), how carefully it is measured (`BenchSettings`), what it gives
(`BenchResult`), and the checks of each before anything runs."""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ..devices import PRECISIONS
from ..devices import resolve_device as resolve_any_device
from ..errors import ConfigError
from ..implementations import check_features, implementation_for
from ..sizes import Size
from ..training import GradParity, check_mode, check_optimizer

STATUSES = ("ok", "mismatch", "oom", "error")

BuildModel = Callable[..., nn.Module]  # (name, impl, **create_kwargs) -> nn.Module, like implementations.build


@dataclass(frozen=True)
class BenchConfig:
    """One row of a benchmark: everything that changes the number. resolution: the input's height and width (an
    int given here is a square)."""

    model: str
    impl: str = "ours"
    device: str = "cpu"
    batch_size: int = 1
    resolution: Size = Size(224, 224)
    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False
    weights: str | None = None  # a checkpoint or an exported .onnx file; None: random weights (seeded)
    cast: bool = False  # bf16/fp16: weights and input converted to the precision, no autocast (see prepare_model)
    mode: str = "inference"  # or "train": forward, loss, backward, optimizer step (poolformer.training)
    optimizer: str | None = None  # train rows: sgd or adamw
    grad_checkpointing: bool = False  # train rows: each block recomputed in backward
    features: bool = False  # the features-only backbone (create_model(features_only=True)): four maps, no head

    def __post_init__(self) -> None:
        object.__setattr__(self, "resolution", Size.of(self.resolution))

    def as_json(self) -> dict[str, Any]:
        """The configuration's fields as a JSON row has them: the size as resolution (224 for a square, else
        "800x1333"), height and width."""
        return {**asdict(self), **self.resolution.json_fields()}


@dataclass
class BenchSettings:
    """How long and how carefully to measure; the same for every configuration of a run."""

    warmup: int = 10
    iters: int = 50
    min_time_s: float | None = None  # when set, time steps until this much time has passed (>= 5 steps)
    threads: int | None = None  # torch.set_num_threads for CPU runs; None keeps torch's default
    normalised: bool = False  # also time the reference workload, interleaved with the model's steps
    noisy_iqr_ratio: float = 0.10  # IQR / median above this flags the measurement as noisy
    compile_backend: str = "inductor"
    compile_mode: str | None = None  # torch.compile's mode: None (its default), reduce-overhead, max-autotune, ...
    parity: bool = True  # check every row's outputs against the fp32 reference (see check_parity)
    fp32_comparison: bool = True  # emulated bf16/fp16 rows: also time fp32 (see _add_precision_note)


@dataclass
class LatencyStats:
    """Summary of per-step latencies in milliseconds."""

    median: float
    p90: float
    iqr: float
    mean: float
    min: float

    @classmethod
    def from_steps(cls, steps_ms: list[float]) -> "LatencyStats":
        ordered = sorted(steps_ms)
        return cls(median=statistics.median(ordered), p90=percentile(ordered, 90),
                   iqr=percentile(ordered, 75) - percentile(ordered, 25),
                   mean=statistics.fmean(ordered), min=ordered[0])


# max |logit difference| / max(1, max |reference logit|) a row may show and still count as the same model:
# fp32 reorders sums (compile, channels-last, runtimes) at ~1e-6; bf16/fp16 keep ~3 significant digits.
PARITY_TOLERANCE = {"fp32": 1e-3, "bf16": 0.15, "fp16": 0.15}
PARITY_SAMPLES = 8  # images of the row's batch that the reference recomputes
BUILD_SEED = 0  # every model is built after seeding with it: same name, same random weights, in every impl


@dataclass
class Parity:
    """A row's logits (a backbone's maps) against the fp32 reference (our eager model; timm's own for --impl
    timm) on the same images. top1_agreement: fraction of images with the same top class (None for maps)."""

    reference: str
    samples: int
    max_abs_diff: float  # the largest over the maps of a backbone
    relative_diff: float  # max_abs_diff / max(1, max |reference logit|); for maps the largest map's own
    top1_agreement: float | None
    tolerance: float
    ok: bool
    map_relative_diffs: list[float] | None = None  # a backbone: each map's relative difference, strides 4..32


@dataclass
class BenchResult:
    """The measurement of one `BenchConfig`. throughput is images/s; latencies are per step (one batch)."""

    config: BenchConfig
    status: str  # ok | mismatch (ran, but its logits are wrong: not a speed result) | oom | error
    throughput: float | None = None
    latency_ms: LatencyStats | None = None
    steps_ms: list[float] = field(default_factory=list)
    peak_memory_bytes: int | None = None  # GPU: peak allocated by tensors; CPU: process peak resident set
    peak_reserved_bytes: int | None = None  # GPU only: peak held by the caching allocator
    start_memory_bytes: int | None = None  # in use when the peaks were reset, before the input was made (GPU:
    # allocated bytes = the model's weights and buffers; CPU: the process's resident set); peak - start = the
    # memory the forward pass itself needed
    first_call_ms: float | None = None  # the first forward on its own (includes compilation with compile)
    noisy: bool = False
    reference_ms: float | None = None  # normalised mode: median latency of the reference workload
    reference_steps_ms: list[float] = field(default_factory=list)  # normalised mode: paired with steps_ms
    error: str | None = None
    telemetry: dict[str, Any] | None = None
    precision_note: str | None = None  # the precision is not native on this hardware (poolformer.devices)
    fp32_throughput: float | None = None  # emulated precision: a short fp32 run of the same configuration
    parity: Parity | None = None  # the row's logits against the fp32 reference (None: not checked, see note)
    parity_note: str | None = None
    impl_note: str | None = None  # how the implementation's model differs from ours (timm's features: no norms)
    backend: str | None = None  # --impl fast: the kernels the forward ran (triton, openvino-folded, onednn, ...)
    backend_note: str | None = None  # --impl fast: why it did not run its Triton kernels on a GPU
    bytes_per_image: float | None = None  # --impl fast on Triton: bytes its kernels move per image (roofline)
    compile_mode: str | None = None  # torch.compile's mode of a compiled row ("default" when none was given)
    grad_parity: GradParity | None = None  # train rows: loss and gradients against the reference implementation
    world_size: int = 1  # train rows under torchrun: processes, each training on batch_size images
    single_process_throughput: float | None = None  # under torchrun: the same row in one process, timed first

    @classmethod
    def timed(cls, config: BenchConfig, settings: BenchSettings, steps_ms: list[float], reference_ms: list[float],
              world_size: int = 1, **fields: Any) -> "BenchResult":
        """An "ok" row from its timed steps: img/s of all `world_size` processes from the median step, the
        noisy flag from the spread, the reference workload's median (normalised mode); `fields` the rest."""
        stats = LatencyStats.from_steps(steps_ms)
        return cls(config=config, status="ok", throughput=world_size * config.batch_size * 1000.0 / stats.median,
                   latency_ms=stats, steps_ms=steps_ms, noisy=stats.iqr > settings.noisy_iqr_ratio * stats.median,
                   reference_ms=statistics.median(reference_ms) if reference_ms else None,
                   reference_steps_ms=reference_ms, world_size=world_size, **fields)

    @property
    def scaling_efficiency(self) -> float | None:
        """Under torchrun: img/s of all processes over world_size x one process's img/s (1.0 = linear)."""
        if self.status != "ok" or not self.single_process_throughput or not self.throughput or self.world_size < 2:
            return None
        return self.throughput / (self.world_size * self.single_process_throughput)

    @property
    def achieved_tb_per_s(self) -> float | None:
        """The memory bandwidth (10^12 B/s) the measured speed implies for the kernels' own traffic."""
        if self.status != "ok" or self.bytes_per_image is None or not self.throughput:
            return None
        return self.bytes_per_image * self.throughput / 1e12

    @property
    def relative_throughput(self) -> float | None:
        """batch_size x median over steps of (reference latency / model latency), each model step paired with
        the reference run right after it: images per reference run, with the machine's momentary speed
        divided out step by step (a slow spell slows both halves of a pair)."""
        if self.status != "ok" or not self.reference_steps_ms:
            return None
        ratios = [ref / step for ref, step in zip(self.reference_steps_ms, self.steps_ms)]
        return self.config.batch_size * statistics.median(ratios)

    def to_row(self) -> dict[str, Any]:
        """The JSON row: the documented keys first, then the details."""
        lat = self.latency_ms
        row: dict[str, Any] = {**self.config.as_json(), "status": self.status, "throughput": self.throughput,
                               "latency_ms": {"median": lat.median if lat else None, "p90": lat.p90 if lat else None,
                                              "iqr": lat.iqr if lat else None},
                               "peak_memory_bytes": self.peak_memory_bytes}
        if lat:
            row["latency_ms"].update(mean=lat.mean, min=lat.min, steps=self.steps_ms)
        if self.reference_steps_ms:
            row["reference_steps_ms"] = self.reference_steps_ms
        row.update(peak_reserved_bytes=self.peak_reserved_bytes, start_memory_bytes=self.start_memory_bytes,
                   first_call_ms=self.first_call_ms,
                   compile_ms=self.first_call_ms if self.config.compile else None, compile_mode=self.compile_mode,
                   noisy=self.noisy,
                   reference_ms=self.reference_ms, relative_throughput=self.relative_throughput,
                   error=self.error, telemetry=self.telemetry, precision_note=self.precision_note,
                   fp32_throughput=self.fp32_throughput,
                   parity=asdict(self.parity) if self.parity is not None else None, parity_note=self.parity_note,
                   impl_note=self.impl_note, backend=self.backend, backend_note=self.backend_note, bytes_per_image=self.bytes_per_image,
                   achieved_tb_per_s=self.achieved_tb_per_s,
                   grad_parity=asdict(self.grad_parity) if self.grad_parity is not None else None,
                   world_size=self.world_size, single_process_throughput=self.single_process_throughput,
                   scaling_efficiency=self.scaling_efficiency)
        return row


def percentile(ordered: list[float], q: float) -> float:
    """q-th percentile of sorted values with linear interpolation (numpy's default method)."""
    if not ordered:
        raise ValueError("percentile of no values")
    pos = (len(ordered) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def resolve_device(text: str | None) -> str:
    """'cpu', 'cuda' or 'cuda:N' -> 'cpu' / 'cuda:N'; None -> 'cuda:0' when a GPU is present, else 'cpu'.
    Only CPU and CUDA: step timing synchronises CUDA and nothing else."""
    return str(resolve_any_device(text, kinds=("cpu", "cuda")))


def check_precision(device: str, precision: str) -> None:
    """Raise ConfigError unless autocast in `precision` really runs a convolution on `device`."""
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; choose from: {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return
    dev = torch.device(device)
    if dev.type == "cuda" and precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"bf16 is not supported on {torch.cuda.get_device_name(dev)}; use fp16 or fp32")
    dtype = PRECISIONS[precision]
    try:
        conv = nn.Conv2d(3, 4, 3).to(dev)
        with torch.inference_mode(), torch.autocast(dev.type, dtype=dtype):
            out = conv(torch.randn(1, 3, 8, 8, device=dev))
    except Exception as err:
        raise ConfigError(f"{precision} autocast is not supported on {device}: {one_line(err)}") from None
    if out.dtype != dtype:  # autocast silently disabled itself (it warns instead of failing)
        raise ConfigError(f"{precision} autocast is not supported on {device} by torch {torch.__version__}")


# torch.compile's modes (inductor); max-autotune is what timm's best published GPU figures use
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
COMPILE_BACKENDS = ("inductor", "eager", "aot_eager", "cudagraphs")


def check_config(config: BenchConfig) -> None:
    """ConfigError for a row that cannot run: an unknown mode or optimizer, options of the other mode, a train row of
    an inference-only implementation or of a backbone, a backbone an implementation cannot build."""
    check_mode(config.mode)
    check_features(config.model, config.impl, config.features)
    if config.mode == "inference":
        if config.optimizer is not None or config.grad_checkpointing:
            raise ConfigError("--optimizer and --grad-checkpointing apply to train rows (--mode train)")
        return
    check_optimizer(config.optimizer or "sgd")
    if config.cast:
        raise ConfigError("train rows run under autocast with fp32 weights; --cast-model is for inference rows")
    if config.features:
        raise ConfigError("--features times inference only: a train row's loss is cross-entropy on the classifier's "
                          "logits, and a backbone has no head")
    if not implementation_for(config.model, config.impl, config.weights).trains:
        raise ConfigError(f"--impl {config.impl} is inference-only; train rows run with --impl ours or timm "
                          "(or a timm:NAME peer)")


def check_settings(settings: BenchSettings) -> None:
    if settings.warmup < 0:
        raise ConfigError(f"--warmup must be >= 0, got {settings.warmup}")
    if settings.iters < 1:
        raise ConfigError(f"--iters must be >= 1, got {settings.iters}")
    if settings.min_time_s is not None and settings.min_time_s <= 0:
        raise ConfigError(f"--min-time must be > 0 seconds, got {settings.min_time_s}")
    if settings.threads is not None and settings.threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {settings.threads}")
    if settings.compile_backend not in COMPILE_BACKENDS:
        raise ConfigError(f"unknown --compile-backend {settings.compile_backend!r}; choose from: "
                          f"{', '.join(COMPILE_BACKENDS)}")
    if settings.compile_mode is not None and settings.compile_mode not in COMPILE_MODES:
        raise ConfigError(f"unknown --compile-mode {settings.compile_mode!r}; choose from: {', '.join(COMPILE_MODES)}")


def one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")
