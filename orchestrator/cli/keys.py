"""`orchestrator keys`: API keys of tenants in the ledger database (energy/api_keys.py).

    orchestrator keys create --tenant NAME [--admin] [--label TEXT] [--db URL | --fleet fleet.yaml]
    orchestrator keys list [--tenant NAME] [--json]
    orchestrator keys revoke KEY_ID

The key is printed once, at creation; only its SHA-256 is stored. `serve` sees a revoked key refused within
its key cache's lifetime (``CONSERVE_AUTH_CACHE_TTL_S``, 5 s by default).
"""

from __future__ import annotations

from pathlib import Path

import typer

from orchestrator.cli.common import console, handle_errors, print_json

DEFAULT_DB = "sqlite:///conserve.db"  # orchestrator.config.FleetConfig.database_url's default


def _db_url(db: str | None, fleet: Path | None) -> str:
    """--db, else the fleet's database_url (what `serve --fleet` uses), else the default."""
    if db:
        return db
    if fleet is not None:
        from orchestrator.config import load_fleet

        return load_fleet(fleet).database_url
    return DEFAULT_DB


_DB = typer.Option(None, "--db", help="ledger URL (default: the --fleet's database_url, else conserve.db)")
_FLEET = typer.Option(None, "--fleet", help="take the ledger URL from this fleet.yaml (as serve does)")


def register(app: typer.Typer) -> None:
    keys_app = typer.Typer(help="API keys of tenants (stored hashed in the ledger).", no_args_is_help=True)

    @keys_app.command("create")
    @handle_errors
    def create(
        tenant: str = typer.Option(..., "--tenant", help="tenant the key acts for"),
        admin: bool = typer.Option(False, "--admin", help="admin key: every tenant's data, fleet, metrics"),
        label: str | None = typer.Option(None, "--label", help="a note shown by `keys list`"),
        db: str | None = _DB,
        fleet: Path | None = _FLEET,
        as_json: bool = typer.Option(False, "--json", help="JSON output"),
    ) -> None:
        """Create a key; it is shown once (store it now)."""
        from energy.api_keys import KeyStore, validate_tenant

        validate_tenant(tenant)  # before touching the database
        with KeyStore.open(_db_url(db, fleet)) as store:
            key, rec = store.create(tenant, admin=admin, label=label)
        if as_json:
            print_json({"key": key, "key_id": rec.key_id, "tenant": rec.tenant, "admin": rec.is_admin})
            return
        kind = "admin key" if admin else "key"
        console.print(f"created {kind} {rec.key_id} for tenant {rec.tenant!r}; it is shown only once:")
        console.print(key, highlight=False, soft_wrap=True)

    @keys_app.command("list")
    @handle_errors
    def list_(
        tenant: str | None = typer.Option(None, "--tenant", help="only this tenant's keys"),
        db: str | None = _DB,
        fleet: Path | None = _FLEET,
        as_json: bool = typer.Option(False, "--json", help="JSON output"),
    ) -> None:
        """Keys (ids, tenants, admin, created, revoked); never the keys themselves."""
        from energy.api_keys import KeyStore

        with KeyStore.open(_db_url(db, fleet)) as store:
            keys = store.list(tenant)
        rows = [
            {
                "key_id": k.key_id,
                "tenant": k.tenant,
                "admin": k.is_admin,
                "created_at": k.created_at.isoformat(),
                "revoked_at": k.revoked_at.isoformat() if k.revoked_at else None,
                "label": k.label,
            }
            for k in keys
        ]
        if as_json:
            print_json(rows)
            return
        from rich.table import Table

        table = Table(title=f"API keys ({len(rows)})")
        for col in ("key id", "tenant", "admin", "created (UTC)", "revoked (UTC)", "label"):
            table.add_column(col)
        for k in keys:
            revoked = f"{k.revoked_at:%Y-%m-%dT%H:%M:%S}" if k.revoked_at else ""
            table.add_row(
                k.key_id, k.tenant, "yes" if k.is_admin else "", f"{k.created_at:%Y-%m-%dT%H:%M:%S}", revoked,
                k.label or "",
            )  # fmt: skip
        console.print(table)

    @keys_app.command("revoke")
    @handle_errors
    def revoke(
        key_id: str = typer.Argument(..., help="the key's id (from `keys list`)"),
        db: str | None = _DB,
        fleet: Path | None = _FLEET,
        as_json: bool = typer.Option(False, "--json", help="JSON output"),
    ) -> None:
        """Revoke a key (running servers refuse it within CONSERVE_AUTH_CACHE_TTL_S, 5 s by default)."""
        from energy.api_keys import KeyStore

        with KeyStore.open(_db_url(db, fleet)) as store:
            rec = store.revoke(key_id)
        assert rec.revoked_at is not None
        if as_json:
            print_json({"key_id": rec.key_id, "tenant": rec.tenant, "revoked_at": rec.revoked_at.isoformat()})
            return
        console.print(
            f"revoked key {rec.key_id} of tenant {rec.tenant!r} at {rec.revoked_at:%Y-%m-%d %H:%M:%S} UTC"
        )

    app.add_typer(keys_app, name="keys")
