"""Security acceptance (issue 13 item 1): API keys and tenants, with the official openai client against a real
uvicorn server (simulated engines, SQLite ledger file). Keys are made with the real key store."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from api.settings import ApiSettings
from energy.api_keys import KeyStore
from energy.ledger import Ledger

Served = Any

MODEL = "Qwen3-0.6B"
SCRAPE = "scrape-token-for-tests-0123456789"  # tests/api/conftest.py served_secured


@pytest.fixture(scope="module")
def secured(served_secured: Served) -> tuple[Served, dict[str, str]]:
    return served_secured, served_secured.keys  # type: ignore[attr-defined]


def _client(url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=30)


def _turn(
    client: openai.OpenAI, cid: str | None, text: str, *, final: bool = False, stream: bool = False
) -> Any:
    headers = {"X-Conversation-Id": cid} if cid else {}
    if final:
        headers["X-Conversation-Final"] = "true"
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=[{"role": "user", "content": text}],
        max_tokens=4,
        stream=stream,
        extra_headers=headers,
    )
    body = raw.parse()
    if stream:
        list(body)
    return raw


def _get(url: str, path: str, key: str | None = None, **params: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.get(url + path, headers=headers, params=params, timeout=30)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_the_openai_client_works_with_a_key_and_gets_the_conversation_id_back(
    secured: Any, stream: bool
) -> None:
    s, keys = secured
    raw = _turn(_client(s.base_url, keys["a"]), "ok-conv", "hello", stream=stream)
    assert raw.http_response.status_code == 200
    assert raw.headers["x-conversation-id"] == "ok-conv"  # the client's id, not the ledger's "acme/ok-conv"
    models = _client(s.base_url, keys["b"]).models.list()
    assert [m.id for m in models.data] == [MODEL]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_no_key_or_a_bad_key_is_401_with_an_openai_error(secured: Any, path: str) -> None:
    s, keys = secured
    body = {"model": MODEL, "max_tokens": 2}
    body.update({"messages": [{"role": "user", "content": "x"}]} if "chat" in path else {"prompt": "x"})
    for headers in (
        {},
        {"Authorization": "Bearer cs_0123456789abcdef_" + "x" * 43},
        {"Authorization": "Basic x"},
    ):
        r = httpx.post(s.base_url + path, json=body, headers=headers, timeout=30)
        assert r.status_code == 401, (headers, r.text)
        assert r.json()["error"]["code"] == "invalid_api_key"
        assert r.headers["www-authenticate"].startswith("Bearer")
    with pytest.raises(openai.AuthenticationError):
        _client(s.base_url, "not-a-key").models.list()
    for p in ("/v1/models", "/v1/conversations/x", "/v1/reports/energy"):
        assert _get(s.base_url, p).status_code == 401, p


def test_a_revoked_key_is_refused_within_the_cache_ttl(secured: Any) -> None:
    s, _ = secured
    store = KeyStore.open(s.db_url)
    key, rec = store.create("charlie")
    client = _client(s.base_url, key)
    _turn(client, "c-1", "hi")  # works, and is cached now
    store.revoke(rec.key_id)
    store.close()
    time.sleep(0.6)  # auth_cache_ttl_s=0.5 in this server
    with pytest.raises(openai.AuthenticationError):
        _turn(client, "c-2", "hi again")
    assert _get(s.base_url, "/v1/models", key).status_code == 401


def test_tenants_cannot_read_continue_end_or_list_each_others_conversations(secured: Any) -> None:
    s, keys = secured
    a, b = _client(s.base_url, keys["a"]), _client(s.base_url, keys["b"])
    _turn(a, "shared-id", "a1")
    _turn(a, "only-a", "a only")
    # B uses A's id, even marks it final: that is B's own conversation, A's is untouched
    _turn(b, "shared-id", "b1", final=True)
    _turn(a, "shared-id", "a2")
    assert s.runtime.writer.flush()
    conv_a = _get(s.base_url, "/v1/conversations/shared-id", keys["a"]).json()
    conv_b = _get(s.base_url, "/v1/conversations/shared-id", keys["b"]).json()
    assert conv_a["conversation_id"] == "shared-id" == conv_b["conversation_id"]
    assert [t["turn"] for t in conv_a["turns"]] == [1, 2] and conv_a["active"]  # A's pin was not ended
    assert [t["turn"] for t in conv_b["turns"]] == [1] and conv_b["final_turn"] == 1
    # B cannot read A's other conversation: 404, as for an id that does not exist
    r = _get(s.base_url, "/v1/conversations/only-a", keys["b"])
    assert r.status_code == 404 and r.json()["error"]["code"] == "conversation_not_found"
    assert _get(s.base_url, "/v1/conversations/only-a", keys["b"], tenant="acme").status_code == 403
    # the admin reads any tenant's conversation
    r = _get(s.base_url, "/v1/conversations/only-a", keys["admin"], tenant="acme")
    assert r.status_code == 200 and r.json()["conversation_id"] == "only-a"
    # in the ledger, each conversation is its tenant's
    ids = {t.conversation_id for _, t in Ledger(s.db_url).turns()}
    assert {"acme/shared-id", "bravo/shared-id", "acme/only-a"} <= ids


def test_reports_are_scoped_to_the_tenant_and_the_admin_sees_all(secured: Any) -> None:
    s, keys = secured
    _turn(_client(s.base_url, keys["a"]), "rep-a", "from a")
    _turn(_client(s.base_url, keys["b"]), "rep-b", "from b")
    assert s.runtime.writer.flush()
    rows_b = _get(s.base_url, "/v1/reports/energy", keys["b"]).json()["rows"]
    ids_b = {r["conversation_id"] for r in rows_b}
    assert "rep-b" in ids_b and "rep-a" not in ids_b and not any("/" in i for i in ids_b)
    csv_b = _get(s.base_url, "/v1/reports/energy", keys["b"], format="csv").text
    assert "rep-a" not in csv_b and "acme" not in csv_b
    for by in ("tier", "engine", "policy"):
        assert _get(s.base_url, "/v1/reports/energy", keys["b"], by=by).status_code == 403, by
    assert _get(s.base_url, "/v1/reports/energy", keys["b"], tenant="acme").status_code == 403
    mine = _get(s.base_url, "/v1/reports/energy", keys["b"], by="tenant").json()
    assert [r["tenant"] for r in mine["rows"]] == ["bravo"]
    # admin: every tenant, with per-tenant energy and token totals that add up to the conversations'
    admin = _get(s.base_url, "/v1/reports/energy", keys["admin"], by="tenant").json()
    per = {r["tenant"]: r for r in admin["rows"]}
    assert {"acme", "bravo"} <= set(per)
    convs = _get(s.base_url, "/v1/reports/energy", keys["admin"]).json()["rows"]
    assert {"acme/rep-a", "bravo/rep-b"} <= {r["conversation_id"] for r in convs}
    for tenant in ("acme", "bravo"):
        rows = [r for r in convs if r["conversation_id"].startswith(tenant + "/")]
        assert per[tenant]["tokens"] == sum(r["tokens"] for r in rows) > 0
        assert per[tenant]["conversations"] == len(rows)
        assert per[tenant]["joules"] == pytest.approx(sum(r["joules"] or 0.0 for r in rows))
    assert _get(s.base_url, "/v1/reports/energy", keys["admin"], by="tier").status_code == 200


def test_metrics_and_fleet_need_admin_or_the_scrape_token(secured: Any) -> None:
    s, keys = secured
    assert _get(s.base_url, "/metrics").status_code == 401
    assert _get(s.base_url, "/metrics", keys["a"]).status_code == 403
    assert _get(s.base_url, "/metrics", keys["admin"]).status_code == 200
    assert "conserve_requests_total" in _get(s.base_url, "/metrics", SCRAPE).text
    assert _get(s.base_url, "/v1/fleet", SCRAPE).status_code == 403  # the scrape token reads /metrics only
    assert _get(s.base_url, "/v1/fleet", keys["a"]).status_code == 403
    assert _get(s.base_url, "/v1/fleet", keys["admin"]).status_code == 200
    assert _get(s.base_url, "/health").status_code == 200  # liveness stays open


def test_openapi_declares_the_bearer_scheme_on_protected_routes(secured: Any) -> None:
    s, _ = secured
    spec = httpx.get(s.base_url + "/openapi.json").json()
    scheme = spec["components"]["securitySchemes"]["ApiKey"]
    assert scheme["type"] == "http" and scheme["scheme"] == "bearer"
    for path, method in [
        ("/v1/chat/completions", "post"),
        ("/v1/completions", "post"),
        ("/v1/models", "get"),
        ("/v1/conversations/{conversation_id}", "get"),
        ("/v1/reports/energy", "get"),
        ("/v1/fleet", "get"),
        ("/metrics", "get"),
    ]:
        assert {"ApiKey": []} in spec["paths"][path][method].get("security", []), path
    assert "security" not in spec["paths"]["/health"]["get"]


def test_auth_is_required_by_default_on_a_non_loopback_address() -> None:
    assert ApiSettings().auth_required("0.0.0.0") and ApiSettings().auth_required("10.1.2.3")
    assert not ApiSettings().auth_required("127.0.0.1") and not ApiSettings().auth_required("::1")
    assert not ApiSettings(auth="off").auth_required("0.0.0.0")
    assert ApiSettings(auth="on").auth_required("127.0.0.1")


def test_keys_are_stored_hashed_and_checked(tmp_path: Path) -> None:
    store = KeyStore.open(f"sqlite:///{tmp_path / 'k.db'}")
    key, rec = store.create("acme", label="ci")
    raw = (tmp_path / "k.db").read_bytes() + (
        (tmp_path / "k.db-wal").read_bytes() if (tmp_path / "k.db-wal").exists() else b""
    )
    assert key.encode() not in raw and key.rsplit("_", 1)[1].encode() not in raw  # only a hash is stored
    assert store.check(key) is not None and store.check(key).tenant == "acme"
    assert store.check(key[:-1] + ("A" if key[-1] != "A" else "B")) is None  # wrong secret, same key id
    store.revoke(rec.key_id)
    assert store.check(key) is None
    assert [k.key_id for k in store.list("acme")] == [rec.key_id] and store.list("acme")[0].revoked_at
    store.close()


@pytest.mark.parametrize("fmt", ["json", "csv", "html", "table"])
@pytest.mark.parametrize("by", ["conversation", "tenant"])
@pytest.mark.parametrize("who", ["b", "admin"])
def test_tenant_reports_render_in_every_format(secured: Any, fmt: str, by: str, who: str) -> None:
    s, keys = secured
    r = _get(s.base_url, "/v1/reports/energy", keys[who], by=by, format=fmt)
    assert r.status_code == 200, r.text
    if who == "b":
        assert "acme" not in r.text
