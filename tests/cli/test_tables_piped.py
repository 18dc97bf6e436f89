"""Tables stay readable when stdout is not a terminal (a pipe, a log, CI): no cell is cut to "…".

CliRunner's stdout is not a terminal; COLUMNS=80 is what Rich would otherwise fall back to there.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from orchestrator.cli import app

runner = CliRunner()
ELLIPSIS = "\u2026"


@pytest.mark.parametrize(
    "args",
    [
        ("plan",),
        ("plan", "--compare-homogeneous"),
        ("simulate", "--conversations", "20"),
        ("compare", "--conversations", "20", "--policies", "conserve,full-disagg,colocated"),
    ],
    ids=["plan", "plan-homogeneous", "simulate", "compare"],
)
def test_tables_not_truncated_when_piped(repo_root: Path, args: tuple[str, ...]) -> None:
    fleet = str(repo_root / "examples" / "fleet.yaml")
    res = runner.invoke(app, [*args, "--fleet", fleet], env={"COLUMNS": "80"})
    assert res.exit_code == 0, res.output
    assert "┃" in res.stdout  # a table was printed
    assert ELLIPSIS not in res.stdout, res.stdout


def test_json_unchanged_when_piped(repo_root: Path) -> None:
    fleet = str(repo_root / "examples" / "fleet.yaml")
    res = runner.invoke(
        app, ["simulate", "--fleet", fleet, "--conversations", "5", "--json"], env={"COLUMNS": "80"}
    )
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["summary"]
