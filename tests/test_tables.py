"""poolformer_cli.tables, and every command's tables at 60, 80 and 120 columns and piped: no number cut
short, no ellipsis, no line wider than the console, and the name of every row whole.

Each command runs for real on its first width; the slow library calls it makes (counting, measuring,
exporting) are replayed on the other widths, so the rendering is what these tests spend their time on.
"""

from __future__ import annotations

import io
import os
import re
import types

import numpy as np
import pytest
import torch
from PIL import Image
from rich.cells import cell_len
from rich.console import Console
from typer.testing import CliRunner

from poolformer_cli import common
from poolformer_cli.app import app
from poolformer_cli.common import human, short_model_name
from poolformer_cli.tables import count, name, number, print_table, prose, shared_words, without_words

runner = CliRunner()
WIDTHS = [60, 80, 120, None]  # None: piped with no COLUMNS, where Rich assumes 80
WIDTH_IDS = ["60", "80", "120", "piped"]


# ------------------------------------------------------------------------------------------ the mechanism


def _render(columns, rows, width: int, **kwargs) -> str:
    out = Console(width=width, record=True, file=io.StringIO())
    print_table(columns, rows, out=out, **kwargs)
    return out.export_text()


ROWS = [("stages.0.blocks.0", 102_760_448, 33_472, "a description that runs on for quite a few words"),
        ("head.fc", 512_000, 513_000, "short")]
COLUMNS = [name("layer", lambda r: r[0]), count("MACs", lambda r: r[1]), count("params", lambda r: r[2]),
           prose("notes", lambda r: r[3], priority=2)]


def test_a_wide_console_shows_exact_figures_in_the_declared_frame():
    text = _render(COLUMNS, ROWS, 120)
    assert "102,760,448" in text and "33,472" in text and "┏" in text
    assert "a description that runs on for quite a few words" in text


def test_narrower_consoles_give_up_frame_then_precision_then_columns_least_important_first():
    text = _render(COLUMNS, ROWS, 60)
    assert "┏" not in text and "102,760,448" in text and "33.47K" in text  # params (right) gives way first
    text = _render(COLUMNS, ROWS, 50)
    assert "102.8M" in text and "33.47K" in text and "notes" in text  # prose wraps before it is left out
    text = _render(COLUMNS, ROWS, 36)
    assert "notes" not in text.splitlines()[0]
    assert "not shown at 36 columns: notes (all columns fit in 55)" in " ".join(text.split())
    for width in (120, 60, 50, 36):
        assert "stages.0.blocks.0" in _render(COLUMNS, ROWS, width)


def test_a_console_too_narrow_for_any_layout_gets_a_wider_table_not_a_cut_one():
    text = _render(COLUMNS, ROWS, 12)
    assert "…" not in text and "stages.0.blocks.0" in text and "102.8M" in text


def test_prose_wraps_between_words_and_headers_wrap_too():
    columns = [name("model", lambda r: r), number("published MACs@224", lambda r: "1.823G"),
               prose("what", lambda r: "every arithmetic operation, 1 MAC = 2 ops")]
    text = _render(columns, ["poolformer_s12"], 44)
    assert "…" not in text and "poolformer_s12" in text and "1.823G" in text
    assert all(cell_len(line) <= 44 for line in text.splitlines())
    words = " ".join(text.split())
    for word in "every arithmetic operation, 1 MAC = 2 ops published MACs@224".split():
        assert word in words


def test_human_keeps_four_significant_digits_in_six_characters():
    assert [human(n) for n in (None, 0, 512, 999.96, 9_999.6, 802_816, 102_760_448, 1_822_580_736, -162_816)] == [
        "-", "0", "512", "1.000K", "10.00K", "802.8K", "102.8M", "1.823G", "-162.8K"]
    assert human(802_816, "B") == "802.8KB" and human(999_996) == "1.000M"


def test_shared_words_move_to_the_title():
    labels = ["s12/ours bs1 224px fp32", "s12/ours bs32 224px fp32 CL", "s24/ours bs1 224px fp32"]
    assert shared_words(labels) == ["224px", "fp32"]
    assert [without_words(label, ["224px", "fp32"]) for label in labels] == [
        "s12/ours bs1", "s12/ours bs32 CL", "s24/ours bs1"]
    assert shared_words(["s12/ours bs1 224px"]) == ["bs1", "224px"] and shared_words([]) == []


# ------------------------------------------------------------------------------------------ every command


_REPLAYED: dict = {}
_CALLS: dict = {}  # (case, function) -> calls so far in the current invocation


def _replay(monkeypatch, case: str, module, attr: str, **fixed) -> None:
    """`module.attr` runs for real the first time `case` makes its n-th call and is replayed after; `fixed`
    keyword arguments are forced on the real call."""
    real = getattr(module, attr)

    def replay(*args, **kwargs):
        n = _CALLS[(case, attr)] = _CALLS.get((case, attr), -1) + 1
        key = (case, attr, n)
        if key not in _REPLAYED:
            value = real(*args, **{**kwargs, **fixed})
            _REPLAYED[key] = list(value) if isinstance(value, types.GeneratorType) else value
        return _REPLAYED[key]

    monkeypatch.setattr(module, attr, replay)


def _replayed(case: str, attr: str) -> list:
    """What the replayed calls of `case` returned, in call order."""
    return [_REPLAYED[key] for key in sorted(key for key in _REPLAYED if key[:2] == (case, attr))]


def _invoke(monkeypatch, width, args: list[str]):
    """The CLI as it prints into `width` columns: COLUMNS set, or (None) piped with no COLUMNS."""
    _CALLS.clear()
    for console in (common.console, common.err_console):
        monkeypatch.setattr(console, "_width", None)  # as if made in this environment: read COLUMNS now
    if width is None:
        monkeypatch.delenv("COLUMNS", raising=False)

        def not_a_terminal(fd=None):
            raise OSError("not a terminal")

        monkeypatch.setattr(os, "get_terminal_size", not_a_terminal)
    else:
        monkeypatch.setenv("COLUMNS", str(width))
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return result.stdout


def _whole(text: str, line: str) -> bool:
    return re.search(r"(?<!\S)" + re.escape(text) + r"(?!\S)", line) is not None


def _check(output: str, width, rows: list[tuple[tuple[str, ...], list[tuple[str, ...]]]]) -> None:
    """No ellipsis; no line wider than the console but a single word that cannot be broken (a long path); and
    for each row in turn a later line that holds one of its names whole and, on the same line, one form of
    each of its figures whole."""
    assert "…" not in output, output
    lines = output.splitlines()
    assert all(cell_len(line.rstrip()) <= (width or 80) or " " not in line.strip() for line in lines), output
    at = 0
    for names, figures in rows:
        found = next((i for i in range(at, len(lines)) if any(_whole(n, lines[i]) for n in names)), None)
        assert found is not None, f"no line after {at} names {names} whole:\n{output}"
        for forms in figures:
            assert any(_whole(f, lines[found]) for f in forms), f"{forms} not whole in {lines[found]!r}"
        at = found + 1


def _exact_or_human(n, unit: str = "") -> tuple[str, ...]:
    return (f"{n:,}", human(n, unit)) if isinstance(n, int) else (human(n, unit),)


widths = pytest.mark.parametrize("width", WIDTHS, ids=WIDTH_IDS)


@widths
def test_list(monkeypatch, width):
    from poolformer.catalog import catalog

    output = _invoke(monkeypatch, width, ["list"])
    _check(output, width, [((r.name,), [_exact_or_human(r.params), (human(r.macs),), (f"{r.top1:.1f}",)])
                           for r in catalog()])


@widths
def test_summary(monkeypatch, width):
    from poolformer import summary
    from poolformer_cli.summary import relative_names

    _replay(monkeypatch, "summary", summary, "summarize")
    output = _invoke(monkeypatch, width, ["summary", "s24", "--resolution", "64"])
    result = _replayed("summary", "summarize")[0]
    short = relative_names(result.layers)
    assert short["stages.2.blocks.11"] == "blocks.11" and short["head.fc"] == "fc"
    layers = [((r.name, short[r.name]), [_exact_or_human(r.params), _exact_or_human(r.macs)]) for r in result.layers]
    stages = [((s.stage,), [_exact_or_human(s.params), _exact_or_human(s.macs)]) for s in result.stages]
    totals = [(("parameters",), [_exact_or_human(result.total_params)]),
              (("MACs",), [_exact_or_human(result.total_macs)])]
    _check(output, width, layers + stages + totals)
    if width == 120:
        assert "stages.2.blocks.11" in output and "MetaFormerBlock" in output


FLOPS_CASES = {  # arguments, and the (model, resolution) pairs they count
    "one": (["flops", "s12", "--resolution", "32", "--by", "operator"], [("poolformer_s12", 32)]),
    "resolutions": (["flops", "s12", "--resolution", "32,64"], [("poolformer_s12", 32), ("poolformer_s12", 64)]),
    "models": (["flops", "s12", "s12_ppaa", "--resolution", "32", "--by", "module"],
               [("poolformer_s12", 32), ("poolformer_s12_ppaa", 32)]),
}


@widths
@pytest.mark.parametrize("case", FLOPS_CASES)
def test_flops(monkeypatch, width, case):
    from poolformer import flops

    counted = _REPLAYED.setdefault("flops", {})  # one count per (model, resolution), shared by the cases
    real = flops.analyse

    def analyse(name, resolution=None, **kwargs):
        key = (name, resolution.height)  # the CLI passes a Size; these cases count squares
        if key not in counted:
            counted[key] = real(name, resolution=resolution, **kwargs)
        return counted[key]

    monkeypatch.setattr(flops, "analyse", analyse)
    args, pairs = FLOPS_CASES[case]
    output = _invoke(monkeypatch, width, args)
    reports = [counted[pair] for pair in pairs]
    if case == "one":
        r = reports[0]
        rows = [(("fvcore (primary)",), [_exact_or_human(r.fvcore.macs)]),
                (("thop",), [_exact_or_human(r.thop.macs)]),
                (("torch FlopCounterMode",), [_exact_or_human(r.torch.flops)])]
        rows += [((s.op, s.op.removeprefix("aten::")), [(str(s.calls),), _exact_or_human(s.analytic_ops)])
                 for s in r.fvcore_skipped]
        rows += [((o.op,), [(human(o.analytic.ops),), (human(o.analytic.bytes, "B"),)]) for o in r.operators]
    else:
        rows = [((r.model, short_model_name(r.model)), [(f"{r.resolution.height}x{r.resolution.width}",),
                                                        (human(r.fvcore.macs),)])
                for r in reports]
    if case == "models":
        rows += [((m.name,), [(human(m.analytic.ops),)]) for r in reports for m in r.modules]
    _check(output, width, rows)


@widths
def test_bench_and_its_regression_check(monkeypatch, tmp_path, width):
    from poolformer import bench

    _replay(monkeypatch, "bench", bench, "run_benchmark")
    args = ["bench", "s12", "--device", "cpu", "--batch-sizes", "1,2", "--resolutions", "32", "--iters", "2",
            "--warmup", "0", "--threads", "1"]
    baseline = tmp_path / "baseline.json"
    threads = torch.get_num_threads()
    try:  # --threads sets a process-wide setting: give the rest of the suite its own back
        _invoke(monkeypatch, width, [*args, "--output", str(baseline)])
        output = _invoke(monkeypatch, width, [*args, "--baseline", str(baseline), "--max-regression", "50"])
    finally:
        torch.set_num_threads(threads)
    results = [row for rows in _replayed("bench", "run_benchmark") for row in rows]
    rows = [((f"s12/ours bs{r.config.batch_size} 32px fp32", f"s12/ours bs{r.config.batch_size}"),
             [(f"{r.throughput:,.1f}" if r.throughput >= 1 else f"{r.throughput:.2g}",)]) for r in results]
    rows += [((f"poolformer_s12/ours cpu bs{r.config.batch_size} 32px fp32", f"s12/ours bs{r.config.batch_size}"),
              [(f"{r.throughput:,.3f}",)]) for r in results]
    _check(output, width, rows)


@widths
def test_profile(monkeypatch, width):
    from poolformer import profiling

    _replay(monkeypatch, "profile", profiling, "profile_model")
    output = _invoke(monkeypatch, width, ["profile", "s12", "--device", "cpu", "--batch-size", "1", "--resolution",
                                          "32", "--warmup", "0", "--steps", "1", "--threads", "1", "--top", "8"])
    report = _replayed("profile", "profile_model")[0]
    _check(output, width, [((op.name,), [(f"{op.self_ms:.3f}",), (f"{op.share:.1%}",)]) for op in report.operators[:8]]
           + [((category,), [(f"{share:.1%}",)]) for category, share in report.categories.items()])


@widths
def test_compare(monkeypatch, width):
    from poolformer import compare

    _replay(monkeypatch, "compare", compare, "compare_models")
    output = _invoke(monkeypatch, width, ["compare", "s12", "v2_s12", "s12_ppaa", "--no-measure", "--resolution", "32"])
    result = _replayed("compare", "compare_models")[0]
    _check(output, width, [((r.model, short_model_name(r.model)), [(human(r.params),), (human(r.macs),),
                                                                   (f"{r.top1:.2f}",)]) for r in result.rows])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from poolformer import create_model
    from poolformer.weights import export_state_dict

    path = tmp_path_factory.mktemp("weights") / "s12.pth.tar"
    torch.save(export_state_dict(create_model("s12"), "official"), path)
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """root/val/<wnid>/img<i>.JPEG for two ImageNet classes: both a dataset for eval and images for predict."""
    from poolformer.labels import imagenet_wnids

    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i, wnid in enumerate(imagenet_wnids()[:2]):
        (root / "val" / wnid).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(root / "val" / wnid / f"img{i}.JPEG")
    return root


@widths
def test_predict(monkeypatch, width, checkpoint, images):
    from poolformer import predict

    _replay(monkeypatch, "predict", predict, "load_classifier")
    _replay(monkeypatch, "predict", predict, "predict")
    output = _invoke(monkeypatch, width, ["predict", str(images / "val" / "*" / "*.JPEG"), "--weights",
                                          str(checkpoint), "-k", "3", "--device", "cpu"])
    rows = []
    for result in _replayed("predict", "predict")[0]:
        rows.append(((result.image,), []))
        rows += [((str(rank),), [(f"{100 * p.probability:.2f}%",)]) for rank, p in enumerate(result.predictions, 1)]
    _check(output, width, rows)


@widths
def test_eval(monkeypatch, width, checkpoint, images):
    from poolformer import evaluate, predict

    _replay(monkeypatch, "eval", predict, "load_classifier")
    _replay(monkeypatch, "eval", evaluate, "evaluate")
    output = _invoke(monkeypatch, width, ["eval", str(images), "--weights", str(checkpoint), "--device", "cpu",
                                          "--workers", "0", "--no-progress"])
    result = _replayed("eval", "evaluate")[0]
    _check(output, width, [(("top-1",), [(f"{result.top1:.3f}%",)]), (("top-5",), [(f"{result.top5:.3f}%",)]),
                           (("images scored",), [(f"{result.images:,}",)])])


@widths
def test_export(monkeypatch, tmp_path_factory, width):
    from poolformer import export as exporting

    _replay(monkeypatch, "export", exporting, "export_model", runtimes=("onnxruntime",))  # one runtime renders
    path = tmp_path_factory.getbasetemp() / "export" / "s12.onnx"
    output = _invoke(monkeypatch, width, ["export", "s12", "--output", str(path), "--resolution", "32"])
    report = _replayed("export", "export_model")[0]
    _check(output, width, [((check.runtime,), [(check.inputs,), (f"{check.max_abs_diff:.2e}",)])
                           for check in report.checks] + [((str(report.path),), [])])  # the path whole; "wrote" may wrap
