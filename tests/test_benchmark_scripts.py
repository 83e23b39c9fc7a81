"""The benchmark scripts at tiny sizes (the GPU ones in their --smoke form: the same code on the CPU), so they never rot
between the sessions that have a GPU. Each runs as `python benchmarks/NAME.py`, in a fresh interpreter where
fvcore and thop cannot be imported, as on the GPU machine."""

from __future__ import annotations

import ast
import atexit
import functools
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"


@functools.cache
def _hidden_counters() -> str:
    """A folder whose fvcore and thop raise ImportError: first on PYTHONPATH, it hides the installed ones."""
    folder = tempfile.mkdtemp(prefix="poolformer-no-counters-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    for name in ("fvcore", "thop"):
        Path(folder, f"{name}.py").write_text(f"raise ImportError('{name} is not installed on the GPU machine')\n")
    return folder


def _run_script(script: str, *args: str, timeout: int = 600,
                env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join((_hidden_counters(), str(ROOT))), **(env_extra or {})}
    for name in ("POOLFORMER_TRITON_INTERPRET", "TRITON_INTERPRET", "POOLFORMER_FAST_BACKEND"):
        env.pop(name, None)  # the scripts set what they need themselves
    return subprocess.run([sys.executable, script, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _import_script(name: str, monkeypatch) -> object:
    """benchmarks/NAME.py as a module, its sibling _common with it, loaded from their files (as
    `python benchmarks/NAME.py` finds them) for this test only."""
    for module_name in ("_common", name):
        spec = importlib.util.spec_from_file_location(module_name, BENCHMARKS / f"{module_name}.py")
        module = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, module_name, module)
        spec.loader.exec_module(module)
    return module


def test_benchmark_scripts_use_the_library_only_and_leave_the_import_path_alone():
    """The scripts import poolformer, never poolformer_cli (a command runs as `python -m poolformer_cli` in a
    process of its own), and none edits sys.path: their shared helpers are the sibling module _common."""
    scripts = sorted(BENCHMARKS.glob("*.py"))
    assert BENCHMARKS / "_common.py" in scripts
    for path in scripts:
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            where = f"benchmarks/{path.name}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.Import):
                imported = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                imported = [node.module or ""] + [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                imported = []
            assert not [n for n in imported if n.split(".")[0] == "poolformer_cli"], where
            assert "sys.path" not in imported, where
            assert not (isinstance(node, ast.Attribute) and node.attr == "path" and isinstance(node.value, ast.Name)
                        and node.value.id == "sys"), where


@pytest.fixture(scope="module")
def gpu_suite(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_suite")
    done = _run_script("benchmarks/gpu_suite.py", "--smoke", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "gpu_suite.json").read_text()), (out / "gpu_suite.md").read_text()


@pytest.mark.subprocess
@pytest.mark.slow
def test_gpu_suite_smoke_runs_every_section_without_defects(gpu_suite):
    document, report = gpu_suite
    assert document["defects"] == [], document["defects"]
    assert set(document["sections"]) == {"sweep", "backbone", "oom", "timing", "profile", "predict_eval", "memory",
                                         "regression", "train"}
    assert document["command"].startswith("PYTHONPATH=. python benchmarks/gpu_suite.py --smoke")
    assert "## bench: main: s12" in report and "## regression" in report


@pytest.mark.subprocess
@pytest.mark.slow
def test_gpu_suite_sweep_covers_impls_compile_and_max_batch(gpu_suite):
    sweep = gpu_suite[0]["sections"]["sweep"]
    main = sweep["main: s12"]["rows"]
    assert {r["impl"] for r in main} == {"ours", "timm", "fast"} and all(r["status"] == "ok" for r in main)
    assert all(r["channels_last"] for r in main)
    assert not any(r["channels_last"] for r in sweep["s12 without channels-last"]["rows"])
    assert {r["resolution"] for r in sweep["s12 at larger resolutions"]["rows"]} == {64}
    compiled = sweep["compiled"]["rows"]
    assert {r["impl"] for r in compiled} == {"ours", "timm"} and all(r["compile"] for r in compiled)
    assert list(sweep["max batch"]["max_batch"].values()) == [2]  # the smoke run's limit
    assert all(r["parity_rel"] is not None for r in main)
    assert sweep["env"]["device"] == "cpu" and sweep["env"]["cpu"]


@pytest.mark.subprocess
@pytest.mark.slow
def test_gpu_suite_train_rows_with_and_without_checkpointing_and_the_largest_batch(gpu_suite):
    train = gpu_suite[0]["sections"]["train"]
    assert train["ok"], train
    rows = train["fixed batch"]["rows"]
    assert [(r["impl"], r["grad_checkpointing"]) for r in rows] == [("ours", False), ("ours", True)]
    assert all(r["status"] == "ok" and r["grad_parity"]["ok"] and r["grad_parity"]["reference"] for r in rows)
    assert "--mode train" in train["fixed batch"]["command"] and "--grad-checkpointing" in train["max batch"]["command"]
    assert len(train["checkpointing"]) == 1 and train["checkpointing"][0]["speed_ratio"] > 0
    assert list(train["max batch"]["max_batch"].values()) == [2, 2]  # plain and checkpointed, the smoke limit


@pytest.mark.subprocess
@pytest.mark.slow
def test_gpu_suite_backbone_runs_the_dense_tasks_sizes_features_only(gpu_suite):
    backbone = gpu_suite[0]["sections"]["backbone"]
    assert backbone["ok"] and set(backbone) == {"backbone: 64x96 bs1", "backbone: 64 bs2", "ok"}
    rows = [r for name, run in backbone.items() if name != "ok" for r in run["rows"]]
    assert {r["impl"] for r in rows} == {"ours", "timm"} and all(r["status"] == "ok" for r in rows)
    assert all(r["features"] and r["parity_rel"] is not None for r in rows)
    assert {(r["resolution"], r["height"], r["width"], r["batch_size"]) for r in rows} == {("64x96", 64, 96, 1),
                                                                                          (64, 64, 64, 2)}
    assert "--features" in backbone["backbone: 64x96 bs1"]["command"]
    assert "## bench: backbone: 64x96 bs1" in gpu_suite[1]


@pytest.mark.subprocess
@pytest.mark.slow
def test_gpu_suite_oom_row_and_recovery(gpu_suite):
    oom = gpu_suite[0]["sections"]["oom"]
    assert oom["statuses"] == ["ok", "oom", "ok"] and oom["ok"]
    assert len(oom["allocated_after_each_row"]) == 3
    assert oom["simulated"] is True  # on the CPU the out-of-memory is raised by a stand-in model
    assert oom["throughput_after_oom"] > 0 and oom["throughput_without_oom"] > 0


@pytest.mark.subprocess
@pytest.mark.slow
def test_gpu_suite_timing_profile_memory_and_known_answers(gpu_suite):
    sections = gpu_suite[0]["sections"]
    timing = sections["timing"]["batch 2"]
    assert {"bench_median_ms", "blocked_autorange_ms", "timm_style_mean_ms"} <= timing.keys()
    assert all(v > 0 for k, v in timing.items() if k.endswith("_ms"))
    assert timing["bench_again_ms"] > 0 and "launch overhead" in timing["explanation"]
    profile = sections["profile"]
    assert profile["time_kind"] == "cpu" and profile["trace_written"] and profile["top"]
    predict_eval = sections["predict_eval"]
    assert predict_eval["ok"] and predict_eval["eval cpu fp32"] == predict_eval["expected"]
    assert sections["memory"]["summary_activation_bytes"] > 0
    regression = sections["regression"]
    assert regression["unchanged"]["fired"] in (0, 1, 2) and len(regression["slowed"]["changes_pct"]) == 2


@pytest.mark.subprocess
@pytest.mark.interpreter
@pytest.mark.slow
def test_fast_gpu_smoke_measures_every_contender(tmp_path):
    done = _run_script("benchmarks/fast_gpu.py", "--smoke", "--out", str(tmp_path), "--models", "poolformer_s12")
    assert done.returncode == 0, done.stderr[-3000:]
    document = json.loads((tmp_path / "fast_gpu.json").read_text())
    rows = document["throughput"]["poolformer_s12"]["rows"]
    assert set(rows) == {"timm eager", "timm eager NCHW", "timm max-autotune", "ours eager", "fast"}
    assert all(r["status"] == "ok" for r in rows.values()), {k: r["error"] for k, r in rows.items()}
    assert rows["fast"]["backend"] == "triton" and rows["fast"]["bytes_per_image"] > 0
    tiles = document["mlp_tiles"]  # one per MLP shape: s12's four stages at batch 1 (latency adds none here)
    assert {t["channels"] for t in tiles} == {64, 128, 320, 512} and all(t["block_rows"] > 0 for t in tiles)
    assert rows["timm max-autotune"]["cast"] and rows["timm max-autotune"]["compile_mode"] == "max-autotune"
    summary = document["throughput"]["poolformer_s12"]["summary"]
    assert summary["vs_timm_eager"] == pytest.approx(rows["fast"]["throughput"] / summary["timm_eager"])
    exact = document["exactness"]["poolformer_s12"]
    assert exact["fast_fp32_relative_diff"] < 1e-4 and 0 <= exact["fast_bf16_top1_agreement"] <= 1
    assert set(document["latency"]["poolformer_s12"]) == {"timm eager", "timm max-autotune", "fast"}
    kernels = document["kernels"]["poolformer_s12"]
    assert [r["stage"] for r in kernels["mlp_unfused"]] == [1, 2, 3, 4]
    assert [(r["channels"], r["hidden"]) for r in kernels["mlp_unfused"]] == [(64, 256), (128, 512), (320, 1280),
                                                                              (512, 2048)]
    assert sum(r["launches"] for r in kernels["table"]) == len(kernels["launches"]) > 20
    report = (tmp_path / "fast_gpu.md").read_text()
    assert "| poolformer_s12 |" in report and "Batch-1 latency" in report and "Kernel by kernel" in report


@pytest.mark.subprocess
@pytest.mark.interpreter
@pytest.mark.slow
def test_fast_gpu_kernel_table_of_the_gemm_form(tmp_path):
    """The lease's `gemm` step in smoke form (POOLFORMER_TRITON_MLP=gemm): every stage's MLP runs as the GEMM
    form, the kernel table names its launches and the MLP comparison labels the form."""
    done = _run_script("benchmarks/fast_gpu.py", "--smoke", "--out", str(tmp_path), "--models", "s12",
                       "--sections", "kernels", "--candidates", "fast", env_extra={"POOLFORMER_TRITON_MLP": "gemm"})
    assert done.returncode == 0, done.stderr[-3000:]
    kernels = json.loads((tmp_path / "fast_gpu.json").read_text())["kernels"]["s12"]
    assert [r["form"] for r in kernels["mlp_unfused"]] == ["gemm"] * 4
    names = {r["kernel"] for r in kernels["table"]}
    assert {"fc1 norm act", "fc2 residual"} <= names and not names & {"mlp", "mlp norm", "act"}
    assert "(gemm)" in (tmp_path / "fast_gpu.md").read_text()


@pytest.mark.subprocess
@pytest.mark.slow
def test_fast_gpu_runs_only_the_chosen_contenders(tmp_path):
    """--candidates leaves out contenders (the H200 run had no time for max-autotune's compile); a name that is
    not a contender is refused before anything runs."""
    done = _run_script("benchmarks/fast_gpu.py", "--smoke", "--out", str(tmp_path), "--models", "s12",
                       "--sections", "throughput", "--candidates", "ours eager,timm eager")
    assert done.returncode == 0, done.stderr[-3000:]
    document = json.loads((tmp_path / "fast_gpu.json").read_text())
    assert set(document["throughput"]["s12"]["rows"]) == {"ours eager", "timm eager"}
    bad = _run_script("benchmarks/fast_gpu.py", "--smoke", "--out", str(tmp_path / "bad"), "--candidates", "fastest")
    assert bad.returncode == 2 and "unknown candidates ['fastest']" in bad.stderr
    assert not (tmp_path / "bad").exists()


@pytest.mark.subprocess
@pytest.mark.parametrize("script", [pytest.param("benchmarks/gpu_suite.py", marks=pytest.mark.slow),
                                    "benchmarks/fast_gpu.py",
                                    pytest.param("benchmarks/triton_sm90.py", marks=pytest.mark.slow)])
def test_scripts_refuse_an_unknown_model_in_one_line(script, tmp_path):
    done = _run_script(script, "--out", str(tmp_path / "out"), "--models", "s12,s99")
    assert done.returncode == 2 and "unknown models ['s99']" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.subprocess
@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a GPU is here: the scripts would run in full")
@pytest.mark.parametrize("script", ["benchmarks/gpu_suite.py",
                                    pytest.param("benchmarks/fast_gpu.py", marks=pytest.mark.slow)])
def test_scripts_without_a_gpu_say_so(script, tmp_path):
    done = _run_script(script, "--out", str(tmp_path))
    assert done.returncode == 2 and "no CUDA GPU here" in done.stderr


@pytest.mark.subprocess
@pytest.mark.slow
def test_openvino_crash_check_counts_processes_per_case(tmp_path):
    pytest.importorskip("openvino")
    pytest.importorskip("onnxruntime")
    out = tmp_path / "crash"
    cases = "cores-in-order,cores-reversed,poolformer-runners,heap-openvino-one-allocator,heap-onnxruntime"
    done = _run_script("benchmarks/openvino_crash_check.py", "--runs", "1", "--resolution", "32", "--cases", cases,
                       "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    document = json.loads(out.with_suffix(".json").read_text())
    assert "MALLOC_CHECK_=3" in document["env"]["checks"] and "PYTHONMALLOC=malloc" in document["env"]["checks"]
    rows = {row["case"]: row for row in document["cases"]}
    assert list(rows) == cases.split(",") and all(r["runs"] == 1 for r in rows.values())
    # what poolformer runs, and the controls, never fail; two Cores freed in creation order die with SIGSEGV
    # where OpenVINO's plugin swaps the signal stack (Linux, the versions the README names)
    assert [rows[c]["failed"] for c in ("cores-reversed", "poolformer-runners", "heap-openvino-one-allocator",
                                        "heap-onnxruntime")] == [0, 0, 0, 0], rows
    assert rows["cores-in-order"]["failed"] == 0 or rows["cores-in-order"]["messages"] == ["killed by signal 11"]
    assert rows["heap-openvino-one-allocator"]["env"] == {"TBB_ENABLE_SANITIZERS": "1"}
    assert "| two poolformer OpenVINO runners freed in the order they were made, then a signal | 1 | 0 | - |" in (
        out.with_suffix(".md").read_text())


@pytest.mark.subprocess
@pytest.mark.parametrize("script, args, message", [
    ("openvino_crash_check", ["--runs", "0"], "--runs must be at least 1"),
    ("openvino_crash_check", ["--cases", "cores-in-order,bogus"], "unknown case(s) bogus"),
    pytest.param("openvino_profile", ["--precisions", "fp8"], "unknown precision", marks=pytest.mark.slow),
    ("openvino_profile", ["--batch-sizes", "one"], "comma-separated integers"),
    pytest.param("openvino_profile", ["--calls", "0"], "at least 1", marks=pytest.mark.slow),
])
def test_openvino_scripts_refuse_bad_arguments_in_one_line(tmp_path, script, args, message):
    done = _run_script(f"benchmarks/{script}.py", *args, "--out", str(tmp_path / "out"))
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr
    assert not list(tmp_path.iterdir())


@pytest.mark.subprocess
@pytest.mark.slow
def test_openvino_profile_splits_each_forms_time_by_node_kind(tmp_path):
    pytest.importorskip("openvino")
    import torch

    from poolformer import create_model
    from poolformer.flops import count_analytic

    out = tmp_path / "profile"
    done = _run_script("benchmarks/openvino_profile.py", "--resolution", "64", "--batch-sizes", "2", "--precisions",
                       "fp32", "--calls", "1", "--rounds", "1", "--threads", "1", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [row["form"] for row in rows] == ["fast", "openvino/convert-model"]
    conv_macs = count_analytic(create_model("s12").eval(), torch.zeros(1, 3, 64, 64)).by_operator["conv"].macs
    for row in rows:
        assert sum(row["share"].values()) == pytest.approx(1.0)
        assert row["ms_per_image"]["1x1 convolutions"] > 0 and row["ms_per_image"]["MVN"] > 0  # fc1/fc2, the norms
        assert row["one_by_one_gmac_s"] > 0 and row["matmul_gmac_s"] > 0
        # the bound counts every convolution MAC of the model at the square matmul's rate
        bound_ms = conv_macs / (row["matmul_gmac_s"] * 1e9) * 1e3
        assert row["largest_gain"] == pytest.approx(row["wall_ms_per_image"] / bound_ms)
        if shutil.which("cc") or shutil.which("gcc") or shutil.which("clang"):
            # the CPU's FMA peak bounds every kernel: OpenVINO's matmul cannot beat it, nor run at a third of it
            assert row["matmul_gmac_s"] * 0.8 < row["fma_peak_gmac_s"] < row["matmul_gmac_s"] * 3
            peak_ms = conv_macs / (row["fma_peak_gmac_s"] * 1e9) * 1e3
            assert row["gain_at_peak"] == pytest.approx(row["wall_ms_per_image"] / peak_ms)
    assert "| fp32 | 2 | fast |" in out.with_suffix(".md").read_text()


@pytest.mark.skipif(not (shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")), reason="no C compiler")
def test_fma_peak_probe_measures_each_thread_count_and_refuses_what_it_cannot_measure(tmp_path, monkeypatch):
    """The probe runs at 1 and 2 threads and gives a rate for each (how the rates compare is a measurement, kept in
    benchmarks/results/openvino_profile_*.md: tests assert no timings)."""
    openvino_profile = _import_script("openvino_profile", monkeypatch)
    build_peak_probe, fma_peak = openvino_profile.build_peak_probe, openvino_profile.fma_peak

    probe, why = build_peak_probe(tmp_path)
    assert probe is not None, why
    one, two = (fma_peak(probe, "fp32", threads, seconds=0.2) for threads in (1, 2))
    assert 0 < one < float("inf") and 0 < two < float("inf")
    from poolformer.capabilities import cpu_capabilities

    assert (fma_peak(probe, "bf16", 1, seconds=0.2) is not None) == cpu_capabilities().native_bf16
    bad = subprocess.run([str(probe), "fp8", "1", "1"], capture_output=True, text=True)
    assert bad.returncode == 2 and "usage" in bad.stderr
    assert fma_peak(None, "fp32", 1) is None


@pytest.mark.subprocess
@pytest.mark.slow
def test_runtimes_cpu_benchmark_measures_every_candidate_with_parity_and_a_floor(tmp_path):
    pytest.importorskip("openvino")
    pytest.importorskip("onnxruntime")
    out = tmp_path / "runtimes"
    done = _run_script("benchmarks/runtimes_cpu.py", "--resolution", "64", "--batch-sizes", "2", "--rounds", "1",
                       "--warmup", "0", "--repeats", "1", "--block", "1", "--threads", "1", "--compiler", "aot_eager",
                       "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    document = json.loads(out.with_suffix(".json").read_text())
    assert document["compiler"] == "aot_eager"
    import torch

    from poolformer import create_model
    from poolformer.capabilities import cpu_capabilities
    from poolformer.flops import count_analytic

    conv_macs = count_analytic(create_model("s12").eval(), torch.zeros(1, 3, 64, 64)).by_operator["conv"].macs
    precisions = [row["precision"] for row in document["batches"]]
    assert precisions == (["fp32", "bf16"] if cpu_capabilities().native_bf16 else ["fp32"])
    assert (document["skipped"] is None) == cpu_capabilities().native_bf16
    for row in document["batches"]:
        assert {"ours", "fast", "fast (oneDNN)", "openvino/torch-export", "openvino/portable-export",
                "openvino/convert-model"} <= set(row["img_s"])
        assert row["fast_backend"] == "openvino-folded" and "fast (openvino)" not in row["img_s"]  # fast is that column
        # the graph built from OpenVINO's operators beside the same algebra exported to ONNX, and their ratio
        img_s = row["img_s"]
        assert row["fast_over_folded_onnx"] == pytest.approx(img_s["fast"] / img_s["fast (openvino, ONNX export)"])
        assert {"timm compiled", "fast (inductor)"} <= set(row["img_s"])  # the compiled peer and our compiled graph
        assert row["best_fast"].startswith("fast") and row["best_timm"].startswith("timm")
        assert row["best_fast_over_best_runtime"] >= row["fast_over_best_runtime"] and row["fast_over_best_timm"] > 0
        # the bounds ran interleaved as candidates; no output of theirs counts as a logit
        bounds = {"floor: convolutions", "floor: convolutions + activation", "ceiling: square matmul"}
        assert bounds <= set(row["img_s"])
        assert not bounds & set(row["max_abs_diff_vs_ours"])
        assert row["macs_per_image"] == conv_macs  # the floor does the model's convolutions, all of them
        assert row["target_img_s"] > 0 and row["ceiling_gmac_s"] > 0
        floor = row["img_s"]["floor: convolutions + activation"]
        assert row["target_over_floor"] == pytest.approx(row["target_img_s"] / floor)
        for name, diff in row["max_abs_diff_vs_ours"].items():
            if diff is not None:  # every exact candidate is exact: fp32 to rounding, bf16 to bf16's
                assert diff < (1e-4 if row["precision"] == "fp32" else 0.1), (name, diff)
    fp32 = document["batches"][0]
    assert {"onnxruntime/torch-export", "onnxruntime/portable-export", "fast (onnxruntime)"} <= set(fp32["img_s"])
    report = out.with_suffix(".md").read_text()
    assert "## fp32" in report and "`fast` over `fast (openvino, ONNX export)`" in report


@pytest.mark.subprocess
@pytest.mark.slow
def test_runtimes_cpu_benchmark_refuses_an_unknown_compiler(tmp_path):
    done = _run_script("benchmarks/runtimes_cpu.py", "--compiler", "tvm", "--out", str(tmp_path / "r"))
    assert done.returncode == 2 and "unknown --compiler 'tvm'" in done.stderr and "Traceback" not in done.stderr
    assert not list(tmp_path.iterdir())


@pytest.mark.subprocess
@pytest.mark.slow
def test_triton_sm90_compiles_the_recorded_launches_without_a_gpu(tmp_path):
    """The kernels' launches of a real forward (meta tensors), compiled for Hopper by Triton and its ptxas: every
    kernel of a stage appears with its registers and spills. Recording drifts with the launch code, so this
    fails the day a kernel gains an argument that the recorded launch does not carry."""
    pytest.importorskip("triton.backends.nvidia")
    done = _run_script("benchmarks/triton_sm90.py", "--out", str(tmp_path), "--models", "s12", "--batch", "2",
                       "--resolution", "64")
    if done.returncode == 2 and "no ptxas" in done.stderr:
        pytest.skip(done.stderr.strip())
    assert done.returncode == 0, done.stderr[-3000:]
    document = json.loads((tmp_path / "triton_sm90.json").read_text())
    rows = document["rows"]
    assert not [r for r in rows if "error" in r], rows
    kernels = [r["launch"].split()[0] for r in rows]
    assert kernels.count("mlp") == 4 and kernels.count("pool_mix") == 4 and kernels.count("stats") >= 4
    assert kernels.count("fc1") == 4  # the GEMM form's first tile, each stage; fc2 with and without statistics:
    stage_1 = "fc2 residual C=64 D=256 rows=512 tile 64x64x64 w4 s4"
    assert {r["launch"] for r in rows if r["launch"].startswith("fc2 residual C=64")} == {stage_1, stage_1 + " +stats"}
    assert sum(r["launches"] for r in rows if r["launch"].startswith("mlp")) == 12  # s12: 2 + 2 + 6 + 2 blocks
    assert all(0 < r["registers"] <= 255 and r["spill_store_bytes"] >= 0 for r in rows)
    assert "| s12 | mlp C=64 D=256" in (tmp_path / "triton_sm90.md").read_text()


@pytest.mark.subprocess
@pytest.mark.slow
def test_gpu_lease_script_checks_its_steps_and_packs_every_step(tmp_path):
    """benchmarks/gpu_lease.sh (one lease's measurements): an unknown step is refused before anything runs; a
    step runs under its timeout and its log is packed into OUT/results.tgz (here the GPU script exits at once:
    no GPU)."""
    import tarfile

    env = {**os.environ, "OUT": str(tmp_path / "out"), "RESULTS_DIR": str(tmp_path / "results"),
           "PYTHON": sys.executable}
    (tmp_path / "out").mkdir()
    bad = subprocess.run(["bash", "benchmarks/gpu_lease.sh", "exact", "bogus"], capture_output=True, text=True,
                         env=env, cwd=ROOT)
    assert bad.returncode == 2 and "unknown step 'bogus'" in bad.stderr
    assert not (tmp_path / "results").exists()
    done = subprocess.run(["bash", "benchmarks/gpu_lease.sh", "exact"], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    with tarfile.open(tmp_path / "out" / "results.tgz") as archive:
        names = set(archive.getnames())
    assert {"./exact.log", "./steps.txt", "./versions.txt"} <= names
    steps = (tmp_path / "results" / "steps.txt").read_text()
    assert "rc=" in steps and "--no-autotune" not in steps
    # tiles carried from an earlier call of the lease: the steps start from them, untimed, and pack them again
    tiles = tmp_path / "carried" / "triton_tiles.json"
    tiles.parent.mkdir()
    tiles.write_text('{"mlp | GPU | triton 3.6.0 | bfloat16 | rows 1 C 64 D 256": {"kind": "SplitMlp"}}')
    again = subprocess.run(["bash", "benchmarks/gpu_lease.sh", "exact"], capture_output=True, text=True, cwd=ROOT,
                           env={**env, "LEASE_TILES": str(tiles), "RESULTS_DIR": str(tmp_path / "again")}, timeout=120)
    assert again.returncode == 0, again.stderr
    assert "--no-autotune" in (tmp_path / "again" / "steps.txt").read_text()
    assert (tmp_path / "again" / "triton_tiles.json").read_text() == tiles.read_text()
