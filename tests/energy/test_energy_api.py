"""Energy you can watch and energy in the answer (issue 14 items 5 and 6), through the real FastAPI app and
the official OpenAI Python client: usage.energy on each completion (estimated, prefill and decode apart, the
conversation's so far), the attributed figure in GET /v1/conversations/{id} once settled, and energy, power,
carbon and per-tenant series on /metrics."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from openai import OpenAI

from api.app import create_app
from energy.estimate import DEFAULT_GRID_G_PER_KWH, co2e_g
from orchestrator.config import parse_fleet
from orchestrator.fleet import tier_model
from orchestrator.runtime import ServeSettings, SimInstance, build_runtime
from placement.base import Role

FLEET = {
    "model": "Qwen3-0.6B",
    "backend": "sim",
    "tiers": [{"name": "a40", "gpu": "A40", "count": 2, "roles": ["prefill", "decode"]}],
}


def _metric(text: str, name: str, **labels: str) -> list[float]:
    out = []
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            out.append(float(line.rsplit(" ", 1)[1]))
    return out


@pytest.fixture
def served(tmp_path: Path):
    db = f"sqlite:///{tmp_path / 'l.db'}"
    cfg = parse_fleet(dict(FLEET, database_url=db, grid_carbon_g_per_kwh=250.0))
    tm = tier_model(cfg, "a40")
    insts = [SimInstance("p0", "a40", Role.PREFILL, tm), SimInstance("d0", "a40", Role.DECODE, tm)]
    settings = ServeSettings(
        fleet=Path("inline"), db=db, sim_speedup=5.0, energy_interval_s=0.2, energy_lag_s=0.2,
        ledger_flush_interval_s=0.02, ledger_writer="thread",
    )  # fmt: skip
    rt = build_runtime(settings, cfg, instances=insts)
    with TestClient(create_app(settings, runtime=rt)) as client:
        yield client, rt


def test_usage_energy_parses_with_the_openai_client_and_adds_up(served) -> None:
    client, rt = served
    oai = OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=client)
    msgs = [{"role": "user", "content": "fix the failing test " * 300}]
    seen = []
    for _ in (1, 2):
        r = oai.chat.completions.create(
            model="Qwen3-0.6B", messages=msgs, max_tokens=16, extra_headers={"X-Conversation-Id": "agent-7"}
        )
        assert r.choices[0].message.content and r.usage.completion_tokens == 16  # parsed as usual
        e = r.usage.model_extra["energy"]  # the extension survives the client's parsing
        assert e["estimated"] is True and e["source"] == "modelled"
        assert e["turn_prefill_j"] > 0 and e["turn_decode_j"] > 0
        assert e["turn_j"] == pytest.approx(e["turn_prefill_j"] + e["turn_decode_j"], rel=1e-6)
        assert e["attributed"] == "/v1/conversations/agent-7"
        seen.append(e)
        msgs += [
            {"role": "assistant", "content": r.choices[0].message.content},
            {"role": "user", "content": "ok"},
        ]
    # turn 1's 1.5k-token prompt was prefilled; turn 2 hits the prefix cache: far less prefill
    assert seen[1]["turn_prefill_j"] < 0.2 * seen[0]["turn_prefill_j"]
    assert seen[1]["conversation_j"] == pytest.approx(seen[0]["turn_j"] + seen[1]["turn_j"], rel=1e-6)

    deadline = time.monotonic() + 20
    conv = client.get("/v1/conversations/agent-7").json()
    while not conv["energy"]["settled"] and time.monotonic() < deadline:
        time.sleep(0.2)
        conv = client.get("/v1/conversations/agent-7").json()
    energy = conv["energy"]
    assert energy["settled"] and energy["attributed_j"] > 0 and energy["measured_share"] == 0.0
    assert energy["estimated_j"] == pytest.approx(seen[1]["conversation_j"], rel=1e-6)


def test_metrics_carry_energy_power_carbon_and_tenant_series(served) -> None:
    client, rt = served
    r = client.post("/v1/completions", json={"model": "Qwen3-0.6B", "prompt": [5] * 2000, "max_tokens": 8})
    assert r.status_code == 200 and r.json()["usage"]["energy"]["conversation_j"] > 0
    time.sleep(0.6)  # a few accounting ticks
    text = client.get("/metrics").text
    j = _metric(text, "conserve_energy_joules_total", instance="p0", tier="A40@300W/tp1", source="modelled")
    w = _metric(text, "conserve_power_watts", instance="d0", source="modelled")
    assert j and j[0] > 0 and w and w[0] > 0
    tier_j = _metric(text, "conserve_tier_energy_joules_total", source="modelled")
    assert tier_j and tier_j[0] >= j[0]
    carbon = _metric(text, "conserve_carbon_grams_total", instance="p0")
    assert carbon[0] == pytest.approx(co2e_g(j[0], 250.0), rel=0.05)  # the fleet's grid intensity, not 480
    assert DEFAULT_GRID_G_PER_KWH == 480.0
    tenant = _metric(text, "conserve_tenant_energy_estimated_joules_total", tenant="default")
    assert tenant and tenant[0] > 0


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_streamed_usage_carries_energy_with_include_usage(served, endpoint: str) -> None:
    client, rt = served
    oai = OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=client)
    common = {
        "model": "Qwen3-0.6B",
        "max_tokens": 8,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if endpoint == "chat":
        chunks = list(
            oai.chat.completions.create(messages=[{"role": "user", "content": "go " * 400}], **common)
        )
    else:
        chunks = list(oai.completions.create(prompt="go " * 400, **common))
    usage = [c.usage for c in chunks if c.usage is not None]
    assert len(usage) == 1 and usage[0].completion_tokens == 8
    e = usage[0].model_extra["energy"]
    assert e["estimated"] is True and e["turn_prefill_j"] > 0 and e["turn_decode_j"] > 0
    assert "attributed" not in e  # a one-turn request has no conversation id to look up
