"""Errors of the tiers package (GPU and model catalogs, measured profiles)."""

from __future__ import annotations

from conserve.errors import ConServeError


class CatalogError(ConServeError):
    """Unknown or invalid GPU/model name or spec."""


class ProfileError(ConServeError):
    """A measured profile file is unreadable or inconsistent."""
