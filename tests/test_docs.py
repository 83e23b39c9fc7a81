"""The documentation cannot rot.

Every `poolformer ...` command shown in README.md and docs/ (fenced shell blocks: `$ poolformer ...` prompt lines,
or plain `poolformer ...` lines in blocks without prompts) and in the examples/ workflow must parse, with every
option it names, and must run: at a small size where the one shown is slow (later options win in Click, so a
few are appended), in a scratch folder that holds what the commands need (docs/generate.py's `workspace`).
The options listed in each command page's synopsis and option table must exist. The example outputs, written
by docs/generate.py, must be well formed, and those of deterministic commands must equal what the commands
print now: a change to a table means running `python docs/generate.py`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import shlex
import sys
from pathlib import Path
from typing import Iterator

import click
import pytest
import typer.main
from typer.testing import CliRunner

from poolformer_cli.app import COMMANDS, app

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / "examples" / "github-actions" / "poolformer-bench.yml"
SHELL = {"", "text", "bash", "sh", "shell", "console"}  # fenced blocks whose lines are commands
FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```", re.M | re.S)
CLICK = typer.main.get_command(app)


def _load_generator():
    spec = importlib.util.spec_from_file_location("docs_generate", ROOT / "docs" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


generate = _load_generator()


@dataclasses.dataclass(frozen=True)
class Shown:
    """A command as the documentation shows it: where, and its arguments after `poolformer`."""

    where: str
    args: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.where}: poolformer {shlex.join(self.args)}"


def _logical_lines(text: str) -> Iterator[tuple[int, str]]:
    """(line number, line) with backslash continuations joined."""
    pending, start = "", 0
    for number, line in enumerate(text.splitlines(), 1):
        if not pending:
            start = number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        yield start, pending + line
        pending = ""
    if pending:
        yield start, pending


def commands_in(line: str) -> Iterator[tuple[str, ...]]:
    """The poolformer commands of one shell line: `poolformer ...` or `... -m poolformer_cli ...`, after
    environment assignments, in each part of a `&&` / `||` / `;` / `|` chain; comments dropped."""
    if not re.search(r"(?:^|\s)(?:poolformer|-m poolformer_cli)(?:\s|$)", line):
        return  # prose, a file tree, output: nothing to run
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    part: list[str] = []
    for word in [*lexer, ";"]:
        if word and set(word) <= set(";&|"):
            while part and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", part[0]):
                part.pop(0)
            if part[:1] == ["poolformer"]:
                yield tuple(part[1:])
            elif "poolformer_cli" in part and part[part.index("poolformer_cli") - 1] == "-m":
                yield tuple(part[part.index("poolformer_cli") + 1:])
            part = []
        else:
            part.append(word)


def commands_in_markdown(text: str, name: str) -> list[Shown]:
    found = []
    for fence in FENCE.finditer(text):
        if fence[1] not in SHELL:
            continue
        first = text.count("\n", 0, fence.start(2)) + 1
        lines = list(_logical_lines(fence[2]))
        prompts = any(line.startswith("$ ") for _, line in lines)
        for number, line in lines:
            if prompts and not line.startswith("$ "):
                continue  # a command's output
            for args in commands_in(line.removeprefix("$ ")):
                found.append(Shown(f"{name}:{first + number - 1}", args))
    return found


def _workflow() -> dict:
    yaml = pytest.importorskip("yaml")
    return yaml.safe_load(WORKFLOW.read_text(encoding="utf-8"))


def commands_in_workflow() -> list[Shown]:
    found = []
    for job_name, job in _workflow()["jobs"].items():
        for step in job["steps"]:
            for _, line in _logical_lines(step.get("run", "")):
                found += [Shown(f"{WORKFLOW.relative_to(ROOT)}:{job_name}", args) for args in commands_in(line)]
    return found


def documented() -> list[Shown]:
    return [shown for path in generate.markdown_files()
            for shown in commands_in_markdown(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))] + \
        commands_in_workflow()


DOCUMENTED = documented()


def test_the_docs_show_every_command():
    shown = {s.args[0] for s in DOCUMENTED if s.args}
    assert set(COMMANDS) <= shown, f"commands never shown in the docs: {sorted(set(COMMANDS) - shown)}"
    assert len(DOCUMENTED) > 40
    pages = {p.stem for p in (ROOT / "docs" / "commands").glob("*.md")}
    assert set(COMMANDS) <= pages, f"commands without a page in docs/commands: {sorted(set(COMMANDS) - pages)}"


def test_the_collector_reads_shell_lines_as_a_user_would():
    assert list(commands_in('pip install -e ".[dev]" && poolformer summary s24     # install')) == [("summary", "s24")]
    assert list(commands_in("OMP_NUM_THREADS=1 torchrun --nproc-per-node 2 -m poolformer_cli eval data --json")) == \
        [("eval", "data", "--json")]
    assert list(commands_in("poolformer list 'v2_*' | head")) == [("list", "v2_*")]
    assert list(commands_in("cat bench.md >> $GITHUB_STEP_SUMMARY")) == []
    block = "x\n```text\n$ poolformer bench s12 \\\n    --iters 3\npoolformer bench on cpu (output)\n```\n"
    assert [s.args for s in commands_in_markdown(block, "x.md")] == [("bench", "s12", "--iters", "3")]
    assert commands_in_markdown("```usage\npoolformer list [PATTERN ...]\n```\n", "x.md") == []
    assert commands_in_markdown("```python\npoolformer.list_models()\n```\n", "x.md") == []


# ---------------------------------------------------------------------------------- options exist


@pytest.mark.parametrize("shown", DOCUMENTED, ids=str)
def test_documented_command_parses(shown):
    """Every option a documented command names exists and takes the value shown."""
    args = list(shown.args)
    if not args or args[0].startswith("-"):  # poolformer --help / --version
        assert set(args) <= {"--help", "-h", "--version"}, shown
        return
    assert args[0] in CLICK.commands, f"{shown}: no command {args[0]!r}"
    command = CLICK.commands[args[0]]
    try:
        command.make_context(args[0], args[1:])
    except click.ClickException as err:
        pytest.fail(f"{shown}: {err.format_message()}")


def _options(command: click.Command) -> set[str]:
    return {opt for param in command.params for opt in (*param.opts, *param.secondary_opts) if opt.startswith("-")}


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_command_pages_list_only_real_options(name):
    """The synopsis (a ```usage block) and the option table of docs/commands/NAME.md name existing options,
    and the table lists every option the command has."""
    text = (ROOT / "docs" / "commands" / f"{name}.md").read_text(encoding="utf-8")
    command = CLICK.commands[name]
    real = _options(command) - {"--help", "-h"}
    primary = {opt for param in command.params for opt in param.opts if opt.startswith("-")} - {"--help", "-h"}
    usage = [f[2] for f in FENCE.finditer(text) if f[1] == "usage"]
    assert usage, f"docs/commands/{name}.md has no ```usage block"
    in_usage = set(re.findall(r"(?<![\w-])(--?[a-z][\w-]*)", "".join(usage)))
    table = [line.split("|")[1] for line in text.splitlines() if line.startswith("| `-")]
    in_table = {opt for cell in table for opt in re.findall(r"`(--?[a-z][\w-]*)", cell)}
    in_table |= {opt for cell in table for opt in re.findall(r"(?<=/ )`?(--?[a-z][\w-]*)", cell)}
    assert in_usage <= real, f"{name}: the synopsis names options that do not exist: {sorted(in_usage - real)}"
    assert in_table <= real, f"{name}: the option table names options that do not exist: {sorted(in_table - real)}"
    assert primary <= in_table, f"{name}: options missing from the table: {sorted(primary - in_table)}"


def test_the_bench_page_lists_the_csv_columns_in_order():
    from poolformer_cli.bench import CSV_COLUMNS

    text = (ROOT / "docs" / "commands" / "bench.md").read_text(encoding="utf-8")
    listed = " ".join(text.split("The CSV (`--csv`) has one line per row, the nested fields flattened: `", 1)[1]
                      .split("`", 1)[0].split())
    assert listed.split(", ") == list(CSV_COLUMNS)


# ---------------------------------------------------------------------------------- project layout


def layout_paths() -> set[str]:
    """The files and folders the project layout in docs/architecture.md names, as paths from the repository root:
    the first column of each line, several names separated by ", ", nested by two-space indents."""
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    block = text.split("## Project layout", 1)[1].split("```text\n", 1)[1].split("```", 1)[0]
    paths, parents = set(), []
    for line in block.splitlines():
        depth = (len(line) - len(line.lstrip(" "))) // 2
        first = re.split(r"\s{2,}", line.strip())[0]
        names = [n for n in first.split(", ") if n.endswith((".py", "/")) or "." in n]
        del parents[depth:]
        for n in names:
            paths.add("/".join([*parents, n.rstrip("/")]))
        folders = [n.rstrip("/") for n in names if n.endswith("/")]
        if folders:
            parents.append(folders[0])
    return paths


def test_the_project_layout_names_every_module_and_nothing_that_is_gone():
    """docs/architecture.md's layout lists every module and subpackage of the library and every CLI module that
    is not a command's own; and whatever it lists exists."""
    listed = layout_paths()
    gone = sorted(p for p in listed if not (ROOT / p).exists())
    assert not gone, f"docs/architecture.md lists paths that do not exist: {gone}"
    commands = {sys.modules[f.__module__].__file__ for f in COMMANDS.values()}
    wanted = set()
    for package in ("poolformer", "poolformer_cli"):
        for path in (ROOT / package).rglob("*.py"):
            if path.name in ("__init__.py", "__main__.py") or str(path) in commands:
                continue
            wanted.add(path.relative_to(ROOT).as_posix())
        wanted |= {i.parent.relative_to(ROOT).as_posix() for i in (ROOT / package).rglob("*/__init__.py")}
    missing = sorted(wanted - listed)
    assert not missing, f"docs/architecture.md's project layout does not list: {missing}"


# ---------------------------------------------------------------------------------- commands run

SLOW_COMMANDS = {"bench", "profile", "compare", "export", "predict", "eval", "flops"}


MODELS_SHOWN = 3  # compare runs the first models and the first timm peer it is given (model names: below)


def positionals(name: str, args: list[str]) -> tuple[list[str], list[str]]:
    """(the positional arguments, the options with their values) of `poolformer NAME ARGS`."""
    options = {opt: param for param in CLICK.commands[name].params for opt in (*param.opts, *param.secondary_opts)}
    found, rest, i = [], [], 0
    while i < len(args):
        param = options.get(args[i].split("=")[0])
        if param is None:
            found.append(args[i])
            i += 1
        else:
            takes = 0 if getattr(param, "is_flag", False) or "=" in args[i] else 1
            rest += args[i:i + 1 + takes]
            i += 1 + takes
    return found, rest


def small(args: list[str]) -> list[str]:
    """The command at a small size: options that make it slow are dropped or overridden (Click keeps the last
    value of an option given twice), and it runs on the CPU."""
    if args[0] == "compare":  # every name is resolved in test_documented_model_names_exist; a few are built here
        from poolformer_cli.common import resolve_models

        models, options = positionals("compare", args[1:])
        ours = resolve_models([m for m in models if not m.startswith("timm:")] or ["s12"])
        peers = [m for m in models if m.startswith("timm:")]
        args = ["compare", *ours[:MODELS_SHOWN - 1], *resolve_models(peers)[:1], *options]
    name, rest, out = args[0], args[1:], [args[0]]
    drop = {"--min-time": 1, "--max-batch": 0, "--compile": 0, "--compile-mode": 1, "--compile-backend": 1,
            "--device": 1, "--retries": 1}
    i = 0
    while i < len(rest):
        if rest[i] in drop and name in ("bench", "profile", "compare", "predict", "eval"):
            i += 1 + drop[rest[i]]
            continue
        out.append(rest[i])
        i += 1
    if name == "bench":
        baseline = out[out.index("--baseline") + 1] if "--baseline" in out else None
        if baseline and (ROOT / baseline).is_file():  # a committed baseline: measure its configuration briefly
            out += ["--warmup", "1", "--iters", "5"]
        else:
            out += ["--warmup", "0", "--iters", "2", "--batch-sizes", "1", "--resolutions", "64"]
        out += ["--device", "cpu"] + (["--max-regression", "99"] if baseline else [])  # options, not speed
    elif name == "profile":
        out += ["--device", "cpu", "--warmup", "0", "--steps", "1", "--batch-size", "1", "--resolution", "64"]
    elif name == "compare":
        out += ["--device", "cpu", "--warmup", "0", "--iters", "1", "--batch-size", "1", "--resolution", "64"]
    elif name in ("predict", "eval"):
        out += ["--device", "cpu", "--batch-size", "2"] + (["--workers", "0", "--no-progress"] if name == "eval" else [])
    elif name == "export":
        out += ["--resolution", "64"]
    elif name == "flops":  # four counters per model and size: one small size
        out += ["--resolution", "64"]
    elif name == "summary":
        out += ["--resolution", "64"]
    return out


MODEL_ARGUMENTS = {"list": "patterns", "summary": "models", "flops": "models", "bench": "models",
                   "compare": "models", "profile": "model", "export": "model", "predict": "model", "eval": "model"}


@pytest.mark.parametrize("shown", [s for s in DOCUMENTED if s.args and s.args[0] in MODEL_ARGUMENTS], ids=str)
def test_documented_model_names_exist(shown):
    """Every model name, alias, pattern and timm peer a documented command names resolves."""
    from poolformer_cli.common import resolve_models

    params = CLICK.commands[shown.args[0]].make_context(shown.args[0], list(shown.args[1:])).params
    names = params[MODEL_ARGUMENTS[shown.args[0]]] or []
    names = [names] if isinstance(names, str) else list(names)
    try:
        assert not names or resolve_models(names, peers=shown.args[0] != "list")
    except click.exceptions.Exit:
        pytest.fail(f"{shown}: a model it names does not exist")


def test_small_variants_override_what_is_slow():
    assert small(["bench", "s12", "--device", "cuda", "--min-time", "2", "--batch-sizes", "256"]) == [
        "bench", "s12", "--batch-sizes", "256", "--warmup", "0", "--iters", "2", "--batch-sizes", "1",
        "--resolutions", "64", "--device", "cpu"]
    assert small(["flops", "s12", "--resolution", "224,448"])[-2:] == ["--resolution", "64"]
    compare = small(["compare", "poolformer_s*", "v2_s12", "timm:resnet50", "timm:resnet18", "--device", "cuda",
                     "--no-measure", "--csv", "x.csv"])
    assert compare[:4] == ["compare", "poolformer_s12", "poolformer_s24", "timm:resnet50"]
    assert compare[4:7] == ["--no-measure", "--csv", "x.csv"]


def _expected_exit(shown: Shown) -> int:
    """1 where the documentation shows the command failing on purpose (`(exit code 1)` under its output)."""
    for path in generate.markdown_files():
        for block in generate.find_blocks(path):
            if tuple(block.args) == shown.args and "(exit code 1)" in block.body:
                return 1
    return 0


@pytest.fixture(scope="module")
def docs_workspace(tmp_path_factory):
    folder = tmp_path_factory.mktemp("docs_workspace")
    return folder, generate.workspace(folder, [list(s.args) for s in DOCUMENTED if s.args])


def _invoke(args: list[str]):
    import torch

    threads = torch.get_num_threads()
    try:
        return CliRunner().invoke(app, args)
    finally:
        torch.set_num_threads(threads)  # --threads would slow every later test in this process


def _make_inputs(args: tuple[str, ...], folder: Path) -> None:
    """Files a command reads that an earlier documented command writes (`bench --weights s12.onnx` after
    `export --output s12.onnx`): made by that command first, when this one runs on its own."""
    for option, value in zip(args, args[1:]):
        if option in generate.INPUT_OPTIONS and not (folder / value).exists():
            for maker in DOCUMENTED:
                if {"--output", "-o"} & set(maker.args) and value in maker.args and maker.args != args:
                    _invoke(small(list(maker.args)))
                    break


def _run(shown: Shown, workspace, monkeypatch) -> None:
    folder, env = workspace
    monkeypatch.chdir(folder)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    if "--kernels" in shown.args:  # the Triton kernels on the CPU: the interpreter (conftest), asked for by name
        monkeypatch.setenv("POOLFORMER_FAST_BACKEND", "triton")
    _make_inputs(shown.args, folder)
    args = small(list(shown.args)) if shown.args and not shown.args[0].startswith("-") else list(shown.args)
    result = _invoke(args)
    expected = _expected_exit(shown)
    assert result.exit_code == expected, (f"{shown}\nran as: poolformer {shlex.join(args)}\n"
                                          f"exit {result.exit_code}\n{result.output[-3000:]}")
    assert "Traceback" not in result.output


RUNS = list({s.args: s for s in DOCUMENTED[::-1]}.values())  # each command once, where it is first shown ...
RUNS.sort(key=DOCUMENTED.index)  # ... in the order shown: a command may read the file an earlier one wrote
QUICK = [s for s in RUNS if not s.args or s.args[0] not in SLOW_COMMANDS]
SLOW = [s for s in RUNS if s.args and s.args[0] in SLOW_COMMANDS]


@pytest.mark.parametrize("shown", QUICK, ids=str)
def test_documented_command_runs(shown, docs_workspace, monkeypatch):
    _run(shown, docs_workspace, monkeypatch)


@pytest.mark.slow
@pytest.mark.parametrize("shown", SLOW, ids=str)
def test_documented_slow_command_runs_at_a_small_size(shown, docs_workspace, monkeypatch):
    _run(shown, docs_workspace, monkeypatch)


# ---------------------------------------------------------------------------------- the workflow


def test_workflow_is_a_github_actions_workflow():
    workflow = _workflow()
    triggers = workflow.get("on", workflow.get(True))  # YAML 1.1 reads a bare `on` as true
    assert {"pull_request", "push"} <= set(triggers)
    steps = workflow["jobs"]["bench"]["steps"]
    assert all(("uses" in step) != ("run" in step) for step in steps), "a step either uses an action or runs"
    runs = " ".join(step.get("run", "") for step in steps)
    assert "pip install" in runs
    gate = [s.args for s in commands_in_workflow() if s.args[:1] == ("bench",)]
    assert gate and all(option in gate[0] for option in ("--baseline", "--max-regression", "--normalised",
                                                           "--markdown", "--github-benchmark", "--output"))
    baseline = gate[0][gate[0].index("--baseline") + 1]
    assert (ROOT / baseline).is_file(), f"the workflow's baseline {baseline} is not in the repository"
    uploads = [step for step in steps if str(step.get("uses", "")).startswith("actions/upload-artifact")]
    assert uploads and "bench.md" in uploads[0]["with"]["path"]


# ---------------------------------------------------------------------------------- generated outputs

BLOCKS = [b for path in generate.markdown_files() for b in generate.find_blocks(path)]


def test_output_markers_are_paired():
    for path in generate.markdown_files():
        text = path.read_text(encoding="utf-8")
        openers = len(re.findall(r"<!-- output[^>]*-->", text))
        closers = text.count("<!-- end output -->")
        assert openers == closers == len(generate.find_blocks(path)), f"{path}: unpaired output markers"
    assert len(BLOCKS) >= 10


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: f"{b.path.relative_to(ROOT)}: {b.command}")
def test_output_block_is_well_formed(block):
    """A caption where the kind needs one, then one fenced block that starts with the marker's own command."""
    fence = re.fullmatch(r"(?P<caption>(?:[^`\n][^\n]*\n)*\n?)```text\n(?P<inside>.*)```\n", block.body, re.S)
    assert fence, f"{block.command}: not generated (run python docs/generate.py) or edited by hand"
    lines = dict(_logical_lines(fence["inside"]))
    assert shlex.split(lines[1].removeprefix("$ ")) == shlex.split(block.command), "the block shows another command"
    assert len(fence["inside"].splitlines()) > 1, "no output"
    caption = fence["caption"]
    assert bool(caption.strip()) == (block.kind != "run"), f"{block.kind} output needs a caption saying where it is from"
    if block.kind == "from":
        assert (ROOT / block.source).is_file() and block.source in caption
        assert re.search(r"\d{4}-\d\d-\d\d", caption), "a recorded output names its date"
    if block.kind == "timed":
        assert "core" in caption and re.search(r"\d{4}-\d\d-\d\d", caption)
    assert block.deterministic == (block.kind == "run" and block.args[0] in generate.DETERMINISTIC)


DETERMINISTIC = [b for b in BLOCKS if b.deterministic]


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.parametrize("block", DETERMINISTIC, ids=lambda b: f"{b.path.relative_to(ROOT)}: {b.command}")
def test_deterministic_output_is_what_the_command_prints_now(block, docs_workspace):
    folder, env = docs_workspace
    assert generate.render(block, folder, env) == block.body, (
        f"{block.path.relative_to(ROOT)}: `{block.command}` prints something else now; run python docs/generate.py")


# ---------------------------------------------------------------------------------- links

WRITTEN_ELSEWHERE = {"docs/development.md"}  # another change adds it; until then a link to it may dangle
LINK = re.compile(r"\]\((?!https?://|mailto:)([^)\s]+)\)")


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    return {_slug(h) for h in re.findall(r"^#+ (.+)$", text, re.M)}


@pytest.mark.parametrize("path", generate.markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_links_point_at_files_and_headings_that_exist(path):
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    for link in LINK.findall(text):
        target, _, anchor = link.partition("#")
        file = (path.parent / target).resolve() if target else path
        if str(file.relative_to(ROOT)) in WRITTEN_ELSEWHERE and not file.exists():
            continue
        assert file.exists(), f"{path.relative_to(ROOT)}: the link {link} points at nothing"
        if anchor and file.suffix == ".md":
            assert anchor in _anchors(file), f"{path.relative_to(ROOT)}: no heading #{anchor} in {target or path.name}"
