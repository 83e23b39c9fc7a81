"""CPU throughput of `--impl fast` against the reference model and timm, interleaved in one run.

For every (precision, batch size) the candidates -- ours (reference MetaFormer, NCHW), timm NCHW, timm
channels_last, fast -- take one timed step each in turn, round after round, so that load from other
processes hits them alike; the figure per candidate is the median step. The whole sweep runs --repeats
times; the table gives the median over all steps and the spread of the fast/timm ratio across repeats. bf16 runs every candidate under
`torch.autocast("cpu", dtype=torch.bfloat16)`, as `poolformer bench --precision bf16` does. All share the
same weights (randomised, as no download is possible here) and `torch.set_num_threads(threads)`.

Run it under the shared lock, as other jobs share the cores:
    flock /tmp/poolformer-bench.lock python benchmarks/fast_cpu.py
Writes benchmarks/results/fast_cpu.json and fast_cpu.md (with the command, machine and ratio table).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from poolformer import create_model
from poolformer.fast import optimize
from poolformer.implementations import IMPLEMENTATIONS
from poolformer.model import randomize_

from _common import write_report

RESULTS = Path(__file__).parent / "results"


def candidates(model_name: str) -> dict[str, tuple[torch.nn.Module, str]]:
    """name -> (module, input memory format); all carry the same weights."""
    ours = randomize_(create_model(model_name), std=0.02)
    timm_nchw = IMPLEMENTATIONS["timm"].convert(ours)
    timm_cl = IMPLEMENTATIONS["timm"].convert(ours).to(memory_format=torch.channels_last)
    return {
        "ours": (ours, "nchw"),
        "timm_nchw": (timm_nchw, "nchw"),
        "timm_channels_last": (timm_cl, "channels_last"),
        "fast": (optimize(ours), "nchw"),
    }


def measure(models, batch_size: int, resolution: int, precision: str, rounds: int, warmup: int) -> dict:
    """Median seconds per step of each candidate, stepping them in turn; plus output agreement."""
    x = torch.randn(batch_size, 3, resolution, resolution, generator=torch.Generator().manual_seed(1))
    inputs = {fmt: x.contiguous(memory_format=torch.channels_last) if fmt == "channels_last" else x
              for fmt in ("nchw", "channels_last")}
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    steps: dict[str, list[float]] = {name: [] for name in models}
    outputs = {}
    with torch.inference_mode(), autocast:
        for round_index in range(warmup + rounds):
            for name, (module, fmt) in models.items():
                start = time.perf_counter()
                out = module(inputs[fmt])
                elapsed = time.perf_counter() - start
                if round_index >= warmup:
                    steps[name].append(elapsed)
                outputs[name] = out.float()
    medians = {name: statistics.median(times) for name, times in steps.items()}
    spread = {name: [min(times), max(times)] for name, times in steps.items()}
    reference = outputs["ours"]
    return {
        "batch_size": batch_size,
        "precision": precision,
        "steps_s": steps,
        "step_s_median": medians,
        "step_s_min_max": spread,
        "images_per_s": {name: batch_size / s for name, s in medians.items()},
        "fast_vs_timm_best": min(medians["timm_nchw"], medians["timm_channels_last"]) / medians["fast"],
        "fast_vs_timm_nchw": medians["timm_nchw"] / medians["fast"],
        "fast_vs_timm_channels_last": medians["timm_channels_last"] / medians["fast"],
        "fast_vs_ours": medians["ours"] / medians["fast"],
        "fast_max_abs_diff_vs_ours": (outputs["fast"] - reference).abs().max().item(),
        "fast_top1_agreement_vs_ours": (outputs["fast"].argmax(1) == reference.argmax(1)).float().mean().item(),
    }


def combine(repeats: list[dict]) -> dict:
    """One row from the same configuration measured in several sweeps: medians over all their steps, and
    each sweep's fast/timm ratio for the spread."""
    row = dict(repeats[0])
    steps = {name: [s for r in repeats for s in r["steps_s"][name]] for name in row["steps_s"]}
    medians = {name: statistics.median(times) for name, times in steps.items()}
    best_timm = min(medians["timm_nchw"], medians["timm_channels_last"])
    row.update(
        steps_s=steps,
        step_s_median=medians,
        step_s_min_max={name: [min(t), max(t)] for name, t in steps.items()},
        images_per_s={name: row["batch_size"] / s for name, s in medians.items()},
        fast_vs_timm_best=best_timm / medians["fast"],
        fast_vs_timm_best_per_repeat=[r["fast_vs_timm_best"] for r in repeats],
        fast_vs_timm_nchw=medians["timm_nchw"] / medians["fast"],
        fast_vs_timm_channels_last=medians["timm_channels_last"] / medians["fast"],
        fast_vs_ours=medians["ours"] / medians["fast"],
    )
    return row


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def markdown(report: dict) -> str:
    lines = [
        "# Fast path on CPU: throughput against timm (interleaved, median step)",
        "",
        f"Command: `{report['command']}`  ",
        f"Machine: {report['machine']}, {report['threads']} threads, torch {report['torch']}, timm {report['timm']}  ",
        f"Model: {report['model']} at {report['resolution']}x{report['resolution']}, randomised weights; "
        f"{report['repeats']} sweeps of {report['rounds']} timed rounds after {report['warmup']} warm-up rounds; "
        f"{report['utc']}",
        "",
        "| precision | batch | ours img/s | timm NCHW img/s | timm CL img/s | fast img/s | fast / best timm "
        "| (per repeat) | fast / ours | max abs diff vs ours | top-1 agree |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        ips = row["images_per_s"]
        lines.append(
            f"| {row['precision']} | {row['batch_size']} | {ips['ours']:.1f} | {ips['timm_nchw']:.1f} | "
            f"{ips['timm_channels_last']:.1f} | {ips['fast']:.1f} | {row['fast_vs_timm_best']:.2f}x | "
            f"{', '.join(f'{r:.2f}' for r in row['fast_vs_timm_best_per_repeat'])} | "
            f"{row['fast_vs_ours']:.2f}x | {row['fast_max_abs_diff_vs_ours']:.1e} | "
            f"{row['fast_top1_agreement_vs_ours']:.2f} |"
        )
    lines += ["", "Ratios are of median step times measured in the same run; the JSON file has min/max steps."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="poolformer_s12")
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--batch-sizes", default="1,16,32")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="whole sweeps, for the spread of the ratios")
    parser.add_argument("--out", default=str(RESULTS / "fast_cpu"), help="output path without extension")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    import timm

    models = candidates(args.model)
    sweeps = []
    for _ in range(args.repeats):
        sweep = []
        for precision in args.precisions.split(","):
            for batch_size in (int(b) for b in args.batch_sizes.split(",")):
                sweep.append(measure(models, batch_size, args.resolution, precision, args.rounds, args.warmup))
                print(json.dumps({k: sweep[-1][k] for k in ("precision", "batch_size", "images_per_s",
                                                             "fast_vs_timm_best")}), flush=True)
        sweeps.append(sweep)
    rows = [combine(list(same)) for same in zip(*sweeps)]
    report = {
        "command": "flock /tmp/poolformer-bench.lock python " + " ".join(sys.argv),
        "machine": f"{cpu_name()} ({platform.machine()}), bf16 via oneDNN: "
                   f"{torch.ops.mkldnn._is_mkldnn_bf16_supported()}",
        "threads": args.threads,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "model": args.model,
        "resolution": args.resolution,
        "rounds": args.rounds,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "rows": rows,
    }
    write_report(Path(args.out), report, markdown(report))


if __name__ == "__main__":
    main()
