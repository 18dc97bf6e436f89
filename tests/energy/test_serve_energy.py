"""`orchestrator serve` (sim backend) under a 50-conversation load writes energy samples and attributions
through the APScheduler accounting job; `GET /v1/reports/energy` and the CLI agree on the result."""

from __future__ import annotations

import json
import math
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from api.app import create_app
from energy.ledger import Ledger
from energy.records import Source
from orchestrator.cli import app as cli_app
from orchestrator.config import parse_fleet
from orchestrator.fleet import tier_model
from orchestrator.runtime import ServeSettings, SimInstance, build_runtime
from placement.base import Role

FLEET = {
    "model": "Qwen3-0.6B",
    "backend": "sim",
    "tiers": [{"name": "a40", "gpu": "A40", "count": 4, "roles": ["prefill", "decode"]}],
}


def test_serve_load_writes_samples_and_attributions_and_reports_agree(tmp_path: Path) -> None:
    db_url = f"sqlite:///{tmp_path / 'ledger.db'}"
    cfg = parse_fleet(dict(FLEET, database_url=db_url))
    tm = tier_model(cfg, "a40")
    instances = [SimInstance("a40-prefill-0", "a40", Role.PREFILL, tm)] + [
        SimInstance(f"a40-decode-{i}", "a40", Role.DECODE, tm) for i in range(3)
    ]
    settings = ServeSettings(
        fleet=Path("inline"),
        db=db_url,
        sim_speedup=1.0,
        poll_interval_s=0.2,
        ledger_flush_interval_s=0.01,
        energy_interval_s=0.25,
        energy_lag_s=0.5,
    )
    rt = build_runtime(settings, cfg, instances=instances)
    app = create_app(settings, runtime=rt)
    n_conv = 50

    with TestClient(app) as client:

        def conversation(i: int) -> None:
            history = [{"role": "user", "content": f"task {i}: " + "fix the failing test " * 40}]
            for turn in (1, 2):
                headers = {"X-Conversation-Id": f"conv-{i}"}
                if turn == 2:
                    headers["X-Conversation-Final"] = "true"
                r = client.post(
                    "/v1/chat/completions",
                    headers=headers,
                    json={"model": "Qwen3-0.6B", "messages": history, "max_tokens": 8},
                )
                assert r.status_code == 200, r.text
                history += [
                    r.json()["choices"][0]["message"],
                    {"role": "user", "content": "tool output " * 10},
                ]

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(conversation, range(n_conv)))
        time.sleep(1.0)  # let the accounting job pass the lag
        assert rt.writer.flush(10.0)
        rt.scheduler_pause()  # freeze the ledger so the API and the CLI read the same rows
        time.sleep(0.3)
        api = client.get("/v1/reports/energy", params={"by": "conversation"}).json()
        api_policy = client.get("/v1/reports/energy", params={"by": "policy"}).json()
        res = CliRunner().invoke(
            cli_app, ["report", "energy", "--db", db_url, "--by", "conversation", "--json"]
        )
        assert res.exit_code == 0, res.output
        assert json.loads(res.stdout) == api
        res = CliRunner().invoke(cli_app, ["report", "energy", "--db", db_url, "--by", "policy", "--json"])
        assert json.loads(res.stdout) == api_policy
        rt.scheduler_resume()

    # after shutdown every pending interval is attributed
    with Ledger(db_url) as lg:
        samples = lg.samples()
        rows = [a for _, a in lg.attributions()]
        facts = lg.conversation_facts()
    assert len(facts) == n_conv and all(f.final_turn == 2 for f in facts)
    assert samples and all(s.source == Source.MODELLED for s in samples)
    assert {s.engine_id for s in samples} == {i.instance_id for i in instances}
    # conservation against the meters: per engine, attributed joules == last cumulative - first cumulative
    for inst in instances:
        series = [s.cumulative_j for s in samples if s.engine_id == inst.instance_id]
        metered = series[-1] - series[0]
        attributed = math.fsum(a.joules for a in rows if a.engine_id == inst.instance_id)
        assert attributed == pytest.approx(metered, rel=1e-9)
    per_conv = {}
    for a in rows:
        if a.conversation_id is not None:
            per_conv[a.conversation_id] = per_conv.get(a.conversation_id, 0.0) + a.joules
    assert len(per_conv) >= 0.9 * n_conv  # conversations got energy (a few may finish inside one sample)
    assert all(j >= 0 for j in per_conv.values())
    assert any(a.is_idle for a in rows)


def test_work_served_before_the_first_energy_tick_gets_its_energy(tmp_path: Path) -> None:
    """A request answered before the accounting job's first run: the engines' token counters are baselined
    when `serve` starts, so that work is in the first tick's activity. (The first tick used to take its own
    reading as the baseline, and the modelled energy of everything served before it went to the idle row.)"""
    db_url = f"sqlite:///{tmp_path / 'ledger.db'}"
    cfg = parse_fleet(dict(FLEET, database_url=db_url))
    tm = tier_model(cfg, "a40")
    instances = [SimInstance("a40-prefill-0", "a40", Role.PREFILL, tm)] + [
        SimInstance("a40-decode-0", "a40", Role.DECODE, tm)
    ]
    settings = ServeSettings(
        fleet=Path("inline"), db=db_url, energy_interval_s=2.0, energy_lag_s=0.1, ledger_flush_interval_s=0.01
    )
    rt = build_runtime(settings, cfg, instances=instances)
    with TestClient(create_app(settings, runtime=rt)) as client:
        t0 = time.monotonic()
        r = client.post(
            "/v1/chat/completions",
            headers={"X-Conversation-Id": "early"},
            json={
                "model": "Qwen3-0.6B",
                "messages": [{"role": "user", "content": "go " * 200}],
                "max_tokens": 8,
            },
        )
        assert r.status_code == 200, r.text
        assert time.monotonic() - t0 < 2.0  # answered before the first tick
    with Ledger(db_url) as lg:
        early = math.fsum(a.joules for _, a in lg.attributions() if a.conversation_id == "early")
    assert early > 0
