"""The `poolformer` Typer app. Each command lives in its own module and imports torch only when it runs,
so `poolformer --help` and `--version` stay fast."""

from __future__ import annotations

from typing import Optional

import typer

from poolformer import __version__

from . import zoo
from . import flops as flops_cli, summary as summary_cli
from . import evaluate as evaluate_cli
from . import predict as predict_cli
from . import bench as bench_cli
from . import compare as compare_cli
from . import export as export_cli

app = typer.Typer(
    name="poolformer",
    help="Analyse, benchmark and run PoolFormer / MetaFormer vision models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"poolformer {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Optional[bool] = typer.Option(None, "--version", callback=_version, is_eager=True,
                                           help="Print the version and exit."),
) -> None:
    """Analyse, benchmark and run PoolFormer / MetaFormer vision models."""


app.command("list")(zoo.list_command)
app.command("summary")(summary_cli.summary_command)
app.command("flops")(flops_cli.flops_command)
app.command("predict")(predict_cli.predict_command)
app.command("eval")(evaluate_cli.eval_command)
app.command("bench")(bench_cli.bench_command)
app.command("profile")(bench_cli.profile_command)
app.command("compare")(compare_cli.compare_command)
app.command("export")(export_cli.export_command)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
