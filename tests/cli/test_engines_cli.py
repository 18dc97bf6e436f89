"""`orchestrator engines up/status/down` and `orchestrator profile` argument errors, end to end in-process.

`engines up` runs against a stand-in "vLLM python" (a shell script serving /health on the given port) so the
CLI's fleet parsing, state file and process-group stop are exercised in seconds; real vLLM launches are in
tests/integration.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.engines import launcher

# Keeps "vllm.entrypoints.openai.api_server" in the server's argv: `engines down` signals only such processes.
FAKE_PY = """#!/bin/sh
ALL="$*"
while [ "$1" != "--port" ]; do shift; done
exec %s -c "
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers()
    def log_message(self, *a): pass
http.server.HTTPServer(('127.0.0.1', int(sys.argv[1])), H).serve_forever()
" "$2" vllm.entrypoints.openai.api_server
"""


@pytest.fixture
def fleet(tmp_path: Path, free_port: Callable[[], int]) -> Path:
    ports = [free_port(), free_port()]
    data = {
        "model": "Qwen3-0.6B",
        "backend": "vllm",
        "tiers": [{"name": "a40", "gpu": "A40", "count": 2}],
        "engines": [
            {"id": "p0", "tier": "a40", "role": "prefill", "url": f"http://127.0.0.1:{ports[0]}"},
            {"id": "d0", "tier": "a40", "role": "decode", "url": f"http://127.0.0.1:{ports[1]}"},
        ],
    }
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_up_status_down(tmp_path: Path, fleet: Path, free_port: Callable[[], int]) -> None:
    fake = tmp_path / "fakepy"
    fake.write_text(FAKE_PY % sys.executable)
    fake.chmod(0o755)
    model = tmp_path / "model"
    model.mkdir()
    state = tmp_path / "state.json"
    runner = CliRunner()
    common = ["--state", str(state), "--json"]
    up = runner.invoke(app, ["engines", "up", "--fleet", str(fleet), "--model", str(model),
                             "--vllm-python", str(fake), "--log-dir", str(tmp_path / "logs"),
                             "--side-channel-base", str(free_port()), "--timeout", "30",
                             *common])  # fmt: skip
    try:
        assert up.exit_code == 0, up.output
        rows = json.loads(up.output)["engines"]
        assert [(r["id"], r["role"]) for r in rows] == [("p0", "prefill"), ("d0", "decode")]
        assert rows[0]["side_channel_port"] + 1 == rows[1]["side_channel_port"]
        status = json.loads(runner.invoke(app, ["engines", "status", *common]).output)["engines"]
        assert all(r["alive"] and r["healthy"] for r in status)
        again = runner.invoke(app, ["engines", "up", "--fleet", str(fleet), "--model", str(model), *common])
        assert again.exit_code == 1 and "still running" in again.output
    finally:
        down = runner.invoke(app, ["engines", "down", *common])
    assert down.exit_code == 0 and json.loads(down.output)["stopped"] == ["p0", "d0"]
    assert not state.exists()
    assert not any(launcher._healthy(r["url"]) for r in rows)


def test_up_without_engines_is_one_line_error(tmp_path: Path) -> None:
    path = tmp_path / "f.yaml"
    path.write_text(
        yaml.safe_dump({"model": "Qwen3-0.6B", "tiers": [{"name": "a", "gpu": "A40", "count": 1}]})
    )
    res = CliRunner().invoke(
        app, ["engines", "up", "--fleet", str(path), "--state", str(tmp_path / "s.json")]
    )
    assert res.exit_code == 1 and "no engines" in res.output and "Traceback" not in res.output


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--meter", "nvlm"], "--meter"),
        (["--prefill-lengths", "32,abc"], "--prefill-lengths"),
        (["--decode-steps", "1"], "--decode-steps"),
        (["--tier", "A40"], "--model is required"),
    ],
    ids=["meter-typo", "bad-list", "one-step", "no-model"],
)
def test_profile_bad_arguments(tmp_path: Path, args: list[str], match: str) -> None:
    base = ["profile", "--engine", "http://127.0.0.1:9", "--tier", "A40", "--out", str(tmp_path / "p.yaml")]
    res = CliRunner().invoke(app, [*base, *args])
    assert res.exit_code == 1, res.output
    assert match in res.output and "Traceback" not in res.output
    assert not (tmp_path / "p.yaml").exists()


def test_profile_unreachable_engine(tmp_path: Path, free_port: Callable[[], int]) -> None:
    res = CliRunner().invoke(app, ["profile", "--engine", f"http://127.0.0.1:{free_port()}", "--tier", "A40",
                                   "--model", "Qwen3-0.6B", "--out", str(tmp_path / "p.yaml")])  # fmt: skip
    assert res.exit_code == 1 and "To fix" in res.output and "--engine" in res.output
