"""CPU throughput of `--impl fast` against the deployment runtimes (ONNX Runtime, OpenVINO) and timm, interleaved.

Every candidate carries the same weights (randomised: nothing can be downloaded here). Each runtime runs every
form of the model it takes and the best one counts as that runtime's figure: PyTorch's own ONNX export
(GroupNorm as InstanceNormalization over a reshape, AveragePool), our portable export
(poolformer.runtimes.export_forms: reductions, a depthwise conv and a constant map), and for OpenVINO its own
PyTorch frontend (`openvino.convert_model`, what `--impl openvino` runs), which makes each GroupNorm one MVN
node and folds the affines and LayerScale into the convolutions by itself. `fast` is
`poolformer.optimize(model)` with the backend it picks by itself (the folded graph in OpenVINO where that is
installed, built from OpenVINO's operators: poolformer.fast.openvino_graph); its other backends run as
`fast (NAME)`, among them `fast (inductor)`, the folded graph compiled by torch.compile with freezing (what
`bench --impl fast --compile` runs), and `fast (openvino, ONNX export)` is the same folded algebra exported to
ONNX (poolformer.fast.folded_export.FoldedExport) and read by OpenVINO, what the openvino-folded backend ran before
it built its own graph. `timm compiled` is timm's model,
channels-last, under torch.compile with inductor's freezing (weights as constants: oneDNN packs them once, as
PyTorch advises for CPU inference); compilation happens in the first, untimed round. All use the same number of threads
(torch.set_num_threads; intra-op threads for ONNX Runtime, INFERENCE_NUM_THREADS for OpenVINO).

Precisions: fp32, and bf16 on CPUs that compute it natively (AVX512-BF16/AMX; elsewhere it is emulated and
skipped): PyTorch candidates under autocast or in bf16, OpenVINO with bf16 inference precision; ONNX Runtime
has no bf16 CPU kernels. Parity is always against the reference model in fp32.

For each batch size the candidates take turns, round after round, so that load from other processes hits them
alike: in each round a candidate runs one untimed step (the runtimes' thread pools spin after a call and
would otherwise slow whichever candidate runs next) and then `--block` timed steps. The figure per candidate
is its median step over all rounds of all repeats; the table also gives the fast / best-runtime ratio of each
repeat.

Bounds, interleaved with the candidates (so that the same load hits them) and shown as img/s: s12's MACs are
all in its convolutions, almost all in the 1x1 ones (fc1/fc2). "floor: convolutions" does exactly those
convolutions at the model's shapes as oneDNN runs them (the 1x1 ones as packed matmuls) and nothing else: no
pooling, statistics, residuals or head; "floor: convolutions + activation" has fc1's activation (exact GELU)
fused into its matmul as well. It bounds every exact implementation that convolves and activates as fast as
oneDNN does. "ceiling: square matmul" is a 2048x2048x2048 matmul, oneDNN's fastest case, its rate counted in
images' worth of the model's MACs: no implementation that multiplies no faster than that can beat it.
"target / floor" and "target / ceiling" say what share of them a 1.15x lead over the best runtime would take.

    flock /tmp/poolformer-cpu.lock python benchmarks/runtimes_cpu.py --repeats 3 --out benchmarks/results/runtimes_cpu_NAME
Writes OUT.json and OUT.md (command, machine, CPU flags, tables).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import numpy as np
import torch

from poolformer import create_model
from poolformer.capabilities import cpu_capabilities
from poolformer.fast import fold, optimize
from poolformer.fast.compiled import Frozen, unavailable_reason
from poolformer.fast.cpu import ONEDNN_ACTIVATIONS, mlp_rows_per_pass
from poolformer.fast.folded_export import FoldedExport
from poolformer.fast.folding import FoldedModel, Plan
from poolformer.fast.runtime_backends import BACKEND_NAMES
from poolformer.fast.runtime_backends import runs as runtime_runs
from poolformer.implementations import IMPLEMENTATIONS
from poolformer.model import randomize_
from poolformer.runtimes.export_forms import portable_form
from poolformer.runtimes.exporting import export_onnx, openvino_converter
from poolformer.runtimes.sessions import OnnxRuntimeRunner, OpenVinoRunner, RuntimeModule

from _common import add_model_arguments, batches_and_precisions, write_report

RESULTS = Path(__file__).parent / "results"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
RUNTIMES = {"fp32": ("onnxruntime", "openvino"), "bf16": ("openvino",)}  # ONNX Runtime: no bf16 CPU kernels
EXPORTS = {"onnxruntime": ("torch-export", "portable-export"),
           "openvino": ("torch-export", "portable-export", "convert-model")}  # convert-model: OpenVINO's own frontend


FOLDED_ONNX = "fast (openvino, ONNX export)"


def runtime_candidates(precision: str) -> tuple[str, ...]:
    return tuple(f"{runtime}/{export}" for runtime in RUNTIMES[precision] for export in EXPORTS[runtime])


def candidates(ours: torch.nn.Module, shape: tuple[int, ...], threads: int, folder: str, precision: str,
               compiler: str | None = "inductor") -> dict:
    """name -> a callable images (NCHW float32 tensor) -> logits; all carry the same weights, all compute in
    `precision`. `compiler`: torch.compile's backend for the compiled candidates (None: none of them)."""
    dtype = DTYPES[precision]
    timm_cl = IMPLEMENTATIONS["timm"].convert(ours).to(memory_format=torch.channels_last)
    autocast = (lambda: torch.autocast("cpu", dtype=dtype)) if precision != "fp32" else contextlib.nullcontext
    fast = optimize(ours, dtype=dtype)
    compiled = compiler is not None and unavailable_reason(dtype, torch.device("cpu")) is None
    if compiled:  # new instances of compiled forwards: past dynamo's recompile limit (8) they would run eagerly
        torch._dynamo.reset()
    table = {
        "ours": lambda x: _under(autocast, ours, x),
        "timm channels_last": lambda x: _under(autocast, timm_cl, x.contiguous(memory_format=torch.channels_last)),
    }
    if compiled:
        timm_compiled = Frozen(timm_cl, compiler=compiler)
        table["timm compiled"] = lambda x: _under(autocast, timm_compiled, x.contiguous(memory_format=torch.channels_last))
    table["fast (oneDNN)"] = optimize(ours, dtype=dtype, backend="onednn")
    if compiled:
        table["fast (inductor)"] = optimize(ours, dtype=dtype).compile_with(compiler=compiler)
    for runtime in ("onnxruntime", "openvino"):
        if runtime_runs(runtime, dtype, torch.device("cpu")) and fast.backend_for() != BACKEND_NAMES[runtime]:
            table[f"fast ({runtime})"] = optimize(ours, dtype=dtype, backend=BACKEND_NAMES[runtime])
    if runtime_runs("openvino", dtype, torch.device("cpu")):  # the builder's gain over exporting the same algebra
        folded_export = FoldedExport(ours)
        table[FOLDED_ONNX] = RuntimeModule("openvino", export=lambda path, size: export_onnx(folded_export, path, size),
                                           precision=precision)
    table["fast"] = fast
    paths = {"torch-export": os.path.join(folder, "torch.onnx"), "portable-export": os.path.join(folder, "portable.onnx")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(ours, (torch.zeros(shape),), paths["torch-export"], opset_version=17, dynamo=False)
    export_onnx(portable_form(ours), paths["portable-export"], shape)
    for name in runtime_candidates(precision):
        runtime, export = name.split("/")
        if export == "convert-model":  # what --impl openvino runs: the model as OpenVINO's PyTorch frontend converts it
            run = OpenVinoRunner(openvino_converter(ours)(shape), threads, precision)
        elif runtime == "onnxruntime":
            run = OnnxRuntimeRunner(paths[export], threads)
        else:
            run = OpenVinoRunner(paths[export], threads, precision)
        table[name] = (lambda r: lambda x: r(x.numpy()))(run)
    return table, fast.backend_for()


def _under(autocast, module, x):
    with autocast():
        return module(x)


FLOOR = "floor: convolutions"
FLOOR_ACTIVATION = "floor: convolutions + activation"
CEILING = "ceiling: square matmul"
BOUNDS = (FLOOR, FLOOR_ACTIVATION, CEILING)


class ConvolutionsOnly:
    """The model's convolutions at one batch size and resolution, and nothing else: no pooling, statistics,
    residuals, head or layout changes. The stem and downsampling convolutions on channels-last inputs, and every
    block's fc1 and fc2 as oneDNN's packed matmuls, over the row chunks the fast path uses
    (`mlp_rows_per_pass`: a big output is a fresh mmap whose pages fault in on every call); with `activation`,
    fc1 has the model's activation fused into it (exact erf GELU for v1: the cheapest place to apply it, in
    registers after the matmul). Inputs are made once, one per distinct shape (so they stay in cache: the bound
    is generous); a call ignores its argument. Its speed bounds every exact implementation whose convolutions
    run as fast as oneDNN's."""

    def __init__(self, folded: FoldedModel, plan: Plan, batch: int, resolution: int, dtype: torch.dtype,
                 activation: bool):
        fc1_post = ONEDNN_ACTIVATIONS[plan.activation] if activation else "none"
        element_size = torch.empty((), dtype=dtype).element_size()
        self.calls, self.macs_per_image, side = [], 0, resolution

        def conv(weight: torch.Tensor, bias: torch.Tensor | None, stride: int, padding: int) -> None:
            nonlocal side
            x = torch.randn(batch, weight.shape[1], side, side, dtype=dtype)
            x = x.contiguous(memory_format=torch.channels_last)
            weight = weight.to(dtype).contiguous(memory_format=torch.channels_last)
            bias = None if bias is None else bias.to(dtype)
            self.calls.append(partial(torch.nn.functional.conv2d, x, weight, bias, stride=stride, padding=padding))
            side = (side + 2 * padding - weight.shape[-1]) // stride + 1
            self.macs_per_image += side * side * weight.numel()

        conv(folded.stem_weight, folded.stem_bias, 4, 2)
        for stage in folded.stages:
            if stage.down_weight is not None:
                conv(stage.down_weight, stage.down_bias, 2, 1)
            block, rows = stage.blocks[0], batch * side * side
            chunk = mlp_rows_per_pass(rows, block.fc1_weight.shape[0] * element_size)
            for weight, post in ((block.fc1_weight, fc1_post), (block.fc2_weight, "none")):
                packed = torch.ops.mkldnn._reorder_linear_weight(weight.to(dtype))
                algorithm = "none" if post == "gelu" else ""  # "none": erf (exact) GELU, not the tanh approximation
                parts = torch.randn(rows, weight.shape[1], dtype=dtype).split(chunk)
                self.calls += [partial(torch.ops.mkldnn._linear_pointwise, part, packed, None, post, [], algorithm)
                               for part in parts] * len(stage.blocks)
                self.macs_per_image += len(stage.blocks) * side * side * weight.numel()

    def __call__(self, x: torch.Tensor | None = None) -> None:
        for call in self.calls:
            call()


class SquareMatmul:
    """One side x side matmul with a packed weight, oneDNN's fastest case: its rate stands in for the CPU's peak
    multiply-add rate in this dtype (`bounds` counts a call as macs / the model's MACs per image images)."""

    def __init__(self, side: int, dtype: torch.dtype):
        self.x = torch.randn(side, side, dtype=dtype)
        self.weight = torch.ops.mkldnn._reorder_linear_weight(torch.randn(side, side, dtype=dtype))
        self.macs = side ** 3

    def __call__(self, x: torch.Tensor | None = None) -> None:
        torch.ops.mkldnn._linear_pointwise(self.x, self.weight, None, "none", [], "")


def bounds(ours: torch.nn.Module, shape: tuple[int, ...], precision: str, square: int = 2048) -> tuple[dict, dict]:
    """The floor and ceiling candidates (name -> callable) and the images each call counts for."""
    batch, resolution, dtype = shape[0], shape[-1], DTYPES[precision]
    folded, plan = fold(ours)
    floor = ConvolutionsOnly(folded, plan, batch, resolution, dtype, activation=False)
    ceiling = SquareMatmul(square, dtype)
    table = {FLOOR: floor, FLOOR_ACTIVATION: ConvolutionsOnly(folded, plan, batch, resolution, dtype, activation=True),
             CEILING: ceiling}
    return table, {FLOOR: batch, FLOOR_ACTIVATION: batch, CEILING: ceiling.macs / floor.macs_per_image}


def measure(ours: torch.nn.Module, batch: int, resolution: int, threads: int, rounds: int, warmup: int,
            block: int, precision: str, compiler: str | None = "inductor") -> dict:
    shape = (batch, 3, resolution, resolution)
    with tempfile.TemporaryDirectory() as folder:
        table, fast_backend = candidates(ours, shape, threads, folder, precision, compiler)
        bound_table, images = bounds(ours, shape, precision)
        table.update(bound_table)
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
                    if name not in BOUNDS:
                        out = out if isinstance(out, torch.Tensor) else torch.from_numpy(np.asarray(out))
                        outputs[name] = out.float()
            reference = ours(x).float()
    diffs = {name: (None if name.startswith("timm") else float((out - reference).abs().max())) for name, out in outputs.items()}
    agree = {name: float((out.argmax(1) == reference.argmax(1)).float().mean()) for name, out in outputs.items()}
    return {"batch_size": batch, "steps_s": steps, "images_per_call": {name: images.get(name, batch) for name in steps},
            "macs_per_image": bound_table[FLOOR].macs_per_image, "fast_backend": fast_backend,
            "max_abs_diff_vs_ours": diffs, "top1_agreement_vs_ours": agree}


def summarise(runs: list[dict], precision: str) -> dict:
    """Pool the repeats: median img/s per candidate (the ceiling: images' worth of the model's MACs per second),
    and the fast / best-runtime ratio per repeat."""
    batch, images = runs[0]["batch_size"], runs[0]["images_per_call"]
    names = list(runs[0]["steps_s"])
    pooled = {name: [s for run in runs for s in run["steps_s"][name]] for name in names}
    img_s = {name: images[name] / statistics.median(times) for name, times in pooled.items()}

    def best_runtime(per_name: dict) -> tuple[str, float]:
        name = max(runtime_candidates(precision), key=lambda n: per_name[n])
        return name, per_name[name]

    best_name, best = best_runtime(img_s)
    per_repeat = []
    for run in runs:
        repeat = {name: images[name] / statistics.median(times) for name, times in run["steps_s"].items()}
        per_repeat.append(repeat["fast"] / best_runtime(repeat)[1])
    best_fast = max((n for n in names if n.startswith("fast")), key=lambda n: img_s[n])
    timm_best = max((n for n in names if n.startswith("timm")), key=lambda n: img_s[n])
    return {"precision": precision, "batch_size": batch, "img_s": img_s, "fast_backend": runs[-1]["fast_backend"],
            "best_runtime": best_name, "fast_over_best_runtime": img_s["fast"] / best, "per_repeat": per_repeat,
            "best_fast": best_fast, "best_fast_over_best_runtime": img_s[best_fast] / best,
            "best_timm": timm_best, "fast_over_best_timm": img_s["fast"] / img_s[timm_best],
            "target_img_s": 1.15 * best, "macs_per_image": runs[0]["macs_per_image"],
            "ceiling_gmac_s": img_s[CEILING] * runs[0]["macs_per_image"] / 1e9,
            "target_over_floor": 1.15 * best / img_s[FLOOR_ACTIVATION],
            "target_over_ceiling": 1.15 * best / img_s[CEILING],
            "fast_over_folded_onnx": img_s["fast"] / img_s[FOLDED_ONNX] if FOLDED_ONNX in img_s else None,
            "max_abs_diff_vs_ours": runs[-1]["max_abs_diff_vs_ours"],
            "top1_agreement_vs_ours": runs[-1]["top1_agreement_vs_ours"]}


def markdown(results: dict) -> str:
    env = results["env"]
    lines = ["# `--impl fast` against ONNX Runtime and OpenVINO on the CPU (interleaved, median step)", "",
             f"Command: `{env['command']}`  ",
             f"Machine: {env['cpu']['summary']}; instruction sets: {', '.join(env['cpu']['isa'])}; "
             f"{env['threads']} threads; torch {env['torch']}, onnxruntime {env['onnxruntime']}, openvino "
             f"{env['openvino']}, timm {env['timm']}  ",
             f"Model: {results['model']} at {results['resolution']}x{results['resolution']}, randomised weights; "
             f"{results['repeats']} repeats of rounds of {results['block']} timed steps per candidate (1 untimed first); "
             f"{env['date']}"]
    if results.get("skipped"):
        lines.append(f"  \nNot measured: {results['skipped']}")
    for precision in dict.fromkeys(row["precision"] for row in results["batches"]):
        rows = [row for row in results["batches"] if row["precision"] == precision]
        names = list(rows[0]["img_s"])
        lines += ["", f"## {precision}", "",
                  "| batch | " + " | ".join(names) + " | fast / best runtime | (per repeat) | fastest fast backend "
                  "/ best runtime | fast / best timm | 1.15x target | target / floor | target / ceiling |",
                  "|---|" + "---|" * (len(names) + 7)]
        for row in rows:
            cells = [f"{row['img_s'][n]:.1f}" for n in names]
            lines.append(f"| {row['batch_size']} | " + " | ".join(cells) +
                         f" | {row['fast_over_best_runtime']:.2f}x (vs {row['best_runtime']}) | "
                         + ", ".join(f"{r:.2f}" for r in row["per_repeat"])
                         + f" | {row['best_fast_over_best_runtime']:.2f}x ({row['best_fast']}) | "
                         f"{row['fast_over_best_timm']:.2f}x (vs {row['best_timm']}) | {row['target_img_s']:.1f} | "
                         f"{row['target_over_floor']:.0%} | {row['target_over_ceiling']:.0%} |")
        gains = [(row["batch_size"], row.get("fast_over_folded_onnx")) for row in rows]
        if all(gain is not None for _, gain in gains):
            lines += ["", "`fast` over `" + FOLDED_ONNX + "` (the graph built from OpenVINO's operators against the same "
                      "algebra exported to ONNX): " + ", ".join(f"{gain:.2f}x at batch {b}" for b, gain in gains) + "."]
        rates = ", ".join(f"{row['ceiling_gmac_s']:.0f} GMAC/s in the batch {row['batch_size']} run" for row in rows)
        lines += ["", f"Bounds, as img/s: the floors are the model's convolutions alone (with fc1's activation "
                  f"fused in, or without; \"target / floor\" divides by the first); the ceiling is a square "
                  f"matmul's rate ({rates}) in images' worth of the model's "
                  f"{rows[0]['macs_per_image'] / 1e9:.2f} GMACs of convolution."]
        exact = [n for n in names if not n.startswith("timm") and n not in BOUNDS]
        lines += ["", f"img/s; `fast` ran on its `{rows[0]['fast_backend']}` backend. Max |logit difference| "
                  "against our fp32 reference model, and top-1 agreement with it over the batch (timm's v1 head "
                  "differs by design):", "", "| batch | " + " | ".join(exact) + " |", "|---|" + "---|" * len(exact)]
        for row in rows:
            diffs, agree = row["max_abs_diff_vs_ours"], row["top1_agreement_vs_ours"]
            cells = [f"{diffs[n]:.1e} ({agree[n]:.0%})" for n in exact]
            lines.append(f"| {row['batch_size']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--block", type=int, default=3, help="timed steps per candidate per round")
    parser.add_argument("--compiler", default="inductor",
                        help="torch.compile backend of the compiled candidates (timm compiled, fast (inductor)): "
                             "inductor; aot_eager only traces (quick checks); none leaves them out")
    parser.add_argument("--out", default=str(RESULTS / "runtimes_cpu"), help="path without suffix")
    args = parser.parse_args(argv)
    if args.compiler not in ("inductor", "aot_eager", "eager", "none"):
        parser.error(f"unknown --compiler {args.compiler!r}; choose from inductor, aot_eager, eager, none")
    compiler = None if args.compiler == "none" else args.compiler
    torch.set_num_threads(args.threads)
    import onnxruntime
    import openvino
    import timm

    cpu = cpu_capabilities()
    batches, precisions, skipped = batches_and_precisions(parser, args, cpu)
    ours = randomize_(create_model(args.model), std=0.02).eval()
    results = {
        "model": ours.spec.name, "resolution": args.resolution, "rounds": args.rounds, "block": args.block,
        "repeats": args.repeats, "skipped": skipped, "compiler": compiler,
        "env": {"command": "python " + " ".join(["benchmarks/runtimes_cpu.py", *(sys.argv[1:] if argv is None else argv)]),
                "cpu": cpu.to_dict(), "threads": args.threads, "torch": torch.__version__,
                "onnxruntime": onnxruntime.__version__, "openvino": openvino.__version__, "timm": timm.__version__,
                "platform": platform.platform(), "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")},
        "batches": [],
    }
    for precision in precisions:
        for batch in batches:
            rounds = args.rounds if batch == 1 else max(2, args.rounds // 4)
            runs = [measure(ours, batch, args.resolution, args.threads, rounds, args.warmup, args.block, precision,
                            compiler) for _ in range(args.repeats)]
            results["batches"].append(summarise(runs, precision))
            row = results["batches"][-1]
            print(f"{precision} batch {batch}: " + ", ".join(f"{n} {v:.1f}" for n, v in row["img_s"].items())
                  + f"; fast / best runtime {row['fast_over_best_runtime']:.2f}x; 1.15x target "
                  f"{row['target_img_s']:.1f} = {row['target_over_floor']:.0%} of the floor, "
                  f"{row['target_over_ceiling']:.0%} of the ceiling", flush=True)
    write_report(Path(args.out), results, markdown(results))


if __name__ == "__main__":
    main()
