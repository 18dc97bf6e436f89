"""Admission through the real app (issue 12 item 4): a turn that no decoder can hold waits at most the
admission wait, then gets 503 with an OpenAI-style JSON body and Retry-After; the fleet file sets the wait and
the serve setting overrides it; 0 turns it off."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from orchestrator.config import parse_fleet
from orchestrator.core import DEFAULT_ADMISSION_WAIT_S
from orchestrator.errors import ConfigError
from orchestrator.runtime import ServeSettings, SimInstance, admission_wait_s, build_runtime
from placement.base import Role
from tiers.catalog import get_gpu
from tiers.models import get_model
from tiers.perf import TierModel

# an A40 with vLLM's memory share cut to 17%: 8.16 GB - 1.19 GB weights - 6.68 GB reserve = ~2,500 KV tokens
SMALL = TierModel(get_gpu("A40"), get_model("Qwen3-0.6B"), gpu_memory_utilization=0.17)


def fleet(tmp_path: Path, **extra: Any) -> dict[str, Any]:
    return {
        "model": "Qwen3-0.6B",
        "tiers": [{"name": "a40", "gpu": "A40", "count": 1, "roles": ["decode"]}],
        "backend": "sim",
        "database_url": f"sqlite:///{tmp_path / 'ledger.db'}",
        **extra,
    }


def client(tmp_path: Path, wait_s: float | None, **extra: Any) -> TestClient:
    cfg = parse_fleet(fleet(tmp_path, **extra))
    settings = ServeSettings(
        fleet=Path("inline"), db=cfg.database_url, energy_interval_s=0, ledger_writer="thread",
        sim_speedup=100.0, admission_wait_s=wait_s,
    )  # fmt: skip
    rt = build_runtime(settings, cfg, instances=[SimInstance("d0", "a40", Role.DECODE, SMALL)])
    return TestClient(create_app(settings, runtime=rt))


def chat(c: TestClient, text_tokens: int, cid: str, final: bool = False) -> Any:
    body = {
        "model": "Qwen3-0.6B",
        "messages": [{"role": "user", "content": "word " * (text_tokens * 4 // 5)}],
        "max_tokens": 8,
    }
    headers = {"X-Conversation-Id": cid, "X-Conversation-Final": "true" if final else "false"}
    return c.post("/v1/chat/completions", json=body, headers=headers)


def test_a_turn_no_decoder_can_hold_gets_503_with_retry_after(tmp_path: Path) -> None:
    assert SMALL.kv_capacity_tokens < 3_000
    with client(tmp_path, 0.5) as c:
        a = chat(c, 1_500, "A")  # A stays pinned, holding ~1.5k tokens
        assert a.status_code == 200, a.text
        t0 = time.monotonic()
        b = chat(c, 1_500, "B")
        waited = time.monotonic() - t0
        assert b.status_code == 503
        assert b.headers["retry-after"] == "1"  # the 0.5 s wait, in whole seconds
        err = b.json()["error"]
        assert err["code"] == "no_capacity" and err["type"] == "service_unavailable_error"
        assert "Retry-After" in err["message"] and "Traceback" not in b.text
        assert waited >= 0.5  # it waited the bound first
        rt = c.app.state.runtime  # type: ignore[attr-defined]
        assert rt.router.admission_stats == {"waited": 1, "timed_out": 1}
        # the refused request is not a turn: B's next try (once A is done) is its turn 1
        assert chat(c, 10, "A", final=True).status_code == 200  # A ends: its pin and KV are released
        b2 = chat(c, 1_500, "B")
        assert b2.status_code == 200, b2.text
        assert c.get("/v1/conversations/B").json()["turns"][0]["turn"] == 1


def test_zero_turns_admission_off(tmp_path: Path) -> None:
    with client(tmp_path, 0.0) as c:
        assert chat(c, 1_500, "A").status_code == 200
        b = chat(c, 1_500, "B")  # queued on the engine, served
        assert b.status_code == 200, b.text


@pytest.mark.parametrize(
    ("flag", "in_file", "expected"),
    [(None, None, DEFAULT_ADMISSION_WAIT_S), (None, 5.0, 5.0), (2.0, 5.0, 2.0), (0.0, 5.0, 0.0)],
    ids=["default", "fleet-file", "flag-wins", "flag-off"],
)
def test_where_the_wait_comes_from(
    tmp_path: Path, flag: float | None, in_file: float | None, expected: float
) -> None:
    extra = {} if in_file is None else {"admission_wait_s": in_file}
    cfg = parse_fleet(fleet(tmp_path, **extra))
    assert admission_wait_s(ServeSettings(fleet=Path("inline"), admission_wait_s=flag), cfg) == expected


def test_a_negative_wait_is_refused_naming_the_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="admission_wait_s: Input should be greater than or equal to 0"):
        parse_fleet(fleet(tmp_path, admission_wait_s=-1))
