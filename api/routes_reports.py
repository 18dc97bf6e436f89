"""`GET /v1/reports/energy`: the energy report over HTTP, same options and query code as the CLI.

Query parameters: ``by`` (conversation|tenant|tier|policy|engine), ``since``/``until`` (ISO 8601, UTC if no
offset), ``format`` (json|csv|html|table), ``run_id`` (repeatable), ``tenant`` (admin keys: one tenant).
Bad values -> 400 with an OpenAI-style error body (the app's ConServeError handler). The ledger comes from
``app.state.ledger``.

Tenants (api/auth.py): a tenant's key sees its own conversations only (ids as the tenant sent them) and
per-tenant totals; ``by=tier|policy|engine`` (the whole fleet's energy) and other tenants need an admin key.
``by=tenant`` sums, per tenant, the energy attributed to its conversations and their tokens (idle energy
belongs to no tenant: it is in the fleet reports).
"""

from __future__ import annotations

import asyncio
import dataclasses
from enum import StrEnum
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response

from api.auth import Principal, PrincipalDep, require_admin
from api.errors import ApiError
from api.schemas import ErrorResponse
from energy.api_keys import TENANT_PATTERN
from energy.estimate import DEFAULT_GRID_G_PER_KWH
from energy.reports import (
    Column,
    Format,
    GroupBy,
    Report,
    build_report,
    parse_choice,
    parse_time,
    render,
    row_totals,
)

router = APIRouter(tags=["reports"])

NO_TENANT = "(none)"  # conversations served with auth off


class ReportBy(StrEnum):
    CONVERSATION = "conversation"
    TENANT = "tenant"
    TIER = "tier"
    POLICY = "policy"
    ENGINE = "engine"


def tenant_of(conversation_id: str) -> tuple[str, str]:
    """(tenant, the tenant's own id) of a ledger conversation id (api/auth.py scoped_id)."""
    tenant, sep, rest = conversation_id.partition("/")
    return (tenant, rest) if sep else (NO_TENANT, conversation_id)


def scope_report(report: Report, tenant: str | None) -> Report:
    """A by-conversation report cut to one tenant's conversations (ids without the tenant prefix), with
    totals over them (None: every tenant, ids as stored)."""
    if tenant is None:
        return report
    rows = []
    for r in report.rows:
        owner, own_id = tenant_of(str(r["conversation_id"]))
        if owner == tenant:
            rows.append({**r, "conversation_id": own_id})
    totals = {"tenant": tenant, **row_totals(rows), "conversations": len(rows)}
    notes = (
        *report.notes,
        f"tenant {tenant}: its conversations only; totals exclude idle energy (it belongs to no tenant)",
    )
    # the HTML plots of the fleet (tier timeline, tokens/J per policy) are not the tenant's to see
    return dataclasses.replace(
        report,
        rows=tuple(rows),
        totals=totals,
        notes=notes,
        conversation_joules=(),
        tier_timeline=(),
        policy_tokens_per_j=(),
    )


def tenant_report(report: Report, only: str | None) -> Report:
    """Per-tenant totals from a by-conversation report: conversations, turns, tokens, joules, J/token."""
    convs: dict[str, list[dict[str, Any]]] = {}
    for r in report.rows:
        owner, _ = tenant_of(str(r["conversation_id"]))
        if only is None or owner == only:
            convs.setdefault(owner, []).append(r)
    rows = [
        {
            "tenant": owner,
            "conversations": len(rs),
            "turns": sum(int(r.get("turns") or 0) for r in rs),
            **row_totals(rs),
        }
        for owner, rs in sorted(convs.items())
    ]
    cols = (
        Column("tenant", "tenant"),
        Column("conversations", "conversations"),
        Column("turns", "turns"),
        Column("tokens", "tokens"),
        Column("joules", "energy", "J"),
        Column("j_per_token", "J/token", "J"),
        Column("tokens_per_j", "tokens/J"),
        Column("measured_share", "measured share"),
    )
    totals = {
        "tenants": len(rows),
        **row_totals(rows),
        "conversations": sum(r["conversations"] for r in rows),
        "idle_j": report.totals.get("idle_j") if only is None else None,
    }
    notes = (
        *report.notes,
        "by tenant: energy attributed to each tenant's conversations; idle energy belongs to no tenant "
        f"(totals.idle_j); {NO_TENANT!r}: conversations served with auth off",
    )
    fleet = only is None  # an admin's report of every tenant keeps the fleet plots
    return dataclasses.replace(
        report,
        columns=cols,
        rows=tuple(rows),
        totals=totals,
        notes=notes,
        conversation_joules=(),
        tier_timeline=report.tier_timeline if fleet else (),
        policy_tokens_per_j=report.policy_tokens_per_j if fleet else (),
    )


def _scope(principal: Principal, by: ReportBy, tenant: str | None) -> str | None:
    """The tenant the report is cut to (None: all), checking what the caller may see."""
    if tenant is not None:
        require_admin(principal, "a report of another tenant (?tenant=)")
        return tenant
    if principal.admin:
        return None
    if by not in (ReportBy.CONVERSATION, ReportBy.TENANT):
        require_admin(principal, f"by={by} (the whole fleet's energy)")
    return principal.tenant


@router.get(
    "/v1/reports/energy",
    summary="Energy per conversation, tenant, tier, policy or engine (same as `orchestrator report energy`)",
    responses={
        200: {"content": {"application/json": {}, "text/csv": {}, "text/html": {}, "text/plain": {}}},
        400: {"model": ErrorResponse, "description": "a bad query parameter (named)"},
        401: {"model": ErrorResponse, "description": "no, an invalid or a revoked API key"},
        403: {"model": ErrorResponse, "description": "needs an admin key (fleet-wide or another tenant)"},
    },
)
async def energy_report(
    request: Request,
    principal: PrincipalDep,
    by: Annotated[ReportBy, Query(description="group rows by")] = ReportBy.CONVERSATION,
    since: Annotated[
        str | None, Query(max_length=64, description="ISO 8601 start (UTC if no offset)")
    ] = None,
    until: Annotated[str | None, Query(max_length=64, description="ISO 8601 end, exclusive")] = None,
    format: Annotated[Format, Query(description="json | csv | html | table")] = Format.JSON,  # noqa: A002
    run_id: Annotated[
        list[str] | None, Query(max_length=128, description="only these runs (repeatable)")
    ] = None,
    tenant: Annotated[
        str | None, Query(pattern=TENANT_PATTERN, description="admin keys: only this tenant")
    ] = None,
) -> Response:
    ledger: Any = request.app.state.ledger
    scope = _scope(principal, by, tenant)
    group = GroupBy.CONVERSATION if by in (ReportBy.CONVERSATION, ReportBy.TENANT) else GroupBy(str(by))
    fmt = parse_choice(str(format), Format, "format")
    t0, t1 = parse_time(since, "since"), parse_time(until, "until")
    rt = getattr(request.app.state, "runtime", None)  # fleet.yaml's grid intensity (gCO2e per kWh)
    grid = rt.cfg.grid_carbon_g_per_kwh if rt is not None else DEFAULT_GRID_G_PER_KWH
    report = await asyncio.to_thread(
        build_report, ledger, group, t0, t1, tuple(run_id or ()), grid_g_per_kwh=grid
    )
    if by == ReportBy.TENANT:
        report = tenant_report(report, scope)
    elif scope is not None:
        if group != GroupBy.CONVERSATION:  # an admin's ?tenant= on a fleet-wide grouping
            raise ApiError(
                400, f"tenant: only with by=conversation or by=tenant, not by={by}", param="tenant"
            )
        report = scope_report(report, scope)
    if fmt == Format.JSON:
        return JSONResponse(report.to_dict())
    text = await asyncio.to_thread(render, report, fmt)
    if fmt == Format.HTML:
        return HTMLResponse(text)
    if fmt == Format.CSV:
        return PlainTextResponse(text, media_type="text/csv")
    return PlainTextResponse(text)
