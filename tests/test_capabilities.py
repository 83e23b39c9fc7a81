"""What the CPU can do, and what the engines do with it, tested on any host: capabilities are read from sample
/proc/cpuinfo texts and faked where a decision depends on them."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from poolformer import capabilities
from poolformer.capabilities import CpuCapabilities, precision_note, precision_support, read_cpu_flags
from poolformer.fast import choose_backend, optimize
from poolformer_cli.app import app

# flags lines as Linux prints them (trimmed): an AVX2-only AMD EPYC VM, an AMD EPYC Genoa (AVX-512 with
# AVX512-BF16), an Intel Sapphire Rapids (AMX) and an Arm Neoverse (no "flags" line: "Features").
CPUINFO = {
    "epyc_avx2": "model name\t: AMD EPYC\nflags\t\t: fpu sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c avx2 bmi2\n",
    "genoa": ("model name\t: AMD EPYC 9654\nflags\t\t: fpu sse2 fma avx f16c avx2 avx512f avx512dq avx512bw "
              "avx512vl avx512_vnni avx512_bf16\n"),
    "sapphire_rapids": ("model name\t: Intel(R) Xeon(R) Platinum 8480+\nflags\t\t: sse2 fma avx f16c avx2 avx512f "
                        "avx512dq avx512bw avx512vl avx512_vnni avx512_bf16 avx512_fp16 amx_bf16 amx_tile amx_int8\n"),
    "neoverse": "processor\t: 0\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp bf16\n",
}


def caps(isa: tuple[str, ...], onednn_bf16: bool, onednn_fp16: bool = False) -> CpuCapabilities:
    return CpuCapabilities(model="Test CPU", architecture="x86_64", isa=isa, torch_vector_isa=None, onednn=True,
                           onednn_bf16=onednn_bf16, onednn_fp16=onednn_fp16)


def test_instruction_sets_are_read_from_cpuinfo():
    assert read_cpu_flags(CPUINFO["epyc_avx2"]) == ("avx", "avx2", "fma", "f16c")
    assert "avx512_bf16" in read_cpu_flags(CPUINFO["genoa"]) and "amx_bf16" not in read_cpu_flags(CPUINFO["genoa"])
    assert {"amx_tile", "amx_bf16", "avx512_fp16"} <= set(read_cpu_flags(CPUINFO["sapphire_rapids"]))
    assert read_cpu_flags(CPUINFO["neoverse"]) == ("neon", "arm_bf16")


@pytest.mark.parametrize(("cpu", "onednn_bf16", "bf16", "fp16"), [
    ("epyc_avx2", False, "emulated", "emulated"),
    ("genoa", True, "native", "emulated"),
    ("sapphire_rapids", True, "native", "native"),
])
def test_precision_support_follows_the_instruction_sets(cpu, onednn_bf16, bf16, fp16):
    c = caps(read_cpu_flags(CPUINFO[cpu]), onednn_bf16=onednn_bf16, onednn_fp16=fp16 == "native")
    assert (precision_support(c, "fp32"), precision_support(c, "bf16"), precision_support(c, "fp16")) == (
        "native", bf16, fp16)
    assert (precision_note(c, "bf16") is None) == (bf16 == "native")
    assert precision_note(c, "fp32") is None


def test_avx512_without_bf16_dot_products_is_converted_not_emulated():
    c = caps(("avx2", "avx512f", "avx512bw", "avx512vl", "avx512dq"), onednn_bf16=True)
    assert precision_support(c, "bf16") == "converted"
    assert "converts to fp32" in precision_note(c, "bf16")


def test_this_machine_is_described_consistently():
    c = capabilities.cpu_capabilities()
    d = c.to_dict()
    json.dumps(d)  # goes into result files
    assert d["native_bf16"] == ("avx512_bf16" in c.isa or "amx_bf16" in c.isa)
    assert c.onednn_bf16 == bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    assert "bf16 " in c.summary()


@pytest.fixture
def fake_cpu(monkeypatch):
    """Make every engine see the given capabilities instead of this machine's."""
    def install(c: CpuCapabilities) -> None:
        monkeypatch.setattr(capabilities, "cpu_capabilities", lambda: c)
    return install


@pytest.mark.parametrize(("onednn_bf16", "expected"), [(False, "portable"), (True, "onednn")])
def test_fast_path_picks_onednn_for_bf16_only_where_onednn_runs_it(fake_cpu, onednn_bf16, expected):
    fake_cpu(caps(("avx2",), onednn_bf16=onednn_bf16))
    cpu = torch.device("cpu")
    assert choose_backend("auto", torch.bfloat16, cpu) == expected
    from poolformer.fast.runtime_backends import available

    # fp32: the folded graph in OpenVINO, else ONNX Runtime, where installed, else oneDNN (every x86 CPU)
    runtimes = [r for r in ("openvino", "onnxruntime") if available(r)]
    assert choose_backend("auto", torch.float32, cpu) == (f"{runtimes[0]}-folded" if runtimes else "onednn")
    assert choose_backend("onednn", torch.float32, cpu) == "onednn"
    assert choose_backend("auto", torch.float16, cpu) == "portable"
    assert choose_backend("portable", torch.float32, cpu) == "portable"


def test_asking_for_onednn_where_it_cannot_run_is_a_config_error(fake_cpu):
    from poolformer import ConfigError

    fake_cpu(caps(("avx2",), onednn_bf16=False))
    with pytest.raises(ConfigError, match="oneDNN cannot run bfloat16"):
        choose_backend("onednn", torch.bfloat16, torch.device("cpu"))
    with pytest.raises(ConfigError, match="unknown fast backend"):
        optimize(__import__("poolformer").create_model("s12"), backend="mkl")


def test_the_environment_switch_forces_the_portable_path(monkeypatch):
    from poolformer import ConfigError

    monkeypatch.setenv("POOLFORMER_FAST_BACKEND", "portable")
    assert choose_backend("auto", torch.float32, torch.device("cpu")) == "portable"
    monkeypatch.setenv("POOLFORMER_FAST_BACKEND", "avx9000")
    with pytest.raises(ConfigError, match="POOLFORMER_FAST_BACKEND"):
        choose_backend("auto", torch.float32, torch.device("cpu"))


@pytest.mark.parametrize("support", ["emulated", "native"])
def test_bench_notes_emulated_precision_and_times_fp32_beside_it(fake_cpu, tmp_path, support):
    native = support == "native"
    fake_cpu(caps(("avx2", "avx512_bf16") if native else ("avx2",), onednn_bf16=native))
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(app, ["bench", "s12", "--device", "cpu", "--precision", "bf16", "--batch-sizes", "1",
                                      "--resolutions", "32", "--warmup", "0", "--iters", "1", "--threads", "1",
                                      "--output", str(out)])
    assert result.exit_code == 0, result.output
    document = json.loads(out.read_text())
    row = document["results"][0]
    assert document["env"]["cpu"]["model"] == "Test CPU"
    assert "poolformer bench on cpu (Test CPU, " in result.output  # the table names the hardware
    if native:
        assert row["precision_note"] is None and row["fp32_throughput"] is None
        assert "note" not in result.output
    else:
        assert "bf16 is emulated on Test CPU" in row["precision_note"]
        assert row["fp32_throughput"] > 0
        assert "the same in fp32:" in result.output and "bf16 is emulated on Test CPU" in result.output


def test_bench_environment_block_names_the_cpu_capabilities():
    result = CliRunner().invoke(app, ["bench", "s12", "--device", "cpu", "--batch-sizes", "1", "--resolutions", "32",
                                      "--warmup", "0", "--iters", "1", "--threads", "1", "--json"])
    assert result.exit_code == 0, result.output
    env = json.loads(result.stdout)["env"]
    assert env["cpu"] == capabilities.cpu_capabilities().to_dict()


@pytest.fixture
def one_image_dataset(tmp_path):
    """An ImageNet-style folder with one image of class 0 (tench)."""
    from PIL import Image

    from poolformer.labels import imagenet_wnids

    folder = tmp_path / "val" / imagenet_wnids()[0]
    folder.mkdir(parents=True)
    Image.fromarray((torch.rand(40, 48, 3) * 255).byte().numpy()).save(folder / "a.png")
    return tmp_path


@pytest.mark.parametrize("command", ["predict", "eval", "profile"])
def test_emulated_precision_runs_with_a_one_line_note(fake_cpu, command, s12_checkpoint, one_image_dataset):
    fake_cpu(caps(("avx2",), onednn_bf16=False))
    args = {
        "predict": ["predict", str(next((one_image_dataset / "val").rglob("*.png"))), "--weights", str(s12_checkpoint),
                    "--json"],
        "eval": ["eval", str(one_image_dataset), "--weights", str(s12_checkpoint), "--workers", "0", "--json"],
        "profile": ["profile", "s12", "--batch-size", "1", "--resolution", "32", "--steps", "1", "--warmup", "0",
                    "--json"],
    }[command]
    result = CliRunner().invoke(app, [*args, "--device", "cpu", "--precision", "bf16"])
    assert result.exit_code == 0, result.output
    notes = [line for line in result.stderr.splitlines() if "bf16 is emulated on Test CPU" in line]
    assert len(notes) == 1
    json.loads(result.stdout)  # the machine-readable output stays clean


def test_predict_in_bf16_agrees_with_fp32(s12_checkpoint, one_image_dataset):
    image = str(next((one_image_dataset / "val").rglob("*.png")))
    top = {}
    for precision in ("fp32", "bf16"):
        result = CliRunner().invoke(app, ["predict", image, "--weights", str(s12_checkpoint), "--device", "cpu",
                                          "--precision", precision, "--json", "--top-k", "1"])
        assert result.exit_code == 0, result.output
        top[precision] = json.loads(result.stdout)[0]["predictions"][0]
    assert top["bf16"]["probability"] == pytest.approx(top["fp32"]["probability"], abs=0.05)


def test_unknown_precision_is_one_line_error(s12_checkpoint):
    from .conftest import assert_one_line_error

    result = CliRunner().invoke(app, ["predict", "x.png", "--weights", str(s12_checkpoint), "--precision", "int4"])
    assert_one_line_error(result, "unknown precision 'int4' for --precision")
