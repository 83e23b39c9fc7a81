"""Why OpenVINO crashed long-lived processes here, shown in fresh processes that import no poolformer code
(except the one case that checks poolformer's own runners).

The story: with OpenVINO as the fast path's default CPU backend, the test suite's process died with SIGSEGV on a
2-core AMD EPYC (Zen 5, AVX-512) every run, always at the same test, with no traceback from faulthandler.

- **The cause: the signal stack.** Each `ov.Core` gets its own CPU plugin. The plugin's constructor replaces the
  signal stack (sigaltstack) of the thread that makes it with a fresh mmap'd one. Its destructor unmaps that
  stack and puts back the one it replaced, but only if its own is still current. Make Core A then Core B and
  free A first: A's stack is unmapped while B's is current. Then B, freed, puts back A's, which is unmapped.
  Python installs its signal handlers with SA_ONSTACK, so the next signal it handles on that thread kills the
  process: the kernel cannot write the signal frame and raises SIGSEGV (si_code SI_KERNEL), at whatever
  system call the thread was in. Examples are SIGCHLD with a DataLoader's handler installed, or Ctrl-C. In
  the suite it was SIGCHLD while inductor read `g++ --version`. Freed the other way round, nothing happens.
  poolformer's runners now share one Core per process (`poolformer.runtimes.sessions.openvino_core`).
- **Not the cause: the heap.** An earlier version of this script ran OpenVINO under glibc's checking
  allocator (LD_PRELOAD=libc_malloc_debug.so.0, MALLOC_CHECK_=3). 3-9 processes in 12 were stopped with
  `free(): invalid next size (fast)` in hwloc's topology data, and that was taken for the suite's crash. It is
  an artefact of the check. TBB loads its topology library (tbbbind, and through it hwloc) with RTLD_DEEPBIND,
  so hwloc's malloc and free bind to libc's own allocator, not to the checking one that everything else uses.
  Two allocators then grow one heap, each unaware of the other. With TBB_ENABLE_SANITIZERS=1 (TBB then loads
  the library without RTLD_DEEPBIND), the same check stops no process.

Cases (each a fresh process, counted as failed on a non-zero exit):
- signal stack (no checks): two Cores freed in the order they were made, or the other way round, then a signal
  with a Python handler; two poolformer OpenVINO runners freed in the order they were made, then the signal.
- heap (glibc's checks): OpenVINO compiling and running s12's folded graph, alone, after `import onnxruntime`,
  and with TBB_ENABLE_SANITIZERS=1; ONNX Runtime after `import torch` as the control.

    python benchmarks/openvino_crash_check.py --runs 12 --out benchmarks/results/openvino_crash_check_NAME
Writes OUT.json and OUT.md (command, machine, one row per case).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from _common import write_report

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parents[1]

_SIGNAL = """
import gc, os, signal, sys
signal.signal(signal.SIGUSR1, lambda *_: print("handled", flush=True))
{make}
first, second = make(), make()
{free}
gc.collect()
os.kill(os.getpid(), signal.SIGUSR1)
print("survived", flush=True)
"""
_CORES = """
import openvino as ov
def make():
    core = ov.Core()
    core.get_property("CPU", "FULL_DEVICE_NAME")  # makes the CPU plugin
    return core
"""
_RUNNERS = """
from poolformer.runtimes.sessions import make_runner
def make():
    return make_runner("openvino", sys.argv[1], threads=1)
"""
_IN_ORDER, _REVERSED = "del first; gc.collect(); del second", "del second; gc.collect(); del first"

_OPENVINO = """
import sys, numpy as np, openvino as ov
core = ov.Core()
model = core.read_model(sys.argv[1])
c = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": 2})
shape = [d.get_length() for d in model.inputs[0].get_partial_shape()]
print(float(c.create_infer_request().infer({0: np.ones(shape, np.float32)})[c.output(0)].sum()))
"""
_ONNXRUNTIME = """
import sys, numpy as np, onnxruntime as ort
options = ort.SessionOptions()
options.intra_op_num_threads = 2
session = ort.InferenceSession(sys.argv[1], options, providers=["CPUExecutionProvider"])
shape = session.get_inputs()[0].shape
print(float(session.run(None, {session.get_inputs()[0].name: np.ones(shape, np.float32)})[0].sum()))
"""


@dataclass(frozen=True)
class Case:
    label: str
    code: str
    heap_checks: bool  # run under glibc's checking allocator
    runtime: str  # the package it needs
    env: dict[str, str] = field(default_factory=dict)


CASES = {
    "cores-in-order": Case("two Cores freed in the order they were made, then a signal",
                           _SIGNAL.format(make=_CORES, free=_IN_ORDER), False, "openvino"),
    "cores-reversed": Case("two Cores freed in reverse order, then a signal",
                           _SIGNAL.format(make=_CORES, free=_REVERSED), False, "openvino"),
    "poolformer-runners": Case("two poolformer OpenVINO runners freed in the order they were made, then a signal",
                               _SIGNAL.format(make=_RUNNERS, free=_IN_ORDER), False, "openvino"),
    "heap-openvino": Case("heap checks: OpenVINO", _OPENVINO, True, "openvino"),
    "heap-openvino-after-onnxruntime": Case("heap checks: OpenVINO after import onnxruntime",
                                            "import onnxruntime\n" + _OPENVINO, True, "openvino"),
    "heap-openvino-one-allocator": Case("heap checks: OpenVINO after import onnxruntime, with TBB_ENABLE_SANITIZERS=1 "
                                        "(hwloc on the checked allocator too)", "import onnxruntime\n" + _OPENVINO,
                                        True, "openvino", {"TBB_ENABLE_SANITIZERS": "1"}),
    "heap-onnxruntime": Case("heap checks: ONNX Runtime after import torch (control)",
                             "import torch\n" + _ONNXRUNTIME, True, "onnxruntime"),
}
_DEBUG_LIBRARY = "libc_malloc_debug.so.0"
_LIBRARY_DIRS = ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib/aarch64-linux-gnu",
                 "/usr/lib/aarch64-linux-gnu", "/lib64", "/usr/lib64", "/lib", "/usr/lib")


def malloc_debug_library() -> str | None:
    """glibc's checking allocator (glibc >= 2.34 moved MALLOC_CHECK_ into it), or None where there is none."""
    for folder in _LIBRARY_DIRS:
        path = os.path.join(folder, _DEBUG_LIBRARY)
        if os.path.exists(path):
            return path
    return None


def heap_check_settings() -> dict[str, str]:
    settings = {"PYTHONMALLOC": "malloc", "MALLOC_CHECK_": "3"}
    library = malloc_debug_library()
    if library:
        settings["LD_PRELOAD"] = library
    return settings


def export_model(path: Path, resolution: int) -> None:
    """poolformer_s12 (randomised weights) as the fast path's folded graph for [2, 3, R, R]: the graph OpenVINO
    compiles as optimize()'s backend. Exported here, so that the checked processes import no poolformer."""
    import torch

    from poolformer import create_model
    from poolformer.fast.folded_export import FoldedExport
    from poolformer.runtimes.exporting import export_onnx

    torch.manual_seed(0)
    export_onnx(FoldedExport(create_model("s12").eval()), path, (2, 3, resolution, resolution))


def run_case(name: str, model_path: Path, runs: int, timeout: float) -> dict:
    """`runs` fresh processes of case `name`, and how many failed (non-zero exit, or a signal case whose handler
    did not run)."""
    case = CASES[name]
    env = {**os.environ, "PYTHONPATH": str(ROOT), **case.env, **(heap_check_settings() if case.heap_checks else {})}
    outcomes = []
    for _ in range(runs):
        try:
            done = subprocess.run([sys.executable, "-c", case.code, str(model_path)], env=env, capture_output=True,
                                  text=True, timeout=timeout)
            lines = [line for line in done.stderr.splitlines() if line.strip()]
            message = lines[-1][:200] if lines else (f"killed by signal {-done.returncode}"
                                                     if done.returncode < 0 else "")
            ok = done.returncode == 0 and ("handled" in done.stdout.split() if "SIGUSR1" in case.code else True)
            outcomes.append({"returncode": done.returncode, "ok": ok, "message": message})
        except subprocess.TimeoutExpired:
            outcomes.append({"returncode": None, "ok": False, "message": f"timed out after {timeout:.0f} s"})
    failed = [o for o in outcomes if not o["ok"]]
    return {"case": name, "label": case.label, "heap_checks": case.heap_checks, "env": case.env, "runs": runs,
            "failed": len(failed), "messages": sorted({o["message"] for o in failed})}


def markdown(results: dict) -> str:
    env = results["env"]
    lines = [
        "# OpenVINO in long-lived processes: the signal stack, and the heap (fresh processes)",
        "",
        f"Command: `{env['command']}`  ",
        f"Machine: {env['cpu_model']}; kernel {env['kernel']}; {env['glibc']}; heap checks: {env['checks']}  ",
        f"Versions: Python {env['python']}, " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()) + "  ",
        f"Date: {env['date']}",
        "",
        "| case | processes | failed | messages |",
        "|---|---|---|---|",
    ]
    for row in results["cases"]:
        messages = "; ".join(f"`{m}`" for m in row["messages"]) or "-"
        lines.append(f"| {row['label']} | {row['runs']} | {row['failed']} | {messages} |")
    lines += ["", "Signal cases: a process fails if it dies or its SIGUSR1 handler does not run. Heap cases: each "
              f"process compiles and runs s12's folded graph ({results['model']}) once under glibc's checks, and "
              "fails if glibc stops it. See the script's docstring for what each case shows."]
    return "\n".join(lines) + "\n"


def _versions() -> dict[str, str]:
    from poolformer.envinfo import _version

    return {package: _version(package) or "not installed" for package in ("openvino", "onnxruntime", "torch")}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=12, help="fresh processes per case")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from: {', '.join(CASES)}")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per process")
    parser.add_argument("--resolution", type=int, default=64, help="input side of the exported model")
    parser.add_argument("--out", default=str(RESULTS / "openvino_crash_check"), help="path without suffix")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    if args.resolution < 32:
        parser.error("--resolution must be at least 32 (the model downsamples 32x)")
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown or not cases:
        parser.error(f"unknown case(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(CASES)}")
    versions = _versions()
    missing = sorted({CASES[c].runtime for c in cases} - {p for p, v in versions.items() if v != "not installed"})
    if missing:
        parser.error(f"{', '.join(missing)} is not installed: pip install -e '.[dev]'")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not os.access(out.parent, os.W_OK):
        parser.error(f"cannot write to {out.parent}")
    from poolformer.capabilities import cpu_capabilities

    results = {
        "env": {"command": "python " + " ".join(["benchmarks/openvino_crash_check.py",
                                                   *(sys.argv[1:] if argv is None else argv)]),
                "cpu_model": cpu_capabilities().model, "cpu": cpu_capabilities().to_dict(),
                "kernel": platform.release(), "glibc": " ".join(platform.libc_ver()),
                "checks": " ".join(f"{k}={v}" for k, v in heap_check_settings().items()),
                "python": platform.python_version(), "versions": versions,
                "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")},
        "model": f"poolformer_s12 folded, [2, 3, {args.resolution}, {args.resolution}], fp32",
        "cases": [],
    }
    folder = tempfile.mkdtemp(prefix="poolformer-crash-check-")
    try:
        model_path = Path(folder) / "s12_folded.onnx"
        export_model(model_path, args.resolution)
        rows = []
        for name in cases:
            row = run_case(name, model_path, args.runs, args.timeout)
            rows.append(row)
            print(f"{row['label']}: {row['failed']}/{row['runs']} failed" + (
                f" ({'; '.join(row['messages'])})" if row["messages"] else ""), flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    results["cases"] = rows
    write_report(out, results, markdown(results))


if __name__ == "__main__":
    main()
