"""Bad command-line input through the installed entry point (`orchestrator.cli:main`): one line on
stderr naming the option and how to fix it, exit code 1, no traceback and no usage box (click's
default is a box and exit code 2)."""

from __future__ import annotations

import subprocess
import sys

import pytest

_MAIN = "from orchestrator.cli import main; main()"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", _MAIN, *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    ("args", "names"),
    [
        (("simulate", "--fleet", "examples/fleet.yaml", "--rate", "abc"), "'--rate'"),
        (("serve", "--fleet", "examples/fleet.yaml", "--admission-wait", "soon"), "'--admission-wait'"),
        (("plan",), "'--fleet'"),
        (("no-such-command",), "'no-such-command'"),
    ],
)
def test_bad_input_is_one_line_and_exit_1(args: tuple[str, ...], names: str) -> None:
    done = _run(*args)
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: ") and names in lines[0] and "To fix" in lines[0]
    assert "Traceback" not in done.stderr and done.stdout == ""


def test_help_and_no_arguments_still_print_help() -> None:
    for args in (("--help",), ()):
        done = _run(*args)
        assert done.returncode == 0, done.stderr
        assert done.stdout.count("Usage:") == 1 and "simulate" in done.stdout
