"""Where OpenVINO spends a PoolFormer forward: its per-node profile (PERF_COUNT) of `--impl fast`'s graph and of
OpenVINO's own conversion of the model, beside the rate OpenVINO multiplies at on this CPU.

Why: issue 11 asks `--impl fast` for 1.15x the best runtime. Both forms here run on OpenVINO's convolution
kernels, so how much of a forward those kernels take, and how close to the CPU's multiply rate they run, bound
what any rewriting of the rest can gain. Per form, batch and precision: milliseconds per image by node kind
(1x1 convolutions, the other convolutions, MVN, pooling, the fused element-wise subgraphs, the rest), the 1x1
convolutions' rate in GMAC/s (the model's fc1/fc2 MACs over their measured time), and, measured alternately with
the forms, a 2048x2048x2048 MatMul in OpenVINO in the same precision: the rate the 1x1 convolutions would need to
beat for a faster model. "largest gain" is the forward's time over the time of all the model's convolution MACs
at the matmul's rate with nothing else left: the most any implementation can lead this one by with kernels no
faster than that. Where a C compiler is found, fma_peak.c measures the CPU's own multiply-accumulate peak (vector
FMAs, or VDPBF16PS in bf16, with nothing else to wait on), and "gain at peak" is the same quotient at that rate:
the most any kernel at all could gain, at a rate no real convolution reaches.

    PYTHONPATH=. python benchmarks/openvino_profile.py --out benchmarks/results/openvino_profile_NAME
Writes OUT.json and OUT.md (command, machine, tables). OpenVINO's profile counts each node's own time; the
whole call (wall) also holds the input copy and the thread pool's hand-offs.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from poolformer import create_model
from poolformer.capabilities import cpu_capabilities
from poolformer.fast import fold
from poolformer.fast.openvino_graph import build_model
from poolformer.model import randomize_
from poolformer.runtimes.exporting import openvino_converter
from poolformer.runtimes.sessions import openvino_core

from _common import add_model_arguments, batches_and_precisions, write_report

RESULTS = Path(__file__).parent / "results"
PEAK_SOURCE = Path(__file__).parent / "fma_peak.c"
PRECISIONS = {"fp32": "f32", "bf16": "bf16"}
KINDS = ("1x1 convolutions", "other convolutions", "MVN", "pooling", "element-wise subgraphs", "rest")
FORMS = ("fast", "openvino/convert-model")


def kind_of(node_type: str, exec_type: str) -> str:
    if node_type == "Convolution":
        return "1x1 convolutions" if "_1x1_" in exec_type else "other convolutions"
    if node_type == "GroupConvolution":  # a depthwise pool, in graphs that spell pooling as a convolution
        return "pooling"
    return {"MVN": "MVN", "AvgPool": "pooling", "Pooling": "pooling", "Subgraph": "element-wise subgraphs",
            "Eltwise": "element-wise subgraphs"}.get(node_type, "rest")


def convolution_macs(model: torch.nn.Module, resolution: int) -> tuple[int, int]:
    """MACs per image of the blocks' fc1 and fc2 (the 1x1 convolutions), and of all the model's convolutions."""
    folded, _ = fold(model)
    side = (resolution + 2 * 2 - 7) // 4 + 1  # the stem: 7x7, stride 4, padding 2
    one_by_one, total = 0, side * side * folded.stem_weight.numel()
    for stage in folded.stages:
        if stage.down_weight is not None:
            side = (side + 2 * 1 - 3) // 2 + 1  # downsampling: 3x3, stride 2, padding 1
            total += side * side * stage.down_weight.numel()
        one_by_one += sum(side * side * (b.fc1_weight.numel() + b.fc2_weight.numel()) for b in stage.blocks)
    return one_by_one, total + one_by_one


def compile_(model, precision: str, threads: int, profile: bool):
    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": PRECISIONS[precision],
              "INFERENCE_NUM_THREADS": threads, "PERF_COUNT": profile}
    return openvino_core().compile_model(model, "CPU", config).create_infer_request()


def square_matmul(precision: str, threads: int, side: int = 2048):
    import openvino as ov
    import openvino.opset13 as ops

    rng = np.random.default_rng(0)
    x = ops.parameter([side, side], ov.Type.f32)
    weight = ops.constant(rng.standard_normal((side, side)).astype(np.float32))
    request = compile_(ov.Model([ops.matmul(x, weight, False, True)], [x]), precision, threads, profile=False)
    return request, rng.standard_normal((side, side)).astype(np.float32), side ** 3


def build_peak_probe(directory: Path) -> tuple[Path | None, str]:
    """fma_peak.c compiled for this CPU into DIRECTORY, or None and why not."""
    compiler = next(filter(None, map(shutil.which, ("cc", "gcc", "clang"))), None)
    if compiler is None:
        return None, "no C compiler found (cc, gcc, clang)"
    probe = directory / "fma_peak"
    done = subprocess.run([compiler, "-O2", "-march=native", "-pthread", str(PEAK_SOURCE), "-o", str(probe)],
                          capture_output=True, text=True)
    if done.returncode:
        return None, f"fma_peak.c did not compile with {compiler}: {(done.stderr.strip().splitlines() or ['?'])[-1]}"
    return probe, ""


def fma_peak(probe: Path | None, precision: str, threads: int, runs: int = 3, seconds: float = 0.5) -> float | None:
    """The CPU's multiply-accumulate peak in GMAC/s on THREADS threads: the best of RUNS (a ceiling: noise only
    lowers it), or None where the probe is missing or the CPU has no such instruction."""
    rates = []
    for _ in range(runs if probe is not None else 0):
        done = subprocess.run([str(probe), precision, str(threads), str(seconds)], capture_output=True, text=True)
        if done.returncode:
            return None
        rates.append(float(done.stdout))
    return max(rates, default=None)


def measure(model: torch.nn.Module, batch: int, resolution: int, precision: str, threads: int, calls: int,
            rounds: int, probe: Path | None = None) -> dict:
    shape = (batch, 3, resolution, resolution)
    folded, plan = fold(model)
    graphs = {"fast": build_model(folded, plan, shape), "openvino/convert-model": openvino_converter(model)(shape)}
    requests = {name: compile_(graph, precision, threads, profile=True) for name, graph in graphs.items()}
    matmul, matmul_input, matmul_macs = square_matmul(precision, threads)
    images = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    own = {name: defaultdict(float) for name in FORMS}
    wall = {name: [] for name in FORMS}
    matmul_s = []
    for name, request in requests.items():  # warm up: first calls allocate and tune
        for _ in range(3):
            request.infer({0: images})
    for _ in range(rounds):
        for name, request in requests.items():
            for _ in range(calls):
                start = time.perf_counter()
                request.infer({0: images})
                wall[name].append(time.perf_counter() - start)
                for node in request.profiling_info:
                    own[name][kind_of(node.node_type, node.exec_type)] += node.real_time.total_seconds()
        start = time.perf_counter()
        matmul.infer({0: matmul_input})
        matmul_s.append(time.perf_counter() - start)
    count = rounds * calls
    matmul_gmac_s = matmul_macs / float(np.median(matmul_s)) / 1e9
    peak_gmac_s = fma_peak(probe, precision, threads)
    one_by_one, total = (macs * batch for macs in convolution_macs(model, resolution))
    rows = []
    for name in FORMS:
        per_kind_ms = {kind: own[name][kind] / count * 1e3 / batch for kind in KINDS}
        profiled_ms = sum(per_kind_ms.values())
        conv_s = own[name]["1x1 convolutions"] / count
        wall_ms = float(np.median(wall[name])) * 1e3 / batch
        rows.append({"form": name, "batch_size": batch, "precision": precision, "wall_ms_per_image": wall_ms,
                     "profiled_ms_per_image": profiled_ms, "ms_per_image": per_kind_ms,
                     "share": {kind: ms / profiled_ms for kind, ms in per_kind_ms.items()},
                     "one_by_one_gmac_s": one_by_one / conv_s / 1e9, "matmul_gmac_s": matmul_gmac_s,
                     "largest_gain": wall_ms / (total / batch / (matmul_gmac_s * 1e9) * 1e3),
                     "fma_peak_gmac_s": peak_gmac_s,
                     "gain_at_peak": None if peak_gmac_s is None else
                     wall_ms / (total / batch / (peak_gmac_s * 1e9) * 1e3)})
    return rows


def markdown(results: dict) -> str:
    env = results["env"]
    lines = ["# OpenVINO's per-node profile of s12: `--impl fast`'s graph and OpenVINO's own conversion", "",
             f"Command: `{env['command']}`  ",
             f"Machine: {env['cpu']['summary']}; {env['threads']} threads; openvino {env['openvino']}, torch "
             f"{env['torch']}  ",
             f"Model: {results['model']} at {results['resolution']}x{results['resolution']}, randomised weights; "
             f"{results['rounds']} rounds of {results['calls']} profiled calls per form, a square matmul between "
             f"rounds; {env['date']}", "",
             "| precision | batch | form | wall ms/img | " + " | ".join(f"{k} ms (share)" for k in KINDS)
             + " | 1x1 conv GMAC/s | square matmul GMAC/s | largest gain | FMA peak GMAC/s | gain at peak |",
             "|---|---|---|---|" + "---|" * len(KINDS) + "---|---|---|---|---|"]
    for row in results["rows"]:
        cells = [f"{row['ms_per_image'][k]:.2f} ({row['share'][k]:.0%})" for k in KINDS]
        lines.append(f"| {row['precision']} | {row['batch_size']} | {row['form']} | {row['wall_ms_per_image']:.2f} | "
                     + " | ".join(cells) + f" | {row['one_by_one_gmac_s']:.0f} | {row['matmul_gmac_s']:.0f} | "
                     f"{row['largest_gain']:.2f}x | " + ("- | - |" if row["fma_peak_gmac_s"] is None else
                                                        f"{row['fma_peak_gmac_s']:.0f} | {row['gain_at_peak']:.2f}x |"))
    lines += ["", "Shares are of the profiled time (each node's own). \"largest gain\": wall time over the time of all "
              "the model's convolution MACs at the square matmul's rate, the most any implementation whose kernels "
              "multiply no faster than that could lead this form by. \"gain at peak\": the same at the CPU's "
              "multiply-accumulate peak (benchmarks/fma_peak.c: independent vector FMAs, VDPBF16PS in bf16), the most "
              "any kernel could gain" + ("." if env["fma_peak"] == "measured" else f"; not measured: {env['fma_peak']}.")]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser)
    parser.add_argument("--calls", type=int, default=5, help="profiled calls per form per round")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--out", default=str(RESULTS / "openvino_profile"), help="path without suffix")
    args = parser.parse_args(argv)
    if args.resolution < 32 or args.calls < 1 or args.rounds < 1:
        parser.error("--resolution must be at least 32, --calls and --rounds at least 1")
    cpu = cpu_capabilities()
    batches, precisions, _ = batches_and_precisions(parser, args, cpu)
    try:
        import openvino
    except ImportError:
        parser.error("openvino is not installed: pip install -e '.[dev]'")
    torch.set_num_threads(args.threads)
    model = randomize_(create_model(args.model), std=0.02).eval()
    build = tempfile.TemporaryDirectory(prefix="fma_peak_")
    probe, why_no_probe = build_peak_probe(Path(build.name))
    results = {"model": model.spec.name, "resolution": args.resolution, "calls": args.calls, "rounds": args.rounds,
               "env": {"command": "python " + " ".join(["benchmarks/openvino_profile.py",
                                                         *(sys.argv[1:] if argv is None else argv)]),
                       "cpu": cpu.to_dict(), "threads": args.threads, "openvino": openvino.__version__,
                       "torch": torch.__version__, "platform": platform.platform(),
                       "fma_peak": why_no_probe or "measured",
                       "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")},
               "rows": []}
    for precision in precisions:
        for batch in batches:
            for row in measure(model, batch, args.resolution, precision, args.threads, args.calls, args.rounds,
                               probe):
                results["rows"].append(row)
                print(f"{precision} batch {batch} {row['form']}: {row['wall_ms_per_image']:.2f} ms/img, 1x1 "
                      f"convolutions {row['share']['1x1 convolutions']:.0%} at {row['one_by_one_gmac_s']:.0f} GMAC/s "
                      f"(square matmul {row['matmul_gmac_s']:.0f}, FMA peak {row['fma_peak_gmac_s'] or 0:.0f}); largest "
                      f"gain {row['largest_gain']:.2f}x", flush=True)
    build.cleanup()
    write_report(Path(args.out), results, markdown(results))


if __name__ == "__main__":
    main()
