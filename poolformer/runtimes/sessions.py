"""ONNX Runtime and OpenVINO behind one small interface, and an nn.Module around them for bench, predict, eval.

A runner takes one float32 NCHW array and returns float32 logits (`run_all`: every output, e.g. a features-only
export's four maps). `RuntimeModule` looks like any other
implementation (tensor in, float32 logits tensor out): it exports the model to ONNX for each input shape it
meets, or for OpenVINO converts it once and reshapes it (static shapes: what each runtime optimises best), and
creates the session on that first call, so bench reports session creation and compilation as first-call time.
Given an exported file instead (`RuntimeModule.from_file`), it runs that file.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ..errors import CheckpointError, ConfigError

RUNTIMES = ("onnxruntime", "openvino")
_PACKAGES = {"onnxruntime": "onnxruntime", "openvino": "openvino"}


def require(runtime: str) -> Any:
    """The runtime's Python module, or a ConfigError that says how to install it."""
    if runtime not in RUNTIMES:
        raise ConfigError(f"unknown runtime {runtime!r}; choose from: {', '.join(RUNTIMES)}")
    try:
        return __import__(_PACKAGES[runtime])
    except ImportError:
        raise ConfigError(f"{runtime} is not installed here (pip install {_PACKAGES[runtime]})") from None


def available(runtime: str) -> bool:
    try:
        require(runtime)
    except ConfigError:
        return False
    return True


@dataclass(frozen=True)
class Signature:
    """What an exported classifier takes and gives: input [batch, 3, H, W] (batch None = dynamic), output
    [batch, num_classes]. A features-only export: num_classes 0, height and width None where dynamic."""

    batch: int | None
    height: int | None
    width: int | None
    num_classes: int


def _dim(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def features_export_error(path: str, outputs: int) -> CheckpointError:
    """The one-line refusal of a features-only export (`poolformer export --features`) where a classifier is
    needed."""
    return CheckpointError(f"{path}: a features-only export ({outputs} feature maps, no logits): a detection or "
                           "segmentation backbone, not a classifier; predict, eval and bench run classifier exports")


def _check_signature(path: str, inputs: list[tuple[Any, ...]], outputs: list[tuple[Any, ...]],
                     features: bool = False) -> Signature:
    """A Signature from the session's input and output shapes, or CheckpointError for a file that is not an
    image classifier of this form (one [B, 3, H, W] input, one [B, classes] output, static H, W, classes), or
    with `features`, not a features-only export (one [B, 3, H, W] input, [B, C, H', W'] outputs)."""
    if len(inputs) != 1 or len(outputs) < 1:
        raise CheckpointError(f"{path}: expected one image input and a logits output, found {len(inputs)} "
                              f"input(s) and {len(outputs)} output(s): not a poolformer export")
    shape_in, shape_out = [_dim(d) for d in inputs[0]], [_dim(d) for d in outputs[0]]
    maps = all(len(o) == 4 for o in outputs)
    if features:
        if len(shape_in) != 4 or shape_in[1] != 3 or not maps:
            raise CheckpointError(f"{path}: input {list(inputs[0])} and outputs {[list(o) for o in outputs]} are not "
                                  "[batch, 3, H, W] images to [batch, C, H', W'] maps: not a features-only export")
        return Signature(shape_in[0], shape_in[2], shape_in[3], 0)
    if maps and len(outputs) > 1 and len(shape_in) == 4 and shape_in[1] == 3:  # what `export --features` writes
        raise features_export_error(path, len(outputs))
    if len(shape_in) != 4 or shape_in[1] != 3 or None in shape_in[2:] or len(shape_out) != 2 or shape_out[1] is None:
        raise CheckpointError(f"{path}: input {list(inputs[0])} and output {list(outputs[0])} are not [batch, 3, H, W] "
                              "images to [batch, classes] logits: not a poolformer export")
    return Signature(shape_in[0], shape_in[2], shape_in[3], shape_out[1])


class OnnxRuntimeRunner:
    """An ONNX Runtime session (all graph optimisations; CPU, or CUDA/TensorRT where installed and asked)."""

    def __init__(self, path: str, threads: int | None = None, device: str = "cpu", features: bool = False):
        ort = require("onnxruntime")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.inter_op_num_threads = 1
        if threads:
            options.intra_op_num_threads = threads
        providers = ["CPUExecutionProvider"]
        if device.startswith("cuda"):
            present = ort.get_available_providers()
            providers = [p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider") if p in present]
            if not providers:
                raise ConfigError("onnxruntime here has no CUDA or TensorRT provider (pip install onnxruntime-gpu); "
                                  "use --device cpu")
        try:
            self.session = ort.InferenceSession(path, options, providers=providers)
        except Exception as err:  # onnxruntime raises its own exception types for unreadable graphs
            raise CheckpointError(f"{path}: ONNX Runtime cannot load it: {_first_line(err)}") from None
        self.input_name = self.session.get_inputs()[0].name
        self.signature = _check_signature(path, [tuple(i.shape) for i in self.session.get_inputs()],
                                          [tuple(o.shape) for o in self.session.get_outputs()], features)
        self.providers = self.session.get_providers()

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self.run_all(images)[0]

    def run_all(self, images: np.ndarray) -> list[np.ndarray]:
        return self.session.run(None, {self.input_name: images})


_openvino_core: Any = None
_openvino_core_lock = threading.Lock()


def openvino_core() -> Any:
    """The process's one OpenVINO Core, made on first use and kept until exit.

    One, because each Core brings its own CPU plugin, and the plugin (Linux; seen in 2026.4.1) replaces the
    signal stack of the thread that makes it with one of its own, then unmaps that stack when freed, putting back
    the stack it replaced only if its own is still the current one. Two Cores freed in the order they were made
    leave the thread on an unmapped signal stack, so the next signal that Python handles there (Ctrl-C, the
    SIGCHLD of a DataLoader's workers) ends the process with SIGSEGV."""
    global _openvino_core
    ov = require("openvino")
    with _openvino_core_lock:
        if _openvino_core is None:
            _openvino_core = ov.Core()
        return _openvino_core


class OpenVinoRunner:
    """An OpenVINO CPU compiled model, latency hint (one synchronous stream using every thread), in fp32
    unless bf16 is asked for on a CPU with native bf16."""

    def __init__(self, path: str | Any, threads: int | None = None, precision: str = "fp32", features: bool = False):
        """path: a file OpenVINO reads (ONNX or its own IR), or an `openvino.Model` built in memory."""
        core = openvino_core()
        config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY",
                                  "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        if isinstance(path, (str, os.PathLike)):
            model = _read_openvino(os.fspath(path))
        else:
            model, path = path, f"the built model {path.get_friendly_name()!r}"
        self.signature = _openvino_signature(path, model, features)  # before compiling what it would refuse
        try:
            self.compiled = core.compile_model(model, "CPU", config)
        except Exception as err:  # OpenVINO raises RuntimeError subclasses with long multi-line messages
            raise CheckpointError(f"{path}: OpenVINO cannot compile it: {_first_line(err)}") from None
        self.request = self.compiled.create_infer_request()

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self.request.infer({0: images})[self.compiled.output(0)]

    def run_all(self, images: np.ndarray) -> list[np.ndarray]:
        results = self.request.infer({0: images})
        return [results[output] for output in self.compiled.outputs]


def _read_openvino(path: str) -> Any:
    if path.lower().endswith(".xml"):
        _check_ir_root(path)
    try:
        return openvino_core().read_model(path)
    except Exception as err:  # OpenVINO raises RuntimeError subclasses with long multi-line messages
        raise CheckpointError(f"{path}: OpenVINO cannot read it: {_first_line(err)}") from None


def _check_ir_root(path: str) -> None:
    """CheckpointError unless the .xml file's root element is an OpenVINO IR's <net>. OpenVINO hands any .xml
    its IR reader refuses to its other frontends too, and the TensorFlow one writes its parse errors straight to
    the process's stderr."""
    from xml.etree import ElementTree

    try:
        root = next(element.tag for _, element in ElementTree.iterparse(path, events=("start",)))
    except (ElementTree.ParseError, StopIteration) as err:
        raise CheckpointError(f"{path}: not an OpenVINO IR file (not XML: {err or 'empty'})") from None
    if root != "net":
        raise CheckpointError(f"{path}: not an OpenVINO IR file (its root element is <{root}>, not <net>)")


def _openvino_signature(label: str, model: Any, features: bool = False) -> Signature:
    return _check_signature(label, [tuple(_ov_dims(i)) for i in model.inputs],
                            [tuple(_ov_dims(o)) for o in model.outputs], features)


def ir_signature(path: str) -> Signature:
    """The Signature of a file OpenVINO reads (its IR .xml, or ONNX), read but not compiled; CheckpointError for a
    file OpenVINO cannot read or one that is not an image classifier of this form."""
    return _openvino_signature(path, _read_openvino(path))


def _ov_dims(port: Any) -> list[Any]:
    return [d.get_length() if d.is_static else None for d in port.get_partial_shape()]


def _first_line(err: BaseException) -> str:
    """The first line of a runtime's error that says what is wrong: OpenVINO's start with lines that only locate
    the check in its sources ("Exception from src/...:84:", "Check '...' failed at src/...:219:")."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    said = [line for line in lines if not re.match(r"(Exception from |Check '.*' failed at )\S+:\d+:$", line)]
    return (said or lines or [type(err).__name__])[0][:300]


def check_runnable(runtime: str, precision: str, device: str) -> None:
    """ConfigError where `runtime` cannot compute `precision` on `device` here: never a silent fp32 run under a
    bf16 label."""
    if precision not in ("fp32", "bf16", "fp16"):
        raise ConfigError(f"unknown precision {precision!r}")
    if runtime == "onnxruntime":
        if precision != "fp32":
            raise ConfigError(f"onnxruntime runs this fp32 graph in fp32 only, not {precision}")
        return
    if device != "cpu":
        raise ConfigError("openvino runs on the CPU here; use --device cpu")
    if precision == "fp16" or (precision == "bf16" and not _native_bf16()):
        raise ConfigError(f"openvino computes {precision} only on CPUs with native support (AVX512-BF16/AMX); "
                          "this one would silently run fp32")


def make_runner(runtime: str, path: str | Any, *, threads: int | None = None, precision: str = "fp32",
                device: str = "cpu", features: bool = False) -> OnnxRuntimeRunner | OpenVinoRunner:
    """A runner for an exported file (or, for openvino, an `openvino.Model`); see `check_runnable`. features: the
    file is a features-only export (its `run_all` gives the maps); otherwise it must be a classifier."""
    check_runnable(runtime, precision, device)
    if runtime == "onnxruntime":
        return OnnxRuntimeRunner(path, threads, device, features)
    return OpenVinoRunner(path, threads, precision, features)


def _native_bf16() -> bool:
    from ..capabilities import cpu_capabilities

    return cpu_capabilities().native_bf16


def _precision_of(x: torch.Tensor) -> str:
    if torch.is_autocast_enabled(x.device.type):
        return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(torch.get_autocast_dtype(x.device.type), "fp32")
    return "fp32"


class RuntimeModule(nn.Module):
    """A PoolFormer run by ONNX Runtime or OpenVINO. Input [B, 3, H, W] (a tensor on any device), output float32
    logits [B, num_classes] on the input's device (`features`: the list of a features-only model's maps).

    Built from a model (`export`: how to write an ONNX file for an input shape, or for openvino `build`: the
    `openvino.Model` for an input shape; one export per shape, or one build reshaped to each shape, made on the
    first call that needs it, and a session per shape and precision) or from an exported file (fixed H, W; batch
    dynamic or fixed).
    Runs under autocast in bf16 where the runtime computes bf16 (see `check_runnable`), or always in `precision`
    when one is given.
    """

    def __init__(self, runtime: str, export: Callable[[str, tuple[int, ...]], None] | None = None,
                 path: str | None = None, num_classes: int = 1000, precision: str | None = None,
                 build: Callable[[tuple[int, ...]], Any] | None = None, features: bool = False):
        super().__init__()
        require(runtime)
        if build is not None and runtime != "openvino":
            raise ConfigError(f"only openvino runs a model built in memory, not {runtime}")
        self.runtime, self._export, self._path, self.num_classes = runtime, export, path, num_classes
        self._build = build
        self.features = features
        self._built: Any = None  # the openvino.Model built, reshaped to the last shape compiled
        self.precision = precision
        self._runners: dict[tuple, Callable] = {}
        self._folder: str | None = None
        self.threads: int | None = None  # None: torch's thread count at session creation

    @classmethod
    def from_file(cls, runtime: str, path: str | os.PathLike) -> "RuntimeModule":
        path = str(Path(path).expanduser())
        if not Path(path).is_file():
            raise CheckpointError(f"{path}: no such file")
        module = cls(runtime, path=path)
        # OpenVINO reads a file without compiling it; ONNX Runtime's check is its session
        module.signature = (ir_signature(path) if runtime == "openvino"
                            else make_runner(runtime, path, threads=1).signature)
        module.num_classes = module.signature.num_classes
        return module

    def _built_for(self, shape: tuple[int, ...]) -> Any:
        """The built model reshaped to `shape`, or built afresh where it cannot be: a build can take seconds
        (OpenVINO's conversion traces the model), and a sweep meets each shape once per precision. One is held, as
        a row's first call held one while compiling anyway; compiling copies it, so reshaping it later leaves the
        compiled models as they were."""
        if self._built is not None:
            try:
                self._built.reshape({self._built.inputs[0]: list(shape)})
                return self._built
            except Exception:  # a graph with a shape baked in (OpenVINO raises RuntimeError subclasses)
                self._built = None  # freed before the next build
        self._built = self._build(shape)
        return self._built

    def _runner(self, shape: tuple[int, ...], precision: str, device: str) -> Callable:
        if self._path is not None:  # on every call: one session serves a file's every batch size
            expected = (self.signature.height, self.signature.width)
            if tuple(shape[2:]) != expected or (self.signature.batch not in (None, shape[0])):
                raise ConfigError(f"{self._path} takes [{self.signature.batch or 'any'}, 3, {expected[0]}, "
                                  f"{expected[1]}] inputs, not {list(shape)}; export it for this shape")
        key = (shape if self._path is None else shape[2:], precision, device)
        if key not in self._runners:
            check_runnable(self.runtime, precision, device)  # before the export or build it would waste
            source = self._path
            if self._build is not None:
                source = self._built_for(shape)
            elif source is None:
                self._folder = self._folder or tempfile.mkdtemp(prefix="poolformer-onnx-")
                source = os.path.join(self._folder, f"{'x'.join(map(str, shape))}.onnx")
                if not os.path.exists(source):
                    self._export(source, shape)
            self._runners[key] = make_runner(self.runtime, source, threads=self.threads or torch.get_num_threads(),
                                             precision=precision, device=device, features=self.features)
        return self._runners[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ConfigError(f"expected images [B, 3, H, W], got {list(x.shape)}")
        runner = self._runner(tuple(x.shape), self.precision or _precision_of(x), x.device.type)
        images = np.ascontiguousarray(x.detach().float().cpu().numpy())
        outputs = [torch.from_numpy(np.asarray(out, dtype=np.float32)).to(x.device) for out in runner.run_all(images)]
        return outputs if self.features else outputs[0]

    def to(self, *args: Any, **kwargs: Any) -> "RuntimeModule":  # no parameters here: nothing to move
        return self

    def __del__(self) -> None:
        if getattr(self, "_folder", None):
            shutil.rmtree(self._folder, ignore_errors=True)
