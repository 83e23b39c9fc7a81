"""Write the example outputs shown in README.md and docs/ by running their commands, so no output is pasted.

    python docs/generate.py                 # regenerate every output block
    python docs/generate.py docs/bench.md   # only these files
    python docs/generate.py --check         # exit 1 if a deterministic output (list, summary, flops) changed

An output block is a pair of HTML comments around generated text; everything between them is rewritten:

    <!-- output: poolformer summary s24 --depth 1 -->
    <!-- end output -->

The generated text is a fenced block that starts with `$ poolformer ...` and holds what the command printed
(stdout and stderr, in order) at 80 columns with its output piped, as a user would see it in a narrow terminal.
A word after `output` says where the output comes from:

- `output:` the command runs here. `list`, `summary` and `flops` print the same thing every time, and
  tests/test_docs.py fails when their committed output differs from what they print now.
- `output timed:` the command runs here and times something: a line above the block names this CPU and the
  date.
- `output random-weights:` the command runs here, offline, with random weights standing in for the
  published ones (these docs are generated without network): the output shows the layout, not real classes.
- `output from FILE:` `poolformer bench` rows recorded in a committed results file (a GPU run, say), drawn by
  bench's own table: the rows are those the command would measure, and a line above names the hardware, the
  date and the file.

Commands run in a scratch folder that holds what they need: `img.jpg` and `photos/` (photographs when
scikit-image is installed, else generated pictures), `imagenet/val/` (a tiny ImageNet-style folder),
`poolformer_s12.pth.tar` (a checkpoint with random weights), copies of the repository files the command names
(`benchmarks/results/ci_baseline_cpu.json`), and a torch hub cache with random weights under the published file
names (`workspace` below; tests/test_docs.py uses it too).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterable, Iterator, Optional

ROOT = Path(__file__).resolve().parents[1]
WIDTH = 80
DETERMINISTIC = ("list", "summary", "flops")  # commands whose output is the same on every run and machine
MARKER = re.compile(r"<!-- output(?P<kind>[^:>]*): (?P<command>.+?) -->\n(?P<body>.*?)<!-- end output -->",
                    re.S)
INPUT_OPTIONS = ("--baseline", "--weights", "--class-map", "--labels", "--images")
WEIGHTS_COMMANDS = ("predict", "eval")  # run the published weights unless given --weights


@dataclasses.dataclass
class Block:
    """One output block of a Markdown file. kind: run, timed, random-weights or from; source: from's file."""

    path: Path
    kind: str
    source: Optional[str]
    command: str
    body: str
    start: int  # of the body in the file's text
    end: int

    @property
    def args(self) -> list[str]:
        """The command's arguments after `poolformer`."""
        words = shlex.split(self.command)
        if words[:1] != ["poolformer"]:
            raise ValueError(f"{self.path}: an output block runs `poolformer ...`, not {self.command!r}")
        return words[1:]

    @property
    def deterministic(self) -> bool:
        return self.kind == "run" and self.args[:1] and self.args[0] in DETERMINISTIC


def find_blocks(path: Path, text: Optional[str] = None) -> list[Block]:
    text = path.read_text(encoding="utf-8") if text is None else text
    blocks = []
    for match in MARKER.finditer(text):
        kind, source = match["kind"].strip() or "run", None
        if kind.startswith("from "):
            kind, source = "from", kind[len("from "):].strip()
        if kind not in ("run", "timed", "random-weights", "from"):
            raise ValueError(f"{path}: unknown output kind {kind!r} in <!-- output {kind}: ... -->")
        blocks.append(Block(path, kind, source, match["command"].strip(), match["body"], match.start("body"),
                            match.end("body")))
    return blocks


def markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


# ------------------------------------------------------------------------------------------ workspace


def _photographs() -> list:
    """Three photographs as PIL images: scikit-image's (the tests' dev extra), else generated pictures."""
    from PIL import Image

    try:
        from skimage import data

        return [Image.fromarray(data.chelsea()), Image.fromarray(data.astronaut()), Image.fromarray(data.coffee())]
    except ImportError:
        from poolformer.data import synthetic_images

        return synthetic_images(3)


def _random_weights_file(name: str, path: Path) -> None:
    """The model's official-layout state_dict with seeded random values (every norm, LayerScale and bias
    matters), written where the published file would be cached."""
    import torch

    from poolformer import create_model
    from poolformer.weights import export_state_dict

    model = create_model(name)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.2 + (1.0 if p.ndim == 1 else 0.0))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(export_state_dict(model, "official"), path)


def _option(args: list[str], *names: str, default: Optional[str] = None) -> Optional[str]:
    """The last value given to an option (Click keeps the last), or default."""
    value = default
    for i, word in enumerate(args):
        for name in names:
            if word == name and i + 1 < len(args):
                value = args[i + 1]
            elif word.startswith(name + "="):
                value = word.split("=", 1)[1]
    return value


def weights_needed(args: list[str]) -> list[str]:
    """The models whose published weights the command would download (their cache gets random weights)."""
    if not args or "--weights" in args:
        return []
    if args[0] in WEIGHTS_COMMANDS or (args[0] in ("export", "bench") and "--pretrained" in args):
        if args[0] in WEIGHTS_COMMANDS:
            return [_option(args, "--model", "-m", default="s12")]
        return [next(a for a in args[1:] if not a.startswith("-"))]
    return []


def workspace(folder: Path, commands: Iterable[list[str]]) -> dict[str, str]:
    """Fill `folder` with what the commands need and return the environment variables to run them with:
    photographs, a tiny ImageNet-style folder, the repository files they read, and an offline weights cache
    (TORCH_HOME) holding random weights under the published file names."""
    from poolformer.labels import imagenet_wnids
    from poolformer.zoo import get_spec

    folder.mkdir(parents=True, exist_ok=True)
    photos = _photographs()
    if not (folder / "img.jpg").exists():
        photos[0].save(folder / "img.jpg", quality=90)
        (folder / "photos").mkdir(exist_ok=True)
        for name, photo in zip(("chelsea.jpg", "astronaut.jpg", "coffee.jpg"), photos):
            photo.save(folder / "photos" / name, quality=90)
        wnids = imagenet_wnids()
        for index, photo in ((281, photos[0]), (967, photos[2])):  # tabby cat, espresso
            for copy, size in enumerate((256, 320)):
                target = folder / "imagenet" / "val" / wnids[index] / f"ILSVRC2012_val_{index:04d}{copy}.JPEG"
                target.parent.mkdir(parents=True, exist_ok=True)
                photo.resize((size, size)).save(target, quality=90)
    if not (folder / "poolformer_s12.pth.tar").exists():  # a checkpoint of your own, for --weights
        _random_weights_file("s12", folder / "poolformer_s12.pth.tar")
    env = {"TORCH_HOME": str(folder / "torch"), "HF_HUB_OFFLINE": "1", "POOLFORMER_OFFLINE": "1"}
    for args in commands:
        for word in args:  # repository files the command reads: copied, so writing never touches the repository
            if "/" in word and not word.startswith("-") and (ROOT / word).is_file() and not (folder / word).exists():
                (folder / word).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(ROOT / word, folder / word)
        for name in weights_needed(args):
            spec = get_spec(name)
            cached = folder / "torch" / "hub" / "checkpoints" / Path(spec.url).name
            if not cached.exists():
                _random_weights_file(spec.name, cached)
    return env


# ------------------------------------------------------------------------------------------ running


def _run(argv: list[str], cwd: Path, env: dict[str, str], timeout: int = 1800) -> tuple[str, int]:
    """A command's stdout and stderr together, as a user with a piped, 80-column terminal sees them."""
    environment = dict(os.environ, **env, COLUMNS=str(WIDTH), PYTHONPATH=os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    for name in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):
        environment.pop(name, None)
    done = subprocess.run(argv, cwd=cwd, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=timeout)
    return done.stdout, done.returncode


def command_output(args: list[str], cwd: Path, env: dict[str, str]) -> tuple[str, int]:
    return _run([sys.executable, "-m", "poolformer_cli", *args], cwd, env)


def shown_command(command: str) -> str:
    """`$ command`, broken with backslashes before options where it would pass the width."""
    lines, line = [], "$"
    words = shlex.split(command)
    for i, word in enumerate(words):
        quoted = shlex.quote(word)
        glue = " " if i == 0 or not (word.startswith("--") and len(line) + len(quoted) + 3 > WIDTH) else None
        if glue is None:
            lines.append(line + " \\")
            line = "    " + quoted
        else:
            line += glue + quoted
    return "\n".join(lines + [line])


def _fence(command: str, output: str, exit_code: int) -> str:
    text = output.strip("\n")  # a progress bar on stderr leaves an empty line behind when piped
    trailer = f"\n(exit code {exit_code})" if exit_code else ""
    return f"```text\n{shown_command(command)}\n{text}{trailer}\n```\n"


def cpu_name() -> str:
    from poolformer.capabilities import cpu_capabilities

    return f"{cpu_capabilities().summary()}, {os.cpu_count()} cores"


def render(block: Block, cwd: Path, env: dict[str, str]) -> str:
    """The block's new body."""
    if block.kind == "from":
        return render_results(block, cwd, env)
    output, code = command_output(block.args, cwd, env)
    if code not in (0, 1):  # 1 is a documented outcome (an image that failed, a regression); 2 is a bad command
        raise RuntimeError(f"{block.path.name}: `{block.command}` exited {code}:\n{output}")
    caption = ""
    if block.kind == "timed":
        load = f" (load average {os.getloadavg()[0]:.1f})" if hasattr(os, "getloadavg") else ""
        caption = (f"Measured by `python docs/generate.py` on {cpu_name()}{load}, {_dt.date.today().isoformat()}: "
                   "times differ from machine to machine and run to run.\n\n")
    elif block.kind == "random-weights":
        caption = ("Generated offline, with random weights in the place of the published ones: the classes "
                   "are meaningless here, the layout is what you get.\n\n")
    return caption + _fence(block.command, output, code)


# ------------------------------------------------------------------------------------------ results files


def _rows(document) -> Iterator[dict]:
    """Every bench row (BenchResult.to_row) anywhere in a results document."""
    if isinstance(document, dict):
        if {"model", "impl", "batch_size", "status", "latency_ms"} <= document.keys():
            yield document
            return
        for value in document.values():
            yield from _rows(value)
    elif isinstance(document, list):
        for value in document:
            yield from _rows(value)


def bench_rows(args: list[str], document: dict) -> list[dict]:
    """The rows of `document` that `poolformer bench ARGS` would measure, in the order it measures them."""
    import typer.main

    from poolformer.zoo import get_spec
    from poolformer_cli.app import app
    from poolformer_cli.common import resolve_models

    command = typer.main.get_command(app).commands["bench"]
    params = command.make_context("bench", list(args[1:])).params
    models = resolve_models(params["models"] or ["s12"])
    impls = params["impl"].split(",")
    precisions = params["precision"].split(",")
    batches = [int(b) for b in params["batch_sizes"].split(",")]
    resolutions = [int(r) for r in params["resolutions"].split(",")]
    wanted = {}
    for row in _rows(document):
        key = (get_spec(row["model"]).name, row["impl"], row["precision"], row["resolution"], row["batch_size"])
        if (key[0] in models and key[1] in impls and key[2] in precisions and key[3] in resolutions
                and key[4] in batches and row["channels_last"] == params["channels_last"]
                and row["compile"] == params["compile"] and row.get("cast", False) == params["cast_model"]):
            wanted.setdefault(key, row)
    order = (lambda key: (models.index(key[0]), impls.index(key[1]), precisions.index(key[2]),
                          resolutions.index(key[3]), batches.index(key[4])))
    return [wanted[key] for key in sorted(wanted, key=order)]


def result_from_row(row: dict):
    """A BenchResult back from its JSON row, for bench's own table."""
    from poolformer.bench import BenchConfig, BenchResult, LatencyStats, Parity

    config = BenchConfig(**{f.name: row[f.name] for f in dataclasses.fields(BenchConfig) if f.name in row})
    latency = row.get("latency_ms") or {}
    stats = (LatencyStats(**{k: latency[k] for k in ("median", "p90", "iqr", "mean", "min")})
             if latency.get("median") is not None else None)
    simple = {f.name: row[f.name] for f in dataclasses.fields(BenchResult)
              if f.name in row and f.name not in ("config", "latency_ms", "parity")}
    return BenchResult(config=config, latency_ms=stats, steps_ms=latency.get("steps", []),
                       parity=Parity(**row["parity"]) if row.get("parity") else None, **simple)


def _print_results_file(source: str, args: list[str]) -> None:
    """(Run in a child process, at 80 columns.) Bench's table of the rows of `source` that ARGS measures."""
    from poolformer_cli.bench import _hardware, _print_results

    document = json.loads((ROOT / source).read_text())
    rows = bench_rows(args, document)
    if not rows:
        raise SystemExit(f"{source} has no rows that `poolformer {' '.join(args)}` would measure")
    env = document.get("env", {})
    _print_results([result_from_row(r) for r in rows], "--normalised" in args, _hardware(env),
                   (env.get("gpu") or {}).get("memory_bandwidth_tb_s"))


def render_results(block: Block, cwd: Path, env: dict[str, str]) -> str:
    document = json.loads((ROOT / block.source).read_text())
    argv = [sys.executable, str(Path(__file__).resolve()), "--print-results", block.source, "--", *block.args]
    output, code = _run(argv, cwd, env)
    if code:
        raise RuntimeError(f"{block.path.name}: rendering {block.source} failed:\n{output}")
    recorded = document.get("env", {})
    hardware = recorded.get("device_name") or (recorded.get("cpu") or {}).get("summary") or "?"
    date = str(recorded.get("date", "?"))[:10]
    script = document.get("command", "").split(" --out")[0].replace("PYTHONPATH=. ", "")
    how = f" by `{script}`" if script else ""
    caption = (f"Recorded on one {hardware} on {date}{how} (torch {recorded.get('torch', '?')}); "
               f"the rows from [`{block.source}`]({os.path.relpath(ROOT / block.source, block.path.parent)}), "
               "drawn by bench's own table.\n\n")
    return caption + _fence(block.command, output, 0)


# ------------------------------------------------------------------------------------------ pictures

GPU_RESULTS = "benchmarks/results/gpu/h200_run4_fast_gpu.json"
CPU_RESULTS = "benchmarks/results/runtimes_cpu_avx512_bf16.json"


def headline_numbers() -> dict[str, dict[str, dict[str, float]]]:
    """panel -> group -> bar -> img/s, read from the committed results files."""
    gpu = json.loads((ROOT / GPU_RESULTS).read_text())
    cpu = json.loads((ROOT / CPU_RESULTS).read_text())
    gpu_panel = {}
    for model, entry in gpu["throughput"].items():
        rows = entry["rows"]
        gpu_panel[model] = {"timm eager": max(rows["timm eager"]["throughput"], rows["timm eager NCHW"]["throughput"]),
                            "--impl fast": rows["fast"]["throughput"]}
    cpu_panel = {}
    for row in cpu["batches"]:
        if row["batch_size"] == 16:
            rates = row["img_s"]
            cpu_panel[f"s12 {row['precision']}"] = {"timm compiled": rates["timm compiled"],
                                                    "OpenVINO": rates["openvino/convert-model"],
                                                    "--impl fast": rates["fast"]}
    cores = cpu["env"].get("threads") or cpu["env"].get("cpu_count")
    return {f"{gpu['env']['device_name']}, bf16, batch 256 ({gpu['env']['date'][:10]})": gpu_panel,
            f"{cores}-core {(cpu['env'].get('cpu') or {}).get('model') or 'CPU'}, AVX512-BF16, batch 16 ({cpu['env']['date'][:10]})":
                cpu_panel}


def draw_headline(path: Path) -> None:
    """Grouped bars of img/s: timm against --impl fast on the GPU and the CPU results files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = headline_numbers()
    colours = {"timm eager": "#9e9e9e", "timm compiled": "#9e9e9e", "OpenVINO": "#7aa6c2", "--impl fast": "#d1495b"}
    figure, axes = plt.subplots(1, len(panels), figsize=(10, 3.6))
    for ax, (title, groups) in zip(axes, panels.items()):
        bars = list(dict.fromkeys(name for group in groups.values() for name in group))
        width = 0.8 / len(bars)
        for i, bar in enumerate(bars):
            xs = [g + (i - (len(bars) - 1) / 2) * width for g in range(len(groups))]
            values = [group.get(bar, 0.0) for group in groups.values()]
            drawn = ax.bar(xs, values, width, label=bar + (" (best memory format)" if bar == "timm eager" else ""), color=colours.get(bar, "#555555"))
            ax.bar_label(drawn, labels=[f"{v:,.0f}" if v >= 1000 else f"{v:.1f}" for v in values], fontsize=8, padding=2)
        ax.set_xticks(range(len(groups)), list(groups))
        ax.set_title(title, fontsize=10)
        ax.set_ylabel("images / s (higher is better)")
        ax.margins(y=0.15)
        ax.legend(fontsize=8, frameon=False, loc="upper left")
        ax.spines[["top", "right"]].set_visible(False)
    figure.tight_layout()
    figure.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(figure)


# ------------------------------------------------------------------------------------------ main


def regenerate(paths: list[Path], check: bool = False, only: Optional[str] = None) -> list[str]:
    """Rewrite the output blocks of `paths` (check: only compare the deterministic ones, write nothing);
    returns the problems found (with check: blocks whose committed output is out of date). Each file is read
    again just before it is written, so editing other parts of it meanwhile is safe."""
    chosen = (lambda b: (only is None or only in b.command) and (not check or b.deterministic))
    problems = []
    with tempfile.TemporaryDirectory(prefix="poolformer-docs-") as scratch:
        cwd = Path(scratch)
        env = workspace(cwd, [b.args for path in paths for b in find_blocks(path) if chosen(b)])
        for path in paths:
            bodies = {}
            for block in filter(chosen, find_blocks(path)):
                print(f"{path.relative_to(ROOT)}: {block.command}", file=sys.stderr)
                key = (block.kind, block.source, block.command)
                bodies[key] = render(block, cwd, env)
                if check and bodies[key] != block.body:
                    problems.append(f"{path.relative_to(ROOT)}: the output of `{block.command}` changed; run "
                                    "python docs/generate.py")
            if check or not bodies:
                continue
            text = path.read_text(encoding="utf-8")
            for block in reversed(find_blocks(path, text)):  # from the end, so earlier offsets stay valid
                body = bodies.get((block.kind, block.source, block.command))
                if body is not None:
                    text = text[:block.start] + body + text[block.end:]
            path.write_text(text, encoding="utf-8")
    return problems


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--print-results"]:  # the child process of render_results: FILE -- bench ARGS
        _print_results_file(argv[1], argv[3:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="*", type=Path, help="Markdown files (default: README.md and docs/).")
    parser.add_argument("--check", action="store_true", help="Compare the deterministic outputs; write nothing.")
    parser.add_argument("--only", help="Only blocks whose command contains this text.")
    options = parser.parse_args(argv)
    paths = [p.resolve() for p in options.files] or markdown_files()
    if not options.check and not options.files and options.only is None:
        draw_headline(ROOT / "docs" / "images" / "headline.png")
    problems = regenerate(paths, check=options.check, only=options.only)
    for line in problems:
        print(line, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
