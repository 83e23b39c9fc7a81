"""CPU throughput of `--impl fast` against the deployment runtimes (ONNX Runtime, OpenVINO) and timm, interleaved.

Every candidate carries the same weights (randomised: nothing can be downloaded here). Each runtime runs two
exports of the model and the better one counts as that runtime's figure: PyTorch's own ONNX export
(GroupNorm as InstanceNormalization over a reshape, AveragePool) and our portable export
(poolformer.runtimes.export_forms: reductions, a depthwise conv and a constant map). All use the same number of
threads (torch.set_num_threads; intra-op threads for ONNX Runtime, INFERENCE_NUM_THREADS for OpenVINO) and fp32.
For each batch size the candidates take turns, round after round, so that load from other processes hits them
alike: in each round a candidate runs one untimed step (the runtimes' thread pools spin after a call and
would otherwise slow whichever candidate runs next) and then `--block` timed steps. The figure per candidate
is its median step over all rounds of all repeats; the table also gives the fast / best-runtime ratio of each
repeat.

    flock /tmp/poolformer-cpu.lock python benchmarks/runtimes_cpu.py
Writes benchmarks/results/runtimes_cpu.json and runtimes_cpu.md (command, machine, CPU flags, table).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from poolformer import create_model
from poolformer.capabilities import cpu_capabilities
from poolformer.fast import optimize
from poolformer.implementations import IMPLEMENTATIONS
from poolformer.runtimes.export_forms import portable_form
from poolformer.runtimes.exporting import export_onnx
from poolformer.runtimes.runners import OnnxRuntimeRunner, OpenVinoRunner

RESULTS = Path(__file__).parent / "results"
RUNTIME_CANDIDATES = ("onnxruntime/torch-export", "onnxruntime/portable-export", "openvino/torch-export",
                      "openvino/portable-export")


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights around the init scale, so norms' affines and LayerScale all matter (as tests do)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02 + (1.0 if p.ndim == 1 else 0.0))
    return model


def candidates(model_name: str, shape: tuple[int, ...], threads: int, folder: str) -> dict:
    """name -> a callable images(tensor, NCHW) -> logits (numpy or tensor); all carry the same weights."""
    ours = randomize_(create_model(model_name))
    timm_cl = IMPLEMENTATIONS["timm"](ours).to(memory_format=torch.channels_last)
    fast = optimize(ours)
    fast_onednn = optimize(ours, backend="onednn")
    torch_export, portable_export = os.path.join(folder, "torch.onnx"), os.path.join(folder, "portable.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(ours, (torch.zeros(shape),), torch_export, opset_version=17, dynamo=False)
    export_onnx(portable_form(ours), portable_export, shape)
    runners = {
        "onnxruntime/torch-export": OnnxRuntimeRunner(torch_export, threads),
        "onnxruntime/portable-export": OnnxRuntimeRunner(portable_export, threads),
        "openvino/torch-export": OpenVinoRunner(torch_export, threads),
        "openvino/portable-export": OpenVinoRunner(portable_export, threads),
    }
    table = {
        "ours": lambda x: ours(x),
        "timm channels_last": lambda x: timm_cl(x.contiguous(memory_format=torch.channels_last)),
        "fast (oneDNN)": lambda x: fast_onednn(x),
        "fast": lambda x: fast(x),
    }
    for name, run in runners.items():
        table[name] = (lambda r: lambda x: r(x.numpy()))(run)
    return table, ours


def measure(model_name: str, batch: int, resolution: int, threads: int, rounds: int, warmup: int,
            block: int) -> dict:
    shape = (batch, 3, resolution, resolution)
    with tempfile.TemporaryDirectory() as folder:
        table, ours = candidates(model_name, shape, threads, folder)
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
        steps = {name: [] for name in table}
        outputs = {}
        with torch.inference_mode():
            for round_index in range(warmup + rounds):
                for name, run in table.items():
                    out = run(x)  # untimed: lets the previous candidate's threads go quiet
                    for _ in range(block):
                        start = time.perf_counter()
                        out = run(x)
                        elapsed = time.perf_counter() - start
                        if round_index >= warmup:
                            steps[name].append(elapsed)
                    outputs[name] = torch.as_tensor(np.asarray(out)).float()
            reference = ours(x).float()
    diffs = {name: (None if name.startswith("timm") else float((out - reference).abs().max())) for name, out in outputs.items()}
    agree = {name: float((out.argmax(1) == reference.argmax(1)).float().mean()) for name, out in outputs.items()}
    return {"batch_size": batch, "steps_s": steps, "max_abs_diff_vs_ours": diffs, "top1_agreement_vs_ours": agree}


def summarise(runs: list[dict]) -> dict:
    """Pool the repeats: median img/s per candidate, and the fast / best-runtime ratio per repeat."""
    batch = runs[0]["batch_size"]
    names = list(runs[0]["steps_s"])
    pooled = {name: [s for run in runs for s in run["steps_s"][name]] for name in names}
    img_s = {name: batch / statistics.median(times) for name, times in pooled.items()}

    def best_runtime(per_name: dict) -> tuple[str, float]:
        name = max(RUNTIME_CANDIDATES, key=lambda n: per_name[n])
        return name, per_name[name]

    best_name, best = best_runtime(img_s)
    per_repeat = []
    for run in runs:
        repeat = {name: batch / statistics.median(times) for name, times in run["steps_s"].items()}
        per_repeat.append(repeat["fast"] / best_runtime(repeat)[1])
    return {"batch_size": batch, "img_s": img_s, "best_runtime": best_name, "fast_over_best_runtime": img_s["fast"] / best,
            "per_repeat": per_repeat, "max_abs_diff_vs_ours": runs[-1]["max_abs_diff_vs_ours"],
            "top1_agreement_vs_ours": runs[-1]["top1_agreement_vs_ours"]}


def markdown(results: dict) -> str:
    env = results["env"]
    lines = ["# `--impl fast` against ONNX Runtime and OpenVINO on the CPU (interleaved, median step)", "",
             f"Command: `{env['command']}`  ",
             f"Machine: {env['cpu']['summary']}; instruction sets: {', '.join(env['cpu']['isa'])}; "
             f"{env['threads']} threads; torch {env['torch']}, onnxruntime {env['onnxruntime']}, openvino "
             f"{env['openvino']}, timm {env['timm']}  ",
             f"Model: {results['model']} at {results['resolution']}x{results['resolution']}, fp32, randomised weights; "
             f"{results['repeats']} repeats of rounds of {results['block']} timed steps per candidate (1 untimed first); "
             f"{env['date']}", ""]
    names = list(results["batches"][0]["img_s"])
    lines.append("| batch | " + " | ".join(names) + " | fast / best runtime | (per repeat) |")
    lines.append("|---|" + "---|" * (len(names) + 2))
    for row in results["batches"]:
        cells = [f"{row['img_s'][n]:.1f}" for n in names]
        lines.append(f"| {row['batch_size']} | " + " | ".join(cells) +
                     f" | {row['fast_over_best_runtime']:.2f}x (vs {row['best_runtime']}) | "
                     + ", ".join(f"{r:.2f}" for r in row["per_repeat"]) + " |")
    lines += ["", "img/s. Max |logit difference| against our reference model (timm's v1 head differs by design):", "",
              "| batch | " + " | ".join(n for n in names if not n.startswith("timm")) + " |",
              "|---|" + "---|" * len([n for n in names if not n.startswith("timm")])]
    for row in results["batches"]:
        diffs = row["max_abs_diff_vs_ours"]
        lines.append(f"| {row['batch_size']} | " + " | ".join(f"{diffs[n]:.1e}" for n in names if not n.startswith("timm")) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="s12")
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--batch-sizes", default="1,16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--block", type=int, default=3, help="timed steps per candidate per round")
    parser.add_argument("--out", default=str(RESULTS / "runtimes_cpu"), help="path without suffix")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import onnxruntime
    import openvino
    import timm

    results = {
        "model": create_model(args.model).spec.name, "resolution": args.resolution, "rounds": args.rounds,
        "block": args.block,
        "repeats": args.repeats,
        "env": {"command": "python " + " ".join(["benchmarks/runtimes_cpu.py", *sys.argv[1:]]),
                "cpu": cpu_capabilities().to_dict(), "threads": args.threads, "torch": torch.__version__,
                "onnxruntime": onnxruntime.__version__, "openvino": openvino.__version__, "timm": timm.__version__,
                "platform": platform.platform(), "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")},
        "batches": [],
    }
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        rounds = args.rounds if batch == 1 else max(2, args.rounds // 4)
        runs = [measure(args.model, batch, args.resolution, args.threads, rounds, args.warmup, args.block)
                for _ in range(args.repeats)]
        results["batches"].append(summarise(runs))
        row = results["batches"][-1]
        print(f"batch {batch}: " + ", ".join(f"{n} {v:.1f}" for n, v in row["img_s"].items())
              + f"; fast / best runtime {row['fast_over_best_runtime']:.2f}x", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(results))
    print(f"wrote {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
