"""Shared CLI plumbing: one-line errors with exit code 1, --json output, rich console."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich.console import Console, ConsoleDimensions
from rich.markup import escape

from conserve.errors import ConServeError

# Width of tables and text when stdout is not a terminal (a pipe, a log file, CI): Rich would otherwise use 80
# columns (or COLUMNS) and cut every cell of a wide table to "…". Wide enough for the widest table the
# commands print at its natural width (tables do not stretch to the console width); text lines wrap here.
PIPED_WIDTH = 1000
# Panels (the plan's warnings) stretch to the console: piped, that would be a 1,000-column box. They are drawn
# at most this wide, their text wrapped inside.
PANEL_WIDTH = 110


class _PipeWideConsole(Console):
    """A rich Console that keeps its terminal's width on a terminal and is PIPED_WIDTH wide elsewhere (unless
    a width is given explicitly). The check is made at print time, so a swapped sys.stdout is honoured."""

    @property
    def size(self) -> ConsoleDimensions:
        dims = Console.size.fget(self)  # type: ignore[attr-defined]
        if self._width is None and not self.is_terminal:
            return ConsoleDimensions(max(dims.width, PIPED_WIDTH), dims.height)
        return dims

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        Console.size.fset(self, new_size)  # type: ignore[attr-defined]


console = _PipeWideConsole()
err_console = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])


def fail(message: str) -> None:
    """Print a one-line error and exit 1 (no traceback)."""
    # escaped: a message may hold brackets ("pip install 'conserve[gpu]'") that rich would read as markup
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=1)


def handle_errors(func: F) -> F:
    """Turn project errors (and a few user-caused OS errors) into one-line messages with exit code 1."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except ConServeError as err:
            fail(str(err).replace("\n", " "))
        except FileNotFoundError as err:
            fail(f"file not found: {err.filename}. To fix: check the path.")
        except PermissionError as err:
            fail(f"permission denied: {err.filename}")
        except KeyboardInterrupt:
            err_console.print("interrupted")
            raise typer.Exit(code=130) from None

    return wrapper  # type: ignore[return-value]


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
