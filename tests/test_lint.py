"""The project's own lint gates, run with the tests so CI enforces them: `ruff check` over the repository and
`mypy` over the typed cores (`[tool.mypy] files` in pyproject.toml). Both come with the `test` extra."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", *argv]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff not installed (pip install -e '.[test]')")
def test_ruff_check_is_clean() -> None:
    res = _run("ruff", "check", "--no-cache", ".")
    assert res.returncode == 0, res.stdout + res.stderr


def test_mypy_on_the_typed_cores() -> None:
    pytest.importorskip("mypy", reason="mypy not installed (pip install -e '.[test]')")
    res = _run("mypy", "--no-incremental")
    assert res.returncode == 0, res.stdout + res.stderr
