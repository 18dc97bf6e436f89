"""Replicas that agree, when one dies mid-turn (issue 13 items 3-4): two `orchestrator serve` processes on
one PostgreSQL ledger; a conversation's turns alternate between them; replica A is killed (-9) while it
streams turn 3. The client sends turn 3 again, to replica B: it is numbered 3 (A's claim of it was never
recorded and A's advisory lock went with its process, energy/heads.py), goes to the decoder the conversation
is pinned to, and the ledger holds turns 1..4 once each, all on one decoder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, text

pytestmark = pytest.mark.postgres

FLEET = """\
model: Qwen3-0.6B
backend: sim
tiers:
  - {name: a40, gpu: A40, count: 4, roles: [prefill, decode]}
database_url: DB
"""


def _serve(tmp: Path, name: str, fleet: Path, port: int) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-c", "from orchestrator.cli import main; main()", "serve", "--fleet", str(fleet),
            "--port", str(port), "--log-level", "warning"]  # fmt: skip
    env = dict(os.environ, CONSERVE_ENERGY_INTERVAL_S="0", CONSERVE_RUN_ID="replicas")
    with open(tmp / f"{name}.log", "ab") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.monotonic() + 90
    while True:
        assert proc.poll() is None, (tmp / f"{name}.log").read_text()[-3000:]
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            pass
        assert time.monotonic() < deadline, "not ready after 90 s"
        time.sleep(0.2)


def _body(msgs: list[dict[str, Any]], max_tokens: int) -> dict[str, Any]:
    return {"model": "Qwen3-0.6B", "messages": msgs, "max_tokens": max_tokens, "stream": True}


def _turn(url: str, msgs: list[dict[str, Any]], cid: str) -> None:
    """A complete streamed turn; the answer and a tool result join the history."""
    text_parts: list[str] = []
    with httpx.stream("POST", url + "/v1/chat/completions", json=_body(msgs, 8),
                      headers={"X-Conversation-Id": cid}, timeout=60) as r:  # fmt: skip
        assert r.status_code == 200
        lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    for ln in lines[:-1]:
        for c in json.loads(ln[6:]).get("choices") or ():
            text_parts.append((c.get("delta") or {}).get("content") or "")
    msgs += [{"role": "assistant", "content": "".join(text_parts)}, {"role": "user", "content": "go on"}]


def test_a_turn_cut_by_a_replica_crash_is_numbered_again_on_the_other_replica(
    pg_url: str, tmp_path: Path, free_port: Callable[[], int]
) -> None:
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(FLEET.replace("DB", pg_url))
    pa, pb = free_port(), free_port()
    a = _serve(tmp_path, "a", fleet, pa)
    b = _serve(tmp_path, "b", fleet, pb)
    url_a, url_b = f"http://127.0.0.1:{pa}", f"http://127.0.0.1:{pb}"
    cid = "crashed-mid-turn"
    msgs: list[dict[str, Any]] = [
        {"role": "system", "content": "agent " * 200},
        {"role": "user", "content": "go"},
    ]
    try:
        _turn(url_b, msgs, cid)  # turn 1 on B
        _turn(url_a, msgs, cid)  # turn 2 on A
        # turn 3 on A, a long answer (sim speed 1: ~12 ms per token); A dies once it has started streaming
        with httpx.stream("POST", url_a + "/v1/chat/completions", json=_body(msgs, 2000),
                          headers={"X-Conversation-Id": cid}, timeout=60) as r:  # fmt: skip
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: {") and '"content"' in line:
                    os.kill(a.pid, signal.SIGKILL)
                    break
        a.wait(10)
        _turn(url_b, msgs, cid)  # the client sends turn 3 again, to B
        _turn(url_b, msgs, cid)  # turn 4
    finally:
        for p in (a, b):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
                p.wait(30)
    engine = create_engine(pg_url)
    with engine.connect() as conn:
        rows = conn.execute(
            text("SELECT turn, instance_id, status FROM turns WHERE conversation_id = :c ORDER BY pk"),
            {"c": cid},
        ).all()
    engine.dispose()
    ok = [(t, i) for t, i, s in rows if s == "ok"]
    assert len({i for _, i in ok}) == 1, f"on more than one decoder: {ok}"
    assert sorted(t for t, _, _ in rows) == [1, 2, 3, 4], f"turn rows {rows}"
