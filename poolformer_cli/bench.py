"""`poolformer bench` (throughput / latency / memory, regression checks) and `poolformer profile`.

Only parsing and rendering live here; the measuring is in poolformer.bench, poolformer.profiling and
poolformer.regression. torch is imported inside the commands.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

import typer
from rich.text import Text

from .common import (
    PRECISION_NAMES, check_features_models, check_plot_path, check_writable, console, csv_text, err_console, fail,
    one_size, parse_int_list, parse_sizes, print_json, print_precision_note, resolve_models, save_figure,
    short_model_name, user_errors, write_atomic,
)
from .tables import name, number, print_table, prose, shared_words, without_words

if TYPE_CHECKING:
    from poolformer.bench import BenchConfig, BenchResult, BenchSettings
    from poolformer.distributed import Distributed
    from poolformer.regression import RegressionReport


def _parse_names(text: str, option: str, allowed: Sequence[str]) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        fail(f"{option} needs at least one value")
    for name in names:
        if name not in allowed:
            fail(f"unknown {option.lstrip('-').rstrip('s')} {name!r} for {option}; choose from: {', '.join(allowed)}")
    return list(dict.fromkeys(names))


# ------------------------------------------------------------------------------------------- bench


def bench_command(
    models: Optional[list[str]] = typer.Argument(None, help="Models, aliases or patterns ('v2_*'), or timm:NAME "
                                                            "peers (default: s12)."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda or cuda:N (default: cuda when available)."),
    batch_sizes: str = typer.Option("1,32", help="Comma-separated batch sizes."),
    resolutions: str = typer.Option("224", "--resolutions", "--resolution", metavar="SIZES",
                                    help="Comma-separated input sizes: 224 (a square) or HEIGHTxWIDTH, e.g. "
                                         "800x1333,512 (the detection and segmentation sizes)."),
    features: bool = typer.Option(False, "--features", help="Time the features-only backbone of detection and "
                                  "segmentation (no head; four stage maps out, each checked against ours)."),
    precision: str = typer.Option("fp32", help="Comma-separated: fp32, bf16, fp16. bf16/fp16 use torch.autocast "
                                                "(weights stay fp32; convolutions and matmuls run in low precision)."),
    channels_last: bool = typer.Option(False, "--channels-last",
                                       help="Model and input in channels_last memory format."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the model; the compile time (first "
                                                          "call) is reported separately."),
    compile_mode: Optional[str] = typer.Option(None, "--compile-mode", help="torch.compile mode for --compile: "
                                               "default, reduce-overhead, max-autotune (timm's fastest), "
                                               "max-autotune-no-cudagraphs."),
    compile_backend: str = typer.Option("inductor", "--compile-backend", help="torch.compile backend for "
                                        "--compile: inductor, or eager / aot_eager to check tracing quickly."),
    cast_model: bool = typer.Option(False, "--cast-model", help="bf16/fp16 rows: convert the weights and input "
                                    "to the precision and run without autocast (timm's --model-dtype)."),
    impl: str = typer.Option("ours", help="Comma-separated implementations of the same model: ours, "
                                          "timm, fast, onnxruntime, openvino."),
    mode: str = typer.Option("inference", help="Comma-separated: inference, train. A train step is forward, "
                                               "cross-entropy on fixed random labels, backward, optimizer step; "
                                               "with --impl ours or timm (or timm:NAME peers)."),
    optimizer: str = typer.Option("sgd", help="Train rows: sgd (momentum 0.9) or adamw."),
    grad_checkpointing: bool = typer.Option(False, "--grad-checkpointing", help="Train rows: also measure each "
                                            "with gradient checkpointing (every block recomputed in backward, as "
                                            "timm's), beside the row without it."),
    weights: Optional[Path] = typer.Option(None, help="A checkpoint (any supported layout) or an exported .onnx "
                                                      "file (run with --impl onnxruntime or openvino) instead of "
                                                      "random weights."),
    warmup: int = typer.Option(10, help="Untimed steps before timing."),
    iters: Optional[int] = typer.Option(None, help="Timed steps per configuration (default 50)."),
    min_time: Optional[float] = typer.Option(None, "--min-time", help="Instead of --iters: time steps for at "
                                                                       "least this many seconds."),
    threads: Optional[int] = typer.Option(None, help="CPU threads for torch (default: torch's own choice)."),
    max_batch: bool = typer.Option(False, "--max-batch", help="Search the largest batch size that fits in memory "
                                                              "and benchmark at it (replaces --batch-sizes)."),
    max_batch_limit: int = typer.Option(4096, help="Upper bound for --max-batch."),
    noisy_threshold: float = typer.Option(0.10, help="Flag a measurement as noisy when IQR / median exceeds this."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write the results as JSON (after every "
                                                                       "configuration, atomically)."),
    csv_path: Optional[Path] = typer.Option(None, "--csv", help="Write the results as CSV."),
    json_output: bool = typer.Option(False, "--json", help="Print the JSON document instead of a table."),
    baseline: Optional[Path] = typer.Option(None, help="Compare with this earlier --output file; exit 1 when a "
                                                       "configuration is slower than --max-regression allows."),
    max_regression: float = typer.Option(10.0, help="Allowed throughput loss against --baseline, in percent."),
    retries: int = typer.Option(0, "--retries", help="Measure a configuration that regressed again, up to this "
                                "many times; it fails only if every measurement regressed (a few seconds of a "
                                "busy machine fail one, a slower model all). With --baseline."),
    normalised: bool = typer.Option(False, "--normalised", help="Also time a fixed reference workload, "
                                    "interleaved with each model step, and compare throughput relative to it "
                                    "(a baseline from a faster or busier machine still compares fairly)."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Draw img/s, p50/p90 latency and peak memory against "
                                                             "batch size, a panel per resolution (.png or .svg)."),
    github_benchmark: Optional[Path] = typer.Option(None, "--github-benchmark", help="Write the results as "
                                                    "github-action-benchmark JSON (tool: customBiggerIsBetter)."),
    markdown_path: Optional[Path] = typer.Option(None, "--markdown", help="Write the results and the regression "
                                                 "verdict as Markdown (for a job summary or a PR comment)."),
) -> None:
    """Measure throughput (images/s), per-step latency (median, p90, IQR) and peak memory, for inference or training.

    Every combination of model x mode x impl x precision x resolution x batch size is one row. The first call
    (and compilation) and the warm-up steps are timed apart from the measured steps. Under `torchrun
    --nproc-per-node N`, train rows run in DistributedDataParallel (gloo on CPUs, nccl on GPUs) and report the
    img/s of all processes and the scaling efficiency against one process; rank 0 prints and writes.

    Example: poolformer bench s12 s24 --batch-sizes 1,64 --precision fp32,bf16 --output results.json;
    poolformer bench s12 m36 --features --resolutions 800x1333 --batch-sizes 2
    """
    names = resolve_models(models or ["s12"])
    modes = _parse_names(mode, "--mode", ("inference", "train"))
    if optimizer not in ("sgd", "adamw"):
        fail(f"unknown optimizer {optimizer!r} for --optimizer; choose from: sgd, adamw")
    if "train" not in modes and (grad_checkpointing or optimizer != "sgd"):
        fail("--optimizer and --grad-checkpointing apply to train rows; add --mode train")
    if modes == ["train"] and cast_model:
        fail("train rows run under autocast with fp32 weights; --cast-model is for inference rows")
    if "train" in modes and features:
        fail("--features times inference only: a train row's loss is cross-entropy on the classifier's logits, and "
             "a backbone has no head")
    check_features_models(names, features)
    batch_list = parse_int_list(batch_sizes, "--batch-sizes")
    resolution_list = parse_sizes(resolutions, "--resolutions")
    precisions = _parse_names(precision, "--precision", PRECISION_NAMES)
    if iters is not None and min_time is not None:
        fail("use either --iters or --min-time, not both")
    if max_batch_limit < 1:
        fail(f"--max-batch-limit must be >= 1, got {max_batch_limit}")
    if retries < 0:
        fail(f"--retries must be >= 0, got {retries}")
    if retries and baseline is None:
        fail("--retries needs --baseline: it measures again the configurations that regressed against it")
    if weights is not None and not weights.expanduser().is_file():
        fail(f"--weights {str(weights)!r}: no such file", 1)
    for path, option in ((output, "--output"), (csv_path, "--csv"), (github_benchmark, "--github-benchmark"),
                         (markdown_path, "--markdown")):
        check_writable(path, option)
    check_plot_path(plot)

    from poolformer import bench as engine
    from poolformer.envinfo import environment
    from poolformer.implementations import IMPLEMENTATIONS
    from poolformer.regression import compare, load_results

    impls = _parse_names(impl, "--impl", list(IMPLEMENTATIONS))
    if (compile_mode is not None or compile_backend != "inductor") and not compile:
        fail("--compile-mode and --compile-backend apply to --compile; add --compile")
    settings = engine.BenchSettings(warmup=warmup, iters=50 if iters is None else iters, min_time_s=min_time,
                                    threads=threads, normalised=normalised, noisy_iqr_ratio=noisy_threshold,
                                    compile_mode=compile_mode, compile_backend=compile_backend)
    with user_errors(), contextlib.ExitStack() as stack:
        engine.check_settings(settings)
        device_name = engine.resolve_device(device)
        for precision_name in precisions:
            engine.check_precision(device_name, precision_name)
        baseline_doc = load_results(baseline) if baseline is not None else None
        engine.apply_settings(settings, device_name)
        env = environment(device_name)
        env["settings"] = {"warmup": settings.warmup, "iters": None if min_time else settings.iters,
                           "min_time_s": min_time, "compile_mode": compile_mode,
                           "compile_backend": compile_backend if compile else None,
                           "autocast": ("weights cast to bf16/fp16, no autocast" if cast_model
                                        else "torch.autocast for bf16/fp16"),
                           "normalised": normalised, "noisy_iqr_ratio": noisy_threshold}
        configs = engine.expand_configs(names, impls, device_name, [1] if max_batch else batch_list,
                                        resolution_list, precisions, channels_last, compile,
                                        None if weights is None else str(weights.expanduser()), cast_model,
                                        modes, optimizer, (False, True) if grad_checkpointing else (False,), features)
        for config in configs:
            engine.check_config(config)
        engine.check_weights(configs)
        procs = stack.enter_context(_processes(device_name, modes, min_time))
        env["world_size"] = procs.world_size
        if not procs.is_main:  # rank 0 prints and writes; the others only train beside it
            output = csv_path = None
        results = _run_all(configs, settings, env, output, csv_path, max_batch, max_batch_limit, procs)
    if not procs.is_main:
        return

    document = {"env": env, "results": [r.to_row() for r in results]}
    report = None
    if baseline_doc is not None:
        with user_errors():
            report = compare(baseline_doc["results"], document["results"], max_regression, normalised)
            if retries and report.failed:
                report, results = _measure_regressed_again(report, baseline_doc, results, settings, retries,
                                                           normalised)
                document["results"] = [r.to_row() for r in results]
                _save(env, results, output, csv_path)
    _write_reports(document, report, plot, github_benchmark, markdown_path)
    if json_output:
        print_json(document)
    else:
        _print_results(results, normalised, _hardware(env), (env.get("gpu") or {}).get("memory_bandwidth_tb_s"))
    if report is not None:
        _print_regression(report, to_stderr=json_output)
        if report.failed:
            raise typer.Exit(1)
    if not any(r.status == "ok" for r in results):
        raise typer.Exit(1)


def _processes(device_name: str, modes: list[str], min_time: Optional[float]):
    """This process's place in a torchrun job (a single process without torchrun); refuses what cannot run there."""
    import torch

    from poolformer.distributed import distributed, world_size_from_env

    if world_size_from_env() > 1:
        if modes != ["train"]:
            fail("under torchrun bench measures train rows in DistributedDataParallel: use --mode train, and run "
                 "inference rows without torchrun")
        if min_time is not None:
            fail("--min-time cannot be used under torchrun (every process must take the same steps); use --iters")
    return distributed(torch.device(device_name))


def _measure_regressed_again(report: RegressionReport, baseline_doc: dict, results: list[BenchResult],
                             settings: BenchSettings, retries: int,
                             normalised: bool) -> tuple[RegressionReport, list[BenchResult]]:
    """poolformer.regression.recheck with bench's own configurations: the results, the regressed ones replaced
    by their newest measurement."""
    from poolformer import bench as engine
    from poolformer.regression import config_label, recheck

    results = list(results)
    index = {config_label(r.to_row()): i for i, r in enumerate(results)}

    def remeasure(rows: list[dict]) -> list[dict]:
        fresh = []
        for row in rows:
            i = index[config_label(row)]
            err_console.print(f"measuring again: {config_label(row)}", style="dim")
            results[i] = next(iter(engine.run_benchmark([results[i].config], settings)))
            fresh.append(results[i].to_row())
        return fresh

    report, _ = recheck(report, baseline_doc["results"], [r.to_row() for r in results], remeasure, retries,
                        normalised)
    return report, results


def _write_reports(document: dict, report: Optional[RegressionReport], plot: Optional[Path],
                   github_benchmark: Optional[Path], markdown_path: Optional[Path]) -> None:
    """The picture, the github-action-benchmark JSON and the Markdown report, each only where asked for."""
    from . import reports

    if plot is not None:
        from poolformer.plots import bench_figure

        save_figure(bench_figure(document["results"]), plot)
    if github_benchmark is not None:
        write_atomic(github_benchmark, json.dumps(reports.github_benchmark(document), indent=2) + "\n")
    if markdown_path is not None:
        write_atomic(markdown_path, reports.markdown(document, report, _hardware(document["env"])))


def _run_all(configs: list[BenchConfig], settings: BenchSettings, env: dict, output: Optional[Path],
             csv_path: Optional[Path], max_batch: bool, max_batch_limit: int,
             procs: Optional[Distributed] = None) -> list[BenchResult]:
    """Run the configurations under a progress bar (rank 0's only, under torchrun), saving the rows after each one
    (so Ctrl-C keeps them)."""
    from dataclasses import replace

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from poolformer import bench as engine

    results: list[BenchResult] = []
    models = engine.ModelCache()  # rows that differ only in batch size (or autocast precision) share a model
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=err_console, transient=True, disable=procs is not None and not procs.is_main)
    try:
        with progress:
            task = progress.add_task("benchmark", total=len(configs))
            for config in configs:
                progress.update(task, description=_describe(config))
                if max_batch:
                    try:
                        found = engine.search_max_batch(config, limit=max_batch_limit)
                    except Exception as err:  # the model fails at batch 1: the row below will carry the error
                        found = engine.MaxBatch(None, "batch 1: " + (str(err).strip().splitlines() or [""])[0])
                    env.setdefault("max_batch", {})[_describe(config)] = found.batch_size
                    env.setdefault("max_batch_limited_by", {})[_describe(config)] = found.limited_by
                    config = replace(config, batch_size=found.batch_size or 1)
                results.extend(engine.run_benchmark([config], settings, models=models, procs=procs))
                _save(env, results, output, csv_path)
                progress.advance(task)
    except KeyboardInterrupt:
        kept = f"; {len(results)} finished row(s) kept in {output}" if output is not None and results else ""
        fail(f"interrupted{kept}", 130)
    return results


def _describe(config: BenchConfig, compile_mode: Optional[str] = None) -> str:
    from dataclasses import asdict

    from poolformer.regression import options_suffix

    return (f"{config.model}/{config.impl} bs{config.batch_size} {config.resolution}px {config.precision}"
            + options_suffix({**asdict(config), "compile_mode": compile_mode}))


def _save(env: dict, results: list[BenchResult], output: Optional[Path], csv_path: Optional[Path]) -> None:
    rows = [r.to_row() for r in results]
    if output is not None:
        write_atomic(output, json.dumps({"env": env, "results": rows}, indent=2) + "\n")
    if csv_path is not None:
        write_atomic(csv_path, csv_text(CSV_COLUMNS, [_csv_row(row) for row in rows]))


CSV_COLUMNS = ("model", "impl", "mode", "optimizer", "grad_checkpointing", "device", "batch_size", "resolution",
               "height", "width", "precision", "channels_last", "compile", "cast", "features", "compile_mode", "status",
               "throughput", "latency_median_ms", "latency_p90_ms", "latency_iqr_ms",
               "peak_memory_bytes", "peak_reserved_bytes", "first_call_ms", "compile_ms", "noisy",
               "reference_ms", "relative_throughput", "fp32_throughput", "precision_note",
               "parity_max_abs_diff", "parity_relative_diff", "parity_top1_agreement", "parity_ok", "parity_note",
               "impl_note", "backend", "backend_note", "bytes_per_image", "achieved_tb_per_s",
               "grad_parity_loss_relative_diff", "grad_parity_grad_relative_diff", "grad_parity_ok", "world_size",
               "single_process_throughput", "scaling_efficiency", "error")


def _csv_row(row: dict) -> dict:
    """A result row with its latency statistics and parity check as columns of their own."""
    flat = dict(row)
    for stat in ("median", "p90", "iqr"):
        flat[f"latency_{stat}_ms"] = row["latency_ms"][stat]
    for name in ("max_abs_diff", "relative_diff", "top1_agreement", "ok"):
        flat[f"parity_{name}"] = (row.get("parity") or {}).get(name)
    for name in ("loss_relative_diff", "grad_relative_diff", "ok"):
        flat[f"grad_parity_{name}"] = (row.get("grad_parity") or {}).get(name)
    return flat


def _ms(value: Optional[float]) -> str:
    """About three significant digits: 583.6 -> '584', 14.42 -> '14.4', 2.345 -> '2.35'."""
    if value is None:
        return "-"
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def _rate(value: Optional[float]) -> str:
    """img/s to 0.1, or two significant digits below 1 (an m36 backbone at 800x1333 on a CPU: 0.14)."""
    if value is None:
        return "-"
    return f"{value:,.1f}" if value >= 1 else f"{value:.2g}"


def _megabytes(n: Optional[int]) -> str:
    return "-" if n is None else f"{n / 1e6:,.0f}MB"


def _short_label(config: BenchConfig, compile_mode: Optional[str] = None) -> str:
    """'s12/ours bs32 224px fp32 CL' - the zoo's first alias keeps the table narrow."""
    return _describe(config, compile_mode).replace(config.model, short_model_name(config.model), 1)


def _compact_label(label: str, shared: list[str]) -> str:
    """A regression check's 'poolformer_s12/ours cpu bs32 224px fp32' as 's12/ours bs32' when every
    configuration is on cpu at 224px in fp32 (the title says so)."""
    model, _, rest = without_words(label, shared).partition("/")
    return f"{short_model_name(model)}/{rest}"


def _hardware(env: dict) -> str:
    """'AMD EPYC, AVX2, bf16 emulated, fp16 emulated' on a CPU, the GPU's name on a GPU."""
    if str(env.get("device", "cpu")).startswith("cuda"):
        return str(env.get("device_name") or "")
    return str((env.get("cpu") or {}).get("summary") or env.get("cpu_model") or "")


def _print_results(results: list, normalised: bool, hardware: str = "",
                   bandwidth_tb_s: Optional[float] = None) -> None:
    device = results[0].config.device if results else "cpu"
    labels = {id(r): _short_label(r.config, r.compile_mode) for r in results}
    shared = shared_words(list(labels.values()))
    title = (f"poolformer bench on {device}" + (f" ({hardware})" if hardware else "")
             + (f"; every row: {' '.join(shared)}" if shared else ""))
    print_table([
        name("config", lambda r: labels[id(r)], lambda r: without_words(labels[id(r)], shared)),
        name("status", _status),
        number("img/s", lambda r: _rate(r.throughput)),
        number("median ms", lambda r: _ms(r.latency_ms and r.latency_ms.median)),
        number("p90 ms", lambda r: _ms(r.latency_ms and r.latency_ms.p90), priority=3),
        number("IQR", _iqr, priority=2),
        number("peak mem", lambda r: _megabytes(r.peak_memory_bytes), priority=2),
        number("first ms", lambda r: _ms(r.first_call_ms), priority=3),
        number("max |Δ|", _parity, priority=3),
        *([number("rel.", lambda r: f"{r.relative_throughput:.3f}" if r.relative_throughput else "-")]
          if normalised else []),
    ], results, title=title, frame="light")
    any_noisy = any(r.noisy and r.latency_ms is not None for r in results)
    errors = [f"{labels[id(r)]}: {r.error}" for r in results if r.status == "error"]
    for line in errors:
        console.print(f"[red]error[/] {line}", soft_wrap=True)
    impl_notes = list(dict.fromkeys(f"--impl {r.config.impl}: {r.impl_note}" for r in results if r.impl_note))
    notes_above = _precision_notes(results) + impl_notes + _fast_notes(results, bandwidth_tb_s) + _scaling_notes(results)
    for line in notes_above:
        console.print(f"[yellow]note[/] {line}", soft_wrap=True)
    memory = ("peak mem = peak bytes allocated by tensors on the GPU (1 MB = 10^6 bytes)" if device.startswith("cuda")
              else "peak mem = peak resident memory of the whole process (1 MB = 10^6 bytes)")
    notes = [f"img/s = batch / median step latency; IQR = (p75 - p25) / median of the per-step latencies; "
             f"{memory}; first = the first forward alone (with --compile: the compile time; for runtimes: "
             "creating the session, and the ONNX export of each new shape or OpenVINO's one conversion of the "
             "model where this row needed it first); max |Δ| = the row's logits against the fp32 eager reference with the same "
             "weights (timm's own for --impl timm), with the top-1 agreement where it is below 100%; mismatch = "
             "beyond tolerance, not a speed result; CL = channels_last; 224px = a 224x224 square, 800x1333px = "
             "height x width."]
    if any(r.config.features for r in results):
        notes.append("features = the backbone alone (no head): its four stage maps, each through its output norm; "
                     "max |Δ| = the largest difference over the four maps.")
    if any(r.config.mode == "train" for r in results):
        notes.append("train = forward, loss, backward and optimizer step per step (stochastic depth off); ckpt = "
                     "gradient checkpointing; ∇ = the largest relative difference of the loss and of any gradient "
                     "against the other implementation (timm's for ours, ours for timm) with the same weights and "
                     "batch.")
    if any_noisy:
        notes.append("! noisy: the IQR is a large share of the median - the machine was busy; rerun, "
                     "raise --iters/--min-time, or use --threads.")
    if normalised:
        notes.append("rel. = batch x median over steps of (reference-workload time / model step time): images "
                     "per reference run, the machine's speed divided out (see --normalised).")
    console.print(" ".join(notes), style="dim")


def _status(r) -> Text:
    return Text.from_markup({"ok": "ok", "oom": "[red]oom[/]", "mismatch": "[red]mismatch[/]"}.get(r.status,
                                                                                                "[red]error[/]"))


def _iqr(r) -> Text:
    """The spread of the step latencies as a share of the median, yellow with a '!' when noisy."""
    if r.latency_ms is None:
        return Text("-")
    share = f"{r.latency_ms.iqr / r.latency_ms.median:.1%}"
    return Text(share + "!", style="yellow") if r.noisy else Text(share)


def _parity(r) -> Text:
    """Max |logit difference| against the fp32 reference (and the top-1 agreement below 100%), red when failed;
    for a train row the largest relative difference of its loss and gradients ('∇ 3e-06')."""
    if r.grad_parity is not None:
        g = r.grad_parity
        worst = max(g.grad_relative_diff, g.loss_relative_diff)
        return Text("∇ " + (f"{worst:.0e}" if worst else "0"), style=None if g.ok else "red")
    if r.parity is None:
        return Text("-")
    p = r.parity
    diff = (f"{p.max_abs_diff:.0e}" if p.max_abs_diff else "0") + ("" if p.top1_agreement in (1.0, None)
                                                                     else f" {p.top1_agreement:.0%}")
    return Text(diff, style=None if p.ok else "red")


def _fast_notes(results: list, bandwidth_tb_s: Optional[float]) -> list[str]:
    """Why --impl fast did not run its Triton kernels (once per reason), and each Triton row's roofline: the
    bytes its kernels move per image and the bandwidth the measured speed implies."""
    lines = list(dict.fromkeys(r.backend_note for r in results if r.backend_note))
    for r in results:
        if r.achieved_tb_per_s is not None:
            share = f" ({r.achieved_tb_per_s / bandwidth_tb_s:.0%} of {bandwidth_tb_s:.2f})" if bandwidth_tb_s else ""
            lines.append(f"{_short_label(r.config, r.compile_mode)}: roofline {r.bytes_per_image / 1e6:.1f} MB moved "
                         f"per image by its kernels, {r.achieved_tb_per_s:.2f} TB/s{share}")
    return lines


def _scaling_notes(results: list) -> list[str]:
    """Under torchrun: each train row's processes, its img/s in one process and the scaling efficiency."""
    return [f"{_short_label(r.config, r.compile_mode)}: {r.world_size} processes, {r.throughput:,.1f} img/s in all; "
            f"one process alone {r.single_process_throughput:,.1f} img/s; scaling efficiency {r.scaling_efficiency:.2f}"
            for r in results if r.scaling_efficiency is not None]


def _precision_notes(results: list) -> list[str]:
    """One line per precision the hardware does not run natively, then one per emulated row with fp32's speed."""
    lines = list(dict.fromkeys(r.precision_note for r in results if r.precision_note))
    for r in results:
        if r.fp32_throughput and r.throughput:
            lines.append(f"{_short_label(r.config, r.compile_mode)}: {r.throughput:,.1f} img/s; the same in fp32: "
                         f"{r.fp32_throughput:,.1f} img/s ({r.fp32_throughput / r.throughput:.1f}x faster)")
    return lines


def _verdict(c) -> Text:
    details = "; ".join(filter(None, [c.note, *c.gpu_differences]))
    return (Text("REGRESSED", style="red") if c.regressed else Text("ok", style="green")) + (
        f" ({details})" if details else "")


def _print_regression(report: RegressionReport, to_stderr: bool) -> None:
    from poolformer.regression import ALPHA

    out = err_console if to_stderr else console
    unit = "img/s" if report.metric == "throughput" else "img/ref"
    labels = [c.label for c in report.comparisons]
    shared = shared_words(labels)
    print_table([
        name("configuration", lambda c: c.label, lambda c: _compact_label(c.label, shared)),
        number(f"baseline {unit}", lambda c: f"{c.baseline:,.3f}"),
        number(f"current {unit}", lambda c: "-" if c.current is None else f"{c.current:,.3f}"),
        number("change", lambda c: "-" if c.change_pct is None else f"{c.change_pct:+.1f}%"),
        number("p", lambda c: "-" if c.p_value is None else f"{c.p_value:.3g}", priority=2),
        prose("verdict", _verdict),
    ], report.comparisons, out=out,
        title=(f"regression check ({report.metric}, allowed loss {report.max_regression_pct:g}%, step test "
               f"p < {ALPHA:g})" + (f"; every configuration: {' '.join(shared)}" if shared else "")))
    for label in report.only_in_baseline:
        out.print(f"not measured in this run: {label}", style="dim")
    for label in report.only_in_current:
        out.print(f"not in the baseline: {label}", style="dim")
    regressed = sum(c.regressed for c in report.comparisons)
    if regressed:
        out.print(f"[bold red]{regressed} of {len(report.comparisons)} configuration(s) regressed by more than "
                  f"{report.max_regression_pct:g}%[/]")
    else:
        out.print(f"[green]no regression beyond {report.max_regression_pct:g}% "
                  f"({len(report.comparisons)} configuration(s) compared)[/]")
    if any(c.gpu_differences for c in report.comparisons):
        out.print("The GPU ran differently from the baseline (clocks, temperature or throttling): a change in speed "
                  "may come from the machine, not the code.", style="yellow")
    out.print(f"A configuration regresses when it lost more than {report.max_regression_pct:g}% and its step times "
              f"are slower than the baseline's by a one-sided Mann-Whitney U test (p < {ALPHA:g}).", style="dim")


# ------------------------------------------------------------------------------------------- profile


def _print_kernel_profile(report) -> None:
    c = report.config
    print_table([
        name("stage", lambda k: str(k["stage"])),
        name("kernel", lambda k: k["kernel"]),
        number("launches", lambda k: str(k["launches"]), priority=3),
        number("ms", lambda k: f"{k['ms']:.3f}"),
        number("share", lambda k: f"{k['share']:.1%}"),
        number("MB", lambda k: f"{k['bytes'] / 1e6:.1f}", priority=2),
        number("TB/s", lambda k: "-" if k["tb_per_s"] is None else f"{k['tb_per_s']:.2f}"),
        number("TFLOP/s", lambda k: "-" if k["tflop_per_s"] is None else f"{k['tflop_per_s']:.0f}", priority=2),
    ], report.kernels, title=f"{c.model}/fast kernels on {c.device}, batch {c.batch_size}, "
                             f"{c.resolution.height}x{c.resolution.width} px, "
                             f"{c.precision}: {report.total_ms:.3f} ms per forward (median of {report.repeats} per "
                             "launch)")
    console.print("Each launch timed on its own between CUDA events with CUDA graphs off (host clocks in Triton's "
                  "interpreter); stage 0 is the stem. MB: the bytes each kernel reads and writes once; "
                  "TFLOP/s counts 2 FLOPs per multiply-add. Whole-forward speed: `poolformer bench`.", style="dim")
    if not report.host_ahead:
        console.print("note: the host fell behind the GPU in some forwards: the times are upper bounds", style="yellow")


def profile_command(
    model: str = typer.Argument("s12", help="Model or alias, or a timm:NAME peer."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda or cuda:N (default: cuda when available)."),
    batch_size: int = typer.Option(8, min=1, help="Batch size."),
    resolution: str = typer.Option("224", metavar="SIZE", help="Input size: 224 (a square) or HEIGHTxWIDTH, e.g. "
                                   "800x1333."),
    features: bool = typer.Option(False, "--features", help="Profile the features-only backbone of detection and "
                                  "segmentation (no head; the four stage maps through their own norms)."),
    precision: str = typer.Option("fp32", help="fp32, bf16 or fp16 (torch.autocast)."),
    channels_last: bool = typer.Option(False, "--channels-last", help="Model and input in channels_last memory format."),
    impl: str = typer.Option("ours", help="Implementation: ours, timm, fast, onnxruntime or openvino."),
    warmup: int = typer.Option(3, min=0, help="Unprofiled steps first."),
    steps: int = typer.Option(5, min=1, help="Profiled steps."),
    threads: Optional[int] = typer.Option(None, min=1, help="CPU threads for torch (default: torch's own choice)."),
    top: int = typer.Option(15, min=1, help="Operators shown."),
    trace: Optional[Path] = typer.Option(None, help="Also write a Chrome trace (open it in Perfetto or Chrome's tracing page)."),
    json_output: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
    kernels: bool = typer.Option(False, "--kernels", help="--impl fast on its Triton kernels: time each kernel on "
                                 "its own (CUDA events, graphs off; --steps forwards), with bytes, TB/s, TFLOP/s."),
) -> None:
    """Profile one configuration with torch.profiler: which operators take the time (self time, calls, share).

    With --kernels, the fast path's own Triton kernels instead, each timed on its own.

    Example: poolformer profile s24 --device cuda --batch-size 64 --precision bf16
    """
    names = resolve_models([model])
    if len(names) != 1:
        fail(f"profile takes one model; {model!r} matches {len(names)}")
    model_name = names[0]
    check_features_models(names, features)
    size = one_size(resolution, "--resolution", "profile")
    precision = _parse_names(precision, "--precision", PRECISION_NAMES)[0]
    check_writable(trace, "--trace")
    import dataclasses

    from poolformer import bench as engine, implementations
    from poolformer.errors import PoolformerError
    from poolformer.implementations import IMPLEMENTATIONS
    from poolformer.profiling import profile_fast_kernels, profile_model

    impl = _parse_names(impl, "--impl", list(IMPLEMENTATIONS))[0]
    with user_errors():
        device_name = engine.resolve_device(device)
        engine.check_precision(device_name, precision)
        print_precision_note(device_name, precision)
        engine.apply_settings(engine.BenchSettings(threads=threads), device_name)
        config = engine.BenchConfig(model_name, impl, device_name, batch_size, size, precision, channels_last,
                                    features=features)
        implementations.check_features(model_name, impl, features)
        if kernels and trace is not None:
            fail("--trace writes torch.profiler's trace; --kernels does not use the profiler: choose one")
        try:
            if kernels:
                report = profile_fast_kernels(config, repeats=steps)
            else:
                report = profile_model(config, warmup=warmup, steps=steps, trace_path=trace)
        except Exception as err:  # out of memory, a model that fails at this size, ...
            if isinstance(err, PoolformerError):
                raise
            reason = (str(err).strip().splitlines() or [""])[0]
            fail(f"profiling {_describe(config)} failed: {type(err).__name__}: {reason}", 1)
    if json_output:
        print_json({**dataclasses.asdict(report), "config": report.config.as_json()})
        return
    c = config
    if kernels:
        _print_kernel_profile(report)
        return
    title = (f"{c.model}/{c.impl}{' backbone (features only)' if c.features else ''} on {c.device}, batch "
             f"{c.batch_size}, {c.resolution.height}x{c.resolution.width} px, {c.precision}"
             f"{', channels_last' if c.channels_last else ''}: {report.total_ms:.2f} ms {report.time_kind} self time "
             f"per step ({report.steps} profiled steps)")
    print_table([
        name("operator", lambda op: op.name),
        name("category", lambda op: op.category, priority=2),
        number("self ms/step", lambda op: f"{op.self_ms:.3f}"),
        number("calls/step", lambda op: str(op.calls), priority=2),
        number("share", lambda op: f"{op.share:.1%}"),
    ], report.operators[:top], title=title)
    print_table([name("category", lambda item: item[0]), number("share", lambda item: f"{item[1]:.1%}")],
                report.categories.items(), title="by category")
    console.print("Self time excludes the operators an operator calls, so shares add up to 100%. The profiler "
                  "adds overhead: use `poolformer bench` for speed numbers.", style="dim")
    if report.trace_path:
        console.print(f"Chrome trace written to {report.trace_path}")
