"""The FastAPI app: ``create_app(settings)`` builds everything; nothing is created at import time.

Routes: OpenAI-compatible serving (api/routes_openai.py), conversations/fleet/health/ready/metrics
(api/routes_fleet.py), and the energy reports router (api/routes_reports.py, the energy helper's) when
present. The serving runtime (orchestrator/runtime.py) is started and stopped by the app's lifespan; its
ledger queue is drained on shutdown.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from api.errors import install_error_handlers
from api.fastpath import PATHS, FastPath
from api.metrics import ApiMetrics
from orchestrator.runtime import Runtime, ServeSettings, build_runtime

log = logging.getLogger("conserve.api")


class ConServeApp(FastAPI):
    """FastAPI plus the raw-ASGI fast path (api/fastpath.py) for POST /v1/chat/completions and
    /v1/completions: those requests skip Starlette's middleware, routing and dependency injection; the
    fast path hands back to FastAPI (with the body) whatever it does not fully handle."""

    fast_path: FastPath | None = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        fp = self.fast_path
        if (
            fp is not None
            and scope["type"] == "http"
            and scope["method"] == "POST"
            and scope["path"] in PATHS
            and not scope.get("root_path")
        ):
            await fp(scope, receive, send, super().__call__)
            return
        await super().__call__(scope, receive, send)


def create_app(
    settings: ServeSettings | None = None, runtime: Runtime | None = None, *, fast_path: bool = True
) -> FastAPI:
    """Build the app. `runtime` may be given (tests); otherwise it is built from `settings` now.
    `fast_path=False` serves every request through the FastAPI routes (tests compare the two)."""
    settings = settings or (runtime.settings if runtime is not None else ServeSettings())
    rt = runtime or build_runtime(settings)
    metrics = ApiMetrics()
    metrics.attach_fleet(rt.router.instance_status)
    if rt.accountant is not None:  # energy series on /metrics, usage.energy (issue 14 items 5, 6)
        metrics.attach_energy(rt.accountant, rt.cfg.grid_carbon_g_per_kwh)
    rt.router.observer = metrics

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await rt.start()
        try:
            yield
        finally:
            await rt.stop()

    app = ConServeApp(
        title="ConServe",
        version="0.1.0",
        summary="Energy-aware, conversation-level orchestration for agentic LLM serving (OpenAI-compatible).",
        description=(
            "OpenAI-compatible serving with conversation pinning. Send turns of one conversation with the "
            "`X-Conversation-Id` header (or body `conversation_id`; the header wins); mark the last turn "
            "with "
            '`X-Conversation-Final: true` (or body `conserve: {"final": true}`). Errors use OpenAI\'s body '
            '`{"error": {"message", "type", "param", "code"}}`.'
        ),
        lifespan=lifespan,
    )
    app.state.runtime = rt
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.ledger = rt.ledger
    install_error_handlers(app)
    if fast_path:
        app.fast_path = FastPath(rt, metrics)

    from api import routes_fleet, routes_openai

    app.include_router(routes_openai.router)
    app.include_router(routes_fleet.router)
    try:
        reports = importlib.import_module("api.routes_reports")
    except ModuleNotFoundError as err:
        if err.name != "api.routes_reports":
            raise
    else:
        app.include_router(reports.router)
    return app
