"""Cross-check of the measuring method: does `poolformer bench` agree with independent timers?

Same configuration (s12, CPU, fp32, batch 8, 224px, 1 thread), three timers:
- ours: poolformer.bench.run_config (first call apart, 10 warm-up steps, 40 timed steps, median);
- torch.utils.benchmark.Timer.blocked_autorange (torch's own; median over blocks of runs);
- a timm benchmark.py-style loop: 10 warm-up + 40 steps timed with perf_counter, mean (what timm reports).
The three are interleaved in rounds so that a busy spell on this shared machine hits all of them alike;
each method's figure is the median over rounds.

Usage: flock /tmp/poolformer-bench.lock python benchmarks/method_crosscheck.py
Writes benchmarks/results/method_crosscheck_cpu.json and .md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.utils.benchmark as tbench

from poolformer import bench
from poolformer.envinfo import environment
from poolformer.implementations import build

from _common import write_report

RESULTS = Path(__file__).resolve().parent / "results"


def ours(config: bench.BenchConfig) -> float:
    result = bench.run_config(config, bench.BenchSettings(warmup=10, iters=40))
    return result.latency_ms.median


def torch_timer(model: torch.nn.Module, x: torch.Tensor) -> float:
    def step() -> None:
        with torch.inference_mode():
            model(x)

    step()
    measurement = tbench.Timer(stmt="step()", globals={"step": step}, num_threads=torch.get_num_threads(),
                               label="s12").blocked_autorange(min_run_time=8.0)
    return measurement.median * 1000.0


def timm_style(model: torch.nn.Module, x: torch.Tensor) -> float:
    """timm benchmark.py's inference loop: warm-up, then per-step perf_counter deltas, mean reported."""
    with torch.inference_mode():
        for _ in range(10):
            model(x)
        deltas = []
        for _ in range(40):
            t0 = time.perf_counter()
            model(x)
            deltas.append(time.perf_counter() - t0)
    return statistics.fmean(deltas) * 1000.0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = bench.BenchConfig("s12", "ours", "cpu", args.batch_size, args.resolution)
    torch.manual_seed(0)
    model = build("s12", "ours")
    x = torch.randn(args.batch_size, 3, args.resolution, args.resolution)

    rounds = []
    for _ in range(args.rounds):
        rounds.append({"ours_median_ms": ours(config), "torch_utils_benchmark_median_ms": torch_timer(model, x),
                       "timm_style_mean_ms": timm_style(model, x)})
        print(rounds[-1], flush=True)
    summary = {}
    reference = statistics.median(r["ours_median_ms"] for r in rounds)
    for key in rounds[0]:
        ms = statistics.median(r[key] for r in rounds)
        summary[key] = {"latency_ms": round(ms, 2), "img_per_s": round(args.batch_size * 1000 / ms, 2),
                        "vs_ours_pct": round((ms - reference) / reference * 100, 1)}
    command = "flock /tmp/poolformer-bench.lock python benchmarks/method_crosscheck.py " + " ".join(sys.argv[1:])
    document = {"env": environment("cpu"), "command": command, "config": vars(args), "rounds": rounds,
                "summary": summary}
    env = document["env"]
    lines = [f"# Method cross-check (s12, CPU, fp32, batch {args.batch_size}, {args.resolution}px, "
             f"{args.threads} thread(s))", "", f"Command: `{command}`  ",
             f"Date: {env['date']}, CPU: {env['cpu_model']}, torch {env['torch']}, commit {env['git_commit']}", "",
             f"Median over {args.rounds} interleaved rounds; latency per batch of {args.batch_size}.", "",
             "| timer | latency ms | img/s | vs ours |", "|---|---|---|---|"]
    for key, s in summary.items():
        lines.append(f"| {key} | {s['latency_ms']:.2f} | {s['img_per_s']:.1f} | {s['vs_ours_pct']:+.1f}% |")
    write_report(RESULTS / "method_crosscheck_cpu", document, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
