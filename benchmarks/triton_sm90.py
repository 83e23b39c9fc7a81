"""What the `--impl fast` Triton kernels cost on a Hopper GPU, found without one: registers, spilled bytes,
shared memory and whether the matmuls use wgmma, per kernel launch of a model's forward.

    python benchmarks/triton_sm90.py --out DIR [--models s12,v2_s12,m36] [--batch 256] [--all-tiles]

The model's forward runs on the meta device (shapes only, nothing computed), with every kernel launch recorded
instead of run: the same arguments, constexprs, warps and stages the GPU would get. Each distinct launch is then
compiled by Triton for sm_90a (as its JIT would, with 16-byte alignment of pointers and of integers divisible by
16) and assembled by the ptxas that Triton ships, whose `-v` report gives the figures. Each MLP launch is
recorded in two forms: the fused kernel and the GEMM form (fc1/fc2); `--all-tiles` compiles every candidate
tile of `mlp_configs`, `gemm_configs` and the token mixer's `elementwise_tiles` (for an H100 SXM or H200's 132
SMs), not only the first. Heavy spilling leaves a GPU mostly idle; this shows it on any machine.
Writes DIR/triton_sm90.json and DIR/triton_sm90.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import torch

from poolformer import create_model
from poolformer.fast.folding import fold
from poolformer.fast.triton import launches
from poolformer.fast.triton.availability import INTERPRET_ENV
from poolformer.fast.triton.forward import TritonForward
from poolformer.fast.triton.tiles import elementwise_tiles, gemm_configs, mlp_configs
from poolformer.fast.triton.weights import prepare
from poolformer.zoo import unknown_models

from _common import model_list, write_text

TARGET_ARCH = 90
SM90_SM_COUNT = 132  # an H100 SXM's and an H200's multiprocessors: the GPUs the tile candidates are for
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
LAUNCH_OPTIONS = ("num_warps", "num_stages")


class _Recorder:
    """Stands in for a Triton kernel: `kernel[grid](*args, **kwargs)` records the launch and runs nothing."""

    def __init__(self, name: str, launches: list):
        self.name, self.launches = name, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append({"kernel": self.name, "grid": grid, "args": args, "kwargs": kwargs})
        return launch


class _EveryTileForward(TritonForward):
    """The forward with each MLP launched in the GEMM form and on the fused kernel, and the token mixer on its
    first candidate tile, or on every candidate tile with all_tiles (no tile is chosen: nothing runs)."""

    def __init__(self, all_tiles: bool):
        super().__init__()
        self.all_tiles = all_tiles

    def mlp(self, x1, stats, block, activation, emit_stats, form=None):
        batch_, height, width, channels = x1.shape
        rows, hidden = batch_ * height * width, block.fc1_weight.shape[1]
        fused = mlp_configs(rows, channels, hidden, x1.dtype, SM90_SM_COUNT)
        gemm = gemm_configs(rows, channels, hidden, x1.dtype, SM90_SM_COUNT)
        for tile in (gemm if self.all_tiles else gemm[:1]):
            launches.gemm_mlp(self.recorder, x1, stats, block, activation, emit_stats, tile)
        for tile in (fused if self.all_tiles else fused[:1]):
            result = launches.fused_mlp(self.recorder, x1, stats, block, activation, emit_stats, tile)
        return result

    def pool_mix(self, x, stats, block, pool_size, tile=None):
        batch_, height, width, channels = x.shape
        tiles = elementwise_tiles(batch_ * height * width, channels)
        for tile in (tiles if self.all_tiles else tiles[:1]):
            result = launches.pool_mix(self.recorder, x, stats, block, pool_size, tile)
        return result


def record_launches(model_name: str, batch: int, resolution: int, dtype: torch.dtype,
                    all_tiles: bool = False) -> list[dict]:
    """Every kernel launch of the model's forward (meta tensors), with each MLP launch once per candidate tile
    when all_tiles."""
    folded, plan = fold(create_model(model_name).eval())
    prepared = prepare(folded, dtype, torch.device("meta"))
    recorded: list[dict] = []
    names = ("stats_kernel", "pool_mix_kernel", "mlp_kernel", "mlp_norm_kernel", "stem_kernel", "layer_norm_kernel",
             "activation_kernel", "fc1_kernel", "fc2_kernel")
    fake = types.SimpleNamespace(**{name: _Recorder(name, recorded) for name in names})
    original_kernels = launches.kernels
    launches.kernels = lambda: fake  # every launch module-wide goes to the recording stand-ins
    try:
        images = torch.empty(batch, 3, resolution, resolution, device="meta", dtype=dtype)
        images = images.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            _EveryTileForward(all_tiles).features(images, prepared, plan)
    finally:
        launches.kernels = original_kernels
    return recorded


def _arg_type(value) -> tuple[str, bool]:
    """(Triton signature type, divisible by 16) of a positional launch argument, as Triton's JIT sees it."""
    if isinstance(value, torch.Tensor):
        return "*" + DTYPE_NAMES[value.dtype], True  # PyTorch's allocations are at least 16-byte aligned
    if isinstance(value, bool):
        return "i1", False
    if isinstance(value, int):
        return ("i32" if -2 ** 31 <= value < 2 ** 31 else "i64"), value % 16 == 0
    if isinstance(value, float):
        return "fp32", False
    raise TypeError(f"unexpected launch argument {value!r}")


def launch_key(launch: dict) -> tuple:
    """What decides the compiled code: the argument types and alignments, the constexprs, warps and stages."""
    types_ = tuple(_arg_type(a) for a in launch["args"])
    return (launch["kernel"], types_, tuple(sorted(launch["kwargs"].items())))


def ptxas_path() -> str:
    from triton.backends.nvidia import compiler as nvidia

    override = os.environ.get("TRITON_PTXAS_PATH")
    return override or str(Path(nvidia.__file__).parent / "bin" / "ptxas")


def compile_launch(launch: dict) -> dict:
    """Registers, spill stores/loads (bytes), shared memory and wgmma use of one launch compiled for sm_90a."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from poolformer.fast.triton import kernels as triton_kernels

    fn = getattr(triton_kernels, launch["kernel"])
    constexprs = {k: v for k, v in launch["kwargs"].items() if k not in LAUNCH_OPTIONS}
    signature, attrs = {}, {}
    for index, (name, value) in enumerate(zip(fn.arg_names, launch["args"])):
        kind, aligned = _arg_type(value)
        signature[name] = kind
        if aligned:
            attrs[(index,)] = [["tt.divisibility", 16]]
    for name in constexprs:
        signature[name] = "constexpr"
    missing = set(fn.arg_names) - set(signature)
    if missing:
        raise RuntimeError(f"{launch['kernel']}: the recorded launch does not name {sorted(missing)}")
    source = ASTSource(fn=fn, signature=signature, attrs=attrs,
                       constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    options = {k: launch["kwargs"][k] for k in LAUNCH_OPTIONS if k in launch["kwargs"]}
    compiled = triton.compile(source, target=GPUTarget("cuda", TARGET_ARCH, 64), options=options)
    ptx = compiled.asm["ptx"]
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "kernel.ptx"
        path.write_text(ptx)
        done = subprocess.run([ptxas_path(), f"-arch=sm_{TARGET_ARCH}a", "-v", str(path), "-o", str(path) + ".o"],
                              capture_output=True, text=True)
    report = done.stderr + done.stdout
    registers = re.search(r"Used (\d+) registers", report)
    if done.returncode != 0 or registers is None:
        raise RuntimeError(f"ptxas failed: {report.strip().splitlines()[-1] if report.strip() else done.returncode}")
    stores = re.search(r"(\d+) bytes spill stores", report)
    loads = re.search(r"(\d+) bytes spill loads", report)
    return {"registers": int(registers.group(1)), "spill_store_bytes": int(stores.group(1)) if stores else 0,
            "spill_load_bytes": int(loads.group(1)) if loads else 0, "shared_bytes": compiled.metadata.shared,
            "wgmma": "wgmma.mma_async" in ptx, "num_warps": options.get("num_warps", 4),
            "num_stages": options.get("num_stages")}


def describe(launch: dict) -> str:
    from poolformer.fast.triton import kernels as triton_kernels

    a = dict(zip(getattr(triton_kernels, launch["kernel"]).arg_names, launch["args"]))  # by name, not position
    kw = launch["kwargs"]
    if launch["kernel"] == "mlp_kernel":
        return (f"mlp C={a['C']} D={a['D']} rows={a['R']} tile {kw['BLOCK_R']}x{kw['BLOCK_D']} "
                f"w{kw.get('num_warps')} s{kw.get('num_stages')}")
    if launch["kernel"] in ("fc1_kernel", "fc2_kernel"):
        gemm = "fc1 norm act" if launch["kernel"] == "fc1_kernel" else "fc2 residual"
        return (f"{gemm} C={a['C']} D={a['D']} rows={a['R']} tile {kw['BLOCK_M']}x{kw['BLOCK_N']}x{kw['BLOCK_K']} "
                f"w{kw.get('num_warps')} s{kw.get('num_stages')}" + (" +stats" if kw.get("EMIT_STATS") else ""))
    if launch["kernel"] == "pool_mix_kernel":
        return (f"pool_mix C={a['C']} {a['H']}x{a['W']} rows={a['R']} tile {kw['BLOCK_R']}x{kw['BLOCK_C']} "
                f"w{kw.get('num_warps')}" + (" whole-slots" if kw.get("WHOLE_SLOTS") else ""))
    if launch["kernel"] == "stem_kernel":
        return f"stem {a['N']} channels, {a['HO']}x{a['WO']} tile {kw['BLOCK_M']}x{kw['BLOCK_K']}"
    if launch["kernel"] == "activation_kernel":
        return f"activation {a['N']} elements"
    name = {"stats_kernel": "stats", "mlp_norm_kernel": "mlp norm", "layer_norm_kernel": "layer_norm"}[launch["kernel"]]
    return f"{name} C={a['C']} rows={a['R']} tile {kw['BLOCK_R']}x{kw['BLOCK_C']}"


def analyse(models: list[str], batch: int, resolution: int, dtype: torch.dtype, all_tiles: bool) -> dict:
    rows, seen = [], {}
    for model in models:
        for launch in record_launches(model, batch, resolution, dtype, all_tiles):
            key = launch_key(launch)
            if key not in seen:
                try:
                    seen[key] = compile_launch(launch)
                except Exception as err:  # a tile the compiler refuses is a finding, not a crash
                    seen[key] = {"error": f"{type(err).__name__}: {str(err).strip().splitlines()[0][:200]}"}
            rows.append({"model": model, "launch": describe(launch), **seen[key]})
    unique = {}
    for row in rows:  # one row per distinct launch and model (a stage's blocks repeat the same launches)
        unique.setdefault((row["model"], row["launch"]), {**row, "launches": 0})["launches"] += 1
    return {"rows": list(unique.values())}


def markdown(document: dict) -> str:
    lines = [f"# The fast path's Triton kernels compiled for sm_{TARGET_ARCH}a (no GPU needed)", "",
             f"Command: `{document['command']}`  ", f"Triton {document['triton']}, torch {document['torch']}; "
             f"{document['dtype']}, batch {document['batch']}, {document['resolution']} px.", "",
             "| model | launch | per forward | registers | spill stores (B) | spill loads (B) | shared (KB) | wgmma |",
             "|---|---|---|---|---|---|---|---|"]
    for r in document["rows"]:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['launch']} | {r['launches']} | {r['error']} | | | | |")
            continue
        lines.append(f"| {r['model']} | {r['launch']} | {r['launches']} | {r['registers']} | {r['spill_store_bytes']} | "
                     f"{r['spill_load_bytes']} | {r['shared_bytes'] / 1024:.0f} | {'yes' if r['wgmma'] else ''} |")
    return "\n".join(lines) + "\n"



def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--models", default="s12,v2_s12,m36")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--precision", choices=("bf16", "fp16", "fp32"), default="bf16")
    parser.add_argument("--all-tiles", action="store_true", help="every candidate MLP tile, not only the default")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1" or os.environ.get(INTERPRET_ENV) == "1":
        parser.error("unset TRITON_INTERPRET / POOLFORMER_TRITON_INTERPRET: this compiles the kernels")
    try:
        ptxas = ptxas_path()
    except ImportError as err:
        print(f"triton_sm90.py: Triton's NVIDIA backend is not installed ({err})", file=sys.stderr)
        return 2
    if not Path(ptxas).is_file():
        print(f"triton_sm90.py: no ptxas at {ptxas} (set TRITON_PTXAS_PATH)", file=sys.stderr)
        return 2
    import triton

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.precision]
    models = model_list(parser, args.models)
    document = {"command": "PYTHONPATH=. python " + " ".join(["benchmarks/triton_sm90.py", *(argv if argv is not None else sys.argv[1:])]),
                "triton": triton.__version__, "torch": torch.__version__, "dtype": args.precision,
                "batch": args.batch, "resolution": args.resolution,
                **analyse(models, args.batch, args.resolution, dtype, args.all_tiles)}
    args.out.mkdir(parents=True, exist_ok=True)
    write_text(args.out / "triton_sm90.json", json.dumps(document, indent=2, default=str) + "\n")
    write_text(args.out / "triton_sm90.md", markdown(document))
    return 0


if __name__ == "__main__":
    sys.exit(main())
