"""Does the throughput-regression check stay quiet on noise and fire on a real 20% slowdown?

Runs the configuration that .ci/run checks (s12, CPU, 1 thread, batch 8, 128px, normalised mode)
many times with the SAME code, and compares every run with the first one (the "baseline"), in raw mode
(images/s) and in normalised mode (images/s relative to the interleaved reference workload). Then:

- ``sleep20``: the model's forward sleeps 25% of the baseline median latency per step -> exactly 20% fewer
  images/s, with the CPU idle meanwhile;
- ``spin20``: the forward busy-waits for the same time instead, i.e. the code is 25% more work, the way a
  real slower kernel is;
- ``busy``: the same code while two CPU-hog processes compete for the two cores (a busier CI machine).

A check "fires" when a configuration is more than THRESHOLD% below the baseline.

Usage (timings must not overlap other benchmarks):
    flock /tmp/poolformer-bench.lock python benchmarks/regression_check.py
Writes benchmarks/results/regression_check_cpu.json and .md.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from poolformer import bench, implementations
from poolformer.envinfo import environment
from poolformer.regression import compare

from _common import write_report

RESULTS = Path(__file__).resolve().parent / "results"
# What the committed results show; regenerate by hand if a rerun says otherwise.
READING = """Reading: the same code run again moves raw images/s by -12%..+32% on this shared 2-core machine (other
jobs run beside it) and the normalised figure by -9%..+8%: at a 12% threshold raw mode fired once on pure
noise, normalised mode never did. 25% more CPU work per step (`spin20`, i.e. 20% fewer images/s) fired in
both modes every time. Two CPU hogs beside the run (`busy`) fired raw mode every time (-48%..-68%) and
normalised mode never (within 5%). `sleep20` (an idle sleep instead of work) fires raw mode but not
normalised mode here: while our process sleeps, the kernel's fair scheduler runs the other jobs and then
favours ours, so its compute and the paired reference run faster afterwards; a sleep is not work that
scales with the machine, which is what normalised mode divides out. On an idle machine a sleep is just
20% more time. Cross-machine comparisons (the CI step) need a looser threshold: .ci/run uses 30%."""
CI_ARGS = dict(models=["s12"], impls=["ours"], device="cpu", batch_sizes=[8], resolutions=[128],
               precisions=["fp32"], channels_last=False, compile=False)
SETTINGS = bench.BenchSettings(warmup=3, iters=30, threads=1, normalised=True)


class Slowed(nn.Module):
    """The model plus `extra_ms` per forward, spent sleeping or spinning."""

    def __init__(self, model: nn.Module, extra_ms: dict[int, float], spin: bool):
        super().__init__()
        self.model, self.extra_ms, self.spin = model, extra_ms, spin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        extra_s = self.extra_ms[x.shape[0]] / 1000.0
        if self.spin:
            until = time.perf_counter() + extra_s
            while time.perf_counter() < until:
                pass
        else:
            time.sleep(extra_s)
        return out


class SlowedOurs(implementations.Implementation):
    """Our model, `Slowed` by `extra_ms` per forward."""

    def __init__(self, extra_ms: dict[int, float], spin: bool):
        self.extra_ms, self.spin = extra_ms, spin

    def convert(self, model: nn.Module) -> nn.Module:
        return Slowed(model, self.extra_ms, self.spin)


def run_once() -> list[dict]:
    configs = bench.expand_configs(**CI_ARGS)
    return [r.to_row() for r in bench.run_benchmark(configs, SETTINGS)]


def hog(stop_at: float) -> None:
    while time.time() < stop_at:
        pass


def changes(baseline: list[dict], current: list[dict], threshold: float) -> dict:
    out = {}
    for mode, normalised in (("raw", False), ("normalised", True)):
        report = compare(baseline, current, threshold, normalised=normalised)
        out[mode] = {"change_pct": [round(c.change_pct, 2) for c in report.comparisons], "fired": report.failed}
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=8, help="noise runs after the baseline run")
    parser.add_argument("--slow-repeats", type=int, default=3)
    parser.add_argument("--threshold", type=float, default=12.0, help="max regression, percent")
    args = parser.parse_args()

    baseline = run_once()
    scenarios: dict[str, list] = {"noise": [], "sleep20": [], "spin20": [], "busy": []}
    for _ in range(args.repeats):
        scenarios["noise"].append(changes(baseline, run_once(), args.threshold))

    extra_ms = {r["batch_size"]: 0.25 * r["latency_ms"]["median"] for r in baseline}
    real_ours = implementations.IMPLEMENTATIONS["ours"]
    for name, spin in (("sleep20", False), ("spin20", True)):
        implementations.IMPLEMENTATIONS["ours"] = SlowedOurs(extra_ms, spin)
        try:
            for _ in range(args.slow_repeats):
                scenarios[name].append(changes(baseline, run_once(), args.threshold))
        finally:
            implementations.IMPLEMENTATIONS["ours"] = real_ours

    for _ in range(args.slow_repeats):
        stop_at = time.time() + 60
        hogs = [multiprocessing.Process(target=hog, args=(stop_at,)) for _ in range(2)]
        for p in hogs:
            p.start()
        try:
            scenarios["busy"].append(changes(baseline, run_once(), args.threshold))
        finally:
            for p in hogs:
                p.terminate()
                p.join()

    summary = {}
    for name, runs in scenarios.items():
        summary[name] = {}
        for mode in ("raw", "normalised"):
            values = [v for run in runs for v in run[mode]["change_pct"]]
            summary[name][mode] = {"runs": len(runs), "fired": sum(run[mode]["fired"] for run in runs),
                                   "change_pct_min": min(values), "change_pct_median": statistics.median(values),
                                   "change_pct_max": max(values)}
    document = {"env": environment("cpu"), "command": "flock /tmp/poolformer-bench.lock python "
                "benchmarks/regression_check.py " + " ".join(sys.argv[1:]), "threshold_pct": args.threshold,
                "config": {**CI_ARGS, "warmup": SETTINGS.warmup, "iters": SETTINGS.iters, "threads": SETTINGS.threads},
                "baseline": baseline, "scenarios": scenarios, "summary": summary}
    lines = [f"# Regression check on noise and on a 20% slowdown (CPU, threshold {args.threshold:g}%)", "",
             f"Command: `{document['command']}`  ", f"Date: {document['env']['date']}, CPU: "
             f"{document['env']['cpu_model']}, torch {document['env']['torch']}, commit {document['env']['git_commit']}",
             "", "Change against the baseline run, over all runs (s12, batch 8, 128px, 1 thread, 30 timed steps each):", "",
             "| scenario | mode | runs | fired | min change | median change | max change |",
             "|---|---|---|---|---|---|---|"]
    for name, modes in summary.items():
        for mode, s in modes.items():
            lines.append(f"| {name} | {mode} | {s['runs']} | {s['fired']} | {s['change_pct_min']:+.1f}% | "
                         f"{s['change_pct_median']:+.1f}% | {s['change_pct_max']:+.1f}% |")
    lines += ["", READING]
    write_report(RESULTS / "regression_check_cpu", document, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
