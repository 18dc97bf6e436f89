"""The layering of the README, enforced: import-linter's contracts in pyproject.toml ([tool.importlinter]).

tiers (GPU models) <- placement (policies, ILP) <- orchestrator.core (driver core) <- drivers (router,
simulator) <- api / CLI; energy (ledger, meters) beside; conserve (errors, clock) the base of all. Metrics,
the planner and the fleet/workload models take simulation results as input and never run a simulation:
commands and the verification step do (orchestrator.verify, orchestrator.sim.standalone)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_the_import_contracts_hold() -> None:
    cli = pytest.importorskip("importlinter.cli", reason="import-linter is in the test extras")
    cwd = os.getcwd()
    os.chdir(ROOT)  # import-linter reads pyproject.toml from the working directory
    try:
        code = cli.lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True)
    finally:
        os.chdir(cwd)
    assert code == 0, "an import breaks the layering: run `lint-imports` at the repository root for the chain"
