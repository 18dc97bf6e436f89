"""Alembic migrations of the ConServe ledger (script_location: energy/migrations)."""
