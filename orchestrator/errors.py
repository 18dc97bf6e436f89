"""Errors of the orchestrator package (fleet config, workloads, engines, the simulator)."""

from __future__ import annotations

from conserve.errors import ConServeError


class ConfigError(ConServeError):
    """fleet.yaml (or another config file) is invalid."""


class WorkloadError(ConServeError):
    """A trace or workload description is malformed."""


class SimulationError(ConServeError):
    """The simulator was given an inconsistent scenario."""


class EngineError(ConServeError):
    """An engine failed or answered with something we cannot use."""

    # the engine's HTTP status where it answered with one (4xx: the request was invalid; 5xx: it failed);
    # None: it did not answer (orchestrator.router.failures classifies on it)
    status: int | None = None
