"""Schemathesis against our own OpenAPI schema on the sim backend: no input produces a 5xx.

Bounded: a few examples per operation (the whole module takes well under a minute).
"""

from __future__ import annotations

from typing import Any

import schemathesis
from hypothesis import HealthCheck, given, settings

MAX_EXAMPLES = 10


def test_no_server_errors(served_shared: Any) -> None:
    """Every operation of /openapi.json, MAX_EXAMPLES generated cases each: never a 5xx.

    Uses schemathesis's operation strategies with plain hypothesis rather than its pytest plugin, whose
    fixture integration breaks across pytest releases (pytest 9.2 removed an internal it reads).
    """
    schema = schemathesis.openapi.from_url(served_shared.base_url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert operations, "the schema lists no operations"
    for operation in operations:

        @settings(
            max_examples=MAX_EXAMPLES,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=True,
        )
        @given(case=operation.as_strategy())
        def check(case: Any) -> None:
            response = case.call(timeout=20)
            assert response.status_code < 500, (
                f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:500]}"
            )
            if response.status_code >= 400 and case.path.startswith("/v1/"):
                err = response.json()["error"]
                assert err["message"] and err["type"]

        check()


def test_schema_documents_every_route(served_shared: Any) -> None:
    import httpx

    spec = httpx.get(served_shared.base_url + "/openapi.json").json()
    paths = set(spec["paths"])
    for p in (
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/models",
        "/v1/conversations/{conversation_id}",
        "/v1/fleet",
        "/health",
        "/ready",
        "/metrics",
    ):
        assert p in paths
    chat = spec["paths"]["/v1/chat/completions"]["post"]
    assert {"200", "400", "404", "503"} <= set(chat["responses"])
    assert "text/event-stream" in chat["responses"]["200"]["content"]
