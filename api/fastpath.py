"""Raw-ASGI fast path for the two hot endpoints: POST /v1/chat/completions and POST /v1/completions.

The FastAPI routes in api/routes_openai.py stay the reference: they document the schema (OpenAPI) and
serve every request the fast path does not take. The fast path takes a request only when it is certain the
FastAPI route would accept it unchanged:

- ``Content-Type: application/json``, a body that orjson parses into an object, valid ConServe headers;
- every declared field of the request model present in the body has exactly the JSON type and range the
  pydantic model accepts without coercion (:func:`simple_body_ok`; a property test checks that whatever it
  accepts, pydantic accepts and dumps back unchanged). Unknown fields are forwarded, as the model's
  ``extra="allow"`` does.

Anything else (bad JSON, a field pydantic would coerce or reject, tools, list contents, ...) is replayed,
body and all, into the FastAPI app, so errors and edge cases are answered by exactly one implementation.
After parsing, both paths share :func:`api.routes_openai.prepare_turn` (model, prompt shape, context length)
and the router. What the fast path skips: Starlette routing, the middleware stack, dependency injection,
pydantic model construction and dump (measured in BENCHMARKS.md, router overhead).

Must not import sqlalchemy.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import orjson

from api.auth import OPEN, Authenticator, unauthorized
from api.errors import ApiError, error_body, to_api_error
from api.limits import Admission, principal_of, replay
from api.routes_openai import (
    begin_capture,
    complete_with_energy,
    energy_annotator,
    prepare_turn,
    sse_body,
    watch_disconnect,
)
from api.schemas import CONVERSATION_ID_MAX_CHARS, CONVERSATION_ID_PATTERN
from orchestrator.engines.base import RequestKind
from orchestrator.router import SSE_DONE
from orchestrator.runtime import Runtime

log = logging.getLogger("conserve.api")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
AsgiApp = Callable[[Scope, Receive, Send], Awaitable[None]]

PATHS: dict[str, tuple[RequestKind, str]] = {
    "/v1/chat/completions": (RequestKind.CHAT, "chat"),
    "/v1/completions": (RequestKind.COMPLETION, "completions"),
}
_FINAL_VALUES = frozenset({"true", "false", "1", "0", "yes", "no"})  # FinalHeader's pattern, lower-cased
_CID = re.compile(CONVERSATION_ID_PATTERN)
_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})  # ChatMessage.role


# ---- "would pydantic accept this unchanged?" -------------------------------------------------------------


def _is_int(v: Any) -> bool:
    return type(v) is int  # bool is not an int here (pydantic would accept True as 1: a coercion)


def _opt_int_ge1(v: Any) -> bool:
    return v is None or (_is_int(v) and v >= 1)


def _opt_str(v: Any) -> bool:
    return v is None or type(v) is str


def _stop(v: Any) -> bool:
    return v is None or type(v) is str or (type(v) is list and all(type(x) is str for x in v))


def _stream_options(v: Any) -> bool:
    return v is None or (type(v) is dict and v.get("include_usage") in (None, True, False))


def _conserve(v: Any) -> bool:
    return v is None or (type(v) is dict and set(v) <= {"final"} and type(v.get("final", False)) is bool)


def _conversation_id(v: Any) -> bool:
    return v is None or (type(v) is str and _valid_cid(v))


def _valid_cid(v: str) -> bool:
    # fullmatch: with re.match, "$" would also accept a final "\n" (pydantic's regex does not)
    return len(v) <= CONVERSATION_ID_MAX_CHARS and _CID.fullmatch(v) is not None


def _message(m: Any) -> bool:
    return (
        type(m) is dict
        and type(m.get("role")) is str
        and m["role"] in _ROLES
        and _opt_str(m.get("content"))
        and _opt_str(m.get("name"))
        and _opt_str(m.get("tool_call_id"))
        and _tool_calls(m.get("tool_calls"))
    )


def _tool_calls(v: Any) -> bool:
    return v is None or (type(v) is list and all(type(t) is dict for t in v))


def _messages(v: Any) -> bool:
    return type(v) is list and len(v) >= 1 and all(_message(m) for m in v)


def _prompt(v: Any) -> bool:
    if type(v) is str:
        return True
    if type(v) is not list:
        return False
    return (
        all(type(x) is str for x in v)
        or all(_is_int(x) for x in v)
        or all(type(x) is list and all(_is_int(y) for y in x) for x in v)
    )


# Every declared field of api.schemas.{ChatCompletionRequest, CompletionRequest} -> an exact check; a value
# it does not accept (tools, temperature given as an int, content parts, ...) sends the request to the
# FastAPI route. Keep in sync with api/schemas.py (tests/api/test_fastpath.py checks the key sets).
_COMMON: dict[str, Callable[[Any], bool]] = {
    "model": lambda v: type(v) is str and len(v) >= 1,
    "max_tokens": _opt_int_ge1,
    "temperature": lambda v: v is None or (type(v) is float and 0.0 <= v <= 2.0),
    "top_p": lambda v: v is None or (type(v) is float and 0.0 < v <= 1.0),
    "n": lambda v: v is None or (_is_int(v) and v == 1),
    "stream": lambda v: type(v) is bool,
    "stream_options": _stream_options,
    "stop": _stop,
    "seed": lambda v: v is None or _is_int(v),
    "conversation_id": _conversation_id,
    "conserve": _conserve,
}
CHECKS: dict[RequestKind, dict[str, Callable[[Any], bool]]] = {
    RequestKind.CHAT: {
        **_COMMON,
        "messages": _messages,
        "max_completion_tokens": _opt_int_ge1,
        "tools": lambda v: v is None,
        "tool_choice": lambda v: v is None or type(v) is str,
    },
    RequestKind.COMPLETION: {**_COMMON, "prompt": _prompt, "echo": lambda v: v is None or type(v) is bool},
}
REQUIRED: dict[RequestKind, tuple[str, ...]] = {
    RequestKind.CHAT: ("model", "messages"),
    RequestKind.COMPLETION: ("model", "prompt"),
}


def simple_body_ok(kind: RequestKind, body: Any) -> bool:
    """True only if the pydantic request model would accept `body` and dump it back unchanged."""
    if type(body) is not dict:
        return False
    checks = CHECKS[kind]
    for key in REQUIRED[kind]:
        if key not in body:
            return False
    for key, value in body.items():
        check = checks.get(key)
        if check is not None and not check(value):
            return False
    return True


# ---- the ASGI handler -------------------------------------------------------------------------------------


class FastPath:
    """Serves the completion endpoints without Starlette; `fallback` (the FastAPI app) gets the rest."""

    def __init__(
        self, runtime: Runtime, metrics: Any, auth: Authenticator, admission: Admission | None = None
    ) -> None:
        self.rt = runtime
        self.metrics = metrics
        self.auth = auth
        self.admission = admission
        self.served = 0  # requests answered here (incl. errors from prepare_turn / the router)
        self.fallbacks = 0  # requests handed to the FastAPI routes

    async def __call__(
        self, scope: Scope, receive: Receive, send: Send, fallback: AsgiApp, raw: bytes | None = None
    ) -> None:
        """Serve the request; `raw` is its body when the caller (api/limits.py Edge) has read it."""
        kind, endpoint = PATHS[scope["path"]]
        principal = principal_of(scope)  # api/limits.py Edge authenticated the request
        if principal is None:
            if self.auth.enabled:  # never served without the edge's check
                self.metrics.request_done(endpoint, 401)
                await _respond_error(send, unauthorized("no API key checked for this request"))
                return
            principal = OPEN
        if raw is None:
            chunks: list[bytes] = []
            while True:
                msg = await receive()
                if msg["type"] != "http.request":
                    return  # client gone before sending the body
                chunks.append(msg.get("body", b""))
                if not msg.get("more_body", False):
                    break
            raw = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        cid = final = None
        json_ct = False
        for name, value in scope["headers"]:
            if name == b"content-type":
                json_ct = value.split(b";", 1)[0].strip().lower() == b"application/json"
            elif name == b"x-conversation-id":
                cid = value.decode("latin-1")
            elif name == b"x-conversation-final":
                final = value.decode("latin-1")
        body: Any = None
        if json_ct:
            try:
                body = orjson.loads(raw)
            except orjson.JSONDecodeError:
                body = None
        if (
            body is None
            or not simple_body_ok(kind, body)
            or (cid is not None and not _valid_cid(cid))
            or (final is not None and final.lower() not in _FINAL_VALUES)
        ):
            self.fallbacks += 1
            await fallback(scope, replay(raw, receive), send)
            return
        self.served += 1
        try:
            inp, cid_out = prepare_turn(kind, body, self.rt, cid, final, principal, self.admission)
            headers = [(b"x-conversation-id", cid_out.encode("latin-1"))]
            if not body.get("stream"):
                out = orjson.dumps(await complete_with_energy(self.rt, inp, self.metrics, cid_out))
                await _respond(send, 200, out, headers)
                self.metrics.request_done(endpoint, 200)
                return
            capture = begin_capture()
            annotate = energy_annotator(capture, self.metrics, cid_out)
            gen = self.rt.router.stream_sse(inp)
            try:
                first: bytes | None = await gen.__anext__()
            except StopAsyncIteration:
                first = None
        except Exception as err:  # before anything was sent: an OpenAI-style error answer
            api_err = to_api_error(err)
            if api_err.status >= 500 and api_err.code == "internal_error":
                log.exception("unexpected error serving a request")
            self.metrics.request_done(endpoint, api_err.status)
            await _respond_error(send, api_err)
            return
        self.metrics.request_done(endpoint, 200)
        await _stream(send, receive, sse_body(first, gen, annotate), headers)


async def _respond_error(send: Send, err: ApiError) -> None:
    body = orjson.dumps(error_body(err.message, err.type, err.param, err.code))
    headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (err.headers or {}).items()]
    await _respond(send, err.status, body, headers)


async def _respond(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})


_SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]


async def _stream(send: Send, receive: Receive, blocks: Any, headers: list[tuple[bytes, bytes]]) -> None:
    """SSE body, one ASGI send per block (the router yields one block per read from the engine, the first
    token on its own); the block ending with ``[DONE]`` also ends the response. From the third block on, a
    watcher task notices a client disconnect, and the loop then stops and closes the router's generator
    (which records the turn as an error and stops the engine request); a disconnect before that is seen
    when the watcher starts, one block later. A short response (the first token, then the rest of the same
    read with ``[DONE]``) ends before a watcher is needed (saves a task per short response)."""
    gone = asyncio.Event()
    watcher: asyncio.Task[None] | None = None
    try:
        await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS + headers})
        ended = False
        sent = 0
        async for block in blocks:
            if gone.is_set():
                break
            ended = block.endswith(SSE_DONE)  # the last block: end the response in the same send
            await send({"type": "http.response.body", "body": block, "more_body": not ended})
            if ended:
                break
            sent += 1
            if watcher is None and sent >= 2:
                watcher = asyncio.get_running_loop().create_task(watch_disconnect(receive, gone))
        if not ended and not gone.is_set():
            await send({"type": "http.response.body", "body": b"", "more_body": False})
    finally:
        if watcher is not None:
            watcher.cancel()
        await blocks.aclose()
