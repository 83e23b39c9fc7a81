"""`--impl fast` on a GPU against timm, side by side in one run: the speed and exactness targets, measured.

Per model (poolformer_s12, poolformerv2_s12, poolformer_m36; 224 px; random weights, the same in every row):
- throughput at batch 256, bf16: timm eager under autocast in both memory formats (the faster one counts),
  timm at its fastest (bf16 weights, no autocast, torch.compile mode max-autotune), ours eager, and fast
  (the Triton kernels, CUDA graphs);
- batch-1 latency, bf16: timm eager, timm max-autotune and fast;
- exactness: fast fp32 logits against our fp32 model (relative max |diff|, the target is 1e-4) and the top-1
  agreement of fast bf16 and of timm under bf16 autocast with fp32, over `--agreement-images` images;
- roofline: bytes the fast kernels move per image (poolformer.fast.roofline) and the bandwidth the measured
  speed implies, against the GPU's peak (NVML: memory clock x bus width);
- kernels: fast bf16 at batch 256 kernel by kernel (poolformer.fast.roofline.time_kernels: CUDA events after
  each launch, graphs off), each stage's bytes, TB/s and TFLOP/s, and beside each stage's fused MLP the same
  MLP unfused on cuBLAS (x @ W1, GELU, addmm with the residual) and its two GEMMs alone: what our MLP
  is up against. The tile each kernel shape ran with is kept (one TileChooser shared by every fast model of
  the run), and with autotuning on every candidate tile's time too (`autotune_timings`).
Every row goes through `poolformer.bench` (CUDA events, warm-up apart, parity against the fp32 reference), so
`poolformer bench` reproduces any of them, e.g.
    poolformer bench s12 --device cuda --impl timm --precision bf16 --batch-sizes 256 --cast-model --compile \\
        --compile-mode max-autotune

    PYTHONPATH=. python benchmarks/fast_gpu.py --out DIR [--models s12,v2_s12] [--sections throughput,...]
Writes DIR/fast_gpu.json and DIR/fast_gpu.md. `--smoke` runs the same code on the CPU at tiny sizes (the
kernels in Triton's interpreter, compile with the eager backend) in seconds: the test suite runs it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable, Iterator

if "--smoke" in sys.argv:  # Triton must see the interpreter switch before anything imports it
    os.environ.setdefault("POOLFORMER_TRITON_INTERPRET", "1")
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

from poolformer import bench, create_model, optimize  # noqa: E402
from poolformer.envinfo import environment  # noqa: E402
from poolformer.fast.triton.chooser import TileChooser  # noqa: E402
from poolformer.implementations import IMPLEMENTATIONS  # noqa: E402
from poolformer.model import randomize_  # noqa: E402

from _common import model_list, write_text  # noqa: E402

MODELS = ("poolformer_s12", "poolformerv2_s12", "poolformer_m36")
SECTIONS = ("throughput", "latency", "exactness", "kernels")
MLP_KERNELS = ("mlp", "mlp norm", "fc1", "act", "fc2", "fc1 norm act", "fc2 residual", "mlp stats")  # any form
TARGETS = {"vs_timm_eager": 2.5, "vs_timm_fastest": 1.3, "latency_vs_timm_eager": 1 / 3, "bandwidth_share": 0.5,
           "fp32_relative_diff": 1e-4}


def randomised_build(seed: int = 0, tiles: TileChooser | None = None):
    """bench's build_model: the zoo model with random weights around the init scale (LayerScale's 1e-5 init
    would make every block nearly the identity and parity trivially good), in the requested implementation;
    fast models take their Triton tiles from `tiles` (a TileChooser; None: each its own)."""
    def build(name: str, impl: str, **kwargs):
        model = randomize_(create_model(name, **kwargs), seed, std=0.02)
        if impl == "fast":
            return optimize(model, tiles=tiles)
        return IMPLEMENTATIONS[impl].convert(model)

    return build


def candidates(model: str, device: str, batch: int, resolution: int, precision: str) -> list[tuple[str, bench.BenchConfig, str | None]]:
    """(name, configuration, compile mode) of every contender for one model and batch size."""
    base = bench.BenchConfig(model, "timm", device, batch, resolution, precision)
    return [  # the long max-autotune compile last: a run cut short by a time limit keeps the others
        ("fast", replace(base, impl="fast"), None),
        ("timm eager", replace(base, channels_last=True), None),
        ("timm eager NCHW", base, None),
        ("ours eager", replace(base, impl="ours", channels_last=True), None),
        ("timm max-autotune", replace(base, channels_last=True, cast=True, compile=True), "max-autotune"),
    ]


def measure(named: list, settings: bench.BenchSettings, build, rows: dict | None = None,
            progress: Callable[[], None] = lambda: None) -> dict[str, dict]:
    """name -> the bench row of each contender (each compiled one with its own compile mode), filled into `rows`
    row by row; `progress` runs after each (the script saves, so a run cut short keeps what it measured)."""
    rows = {} if rows is None else rows
    for name, config, mode in named:
        started = time.perf_counter()
        result = next(bench.run_benchmark([config], replace(settings, compile_mode=mode), build))
        row = result.to_row()
        row["wall_s"] = time.perf_counter() - started
        rows[name] = row
        progress()
        print(f"  {name:20s} {row['status']:8s} "
              + (f"{row['throughput']:10.1f} img/s" if row["throughput"] else str(row["error"])), file=sys.stderr)
    return rows


def _ok(row: dict | None) -> float | None:
    return row["throughput"] if row and row["status"] == "ok" else None


def throughput_summary(rows: dict[str, dict], bandwidth_tb_s: float | None) -> dict:
    """The ratios the targets are about, from one model's rows."""
    eager = max(filter(None, (_ok(rows.get("timm eager")), _ok(rows.get("timm eager NCHW")))), default=None)
    fastest = max(filter(None, (eager, _ok(rows.get("timm max-autotune")))), default=None)
    fast = rows.get("fast") or {}
    summary = {"timm_eager": eager, "timm_fastest": fastest, "fast": _ok(fast),
               "vs_timm_eager": _ok(fast) / eager if _ok(fast) and eager else None,
               "vs_timm_fastest": _ok(fast) / fastest if _ok(fast) and fastest else None,
               "fast_backend": fast.get("backend"), "bytes_per_image": fast.get("bytes_per_image"),
               "achieved_tb_per_s": fast.get("achieved_tb_per_s")}
    summary["bandwidth_share"] = (summary["achieved_tb_per_s"] / bandwidth_tb_s
                                  if summary["achieved_tb_per_s"] and bandwidth_tb_s else None)
    return summary


@contextlib.contextmanager
def exact_float32() -> Iterator[None]:
    """float32 means float32: no TF32 in convolutions (cuDNN allows it by default) or matmuls, restored after."""
    saved = torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = saved[0]
        torch.set_float32_matmul_precision(saved[1])


def agreement(model: str, device: str, images: int, resolution: int, build, batch: int = 64) -> dict:
    """Top-1 agreement with fp32 of fast bf16 and of timm under bf16 autocast; fast fp32's relative max |diff|
    against our fp32 model - over `images` random images, the float32 references without TF32."""
    torch.manual_seed(bench.BUILD_SEED)
    ours = build(model, "ours").eval().to(device)
    torch.manual_seed(bench.BUILD_SEED)
    timm_model = build(model, "timm").eval().to(device)
    torch.manual_seed(bench.BUILD_SEED)
    fast = build(model, "fast")
    generator = torch.Generator().manual_seed(1)
    counts = {"fast_bf16": 0, "timm_bf16": 0}
    worst = 0.0
    with torch.inference_mode(), exact_float32():
        for start in range(0, images, batch):
            x = torch.randn(min(batch, images - start), 3, resolution, resolution, generator=generator).to(device)
            reference, timm_reference = ours(x).float(), timm_model(x).float()
            worst = max(worst, ((fast(x) - reference).abs().max() / reference.abs().max().clamp(min=1)).item())
            with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
                counts["fast_bf16"] += (fast(x).argmax(1) == reference.argmax(1)).sum().item()
                counts["timm_bf16"] += (timm_model(x).argmax(1) == timm_reference.argmax(1)).sum().item()
    return {"images": images, "fast_fp32_relative_diff": worst,
            "fast_bf16_top1_agreement": counts["fast_bf16"] / images,
            "timm_bf16_top1_agreement": counts["timm_bf16"] / images}


def _median_ms(fn: Callable[[], object], device: str, repeats: int = 20) -> float:
    """Median time of fn() in milliseconds, after two untimed calls (autotune.median_ms: the autotuner's own
    timing)."""
    from poolformer.fast.triton.autotune import median_ms

    for _ in range(2):
        fn()
    return median_ms(fn, torch.device(device), repeats)


def unfused_mlp_ms(rows: int, channels: int, hidden: int, device: str, dtype: torch.dtype) -> dict:
    """One MLP of that shape on cuBLAS (or the CPU's BLAS): the two GEMMs alone, and the whole unfused MLP
    (x @ W1, GELU, then addmm adding the residual), median ms."""
    generator = torch.Generator().manual_seed(2)
    x, w1, w2 = (torch.randn(shape, generator=generator).mul(0.05).to(device, dtype)
                 for shape in ((rows, channels), (channels, hidden), (hidden, channels)))
    h = torch.nn.functional.gelu(x @ w1)
    with torch.inference_mode():
        gemm1 = _median_ms(lambda: x @ w1, device)
        gemm2 = _median_ms(lambda: h @ w2, device)
        unfused = _median_ms(lambda: torch.addmm(x, torch.nn.functional.gelu(x @ w1), w2), device)
    return {"gemm1_ms": gemm1, "gemm2_ms": gemm2, "gemms_ms": gemm1 + gemm2, "unfused_ms": unfused}


def kernel_breakdown(model: str, device: str, batch: int, resolution: int, build, repeats: int = 10) -> dict:
    """fast bf16 kernel by kernel (see the module docstring), and each stage's MLP unfused for comparison."""
    from poolformer.fast.roofline import kernel_table, time_kernels

    torch.manual_seed(bench.BUILD_SEED)
    fast = build(model, "fast").eval().to(device)
    x = torch.randn(batch, 3, resolution, resolution, generator=torch.Generator().manual_seed(1)).to(device)
    with torch.autocast(device, dtype=torch.bfloat16):
        times = time_kernels(fast, x, repeats=repeats)
    table = kernel_table(times)
    reference = []
    for stage_index, stage in enumerate(fast.folded.stages, start=1):
        launches = [k for k in times.launches if k.stage == stage_index and k.name in MLP_KERNELS]
        if not stage.blocks or not launches:
            continue
        hidden, channels = stage.blocks[0].fc1_weight.shape
        flops = sum(k.flops for k in launches) // len(stage.blocks)  # one block's MLP: 4 * rows * C * D
        rows = flops // (4 * channels * hidden)
        cublas = unfused_mlp_ms(rows, channels, hidden, device, torch.bfloat16)
        reference.append({"stage": stage_index, "rows": rows, "channels": channels, "hidden": hidden,
                          "form": mlp_form(launches),
                          "ours_ms": sum(k.ms for k in launches) / len(stage.blocks), **cublas,
                          "gemms_tflop_per_s": flops / (cublas["gemms_ms"] * 1e-3) / 1e12})
    return {"batch_size": batch, "repeats": times.repeats, "host_ahead": times.host_ahead,
            "total_ms": times.total_ms, "table": table,
            "launches": [{**asdict(k), "tb_per_s": k.tb_per_s, "tflop_per_s": k.tflop_per_s} for k in times.launches],
            "mlp_unfused": reference}


def mlp_form(launches) -> str:
    """Which form of the MLP (fused kernel, SplitMlp, GemmMlp) these launches are."""
    names = {k.name for k in launches}
    return "split" if "fc1" in names else "gemm" if "fc1 norm act" in names else "fused"


def markdown(document: dict) -> str:
    env, gpu = document["env"], document["env"].get("gpu") or {}
    lines = [f"# `--impl fast` on {env.get('device_name')}", "",
             f"Command: `{document['command']}`  ",
             f"GPU {env.get('device_name')}, driver {gpu.get('driver')}, CUDA {env.get('cuda')}, torch {env.get('torch')}, "
             f"timm {env.get('timm')}, peak memory bandwidth {gpu.get('memory_bandwidth_tb_s')} TB/s; "
             f"{document['settings']}.", ""]
    if document["throughput"]:
        lines += ["## Throughput, bf16, batch %d, %d px (img/s)" % (document["batch_size"], document["resolution"]), "",
                  "| model | timm eager | timm max-autotune (bf16 weights) | ours eager | fast | fast / timm eager "
                  f"(target {TARGETS['vs_timm_eager']}x) | fast / timm fastest (target {TARGETS['vs_timm_fastest']}x) "
                  "| MB moved / image | TB/s | share of peak |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for model, entry in document["throughput"].items():
            rows, s = entry["rows"], entry["summary"]

            def cell(name):
                row = rows.get(name)
                return f"{row['throughput']:,.0f}" if row and row["status"] == "ok" else (row or {}).get("status", "-")

            def ratio(value, digits=2):
                return "-" if value is None else f"{value:.{digits}f}"

            lines.append(f"| {model} | {cell('timm eager')} / {cell('timm eager NCHW')} (CL / NCHW) | "
                         f"{cell('timm max-autotune')} | {cell('ours eager')} | {cell('fast')} | "
                         f"{ratio(s['vs_timm_eager'])} | {ratio(s['vs_timm_fastest'])} | "
                         f"{ratio(s['bytes_per_image'] and s['bytes_per_image'] / 1e6, 1)} | "
                         f"{ratio(s['achieved_tb_per_s'])} | "
                         f"{'-' if s['bandwidth_share'] is None else format(s['bandwidth_share'], '.0%')} |")
        lines.append("")
    if document["latency"]:
        lines += ["## Batch-1 latency, bf16 (median ms)", "",
                  "| model | timm eager | timm max-autotune | fast | fast / timm eager (target <= 0.33) |",
                  "|---|---|---|---|---|"]
        for model, rows in document["latency"].items():
            def ms(name):
                row = rows.get(name)
                return row["latency_ms"]["median"] if row and row["status"] == "ok" else None

            share = ms("fast") / ms("timm eager") if ms("fast") and ms("timm eager") else None
            cells = [f"{ms(n):.3f}" if ms(n) else "-" for n in ("timm eager", "timm max-autotune", "fast")]
            lines.append(f"| {model} | " + " | ".join(cells) + f" | {'-' if share is None else f'{share:.2f}'} |")
        lines.append("")
    if document["exactness"]:
        lines += ["## Exactness", "", "| model | images | fast fp32 rel. max diff (target 1e-4) | "
                  "fast bf16 top-1 agreement | timm bf16 autocast top-1 agreement |", "|---|---|---|---|---|"]
        for model, e in document["exactness"].items():
            lines.append(f"| {model} | {e['images']} | {e['fast_fp32_relative_diff']:.1e} | "
                         f"{e['fast_bf16_top1_agreement']:.1%} | {e['timm_bf16_top1_agreement']:.1%} |")
        lines.append("")
    if document.get("kernels"):
        for model, k in document["kernels"].items():
            lines += [f"## Kernel by kernel: {model}, fast bf16, batch {k['batch_size']}", "",
                      f"Sum of the launches' medians over {k['repeats']} forwards: {k['total_ms']:.2f} ms"
                      + ("" if k["host_ahead"] else " (the host fell behind the GPU in some forwards: upper bounds)")
                      + ".", "",
                      "| stage | kernel | launches | ms | share | MB | TB/s | TFLOP/s |", "|---|---|---|---|---|---|---|---|"]
            for r in k["table"]:
                lines.append(f"| {r['stage']} | {r['kernel']} | {r['launches']} | {r['ms']:.3f} | {r['share']:.0%} | "
                             f"{r['bytes'] / 1e6:.1f} | {'-' if r['tb_per_s'] is None else format(r['tb_per_s'], '.2f')} | "
                             f"{'-' if r['tflop_per_s'] is None else format(r['tflop_per_s'], '.0f')} |")
            if k["mlp_unfused"]:
                lines += ["", "One block's MLP per stage, ours (fused kernel, split or GEMM form, all its launches) "
                          "against cuBLAS unfused (ms):", "",
                          "| stage | rows x C x D | ours | cuBLAS GEMMs only | cuBLAS unfused (GEMM, GELU, addmm) | "
                          "GEMMs TFLOP/s |", "|---|---|---|---|---|---|"]
                for r in k["mlp_unfused"]:
                    lines.append(f"| {r['stage']} | {r['rows']} x {r['channels']} x {r['hidden']} | "
                                 f"{r['ours_ms']:.3f} ({r['form']}) | "
                                 f"{r['gemms_ms']:.3f} | {r['unfused_ms']:.3f} | {r['gemms_tflop_per_s']:.0f} |")
            lines.append("")
    if document.get("autotune_timings"):
        lines += ["## Autotuned tiles (median ms of each candidate; - refused by the compiler)", ""]
        for key, timings in document["autotune_timings"].items():
            ranked = sorted(timings.items(), key=lambda kv: (kv[1] is None, kv[1] or 0))
            lines.append(f"- `{key}`: " + "; ".join(f"{name} {'-' if ms is None else format(ms, '.3f')}"
                                                   for name, ms in ranked))
        lines.append("")
    return "\n".join(lines) + "\n"



def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny sizes, kernels in Triton's interpreter")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--sections", default=",".join(SECTIONS))
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--min-time", type=float, default=2.0, help="seconds of timed steps per row")
    parser.add_argument("--candidates", default=None, help="comma-separated names of the contenders to run "
                        "(default: all of them; e.g. leave out 'timm max-autotune' and its long compile)")
    parser.add_argument("--agreement-images", type=int, default=1024)
    parser.add_argument("--no-autotune", action="store_true", help="take the first MLP tile that compiles "
                        "instead of timing every candidate (POOLFORMER_TRITON_AUTOTUNE)")
    args = parser.parse_args(argv)
    sections = [s for s in args.sections.split(",") if s]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    models = model_list(parser, args.models)
    names = [c[0] for c in candidates("s12", "cpu", 1, 64, "bf16")]
    chosen = names if args.candidates is None else [c.strip() for c in args.candidates.split(",") if c.strip()]
    if set(chosen) - set(names):
        parser.error(f"unknown candidates {sorted(set(chosen) - set(names))}; choose from {names}")
    if args.smoke:  # the fast rows run the Triton kernels in the interpreter (see the module docstring)
        os.environ["POOLFORMER_FAST_BACKEND"] = "triton"
        device, resolution, batch, images = "cpu", 64, 1, 2
        settings = bench.BenchSettings(warmup=0, iters=1, compile_backend="eager", fp32_comparison=False)
    else:
        if not torch.cuda.is_available():
            print("fast_gpu.py: no CUDA GPU here (use --smoke for the CPU run)", file=sys.stderr)
            return 2
        device, resolution, batch, images = "cuda", 224, args.batch_size, args.agreement_images
        settings = bench.BenchSettings(warmup=10, iters=20, min_time_s=args.min_time)
    autotune = not args.no_autotune and not args.smoke  # the interpreter has one candidate tile
    if autotune:
        os.environ["POOLFORMER_TRITON_AUTOTUNE"] = "1"
    args.out.mkdir(parents=True, exist_ok=True)
    tiles = TileChooser.from_settings()
    build = randomised_build(tiles=tiles)
    env = environment(device)
    bandwidth = (env.get("gpu") or {}).get("memory_bandwidth_tb_s")
    document = {"command": "PYTHONPATH=. python " + " ".join(["benchmarks/fast_gpu.py", *(argv or sys.argv[1:])]),
                "env": env, "targets": TARGETS, "batch_size": batch, "resolution": resolution,
                "settings": f"warm-up {settings.warmup} steps, then >= {settings.min_time_s or 0} s and "
                            f">= {settings.iters} timed steps per row, median; compile time reported apart",
                "autotune": autotune, "throughput": {}, "latency": {}, "exactness": {}, "kernels": {}}

    def save() -> None:
        document["mlp_tiles"] = tiles.mlp_tiles_in_use()  # which tile each shape ran with (autotuned on a GPU)
        document["pool_mix_tiles"] = tiles.pool_tiles_in_use()
        document["autotune_timings"] = tiles.autotune_timings()
        write_text(args.out / "fast_gpu.json", json.dumps(document, indent=2) + "\n")
        write_text(args.out / "fast_gpu.md", markdown(document))

    for model in models:
        print(model, file=sys.stderr)
        if "throughput" in sections:
            entry = document["throughput"][model] = {"rows": {}, "summary": {}}

            def progress() -> None:
                entry["summary"] = throughput_summary(entry["rows"], bandwidth)
                save()

            measure([c for c in candidates(model, device, batch, resolution, "bf16") if c[0] in chosen], settings,
                    build, entry["rows"], progress)
        if "kernels" in sections:
            document["kernels"][model] = kernel_breakdown(model, device, batch, resolution, build,
                                                          repeats=2 if args.smoke else 10)
            save()
        if "exactness" in sections:  # before latency, whose max-autotune compile is the long part
            document["exactness"][model] = agreement(model, device, images, resolution, build)
            save()
        if "latency" in sections:
            named = [c for c in candidates(model, device, 1, resolution, "bf16") if c[0] in
                     ("timm eager", "timm max-autotune", "fast") and c[0] in chosen]
            document["latency"][model] = {}
            measure(named, settings, build, document["latency"][model], save)
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
