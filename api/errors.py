"""OpenAI-style error bodies and the exception handlers that produce them (never a traceback).

Body: ``{"error": {"message", "type", "param", "code"}}``. Mapping: request validation -> 400
``invalid_request_error`` naming the field; unknown model -> 404 ``model_not_found``; unknown conversation
-> 404; other ConServeError -> 400; no healthy engine -> 503 ``engine_unavailable``; no decoder with room
within the admission wait -> 503 ``no_capacity`` with Retry-After; anything unexpected
-> 500 with a generic message (logged server-side, never sent).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from conserve.errors import ConServeError
from orchestrator.router import (
    AdmissionTimedOut,
    ConversationNotFound,
    EngineRejected,
    EngineUnavailable,
    PromptTooLarge,
)

log = logging.getLogger("conserve.api")


class ApiError(Exception):
    """An error the API answers with a given status and OpenAI-style body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code
        self.headers = headers  # e.g. WWW-Authenticate on 401, Retry-After on 429/503
        self.counted = False  # already in conserve_requests_total (the serving route counts its answers)


def error_body(
    message: str, type_: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(
    status: int,
    message: str,
    type_: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    return JSONResponse(error_body(message, type_, param, code), status_code=status, headers=headers)


def sse_error(message: str, code: str = "engine_unavailable", status: int = 503) -> bytes:
    body = error_body(
        message, "service_unavailable_error" if status >= 500 else "invalid_request_error", None, code
    )
    body["error"]["status"] = status
    return b"data: " + json.dumps(body).encode() + b"\n\n"


def to_api_error(err: BaseException) -> ApiError:
    if isinstance(err, ApiError):
        return err
    if isinstance(err, AdmissionTimedOut):  # no decoder had room within the admission wait (router.py)
        return ApiError(
            503,
            str(err),
            type_="service_unavailable_error",
            code="no_capacity",
            headers={"Retry-After": str(err.retry_after_s)},
        )
    if isinstance(err, EngineUnavailable):
        return ApiError(503, str(err), type_="service_unavailable_error", code="engine_unavailable")
    if isinstance(err, EngineRejected):
        return ApiError(err.status, str(err), code="engine_rejected_request")
    if isinstance(err, PromptTooLarge):
        return ApiError(400, str(err), param="messages", code="context_length_exceeded")
    if isinstance(err, ConversationNotFound):
        return ApiError(
            404, str(err), type_="not_found_error", param="conversation_id", code="conversation_not_found"
        )
    if isinstance(err, ConServeError):
        return ApiError(400, str(err))
    return ApiError(500, "internal error (logged on the server)", type_="server_error", code="internal_error")


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    # drop pydantic's union-branch labels ("str", "list[ContentPart]") from the field path
    loc = [p for p in loc if not (p[:1].islower() and ("[" in p or p in ("str", "int", "bool", "float")))]
    param = ".".join(loc) or None
    etype = first.get("type", "")
    if etype == "json_invalid":
        ctx = first.get("ctx") or {}
        why = ctx.get("error", "parse error")
        return f"request body is not valid JSON ({why}). To fix: send a JSON object.", None
    if etype == "missing" and not loc:
        return "request body is required: a JSON object (see the OpenAPI schema at /openapi.json)", None
    if etype == "missing":
        return f"{param}: field required", param
    if etype in ("model_attributes_type", "dict_type") and not loc:
        if isinstance(first.get("input"), bytes | str):
            return (
                "request body is not JSON. To fix: send a JSON object with 'Content-Type: application/json'."
            ), None
        return "request body must be a JSON object, not an array or a scalar", None
    more = f" (+{len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return f"{param or 'body'}: {first.get('msg', 'invalid value')}{more}", param


# conserve_requests_total's endpoint label of the serving paths (api/metrics.py)
SERVING_ENDPOINTS = {"/v1/chat/completions": "chat", "/v1/completions": "completions"}


def _count(request: Request, status: int) -> None:
    """Count an answer the serving route itself did not count (validation, authentication)."""
    endpoint = SERVING_ENDPOINTS.get(request.url.path)
    metrics = getattr(request.app.state, "metrics", None)
    if endpoint is not None and metrics is not None:
        metrics.request_done(endpoint, status)


def install_error_handlers(app: FastAPI) -> None:
    async def on_validation(request: Request, exc: RequestValidationError) -> Response:
        message, param = _validation_message(exc)
        _count(request, 400)
        return error_response(400, message, param=param)

    async def on_api_error(request: Request, exc: ApiError) -> Response:
        if not exc.counted:
            _count(request, exc.status)
        return error_response(exc.status, exc.message, exc.type, exc.param, exc.code, exc.headers)

    async def on_conserve(_: Request, exc: ConServeError) -> Response:
        e = to_api_error(exc)
        return error_response(e.status, e.message, e.type, e.param, e.code)

    async def on_http(_: Request, exc: StarletteHTTPException) -> Response:
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(exc.status_code, str(exc.detail), type_, headers=getattr(exc, "headers", None))

    async def on_unexpected(_: Request, exc: Exception) -> Response:
        log.exception("unexpected error serving a request")
        return error_response(
            500, "internal error (logged on the server)", "server_error", code="internal_error"
        )

    app.add_exception_handler(RequestValidationError, on_validation)  # type: ignore[arg-type]
    app.add_exception_handler(ApiError, on_api_error)  # type: ignore[arg-type]
    app.add_exception_handler(ConServeError, on_conserve)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, on_http)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, on_unexpected)
