"""Conversation heads on a real PostgreSQL (energy/heads.py): two stores (two replicas) deciding turn numbers
and pins for the same conversations at the same time agree."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from energy.errors import EnergyError
from energy.heads import HeadsUnavailable, PgConversationHeads, psycopg_conninfo
from energy.ledger import Ledger

pytestmark = pytest.mark.postgres

T0 = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)


def _stores(url: str, n: int = 2, ttl_s: float = 900.0) -> list[PgConversationHeads]:
    Ledger(url).upgrade()
    return [PgConversationHeads(url, pin_ttl_s=ttl_s, run_id=f"r{i}") for i in range(n)]


def test_concurrent_claims_from_two_replicas_get_consecutive_numbers(pg_url: str) -> None:
    a, b = _stores(pg_url)

    async def run() -> list[int]:
        claims = [s.claim(f"c{i % 5}", T0) for i in range(200) for s in (a, b)]
        got = await asyncio.gather(*claims)
        await a.aclose()
        await b.aclose()
        return [c.turn for c in got]

    turns = asyncio.run(run())
    per_conv: dict[int, list[int]] = {}
    for i, t in enumerate(turns):
        per_conv.setdefault((i // 2) % 5, []).append(t)
    for conv_turns in per_conv.values():  # each conversation: 1..80, each number once
        assert sorted(conv_turns) == list(range(1, 81))


def test_a_pin_race_has_one_winner_and_both_replicas_use_it(pg_url: str) -> None:
    a, b = _stores(pg_url)

    async def run() -> tuple[str | None, str | None, str | None]:
        await a.claim("c", T0)
        pa, pb = await asyncio.gather(a.move_pin("c", None, "d1"), b.move_pin("c", None, "d2"))
        after = (await b.claim("c", T0 + timedelta(seconds=1))).pin
        await a.aclose()
        await b.aclose()
        return pa, pb, after

    pa, pb, after = asyncio.run(run())
    assert pa == pb == after and pa in ("d1", "d2")


def test_pin_moves_only_from_the_expected_decoder_and_expires_after_the_ttl(pg_url: str) -> None:
    (s,) = _stores(pg_url, 1, ttl_s=60.0)

    async def run() -> list[object]:
        out: list[object] = []
        c1 = await s.claim("c", T0)
        out.append((c1.turn, c1.pin, c1.first_arrival_at))
        out.append(await s.move_pin("c", None, "d1"))
        out.append(await s.move_pin("c", "d0", "d2"))  # stale expectation: the pin stays d1
        await s.finish("c", 1, context_tokens=120, decoder="d1", ended=False, at=T0 + timedelta(seconds=1))
        c2 = await s.claim("c", T0 + timedelta(seconds=30))
        out.append((c2.turn, c2.pin, c2.context_tokens, c2.last_decoder))
        await s.finish("c", 1, context_tokens=999, decoder="d9", ended=True, at=T0)  # not the latest: no-op
        c3 = await s.claim("c", T0 + timedelta(seconds=200))  # idle past the 60 s TTL: unpinned
        out.append((c3.turn, c3.pin, c3.context_tokens))
        await s.move_pin("c", None, "d3")
        await s.finish("c", 3, context_tokens=5, decoder="d3", ended=True, at=T0 + timedelta(seconds=201))
        c4 = await s.claim("c", T0 + timedelta(seconds=202))  # the client ended it: pin released
        out.append((c4.turn, c4.pin, c4.first_arrival_at))
        await s.aclose()
        return out

    first, pinned, kept, second, third, fourth = asyncio.run(run())
    assert first == (1, None, T0)
    assert pinned == "d1" and kept == "d1"
    assert second == (2, "d1", 120, "d1")
    assert third == (3, None, 120)
    assert fourth == (4, None, T0)


def test_an_unreachable_database_raises_heads_unavailable(pg_url: str) -> None:
    (s,) = _stores(pg_url, 1)
    s._conninfo = s._conninfo.rsplit("/", 1)[0] + "/no_such_database"

    with pytest.raises(HeadsUnavailable, match="claiming a turn failed"):
        asyncio.run(s.claim("c", T0))


def test_heads_need_postgresql() -> None:
    with pytest.raises(EnergyError, match="needs a PostgreSQL ledger"):
        psycopg_conninfo("sqlite:///x.db")


def _record_turn(url: str, run_id: str, cid: str, turn: int) -> None:
    from energy.records import TurnRecord, TurnStatus

    with Ledger(url, run_id=run_id) as lg:
        lg.record_turn(
            TurnRecord(
                conversation_id=cid, turn=turn, request_id=f"{cid}-{turn}", instance_id="d1", arrival_at=T0,
                first_token_at=T0, last_token_at=T0, prompt_tokens=10, output_tokens=2, finish_reason="stop",
                is_final=False, status=TurnStatus.OK, prefill_instance_id=None, remote_prefill=False,
                tier="a40", cached_tokens=0, policy="conserve",
            )
        )  # fmt: skip


@pytest.mark.parametrize(
    ("a_dies", "a_recorded", "b_gets"),
    [
        (False, False, 2),  # A alive, its turn 1 still running: B's turn is 2
        (True, True, 2),  # A died after recording turn 1: numbering goes on
        (True, False, 1),  # A died before turn 1 was durable: numbering goes on from what was durable
    ],
    ids=["alive", "died-after-recording", "died-mid-turn"],
)
def test_a_turn_of_a_replica_that_died_before_recording_it_is_numbered_again(
    pg_url: str, a_dies: bool, a_recorded: bool, b_gets: int
) -> None:
    Ledger(pg_url).upgrade()
    a = PgConversationHeads(pg_url, pin_ttl_s=900, run_id="ra")
    b = PgConversationHeads(pg_url, pin_ttl_s=900, run_id="rb")

    async def run() -> tuple[int, str | None, int]:
        assert (await a.claim("c", T0)).turn == 1
        await a.move_pin("c", None, "d1")
        if a_recorded:
            await asyncio.to_thread(_record_turn, pg_url, "ra", "c", 1)
        if a_dies:
            await a.aclose()  # its connections (and its replica lock) end, as when the process dies
        got = await b.claim("c", T0 + timedelta(seconds=1))
        again = await b.claim("c", T0 + timedelta(seconds=2))  # B's own previous claim: always the next
        await a.aclose()
        await b.aclose()
        return got.turn, got.pin, again.turn

    turn, pin, again = asyncio.run(run())
    assert (turn, pin, again) == (b_gets, "d1", b_gets + 1)
