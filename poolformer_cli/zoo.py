"""`poolformer list`: the model zoo."""

from __future__ import annotations

import dataclasses
from typing import Optional

import typer
from rich.table import Table

from .common import console, fail, human, print_json, resolve_models, user_errors

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
    table = Table(title="PoolFormer / MetaFormer model zoo", title_justify="left")
    for column, justify in (("model", "left"), ("aliases", "left"), ("params", "right"), ("MACs@224", "right"),
                            ("top-1%", "right"), ("crop", "right"), ("weights", "left")):
        table.add_column(column, justify=justify, no_wrap=column in ("model", "params"))
    for r in rows:
        source = r.weights.split(":", 1)[0] if r.weights.startswith("hf-hub") else ("-" if " " in r.weights else "url")
        table.add_row(r.name, ", ".join(r.aliases), f"{r.params:,}", human(r.macs),
                      "-" if r.top1 is None else f"{r.top1:.1f}", f"{r.crop_pct:g}", source)
    console.print(table)
    console.print("MACs and top-1 are published figures (fvcore MACs: 1 MAC = 1 multiply-add = 2 FLOPs). "
                  "weights: hf-hub = timm's Hugging Face repo, with the authors' release URL as fallback "
                  "(see --json).", style="dim")
