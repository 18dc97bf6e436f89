"""Interactive docs served from this process: /docs (Swagger UI) and /redoc (ReDoc), with their JavaScript and
CSS from the fastapi-offline package's static files (no CDN: the pages work offline and behind firewalls).

Also the OpenAPI document made true to the answers: FastAPI documents a 422 for every route with parameters
or a body, but ConServe answers invalid requests with 400 and an OpenAI-style error body
(api/errors.py); the 422s are replaced by that 400.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from api.schemas import ErrorResponse

__all__ = ["install_docs", "ASSETS_URL"]

ASSETS_URL = "/docs-assets"


def _assets_dir() -> str:
    return str(resources.files("fastapi_offline") / "static")


def install_docs(app: FastAPI) -> None:
    """Call with an app built with ``docs_url=None, redoc_url=None``."""
    app.mount(ASSETS_URL, StaticFiles(directory=_assets_dir()), name="docs-assets")
    title = app.title

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{title} - Swagger UI",
            swagger_js_url=f"{root}{ASSETS_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{ASSETS_URL}/swagger-ui.css",
            swagger_favicon_url=f"{root}{ASSETS_URL}/favicon.png",
        )

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_redoc_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{title} - ReDoc",
            redoc_js_url=f"{root}{ASSETS_URL}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{ASSETS_URL}/favicon.png",
            with_google_fonts=False,
        )

    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]


_BAD_REQUEST = {
    "description": "invalid request (names the field)",
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}},
}


def _openapi(app: FastAPI) -> dict[str, Any]:
    if app.openapi_schema:
        return app.openapi_schema
    schema = FastAPI.openapi(app)
    for path in schema.get("paths", {}).values():
        for op in path.values():
            responses = op.get("responses") if isinstance(op, dict) else None
            if responses and "422" in responses:
                del responses["422"]
                responses.setdefault("400", _BAD_REQUEST)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        components.pop(unused, None)
    if "ErrorResponse" not in components:
        defs = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
        for name, sub in defs.pop("$defs", {}).items():
            components.setdefault(name, sub)
        components["ErrorResponse"] = defs
    app.openapi_schema = schema
    return schema
