"""KV held across tool gaps, measured on a simulated run (issue 12 item 3): the share of KV-seconds idle
conversations hold, and what the keep/offload/drop rule (placement/kv_gaps.py) would release.

From a :class:`orchestrator.sim.SimResult`'s turn records, per conversation:
- active KV-seconds: each turn's prompt + output tokens from its arrival to its last token (an upper bound on
  the turn's footprint: its KV grows from the prompt to prompt + output while it decodes);
- idle KV-seconds: its context after turn k (prompt + output) from turn k's last token to turn k+1's arrival,
  on turn k's decoder (pinned, or in that decoder's prefix cache: the driver's pin accounting counts it, as
  DESIGN.md section 7 says; the simulator does not record prefix-cache evictions).
The idle share is idle / (idle + active).

The rule's replay is **open loop**: it applies ``gap_action`` at every idle interval of the recorded
(keep-all) timeline, with pressure read as the decoder's held KV (active + idle, as above) at or above its
capacity, and reports what it would release (KV-seconds moved to host memory or freed), how often it offloads
or drops, the modelled energy of the copies and re-prefills, and the restore seconds the next turns would pay.
Releases do not feed back into the timeline (the pressure it reads is that of keeping everything), so it is an
upper bound on releases; the closed-loop version belongs in the simulator (docs/paper-reproduction.md).
Must not import fastapi, sqlalchemy or httpx.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass

from orchestrator.sim.result import SimResult, TurnRecord
from placement.kv_gaps import GapAction, HostMemory, gap_action, gap_costs
from tiers.perf import TierModel


@dataclass(frozen=True, slots=True)
class KvGapReport:
    policy: str
    active_kv_token_s: float
    idle_kv_token_s: float
    gaps: int  # idle intervals (a conversation between two of its turns)
    kept: int
    offloaded: int
    dropped: int
    released_kv_token_s: float  # idle KV-seconds moved off the decoder by the rule (open-loop replay)
    offload_energy_j: float  # modelled
    drop_energy_j: float  # modelled re-prefills
    restore_s: float  # summed over the next turns that would pay a restore

    @property
    def idle_share(self) -> float:
        total = self.active_kv_token_s + self.idle_kv_token_s
        return self.idle_kv_token_s / total if total > 0 else 0.0

    @property
    def idle_share_with_rule(self) -> float:
        total = self.active_kv_token_s + self.idle_kv_token_s - self.released_kv_token_s
        return (self.idle_kv_token_s - self.released_kv_token_s) / total if total > 0 else 0.0


class _Occupancy:
    """A decoder's held KV tokens over time (a step function), from (start, end, tokens) intervals."""

    def __init__(self, intervals: list[tuple[float, float, int]]) -> None:
        deltas: dict[float, int] = defaultdict(int)
        for a, b, tok in intervals:
            if b > a:
                deltas[a] += tok
                deltas[b] -= tok
        self.times = sorted(deltas)
        self.levels: list[int] = []
        level = 0
        for t in self.times:
            level += deltas[t]
            self.levels.append(level)

    def first_at_or_above(self, cap: int, start: float, end: float) -> float | None:
        """The first time in [start, end) at which the held KV is >= cap, or None."""
        k = bisect.bisect_right(self.times, start) - 1
        if k >= 0 and self.levels[k] >= cap:
            return start
        for j in range(k + 1, len(self.times)):
            if self.times[j] >= end:
                return None
            if self.levels[j] >= cap:
                return self.times[j]
        return None


def kv_gap_report(
    result: SimResult, decoders: Mapping[str, TierModel], host: HostMemory | None = None
) -> KvGapReport:
    """The idle share of `result` and the open-loop replay of the gap rule (module docstring). `decoders` maps
    each instance id to its tier model (capacity, prefill cost); `host`: each decoder's host-memory tier."""
    by_conv: dict[str, list[TurnRecord]] = defaultdict(list)
    for t in result.turns:
        by_conv[t.conversation_id].append(t)
    active = idle = 0.0
    held: dict[str, list[tuple[float, float, int]]] = defaultdict(list)
    gaps: list[tuple[str, float, float, int]] = []  # decoder, start, end, tokens
    for turns in by_conv.values():
        turns.sort(key=lambda t: t.turn)
        for k, t in enumerate(turns):
            tok = t.input_tokens + t.output_tokens
            active += tok * max(0.0, t.last_token_s - t.arrival_s)
            held[t.decode_instance].append((t.arrival_s, t.last_token_s, tok))
            if k + 1 < len(turns):
                nxt = turns[k + 1]
                if nxt.arrival_s > t.last_token_s:
                    idle += tok * (nxt.arrival_s - t.last_token_s)
                    held[t.decode_instance].append((t.last_token_s, nxt.arrival_s, tok))
                    gaps.append((t.decode_instance, t.last_token_s, nxt.arrival_s, tok))
    occ = {d: _Occupancy(iv) for d, iv in held.items()}
    kept = offloaded = dropped = 0
    released = off_j = drop_j = restore = 0.0
    for dec, start, end, tok in gaps:
        tm = decoders[dec]
        costs = gap_costs(tok, tm, host)
        host_free = host.capacity_bytes if host is not None else 0.0  # open loop: not shared among gaps
        # the release mechanism and its hold time, as gap_action decides under pressure
        action = gap_action(float("inf"), True, costs, host_free)
        hold_s = costs.offload_restore_s if action is GapAction.OFFLOAD else costs.drop_restore_s
        assert hold_s is not None
        t_rel = occ[dec].first_at_or_above(tm.kv_capacity_tokens, start + hold_s, end)
        if t_rel is None:
            kept += 1
            continue
        released += tok * (end - t_rel)
        if action is GapAction.OFFLOAD:
            offloaded += 1
            off_j += costs.offload_energy_j or 0.0
            restore += costs.offload_restore_s or 0.0
        else:
            dropped += 1
            drop_j += costs.drop_energy_j
            restore += costs.drop_restore_s
    return KvGapReport(
        result.policy, active, idle, len(gaps), kept, offloaded, dropped, released, off_j, drop_j, restore
    )
