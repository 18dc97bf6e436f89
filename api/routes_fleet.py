"""Resource endpoints: GET /v1/conversations/{id}, GET /v1/fleet, GET /health, GET /ready, GET /metrics."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Path, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from api.routes_openai import RuntimeDep
from api.schemas import (
    CONVERSATION_ID_MAX_CHARS,
    ConversationEnergy,
    ConversationResponse,
    ErrorResponse,
    FleetResponse,
    Health,
    InstanceStatus,
    PinView,
    TurnView,
)
from energy.records import ConversationView
from orchestrator.router import ConversationNotFound

router = APIRouter()


def conversation_response(view: ConversationView, active: bool) -> ConversationResponse:
    turns = [
        TurnView(
            turn=t.turn,
            request_id=t.request_id,
            instance_id=t.instance_id,
            tier=t.tier,
            prefill_instance_id=t.prefill_instance_id,
            remote_prefill=t.remote_prefill,
            arrival_at=t.arrival_at,
            first_token_at=t.first_token_at,
            last_token_at=t.last_token_at,
            ttft_s=(t.first_token_at - t.arrival_at).total_seconds() if t.first_token_at else None,
            prompt_tokens=t.prompt_tokens,
            cached_tokens=t.cached_tokens,
            output_tokens=t.output_tokens,
            finish_reason=t.finish_reason,
            is_final=t.is_final,
            status=str(t.status),
        )
        for t in view.turns
    ]
    pins = [PinView(instance_id=p.instance_id, at=p.at, reason=p.reason) for p in view.pins]
    return ConversationResponse(
        conversation_id=view.conversation_id,
        run_id=view.run_id,
        policy=view.policy,
        pinned_instance_id=view.pinned_instance_id,
        active=active,
        pins=pins,
        turns=turns,
        final_turn=view.final_turn,
        ttfet_s=view.ttfet_s,
        e2e_s=view.e2e_s,
        replacements=sum(1 for p in view.pins if p.reason.startswith("replaced")),
    )


@router.get(
    "/v1/conversations/{conversation_id}",
    response_model=ConversationResponse,
    responses={404: {"model": ErrorResponse, "description": "unknown conversation id"}},
    tags=["conversations"],
    summary="A conversation: its pin(s), turns, timings and TTFET so far",
)
async def get_conversation(
    rt: RuntimeDep,
    request: Request,
    conversation_id: Annotated[str, Path(min_length=1, max_length=CONVERSATION_ID_MAX_CHARS)],
) -> ConversationResponse:
    view = rt.router.conversation(conversation_id)
    active = rt.router.active_pin(conversation_id) is not None
    if view is None:  # not in memory (ended, expired, another replica, a one-turn request): the ledger
        view = await asyncio.to_thread(rt.ledger.get_conversation, conversation_id)
    if view is None:
        raise ConversationNotFound(
            f"conversation {conversation_id!r} is unknown (run {rt.settings.run_id!r}). To fix: use the id "
            "sent in X-Conversation-Id (or returned in that response header)."
        )
    energy = None
    if rt.accountant is not None:  # the attributed figure, and whether it is final (issue 14 item 6)
        joules, measured, _ = await asyncio.to_thread(rt.ledger.conversation_energy, conversation_id)
        last = max((t.last_token_at or t.arrival_at for t in view.turns), default=None)
        est = getattr(getattr(request.app.state.metrics, "estimates", None), "conversation_j", None)
        energy = ConversationEnergy(
            attributed_j=joules,
            measured_share=measured / joules if joules > 0 else None,
            settled=last is not None
            and rt.accountant.settled_through(last)
            and await asyncio.to_thread(rt.writer.flush, 5.0),
            estimated_j=est(conversation_id) if est is not None else None,
        )
        if energy.settled:  # the writer has run every job handed to it: read the final figure
            joules, measured, _ = await asyncio.to_thread(rt.ledger.conversation_energy, conversation_id)
            energy.attributed_j = joules
            energy.measured_share = measured / joules if joules > 0 else None
    out = conversation_response(view, active)
    out.energy = energy
    return out


@router.get(
    "/v1/fleet",
    response_model=FleetResponse,
    tags=["fleet"],
    summary="Instances: roles, tiers, health, KV occupancy, queues, pins",
)
async def get_fleet(rt: RuntimeDep) -> FleetResponse:
    return FleetResponse(
        backend=rt.backend,
        policy=rt.policy_name,
        model=rt.served_model_name,
        fleet_source=rt.fleet_source,
        instances=[
            InstanceStatus(**s, power_cap=rt.power.view(s["instance_id"]) if rt.power is not None else None)
            for s in rt.router.instance_status()
        ],
        stats=dict(rt.router.stats),
    )


@router.get("/health", response_model=Health, tags=["ops"], summary="Liveness: the process answers")
async def health() -> Health:
    return Health(status="ok")


@router.get(
    "/ready",
    response_model=Health,
    tags=["ops"],
    responses={503: {"model": Health, "description": "no healthy decode-capable engine"}},
    summary="Readiness: at least one healthy decode-capable engine",
)
async def ready(rt: RuntimeDep) -> Response:
    healthy = [s["instance_id"] for s in rt.router.instance_status() if s["healthy"]]
    detail = {
        "healthy_instances": healthy,
        "ledger_pending": rt.writer.pending,
        "ledger_last_error": rt.writer.last_error,
    }
    if rt.router.ready():
        return JSONResponse(Health(status="ready", detail=detail).model_dump())
    return JSONResponse(Health(status="not ready", detail=detail).model_dump(), status_code=503)


@router.get(
    "/metrics",
    tags=["ops"],
    response_class=Response,
    summary="Prometheus metrics",
    responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}}},
)
async def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
