"""Inference benchmark engine: throughput, latency distribution and peak memory per configuration.

How a configuration (model, implementation, device, batch size, resolution, precision, memory format,
compile) is measured, in order:

1. build the model (random weights: speed does not depend on the values) and have its implementation prepare it
   (poolformer.implementations): on the device, channels_last, cast or compiled if asked (`--impl fast`
   compiles its folded graph: the fast path's "inductor" backend, CPU only);
2. reset the peak-memory counters (CUDA allocator peaks; on CPU the process's peak resident set via
   /proc/self/clear_refs; poolformer.measure times and counts);
3. time the first call on its own (with compile, this is the compile time) - it is never mixed into the
   steady-state numbers;
4. run `warmup` untimed steps;
5. time every step separately - CUDA events around each step on a GPU (read after one synchronisation, so
   the timer does not stall the queue), time.perf_counter on the CPU - for `iters` steps or until
   `min_time_s` has passed;
6. report the median, 90th percentile and inter-quartile range of the per-step latencies, throughput =
   batch_size / median latency, and flag the measurement as noisy when IQR / median exceeds a threshold, with
   what the implementation says ran (the fast path's backend);

7. check parity, untimed: the row's logits (a features-only backbone's four maps, each) on its input against the
   fp32 eager reference with the same weights (every model is built after seeding, so ours, fast, compiled and
   runtime rows share weights); a row whose outputs are off by more than PARITY_TOLERANCE gets status
   "mismatch": it ran, but it is not a speed result.

All steps run under torch.inference_mode() and, for bf16/fp16, torch.autocast (weights stay fp32; matmuls
and convolutions run in the low precision). Out-of-memory at a configuration gives a row with status
"oom", frees the memory and the run goes on; any other failure gives status "error" with a one-line reason.

In normalised mode a fixed reference workload (a plain-torch network, independent of this package's code,
see reference_workload) runs right after every model step, so that throughput can be compared relative to
the machine's speed at that moment (see BenchResult.relative_throughput and poolformer.regression).
"""

from __future__ import annotations

import contextlib
import statistics
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

from .devices import PRECISIONS, autocast
from .devices import resolve_device as resolve_any_device
from .errors import ConfigError
from .implementations import (
    Description, Target, check_features, implementation_for, is_exported_file, resolution_kwargs,
)
from .measure import (
    current_memory, free_memory, is_out_of_memory, peak_memory, reset_peak_memory, synchronize, time_once, time_steps,
)
from .sizes import Size

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
    parity: bool = True  # check every row's logits against the fp32 reference (see check_parity)
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
                   impl_note=self.impl_note, backend=self.backend, backend_note=self.backend_note,
                   bytes_per_image=self.bytes_per_image,
                   achieved_tb_per_s=self.achieved_tb_per_s)
        return row


def percentile(ordered: list[float], q: float) -> float:
    """q-th percentile of sorted values with linear interpolation (numpy's default method)."""
    if not ordered:
        raise ValueError("percentile of no values")
    pos = (len(ordered) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


# ----------------------------------------------------------------------------------- validation


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
        raise ConfigError(f"{precision} autocast is not supported on {device}: {_one_line(err)}") from None
    if out.dtype != dtype:  # autocast silently disabled itself (it warns instead of failing)
        raise ConfigError(f"{precision} autocast is not supported on {device} by torch {torch.__version__}")


# torch.compile's modes (inductor); max-autotune is what timm's best published GPU figures use
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
COMPILE_BACKENDS = ("inductor", "eager", "aot_eager", "cudagraphs")


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


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")


# ----------------------------------------------------------------------------------- the run


def _default_build() -> BuildModel:
    from .implementations import build

    return build


def _build_kwargs(config: BenchConfig) -> dict[str, Any]:
    """The model sized for the row's resolution (see implementations.resolution_kwargs), with its weights, as a
    features-only backbone where the row asks for one."""
    weights = {"weights": config.weights} if config.weights is not None else {}
    features = {"features_only": True} if config.features else {}
    return {**resolution_kwargs(config.model, config.resolution), **weights, **features}


def target(config: BenchConfig, compile_backend: str = "inductor", compile_mode: str | None = None) -> Target:
    """What the row's model is prepared for (see Implementation.prepare)."""
    return Target(config.device, config.precision, config.cast, config.channels_last, config.compile, compile_mode,
                  compile_backend, config.batch_size, config.resolution)


def prepare_model(config: BenchConfig, build_model: BuildModel | None = None,
                  compile_backend: str = "inductor", compile_mode: str | None = None) -> nn.Module:
    """The model for `config` (built after seeding with BUILD_SEED) prepared by its implementation: on its
    device, in eval mode, channels_last, cast and compiled as asked. cast: the weights are converted to bf16/fp16
    and run without autocast (timm's `--model-dtype`)."""
    build_model = build_model or _default_build()
    implementation = implementation_for(config.model, config.impl, config.weights)
    torch.manual_seed(BUILD_SEED)
    model = build_model(config.model, config.impl, **_build_kwargs(config))
    return implementation.prepare(model, target(config, compile_backend, compile_mode))


def describe(config: BenchConfig, model: nn.Module, compile_backend: str = "inductor",
             compile_mode: str | None = None) -> Description:
    """What ran the row's prepared `model` (the fast path's backend, the bytes its kernels move, compile mode)."""
    row_target = target(config, compile_backend, compile_mode)
    return implementation_for(config.model, config.impl, config.weights).describe(model, row_target)


def make_input(config: BenchConfig) -> torch.Tensor:
    """A random image batch [batch_size, 3, height, width] on the config's device and memory format (in the cast
    dtype with config.cast)."""
    size = config.resolution
    x = torch.randn(config.batch_size, 3, size.height, size.width, device=config.device)
    x = x if not config.cast else x.to(PRECISIONS[config.precision])
    return x.contiguous(memory_format=torch.channels_last) if config.channels_last else x


def row_autocast(config: BenchConfig) -> contextlib.AbstractContextManager:
    """Autocast in the row's precision, unless the model was cast to it."""
    return contextlib.nullcontext() if config.cast else autocast(config.device, config.precision)


class _ReferenceBlock(nn.Module):
    """x + mlp(norm(x)) after x + (pool(norm(x)) - norm(x)): a pooling block written with plain torch ops."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm1, self.norm2 = nn.GroupNorm(1, dim), nn.GroupNorm(1, dim)
        self.pool = nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)
        self.mlp = nn.Sequential(nn.Conv2d(dim, 4 * dim, 1), nn.GELU(), nn.Conv2d(4 * dim, dim, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm1(x)
        x = x + self.pool(y) - y
        return x + self.mlp(self.norm2(x))


def reference_workload(device: str, batch_size: int, resolution: Size | int) -> Callable[[], Any]:
    """A fixed plain-torch network, independent of this package's code: a half-depth PoolFormer-S12 (7x7/4
    stem, pooling blocks at 64/128/320/512 channels with depths 1/1/3/1, 3x3/2 downsampling) on an fp32 input
    [batch_size, 3, height, width] (`resolution`; an int is a square). Same op mix as the models, so a busy or
    slow machine affects it the way it affects them (a simpler workload was measured to react differently, e.g.
    to a neighbour on the same core); scaled with the configuration, so each model step is paired with a reference run of
    similar length. Its speed tracks the machine and torch, not our code. See BenchSettings.normalised."""
    generator = torch.Generator().manual_seed(0)
    layers: list[nn.Module] = [nn.Conv2d(3, 64, 7, stride=4, padding=2)]
    for stage, (dim, depth) in enumerate(zip((64, 128, 320, 512), (1, 1, 3, 1))):
        if stage > 0:
            layers.append(nn.Conv2d(layers[-1].norm1.num_channels, dim, 3, stride=2, padding=1))
        layers.extend(_ReferenceBlock(dim) for _ in range(depth))
    net = nn.Sequential(*layers).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    net = net.to(device)
    size = Size.of(resolution)
    x = torch.randn(batch_size, 3, size.height, size.width, generator=generator).to(device)
    device_type = torch.device(device).type

    def run() -> None:
        # always fp32 and channels-first: it runs interleaved inside the model's autocast region
        with torch.inference_mode(), torch.autocast(device_type, enabled=False):
            net(x)

    return run


class ModelCache:
    """The last models built, handed again to configurations that differ only in batch size (or in the
    autocast precision, which leaves the model as built): building a model and moving it to the device can take
    longer than measuring it. At most `size` models (two: a cast row and its fp32 comparison alternate), the
    least recently used dropped before the next is built. Compiled models are built afresh for every
    configuration, so that each row's first call shows its compilation."""

    def __init__(self, size: int = 2) -> None:
        self.size = size
        self.models: dict[BenchConfig, nn.Module] = {}

    def get(self, config: BenchConfig, build: Callable[[], nn.Module]) -> nn.Module:
        if config.compile:
            return build()
        key = replace(config, batch_size=0, precision=config.precision if config.cast else "")
        if key in self.models:
            self.models[key] = self.models.pop(key)  # most recently used last
            return self.models[key]
        while len(self.models) >= self.size:
            del self.models[next(iter(self.models))]
        self.models[key] = build()
        return self.models[key]

    def discard(self, config: BenchConfig) -> None:
        """Forget the model of `config` (one that ran out of memory: memory is short, and it would only fail again)."""
        self.models.pop(replace(config, batch_size=0, precision=config.precision if config.cast else ""), None)


def run_config(config: BenchConfig, settings: BenchSettings, build_model: BuildModel | None = None,
               reference: Callable[[], Any] | None = None, models: ModelCache | None = None) -> BenchResult:
    """Measure one configuration. Never raises for OOM or a failing model: the status says what happened.
    models: reuse a model built for an earlier configuration (see ModelCache)."""
    device = torch.device(config.device)
    model = x = None
    try:
        def build() -> nn.Module:
            return prepare_model(config, build_model, settings.compile_backend, settings.compile_mode)

        model = models.get(config, build) if models is not None else build()
        free_memory(device)
        reset_peak_memory(device)
        start_memory = current_memory(device)
        x = make_input(config)
        with torch.inference_mode(), row_autocast(config):
            def step() -> Any:
                return model(x)

            first_call_ms = time_once(step, device)
            steps_ms, reference_ms = time_steps(step, device, warmup=settings.warmup, iters=settings.iters,
                                                min_time_s=settings.min_time_s, reference=reference)
        peak, reserved = peak_memory(device)
        stats = LatencyStats.from_steps(steps_ms)
        result = BenchResult(
            config=config, status="ok", throughput=config.batch_size * 1000.0 / stats.median,
            latency_ms=stats, steps_ms=steps_ms, peak_memory_bytes=peak, peak_reserved_bytes=reserved,
            start_memory_bytes=start_memory, first_call_ms=first_call_ms,
            noisy=stats.iqr > settings.noisy_iqr_ratio * stats.median,
            reference_ms=statistics.median(reference_ms) if reference_ms else None,
            reference_steps_ms=reference_ms)
        described = describe(config, model, settings.compile_backend, settings.compile_mode)
        result.backend, result.backend_note = described.backend, described.backend_note
        result.bytes_per_image, result.compile_mode = described.bytes_per_image, described.compile_mode
        result.impl_note = described.note
        if settings.parity:
            result.parity, result.parity_note = check_parity(config, model, x, build_model, settings)
            if result.parity is not None and not result.parity.ok:
                result.status = "mismatch"  # wrong outputs: not a speed result
        return result
    except Exception as err:
        status = "oom" if is_out_of_memory(err) else "error"
        if status == "oom" and models is not None:
            models.discard(config)
        return BenchResult(config=config, status=status, error=_one_line(err))
    finally:
        del model, x
        free_memory(device)


def check_parity(config: BenchConfig, model: nn.Module, x: torch.Tensor, build_model: BuildModel | None,
                 settings: BenchSettings) -> tuple[Parity | None, str | None]:
    """Run the row's model once more on its input (untimed) and the fp32 reference on the first PARITY_SAMPLES
    images, comparing the logits (a backbone's maps, each); (Parity, None), or (None, why not) where no reference
    can be had (an exported file, a reference that does not fit in memory, a model that cannot be rebuilt)."""
    if is_exported_file(config.weights):
        return None, "no reference: the weights are inside the exported file"
    device = torch.device(config.device)
    reference_name = implementation_for(config.model, config.impl, config.weights).reference
    reference_implementation = implementation_for(config.model, reference_name, config.weights)
    samples = min(PARITY_SAMPLES, config.batch_size)
    same_model = reference_name == config.impl and not config.compile and config.precision == "fp32"
    try:
        with torch.inference_mode():
            with row_autocast(config):
                got = [out[:samples].float() for out in _outputs(model(x))]
            images = x[:samples].float().contiguous()  # the reference runs fp32 (a cast row's input is not)
            if same_model:
                expected = [out.float() for out in _outputs(model(images))]
            else:
                torch.manual_seed(BUILD_SEED)
                build = build_model or _default_build()
                reference = build(config.model, reference_name, **_build_kwargs(config))
                reference = reference_implementation.prepare(reference, Target(config.device))
                expected = [out.float() for out in _outputs(reference(images))]
                del reference
    except Exception as err:
        return None, f"not checked: the reference failed ({_one_line(err)})"
    finally:
        free_memory(device)
    shapes = ([list(t.shape) for t in got], [list(t.shape) for t in expected])
    if shapes[0] != shapes[1]:
        shown = [s[0] if len(s) == 1 else s for s in shapes]
        return None, f"not checked: output {shown[0]} vs reference {shown[1]}"
    diffs = [(a - b).abs().max().item() for a, b in zip(got, expected)]
    relatives = [d / max(1.0, b.abs().max().item()) for d, b in zip(diffs, expected)]
    tolerance = PARITY_TOLERANCE[config.precision]
    if config.features:  # four maps: each within tolerance; no classes to agree on
        ok = max(relatives) <= tolerance
        return Parity(reference_name, samples, max(diffs), max(relatives), None, tolerance, ok, relatives), None
    agreement = (got[0].argmax(1) == expected[0].argmax(1)).float().mean().item()
    ok = relatives[0] <= tolerance and (agreement == 1.0 or config.precision != "fp32")
    return Parity(reference_name, samples, diffs[0], relatives[0], agreement, tolerance, ok), None


def _outputs(value: Any) -> list[torch.Tensor]:
    """A model's outputs as a list: [logits], or a features-only backbone's maps (a list or tuple)."""
    return list(value) if isinstance(value, (list, tuple)) else [value]


def expand_configs(models: Iterable[str], impls: Iterable[str], device: str, batch_sizes: Iterable[int],
                   resolutions: Iterable[Size | int], precisions: Iterable[str], channels_last: bool,
                   compile: bool, weights: str | None = None, cast: bool = False,
                   features: bool = False) -> list[BenchConfig]:
    """Every combination, in the order model > impl > precision > resolution > batch size (cast applies to
    bf16/fp16 rows only). features: every row times the features-only backbone (ConfigError where a model or
    implementation cannot build one: a timm peer, a runtime)."""
    models, impls, resolutions = list(models), list(impls), [Size.of(r).check() for r in resolutions]
    for model in models:
        for impl in impls:
            check_features(model, impl, features)
    return [BenchConfig(m, i, device, b, r, p, channels_last, compile, weights, cast and p != "fp32", features)
            for m in models for i in impls for p in precisions for r in resolutions for b in batch_sizes]


def apply_settings(settings: BenchSettings, device: str) -> None:
    """Process-wide settings that affect speed (recorded in the environment block)."""
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    if device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True  # pick the fastest convolution algorithm, as timm does


def run_benchmark(configs: Iterable[BenchConfig], settings: BenchSettings,
                  build_model: BuildModel | None = None, models: ModelCache | None = None) -> Iterator[BenchResult]:
    """Measure each configuration in turn, yielding each result as soon as it is known (so a caller can save
    finished rows before a Ctrl-C). GPU runs carry NVML telemetry (or the reason it is absent).
    models: a ModelCache to share across calls (a caller running one configuration per call)."""
    from .envinfo import NvmlTelemetry, cuda_uuid

    check_settings(settings)
    models = models if models is not None else ModelCache()
    for config in configs:
        apply_settings(settings, config.device)
        reference = None
        if settings.normalised:
            reference = reference_workload(config.device, config.batch_size, config.resolution)
        if config.device.startswith("cuda"):
            index = torch.device(config.device).index or 0
            with NvmlTelemetry(index, uuid=cuda_uuid(index)) as telemetry:
                result = run_config(config, settings, build_model, reference, models)
            result.telemetry = telemetry.summary.to_dict()
        else:
            result = run_config(config, settings, build_model, reference, models)
        _add_precision_note(result, settings, build_model, models)
        yield result


FP32_COMPARISON_STEPS = 3  # timed steps of the fp32 run beside an emulated-precision row (after 1 warm-up)


def _add_precision_note(result: BenchResult, settings: BenchSettings, build_model: BuildModel | None,
                        models: ModelCache | None = None) -> None:
    """Where the row's precision is not native here, say so; where it is emulated (many times slower than
    fp32), also time a few fp32 steps of the same configuration, so the row shows what fp32 would give."""
    from .devices import precision_is_emulated, precision_note

    config = result.config
    result.precision_note = precision_note(config.device, config.precision)
    if result.status != "ok" or not settings.fp32_comparison or not precision_is_emulated(config.device,
                                                                                           config.precision):
        return
    quick = replace(settings, warmup=1, iters=FP32_COMPARISON_STEPS, min_time_s=None, normalised=False, parity=False)
    fp32 = run_config(replace(config, precision="fp32", cast=False), quick, build_model, models=models)
    result.fp32_throughput = fp32.throughput


# ----------------------------------------------------------------------------------- max batch


@dataclass(frozen=True)
class MaxBatch:
    """The largest batch size that ran, and what stopped the search there."""

    batch_size: int | None  # None: not even batch 1 fits in memory
    limited_by: str  # "memory", "the limit (N)", or "batch N: <the error>" (see search_max_batch)


def _try_batch(model: nn.Module, config: BenchConfig) -> str | None:
    """None when two forward passes of `model` at `config`'s batch size run; "memory" when they run out of
    memory; otherwise the error in one line."""
    device = torch.device(config.device)
    x = None
    try:
        x = make_input(config)
        with torch.inference_mode(), row_autocast(config):
            model(x)
            model(x)
        synchronize(device)
        return None
    except Exception as err:
        return "memory" if is_out_of_memory(err) else _one_line(err)
    finally:
        del x
        free_memory(device)


def search_max_batch(config: BenchConfig, limit: int = 4096, build_model: BuildModel | None = None) -> MaxBatch:
    """The largest batch size <= limit that runs for `config` (doubling, then bisection; the model is built
    once, uncompiled). Memory is what usually stops it, but huge batches can also fail otherwise before memory
    runs out: some kernels index with 32-bit integers (avg_pool2d refuses outputs over 2^31 elements, about
    10,700 images of s12 at 224 px). Such an error above a batch that ran ends the search like an
    out-of-memory does, and `limited_by` names it. An error at batch 1 is raised: the model does not run.
    Assumes what fits at one batch size fits at every smaller one."""
    model = prepare_model(replace(config, compile=False), build_model)
    try:
        first = _try_batch(model, replace(config, batch_size=1))
        if first == "memory":
            return MaxBatch(None, "memory")
        if first is not None:
            raise RuntimeError(first)
        good, bad, failures = 1, None, {}

        def runs(batch_size: int) -> bool:
            failures[batch_size] = _try_batch(model, replace(config, batch_size=batch_size))
            return failures[batch_size] is None

        while bad is None and good < limit:
            trial = min(good * 2, limit)
            good, bad = (trial, None) if runs(trial) else (good, trial)
        while bad is not None and bad - good > 1:
            middle = (good + bad) // 2
            good, bad = (middle, bad) if runs(middle) else (good, middle)
        if bad is None:
            return MaxBatch(good, f"the limit ({limit})")
        reason = failures[bad]
        return MaxBatch(good, "memory" if reason == "memory" else f"batch {bad}: {reason}")
    finally:
        del model
        free_memory(torch.device(config.device))


def find_max_batch(config: BenchConfig, limit: int = 4096, build_model: BuildModel | None = None) -> int | None:
    """search_max_batch's batch size: the largest that runs, or None when not even batch 1 fits."""
    return search_max_batch(config, limit, build_model).batch_size
