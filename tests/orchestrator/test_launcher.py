"""The local vLLM launcher: command lines per role (pure), fleet parsing, and process handling.

Process handling is exercised with a small real Python HTTP server standing in for vLLM's /health (the real
vLLM launch is covered by tests/integration). No mocks.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from orchestrator.engines import launcher
from orchestrator.engines.launcher import EngineSpec, LaunchSettings
from orchestrator.errors import ConfigError, EngineError
from placement.base import Role


def settings(tmp_path: Path, python: str = "/venv/bin/python", **kw: object) -> LaunchSettings:
    return LaunchSettings(python=Path(python), model_dir=tmp_path, log_dir=tmp_path / "logs", **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("role", "expects_nixl"),
    [(Role.PREFILL, True), (Role.DECODE, True), (Role.COLOCATED, False)],
    ids=["prefill", "decode", "colocated"],
)
def test_command_flags_per_role(tmp_path: Path, role: Role, expects_nixl: bool) -> None:
    spec = EngineSpec("e", role, port=8123, side_channel_port=5611, cpu_core=1)
    argv, env = launcher.engine_command(spec, settings(tmp_path, served_model_names=("m",)))
    assert argv[:3] == ["/venv/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    assert argv[argv.index("--port") + 1] == "8123" and argv[argv.index("--host") + 1] == "127.0.0.1"
    assert argv[argv.index("--served-model-name") + 1] == "m" and "--enforce-eager" in argv
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "1" and env["HF_HUB_OFFLINE"] == "1"
    if expects_nixl:
        cfg = json.loads(argv[argv.index("--kv-transfer-config") + 1])
        assert cfg == {"kv_connector": "NixlConnector", "kv_role": "kv_both", "kv_buffer_device": "cpu"}
        assert env["VLLM_NIXL_SIDE_CHANNEL_PORT"] == "5611"
    else:
        assert "--kv-transfer-config" not in argv and "VLLM_NIXL_SIDE_CHANNEL_PORT" not in env


def test_disaggregated_role_needs_side_channel_port(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="side_channel_port"):
        launcher.engine_command(EngineSpec("p", Role.PREFILL, port=1), settings(tmp_path))


def test_remote_host_refused(tmp_path: Path) -> None:
    spec = EngineSpec("p", Role.COLOCATED, port=1, host="10.0.0.5")
    with pytest.raises(ConfigError, match="not local"):
        launcher.engine_command(spec, settings(tmp_path))


def test_specs_from_urls_ports_cores_side_channels() -> None:
    specs = launcher.specs_from_urls(
        [("p0", "a40", Role.PREFILL, "http://127.0.0.1:8100"), ("d0", "a40", Role.DECODE, "http://127.0.0.1:8101"),
         ("c0", "a40", Role.COLOCATED, "http://localhost:8102")],
        side_channel_base=5700, cores=2,
    )  # fmt: skip
    assert [s.port for s in specs] == [8100, 8101, 8102]
    assert [s.side_channel_port for s in specs] == [5700, 5701, None]
    assert [s.cpu_core for s in specs] == [0, 1, 0]
    launcher.check_distinct_ports(specs)


@pytest.mark.parametrize(
    "url", ["127.0.0.1:8100", "http://127.0.0.1", "ftp://x:1"], ids=["no-scheme", "no-port", "ftp"]
)
def test_bad_urls_name_the_engine(url: str) -> None:
    with pytest.raises(ConfigError, match="engine 'x'"):
        launcher.specs_from_urls([("x", "t", Role.DECODE, url)])


def test_duplicate_ports_rejected() -> None:
    specs = [EngineSpec("a", Role.DECODE, 8100, side_channel_port=5600),
             EngineSpec("b", Role.DECODE, 8101, side_channel_port=5600)]  # fmt: skip
    with pytest.raises(ConfigError, match="port 5600 is used twice"):
        launcher.check_distinct_ports(specs)


# ---- processes: a stand-in "python" that serves /health after a delay, or dies -------------------------

FAKE_PY = """#!/bin/sh
# argv: -m vllm.entrypoints.openai.api_server --model D --host H --port P ...
while [ "$1" != "--port" ]; do shift; done
PORT=$2
echo "fake engine starting on $PORT"
[ -n "$FAKE_DIE" ] && { echo "boom: CUDA not found"; exit 3; }
sleep "${FAKE_DELAY:-0}"
exec %s -c "
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers()
    def log_message(self, *a): pass
http.server.HTTPServer(('127.0.0.1', int(sys.argv[1])), H).serve_forever()
" "$PORT"
"""


@pytest.fixture
def fake_python(tmp_path: Path) -> Path:
    p = tmp_path / "fakepy"
    p.write_text(FAKE_PY % sys.executable)
    p.chmod(0o755)
    return p


def test_start_wait_stop_roundtrip(tmp_path: Path, fake_python: Path, free_port: Callable[[], int]) -> None:
    spec = EngineSpec("c0", Role.COLOCATED, port=free_port(), cpu_core=0)
    s = settings(tmp_path, python=str(fake_python), startup_timeout_s=20)
    procs = launcher.start_engines([spec], s)
    try:
        assert launcher._healthy(spec.url)
        state = tmp_path / "state.json"
        launcher.save_state(state, procs)
        loaded = launcher.load_state(state)
        assert [(p.spec, p.pid) for p in loaded] == [(procs[0].spec, procs[0].pid)]
        with pytest.raises(EngineError, match="already in use"):
            launcher.start_engine(spec, s)
    finally:
        launcher.stop_engines(procs)
    assert procs[0].exit_code() is not None
    assert not launcher._healthy(spec.url)
    launcher.stop_engine(procs[0])  # idempotent


def test_early_exit_reports_log_tail(
    tmp_path: Path, fake_python: Path, monkeypatch: pytest.MonkeyPatch, free_port: Callable[[], int]
) -> None:
    monkeypatch.setenv("FAKE_DIE", "1")
    spec = EngineSpec("p0", Role.COLOCATED, port=free_port())
    with pytest.raises(EngineError, match="(?s)'p0' exited with code 3.*boom: CUDA not found"):
        launcher.start_engines([spec], settings(tmp_path, python=str(fake_python), startup_timeout_s=20))


def test_timeout_stops_the_engine_and_shows_log(
    tmp_path: Path, fake_python: Path, free_port: Callable[[], int]
) -> None:
    spec = EngineSpec("slow", Role.COLOCATED, port=free_port())
    s = settings(tmp_path, python=str(fake_python), startup_timeout_s=1.0, extra_env=(("FAKE_DELAY", "30"),))
    t0 = time.monotonic()
    with pytest.raises(EngineError, match="(?s)not healthy after 1 s.*fake engine starting"):
        launcher.start_engines([spec], s)
    assert time.monotonic() - t0 < 20
    assert not launcher._port_in_use(spec.port)


def test_missing_python_and_model_are_clear(tmp_path: Path, free_port: Callable[[], int]) -> None:
    spec = EngineSpec("c0", Role.COLOCATED, port=free_port())
    with pytest.raises(EngineError, match="vllm-venv.sh"):
        launcher.start_engine(spec, settings(tmp_path, python=str(tmp_path / "nope")))
    s = LaunchSettings(python=Path(sys.executable), model_dir=tmp_path / "none", log_dir=tmp_path)
    with pytest.raises(EngineError, match="tiny_model.py"):
        launcher.start_engine(spec, s)
