"""Acceptance (issue 4): `orchestrator serve --fleet examples/fleet.yaml` (simulated engines, SQLite) serves a
3-turn conversation sent with the official openai client, streaming and not: turn 1 is prefilled on a
prefiller, turns 2-3 go to the same decoder, GET /v1/conversations/{id} shows it, /metrics counts it.
The server is the real CLI in its own process, on the embedded default fleet."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest


@pytest.fixture
def served_default(repo_root: Path, tmp_path: Path, free_port: Callable[[], int]) -> Iterator[str]:
    port = free_port()
    log = tmp_path / "serve.log"
    argv = [sys.executable, "-c", "from orchestrator.cli import main; main()", "serve",
            "--fleet", str(repo_root / "examples" / "fleet.yaml"), "--port", str(port),
            "--db", f"sqlite:///{tmp_path / 'ledger.db'}", "--sim-speedup", "20",
            "--log-level", "warning"]  # fmt: skip
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                with urllib.request.urlopen(url + "/ready", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "not ready after 60 s:\n" + log.read_text()[-3000:]
            time.sleep(0.3)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def _metric(url: str, name: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in httpx.get(url + "/metrics").text.splitlines()
        if line.startswith((name + " ", name + "{"))
    )


def test_three_turn_conversation_on_the_embedded_default_fleet(served_default: str) -> None:
    from openai import OpenAI

    url = served_default
    client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
    (model,) = [m.id for m in client.models.list().data]
    fleet = httpx.get(url + "/v1/fleet").json()
    roles = {i["instance_id"]: i["role"] for i in fleet["instances"]}
    turns_before = _metric(url, "conserve_turns_total")
    cid, headers = "default-fleet-1", {"X-Conversation-Id": "default-fleet-1"}
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "You are a coding agent. Tools: bash, edit. " * 200},
        {"role": "user", "content": "The test suite fails; fix it."},
    ]
    for turn, stream in ((1, True), (2, False), (3, True)):
        if stream:
            parts = client.chat.completions.create(
                model=model, messages=messages, max_tokens=12, stream=True, extra_headers=headers
            )
            text = "".join(c.choices[0].delta.content or "" for c in parts if c.choices)
        else:
            r = client.chat.completions.create(
                model=model, messages=messages, max_tokens=12, extra_headers=headers
            )
            text = r.choices[0].message.content or ""
        assert text.startswith("[simulated]")
        messages += [
            {"role": "assistant", "content": text},
            {"role": "user", "content": f"tool output {turn}"},
        ]
    conv = httpx.get(f"{url}/v1/conversations/{cid}").json()
    t1, t2, t3 = conv["turns"]
    assert t1["remote_prefill"] and roles[t1["prefill_instance_id"]] == "prefill"
    decoder = t1["instance_id"]
    assert roles[decoder] == "decode"
    assert (
        t2["instance_id"] == t3["instance_id"] == decoder
        and not t2["remote_prefill"]
        and not t3["remote_prefill"]
    )
    assert conv["pinned_instance_id"] == decoder and conv["replacements"] == 0
    assert _metric(url, "conserve_turns_total") - turns_before == 3
    assert _metric(url, "conserve_kv_transfers_total") >= 1


def test_serve_help_lists_every_environment_only_setting() -> None:
    """`serve --help` names each ServeSettings field without a flag, as its environment variable."""
    import inspect

    from orchestrator.cli.serve import ENV_SETTINGS_EPILOG, serve
    from orchestrator.runtime import ServeSettings

    flags = set(inspect.signature(serve).parameters)
    env_only = [name for name in ServeSettings.model_fields if name not in flags]
    assert env_only, "every setting has a flag now: drop the epilog"
    for name in env_only:
        assert f"CONSERVE_{name.upper()} [" in ENV_SETTINGS_EPILOG, name
    out = subprocess.run(
        [sys.executable, "-c", "from orchestrator.cli import main; main()", "serve", "--help"],
        capture_output=True, text=True, check=True, env=dict(os.environ, COLUMNS="200"),
    )  # fmt: skip
    assert "CONSERVE_LEDGER_DURABLE" in out.stdout
