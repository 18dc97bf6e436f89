"""Collecting a run's result: turn and conversation records (TTFET and E2E from the driver core), inter-token
gaps from the committed step segments, and energy per instance and per window with the work done in it.

Split out of orchestrator/sim/core.py (issue 11 item 6); pure move.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from orchestrator.core import final_turn_times
from orchestrator.errors import SimulationError
from orchestrator.sim.base import SimBase
from orchestrator.sim.instance import _cum, _Instance, _steps_by, _TurnState
from orchestrator.sim.result import (
    ConversationRecord,
    EnergyWindow,
    InstanceEnergy,
    SimResult,
    TurnRecord,
    WindowWork,
)
from orchestrator.workload import ConversationSpec


class Collecting(SimBase):
    def result(self, wall_s: float, energy_window_s: float | None) -> SimResult:
        makespan = max((ts.last_token_s for st in self.turn_states for ts in st), default=0.0)
        makespan = max(makespan, max((c.arrival_s for c in self.convs), default=0.0))
        turns: list[TurnRecord] = []
        convs: list[ConversationRecord] = []
        starts = [[seg[6] for seg in inst.segments] for inst in self.insts]
        for states in self.turn_states:  # remote-decoded turns: first token = end of their first step
            for ts in states:
                if math.isnan(ts.first_token_s) and ts.first_step > 0:
                    ts.first_token_s = _step_end_s(self.insts[ts.decode_inst], ts.first_step, starts)
        for ci, c in enumerate(self.convs):
            states = self.turn_states[ci]
            if not states:  # refused at admission (SimOptions.admission_wait_s): no turn ran
                continue
            for ts in states:
                turns.append(self._turn_record(ts))
            first, last = states[0], states[-1]
            dec = self.insts[last.decode_inst]
            tbt_mean, tbt_p95, gaps = _tbt(
                dec, last.first_step, last.last_step, last.first_token_s, last.last_token_s, starts[dec.idx]
            )
            # the artifact's convention: t0 = router-side admission (= arrival without it), and past turn
            # 1's prefiller queue for the policies whose halves the artifact ran separately
            admitted = self.admitted_s[ci] if self.admission else first.arrival_s
            t0_adm = admitted
            if self.rule.exclude_turn1_prefill_queue and first.remote:
                t0_adm = max(admitted, first.prefill_start_s)
            ttfet, e2e = final_turn_times(first.arrival_s, last.first_token_s, last.last_token_s)
            ttfet_adm, e2e_adm = final_turn_times(t0_adm, last.first_token_s, last.last_token_s)
            # an emulated delay the run's clocks must count (TurnDelay.conversation_offset_s)
            off = self.turn_delay.conversation_offset_s(c.conversation_id) if self.turn_delay else 0.0
            convs.append(
                ConversationRecord(
                    conversation_id=c.conversation_id,
                    arrival_s=c.arrival_s,
                    turns=len(states),
                    tokens=c.total_tokens,
                    # the simulator times every token: never None
                    ttfet_s=ttfet + off,  # type: ignore[operator]
                    e2e_s=e2e + off,  # type: ignore[operator]
                    ttfet_admission_s=ttfet_adm + off,  # type: ignore[operator]
                    e2e_admission_s=e2e_adm + off,  # type: ignore[operator]
                    last_turn_tbt_mean_s=tbt_mean,
                    last_turn_tbt_p95_s=tbt_p95,
                    decoders=tuple(self.insts[ts.decode_inst].id for ts in states),
                    admission_wait_s=admitted - c.arrival_s,
                    last_turn_gaps_s=gaps if self.opts.record_tbt_gaps else None,
                )
            )
        decoded: dict[int, list[_TurnState]] = {}
        for states in self.turn_states:
            for ts in states:
                decoded.setdefault(ts.decode_inst, []).append(ts)
        windows, energies = _energy(self.insts, makespan, energy_window_s, self.convs, decoded)
        stats_fn = getattr(self.policy, "prediction_stats", None)
        pstats: dict[str, Any] = {}
        if callable(stats_fn):
            st = stats_fn()
            pstats = {k: getattr(st, k) for k in st.__slots__} if hasattr(st, "__slots__") else dict(st)
        return SimResult(
            policy=self.policy.name,
            seed=self.seed,
            makespan_s=makespan,
            conversations=tuple(convs),
            turns=tuple(turns),
            instances=tuple(energies),
            energy_windows=tuple(windows),
            energy_window_s=energy_window_s,
            kv_transfers=self.kv_transfers,
            kv_transfer_bytes=self.kv_transfer_bytes,
            decisions=tuple(self.decisions),
            feedback=tuple(self.feedback),
            events=self.events,
            wall_s=wall_s,
            max_kv_used_tokens={i.id: i.peak_reserved for i in self.insts},
            policy_stats=pstats,
            router_admission=self.admission,
            admission_parked=self.adm_parked_count,
            refused_conversations=tuple(self.convs[ci].conversation_id for ci in self.refused),
            power_steps=tuple(self.power.steps) if self.power is not None else (),
            kv_gaps=self._gap_stats(),
        )

    def _turn_record(self, ts: _TurnState) -> TurnRecord:
        return TurnRecord(
            conversation_id=self.convs[ts.conv].conversation_id,
            turn=ts.turn,
            arrival_s=ts.arrival_s,
            input_tokens=ts.input_tokens,
            output_tokens=ts.output_tokens,
            decode_instance=self.insts[ts.decode_inst].id,
            prefill_instance=self.insts[ts.prefill_inst].id,
            remote_prefill=ts.remote,
            prefill_start_s=ts.prefill_start_s,
            prefill_end_s=ts.prefill_end_s,
            kv_admit_s=ts.kv_admit_s,
            first_token_s=ts.first_token_s,
            last_token_s=ts.last_token_s,
            cached_tokens=ts.cached_tokens,
            prefilled_tokens=ts.prefilled_tokens,
            transfer_tokens=ts.transfer_tokens,
            transfer_bytes=ts.transfer_bytes,
            restarts=ts.restarts,
            history_transfer_tokens=ts.history_tokens,
        )


def _step_durations(inst: _Instance, lo: int, hi: int, starts: list[int]) -> np.ndarray:
    """Durations of instance steps with 1-based indices lo..hi (inclusive); starts[k] = segment k's step0."""
    if hi < lo:
        return np.empty(0)
    segs = inst.segments

    k = max(0, bisect.bisect_right(starts, lo - 1) - 1)
    parts: list[np.ndarray] = []
    while k < len(segs):
        t0, t1, n, a, d, _, step0 = segs[k]
        if step0 >= hi:
            break
        s_lo = max(lo, step0 + 1)
        s_hi = min(hi, step0 + n)
        if s_hi >= s_lo:
            i = np.arange(s_lo - step0 - 1, s_hi - step0, dtype=np.float64)
            parts.append(a + d * i)
        k += 1
    return np.concatenate(parts) if parts else np.empty(0)


def _step_end_s(inst: _Instance, step: int, starts: list[list[int]]) -> float:
    """Virtual time at which 1-based instance step `step` ended."""
    st = starts[inst.idx]
    k = bisect.bisect_right(st, step - 1) - 1
    t0, _, n, a, d, _, step0 = inst.segments[k]
    return t0 + _cum(step - step0, a, d)


def _tbt(
    inst: _Instance, first_step: int, last_step: int, t_first: float, t_last: float, starts: list[int]
) -> tuple[float, float, np.ndarray]:
    """Mean and p95 inter-token gap of a turn, and the gaps (the durations of its steps 2..n)."""
    n = last_step - first_step
    if n <= 0:
        return 0.0, 0.0, np.empty(0)
    gaps = _step_durations(inst, first_step + 1, last_step, starts)
    mean = (t_last - t_first) / n
    p95 = float(np.percentile(gaps, 95)) if len(gaps) else mean
    return mean, p95, gaps


def _steps_done_at(inst: _Instance, t: float, seg_idx: int) -> tuple[int, int]:
    """Steps completed by time t, scanning segments from seg_idx; returns (steps, new seg_idx)."""
    segs = inst.segments
    k = seg_idx
    while k < len(segs) and segs[k][1] <= t:
        k += 1
    if k < len(segs) and segs[k][0] < t:
        t0, _, n, a, d, _, step0 = segs[k]
        return step0 + _steps_by(t - t0, a, d, n), k
    if k < len(segs):
        return segs[k][6], k
    return inst.steps_done, k


def _parked_saving_j(inst: _Instance, idle_w: float, t0: float, t1: float) -> float:
    """Idle energy not drawn in (t0, t1] while the instance was parked (its draw then: the span's W)."""
    return sum(max(0.0, min(b, t1) - max(a, t0)) * (idle_w - w) for a, b, w in inst.parked)


def _energy(
    insts: Sequence[_Instance],
    makespan: float,
    window_s: float | None,
    convs: Sequence[ConversationSpec],
    decoded: Mapping[int, list[_TurnState]],
) -> tuple[list[EnergyWindow], list[InstanceEnergy]]:
    windows: list[EnergyWindow] = []
    energies: list[InstanceEnergy] = []
    if window_s is not None and window_s <= 0:
        raise SimulationError(f"energy_window_s must be > 0 or None, got {window_s}")
    for inst in insts:
        idle_w = inst.tm.idle_w
        busy_s = sum(s[1] - s[0] for s in inst.segments)
        if window_s is None or makespan <= 0:
            busy_j = sum((s[1] - s[0]) * s[5] for s in inst.segments)
            idle_j = max(0.0, makespan - busy_s) * idle_w - _parked_saving_j(inst, idle_w, 0.0, makespan)
            total = busy_j + idle_j
        else:
            nwin = max(1, math.ceil(makespan / window_s - 1e-12))
            e_busy = np.zeros(nwin)
            t_busy = np.zeros(nwin)
            for t0, t1, _, _, _, pw, _ in inst.segments:
                w = int(t0 // window_s)
                while t0 < t1 and w < nwin:
                    w_end = (w + 1) * window_s if w < nwin - 1 else max(makespan, t1)
                    seg_end = min(t1, w_end)
                    e_busy[w] += (seg_end - t0) * pw
                    t_busy[w] += seg_end - t0
                    t0 = seg_end
                    w += 1
            bounds = [min(makespan, (w + 1) * window_s) if w < nwin - 1 else makespan for w in range(nwin)]
            starts = [w * window_s for w in range(nwin)]
            lengths = np.array([bounds[w] - starts[w] for w in range(nwin)])
            # The documented idle rule (energy/attribution.py, as `serve` applies it): a window's idle row is
            # the idle draw over the whole window, capped at its energy; the rest is the work's.
            # InstanceEnergy.idle_energy_j stays the draw while no step ran (busy energy = energy - that).
            idle_free = np.maximum(0.0, lengths - t_busy) * idle_w
            if inst.parked:  # a parked instance (engine stopped, sim/power.py) draws less than idle
                idle_free -= [_parked_saving_j(inst, idle_w, starts[w], bounds[w]) for w in range(nwin)]
            e_win = e_busy + idle_free
            idle_win = np.minimum(lengths * idle_w, e_win)
            # work per turn per window: decode tokens from the step ranges, prefill tokens from the log
            step_at = np.zeros(nwin + 1, dtype=np.int64)
            k = 0
            for w in range(nwin):
                step_at[w + 1], k = _steps_done_at(inst, bounds[w], k)
            work: list[dict[tuple[int, int], list[int]]] = [{} for _ in range(nwin)]
            for ta, tb, ts, c in inst.prefill_log:
                # a chunk's tokens in the windows its step overlapped, in proportion to time (whole tokens)
                w = min(nwin - 1, int(ta // window_s))
                booked = 0
                while booked < c:
                    w_end = bounds[w] if w < nwin - 1 else math.inf
                    upto = c if tb <= w_end or tb <= ta else round(c * (w_end - ta) / (tb - ta))
                    if upto > booked:
                        cell = work[w].setdefault((ts.conv, ts.turn), [0, 0])
                        cell[0] += upto - booked
                        booked = upto
                    w += 1
            for ts in decoded.get(inst.idx, []):
                lo, hi = ts.first_step, ts.last_step
                w = min(nwin - 1, max(0, int(ts.first_token_s // window_s)))
                while w < nwin:
                    a, b = int(step_at[w]) + 1, int(step_at[w + 1])
                    ov = min(hi, b) - max(lo, a) + 1
                    if ov > 0:
                        cell = work[w].setdefault((ts.conv, ts.turn), [0, 0])
                        cell[1] += ov
                    if b >= hi:
                        break
                    w += 1
            total = 0.0
            idle_j = 0.0
            for w in range(nwin):
                ej = float(e_win[w])
                total += ej
                idle_j += float(idle_free[w])
                windows.append(
                    EnergyWindow(
                        instance_id=inst.id,
                        tier=inst.tm.name,
                        start_s=starts[w],
                        end_s=bounds[w],
                        energy_j=ej,
                        idle_energy_j=float(idle_win[w]),
                        work=tuple(
                            WindowWork(convs[ci].conversation_id, turn, v[0], v[1])
                            for (ci, turn), v in sorted(work[w].items())
                        ),
                    )
                )
        energies.append(
            InstanceEnergy(
                instance_id=inst.id,
                tier=inst.tier,
                tier_model=inst.tm.name,
                role=str(inst.role),
                gpus=inst.tm.gpus,
                energy_j=total,
                idle_energy_j=idle_j,
                busy_s=busy_s,
                utilisation=busy_s / makespan if makespan > 0 else 0.0,
                prefill_tokens=inst.prefill_tokens,
                decode_tokens=inst.decode_tokens,
            )
        )
    return windows, energies
