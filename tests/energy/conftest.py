"""Fixtures for the energy tests: per-test ledger URLs on SQLite and on PostgreSQL.

The throwaway PostgreSQL server (`pg_server`, `pg_url`) and `require_or_skip`/`free_port` are fixtures of
tests/conftest.py (never `import tests`).
"""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'ledger.db'}"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def ledger_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty ledger database URL, on SQLite (file) and on PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ledger.db'}"
    return request.getfixturevalue("pg_url")
