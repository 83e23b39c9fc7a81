"""Does OpenVINO corrupt the heap on this machine? glibc's heap checks around a one-layer OpenVINO model.

Why this exists: with OpenVINO as `optimize()`'s default CPU backend, the test suite's process died with
SIGSEGV on a 2-core AMD EPYC (Zen 5, AVX-512, Firecracker VM) every run, always at the same test, with a
corrupt Python object or frame under gdb. Under glibc's checking allocator the same processes abort with
"free(): invalid next size (fast)" in a chunk of hwloc's topology (OpenVINO's TBB frees it when its threads
exit): heap memory that no Python code touches was overwritten. This script shows it without poolformer:
each case is a fresh process that compiles and runs one ONNX file in OpenVINO (or in ONNX Runtime, the
control) with glibc's checks on, and counts the processes glibc stopped. The file is s12's folded graph as
optimize() hands it to OpenVINO, exported once by this script; the checked processes import nothing of
poolformer (a one-layer ReLU model shows it too, less often: about 1 process in 10 after import onnxruntime).

Cases: OpenVINO alone; OpenVINO after `import onnxruntime` or `import torch` (other extensions move the heap
around, which decides whether the overwrite hits a chunk header glibc checks); ONNX Runtime after
`import torch` (auto's fp32 CPU backend, the control). Checks: PYTHONMALLOC=malloc (Python's objects in
glibc's heap too), MALLOC_CHECK_=3 and, on glibc >= 2.34, LD_PRELOAD=libc_malloc_debug.so.0 (where the
checks live there). An abort rate above zero means: do not run OpenVINO in a long-lived process here.

    python benchmarks/openvino_heap_check.py --runs 12 --out benchmarks/results/openvino_heap_check_NAME
Writes OUT.json and OUT.md (command, machine, one row per case).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from poolformer_cli.common import write_atomic

RESULTS = Path(__file__).parent / "results"

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
CASES = {
    "openvino": ("OpenVINO alone", "", _OPENVINO),
    "openvino-after-onnxruntime": ("OpenVINO after import onnxruntime", "import onnxruntime", _OPENVINO),
    "openvino-after-torch": ("OpenVINO after import torch", "import torch", _OPENVINO),
    "onnxruntime-after-torch": ("ONNX Runtime after import torch (control)", "import torch", _ONNXRUNTIME),
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


def checked_environment() -> dict[str, str]:
    env = {**os.environ, "PYTHONMALLOC": "malloc", "MALLOC_CHECK_": "3"}
    library = malloc_debug_library()
    if library:
        env["LD_PRELOAD"] = library
    return env


def export_model(path: Path, resolution: int) -> None:
    """poolformer_s12 (randomised weights) as the fast path's folded graph for [2, 3, R, R]: the graph OpenVINO
    compiles as optimize()'s backend. Exported here, so that the checked processes import no poolformer."""
    import torch

    from poolformer import create_model
    from poolformer.runtimes.export_forms import FoldedExport
    from poolformer.runtimes.exporting import export_onnx

    torch.manual_seed(0)
    export_onnx(FoldedExport(create_model("s12").eval()), path, (2, 3, resolution, resolution))


def run_case(name: str, model_path: Path, runs: int, timeout: float) -> dict:
    """`runs` fresh processes of case `name`; how many glibc stopped (or that failed otherwise)."""
    label, first, body = CASES[name]
    outcomes = []
    for _ in range(runs):
        try:
            done = subprocess.run([sys.executable, "-c", f"{first}\n{body}", str(model_path)],
                                  env=checked_environment(), capture_output=True, text=True, timeout=timeout)
            lines = [line for line in done.stderr.splitlines() if line.strip()]
            outcomes.append({"returncode": done.returncode, "last_stderr_line": lines[-1][:200] if lines else ""})
        except subprocess.TimeoutExpired:
            outcomes.append({"returncode": None, "last_stderr_line": f"timed out after {timeout:.0f} s"})
    failed = [o for o in outcomes if o["returncode"] != 0]
    messages = sorted({o["last_stderr_line"] for o in failed})
    return {"case": name, "label": label, "runs": runs, "failed": len(failed), "messages": messages}


def markdown(results: dict) -> str:
    env = results["env"]
    lines = [
        "# glibc's heap checks around OpenVINO and ONNX Runtime (fresh processes)",
        "",
        f"Command: `{env['command']}`  ",
        f"Machine: {env['cpu_model']}; kernel {env['kernel']}; {env['glibc']}; checks: {env['checks']}  ",
        f"Versions: Python {env['python']}, " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()) + "  ",
        f"Date: {env['date']}",
        "",
        "| case | processes | stopped by glibc or failed | messages |",
        "|---|---|---|---|",
    ]
    for row in results["cases"]:
        messages = "; ".join(f"`{m}`" for m in row["messages"]) or "-"
        lines.append(f"| {row['label']} | {row['runs']} | {row['failed']} | {messages} |")
    lines += ["", f"Each process compiles and runs s12's folded graph ({results['model']}) once and exits; a non-zero "
              "count means the heap was found overwritten (or the run failed: see the messages)."]
    return "\n".join(lines) + "\n"


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("openvino", "onnxruntime", "torch"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "not installed"
    return found


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=12, help="fresh processes per case")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from: {', '.join(CASES)}")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per process")
    parser.add_argument("--resolution", type=int, default=64, help="input side of the exported model")
    parser.add_argument("--out", default=str(RESULTS / "openvino_heap_check"), help="path without suffix")
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
    missing = sorted({"openvino" if c.startswith("openvino") else "onnxruntime" for c in cases} - {
        p for p, v in versions.items() if v != "not installed"})
    if missing:
        parser.error(f"{', '.join(missing)} is not installed: pip install -e '.[dev]'")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not os.access(out.parent, os.W_OK):
        parser.error(f"cannot write to {out.parent}")
    from poolformer.capabilities import cpu_capabilities

    library = malloc_debug_library()
    results = {
        "env": {"command": "python " + " ".join(["benchmarks/openvino_heap_check.py",
                                                   *(sys.argv[1:] if argv is None else argv)]),
                "cpu_model": cpu_capabilities().model, "cpu": cpu_capabilities().to_dict(),
                "kernel": platform.release(), "glibc": " ".join(platform.libc_ver()),
                "checks": "PYTHONMALLOC=malloc MALLOC_CHECK_=3" + (f" LD_PRELOAD={library}" if library else ""),
                "python": platform.python_version(), "versions": versions,
                "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")},
        "model": f"poolformer_s12 folded, [2, 3, {args.resolution}, {args.resolution}], fp32",
        "cases": [],
    }
    folder = tempfile.mkdtemp(prefix="poolformer-heap-check-")
    try:
        model_path = Path(folder) / "s12_folded.onnx"
        export_model(model_path, args.resolution)
        rows = []
        for name in cases:
            row = run_case(name, model_path, args.runs, args.timeout)
            rows.append(row)
            print(f"{row['label']}: {row['failed']}/{row['runs']} stopped" + (
                f" ({'; '.join(row['messages'])})" if row["messages"] else ""), flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    results["cases"] = rows
    write_atomic(out.with_suffix(".json"), json.dumps(results, indent=2) + "\n")
    write_atomic(out.with_suffix(".md"), markdown(results))
    print(f"wrote {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
