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

from api.auth import Authenticator
from api.docs import install_docs
from api.errors import install_error_handlers
from api.fastpath import PATHS, FastPath
from api.limits import Admission, Edge, replay
from api.metrics import ApiMetrics
from api.settings import ApiSettings
from orchestrator.runtime import Runtime, ServeSettings, build_runtime

log = logging.getLogger("conserve.api")


class ConServeApp(FastAPI):
    """FastAPI plus the raw-ASGI fast path (api/fastpath.py) for POST /v1/chat/completions and
    /v1/completions: those requests skip Starlette's middleware, routing and dependency injection; the
    fast path hands back to FastAPI (with the body) whatever it does not fully handle."""

    fast_path: FastPath | None = None
    edge: Edge | None = None  # api/limits.py: auth, admission and body limits of the completion endpoints

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        edge = self.edge
        if (
            edge is not None
            and scope["type"] == "http"
            and scope["method"] == "POST"
            and scope["path"] in PATHS
            and not scope.get("root_path")
        ):
            admitted = await edge.admit(scope, receive, send, PATHS[scope["path"]][1])
            if admitted is None:  # refused (401, 413, 429, 503, ...): answered by the edge
                return
            tenant, body = admitted
            try:
                fp = self.fast_path
                if fp is not None:
                    await fp(scope, receive, send, super().__call__, body)
                else:
                    await super().__call__(scope, replay(body, receive), send)
            finally:
                edge.admission.leave(tenant)
            return
        await super().__call__(scope, receive, send)


def create_app(
    settings: ServeSettings | None = None,
    runtime: Runtime | None = None,
    *,
    fast_path: bool = True,
    api_settings: ApiSettings | None = None,
) -> FastAPI:
    """Build the app. `runtime` may be given (tests); otherwise it is built from `settings` now.
    `fast_path=False` serves every request through the FastAPI routes (tests compare the two).
    `api_settings` (auth, limits; default: from the environment) decide whether keys are required: with
    ``auth`` "auto", when `settings.host` is not a loopback address."""
    settings = settings or (runtime.settings if runtime is not None else ServeSettings())
    api_settings = api_settings or ApiSettings()
    rt = runtime or build_runtime(settings)
    from energy.api_keys import KeyStore

    scrape = api_settings.scrape_token.get_secret_value() if api_settings.scrape_token else None
    auth = Authenticator(
        KeyStore.for_ledger(rt.ledger),
        enabled=api_settings.auth_required(settings.host),
        scrape_token=scrape,
        cache_ttl_s=api_settings.auth_cache_ttl_s,
    )
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
        docs_url=None,  # api/docs.py serves /docs and /redoc with local assets
        redoc_url=None,
    )
    app.state.runtime = rt
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.ledger = rt.ledger
    admission = Admission(api_settings)
    app.state.auth = auth
    app.state.api_settings = api_settings
    app.state.admission = admission
    install_error_handlers(app)
    install_docs(app)
    app.edge = Edge(api_settings, auth, metrics, admission)
    if fast_path:
        app.fast_path = FastPath(rt, metrics, auth, admission)

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
