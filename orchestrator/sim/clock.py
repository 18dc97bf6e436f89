"""The simulator's injected clock: virtual seconds, advanced only by the event loop.

Policies never read a clock; the simulator's event loop owns one VirtualClock per run (no module state), so
two simulations in one process never share time.
"""

from __future__ import annotations

from typing import Protocol


class Clock(Protocol):
    def now_s(self) -> float: ...


class VirtualClock:
    """Monotonic virtual time. ``advance_to`` refuses to go backwards (an event-ordering bug)."""

    __slots__ = ("_t",)

    def __init__(self, start_s: float = 0.0) -> None:
        self._t = start_s

    def now_s(self) -> float:
        return self._t

    def advance_to(self, t_s: float) -> None:
        if t_s < self._t - 1e-9:
            raise RuntimeError(f"virtual clock moved backwards: {t_s} < {self._t}")
        if t_s > self._t:
            self._t = t_s
