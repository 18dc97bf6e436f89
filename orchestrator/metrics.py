"""Latency, SLO and energy metrics of a simulated run, exactly as DESIGN.md section 2 defines them.

Per conversation: TTFET (arrival of turn 1 -> first token of the final turn), TTFT of every turn, last-turn
TBT (mean and p95), E2E; each latency also as a *slowdown* against the standalone latency of the same
conversation (served alone on an idle colocated instance of the reference tier at batch 1 -- computed by
running the simulator on that conversation, orchestrator.sim.standalone, cached per shape). SLO
violations: slowdown above a bound (default 5 for TTFET, mean last-turn TBT and E2E) or above an absolute
bound.

Energy: tokens per joule with *every* GPU of the deployment billed, idle ones included (instances idle
between steps, and unallocated GPUs when the fleet bills them). Tokens counted: prompt + output tokens of
every turn (the paper's count). All energy here is modelled by the tier power model, not measured.

Two measurement conventions for TTFET/E2E: ``honest`` (t0 = arrival of turn 1; every queue included, the
router-side admission wait too when the run models it) and ``artifact`` (t0 = the conversation's router-side
KV admission -- arrival when the run has no admission, ``SimOptions.router_admission`` -- and, for conserve
and per-turn, past turn 1's prefiller queue, as the artifact's correction did; orchestrator.sim.admission).
The admission wait is reported separately (``Summary.admission_wait_s``) so it is never mistaken for free.

Must not import fastapi, sqlalchemy or httpx.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from orchestrator.artifact import pooled_token_slowdowns, split_window_energy_j
from orchestrator.core import slowdowns
from orchestrator.errors import SimulationError
from orchestrator.workload import ConversationSpec
from placement.base import Role

if TYPE_CHECKING:  # annotations only: a simulation's result is this module's input
    from orchestrator.sim.result import SimResult

TOKENS_COUNTED = "prompt + output tokens of every turn"


class Convention(StrEnum):
    HONEST = "honest"
    ARTIFACT = "artifact"


@dataclass(frozen=True, slots=True)
class SloSpec:
    """Slowdown bounds (None: not checked) and optional absolute bounds."""

    ttfet_slowdown: float | None = 5.0
    tbt_slowdown: float | None = 5.0
    e2e_slowdown: float | None = 5.0
    ttfet_s: float | None = None
    tbt_ms: float | None = None
    e2e_s: float | None = None

    @classmethod
    def from_config(cls, slo: Any) -> SloSpec:
        return cls(
            ttfet_slowdown=slo.ttfet_slowdown,
            tbt_slowdown=slo.tbt_slowdown,
            e2e_slowdown=slo.e2e_slowdown,
            ttfet_s=slo.ttfet_s,
            tbt_ms=slo.tbt_ms,
        )


@dataclass(frozen=True, slots=True)
class Standalone:
    ttfet_s: float
    e2e_s: float
    tbt_mean_s: float
    tbt_p95_s: float
    ttft_s: tuple[float, ...]


class StandaloneSource(Protocol):
    """Where the standalone latencies of a conversation come from (orchestrator.sim.standalone runs the
    simulator for them; metrics never runs a simulation itself: the layering contract in pyproject.toml)."""

    def get(self, conv: ConversationSpec) -> Standalone: ...


@dataclass(frozen=True, slots=True)
class ConversationMetrics:
    conversation_id: str
    arrival_s: float
    turns: int
    tokens: int
    ttfet_s: float
    e2e_s: float
    tbt_mean_ms: float
    tbt_p95_ms: float
    ttft_s: tuple[float, ...]
    energy_j: float  # modelled busy energy attributed by work share (idle energy is reported per tier)
    standalone_ttfet_s: float | None
    standalone_e2e_s: float | None
    standalone_tbt_mean_ms: float | None
    ttfet_slowdown: float | None
    e2e_slowdown: float | None
    tbt_slowdown: float | None
    violated: tuple[str, ...]
    decoders: tuple[str, ...]
    # every final-turn inter-token gap / the standalone mean last-turn TBT (the paper's per-token statistic,
    # orchestrator.artifact.pooled_token_slowdowns); None unless the run recorded its gaps
    # (SimOptions.record_tbt_gaps)
    tbt_token_slowdowns: np.ndarray | None = field(default=None, compare=False, repr=False)

    @property
    def violates(self) -> bool:
        return bool(self.violated)


def _q(vals: Sequence[float], p: float) -> float:
    return float(np.percentile(np.asarray(vals, dtype=float), p)) if len(vals) else math.nan


def geomean(vals: Iterable[float]) -> float:
    arr = np.asarray([v for v in vals if v is not None and v > 0], dtype=float)
    return float(np.exp(np.log(arr).mean())) if len(arr) else math.nan


def conversation_energy_j(result: SimResult) -> dict[str, float]:
    """Busy energy of each window split among its turns by work share; the parts sum to the busy energy.

    A prefill token weighs as much as a decode token here (the energy ledger does the tier-model-weighted
    attribution). Busy energy of a window in which no step ended (a long step spanning it) is carried to the
    instance's next window with work (or back to its last one). Idle energy is excluded.
    """
    out: dict[str, float] = {}
    per_inst: dict[str, list] = {}
    for w in result.energy_windows:
        per_inst.setdefault(w.instance_id, []).append(w)
    for wins in per_inst.values():
        wins.sort(key=lambda w: w.start_s)
        carry = 0.0
        last_work = None
        for w in wins:
            busy = w.energy_j - w.idle_energy_j + carry
            total = sum(x.prefill_tokens + x.decode_tokens for x in w.work)
            if total <= 0:
                carry = busy
                continue
            carry = 0.0
            last_work = (w, total)
            for x in w.work:
                share = busy * (x.prefill_tokens + x.decode_tokens) / total
                out[x.conversation_id] = out.get(x.conversation_id, 0.0) + share
        if carry and last_work is not None:
            w, total = last_work
            for x in w.work:
                share = carry * (x.prefill_tokens + x.decode_tokens) / total
                out[x.conversation_id] = out.get(x.conversation_id, 0.0) + share
    return out


def conversation_metrics(
    result: SimResult,
    conversations: Sequence[ConversationSpec],
    standalone: StandaloneSource | None,
    slo: SloSpec = SloSpec(),
    convention: Convention | str = Convention.HONEST,
) -> list[ConversationMetrics]:
    conv_by_id = {c.conversation_id: c for c in conversations}
    ttft: dict[str, list[float]] = {}
    for t in result.turns:
        ttft.setdefault(t.conversation_id, []).append(t.ttft_s)
    energy = conversation_energy_j(result)
    conv = Convention(convention)
    out: list[ConversationMetrics] = []
    for c in result.conversations:
        spec = conv_by_id.get(c.conversation_id)
        if spec is None:
            raise SimulationError(
                f"conversation {c.conversation_id!r} is in the result but not in the workload"
            )
        ttfet = c.ttfet_s if conv is Convention.HONEST else c.ttfet_admission_s
        e2e = c.e2e_s if conv is Convention.HONEST else c.e2e_admission_s
        sa = standalone.get(spec) if standalone is not None else None
        s_ttfet, s_e2e, s_tbt = slowdowns(
            ttfet,
            e2e,
            c.last_turn_tbt_mean_s,
            sa.ttfet_s if sa else None,
            sa.e2e_s if sa else None,
            sa.tbt_mean_s if sa else None,
        )
        tok = None
        if c.last_turn_gaps_s is not None and sa and sa.tbt_mean_s > 0:
            tok = pooled_token_slowdowns(
                {c.conversation_id: c.last_turn_gaps_s}, {c.conversation_id: sa.tbt_mean_s}
            )
        v: list[str] = []
        if slo.ttfet_slowdown is not None and s_ttfet is not None and s_ttfet > slo.ttfet_slowdown:
            v.append("ttfet_slowdown")
        if slo.tbt_slowdown is not None and s_tbt is not None and s_tbt > slo.tbt_slowdown:
            v.append("tbt_slowdown")
        if slo.e2e_slowdown is not None and s_e2e is not None and s_e2e > slo.e2e_slowdown:
            v.append("e2e_slowdown")
        if slo.ttfet_s is not None and ttfet > slo.ttfet_s:
            v.append("ttfet_s")
        if slo.tbt_ms is not None and c.last_turn_tbt_mean_s * 1e3 > slo.tbt_ms:
            v.append("tbt_ms")
        if slo.e2e_s is not None and e2e > slo.e2e_s:
            v.append("e2e_s")
        out.append(
            ConversationMetrics(
                conversation_id=c.conversation_id,
                arrival_s=c.arrival_s,
                turns=c.turns,
                tokens=c.tokens,
                ttfet_s=ttfet,
                e2e_s=e2e,
                tbt_mean_ms=c.last_turn_tbt_mean_s * 1e3,
                tbt_p95_ms=c.last_turn_tbt_p95_s * 1e3,
                ttft_s=tuple(ttft.get(c.conversation_id, [])),
                energy_j=energy.get(c.conversation_id, 0.0),
                standalone_ttfet_s=sa.ttfet_s if sa else None,
                standalone_e2e_s=sa.e2e_s if sa else None,
                standalone_tbt_mean_ms=sa.tbt_mean_s * 1e3 if sa else None,
                ttfet_slowdown=s_ttfet,
                e2e_slowdown=s_e2e,
                tbt_slowdown=s_tbt,
                violated=tuple(v),
                decoders=c.decoders,
                tbt_token_slowdowns=tok,
            )
        )
    return out


@dataclass(frozen=True, slots=True)
class SplitEnergyWindow:
    """The ConServe artifact's energy window for ConServe and the per-turn baseline (an option of the artifact
    convention, for the like-for-like side by side): their decoders over their own run, the prefiller GPU
    over the *recorded prefiller-only run's* window, idle only inside it (s5_metrics.py ``workload_energy``,
    lines 376-404; orchestrator.artifact.split_window_energy_j). Build it from that run's prefiller."""

    prefiller_busy_energy_j: float
    prefiller_busy_s: float
    prefiller_window_s: float
    prefiller_idle_w: float


@dataclass(frozen=True, slots=True)
class Summary:
    policy: str
    convention: str
    conversations: int
    turns: int
    makespan_s: float
    ttfet_s: dict[str, float]  # p50/p95/p99/mean/geomean
    e2e_s: dict[str, float]
    tbt_mean_ms: dict[str, float]
    ttft_s: dict[str, float]  # over every turn
    ttfet_slowdown: dict[str, float]
    e2e_slowdown: dict[str, float]
    tbt_slowdown: dict[str, float]
    slo_violation_pct: float
    slo_violation_pct_by: dict[str, float]
    tokens: int
    tokens_counted: str
    energy_j: float  # instances + unallocated GPUs idle
    unallocated_idle_j: float
    tokens_per_j: float
    energy_by_tier_j: dict[str, float]
    energy_by_role_j: dict[str, float]
    idle_energy_j: float
    kv_transfers: int
    kv_transfer_bytes: int
    utilisation_by_role: dict[str, float]
    policy_stats: dict[str, Any] = field(default_factory=dict)
    # arrival of turn 1 -> router-side KV admission, per conversation (all 0 when the run has no admission);
    # outside the artifact convention's clock, inside the honest one's
    admission_wait_s: dict[str, float] = field(default_factory=dict)
    energy_note: str = "modelled by the tier power model, not measured"
    # the paper's "p95 last-turn TBT": every final-turn gap / its conversation's standalone mean TBT, pooled
    # over conversations (a per-token distribution); empty unless the run recorded its gaps
    # (SimOptions.record_tbt_gaps). tbt_slowdown above is per conversation (mean gap / standalone mean).
    tbt_token_slowdown: dict[str, float] = field(default_factory=dict)
    # conversations refused at router-side admission after SimOptions.admission_wait_s (live: 503); not in
    # `conversations`, counted in slo_violation_pct as violations
    refused_conversations: int = 0

    def to_dict(self) -> dict[str, Any]:
        # fields that are empty unless an option asked for them are left out (outputs stay as they were)
        return {k: getattr(self, k) for k in self.__slots__ if k not in _OPTIONAL or getattr(self, k)}


_OPTIONAL = frozenset({"tbt_token_slowdown", "refused_conversations"})


def _dist(vals: Sequence[float | None]) -> dict[str, float]:
    xs = [float(v) for v in vals if v is not None and math.isfinite(v)]
    if not xs:
        return {"p50": math.nan, "p95": math.nan, "p99": math.nan, "mean": math.nan, "geomean": math.nan}
    return {
        "p50": _q(xs, 50),
        "p95": _q(xs, 95),
        "p99": _q(xs, 99),
        "mean": float(np.mean(xs)),
        "geomean": geomean(xs),
    }


def summarize(
    result: SimResult,
    metrics: Sequence[ConversationMetrics],
    convention: Convention | str = Convention.HONEST,
    unallocated_idle_w: float = 0.0,
    split_window: SplitEnergyWindow | None = None,
) -> Summary:
    """Aggregate per-conversation metrics. With `split_window` (artifact convention only; an error with the
    honest one) the prefill instances' energy is replaced by the recorded prefiller run's, as the artifact
    measured ConServe and the per-turn baseline."""
    n = len(metrics)
    conv = Convention(convention)
    if split_window is not None and conv is not Convention.ARTIFACT:
        raise SimulationError(
            "the artifact's split energy window applies to the artifact convention only. To fix: summarize "
            "with convention='artifact' or drop split_window."
        )
    tok = [m.tbt_token_slowdowns for m in metrics if m.tbt_token_slowdowns is not None]
    unalloc_j = unallocated_idle_w * result.makespan_s
    energy = result.energy_j + unalloc_j
    by_role: dict[str, float] = {}
    for i in result.instances:
        by_role[i.role] = by_role.get(i.role, 0.0) + i.energy_j
    by_tier = result.energy_by_tier_j()
    if split_window is not None:
        prefill = str(Role.PREFILL)
        dec_j = sum(i.energy_j for i in result.instances if i.role != prefill)
        w = split_window
        with_pre = split_window_energy_j(
            dec_j, w.prefiller_busy_energy_j, w.prefiller_busy_s, w.prefiller_window_s, w.prefiller_idle_w
        )
        energy = with_pre + unalloc_j
        by_role[prefill] = with_pre - dec_j
    if unalloc_j:
        by_tier["unallocated (idle)"] = unalloc_j
    refused = len(result.refused_conversations)
    viol_by: dict[str, float] = {}
    for m in metrics:
        for name in m.violated:
            viol_by[name] = viol_by.get(name, 0.0) + 1
    return Summary(
        policy=result.policy,
        convention=str(conv),
        conversations=n,
        turns=len(result.turns),
        makespan_s=result.makespan_s,
        ttfet_s=_dist([m.ttfet_s for m in metrics]),
        e2e_s=_dist([m.e2e_s for m in metrics]),
        tbt_mean_ms=_dist([m.tbt_mean_ms for m in metrics]),
        ttft_s=_dist([t for m in metrics for t in m.ttft_s]),
        ttfet_slowdown=_dist([m.ttfet_slowdown for m in metrics]),
        e2e_slowdown=_dist([m.e2e_slowdown for m in metrics]),
        tbt_slowdown=_dist([m.tbt_slowdown for m in metrics]),
        # a refused conversation (503 after the admission wait) missed its SLO
        slo_violation_pct=100.0 * (sum(1 for m in metrics if m.violates) + refused) / (n + refused)
        if n + refused
        else 0.0,
        slo_violation_pct_by={k: 100.0 * v / n for k, v in sorted(viol_by.items())},
        tokens=result.tokens,
        tokens_counted=TOKENS_COUNTED,
        energy_j=energy,
        unallocated_idle_j=unalloc_j,
        tokens_per_j=result.tokens / energy if energy > 0 else 0.0,
        energy_by_tier_j=by_tier,
        energy_by_role_j=by_role,
        idle_energy_j=sum(i.idle_energy_j for i in result.instances) + unalloc_j,
        kv_transfers=result.kv_transfers,
        kv_transfer_bytes=result.kv_transfer_bytes,
        utilisation_by_role=result.utilisation_by_role(),
        policy_stats=dict(result.policy_stats),
        admission_wait_s=_dist([c.admission_wait_s for c in result.conversations]),
        tbt_token_slowdown=_dist(np.concatenate(tok).tolist()) if tok else {},
        refused_conversations=refused,
    )


def conversation_row(m: ConversationMetrics) -> dict[str, Any]:
    """A flat row for CSV/JSON output."""
    return {
        "conversation_id": m.conversation_id,
        "arrival_s": round(m.arrival_s, 6),
        "turns": m.turns,
        "tokens": m.tokens,
        "ttfet_s": m.ttfet_s,
        "e2e_s": m.e2e_s,
        "last_turn_tbt_mean_ms": m.tbt_mean_ms,
        "last_turn_tbt_p95_ms": m.tbt_p95_ms,
        "ttft_s": ";".join(f"{t:.6f}" for t in m.ttft_s),
        "energy_j": m.energy_j,
        "standalone_ttfet_s": m.standalone_ttfet_s,
        "standalone_e2e_s": m.standalone_e2e_s,
        "standalone_tbt_mean_ms": m.standalone_tbt_mean_ms,
        "ttfet_slowdown": m.ttfet_slowdown,
        "e2e_slowdown": m.e2e_slowdown,
        "tbt_slowdown": m.tbt_slowdown,
        "slo_violated": ";".join(m.violated),
        "decoders": ";".join(m.decoders),
    }
