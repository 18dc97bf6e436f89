"""The `orchestrator` command: one subcommand per job (plan, simulate, compare, serve, report, profile,
engines, power).

Each job lives in its own module and registers itself on `app`; this file only assembles them.
"""

from __future__ import annotations

import importlib

import typer

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
    app()
