"""Limits and back-pressure at the ASGI edge of the serving endpoints (api/settings.py holds the numbers).

Before a completion request reaches the fast path or the FastAPI routes, :class:`Edge` (called by
api/app.py's ConServeApp for POST /v1/chat/completions and /v1/completions)

1. authenticates it (api/auth.py; a 401 costs no body read) and puts the caller in ``scope["state"]``;
2. admits it: requests in flight (streams included) over ``max_concurrent_requests`` -> 503 with
   ``Retry-After``; per tenant, in flight over ``tenant_max_concurrent_requests`` or requests over the
   ``tenant_requests_per_s`` token bucket -> 429 with ``Retry-After`` (the time until the bucket refills);
3. reads the body under a size limit (``Content-Length`` over ``max_body_bytes`` -> 413 before reading a
   byte; a chunked body is cut at the limit: never more than the limit is held); the body's deadline
   (``body_timeout_s`` -> 408) is kept by the connection (api/server.py);
4. hands the request back to the app (api/app.py) with the body already read; the app releases its
   admission when it has answered.

Per-tenant token limits (``tenant_tokens_per_min``: estimated prompt + max_tokens) are charged after the
body is parsed (api/routes_openai.prepare_turn calls :meth:`Admission.charge_tokens`).

Connection-level limits (open connections, header and body deadlines, header size) are in api/server.py:
an ASGI app only sees a request once its headers are complete.

Every answer here is counted in conserve_requests_total like the routes' own. Event loop only (no locks).
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

import orjson

from api.auth import OPEN, Authenticator, Principal, bearer_token
from api.errors import ApiError, error_body
from api.settings import ApiSettings

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
AsgiApp = Callable[[Scope, Receive, Send], Awaitable[None]]

__all__ = ["Admission", "Edge", "TokenBucket"]


@dataclass(slots=True)
class TokenBucket:
    """`rate` tokens per second up to `burst`; take() returns 0 when allowed, else seconds to wait."""

    rate: float
    burst: float
    level: float
    at: float

    def take(self, n: float, now: float) -> float:
        self.level = min(self.burst, self.level + (now - self.at) * self.rate)
        self.at = now
        if self.level >= n:
            self.level -= n
            return 0.0
        return (n - self.level) / self.rate if self.rate > 0 else math.inf


class Admission:
    """Counters and buckets of the limits (pure: an injected clock, no I/O). Tenant None: auth off."""

    def __init__(self, settings: ApiSettings, clock: Callable[[], float] = time.monotonic) -> None:
        self.s = settings
        self.clock = clock
        self.inflight = 0
        self.tenant_inflight: dict[str | None, int] = {}
        self._rates: dict[str | None, TokenBucket] = {}
        self._tokens: dict[str | None, TokenBucket] = {}
        self.refused: dict[int, int] = {}  # status -> count (tests, diagnostics)

    def _refuse(self, status: int, message: str, retry_after_s: float, code: str) -> ApiError:
        self.refused[status] = self.refused.get(status, 0) + 1
        return ApiError(
            status,
            message,
            type_="service_unavailable_error" if status == 503 else "rate_limit_error",
            code=code,
            headers={"Retry-After": str(max(1, math.ceil(retry_after_s)))},
        )

    def enter(self, tenant: str | None) -> None:
        """Admit one request (raise a 503/429 ApiError otherwise); pair with :meth:`leave`."""
        s = self.s
        if self.inflight >= s.max_concurrent_requests:
            raise self._refuse(
                503,
                f"the server is at its limit of {s.max_concurrent_requests} requests in flight "
                "(max_concurrent_requests). To fix: retry after Retry-After seconds.",
                s.retry_after_s,
                "server_overloaded",
            )
        n = self.tenant_inflight.get(tenant, 0)
        if s.tenant_max_concurrent_requests and n >= s.tenant_max_concurrent_requests:
            raise self._refuse(
                429,
                f"tenant {tenant or '(auth off)'} has {n} requests in flight, its limit "
                f"(tenant_max_concurrent_requests={s.tenant_max_concurrent_requests}). To fix: wait for one "
                "to end, then retry.",
                s.retry_after_s,
                "rate_limit_exceeded",
            )
        if s.tenant_requests_per_s > 0:
            now = self.clock()
            bucket = self._rates.get(tenant)
            if bucket is None:
                bucket = self._rates[tenant] = TokenBucket(
                    s.tenant_requests_per_s, s.tenant_burst, s.tenant_burst, now
                )
            wait_s = bucket.take(1, now)
            if wait_s > 0:
                raise self._refuse(
                    429,
                    f"tenant {tenant or '(auth off)'} is over its request rate "
                    f"({s.tenant_requests_per_s:g}/s, burst {s.tenant_burst}). To fix: retry after "
                    "Retry-After seconds.",
                    wait_s,
                    "rate_limit_exceeded",
                )
        self.inflight += 1
        self.tenant_inflight[tenant] = n + 1

    def leave(self, tenant: str | None) -> None:
        self.inflight -= 1
        n = self.tenant_inflight.get(tenant, 1) - 1
        if n > 0:
            self.tenant_inflight[tenant] = n
        else:
            self.tenant_inflight.pop(tenant, None)

    def charge_tokens(self, tenant: str | None, tokens: int) -> None:
        """Charge a request's estimated tokens (prompt + max_tokens) to its tenant's per-minute budget."""
        per_min = self.s.tenant_tokens_per_min
        if not per_min:
            return
        now = self.clock()
        bucket = self._tokens.get(tenant)
        if bucket is None:
            bucket = self._tokens[tenant] = TokenBucket(per_min / 60.0, per_min, per_min, now)
        if tokens > per_min:
            raise ApiError(
                400,
                f"this request needs ~{tokens} tokens (prompt + max_tokens), more than the tenant's limit "
                f"of {per_min} tokens per minute (tenant_tokens_per_min). To fix: shorten it or lower "
                "max_tokens.",
                code="tokens_over_limit",
            )
        wait_s = bucket.take(tokens, now)
        if wait_s > 0:
            raise self._refuse(
                429,
                f"tenant {tenant or '(auth off)'} is over its token budget ({per_min} tokens per minute). "
                "To fix: retry after Retry-After seconds.",
                wait_s,
                "rate_limit_exceeded",
            )


class BodyError(Exception):
    def __init__(self, err: ApiError) -> None:
        super().__init__(err.message)
        self.err = err


class Edge:
    """The checks in front of the completion endpoints (see the module docstring)."""

    def __init__(
        self, settings: ApiSettings, auth: Authenticator, metrics: Any, admission: Admission
    ) -> None:
        self.s = settings
        self.auth = auth
        self.metrics = metrics
        self.admission = admission

    async def admit(
        self, scope: Scope, receive: Receive, send: Send, endpoint: str
    ) -> tuple[str | None, bytes] | None:
        """Check the request and read its body: (the caller's tenant, the body), after which the caller
        serves it and then calls ``admission.leave(tenant)``; or None when it was answered here (refused).
        A method the app awaits rather than a wrapper around the app: no extra coroutine frame between the
        event loop and a stream for the rest of the request (each one costs every resumption)."""
        authorization = content_length = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = value
            elif name == b"content-length":
                content_length = value
        try:
            principal = OPEN
            if self.auth.enabled:
                principal = await self.auth.principal(bearer_token(authorization))
            scope.setdefault("state", {})["principal"] = principal
            self.admission.enter(principal.tenant)
        except ApiError as err:
            await self.refuse(send, endpoint, err)
            return None
        try:
            raw = await self.read_body(receive, content_length)
        except BodyError as be:
            self.admission.leave(principal.tenant)
            await self.refuse(send, endpoint, be.err)
            return None
        except BaseException:
            self.admission.leave(principal.tenant)
            raise
        return principal.tenant, raw

    async def read_body(self, receive: Receive, content_length: bytes | None) -> bytes:
        limit = self.s.max_body_bytes
        if content_length is not None:
            try:
                declared = int(content_length)
            except ValueError:
                declared = -1
            if declared > limit:
                raise BodyError(_too_large(declared, limit))
        chunks: list[bytes] = []
        size = 0
        # no deadline here: api/server.py's protocol cuts a body that takes over body_timeout_s
        while True:
            msg = await receive()
            if msg["type"] != "http.request":
                break  # client gone; the app sees an empty body and its own disconnect
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise BodyError(_too_large(size, limit))
            chunks.append(chunk)
            if not msg.get("more_body", False):
                break
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def refuse(self, send: Send, endpoint: str, err: ApiError) -> None:
        self.metrics.request_done(endpoint, err.status)
        await respond_error(send, err, close=err.status in (408, 413))


def _too_large(size: int, limit: int) -> ApiError:
    return ApiError(
        413,
        f"request body is larger than {limit} bytes (max_body_bytes; got {'at least ' if size > 0 else ''}"
        f"{size}). To fix: send a shorter prompt.",
        code="request_too_large",
    )


async def respond_error(send: Send, err: ApiError, *, close: bool = False) -> None:
    body = orjson.dumps(error_body(err.message, err.type, err.param, err.code))
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (err.headers or {}).items()]
    if close:  # the rest of the body is not read: the connection cannot carry another request
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def replay(raw: bytes, receive: Receive) -> Receive:
    """A receive() that hands the already-read body to the app, then defers to the server."""
    sent = False

    async def replay() -> MutableMapping[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": raw, "more_body": False}
        return await receive()

    return replay


def principal_of(scope: Scope) -> Principal | None:
    p = (scope.get("state") or {}).get("principal")
    return p if isinstance(p, Principal) else None
