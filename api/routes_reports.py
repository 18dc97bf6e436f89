"""`GET /v1/reports/energy`: the energy report over HTTP, same options and query code as the CLI.

Query parameters: ``by`` (conversation|tier|policy|engine), ``since``/``until`` (ISO 8601, UTC if no offset),
``format`` (json|csv|html|table), ``run_id`` (repeatable). Bad values -> 400 with an OpenAI-style error body
(the app's ConServeError handler). The ledger comes from ``app.state.ledger``.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response

from energy.estimate import DEFAULT_GRID_G_PER_KWH
from energy.reports import Format, GroupBy, build_report, parse_choice, parse_time, render

router = APIRouter(tags=["reports"])


@router.get(
    "/v1/reports/energy",
    summary="Energy per conversation, tier, policy or engine (same as `orchestrator report energy`)",
    responses={200: {"content": {"application/json": {}, "text/csv": {}, "text/html": {}, "text/plain": {}}}},
)
async def energy_report(
    request: Request,
    by: Annotated[GroupBy, Query(description="group rows by")] = GroupBy.CONVERSATION,
    since: Annotated[
        str | None, Query(max_length=64, description="ISO 8601 start (UTC if no offset)")
    ] = None,
    until: Annotated[str | None, Query(max_length=64, description="ISO 8601 end, exclusive")] = None,
    format: Annotated[Format, Query(description="json | csv | html | table")] = Format.JSON,  # noqa: A002
    run_id: Annotated[
        list[str] | None, Query(max_length=128, description="only these runs (repeatable)")
    ] = None,
) -> Response:
    ledger: Any = request.app.state.ledger
    group = parse_choice(str(by), GroupBy, "by")
    fmt = parse_choice(str(format), Format, "format")
    t0, t1 = parse_time(since, "since"), parse_time(until, "until")
    rt = getattr(request.app.state, "runtime", None)  # fleet.yaml's grid intensity (gCO2e per kWh)
    grid = rt.cfg.grid_carbon_g_per_kwh if rt is not None else DEFAULT_GRID_G_PER_KWH
    report = await asyncio.to_thread(
        build_report, ledger, group, t0, t1, tuple(run_id or ()), grid_g_per_kwh=grid
    )
    if fmt == Format.JSON:
        return JSONResponse(report.to_dict())
    text = await asyncio.to_thread(render, report, fmt)
    if fmt == Format.HTML:
        return HTMLResponse(text)
    if fmt == Format.CSV:
        return PlainTextResponse(text, media_type="text/csv")
    return PlainTextResponse(text)
