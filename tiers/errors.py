"""The project's error hierarchy.

Every error a user can cause derives from :class:`ConServeError`; each capability has its own subclass.
Messages say what was wrong and how to fix it ("To fix: ..."). The CLI prints ``str(err)`` on one line and
exits 1; the API maps these to 4xx JSON bodies. The base lives here, in the lowest layer, so every package
can raise it without import cycles.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class ConServeError(Exception):
    """Base of every error a user can cause or fix."""


class CatalogError(ConServeError):
    """Unknown or invalid GPU/model name or spec."""


class ProfileError(ConServeError):
    """A measured profile file is unreadable or inconsistent."""


class WorkloadError(ConServeError):
    """A trace or workload description is malformed."""


class ConfigError(ConServeError):
    """fleet.yaml (or another config file) is invalid."""


class PlanningError(ConServeError):
    """The planner could not produce a plan (infeasible, solver failure)."""


class PlacementError(ConServeError):
    """A policy could not place a turn (no healthy instance of a needed role)."""


class SimulationError(ConServeError):
    """The simulator was given an inconsistent scenario."""


class EngineError(ConServeError):
    """An engine failed or answered with something we cannot use."""


class EnergyError(ConServeError):
    """A meter, the attribution or the ledger failed."""


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """Return ' Did you mean X?' for the closest choice, or '' when nothing is close."""
    match = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    if not match:
        match = [c for c in choices if name.lower() in c.lower() or c.lower() in name.lower()][:1]
    return f" Did you mean {match[0]!r}?" if match else ""
