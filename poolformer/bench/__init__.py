"""The benchmark engine: throughput, latency distribution and peak memory per configuration.

Modules: `config` (what a row is, its settings and result, the checks), `models` (the row's model and input),
`inference` (an inference row), `runner` (a run over many rows), `reference` (normalised mode's workload),
`max_batch` (the largest batch that runs). This package's names are the engine's API.

How a configuration (model, implementation, device, batch size, input size (height x width), precision, memory
format, compile, features-only backbone) is measured, in order:

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
see reference.reference_workload) runs right after every model step, so that throughput can be compared relative to
the machine's speed at that moment (see BenchResult.relative_throughput and poolformer.regression).
"""

from .config import (
    BUILD_SEED, COMPILE_BACKENDS, COMPILE_MODES, PARITY_SAMPLES, PARITY_TOLERANCE, STATUSES, BenchConfig, BenchResult,
    BenchSettings, BuildModel, LatencyStats, Parity, check_config, check_precision, check_settings, percentile,
    resolve_device,
)
from .inference import check_parity, run_config
from .max_batch import MaxBatch, find_max_batch, search_max_batch
from .models import ModelCache, check_weights, describe, make_input, prepare_model, row_autocast, target
from .reference import reference_workload
from .runner import apply_settings, expand_configs, run_benchmark
from .train import check_train_parity, run_train_config, train_reference
from ..measure import synchronize

__all__ = [
    "BUILD_SEED", "COMPILE_BACKENDS", "COMPILE_MODES", "PARITY_SAMPLES", "PARITY_TOLERANCE", "STATUSES", "BenchConfig",
    "BenchResult", "BenchSettings", "BuildModel", "LatencyStats", "Parity", "check_precision", "check_settings",
    "percentile", "resolve_device", "check_parity", "run_config", "MaxBatch", "find_max_batch", "search_max_batch",
    "ModelCache", "check_weights", "describe", "make_input", "prepare_model", "row_autocast", "target", "reference_workload",
    "apply_settings", "expand_configs", "run_benchmark", "synchronize", "check_train_parity", "run_train_config",
    "train_reference", "check_config",
]
