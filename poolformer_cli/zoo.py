"""`poolformer list`: the model zoo."""

from __future__ import annotations

import dataclasses
from typing import Optional

import typer

from .common import console, fail, human, print_json, resolve_models, user_errors
from .tables import count, name, number, print_table, prose

FAMILIES = ("v1", "v2", "ablation", "hybrid")


def list_command(
    patterns: Optional[list[str]] = typer.Argument(None, help="Only models whose name or alias matches these "
                                                               "names or glob patterns ('poolformer_s*', 'v2_*')."),
    family: Optional[str] = typer.Option(None, help=f"Only one family: {', '.join(FAMILIES)}."),
    json_output: bool = typer.Option(False, "--json", help="Print a JSON array instead of a table."),
) -> None:
    """List the models: aliases, parameters, published MACs and top-1, crop_pct and weights source.

    Params are counted on our own models (frozen parameters included); MACs and top-1 are the published
    figures (MACs by fvcore at 224x224, one multiply-add = 1 MAC = 2 FLOPs).

    Example: poolformer list 'v2_*'
    """
    if family is not None and family not in FAMILIES:
        fail(f"unknown family {family!r}; choose from: {', '.join(FAMILIES)}")
    wanted = set(resolve_models(patterns, peers=False)) if patterns else None
    from poolformer.catalog import catalog

    with user_errors():
        rows = [row for row in catalog(family) if wanted is None or row.name in wanted]
    if json_output:
        print_json([dataclasses.asdict(r) for r in rows])
        return
    print_table([
        name("model", lambda r: r.name),
        prose("aliases", lambda r: ", ".join(r.aliases), priority=2),
        count("params", lambda r: r.params),
        number("MACs @224", lambda r: human(r.macs)),
        number("top-1 %", lambda r: "-" if r.top1 is None else f"{r.top1:.1f}"),
        number("crop", lambda r: f"{r.crop_pct:g}", priority=3),
        name("weights", _weights_source, priority=3),
    ], rows, title="PoolFormer / MetaFormer model zoo")
    console.print("MACs and top-1 are published figures (fvcore MACs: 1 MAC = 1 multiply-add = 2 FLOPs). "
                  "weights: hf-hub = timm's Hugging Face repo, with the authors' release URL as fallback "
                  "(see --json).", style="dim")


def _weights_source(row) -> str:
    """'hf-hub' (timm's Hugging Face repo), 'url' (the authors' release only) or '-' (no published weights)."""
    if row.weights.startswith("hf-hub"):
        return row.weights.split(":", 1)[0]
    return "-" if " " in row.weights else "url"
