"""The `poolformer` Typer app. Each command lives in its own module and imports torch only when it runs,
so `poolformer --help` and `--version` stay fast."""

from __future__ import annotations

import inspect
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
    """Analyse, benchmark and run PoolFormer / MetaFormer vision models.

    Example: poolformer summary s24 --depth 1 (each command's --help has its own example)
    """


def help_text(docstring: str | None) -> str:
    """A docstring with each paragraph on one line. Typer's help keeps the line breaks inside paragraphs (the
    command list even in the first), which would break sentences where the source wraps, not where the
    terminal ends."""
    paragraphs = inspect.cleandoc(docstring or "").split("\n\n")
    return "\n\n".join(" ".join(paragraph.split()) for paragraph in paragraphs)


COMMANDS = {"list": zoo.list_command, "summary": summary_cli.summary_command, "flops": flops_cli.flops_command,
            "predict": predict_cli.predict_command, "eval": evaluate_cli.eval_command,
            "bench": bench_cli.bench_command, "profile": bench_cli.profile_command,
            "compare": compare_cli.compare_command, "export": export_cli.export_command}
for _name, _command in COMMANDS.items():
    app.command(_name, help=help_text(_command.__doc__))(_command)


def main() -> None:
    """The console script. A usage error (an unknown option, a missing argument) is one line on stderr, exit 2,
    like every other bad input, instead of Click's framed box; help without arguments is unchanged."""
    import sys

    try:  # newer typer releases carry their own copy of Click; older ones use Click's
        from typer._click import exceptions as click
    except ImportError:
        from click import exceptions as click
    no_args_is_help = getattr(click, "NoArgsIsHelpError", ())  # Click 8.2+; earlier ones print help themselves

    command = typer.main.get_command(app)
    try:
        code = command.main(prog_name="poolformer", standalone_mode=False)
    except no_args_is_help as err:
        err.show()
        code = err.exit_code
    except click.UsageError as err:
        path = err.ctx.command_path if err.ctx is not None else "poolformer"
        message = " ".join(err.format_message().split()).rstrip(".")
        sys.stderr.write(f"error: {message}; see '{path} -h'\n")
        code = err.exit_code
    except click.ClickException as err:
        sys.stderr.write(f"error: {' '.join(err.format_message().split())}\n")
        code = err.exit_code
    except click.Abort:
        sys.stderr.write("aborted\n")
        code = 1
    sys.exit(code or 0)


if __name__ == "__main__":
    main()
