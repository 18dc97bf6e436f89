"""API keys of tenants, stored in the ledger database (table ``api_keys``, migration 0005_api_keys).

A key is ``cs_<key_id>_<secret>``: ``key_id`` (16 hex characters) is public and names the key in
``orchestrator keys list/revoke``; ``secret`` is 32 random bytes (``secrets.token_urlsafe``). Only the SHA-256
of the whole key is stored: a fast unsalted hash is enough for a 256-bit random secret (no dictionary or
brute force reaches it), and keeps the per-request check cheap. The hash read back is compared with
``hmac.compare_digest`` (constant time). The key itself is shown once, by :meth:`KeyStore.create`.

Must not import fastapi.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, insert, select, update
from sqlalchemy.exc import DBAPIError

from energy import db
from energy.db import ApiKeyRow
from energy.errors import EnergyError

__all__ = ["ApiKey", "KeyStore", "TENANT_PATTERN", "hash_key", "parse_key", "validate_tenant"]

KEY_PREFIX = "cs"
# Tenant names become the prefix of the tenant's conversation ids in the ledger ("<tenant>/<id>"; client ids
# cannot contain "/"), so they are short and "/"-free.
TENANT_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$"
_TENANT = re.compile(TENANT_PATTERN)
_KEY = re.compile(r"^cs_([0-9a-f]{16})_([A-Za-z0-9_-]{43})$")


@dataclass(frozen=True, slots=True)
class ApiKey:
    key_id: str
    tenant: str
    is_admin: bool
    created_at: datetime
    revoked_at: datetime | None
    label: str | None

    @property
    def active(self) -> bool:
        return self.revoked_at is None


def validate_tenant(tenant: str) -> str:
    if not _TENANT.fullmatch(tenant):
        raise EnergyError(
            f"tenant {tenant!r} is not a valid name. To fix: use 1-32 letters, digits, '_', '.' or '-', "
            "starting with a letter or digit."
        )
    return tenant


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def parse_key(key: str) -> str | None:
    """The key id of a well-formed key, else None."""
    m = _KEY.fullmatch(key)
    return m.group(1) if m else None


def _key_view(row: Any) -> ApiKey:
    return ApiKey(row.key_id, row.tenant, bool(row.is_admin), row.created_at, row.revoked_at, row.label)


class KeyStore:
    """Create, list, revoke and check API keys. Synchronous SQL: call it off the event loop."""

    def __init__(self, engine: Engine, *, owns_engine: bool = False) -> None:
        self._engine = engine
        self._owns = owns_engine

    @classmethod
    def open(cls, url: str) -> KeyStore:
        """A store on its own connection pool; the schema is migrated to head first."""
        engine = db.make_engine(url)
        store = cls(engine, owns_engine=True)
        with store._errors("migrating"):
            db.upgrade(engine)
        return store

    @classmethod
    def for_ledger(cls, ledger: Any) -> KeyStore:
        """A store on a ledger's connection pool (an in-memory SQLite ledger has no other); the ledger
        has been upgraded to head (energy.ledger.Ledger.upgrade)."""
        return cls(ledger._engine)

    def close(self) -> None:
        if self._owns:
            self._engine.dispose()

    def __enter__(self) -> KeyStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _errors(self, doing: str) -> Iterator[None]:
        try:
            yield
        except DBAPIError as err:
            url = self._engine.url.render_as_string(hide_password=True)
            first = str(err.orig).strip().splitlines()[0] if err.orig is not None else str(err)
            raise EnergyError(f"API key store ({url}) failed while {doing}: {first}") from err

    def create(self, tenant: str, *, admin: bool = False, label: str | None = None) -> tuple[str, ApiKey]:
        """A new key for `tenant`: (the key, shown once; its record)."""
        validate_tenant(tenant)
        key_id = secrets.token_hex(8)
        key = f"{KEY_PREFIX}_{key_id}_{secrets.token_urlsafe(32)}"
        now = datetime.now(UTC)
        with self._errors("creating a key"), self._engine.begin() as conn:
            conn.execute(
                insert(ApiKeyRow).values(
                    key_id=key_id,
                    tenant=tenant,
                    is_admin=admin,
                    key_sha256=hash_key(key),
                    created_at=now,
                    revoked_at=None,
                    label=label,
                )
            )
        return key, ApiKey(key_id, tenant, admin, now, None, label)

    def list(self, tenant: str | None = None) -> list[ApiKey]:
        q = select(ApiKeyRow).order_by(ApiKeyRow.tenant, ApiKeyRow.created_at)
        if tenant is not None:
            q = q.where(ApiKeyRow.tenant == tenant)
        with self._errors("listing keys"), self._engine.connect() as conn:
            return [_key_view(r) for r in conn.execute(q)]

    def revoke(self, key_id: str) -> ApiKey:
        """Revoke a key by its id (idempotent: a revoked key keeps its first revocation time)."""
        with self._errors("revoking a key"), self._engine.begin() as conn:
            row = conn.execute(select(ApiKeyRow).where(ApiKeyRow.key_id == key_id)).first()
            if row is None:
                raise EnergyError(
                    f"no API key with id {key_id!r}. To fix: use an id from `orchestrator keys list`."
                )
            if row.revoked_at is None:
                conn.execute(
                    update(ApiKeyRow).where(ApiKeyRow.key_id == key_id).values(revoked_at=datetime.now(UTC))
                )
            row = conn.execute(select(ApiKeyRow).where(ApiKeyRow.key_id == key_id)).one()
        return _key_view(row)

    def check(self, key: str) -> ApiKey | None:
        """The active key record for `key`, or None (malformed, unknown, wrong secret or revoked)."""
        key_id = parse_key(key)
        if key_id is None:
            return None
        with self._errors("checking a key"), self._engine.connect() as conn:
            row = conn.execute(select(ApiKeyRow).where(ApiKeyRow.key_id == key_id)).first()
        if row is None or not hmac.compare_digest(row.key_sha256, hash_key(key)):
            return None
        rec = _key_view(row)
        return rec if rec.active else None
