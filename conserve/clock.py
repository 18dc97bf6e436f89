"""One clock interface for every layer: monotonic seconds for durations, wall-clock UTC timestamps for
records, and an async sleep.

- ``now_s()``: monotonic seconds (never goes back; only differences mean anything). TTFT, token gaps, idle
  times and deadlines are differences of it.
- ``wall(at_s)``: the UTC timestamp of an instant ``at_s`` of ``now_s()`` (records: arrival, first and last
  token, pins). ``at_s(when)`` is its inverse (a timestamp read back from the ledger, as ``now_s`` seconds).
- ``sleep(seconds)``: wait that long on this clock.

:class:`SystemClock` is the real one: ``time.monotonic`` for ``now_s``, anchored to ``time.time`` once at
construction for ``wall`` (so a wall-clock step - NTP, a manual change - moves no duration, and the records of
one process stay consistent with each other). ``speedup`` shortens sleeps (simulated engines run faster than
modelled). :class:`VirtualClock` is virtual time that only moves when its driver advances it (the
discrete-event simulator), with ``wall`` anchored to a fixed epoch.

Below every layer (no imports from the project): tiers, placement, energy, the orchestrator and the API may
all import it.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Protocol

__all__ = ["Clock", "SystemClock", "VirtualClock", "LoopClock", "SYSTEM_CLOCK"]


class Clock(Protocol):
    def now_s(self) -> float: ...

    def wall(self, at_s: float | None = None) -> datetime: ...

    def at_s(self, when: datetime) -> float: ...

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    """Monotonic time, wall-clock timestamps anchored once; sleeps last ``seconds / speedup``."""

    __slots__ = ("speedup", "_mono0", "_wall0")

    def __init__(self, speedup: float = 1.0) -> None:
        if not speedup > 0:
            raise ValueError(f"clock speedup must be > 0, got {speedup}")
        self.speedup = speedup
        self._mono0 = time.monotonic()
        self._wall0 = time.time()

    def now_s(self) -> float:
        return time.monotonic()

    def wall(self, at_s: float | None = None) -> datetime:
        at = time.monotonic() if at_s is None else at_s
        return datetime.fromtimestamp(self._wall0 + (at - self._mono0), UTC)

    def at_s(self, when: datetime) -> float:
        return self._mono0 + (when.timestamp() - self._wall0)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds / self.speedup))


SYSTEM_CLOCK = SystemClock()


class VirtualClock:
    """Virtual seconds, advanced only by its driver. ``advance_to`` refuses to go backwards (an
    event-ordering bug). ``sleep`` advances the clock by the amount at once and yields to the event loop:
    right for one sleeper at a time (a scripted test), not a scheduler for concurrent sleepers."""

    __slots__ = ("_t", "_epoch")

    def __init__(self, start_s: float = 0.0, epoch: datetime | None = None) -> None:
        self._t = start_s
        self._epoch = (epoch or datetime(2026, 1, 1, tzinfo=UTC)).timestamp()

    def now_s(self) -> float:
        return self._t

    def advance_to(self, t_s: float) -> None:
        if t_s < self._t - 1e-9:
            raise RuntimeError(f"virtual clock moved backwards: {t_s} < {self._t}")
        if t_s > self._t:
            self._t = t_s

    def wall(self, at_s: float | None = None) -> datetime:
        return datetime.fromtimestamp(self._epoch + (self._t if at_s is None else at_s), UTC)

    def at_s(self, when: datetime) -> float:
        return when.timestamp() - self._epoch

    async def sleep(self, seconds: float) -> None:
        self.advance_to(self._t + max(0.0, seconds))
        await asyncio.sleep(0)


class LoopClock:
    """The running asyncio loop's time as the clock: on a virtual-time event loop (one whose ``time()``
    jumps to the next timer when every task waits) the router and simulated engines run unchanged on
    virtual time; on a normal loop it is monotonic time. Wall timestamps: ``epoch`` + loop seconds."""

    __slots__ = ("_epoch",)

    def __init__(self, epoch: datetime | None = None) -> None:
        self._epoch = (epoch or datetime(2026, 1, 1, tzinfo=UTC)).timestamp()

    def now_s(self) -> float:
        return asyncio.get_running_loop().time()

    def wall(self, at_s: float | None = None) -> datetime:
        return datetime.fromtimestamp(self._epoch + (self.now_s() if at_s is None else at_s), UTC)

    def at_s(self, when: datetime) -> float:
        return when.timestamp() - self._epoch

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))
