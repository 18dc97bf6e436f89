"""Replicas that agree (issue 13 item 3): two `serve` replicas (real uvicorn servers, each with its own router
and ledger writer) on one PostgreSQL ledger, turns of each conversation alternating between them with no
think time. Turn numbers and pins are decided in the database (energy/heads.py), so every conversation stays
on one decoder and its turns are numbered 1..n exactly once -- checked on the ledger's rows."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, text

MODEL = "Qwen3-0.6B"
SYSTEM = "You are a coding agent. Tools: bash, edit, search. " * 40

pytestmark = pytest.mark.postgres


async def _conversation(clients: list[httpx.AsyncClient], cid: str, turns: int, first: int) -> None:
    msgs: list[dict[str, Any]] = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Go."}]
    for k in range(turns):
        client = clients[(first + k) % len(clients)]  # alternate replicas, no think time
        r = await client.post(
            "/v1/chat/completions",
            json={"model": MODEL, "messages": msgs, "max_tokens": 4},
            headers={"X-Conversation-Id": cid},
        )
        assert r.status_code == 200, r.text
        answer = r.json()["choices"][0]["message"]["content"]
        msgs += [{"role": "assistant", "content": answer}, {"role": "user", "content": f"Tool result {k}."}]


async def _drive(urls: list[str], n_convs: int, turns: int) -> None:
    limits = httpx.Limits(max_connections=32)
    clients = [httpx.AsyncClient(base_url=u, timeout=60, limits=limits) for u in urls]
    try:
        await asyncio.gather(*(_conversation(clients, f"alt-{i}", turns, i) for i in range(n_convs)))
    finally:
        for c in clients:
            await c.aclose()


def _ledger_rows(url: str) -> tuple[dict[str, list[tuple[int, str]]], dict[str, set[str]]]:
    engine = create_engine(url)
    turns: dict[str, list[tuple[int, str]]] = defaultdict(list)
    pins: dict[str, set[str]] = defaultdict(set)
    with engine.connect() as conn:
        for cid, turn, instance in conn.execute(
            text("SELECT conversation_id, turn, instance_id FROM turns WHERE status = 'ok' ORDER BY pk")
        ):
            turns[cid].append((turn, instance))
        for cid, instance in conn.execute(text("SELECT conversation_id, instance_id FROM pins")):
            pins[cid].add(instance)
    engine.dispose()
    return turns, pins


def _split_and_numbering(url: str, n_convs: int, turns: int) -> tuple[list[str], list[str]]:
    rows, pins = _ledger_rows(url)
    assert set(rows) == {f"alt-{i}" for i in range(n_convs)}
    split = [cid for cid, ts in rows.items() if len({i for _, i in ts} | pins[cid]) != 1]
    misnumbered = [cid for cid, ts in rows.items() if sorted(t for t, _ in ts) != list(range(1, turns + 1))]
    return split, misnumbered


@pytest.mark.slow
def test_two_replicas_alternating_turns_agree_on_numbers_and_decoder(
    pg_url: str, tmp_path: Path, server_factory: Any
) -> None:
    n_convs, turns = 200, 4
    a = server_factory(tmp_path / "a", db_url=pg_url, run_id="replicas", speedup=1000.0)
    b = server_factory(tmp_path / "b", db_url=pg_url, run_id="replicas", speedup=1000.0)
    assert a.runtime.router.shared is not None and b.runtime.router.shared is not None  # auto: PostgreSQL
    asyncio.run(_drive([a.base_url, b.base_url], n_convs, turns))
    assert a.runtime.writer.flush() and b.runtime.writer.flush()
    split, misnumbered = _split_and_numbering(pg_url, n_convs, turns)
    assert split == [], f"{len(split)} conversations on more than one decoder, e.g. {split[:3]}"
    assert misnumbered == [], (
        f"{len(misnumbered)} conversations not numbered 1..{turns}, e.g. {misnumbered[:3]}"
    )


def _ask(url: str, cid: str, msgs: list[dict[str, Any]]) -> str:
    r = httpx.post(
        f"{url}/v1/chat/completions",
        json={"model": MODEL, "messages": msgs, "max_tokens": 4},
        headers={"X-Conversation-Id": cid},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    return str(r.json()["choices"][0]["message"]["content"])


def test_a_replica_sends_the_next_turn_where_another_replica_re_pinned_it(
    pg_url: str, tmp_path: Path, server_factory: Any
) -> None:
    """B pins turn 1 to P; A, which sees P down, re-places turn 2 on Q; turn 3 on B (P looks healthy there,
    and B remembers the conversation on P) goes to Q: the pin is the database's, not B's memory."""
    a = server_factory(tmp_path / "a", db_url=pg_url, run_id="replicas", speedup=1000.0)
    b = server_factory(tmp_path / "b", db_url=pg_url, run_id="replicas", speedup=1000.0)
    for s in (a, b):
        s.runtime.scheduler_pause()  # no health poll brings P back on A
    cid = "re-pinned"
    msgs: list[dict[str, Any]] = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Go."}]
    for k, (served, down) in enumerate([(b, False), (a, True), (b, False)]):
        if down:
            pinned = b.call(lambda: b.runtime.router.active_pin(cid))
            a.call(lambda p=pinned: a.runtime.router.mark_down(p, "test: down as A sees it"))
        answer = _ask(served.base_url, cid, msgs)
        msgs += [{"role": "assistant", "content": answer}, {"role": "user", "content": f"Tool result {k}."}]
    assert a.runtime.writer.flush() and b.runtime.writer.flush()
    rows, pins = _ledger_rows(pg_url)
    (p,) = {i for t, i in rows[cid] if t == 1}
    assert len(pins[cid]) == 2  # P, then Q
    assert {i for t, i in rows[cid] if t > 1} == pins[cid] - {p}  # turns 2 and 3 on Q
    assert [t for t, _ in rows[cid]] == [1, 2, 3]
    seen_by_b = httpx.get(f"{b.base_url}/v1/conversations/{cid}", timeout=30).json()
    assert {seen_by_b["pinned_instance_id"]} == pins[cid] - {p}  # B shows the pin in force, not its first
