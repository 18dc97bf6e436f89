"""Parking the prefill pool in a trough: turn-1 prompts are prefilled on the decoders meanwhile (issue 14).

A dedicated prefiller idles at the loaded idle draw (77 W on the A40) between turn-1 prompts. When load is
low, the decoders can prefill those prompts themselves (the conserve policy already does when no prefiller
takes work: "no healthy prefiller: local prefill"), at the price of a stall of their decode steps, which the
tier model prices. The rule (``ParkingConfig.prefill``), from observations only:

    rate_now, rate_proj   new conversations per second over the last window_s, and the trend carried over
                          a cold start (as the decoders' rule, orchestrator/core/power.py)
    prefill_s             a turn-1 prefill on an active decoder at its cap now (its tier model, the mean
                          turn-1 prompt the prefill pool has prefilled so far)
    stall(rate)           rate x prefill_s / active decoders: the share of each decoder's time it would spend
                          prefilling turn-1 prompts
    p                     the decode pool's pressure (TBT vs its budget, orchestrator/core/power.py)

    active   -> draining  p / (1 - stall(rate_proj)) <= park_pressure for hold_s in a row: with the stall
                          added the decoders would still be in the cap controller's slack band
                          (park_pressure = ControllerConfig.lower)
    draining -> parked    no prefill queued or running on the pool (new turn-1 prompts go local meanwhile)
    parked   -> waking    p x (1 - stall(rate_now)) / (1 - stall(rate_proj)) >= wake_pressure (the observed
                          pressure already carries today's local prefills; the trend scales it), or the stall
                          share reaches 1: a cold start of wake_s
    draining -> active    the same condition
    waking   -> active    after wake_s

Until a turn-1 prefill has been observed nothing parks. The pool's instances move together. Pure: no clock,
no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from orchestrator.core.power import ACTIVE, DRAINING, PARKED, WAKING, ParkChange, ParkingConfig


class PrefillParker:
    """The prefill pool's parking rule (module docstring); keeps its own observations."""

    def __init__(self, cfg: ParkingConfig, instance_ids: Sequence[str]) -> None:
        self.cfg = cfg
        self.ids = list(instance_ids)
        self.pool_state = ACTIVE
        self.since = 0.0
        self.prev: frozenset[object] = frozenset()
        self.arrivals: list[float] = []
        self.under_since: float | None = None
        self.changes: list[ParkChange] = []

    def accepting(self, instance_id: str) -> bool:
        return self.pool_state == ACTIVE

    @property
    def state(self) -> dict[str, str]:
        return {i: self.pool_state for i in self.ids}

    def _to(self, t: float, to: str, why: str) -> list[ParkChange]:
        out = [ParkChange(t, i, self.pool_state, to, why) for i in self.ids]
        self.pool_state, self.since = to, t
        self.changes += out
        return out

    def rates(self, t: float) -> tuple[float, float]:
        w = self.cfg.window_s
        n_now = sum(1 for a in self.arrivals if a > t - w)
        rate_now, rate_prev = n_now / w, (len(self.arrivals) - n_now) / w
        return rate_now, max(rate_now, rate_now + (rate_now - rate_prev) / w * self.cfg.wake_s)

    def step(
        self,
        t: float,
        pinned: Iterable[object],
        prefill_s: float | None,
        decoders_active: int,
        pressure: float,
        idle: bool,
    ) -> list[ParkChange]:
        """One step at ``t``. ``pinned``: conversations pinned to the decoders now; ``prefill_s``: a turn-1
        prefill on an active decoder (None: none observed yet); ``idle``: nothing queued or running on the
        prefill pool."""
        cfg = self.cfg
        now = frozenset(pinned)
        self.arrivals += [t] * len(now - self.prev)
        self.prev = now
        horizon = t - 2 * cfg.window_s
        while self.arrivals and self.arrivals[0] <= horizon:
            self.arrivals.pop(0)
        if self.pool_state == WAKING:
            if t - self.since >= cfg.wake_s - 1e-9:
                return self._to(t, ACTIVE, f"cold start done ({cfg.wake_s:g} s)")
            return []
        if prefill_s is None or decoders_active < 1:
            self.under_since = None
            if self.pool_state in (DRAINING, PARKED) and decoders_active < 1:
                return self._to(t, ACTIVE if self.pool_state == DRAINING else WAKING, "no active decoder")
            return []
        rate_now, rate_proj = self.rates(t)
        s_now = rate_now * prefill_s / decoders_active
        s_proj = rate_proj * prefill_s / decoders_active
        if self.pool_state == ACTIVE:
            predicted = pressure / (1 - s_proj) if s_proj < 1 else float("inf")
            if predicted > cfg.park_pressure:
                self.under_since = None
                return []
            if self.under_since is None:
                self.under_since = t
            if t - self.under_since < cfg.hold_s:
                return []
            self.under_since = None
            return self._to(
                t,
                DRAINING,
                f"decoders would keep slack prefilling locally: {predicted:.2f} <= {cfg.park_pressure}",
            )
        scaled = pressure * (1 - s_now) / (1 - s_proj) if s_proj < 1 else float("inf")
        hot = scaled >= cfg.wake_pressure
        if self.pool_state == DRAINING:
            if hot:
                return self._to(t, ACTIVE, f"decode pressure {scaled:.2f} with local prefill: needed")
            if idle:
                return self._to(t, PARKED, "drained: engine stopped, turn-1 prompts prefill on the decoders")
            return []
        if hot:  # parked
            return self._to(t, WAKING, f"decode pressure {scaled:.2f} with local prefill: cold start")
        return []
