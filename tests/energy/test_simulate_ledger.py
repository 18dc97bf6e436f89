"""Acceptance: `orchestrator simulate --db` on the paper setup writes a ledger from which
`orchestrator report energy --by policy` reproduces the simulator's own tokens/J within 0.1%."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import Result
from typer.testing import CliRunner

from orchestrator.cli import app


@pytest.mark.parametrize(
    "layout", ["prefill=1,decode=3", "prefill=1,decode=3@200"], ids=["300W", "capped-200W"]
)
def test_simulate_db_then_report_by_policy_reproduces_tokens_per_joule(
    layout: str, shared_data: Path, repo_root: Path, tmp_path: Path
) -> None:
    db = f"sqlite:///{tmp_path / 'runs.db'}"
    runner = CliRunner()

    def simulate(policy: str, conversations: int, *extra: str) -> Result:
        fleet = str(repo_root / "examples" / "paper-a40.yaml")
        return runner.invoke(
            app,
            ["simulate", "--fleet", fleet, "--layout", layout, "--policy", policy,
             "--conversations", str(conversations), "--no-standalone",
             "--db", db, "--run-id", f"paper-{policy}", *extra],
        )  # fmt: skip

    sims = {}
    for policy in ("conserve", "full-disagg"):
        res = simulate(policy, 40, "--json")
        assert res.exit_code == 0, res.output
        sims[policy] = json.loads(res.stdout)
        assert sims[policy]["ledger"]["run_id"] == f"paper-{policy}"
    rep = runner.invoke(app, ["report", "energy", "--db", db, "--by", "policy", "--json"])
    assert rep.exit_code == 0, rep.output
    rows = {r["policy"]: r for r in json.loads(rep.stdout)["rows"]}
    for policy, doc in sims.items():
        own = doc["summary"]
        assert rows[policy]["tokens"] == own["tokens"]
        assert rows[policy]["tokens_per_j"] == pytest.approx(own["tokens_per_j"], rel=1e-3)
        assert rows[policy]["measured_share"] == 0.0
    again = simulate("conserve", 5)
    assert again.exit_code == 1 and "already in the ledger" in again.output
