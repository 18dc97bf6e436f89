"""Issue 13 item 6: the smaller defects, each as the user met it (real uvicorn server, sim engines)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from energy.ledger import Ledger

MODEL = "Qwen3-0.6B"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


def _chat(url: str, cid: str | None = None, *, final: bool = False, **body: Any) -> httpx.Response:
    headers = {}
    if cid is not None:
        headers["X-Conversation-Id"] = cid
    if final:
        headers["X-Conversation-Final"] = "true"
    return httpx.post(url + "/v1/chat/completions", json=dict(CHAT, **body), headers=headers, timeout=30)


@pytest.mark.parametrize("fixture", ["served_shared", "served_fastapi_only"], ids=["fast-path", "fastapi"])
@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_a_request_without_a_conversation_id_gets_one_back(
    fixture: str, stream: bool, request: pytest.FixtureRequest
) -> None:
    s = request.getfixturevalue(fixture)
    r = _chat(s.base_url, stream=stream)
    assert r.status_code == 200, r.text
    cid = r.headers["x-conversation-id"]
    assert cid.startswith("conv-")
    assert s.runtime.writer.flush()
    got = httpx.get(f"{s.base_url}/v1/conversations/{cid}", timeout=30)
    assert got.status_code == 200 and [t["turn"] for t in got.json()["turns"]] == [1]


def test_reusing_an_id_right_after_its_final_turn_continues_the_numbering(served_shared: Any) -> None:
    url = served_shared.base_url
    assert _chat(url, "reuse-1").status_code == 200
    assert _chat(url, "reuse-1", final=True).status_code == 200
    assert _chat(url, "reuse-1").status_code == 200  # at once, with a fresh message list
    assert served_shared.runtime.writer.flush()
    turns = sorted(t.turn for _, t in Ledger(served_shared.db_url).turns() if t.conversation_id == "reuse-1")
    assert turns == [1, 2, 3]
    conv = httpx.get(url + "/v1/conversations/reuse-1", timeout=30).json()
    assert conv["replacements"] == 0  # placed again after its end: not a replacement


@pytest.mark.parametrize("where", ["header", "body"])
def test_an_id_with_a_slash_is_a_400_naming_the_field(served_shared: Any, where: str) -> None:
    if where == "header":
        r = _chat(served_shared.base_url, "team/a")
    else:
        r = _chat(served_shared.base_url, conversation_id="team/a")
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert "conversation" in (err["param"] or err["message"]).lower()


def test_ended_conversations_leave_memory_without_waiting_for_the_pin_ttl(served_shared: Any) -> None:
    url, router = served_shared.base_url, served_shared.runtime.router
    for i in range(20):
        assert _chat(url, f"mem-{i}").status_code == 200
        assert _chat(url, f"mem-{i}", final=True).status_code == 200
    assert _chat(url, "mem-open").status_code == 200  # not ended: keeps its pin until the TTL
    keep_s, ttl_s = router.config.ended_keep_s, router.config.pin_ttl_s
    assert keep_s < 60 < ttl_s
    held = served_shared.call(lambda: {c for c in router._convs if c.startswith("mem-")})
    assert len(held) == 21
    later = router.clock.now_s() + keep_s + 1  # the router times on its monotonic clock
    served_shared.call(lambda: router.expire_idle(later))
    held = served_shared.call(lambda: {c for c in router._convs if c.startswith("mem-")})
    assert held == {"mem-open"}
    assert served_shared.runtime.writer.flush()
    conv = httpx.get(url + "/v1/conversations/mem-3", timeout=30)  # still readable, from the ledger
    assert conv.status_code == 200 and conv.json()["final_turn"] == 2


@pytest.mark.parametrize("page,asset", [("/docs", "swagger-ui-bundle.js"), ("/redoc", "redoc.standalone.js")])
def test_docs_pages_load_their_assets_from_this_server(served_shared: Any, page: str, asset: str) -> None:
    html = httpx.get(served_shared.base_url + page, timeout=30).text
    assert f"/docs-assets/{asset}" in html
    assert "cdn.jsdelivr" not in html and "https://" not in html.replace("https://fastapi.tiangolo.com", "")
    js = httpx.get(served_shared.base_url + "/docs-assets/" + asset, timeout=30)
    assert js.status_code == 200 and len(js.content) > 100_000


def test_openapi_documents_400_where_the_server_answers_400(served_shared: Any) -> None:
    spec = httpx.get(served_shared.base_url + "/openapi.json", timeout=30).json()
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            assert "422" not in op["responses"], (method, path)
            if op.get("parameters") or op.get("requestBody"):
                assert "400" in op["responses"], (method, path)
    r = _chat(served_shared.base_url, max_tokens=0)
    assert r.status_code == 400


def test_validation_400s_are_counted_in_conserve_requests_total(served_shared: Any) -> None:
    metrics = served_shared.app.state.metrics
    before = metrics.requests[("chat", "400")]
    assert _chat(served_shared.base_url, max_tokens=0).status_code == 400  # schema validation (FastAPI route)
    assert _chat(served_shared.base_url, model="nope").status_code == 404  # counted by the route before
    after = metrics.requests[("chat", "400")]
    assert after == before + 1
    text = httpx.get(served_shared.base_url + "/metrics", timeout=30).text
    assert f'conserve_requests_total{{endpoint="chat",status="400"}} {float(after)}' in text


def _status_check(operation: Any) -> Any:
    documented = set(operation.definition.raw.get("responses", {}))

    @settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(case=operation.as_strategy())
    def check(case: Any) -> None:
        response = case.call(timeout=20)
        assert str(response.status_code) in documented or "default" in documented, (
            f"{case.method} {case.formatted_path} -> {response.status_code} not in {sorted(documented)}: "
            f"{response.text[:300]}"
        )

    return check


def test_every_answer_has_a_documented_status(served_shared: Any) -> None:
    """Schemathesis: for generated requests to every operation, the status answered is one the OpenAPI
    document lists for that operation (the 422-vs-400 mismatch was the finding)."""
    schema = schemathesis.openapi.from_url(served_shared.base_url + "/openapi.json")
    for result in schema.get_all_operations():
        _status_check(result.ok())()
