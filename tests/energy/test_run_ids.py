"""Run ids are unique per `serve` start (issue 14 item 1.3): restarting the server on the same ledger and
reusing a conversation id starts a new conversation instead of merging ten turns into one."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from api.app import create_app
from energy.ledger import Ledger
from orchestrator.config import parse_fleet
from orchestrator.fleet import tier_model
from orchestrator.runtime import ServeSettings, SimInstance, build_runtime
from placement.base import Role

FLEET = {
    "model": "Qwen3-0.6B",
    "backend": "sim",
    "tiers": [{"name": "a40", "gpu": "A40", "count": 2, "roles": ["prefill", "decode"]}],
}


def _serve_one_turn(db_url: str, sim_speedup: float = 50.0) -> tuple[str, dict]:
    cfg = parse_fleet(dict(FLEET, database_url=db_url))
    tm = tier_model(cfg, "a40")
    insts = [SimInstance("p0", "a40", Role.PREFILL, tm), SimInstance("d0", "a40", Role.DECODE, tm)]
    settings = ServeSettings(
        fleet=Path("inline"), db=db_url, sim_speedup=sim_speedup, energy_interval_s=0, ledger_writer="thread"
    )
    rt = build_runtime(settings, cfg, instances=insts)
    with TestClient(create_app(settings, runtime=rt)) as client:
        r = client.post(
            "/v1/chat/completions",
            headers={"X-Conversation-Id": "agent-1"},
            json={
                "model": "Qwen3-0.6B",
                "messages": [{"role": "user", "content": "go " * 50}],
                "max_tokens": 4,
            },
        )
        assert r.status_code == 200, r.text
        assert rt.writer.flush(10.0)
        view = client.get("/v1/conversations/agent-1").json()
    return rt.settings.run_id or "", view


def test_two_server_starts_on_one_ledger_are_two_runs(tmp_path: Path) -> None:
    db_url = f"sqlite:///{tmp_path / 'ledger.db'}"
    run1, view1 = _serve_one_turn(db_url)
    run2, view2 = _serve_one_turn(db_url)
    assert run1 != run2 and run1.startswith("live-") and run2.startswith("live-")
    assert len(view1["turns"]) == 1 and len(view2["turns"]) == 1  # not merged into one conversation
    assert view2["run_id"] == run2
    with Ledger(db_url) as lg:
        assert {r.run_id for r in lg.runs()} == {run1, run2}
