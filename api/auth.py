"""Authentication and tenant scoping: ``Authorization: Bearer <key>`` -> a :class:`Principal`.

Keys live hashed in the ledger database (energy/api_keys.py). A key checked there is cached in memory for
``auth_cache_ttl_s`` (default 5 s) under the SHA-256 of the presented token, so the hot path costs one hash
and one dict lookup; a revoked key is refused at most that long after `orchestrator keys revoke`. A refused
token is remembered for 1 s (a client retrying a bad key in a loop does not hit the database per request).

Tenants: every conversation belongs to the tenant of the key that sent its turns. The ledger id is
``<tenant>/<client id>`` (client ids cannot contain ``/``, so the prefix is unambiguous): another tenant's
id is a different conversation, and reading it is a 404. With auth off there is no tenant and ids are used
as sent (single-tenant, as before keys existed).

Admin keys read every tenant's conversations (``?tenant=``) and reports, the fleet and /metrics; the scrape
token (``CONSERVE_SCRAPE_TOKEN``) reads /metrics only.

Must not import sqlalchemy (the key store does the SQL, off the event loop).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from api.errors import ApiError
from api.schemas import CONVERSATION_ID_MAX_CHARS

__all__ = [
    "Principal",
    "OPEN",
    "Authenticator",
    "PrincipalDep",
    "AdminDep",
    "MetricsDep",
    "require_admin",
    "scoped_id",
    "client_id",
]

NEGATIVE_CACHE_S = 1.0  # a refused token is not looked up again for this long
CACHE_MAX_ENTRIES = 10_000  # cleared when full: bounded memory under a flood of distinct bad tokens


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling. tenant None: auth is off (no tenant namespace)."""

    tenant: str | None
    admin: bool
    key_id: str | None = None
    scrape_only: bool = False


OPEN = Principal(tenant=None, admin=True)  # auth off: one trusted client
_SCRAPER = Principal(tenant=None, admin=False, scrape_only=True)


def unauthorized(message: str) -> ApiError:
    return ApiError(
        401, message, code="invalid_api_key", headers={"WWW-Authenticate": 'Bearer realm="conserve"'}
    )


class Authenticator:
    """Bearer token -> Principal, with an in-memory cache in front of the key store (see module doc)."""

    def __init__(
        self,
        store: Any,
        *,
        enabled: bool,
        scrape_token: str | None = None,
        cache_ttl_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store  # energy.api_keys.KeyStore (check(key) -> ApiKey | None), or None when disabled
        self.enabled = enabled
        self._scrape = scrape_token.encode() if scrape_token else None
        self.cache_ttl_s = cache_ttl_s
        self.clock = clock
        self._cache: dict[bytes, tuple[Principal | None, float]] = {}
        self.db_checks = 0  # lookups that went to the database (tests, diagnostics)

    async def principal(self, token: bytes | None, *, allow_scrape: bool = False) -> Principal:
        """The caller for a bearer token (the bytes after ``Bearer ``); raises a 401 ApiError."""
        if not self.enabled:
            return OPEN
        if not token:
            raise unauthorized(
                "no API key. To fix: send 'Authorization: Bearer <key>' (the OpenAI client's api_key); "
                "keys come from `orchestrator keys create --tenant NAME`."
            )
        if self._scrape is not None and hmac.compare_digest(token, self._scrape):
            if allow_scrape:
                return _SCRAPER
            raise ApiError(403, "the scrape token may read /metrics only", code="forbidden")
        digest = hashlib.sha256(token).digest()
        now = self.clock()
        hit = self._cache.get(digest)
        if hit is not None and hit[1] > now:
            p = hit[0]
        else:
            p = await self._lookup(token)
            if len(self._cache) >= CACHE_MAX_ENTRIES:
                self._cache.clear()
            ttl = self.cache_ttl_s if p is not None else min(NEGATIVE_CACHE_S, self.cache_ttl_s)
            self._cache[digest] = (p, now + ttl)
        if p is None:
            raise unauthorized(
                "invalid or revoked API key. To fix: use a key from `orchestrator keys create` that "
                "`orchestrator keys list` shows as not revoked."
            )
        return p

    async def _lookup(self, token: bytes) -> Principal | None:
        try:
            key = token.decode("ascii")
        except UnicodeDecodeError:
            return None
        from energy.api_keys import parse_key

        if parse_key(key) is None:  # malformed: no database round trip
            return None
        self.db_checks += 1
        rec = await asyncio.to_thread(self.store.check, key)
        return None if rec is None else Principal(rec.tenant, rec.is_admin, rec.key_id)

    def forget(self) -> None:
        """Drop the cache (tests; a revocation that must take effect now)."""
        self._cache.clear()


def bearer_token(authorization: bytes | None) -> bytes | None:
    """The token of an ``Authorization: Bearer <token>`` header value (case-insensitive scheme)."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(b" ")
    if scheme.lower() != b"bearer":
        return None
    return token.strip() or None


# ---- tenant scoping ----------------------------------------------------------------------------------------


def scoped_id(p: Principal, conversation_id: str, *, tenant: str | None = None) -> str:
    """The ledger id of a client's conversation id. Admins may name another `tenant`."""
    owner = tenant if (tenant is not None and p.admin) else p.tenant
    if owner is None:
        return conversation_id
    out = f"{owner}/{conversation_id}"
    if len(out) > CONVERSATION_ID_MAX_CHARS:
        room = CONVERSATION_ID_MAX_CHARS - len(owner) - 1
        raise ApiError(
            400,
            f"conversation_id: at most {room} characters for tenant {owner!r} (the ledger stores "
            f"'<tenant>/<id>' in {CONVERSATION_ID_MAX_CHARS}). To fix: use a shorter id.",
            param="conversation_id",
        )
    return out


def client_id(p: Principal, ledger_id: str, *, tenant: str | None = None) -> str:
    owner = tenant if (tenant is not None and p.admin) else p.tenant
    if owner is None:
        return ledger_id
    prefix = owner + "/"
    return ledger_id[len(prefix) :] if ledger_id.startswith(prefix) else ledger_id


def require_admin(p: Principal, what: str) -> None:
    if not p.admin:
        raise ApiError(
            403,
            f"{what} needs an admin key. To fix: use a key from `orchestrator keys create --admin`.",
            type_="permission_error",
            code="forbidden",
        )


# ---- FastAPI dependencies ----------------------------------------------------------------------------------

bearer = HTTPBearer(
    auto_error=False,
    scheme_name="ApiKey",
    description="`Authorization: Bearer <key>` (the OpenAI client's api_key). Keys: `orchestrator keys "
    "create --tenant NAME [--admin]`. Not required when serve runs with auth off.",
)


async def _principal(request: Request, creds: HTTPAuthorizationCredentials | None, scrape: bool) -> Principal:
    state = request.scope.get("state") or {}
    known = state.get("principal")  # set by the raw-ASGI fast path before it handed the request over
    if isinstance(known, Principal):
        return known
    auth: Authenticator | None = getattr(request.app.state, "auth", None)
    if auth is None:  # an app assembled without api/app.py's create_app (a router mounted alone): no keys
        return OPEN
    if creds is None and auth.enabled and request.headers.get("authorization"):
        raise unauthorized("Authorization header is not 'Bearer <key>'. To fix: send 'Bearer <key>'.")
    token = creds.credentials.encode("latin-1") if creds is not None else None
    return await auth.principal(token, allow_scrape=scrape)


async def get_principal(
    request: Request, creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> Principal:
    return await _principal(request, creds, scrape=False)


async def get_admin(
    request: Request, creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> Principal:
    p = await _principal(request, creds, scrape=False)
    require_admin(p, f"{request.method} {request.url.path}")
    return p


async def get_metrics_reader(
    request: Request, creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> Principal:
    p = await _principal(request, creds, scrape=True)
    if not p.scrape_only:
        require_admin(p, "GET /metrics (or the scrape token)")
    return p


PrincipalDep = Annotated[Principal, Depends(get_principal)]
AdminDep = Annotated[Principal, Depends(get_admin)]
MetricsDep = Annotated[Principal, Depends(get_metrics_reader)]
