"""Errors of the placement package (online policies and the capacity planner)."""

from __future__ import annotations

from conserve.errors import ConServeError


class PlanningError(ConServeError):
    """The planner could not produce a plan (infeasible, solver failure)."""


class PlacementError(ConServeError):
    """A policy could not place a turn (no healthy instance of a needed role)."""
