"""The raw-ASGI fast path (api/fastpath.py): it takes only what the FastAPI route would accept unchanged,
and a server with it answers like a server without it."""

from __future__ import annotations

from typing import Any

import httpx
import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from test_bad_input import CASES  # same directory (tests are not a package)

from api.fastpath import CHECKS, REQUIRED, simple_body_ok
from api.schemas import ChatCompletionRequest, CompletionRequest
from orchestrator.engines.base import RequestKind

MODEL = "Qwen3-0.6B"
MODELS = {RequestKind.CHAT: ChatCompletionRequest, RequestKind.COMPLETION: CompletionRequest}


@pytest.mark.parametrize("kind", list(RequestKind), ids=str)
def test_every_declared_field_has_an_exact_check(kind: RequestKind) -> None:
    # a schema field without a check would be treated as an unknown field and forwarded unvalidated
    assert set(CHECKS[kind]) == set(MODELS[kind].model_fields)
    assert all(MODELS[kind].model_fields[k].is_required() for k in REQUIRED[kind])


# values of every JSON type, near the schema's bounds, including the ones pydantic coerces (1 -> 1.0,
# True -> 1, "5" -> 5 in lax mode) which the fast path must refuse
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 3),
    st.sampled_from([0.0, 0.5, 1.0, 1.5, 2.0, 2.5, -0.1, 1e-9]),
    st.sampled_from(["", "x", MODEL, "5", "true", "user", "wizard"]),
)
messages = st.lists(
    st.dictionaries(
        st.sampled_from(["role", "content", "name", "tool_calls", "tool_call_id", "extra"]),
        st.one_of(
            scalars,
            st.lists(st.dictionaries(st.sampled_from(["type", "text"]), scalars, max_size=2), max_size=2),
        ),
        max_size=4,
    ),
    max_size=3,
)
values = st.one_of(
    scalars,
    messages,
    st.lists(scalars, max_size=3),
    st.lists(st.lists(st.integers(-1, 3), max_size=2), max_size=2),
    st.dictionaries(st.sampled_from(["final", "include_usage", "other"]), scalars, max_size=2),
    st.text(max_size=3),
)


_VALID_MESSAGES = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["system", "developer", "user", "assistant", "tool"])},
        optional={
            "content": st.one_of(st.none(), st.text(max_size=3), st.integers(0, 1)),
            "name": st.one_of(st.none(), st.text(max_size=2)),
            "tool_calls": st.one_of(st.none(), st.lists(st.just({"id": "1"}), max_size=1), st.just("x")),
            "tool_call_id": st.one_of(st.none(), st.text(max_size=2)),
            "extra": scalars,
        },
    ),
    min_size=1,
    max_size=3,
)
_BASES = {
    RequestKind.CHAT: st.fixed_dictionaries({"model": st.just(MODEL), "messages": _VALID_MESSAGES}),
    RequestKind.COMPLETION: st.fixed_dictionaries(
        {
            "model": st.just(MODEL),
            "prompt": st.one_of(st.text(max_size=3), st.lists(st.integers(0, 9), max_size=2)),
        }
    ),
}


def _bodies(kind: RequestKind) -> st.SearchStrategy[dict[str, Any]]:
    """A body that validates (model + messages/prompt) with 0-4 fields overwritten by arbitrary values,
    so that both outcomes are frequent (checked by test_generated_bodies_exercise_both_outcomes)."""
    keys = sorted(CHECKS[kind]) + ["vendor_extra"]
    return st.builds(
        lambda base, extra: {**base, **extra},
        _BASES[kind],
        st.dictionaries(st.sampled_from(keys), values, max_size=4),
    )


def _assert_pydantic_agrees(kind: RequestKind, body: dict[str, Any]) -> None:
    if simple_body_ok(kind, body):
        dumped = MODELS[kind].model_validate(body).model_dump(exclude_unset=True)
        # compared as JSON text: dict equality would let 1 == 1.0 == True through (pydantic coerces those)
        assert _json(dumped) == _json(body), (body, dumped)


def _json(obj: Any) -> bytes:
    return orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(body=_bodies(RequestKind.CHAT))
@example(body={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8})
@example(body={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": 1})
@example(body={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": True})
def test_chat_bodies_it_accepts_pydantic_accepts_unchanged(body: dict[str, Any]) -> None:
    _assert_pydantic_agrees(RequestKind.CHAT, body)


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(body=_bodies(RequestKind.COMPLETION))
@example(body={"model": MODEL, "prompt": [[1, 2], [3]]})
@example(body={"model": MODEL, "prompt": [True, 2]})
def test_completion_bodies_it_accepts_pydantic_accepts_unchanged(body: dict[str, Any]) -> None:
    _assert_pydantic_agrees(RequestKind.COMPLETION, body)


@pytest.mark.parametrize("kind", list(RequestKind), ids=str)
def test_generated_bodies_exercise_both_outcomes(kind: RequestKind) -> None:
    seen: set[bool] = set()

    @settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(body=_bodies(kind))
    def collect(body: dict[str, Any]) -> None:
        seen.add(simple_body_ok(kind, body))

    collect()
    assert seen == {True, False}  # the agreement property above is not vacuous


@pytest.mark.parametrize(
    ("kind", "body", "fast"),
    [
        (RequestKind.CHAT, {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}, True),
        (
            RequestKind.CHAT,
            {
                "model": MODEL,
                "messages": [
                    {"role": "system", "content": "s"},
                    {"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]},
                    {"role": "tool", "content": "out", "tool_call_id": "1"},
                ],
                "max_tokens": 8,
                "stream": True,
                "stream_options": {"include_usage": True},
                "conversation_id": "c1",
                "conserve": {"final": True},
                "logprobs": False,
            },
            True,
        ),
        (RequestKind.COMPLETION, {"model": MODEL, "prompt": "x", "max_tokens": 2, "echo": False}, True),
        (
            RequestKind.CHAT,
            {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "text"}]}]},
            False,
        ),
        (RequestKind.CHAT, {"model": MODEL, "messages": [{"role": "user"}], "tools": []}, False),
        (RequestKind.CHAT, {"model": MODEL, "messages": []}, False),
        (RequestKind.COMPLETION, {"model": MODEL}, False),
    ],
    ids=["minimal-chat", "agent-turn", "completion", "content-parts", "tools", "empty-messages", "no-prompt"],
)
def test_common_bodies_take_the_fast_path(kind: RequestKind, body: dict[str, Any], fast: bool) -> None:
    assert simple_body_ok(kind, body) is fast


def _answer(base_url: str, path: str, kwargs: dict[str, Any]) -> tuple[int, Any]:
    r = httpx.post(base_url + path, **kwargs)
    return r.status_code, r.json() if r.headers.get("content-type", "").startswith(
        "application/json"
    ) else None


@pytest.mark.parametrize(("path", "kwargs"), [c[1:3] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_answers_equal_the_fastapi_routes(
    served_shared: Any, served_fastapi_only: Any, path: str, kwargs: dict[str, Any]
) -> None:
    assert _answer(served_shared.base_url, path, kwargs) == _answer(
        served_fastapi_only.base_url, path, kwargs
    )


def test_good_requests_are_served_by_the_fast_path_and_match(
    served_shared: Any, served_fastapi_only: Any
) -> None:
    fp = served_shared.app.fast_path
    served_before, fallbacks_before = fp.served, fp.fallbacks
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    answers = []
    for s in (served_shared, served_fastapi_only):
        r = httpx.post(s.base_url + "/v1/chat/completions", json=body, headers={"X-Conversation-Id": "fp-1"})
        assert r.status_code == 200, r.text
        data = r.json()
        answers.append((r.headers["x-conversation-id"], data["object"], data["usage"]["completion_tokens"]))
        with httpx.stream(
            "POST",
            s.base_url + "/v1/completions",
            json={"model": MODEL, "prompt": "x", "max_tokens": 3, "stream": True},
        ) as st_resp:
            assert st_resp.status_code == 200
            events = [ln for ln in st_resp.iter_lines() if ln.startswith("data: ")]
        assert events[-1] == "data: [DONE]" and sum(e == "data: [DONE]" for e in events) == 1
        answers.append(("stream", len(events)))
    assert answers[:2] == answers[2:]
    assert fp.served == served_before + 2
    assert fp.fallbacks == fallbacks_before
    assert served_fastapi_only.app.fast_path is None
