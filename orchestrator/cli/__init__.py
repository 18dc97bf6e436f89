"""The `orchestrator` command: one subcommand per job (plan, simulate, compare, serve, report, profile,
engines, power).

Each job lives in its own module and registers itself on `app`; this file only assembles them.
"""

from __future__ import annotations

import importlib
import sys

import typer

try:  # typer 0.2x vendors click as typer._click; its exceptions are not click's
    from typer._click import exceptions as _usage

    _HELP_ALREADY_SHOWN = True  # its no-args-is-help prints the help before raising
except ImportError:  # pragma: no cover - older typer runs on click itself
    from click import exceptions as _usage  # type: ignore[no-redef]

    _HELP_ALREADY_SHOWN = False

app = typer.Typer(
    name="orchestrator",
    help="ConServe: energy-aware, conversation-level orchestration for agentic LLM serving.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

# Each module defines `register(app)`. A module that is not there yet is skipped, so the CLI keeps working
# while capabilities land one by one.
_COMMAND_MODULES = ("plan", "simulate", "compare", "serve", "report", "profile", "engines", "power", "keys")

for _name in _COMMAND_MODULES:
    try:
        _mod = importlib.import_module(f"orchestrator.cli.{_name}")
    except ModuleNotFoundError as _err:
        if _err.name != f"orchestrator.cli.{_name}":
            raise
        continue
    _mod.register(app)


def main() -> None:
    """Run the CLI. A bad option value or a missing argument is one line on stderr and exit code 1
    (the project's rule for bad input), not click's usage box and exit code 2; `--help` and no
    arguments print the help."""
    try:
        result = app(standalone_mode=False)
    except _usage.NoArgsIsHelpError as err:
        if not _HELP_ALREADY_SHOWN:
            typer.echo(err.format_message())
        sys.exit(0)
    except _usage.UsageError as err:
        command = err.ctx.command_path if err.ctx else "orchestrator"
        message = " ".join(err.format_message().split()).rstrip(".") + "."
        typer.echo(f"error: {message} To fix: see `{command} --help`.", err=True)
        sys.exit(1)
    except typer.Abort:
        typer.echo("error: aborted.", err=True)
        sys.exit(1)
    except _usage.ClickException as err:
        typer.echo(f"error: {' '.join(err.format_message().split())}", err=True)
        sys.exit(1)
    sys.exit(result if isinstance(result, int) else 0)
