"""Errors of the energy package (meters, attribution, the ledger, reports)."""

from __future__ import annotations

from conserve.errors import ConServeError


class EnergyError(ConServeError):
    """A meter, the attribution or the ledger failed."""
