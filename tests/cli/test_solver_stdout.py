"""Solver output never reaches stdout: `orchestrator plan` run as a subprocess, stdout checked at the
file-descriptor level (HiGHS writes its banner from C++, which pytest's capsys would not see)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BANNER = "Running HiGHS"


def _plan(repo_root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(repo_root), "COLUMNS": "200"}
    cmd = [sys.executable, "-c", "from orchestrator.cli import main; main()", "plan", *args]
    fleet = str(repo_root / "examples" / "fleet.yaml")
    res = subprocess.run(
        [*cmd, "--fleet", fleet], capture_output=True, text=True, env=env, timeout=300, check=False
    )
    assert res.returncode == 0, res.stderr
    return res


@pytest.mark.parametrize("solver", ["auto", "highs", "cbc"])
def test_plan_json_parses_for_every_solver(repo_root: Path, solver: str) -> None:
    res = _plan(repo_root, "--json", "--solver", solver)
    doc = json.loads(res.stdout)  # nothing but the JSON document on stdout
    assert doc["plan"]["status"] == "optimal"


@pytest.mark.parametrize(
    "args",
    [
        ("--json", "--validate"),
        ("--json", "--compare-homogeneous"),
        ("--json", "--max-rate"),
    ],
    ids=["validate", "compare-homogeneous", "max-rate"],
)
def test_plan_json_parses_on_every_code_path(repo_root: Path, args: tuple[str, ...]) -> None:
    json.loads(_plan(repo_root, *args, "--solver", "highs").stdout)


@pytest.mark.parametrize(
    "args", [(), ("--max-rate",), ("--compare-homogeneous",)], ids=["table", "max", "homog"]
)
def test_table_output_has_no_solver_banner(repo_root: Path, args: tuple[str, ...]) -> None:
    res = _plan(repo_root, *args, "--solver", "highs")
    assert BANNER not in res.stdout
    assert "Plan for" in res.stdout
