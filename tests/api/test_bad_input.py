"""Bad input -> 4xx with an OpenAI-style error body naming the problem; never a 500 or a traceback."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

MODEL = "Qwen3-0.6B"
MSG = [{"role": "user", "content": "hi"}]

CASES: list[tuple[str, str, dict[str, Any], int, str | None, str]] = [
    # (id, path, request kwargs, status, param, substring of the message)
    (
        "malformed-json",
        "/v1/chat/completions",
        {"content": b'{"model": "x", "messages": [', "headers": {"content-type": "application/json"}},
        400,
        None,
        "not valid JSON",
    ),
    ("not-json-content-type", "/v1/chat/completions", {"content": b"hello"}, 400, None, "not JSON"),
    ("json-array", "/v1/chat/completions", {"json": [1, 2]}, 400, None, "JSON object"),
    ("empty-body", "/v1/chat/completions", {}, 400, None, "body is required"),
    ("missing-messages", "/v1/chat/completions", {"json": {"model": MODEL}}, 400, "messages", "required"),
    (
        "empty-messages",
        "/v1/chat/completions",
        {"json": {"model": MODEL, "messages": []}},
        400,
        "messages",
        "",
    ),
    (
        "bad-role",
        "/v1/chat/completions",
        {"json": {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}},
        400,
        "messages.0.role",
        "",
    ),
    (
        "unknown-model",
        "/v1/chat/completions",
        {"json": {"model": "gpt-9", "messages": MSG}},
        404,
        "model",
        "not served",
    ),
    (
        "max-tokens-zero",
        "/v1/chat/completions",
        {"json": {"model": MODEL, "messages": MSG, "max_tokens": 0}},
        400,
        "max_tokens",
        "greater than or equal to 1",
    ),
    (
        "max-tokens-negative",
        "/v1/completions",
        {"json": {"model": MODEL, "prompt": "x", "max_tokens": -3}},
        400,
        "max_tokens",
        "",
    ),
    (
        "max-tokens-string",
        "/v1/chat/completions",
        {"json": {"model": MODEL, "messages": MSG, "max_tokens": "many"}},
        400,
        "max_tokens",
        "",
    ),
    (
        "prompt-longer-than-context",
        "/v1/chat/completions",
        {"json": {"model": MODEL, "messages": [{"role": "user", "content": "word " * 40000}]}},
        400,
        "messages",
        "maximum context length",
    ),
    (
        "prompt-plus-max-tokens-over-context",
        "/v1/completions",
        {"json": {"model": MODEL, "prompt": "x" * 4000, "max_tokens": 40000}},
        400,
        "prompt",
        "maximum context",
    ),
    (
        "n-greater-than-one",
        "/v1/chat/completions",
        {"json": {"model": MODEL, "messages": MSG, "n": 2}},
        400,
        "n",
        "",
    ),
    (
        "batched-prompts",
        "/v1/completions",
        {"json": {"model": MODEL, "prompt": ["a", "b"]}},
        400,
        "prompt",
        "one prompt",
    ),
    ("missing-prompt", "/v1/completions", {"json": {"model": MODEL}}, 400, "prompt", "required"),
    (
        "empty-conversation-header",
        "/v1/chat/completions",
        {"json": {"model": MODEL, "messages": MSG}, "headers": {"X-Conversation-Id": ""}},
        400,
        None,
        "",
    ),
    (
        "non-ascii-conversation-id",
        "/v1/chat/completions",
        {"json": {"model": MODEL, "messages": MSG, "conversation_id": "caf\u20ac"}},
        400,
        "conversation_id",
        "pattern",
    ),
    (
        "conversation-id-with-newline",
        "/v1/chat/completions",
        {"json": {"model": MODEL, "messages": MSG, "conversation_id": "a\nb"}},
        400,
        "conversation_id",
        "",
    ),
    (
        "latin1-conversation-header",
        "/v1/chat/completions",
        {"json": {"model": MODEL, "messages": MSG}, "headers": {"X-Conversation-Id": b"caf\xe9"}},
        400,
        None,
        "",
    ),
    (
        "bad-final-header",
        "/v1/chat/completions",
        {"json": {"model": MODEL, "messages": MSG}, "headers": {"X-Conversation-Final": "perhaps"}},
        400,
        None,
        "",
    ),
    (
        "bad-conserve-field",
        "/v1/chat/completions",
        {"json": {"model": MODEL, "messages": MSG, "conserve": {"final": "sometimes"}}},
        400,
        "conserve.final",
        "",
    ),
    (
        "temperature-out-of-range",
        "/v1/chat/completions",
        {"json": {"model": MODEL, "messages": MSG, "temperature": 7}},
        400,
        "temperature",
        "",
    ),
]


@pytest.mark.parametrize(
    ("path", "kwargs", "status", "param", "needle"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_request_gets_openai_error(
    served_shared: Any, path: str, kwargs: dict[str, Any], status: int, param: str | None, needle: str
) -> None:
    r = httpx.post(served_shared.base_url + path, **kwargs)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] in ("invalid_request_error", "not_found_error")
    if param is not None:
        assert err["param"] == param
    assert needle in err["message"]
    assert "Traceback" not in r.text


def test_unknown_conversation_is_404(served_shared: Any) -> None:
    r = httpx.get(served_shared.base_url + "/v1/conversations/never-seen")
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "conversation_not_found"


def test_unknown_route_and_method_use_openai_errors(served_shared: Any) -> None:
    r = httpx.get(served_shared.base_url + "/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()
    r = httpx.get(served_shared.base_url + "/v1/chat/completions")
    assert r.status_code == 405 and "error" in r.json()


def _count(base_url: str, series: str) -> float:
    for line in httpx.get(base_url + "/metrics").text.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_bad_requests_are_counted_and_leave_no_turn(served_shared: Any) -> None:
    series = 'conserve_requests_total{endpoint="chat",status="404"}'
    before = _count(served_shared.base_url, series)
    turns_before = served_shared.runtime.router.stats["turns"]
    httpx.post(served_shared.base_url + "/v1/chat/completions", json={"model": "gpt-9", "messages": MSG})
    assert _count(served_shared.base_url, series) == before + 1
    assert served_shared.runtime.router.stats["turns"] == turns_before
