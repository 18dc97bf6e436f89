"""Acceptance (issue 13 item 4): kill -9 of `orchestrator serve` (its own process, simulated engines, SQLite
file ledger) under load from concurrent streaming multi-turn clients, then a restart on the same ledger: every
turn a client received a complete answer for (up to ``data: [DONE]``) is in the ledger, and the conversations'
turn numbers go on from what was durable (1..n, each once)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

FLEET = """\
model: Qwen3-0.6B
backend: sim
tiers:
  - {name: a40, gpu: A40, count: 6, roles: [prefill, decode]}
database_url: DB
"""
CLIENTS = 24
MIN_ANSWERED_BEFORE_KILL = 150  # turns answered completely before the crash (all clients together)
TURNS_AFTER_RESTART = 2  # per conversation


@dataclass
class Conversation:
    cid: str
    messages: list[dict[str, Any]]
    answered: list[str] = field(default_factory=list)  # request ids of complete answers, in order
    before_crash: int = 0  # how many of them were answered before the kill


def _start(argv: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 90
    while True:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            with urllib.request.urlopen(url + "/ready", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        assert time.monotonic() < deadline, "not ready after 90 s:\n" + log.read_text()[-3000:]
        time.sleep(0.2)


async def _turn(client: httpx.AsyncClient, url: str, conv: Conversation) -> bool:
    """One streamed turn; True (and the answer appended to the history) only when [DONE] arrived."""
    body = {"model": "Qwen3-0.6B", "messages": conv.messages, "max_tokens": 12, "stream": True}
    text: list[str] = []
    request_id = None
    async with client.stream(
        "POST", url + "/v1/chat/completions", json=body, headers={"X-Conversation-Id": conv.cid}
    ) as r:
        if r.status_code != 200:
            return False
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                assert request_id is not None
                conv.answered.append(request_id)
                conv.messages += [
                    {"role": "assistant", "content": "".join(text)},
                    {"role": "user", "content": f"go on ({len(conv.answered)})"},
                ]
                return True
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return False
            request_id = chunk["id"].removeprefix("chatcmpl-")  # the simulated engine's id: chatcmpl-<rid>
            for c in chunk.get("choices") or ():
                text.append((c.get("delta") or {}).get("content") or "")
    return False


async def _load_until_killed(url: str, convs: list[Conversation], kill: Callable[[], None]) -> None:
    """Every client runs turns back to back; once enough turns are answered the server is killed."""
    stop = asyncio.Event()

    async def client(conv: Conversation, http: httpx.AsyncClient) -> None:
        while not stop.is_set():
            try:
                await _turn(http, url, conv)
            except (httpx.HTTPError, OSError):
                return  # the server died under this request: not a complete answer

    async def killer() -> None:
        while sum(len(c.answered) for c in convs) < MIN_ANSWERED_BEFORE_KILL:
            await asyncio.sleep(0.005)
        kill()
        stop.set()

    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=CLIENTS)) as http:
        await asyncio.wait_for(asyncio.gather(killer(), *(client(c, http) for c in convs)), 180)


async def _continue(url: str, convs: list[Conversation]) -> None:
    async with httpx.AsyncClient(timeout=60) as http:

        async def go(conv: Conversation) -> None:
            for _ in range(TURNS_AFTER_RESTART):
                assert await _turn(http, url, conv), f"{conv.cid}: no complete answer after the restart"

        await asyncio.gather(*(go(c) for c in convs))


def test_kill_9_under_load_loses_no_answered_turn_and_numbering_goes_on(
    tmp_path: Path, free_port: Callable[[], int]
) -> None:
    from energy.ledger import Ledger

    db = f"sqlite:///{tmp_path / 'ledger.db'}"
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(FLEET.replace("DB", db))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [sys.executable, "-c", "from orchestrator.cli import main; main()", "serve", "--fleet", str(fleet),
            "--port", str(port), "--sim-speedup", "50", "--log-level", "warning"]  # fmt: skip
    env = dict(os.environ, CONSERVE_ENERGY_INTERVAL_S="0")
    log = tmp_path / "serve.log"
    convs = [
        Conversation(
            f"crash-{i}", [{"role": "system", "content": "agent " * 50}, {"role": "user", "content": "go"}]
        )
        for i in range(CLIENTS)
    ]
    proc = _start(argv, log, env)
    try:
        _wait_ready(url, proc, log)

        def kill() -> None:
            os.kill(proc.pid, signal.SIGKILL)  # the server only: its ledger worker is orphaned, as in a crash

        asyncio.run(_load_until_killed(url, convs, kill))
        for c in convs:  # every answer the clients read until now left the server before the kill
            c.before_crash = len(c.answered)
        proc.wait(10)
        with pytest.raises(ProcessLookupError):  # no process of the first server is left
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                os.killpg(proc.pid, 0)
                time.sleep(0.1)
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError("a process of the killed server outlived it by 20 s")
        answered_before = {rid for c in convs for rid in c.answered}
        assert len(answered_before) >= MIN_ANSWERED_BEFORE_KILL

        proc = _start(argv, log, env)  # the same ledger
        _wait_ready(url, proc, log)
        asyncio.run(_continue(url, convs))
    finally:
        with_children = proc.poll() is None
        if with_children:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)

    ledger = Ledger(db, run_id="live")
    by_rid = {t.request_id: t for _, t in ledger.turns()}
    missing = sorted(rid for rid in answered_before if rid not in by_rid)
    assert not missing, f"{len(missing)} turns answered before the crash are not in the ledger: {missing[:5]}"
    for c in convs:
        assert all(by_rid[rid].status == "ok" for rid in c.answered)
        ok_turns = sorted(
            t.turn for _, t in ledger.turns() if t.conversation_id == c.cid and t.status == "ok"
        )
        assert ok_turns == list(range(1, len(ok_turns) + 1)), f"{c.cid}: turns {ok_turns}"
        numbers = [by_rid[rid].turn for rid in c.answered]
        assert numbers == sorted(set(numbers)), f"{c.cid}: answered turns numbered {numbers}"
        # after the restart the numbering goes on from what was durable (at least what the client saw)
        if c.before_crash:
            assert numbers[c.before_crash] > numbers[c.before_crash - 1]
        assert len(c.answered) == c.before_crash + TURNS_AFTER_RESTART
    in_ledger = sum(1 for t in by_rid.values() if t.status == "ok")
    print(
        f"crash test: {len(answered_before)} turns answered before kill -9, all in the ledger; "
        f"{CLIENTS * TURNS_AFTER_RESTART} answered after the restart; {in_ledger} ok turns in the ledger"
    )
    ledger.close()
