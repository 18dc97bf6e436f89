"""Alembic revisions of the ConServe ledger."""
