"""OpenAI-compatible serving endpoints: POST /v1/chat/completions, POST /v1/completions, GET /v1/models.

Conversation id: the ``X-Conversation-Id`` header, else the body field ``conversation_id`` (the header wins
when both are given); neither: a one-turn conversation (its id is returned in the ``X-Conversation-Id``
response header either way). Final turn marked by the client: ``X-Conversation-Final: true`` or body
``"conserve": {"final": true}``.

Streaming answers are SSE (``data: {chunk}`` ... ``data: [DONE]``); an engine failure after tokens were
streamed ends the stream with ``data: {"error": {..., "code": "engine_unavailable"}}`` then ``[DONE]``.
Chunks are passed through as the engine produced them (no re-validation).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import Response

from api.auth import OPEN, Principal, PrincipalDep, scoped_id
from api.errors import ApiError, sse_error, to_api_error
from api.metrics import TURN_CAPTURE
from api.schemas import (
    CONVERSATION_ID_MAX_CHARS,
    CONVERSATION_ID_PATTERN,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
)
from conserve.errors import ConServeError
from orchestrator.engines.base import RequestKind
from orchestrator.router import SSE_DONE, TurnInput, estimate_prompt_tokens
from orchestrator.runtime import Runtime

try:  # orjson is ~5x faster for the chunk-by-chunk SSE encoding; optional
    import orjson

    def _dumps(obj: Any) -> bytes:
        return orjson.dumps(obj)
except ImportError:  # pragma: no cover

    def _dumps(obj: Any) -> bytes:
        return json.dumps(obj, separators=(",", ":")).encode()


async def get_runtime(request: Request) -> Runtime:
    return request.app.state.runtime  # type: ignore[no-any-return]


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
ConversationHeader = Annotated[
    str | None,
    Header(
        alias="X-Conversation-Id",
        min_length=1,
        max_length=CONVERSATION_ID_MAX_CHARS,
        pattern=CONVERSATION_ID_PATTERN,
        description="conversation this turn belongs to (visible ASCII but /; wins over the body's "
        "conversation_id)",
    ),
]
FinalHeader = Annotated[
    str | None,
    Header(
        alias="X-Conversation-Final",
        pattern="^(?i:true|false|1|0|yes|no)$",
        description="'true' marks this turn as the conversation's final turn",
    ),
]

_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "invalid request (names the field)"},
    401: {"model": ErrorResponse, "description": "no, an invalid or a revoked API key"},
    404: {"model": ErrorResponse, "description": "unknown model"},
    503: {"model": ErrorResponse, "description": "no healthy engine could serve the turn"},
}

router = APIRouter(tags=["openai"])


def _sse_content(schema_ref: str) -> dict[str, Any]:
    return {
        "application/json": {"schema": {"$ref": f"#/components/schemas/{schema_ref}"}},
        "text/event-stream": {"schema": {"type": "string", "description": "data: {chunk} ... data: [DONE]"}},
    }


async def _serve(
    kind: RequestKind,
    req: ChatCompletionRequest | CompletionRequest,
    rt: Runtime,
    header_cid: str | None,
    header_final: str | None,
    endpoint: str,
    metrics: Any,
    principal: Principal,
    admission: Any = None,
) -> Response:
    try:
        response = await _serve_inner(kind, req, rt, header_cid, header_final, principal, admission, metrics)
    except Exception as err:
        api_err = to_api_error(err)
        metrics.request_done(endpoint, api_err.status)
        api_err.counted = True
        raise api_err from err
    metrics.request_done(endpoint, 200)
    return response


async def complete_with_energy(
    rt: Runtime, inp: TurnInput, metrics: Any, client_cid: str | None = None
) -> dict[str, Any]:
    """The router's non-streaming answer with ``usage.energy`` (issue 14 item 6): this turn's estimated
    joules, prefill and decode apart, and the conversation's so far (api/metrics.py, energy/estimate.py).
    The router reports the finished turn to the metrics observer in this task; TURN_CAPTURE collects it.
    ``client_cid``: the id the client knows (without the tenant scope of the ledger's id), for the link."""
    capture: list[Any] = []
    token = TURN_CAPTURE.set(capture)
    try:
        out = await rt.router.complete(inp)
    finally:
        TURN_CAPTURE.reset(token)
    rec = next((r for r in reversed(capture) if str(r.status) == "ok"), None)
    energy = metrics.usage_energy(rec, client_cid or inp.conversation_id) if metrics is not None else None
    usage = out.get("usage")
    if energy is not None and isinstance(usage, dict):
        out["usage"] = {**usage, "energy": energy}
    return out


async def _serve_inner(
    kind: RequestKind,
    req: ChatCompletionRequest | CompletionRequest,
    rt: Runtime,
    header_cid: str | None,
    header_final: str | None,
    principal: Principal,
    admission: Any,
    metrics: Any = None,
) -> Response:
    body = req.model_dump(exclude_unset=True, exclude_none=False)
    inp, cid = prepare_turn(kind, body, rt, header_cid, header_final, principal, admission)
    headers = {"X-Conversation-Id": cid}
    if not body.get("stream"):
        out = await complete_with_energy(rt, inp, metrics, cid)
        return Response(_dumps(out), media_type="application/json", headers=headers)
    capture = begin_capture()
    annotate = energy_annotator(capture, metrics, cid)
    gen = rt.router.stream_sse(inp)
    try:
        first = await gen.__anext__()
    except StopAsyncIteration:
        first = None
    return SseResponse(sse_body(first, gen, annotate), headers={**headers, "Cache-Control": "no-cache"})


def prepare_turn(
    kind: RequestKind,
    body: dict[str, Any],
    rt: Runtime,
    header_cid: str | None,
    header_final: str | None,
    principal: Principal = OPEN,
    admission: Any = None,
) -> tuple[TurnInput, str]:
    """The checks every request needs after schema validation (model, prompt shape, context length) and
    the router's input, with the conversation id to send back in ``X-Conversation-Id`` (the client's id;
    the router's is scoped to the caller's tenant, api/auth.py). `body` is a validated request body;
    ConServe's own fields are popped from it. Shared by the FastAPI routes and the raw-ASGI fast path
    (api/fastpath.py). Raises ApiError."""
    if body.get("model") != rt.served_model_name:
        raise ApiError(
            404,
            f"model {body.get('model')!r} is not served here. To fix: use {rt.served_model_name!r} "
            "(GET /v1/models).",
            param="model",
            code="model_not_found",
        )
    body_cid = body.pop("conversation_id", None)
    conserve = body.pop("conserve", None) or {}
    cid = header_cid or body_cid
    one_turn = cid is None
    if one_turn:  # a one-turn conversation; its id goes back to the client all the same
        cid = rt.router.new_conversation_id()
    ledger_cid = scoped_id(principal, cid)
    final = bool(conserve.get("final")) or (header_final or "").lower() in ("true", "1", "yes")
    if kind is RequestKind.COMPLETION:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and (not prompt or (not isinstance(prompt[0], int) and len(prompt) != 1)):
            raise ApiError(
                400, "prompt: send exactly one prompt per request (batches are not supported)", param="prompt"
            )
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], list) and not prompt[0]:
            raise ApiError(400, "prompt: token list is empty", param="prompt")
    prompt_tokens = estimate_prompt_tokens(kind, body)
    max_ctx = rt.router.config.max_context_tokens
    max_out = body.get("max_completion_tokens") or body.get("max_tokens") or 0
    if prompt_tokens + max_out > max_ctx:
        param = "messages" if kind is RequestKind.CHAT else "prompt"
        raise ApiError(
            400,
            f"This model's maximum context length is {max_ctx} tokens. However, you requested "
            f"{prompt_tokens + max_out} tokens (~{prompt_tokens} in the {param} (estimated at ~4 characters "
            f"per token), {max_out} in the completion). To fix: shorten the {param} or lower max_tokens.",
            param=param,
            code="context_length_exceeded",
        )
    if admission is not None:  # api/limits.py Admission: the tenant's tokens-per-minute budget
        admission.charge_tokens(principal.tenant, prompt_tokens + max_out)
    inp = TurnInput(
        kind=kind,
        body=body,
        conversation_id=ledger_cid,
        client_final=final,
        include_usage=bool((body.get("stream_options") or {}).get("include_usage")),
        prompt_tokens=prompt_tokens,
        one_turn=one_turn,
    )
    return inp, cid


class SseResponse(Response):
    """Server-sent events without Starlette's per-response anyio task group (measurably cheaper per request).

    A small asyncio task watches for the client's disconnect; the loop stops sending and closes the router's
    generator (which records the turn as an error) when it happens.
    """

    media_type = "text/event-stream"

    def __init__(self, chunks: AsyncIterator[bytes], headers: dict[str, str]) -> None:
        # like StreamingResponse.__init__: no body, hence no Content-Length header
        self.status_code = 200
        self.background = None
        self.init_headers(headers)
        self._chunks = chunks

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        gone = asyncio.Event()
        watcher = asyncio.get_running_loop().create_task(watch_disconnect(receive, gone))
        try:
            await send(
                {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
            )
            async for chunk in self._chunks:
                if gone.is_set():
                    break
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            if not gone.is_set():
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            watcher.cancel()
            await self._chunks.aclose()  # type: ignore[attr-defined]


async def watch_disconnect(receive: Any, gone: asyncio.Event) -> None:
    """Set `gone` when the ASGI server reports the client's disconnect (run as a task beside a stream)."""
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            gone.set()
            return


def energy_annotator(
    capture: list[Any], metrics: Any, conversation_id: str | None
) -> Callable[[bytes], bytes] | None:
    """For a streamed turn: rewrite the last block's usage event (sent when the client asked
    stream_options.include_usage) with ``usage.energy``, as complete_with_energy does for JSON answers. The
    router records the turn before it sends that last block, so the turn is in ``capture`` by then."""
    if metrics is None or getattr(metrics, "estimates", None) is None:
        return None

    def annotate(block: bytes) -> bytes:
        rec = next((r for r in reversed(capture) if str(r.status) == "ok"), None)
        energy = metrics.usage_energy(rec, conversation_id)
        if energy is None or b'"usage"' not in block:
            return block
        events = block.split(b"\n\n")
        for i, ev in enumerate(events):
            if not ev.startswith(b"data: {") or b'"usage"' not in ev:
                continue
            try:
                chunk = json.loads(ev[6:])
            except ValueError:
                continue
            if isinstance(chunk.get("usage"), dict):
                chunk["usage"] = {**chunk["usage"], "energy": energy}
                events[i] = b"data: " + _dumps(chunk)
        return b"\n\n".join(events)

    return annotate


async def _chain(first: bytes, gen: AsyncIterator[bytes]) -> AsyncGenerator[bytes, None]:
    yield first
    async for block in gen:
        yield block


def begin_capture() -> list[Any]:
    """Collect the turns the router finishes in this task (TURN_CAPTURE, set for the rest of the request)."""
    capture: list[Any] = []
    TURN_CAPTURE.set(capture)
    return capture


async def sse_body(
    first: bytes | None, gen: AsyncIterator[bytes], annotate: Callable[[bytes], bytes] | None = None
) -> AsyncIterator[bytes]:
    """The SSE body: the router's event blocks (already `data: ...` encoded, the last one ending with
    `data: [DONE]`), or an error event then `data: [DONE]` if the engine failed mid-stream. ``annotate``
    rewrites the last block (usage.energy)."""
    done = False
    held = b""  # (annotate) a usage event waits for [DONE]: the turn is recorded just before it
    try:
        if first is not None:
            done = first.endswith(SSE_DONE)
            # closed here when the consumer stops at [DONE] (api/fastpath.py), not left to the event loop's
            # async-generator finalizer (a thread-safe wake-up and an aclose task per response)
            async with contextlib.aclosing(_chain(first, gen)) as blocks:
                async for block in blocks:
                    done = block.endswith(SSE_DONE)
                    if annotate is None:
                        yield block
                        continue
                    block = held + block
                    held = b""
                    if done:
                        yield annotate(block)
                    elif b'"usage"' in block:
                        held = block
                    else:
                        yield block
    except ConServeError as err:
        if held:
            yield held
            held = b""
        e = to_api_error(err)
        yield sse_error(e.message, e.code or "error", e.status)
    finally:
        await gen.aclose()  # type: ignore[attr-defined]
    if held:  # the stream ended without [DONE]: the usage event as it was
        yield held
    if not done:
        yield SSE_DONE


@router.post(
    "/v1/chat/completions",
    response_model=None,
    responses={
        200: {"model": ChatCompletionResponse, "content": _sse_content("ChatCompletionResponse")},
        **_ERRORS,
    },
    summary="Create a chat completion (OpenAI-compatible; SSE when stream is true)",
)
async def chat_completions(
    body: ChatCompletionRequest,
    request: Request,
    rt: RuntimeDep,
    principal: PrincipalDep,
    x_conversation_id: ConversationHeader = None,
    x_conversation_final: FinalHeader = None,
) -> Response:
    return await _serve(
        RequestKind.CHAT,
        body,
        rt,
        x_conversation_id,
        x_conversation_final,
        "chat",
        request.app.state.metrics,
        principal,
        request.app.state.admission,
    )


@router.post(
    "/v1/completions",
    response_model=None,
    responses={200: {"model": CompletionResponse, "content": _sse_content("CompletionResponse")}, **_ERRORS},
    summary="Create a text completion (OpenAI-compatible; SSE when stream is true)",
)
async def completions(
    body: CompletionRequest,
    request: Request,
    rt: RuntimeDep,
    principal: PrincipalDep,
    x_conversation_id: ConversationHeader = None,
    x_conversation_final: FinalHeader = None,
) -> Response:
    return await _serve(
        RequestKind.COMPLETION,
        body,
        rt,
        x_conversation_id,
        x_conversation_final,
        "completions",
        request.app.state.metrics,
        principal,
        request.app.state.admission,
    )


@router.get("/v1/models", response_model=ModelList, summary="Models served by this router")
async def list_models(rt: RuntimeDep, _: PrincipalDep) -> ModelList:
    return ModelList(
        data=[
            ModelCard(
                id=rt.served_model_name,
                created=int(time.time()),
                max_model_len=rt.router.config.max_context_tokens,
            )
        ]
    )
