"""Alembic environment for the ConServe ledger.

Used programmatically by energy.db.upgrade(), which passes an open connection in
``config.attributes["connection"]``; falls back to ``sqlalchemy.url`` for the alembic CLI.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from energy.db import Base

config = context.config
target_metadata = Base.metadata


def run_migrations_offline() -> None:
    context.configure(
        url=config.get_main_option("sqlalchemy.url"),
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
        return
    url = config.get_main_option("sqlalchemy.url")
    if url is None:
        raise RuntimeError(
            "alembic: no database URL. To fix: set sqlalchemy.url in the alembic config "
            "(energy.db.upgrade passes an open connection instead)"
        )
    engine = create_engine(url)
    with engine.begin() as conn:
        context.configure(connection=conn, target_metadata=target_metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
