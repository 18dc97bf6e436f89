"""The project's own lint gates, run with the tests so CI enforces them: `ruff check` over the repository and
`mypy` over every package (`[tool.mypy] files` in pyproject.toml). Both come with the `test` extra."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
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


PACKAGES = {"conserve", "tiers", "placement", "orchestrator", "energy", "api"}
# modules rewritten on other branches while mypy's scope grew (issue 11); the list may only shrink
IGNORED_FOR_NOW: set[str] = set()


def test_mypy_scope_is_every_package() -> None:
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mypy"]
    assert set(cfg["files"]) >= PACKAGES, f"[tool.mypy] files lacks {sorted(PACKAGES - set(cfg['files']))}"
    ignored = set()
    for override in cfg.get("overrides", []):
        if override.get("ignore_errors"):
            mods = override["module"]
            ignored |= {mods} if isinstance(mods, str) else set(mods)
    assert ignored <= IGNORED_FOR_NOW, f"mypy errors ignored in {sorted(ignored - IGNORED_FOR_NOW)}"


def test_mypy_on_every_package() -> None:
    pytest.importorskip("mypy", reason="mypy not installed (pip install -e '.[test]')")
    res = _run("mypy", "--no-incremental")
    assert res.returncode == 0, res.stdout + res.stderr
