"""Values that cross the ledger's boundary: what callers write and what they read back.

Frozen dataclasses only; no SQLAlchemy here (the ORM models live in energy/db.py and never leave
energy/ledger.py). Every timestamp is a timezone-aware UTC ``datetime``; the ledger rejects naive ones.
Must not import fastapi, sqlalchemy or httpx.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, cast

from energy.errors import EnergyError


class Source(StrEnum):
    """Whether a joule figure was read from a hardware meter or computed from the tier power model."""

    MEASURED = "measured"
    MODELLED = "modelled"


class TurnStatus(StrEnum):
    OK = "ok"  # the turn completed and its tokens were returned
    ERROR = "error"  # the turn failed (engine error, client disconnect)
    REPLACED = "replaced"  # the turn's engine died; it was re-run elsewhere (the retry is a new row)


class RunKind(StrEnum):
    SERVE = "serve"
    SIMULATE = "simulate"


DEFAULT_RUN_ID = "live"


def new_run_id(kind: RunKind = RunKind.SERVE, now: datetime | None = None) -> str:
    """A run id unique per start: ``live-20261207T142501Z-3fa9c2`` (serve) or ``simulate-...``. A server
    restarted on the same ledger starts a new run, so a reused conversation id is a new conversation (it was
    merged with the old one's turns under the fixed id 'live')."""
    import secrets

    at = (now or datetime.now(UTC)).astimezone(UTC)
    prefix = "live" if kind is RunKind.SERVE else str(kind)
    return f"{prefix}-{at:%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


def require_utc(value: datetime, name: str) -> datetime:
    """Return ``value`` in UTC; raise EnergyError naming the field when it is naive."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise EnergyError(
            f"{name} must be a timezone-aware datetime (got naive {value.isoformat()}). "
            "To fix: use datetime.now(UTC) or attach tzinfo=UTC."
        )
    return value.astimezone(UTC)


@dataclass(frozen=True, slots=True)
class RunInfo:
    """One serving session or one simulation: the unit a policy is attached to."""

    run_id: str
    kind: RunKind = RunKind.SERVE
    policy: str | None = None
    started_at: datetime | None = None  # None: now
    label: str | None = None  # free text, e.g. the fleet file


@dataclass(frozen=True, slots=True)
class TurnRecord:
    """One turn as the router (or the simulator) saw it. Written once, when the turn ends or fails."""

    conversation_id: str
    turn: int  # 1-based
    request_id: str  # unique within a run; a retried turn is a new request_id
    instance_id: str  # the instance that decoded the turn
    arrival_at: datetime
    first_token_at: datetime | None = None
    last_token_at: datetime | None = None
    prompt_tokens: int = 0  # whole prompt of the turn (history + appended)
    output_tokens: int = 0
    finish_reason: str | None = None  # "stop", "length", "tool_calls", ...
    is_final: bool = False  # the turn whose first token defines TTFET
    status: TurnStatus = TurnStatus.OK
    prefill_instance_id: str | None = None  # where the prompt was prefilled, if not the decoder
    remote_prefill: bool = False
    tier: str | None = None  # tier label of instance_id
    cached_tokens: int = 0  # prompt tokens the decoder did not compute (prefix-cache hit, KV received)
    policy: str | None = None  # the policy that placed it; defaults to the run's policy
    # prompt tokens the prefilling instance found in its prefix cache (remote prefill only): it computed
    # prompt_tokens - prefill_cached_tokens; the decoder computed prompt_tokens - cached_tokens
    prefill_cached_tokens: int = 0
    tenant: str = "default"  # who the turn is billed to (the API key's tenant once keys land)

    def __post_init__(self) -> None:
        if self.turn < 1:
            raise EnergyError(f"TurnRecord.turn must be >= 1 (1-based), got {self.turn}")
        for name in ("prompt_tokens", "output_tokens", "cached_tokens", "prefill_cached_tokens"):
            if getattr(self, name) < 0:
                raise EnergyError(f"TurnRecord.{name} must be >= 0, got {getattr(self, name)}")
        if not self.conversation_id:
            raise EnergyError("TurnRecord.conversation_id must be a non-empty string")


_turn_fields = operator.attrgetter(*(f.name for f in fields(TurnRecord)))


# ---- the process ledger writer's wire format ---------------------------------------------------------------
# Pickling a list of TurnRecords costs ~1.8 us per record (the __reduce__ call, three datetimes, the enum),
# ~0.24 us as tuples of plain values (375 records: 673 vs 88 us, dev box). The server's shipper thread holds
# the GIL while it pickles, and the event loop waits for it, so records travel as plain tuples.


def _posix(value: datetime | None) -> float | datetime | None:
    # aware -> POSIX seconds; a float holds a 21st-century timestamp to < 0.5 us, so fromtimestamp() gives
    # back the same microsecond (tests/energy/test_records_wire.py). Naive values travel as they are, so the
    # ledger still rejects them with its message.
    return value if value is None or value.tzinfo is None else value.timestamp()


def _from_posix(value: float | datetime | None) -> datetime | None:
    return datetime.fromtimestamp(value, UTC) if type(value) is float else value  # type: ignore[return-value]


def turn_to_wire(rec: TurnRecord) -> tuple[Any, ...]:
    """``rec`` as a tuple of plain values (timestamps as POSIX seconds, the status as its string)."""
    f = _turn_fields(rec)
    return (
        f[0], f[1], f[2], f[3], _posix(f[4]), _posix(f[5]), _posix(f[6]), f[7], f[8], f[9], f[10],
        str.__str__(f[11]), f[12], f[13], f[14], f[15], f[16], f[17], f[18],
    )  # fmt: skip


def turn_from_wire(t: tuple[Any, ...]) -> TurnRecord:
    """The TurnRecord that :func:`turn_to_wire` encoded (equal to it, timestamps in UTC)."""
    return TurnRecord(
        t[0], t[1], t[2], t[3], cast(datetime, _from_posix(t[4])), _from_posix(t[5]), _from_posix(t[6]),
        t[7], t[8], t[9], t[10], TurnStatus(t[11]), t[12], t[13], t[14], t[15], t[16], t[17], t[18],
    )  # fmt: skip


@dataclass(frozen=True, slots=True)
class PinRecord:
    conversation_id: str
    instance_id: str
    at: datetime
    reason: str = "placed"  # "placed" for the first pin; "replaced: <why>" for a re-placement

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (PinRecord, (self.conversation_id, self.instance_id, self.at, self.reason))


@dataclass(frozen=True, slots=True)
class ConversationSummary:
    """Per-conversation metrics known only to whoever computed them (the simulator's slowdowns)."""

    conversation_id: str
    policy: str | None = None
    created_at: datetime | None = None
    final_turn: int | None = None
    ttfet_s: float | None = None
    e2e_s: float | None = None
    ttfet_slowdown: float | None = None
    e2e_slowdown: float | None = None
    tbt_slowdown: float | None = None  # mean last-turn TBT / standalone


@dataclass(frozen=True, slots=True)
class ConversationView:
    """What `GET /v1/conversations/{id}` shows: the pin, the turns, timings and TTFET so far."""

    conversation_id: str
    run_id: str
    policy: str | None
    created_at: datetime
    pinned_instance_id: str | None  # latest pin
    pins: tuple[PinRecord, ...]
    turns: tuple[TurnRecord, ...]  # in recording order
    final_turn: int | None
    ttfet_s: float | None  # None until the final turn's first token is recorded
    e2e_s: float | None
    first_arrival_at: datetime | None
    ttfet_slowdown: float | None = None
    e2e_slowdown: float | None = None
    tbt_slowdown: float | None = None

    @property
    def done(self) -> bool:
        return self.final_turn is not None


@dataclass(frozen=True, slots=True)
class EnergySample:
    """A meter reading: cumulative joules of one GPU since the meter started (monotonic)."""

    meter_id: str
    gpu_index: int
    at: datetime
    cumulative_j: float
    source: Source = Source.MEASURED
    engine_id: str | None = None


@dataclass(frozen=True, slots=True)
class AttributionRow:
    """Energy of one engine in one interval given to one conversation turn (or to idle: conversation None)."""

    interval_start: datetime
    interval_end: datetime
    engine_id: str
    conversation_id: str | None  # None: the engine's idle row
    turn: int | None
    joules: float
    work_share: float  # fraction of the interval's energy given to this row (rows of an interval sum to 1)
    source: Source
    tier: str | None = None
    prefill_j: float | None = None  # the part of joules for prefill work (the rest: decode); None: unknown

    @property
    def is_idle(self) -> bool:
        return self.conversation_id is None


@dataclass(frozen=True, slots=True)
class ReportFilter:
    since: datetime | None = None
    until: datetime | None = None
    run_ids: tuple[str, ...] = field(default_factory=tuple)  # empty: all runs


@dataclass(frozen=True, slots=True)
class PowerCapRecord:
    """A power cap asked for one engine GPU, and what happened (energy/power.py): applied and read back, not
    applied (with the reason), modelled (simulated engines), or restored at stop. Append-only."""

    engine_id: str
    event: str  # "apply" | "restore"
    status: str  # energy.power.CapStatus value
    at: datetime
    tier: str | None = None
    requested_w: float | None = None  # per GPU
    applied_w: float | None = None  # the limit NVML read back after the change (None: not applied)
    previous_w: float | None = None  # the limit before the change
    gpu_index: int | None = None  # NVML index at the time
    gpu_uuid: str | None = None
    message: str = ""
