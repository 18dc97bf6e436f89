"""The modelled energy of a simulated engine's steps (orchestrator/engines/sim.py), as counters like a GPU's
energy counter: joules the steps drew (each step at its tiers.steps power for its modelled duration) and the
clock seconds a step was running; the step in progress counts pro rata, so the model meter (energy/meters.py
``STEP_ENERGY_J_TOTAL``, ``BUSY_S_TOTAL``) splits a long step over the intervals it spans, as the
simulator's energy windows do.

Must not import fastapi, sqlalchemy or httpx.
"""

from __future__ import annotations

from conserve.clock import Clock
from energy.meters import BUSY_S_TOTAL, STEP_ENERGY_J_TOTAL

__all__ = ["StepMeter"]


class StepMeter:
    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.speedup = float(getattr(clock, "speedup", 1.0))  # a SystemClock's sleeps are shortened
        self.energy_j = 0.0
        self.busy_s = 0.0
        self._step: tuple[float, float, float] | None = None  # (clock start, modelled s, W)
        # parked (engine stopped, sim.py park): (clock start, W); billed like a step at that draw, so the
        # model meter adds no idle for it
        self._parked: tuple[float, float] | None = None

    def start(self, step_s: float, power_w: float) -> None:
        self._step = (self.clock.now_s(), step_s, power_w)

    def end(self, done: bool) -> None:
        """The step ended: all of it (``done``), or up to now (the engine was killed during it)."""
        if self._step is None:
            return
        t0, step_s, power_w = self._step
        self._step = None
        elapsed = max(self.clock.now_s() - t0, 0.0)
        self.busy_s += elapsed
        self.energy_j += power_w * step_s * (1.0 if done else self._done(elapsed, step_s))

    def park(self, power_w: float) -> None:
        if self._parked is None:
            self._parked = (self.clock.now_s(), power_w)

    def unpark(self) -> None:
        if self._parked is not None:
            t0, power_w = self._parked
            self._parked = None
            elapsed = max(self.clock.now_s() - t0, 0.0)
            self.busy_s += elapsed
            self.energy_j += power_w * elapsed  # clock seconds, as the idle draw it replaces

    def counters(self) -> dict[str, float]:
        """STEP_ENERGY_J_TOTAL and BUSY_S_TOTAL now."""
        energy, busy = self.energy_j, self.busy_s
        if self._parked is not None:
            elapsed = max(self.clock.now_s() - self._parked[0], 0.0)
            energy += self._parked[1] * elapsed
            busy += elapsed
        if self._step is not None:
            t0, step_s, power_w = self._step
            elapsed = max(self.clock.now_s() - t0, 0.0)
            energy += power_w * step_s * self._done(elapsed, step_s)
            busy += elapsed
        return {STEP_ENERGY_J_TOTAL: energy, BUSY_S_TOTAL: busy}

    def _done(self, elapsed_s: float, step_s: float) -> float:
        """Fraction of a step of ``step_s`` modelled seconds done after ``elapsed_s`` clock seconds."""
        return min(elapsed_s * self.speedup / step_s, 1.0) if step_s > 0 else 1.0
