"""Fixtures: a real uvicorn server on a free 127.0.0.1 port running the app over simulated engines."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI

from api.app import create_app
from api.server import http_protocol
from api.settings import ApiSettings
from orchestrator.config import FleetConfig, parse_fleet
from orchestrator.fleet import tier_model
from orchestrator.runtime import Runtime, ServeSettings, SimInstance, build_runtime
from placement.base import Role

FLEET: dict[str, Any] = {
    "model": "Qwen3-0.6B",
    "tiers": [{"name": "a40", "gpu": "A40", "count": 4, "roles": ["prefill", "decode"]}],
    "backend": "sim",
}


def paper_instances(cfg: FleetConfig) -> list[SimInstance]:
    """The paper's testbed: 1 prefiller + 3 decoders of A40 (DESIGN.md section 1)."""
    tm = tier_model(cfg, "a40")
    return [SimInstance("a40-prefill-0", "a40", Role.PREFILL, tm)] + [
        SimInstance(f"a40-decode-{i}", "a40", Role.DECODE, tm) for i in range(3)
    ]


@dataclass
class Served:
    base_url: str
    runtime: Runtime
    app: FastAPI
    loop: asyncio.AbstractEventLoop
    db_url: str
    stop: Callable[[], None] = lambda: None  # stops the server (idempotent)

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the server's event loop (engines and router are not thread-safe)."""

        async def run() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(10)

    def acall(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(
    tmp_path: Path,
    *,
    speedup: float = 50.0,
    policy: str | None = None,
    instances: Callable[[FleetConfig], list[Any]] | None = paper_instances,
    poll_interval_s: float = 0.2,
    fast_path: bool = True,
    db_url: str | None = None,
    run_id: str | None = None,  # replicas sharing a ledger share a run (serve makes a new one per start)
    api_settings: ApiSettings | None = None,
    shared_state: str = "auto",  # replicas: turn numbers and pins in the PostgreSQL ledger (auto) or memory
) -> tuple[Served, Callable[[], None]]:
    db_url = db_url or f"sqlite:///{tmp_path / 'ledger.db'}"
    cfg = parse_fleet(dict(FLEET, database_url=db_url))
    settings = ServeSettings(
        fleet=Path("inline"),
        db=db_url,
        policy=policy,
        sim_speedup=speedup,
        poll_interval_s=poll_interval_s,
        ledger_flush_interval_s=0.01,
        run_id=run_id,
        shared_state=shared_state,  # type: ignore[arg-type]
    )
    rt = build_runtime(settings, cfg, instances=instances(cfg) if instances else None)
    app = create_app(settings, runtime=rt, fast_path=fast_path, api_settings=api_settings or ApiSettings())
    port = _free_port()
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        log_level="warning",
        lifespan="on",
        http=http_protocol(api_settings or ApiSettings()),  # the connection limits serve runs with
    )
    server = uvicorn.Server(config)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_until_complete, args=(server.serve(),), daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)

    def stop() -> None:
        if loop.is_closed():
            return
        server.should_exit = True
        # a graceful stop drains streams and the ledger writer's last group commit; on a loaded 2-core box
        # (vLLM engines of another test running) it took over 20 s once: wait longer, and say so if it hangs
        thread.join(90)
        if thread.is_alive():
            raise RuntimeError("the test server did not stop within 90 s of should_exit")
        loop.close()

    return Served(f"http://127.0.0.1:{port}", rt, app, loop, db_url, stop), stop


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    s, stop = start_server(tmp_path)
    try:
        yield s
    finally:
        stop()


@pytest.fixture(scope="module")
def served_fastapi_only(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """Like served_shared but every request goes through the FastAPI routes (no raw-ASGI fast path)."""
    s, stop = start_server(tmp_path_factory.mktemp("served-slow"), speedup=1000.0, fast_path=False)
    try:
        yield s
    finally:
        stop()


@pytest.fixture(scope="module")
def served_shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """One server for a module of tests that do not change the fleet (bad input, schema fuzzing)."""
    s, stop = start_server(tmp_path_factory.mktemp("served"), speedup=1000.0)
    try:
        yield s
    finally:
        stop()


@pytest.fixture
def server_factory() -> Iterator[Callable[..., Served]]:
    """Start extra servers (start_server's arguments); all are stopped at the end of the test."""
    stops: list[Callable[[], None]] = []

    def start(tmp_path: Path, **kwargs: Any) -> Served:
        s, stop = start_server(tmp_path, **kwargs)
        stops.append(stop)
        return s

    try:
        yield start
    finally:
        for stop in reversed(stops):
            stop()


@pytest.fixture(scope="module")
def served_secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """A server with API keys required (auth on, a scrape token, a 0.5 s key cache) and three keys made
    with the real key store: `.keys` = {"a": tenant acme, "b": tenant bravo, "admin": admin of tenant ops}."""
    from energy.api_keys import KeyStore

    s, stop = start_server(
        tmp_path_factory.mktemp("secured"),
        speedup=1000.0,
        api_settings=ApiSettings(
            auth="on", scrape_token="scrape-token-for-tests-0123456789", auth_cache_ttl_s=0.5
        ),
    )
    store = KeyStore.open(s.db_url)
    s.keys = {  # type: ignore[attr-defined]
        "a": store.create("acme")[0],
        "b": store.create("bravo")[0],
        "admin": store.create("ops", admin=True)[0],
    }
    store.close()
    try:
        yield s
    finally:
        stop()
