"""An energy report as data: grouping and format choices, columns, rows (energy/reports.py builds it).

Must not import fastapi.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from conserve.errors import did_you_mean
from energy.errors import EnergyError


class GroupBy(StrEnum):
    CONVERSATION = "conversation"
    TIER = "tier"
    POLICY = "policy"
    ENGINE = "engine"


class Format(StrEnum):
    TABLE = "table"
    CSV = "csv"
    JSON = "json"
    HTML = "html"


def parse_choice(value: str, enum: type[StrEnum], name: str) -> Any:
    try:
        return enum(value)
    except ValueError:
        choices = [e.value for e in enum]
        raise EnergyError(
            f"{name} {value!r} is not one of {', '.join(choices)}.{did_you_mean(value, choices)}"
        ) from None


def parse_time(value: str | None, name: str) -> datetime | None:
    """ISO 8601 (``2025-03-01``, ``2025-03-01T12:00:00+02:00``); a time without offset is taken as UTC."""
    if value is None or value == "":
        return None
    try:
        t = datetime.fromisoformat(value.replace("Z", "+00:00"))
        return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)
    except (ValueError, OverflowError):
        raise EnergyError(
            f"{name} {value!r} is not an ISO 8601 time in years 1-9999 UTC; e.g. 2025-03-01T12:00:00Z"
        ) from None


@dataclass(frozen=True, slots=True)
class Column:
    key: str
    title: str
    unit: str = ""


@dataclass(frozen=True, slots=True)
class Report:
    by: GroupBy
    since: datetime | None
    until: datetime | None
    columns: tuple[Column, ...]
    rows: tuple[dict[str, Any], ...]
    totals: dict[str, Any]
    notes: tuple[str, ...]
    # for the HTML plots
    conversation_joules: tuple[tuple[str, float], ...] = ()  # (policy, joules) per conversation
    tier_timeline: tuple[tuple[datetime, str, float], ...] = ()  # (bucket start, tier, joules)
    policy_tokens_per_j: tuple[tuple[str, float], ...] = ()
    timeline_bucket_s: float = 0.0  # width of the tier_timeline buckets
    # (policy label, prefill J, decode J, KV transfer J, idle J, unsplit J) per policy and run kind
    policy_phases: tuple[tuple[str, float, float, float, float, float], ...] = ()
    measured_share: float | None = None  # of all the report's joules (plot labels)
    generated_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    def to_dict(self) -> dict[str, Any]:
        return {
            "by": str(self.by),
            "since": self.since.isoformat() if self.since else None,
            "until": self.until.isoformat() if self.until else None,
            "columns": [{"key": c.key, "title": c.title, "unit": c.unit} for c in self.columns],
            "rows": [_jsonable(r) for r in self.rows],
            "totals": _jsonable(self.totals),
            "notes": list(self.notes),
        }


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, float) and not math.isfinite(v):
            v = None
        elif isinstance(v, datetime):
            v = v.isoformat()
        elif isinstance(v, tuple):
            v = list(v)
        out[k] = v
    return out
