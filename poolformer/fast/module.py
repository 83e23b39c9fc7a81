"""`optimize(model)`: the inference-only module that runs the folded model, and the choice of its kernels.

Backends (the kernels one forward runs on), chosen once per (dtype, device) the module meets:
- ``triton``: two fused Triton kernels per block (`poolformer.fast.triton`); CUDA GPUs. On CPU
  tensors only when asked for by name and POOLFORMER_TRITON_INTERPRET=1 is set: Triton's interpreter runs the
  same kernels (tests, debugging; very slow).
- ``openvino-folded``: the folded graph run by OpenVINO (`poolformer.fast.runtime_backends`, built by
  `poolformer.fast.openvino_graph`) on the CPU, where openvino is installed: float32, and bfloat16 on CPUs that
  compute it natively. auto's CPU choice wherever it runs: the
  fastest of these backends measured (benchmarks/results/runtimes_cpu_*.md).
- ``onnxruntime-folded``: the folded graph run by ONNX Runtime (`poolformer.fast.runtime_backends`); float32 on the CPU,
  where onnxruntime is installed (auto's fp32 CPU choice where openvino is not).
- ``inductor`` (by name only, or `FastPoolFormer.compile_with`): the folded graph compiled by torch.compile
  with freezing (`poolformer.fast.compiled`); float32 and bfloat16 on the CPU with a C++ compiler. The fastest
  PyTorch path in bf16 at small batches, but each input shape first compiles for ~10-15 s, so auto never
  takes it; `bench --impl fast --compile` runs it.
- ``onednn``: oneDNN's fused, pre-packed primitives (`poolformer.fast.cpu`); CPUs only, and only in a dtype
  oneDNN runs on this CPU (float32 everywhere; bfloat16 where `poolformer.capabilities` says oneDNN has it).
- ``portable``: the same algebra with plain PyTorch operators; works on any device and dtype.

`backend="auto"` takes the first of these that can run the dtype on the device; where it passed over the
Triton kernels on a GPU, `FastPoolFormer.backend_note` says why in one line (the command line prints it).
Every backend runs features-only models too (`create_model(..., features_only=True)`, the dense tasks'
backbone): `forward` then gives the four stage maps, each through its GroupNorm(1) output norm, computed
from the map's own per-sample statistics (see `poolformer.fast.cpu.feature_norm_forward`; on the Triton
kernels, the statistics the stage's last block writes anyway, applied by one more kernel). `forward_features`
(the last map, unnormalised) never runs in a runtime or the compiled graph (it takes oneDNN or the portable
path). The environment variable
POOLFORMER_FAST_BACKEND forces one backend everywhere (tests use it to cover every path on any host).

On CUDA every forward goes through CUDA graphs (`poolformer.fast.cuda`) unless turned off.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .. import settings
from ..errors import ConfigError
from ..model import MetaFormer
from . import compiled, cpu, runtime_backends
from .cuda import GraphCache, graphs_enabled_by_env
from .folding import FoldedModel, fold
from .triton import availability
from .triton.chooser import TileChooser
from .triton.forward import TritonForward
from .triton.instrument import Recorder
from .triton.weights import TritonModel, prepare

BACKEND_ENV = "POOLFORMER_FAST_BACKEND"
BACKENDS = settings.SETTINGS[BACKEND_ENV].choices  # auto, then every backend (see the docstring)
RUNTIME_BACKENDS = {backend: runtime for runtime, backend in runtime_backends.BACKEND_NAMES.items()}  # -> runtime
GRAPH_BACKENDS = (*RUNTIME_BACKENDS, "inductor")  # whole-graph backends: the model's outputs, no last map
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def onednn_runs(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether oneDNN's fused primitives run `dtype` on `device` here (never off the CPU)."""
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.float32:
        return True
    if dtype == torch.bfloat16:
        from ..capabilities import cpu_capabilities

        return cpu_capabilities().onednn_bf16
    return False  # float16: oneDNN's fp16 linear is not wired into _linear_pointwise on every torch


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def requested_backend(requested: str) -> str:
    """`requested`, or the backend POOLFORMER_FAST_BACKEND forces; ConfigError for names that are none."""
    forced = settings.choice(BACKEND_ENV)
    if forced != "auto":
        requested = forced
    if requested not in BACKENDS:
        raise ConfigError(f"unknown fast backend {requested!r}; choose from: {', '.join(BACKENDS)}")
    return requested


def explain_backend(requested: str, dtype: torch.dtype, device: torch.device) -> tuple[str, str | None]:
    """The backend that runs `dtype` on `device` for a request of `requested` (see the module docstring), and
    a one-line note when "auto" passed over the Triton kernels on a GPU, where they are the fast path."""
    requested = requested_backend(requested)
    note = None
    if requested == "triton" or (requested == "auto" and device.type != "cpu"):
        reason = availability.unavailable_reason(dtype, device)
        if reason is None:
            return "triton", None
        if requested == "triton":
            raise ConfigError(f"the Triton backend cannot run here: {reason}")
        note = f"the fast path runs on PyTorch operators, not its Triton kernels: {reason}"
    if requested in RUNTIME_BACKENDS:
        runtime = RUNTIME_BACKENDS[requested]
        if not runtime_backends.runs(runtime, dtype, device):
            what = "float32, and bfloat16 on CPUs with native bf16," if runtime == "openvino" else "float32"
            raise ConfigError(f"the {requested} backend runs {what} on the CPU with {runtime} installed, not "
                              f"{_dtype_name(dtype)} on {device} here; use backend='auto'")
        return requested, None
    if requested == "inductor":
        reason = compiled.unavailable_reason(dtype, device)
        if reason is not None:
            raise ConfigError(f"the inductor backend cannot run here: {reason}")
        return requested, None
    if requested == "auto":
        for name, runtime in RUNTIME_BACKENDS.items():
            if runtime_backends.runs(runtime, dtype, device):
                return name, None
    possible = onednn_runs(dtype, device)
    if requested == "onednn" and not possible:
        raise ConfigError(f"oneDNN cannot run {_dtype_name(dtype)} on {device} here; "
                          "use backend='portable' or 'auto'")
    if requested == "portable" or not possible:
        return "portable", note
    return "onednn", note


def choose_backend(requested: str, dtype: torch.dtype, device: torch.device) -> str:
    """The backend that runs `dtype` on `device` for a request of `requested` (see the module docstring)."""
    return explain_backend(requested, dtype, device)[0]


@dataclass(frozen=True)
class Prepared:
    """The folded tensors converted for one (dtype, device), and the backend that runs them."""

    folded: FoldedModel
    backend: str
    session: nn.Module | None = None  # the openvino-folded and onnxruntime-folded backends' RuntimeModule
    triton: TritonModel | None = None  # the kernels' form of the weights (backend "triton")
    packs: cpu.ConvPacks | None = None  # backend "onednn": packed convolution weights, per input shape
    graph: nn.Module | None = None  # backend "inductor": the compiled folded graph


class FastPoolFormer(nn.Module):
    """Inference-only PoolFormer with the reference model's outputs. Input [B, 3, H, W] (any H, W >= 32),
    output float32 logits [B, num_classes]; for a features-only model (`features_only`) the list of four
    normalised stage maps [B, C_i, H_i, W_i] (channels-last in memory; in the compute dtype, float32 from the
    OpenVINO and ONNX Runtime backends).

    Runs in `dtype` (float32 unless given), or in bfloat16/float16 when called under autocast. Weights are
    converted to each (dtype, device) it meets once and cached, with the backend chosen for them
    (`backend_for`, and `backend_note` for why a faster one was not). On CUDA, repeated input shapes run as
    CUDA graphs (`cuda_graphs`, default on unless POOLFORMER_CUDA_GRAPHS=0). On the Triton kernels, `tiles`
    (a TileChooser: its own unless one is passed to share) keeps the tile each kernel shape runs with, and
    `recorder` lists the launches inside its `record_traffic()` / `mark_launches()` contexts.
    """

    def __init__(self, model: MetaFormer, dtype: torch.dtype | None = None, backend: str = "auto",
                 cuda_graphs: bool | None = None, tiles: TileChooser | None = None):
        super().__init__()
        if dtype is not None and dtype not in DTYPES:
            raise ConfigError(f"optimize() runs in float32, bfloat16 or float16, not {dtype}")
        if backend not in BACKENDS:
            raise ConfigError(f"unknown fast backend {backend!r}; choose from: {', '.join(BACKENDS)}")
        self.folded, self.plan = fold(model)
        self.dtype = dtype or torch.float32
        self.backend = backend
        self.spec = getattr(model, "spec", None)
        self.arch = model.arch
        self.num_classes = model.num_classes
        self.features_only = self.plan.features_only
        self._cache: dict[tuple, Prepared] = {}
        self._triton_failures: dict[tuple, str] = {}  # (dtype, device) -> why the kernels were given up there
        self._triton_ran: set[tuple] = set()  # (dtype, device) where a forward on the kernels succeeded
        self.cuda_graphs = graphs_enabled_by_env() if cuda_graphs is None else cuda_graphs
        self.graphs = GraphCache()
        self.tiles = tiles if tiles is not None else TileChooser.from_settings()
        self.recorder = Recorder()
        self.compile_mode: str | None = None  # backend "inductor": torch.compile's mode and backend
        self.compiler = "inductor"
        self.eval()

    def compile_with(self, mode: str | None = None, compiler: str = "inductor") -> FastPoolFormer:
        """Run on the compiled folded graph from now on (backend "inductor"; CPU): torch.compile with
        `compiler` as its backend ("eager"/"aot_eager" only trace) and `mode`. Returns self."""
        self.backend, self.compile_mode, self.compiler = "inductor", mode, compiler
        self._cache.clear()
        return self

    def compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        """bfloat16/float16 under autocast on x's device, else the dtype given to optimize()."""
        if torch.is_autocast_enabled(x.device.type):
            return torch.get_autocast_dtype(x.device.type)
        return self.dtype

    def _choice(self, dtype: torch.dtype, device: torch.device) -> tuple[str, str | None]:
        backend, note = explain_backend(self.backend, dtype, device)
        if backend != "triton":
            return backend, note
        operators = "onednn" if onednn_runs(dtype, device) else "portable"  # where the kernels cannot go
        failure = self._triton_failures.get((dtype, device))
        if failure is not None:
            return operators, failure
        reason = availability.unsupported_model_reason(self.folded, self.plan)
        if reason is None:
            return backend, note
        if requested_backend(self.backend) == "triton":
            raise ConfigError(f"the Triton backend cannot run this model: {reason}")
        return operators, f"the fast path runs on PyTorch operators, not its Triton kernels: {reason}"

    def _operators(self, backend: str, dtype: torch.dtype, device: torch.device) -> Prepared:
        """The folded tensors for the PyTorch-operator backends: pre-packed for oneDNN, or as they are."""
        folded = self.folded.to(dtype, device)
        if backend == "onednn":
            return Prepared(cpu.pack_for_onednn(folded), backend, packs=cpu.ConvPacks.if_available())
        return Prepared(folded, backend)

    def prepared(self, dtype: torch.dtype, device: torch.device) -> Prepared:
        key = (dtype, device)
        if key not in self._cache:
            backend, _ = self._choice(dtype, device)
            if backend == "triton":
                kernels_form = prepare(self.folded, dtype, device)
                self._cache[key] = Prepared(kernels_form.folded, backend, triton=kernels_form)
            elif backend in RUNTIME_BACKENDS:
                session = runtime_backends.folded_session(self.folded, self.plan, RUNTIME_BACKENDS[backend], dtype)
                self._cache[key] = Prepared(self.folded, backend, session)
            elif backend == "inductor":
                graph = compiled.compile_folded(self.folded, self.plan, dtype, self.compile_mode, self.compiler)
                self._cache[key] = Prepared(self.folded, backend, graph=graph)
            else:
                self._cache[key] = self._operators(backend, dtype, device)
        return self._cache[key]

    def _torch_path(self, dtype: torch.dtype, device: torch.device) -> Prepared:
        """oneDNN or portable, for what a whole-graph backend does not give (the last map, unnormalised)."""
        prepared = self.prepared(dtype, device)
        if prepared.backend not in GRAPH_BACKENDS:
            return prepared
        key = (dtype, device, "torch")
        if key not in self._cache:
            backend = "onednn" if onednn_runs(dtype, device) and self.backend != "portable" else "portable"
            self._cache[key] = self._operators(backend, dtype, device)
        return self._cache[key]

    def backend_for(self, dtype: torch.dtype | None = None, device: torch.device | str = "cpu") -> str:
        """The backend a forward in `dtype` (default: the module's) on `device` runs."""
        return self._choice(dtype or self.dtype, torch.device(device))[0]

    def backend_note(self, dtype: torch.dtype | None = None, device: torch.device | str = "cpu") -> str | None:
        """One line saying why a forward in `dtype` on `device` does not run the Triton kernels where they would
        be the fast path (Triton missing, a GPU or model they do not cover); None when nothing was passed over."""
        return self._choice(dtype or self.dtype, torch.device(device))[1]

    def bytes_per_image(self, batch_size: int, height: int, width: int, dtype: torch.dtype | None = None,
                        device: torch.device | str = "cuda") -> float | None:
        """Bytes the Triton kernels move per image for a [batch_size, 3, height, width] float32 input (see
        `poolformer.fast.roofline`); None where the forward does not run them."""
        from .roofline import bytes_per_image, fast_traffic

        dtype = dtype or self.dtype
        if self.backend_for(dtype, device) != "triton":
            return None
        device = torch.device(device)
        traffic = fast_traffic(self.folded, self.plan, batch_size, height, width, dtype,
                               interpret=availability.triton_interprets(), tiles=self.tiles,
                               sm_count=availability.multiprocessor_count(device))
        return bytes_per_image(traffic, batch_size)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, C, H/32, W/32] (a channels-last view), like MetaFormer.forward_features."""
        return self._run(x, last_map=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """Logits, or a features-only model's four normalised maps (see the class docstring)."""
        return self._run(x, last_map=False)

    def _run(self, x: torch.Tensor, last_map: bool) -> torch.Tensor | list[torch.Tensor]:
        if x.ndim != 4 or x.shape[1] != self.folded.stem_weight.shape[1]:
            raise ConfigError(f"expected images [B, {self.folded.stem_weight.shape[1]}, H, W], got {list(x.shape)}")
        dtype = self.compute_dtype(x)
        prepared = self.prepared(dtype, x.device)
        if prepared.backend in RUNTIME_BACKENDS and not last_map:
            with torch.no_grad():
                return prepared.session(x)
        if prepared.backend == "inductor" and not last_map:
            with torch.autocast(x.device.type, enabled=False):
                return prepared.graph(x)
        prepared = self._torch_path(dtype, x.device)
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
            try:
                out = self._forward_or_replay(x, dtype, prepared, last_map)
            except Exception as err:
                if not self._may_give_up_triton(prepared, dtype, x.device, err):
                    raise
                return self._run(x, last_map)
        if prepared.backend == "triton":
            self._triton_ran.add((dtype, x.device))
        return out

    def _forward_or_replay(self, x: torch.Tensor, dtype: torch.dtype, prepared: Prepared,
                           last_map: bool) -> torch.Tensor | list[torch.Tensor]:
        if self._use_graphs(x, prepared):
            return self.graphs(lambda images: self._forward(images, dtype, prepared, last_map), x,
                               extra=(dtype, last_map))
        return self._forward(x, dtype, prepared, last_map)

    def _may_give_up_triton(self, prepared: Prepared, dtype: torch.dtype, device: torch.device,
                            err: Exception) -> bool:
        """On the first forward in (dtype, device), a failure of the Triton kernels (a GPU or Triton version they
        do not compile on) moves backend="auto" to PyTorch operators, with `backend_note` saying why; an
        explicit backend="triton", out-of-memory, a configuration error (a bad value in poolformer.settings),
        the interpreter (tests) and a later failure raise."""
        key = (dtype, device)
        if (prepared.backend != "triton" or key in self._triton_ran
                or isinstance(err, (torch.OutOfMemoryError, ConfigError))
                or requested_backend(self.backend) == "triton" or availability.triton_interprets()):
            return False
        first_line = (str(err).strip().splitlines() or [""])[0][:300]
        self._triton_failures[key] = (f"the fast path runs on PyTorch operators: its Triton kernels failed here "
                                      f"({type(err).__name__}: {first_line})")
        self._cache.pop(key, None)
        self.graphs.clear()
        return True

    def _use_graphs(self, x: torch.Tensor, prepared: Prepared) -> bool:
        """CUDA graphs on CUDA, unless turned off or the kernels run in Triton's interpreter (host copies)."""
        if not self.cuda_graphs or x.device.type != "cuda":
            return False
        return prepared.backend != "triton" or not availability.triton_interprets()

    def _forward(self, x: torch.Tensor, dtype: torch.dtype, prepared: Prepared,
                 last_map: bool) -> torch.Tensor | list[torch.Tensor]:
        if prepared.backend == "triton":
            run = TritonForward(self.tiles, self.recorder)
            if self.features_only and not last_map:
                return [m.permute(0, 3, 1, 2) for m in run.feature_maps(x, prepared.triton, self.plan)]
            features = run.features(x, prepared.triton, self.plan)
            if last_map:
                return features.permute(0, 3, 1, 2)
            return run.head(features, prepared.triton, self.plan)
        images = x.to(dtype).contiguous(memory_format=torch.channels_last)
        maps = cpu.stages_forward(images, prepared.folded, self.plan, prepared.backend == "onednn", prepared.packs)
        if last_map:
            return maps[-1].permute(0, 3, 1, 2)
        if self.features_only:
            return [cpu.feature_norm_forward(m, norm) for m, norm in zip(maps, prepared.folded.feature_norms)]
        return cpu.head_forward(maps[-1], prepared.folded, self.plan)

    def extra_repr(self) -> str:
        name = self.spec.name if self.spec is not None else "MetaFormer"
        return (f"{name}, dtype={self.dtype}, backend={self.backend}, "
                f"blocks={sum(len(s.blocks) for s in self.folded.stages)}")


def optimize(model: MetaFormer, dtype: torch.dtype | None = None, backend: str = "auto",
             cuda_graphs: bool | None = None, tiles: TileChooser | None = None) -> FastPoolFormer:
    """An inference-only form of a PoolFormer v1/v2 `model` with the same logits, faster (see
    `poolformer.fast`).

    dtype: run in this dtype (float32 default). bfloat16 is fast on CPUs with AVX512-BF16/AMX and runs
    (emulated, slowly) elsewhere; under autocast the module switches to the autocast dtype by itself.
    backend: "auto" (default), "triton", "openvino-folded", "onnxruntime-folded", "inductor", "onednn" or
    "portable" (see this module's docstring).
    cuda_graphs: replay CUDA graphs for repeated input shapes on CUDA (default: on, unless
    POOLFORMER_CUDA_GRAPHS=0).
    tiles: the TileChooser the Triton kernels take their tiles from (default: the module's own; benchmarks pass
    one to share and report).
    Raises ConfigError for models the fast path does not cover (non-pooling token mixers, other norms).
    """
    return FastPoolFormer(model, dtype=dtype, backend=backend, cuda_graphs=cuda_graphs, tiles=tiles)
