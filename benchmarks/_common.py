"""What the benchmark scripts share: writing their results, and the options several of them take.

A script imports this as a sibling (`from _common import write_report`): `python benchmarks/NAME.py` puts the
script's folder first on the import path. Everything else comes from the library, never from poolformer_cli.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from poolformer.files import replace_atomically
from poolformer.zoo import unknown_models

PRECISIONS = ("fp32", "bf16")  # what the CPU runtime benchmarks compute in


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write text to path atomically (poolformer.files.replace_atomically: never a half-written file, the folder
    made if need be). A failure of the file system ends the script with one line and exit 1."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)

    try:
        replace_atomically(path, write)
    except OSError as err:
        raise SystemExit(f"cannot write {str(path)!r}: {err.strerror or err}") from None


def write_report(out: Path, results: dict, report: str) -> None:
    """OUT.json (the results) and OUT.md (`report`), each written atomically, the folder made if need be."""
    write_text(out.with_suffix(".json"), json.dumps(results, indent=2) + "\n")
    write_text(out.with_suffix(".md"), report)
    print(f"wrote {out.with_suffix('.md')}")


def model_list(parser: argparse.ArgumentParser, text: str) -> list[str]:
    """The comma-separated models of a --models option; parser.error (exit 2, one line) names any that the zoo
    does not know, before any work."""
    models = [m.strip() for m in text.split(",") if m.strip()]
    unknown = unknown_models(models)
    if unknown or not models:
        parser.error(f"unknown models {unknown}; see `poolformer list`" if unknown else "--models names no model")
    return models


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The options the CPU runtime benchmarks share: model, resolution, batch sizes, precisions, threads."""
    parser.add_argument("--model", default="s12")
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--batch-sizes", default="1,16")
    parser.add_argument("--precisions", default="fp32,bf16", help="bf16 only runs on CPUs with native bf16")
    parser.add_argument("--threads", type=int, default=2)


def batches_and_precisions(parser: argparse.ArgumentParser, args: argparse.Namespace,
                           cpu) -> tuple[list[int], list[str], str | None]:
    """The batch sizes and precisions asked for (parser.error for ones that are not), without bf16 where `cpu`
    (poolformer.capabilities.cpu_capabilities()) would only emulate it, and what was skipped (None: nothing)."""
    try:
        batches = [int(b) for b in args.batch_sizes.split(",")]
    except ValueError:
        parser.error(f"--batch-sizes takes comma-separated integers, not {args.batch_sizes!r}")
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    unknown = [p for p in precisions if p not in PRECISIONS]
    if unknown:
        parser.error(f"unknown precision(s) {', '.join(unknown)}; choose from {', '.join(PRECISIONS)}")
    skipped = None
    if "bf16" in precisions and not cpu.native_bf16:
        precisions.remove("bf16")
        skipped = "bf16 (this CPU has no native bf16: it would be emulated)"
        print(f"skipping {skipped}", flush=True)
    return batches, precisions, skipped
