"""`orchestrator serve`'s settings: pydantic-settings (env prefix ``CONSERVE_``), the edge where files and
flags enter the serving runtime (orchestrator/runtime.py builds everything from them). Flags override the
fleet file.

Must not import fastapi.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["ServeSettings"]


class ServeSettings(BaseSettings):
    """What `orchestrator serve` needs. Flags override the fleet file (db URL, policy)."""

    model_config = SettingsConfigDict(env_prefix="CONSERVE_", extra="forbid")

    fleet: Path = Field(Path("examples/fleet.yaml"), description="fleet.yaml to serve")
    plan: Path | None = Field(None, description="plan.yaml (orchestrator plan --out); sim backend")
    db: str | None = Field(
        None, description="SQLAlchemy URL of the ledger; default: the fleet's database_url"
    )
    policy: str | None = Field(None, description="placement policy; default: the fleet's policy")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    served_model_name: str | None = Field(None, description="model name clients send; default: fleet model")
    sim_speedup: float = Field(
        1.0, gt=0, description="simulated engines run this many times faster than modelled"
    )
    poll_interval_s: float = Field(1.0, gt=0, description="engine health/metrics poll period")
    pin_ttl_s: float = Field(900.0, gt=0, description="release the pin of a conversation idle this long")
    admission_wait_s: float | None = Field(
        None,
        ge=0,
        description="a turn that no decoder can hold waits this long for room, then gets 503 with "
        "Retry-After (0: off); default: the fleet's admission_wait_s, else 30 s (core/admission.py)",
    )
    run_id: str | None = Field(
        None,
        min_length=1,
        description="ledger run the turns are recorded in; default: a new id per server start "
        "(energy.records.new_run_id), so a restart never merges conversations; replicas sharing a "
        "ledger set the same id",
    )
    ledger_writer: Literal["process", "thread"] = Field(
        "process",
        description="where ledger SQL runs: a child process (default; keeps it off the serving GIL) or a "
        "thread of this process (always used for in-memory SQLite, which another process cannot open)",
    )
    ledger_durable: bool = Field(
        True,
        description="hold each answered turn's last byte ([DONE] or the JSON body) until its ledger record "
        "is committed, so a crash loses no answered turn (costs a group commit per answer: BENCHMARKS.md)",
    )
    ledger_spool_file: Path | None = Field(
        None,
        description="records the ledger writer had to give up (database away at shutdown, a failing batch) "
        "are kept in this JSON-lines file and replayed into the ledger at the next start "
        "(orchestrator/ledger_spool.py); default: beside a SQLite ledger file, else "
        "~/.cache/conserve/ledger-spool-<hash of the database URL>.jsonl",
    )
    ledger_batch_max: int = Field(500, ge=1)
    ledger_flush_interval_s: float = Field(
        0.25,
        gt=0,
        description="write records nobody waits for (pins; turns when ledger_durable is off) this often; "
        "larger batches cost less CPU per turn (SQLite, dev box: ~180 us/turn in batches of 40, ~60 us in "
        "batches of 500)",
    )
    energy_interval_s: float = Field(
        1.0,
        ge=0,
        description="energy accounting period (meters -> attribution "
        "-> ledger, energy/accounting.py); 0 disables it",
    )
    energy_lag_s: float = Field(
        10.0,
        ge=0,
        description="attribute an interval at least this long after it ends; an interval also waits "
        "for the turns still running in it (they are recorded when they end)",
    )
    shared_state: Literal["auto", "memory", "database"] = Field(
        "auto",
        description="who numbers a conversation's turns and pins it: 'database' (conversation heads in the "
        "PostgreSQL ledger, energy/heads.py: replicas sharing the ledger agree; one round trip more per "
        "turn), 'memory' (this process: one replica, no database round trip), or 'auto' (database on "
        "PostgreSQL, memory on SQLite)",
    )
    power_state_file: Path | None = Field(
        None,
        description="state file of the GPU power limits serve changed (orchestrator/power.py); "
        "default ~/.cache/conserve/power-caps.json",
    )
    power_controller: bool = Field(
        False,
        description="run the online power controller (orchestrator/power_loop.py): every "
        "power_controller_interval_s it moves each pool's GPU caps within its tier's power_caps_w",
    )
    power_controller_interval_s: float = Field(5.0, gt=0, description="power controller period, seconds")
    power_budget_w: float | None = Field(
        None, gt=0, description="power controller: fleet cap budget in W (sum over engines of GPUs x cap)"
    )
    power_park_w: float | None = Field(
        None,
        ge=0,
        description="power controller: park decoders in a trough (simulated engines), drawing "
        "this per GPU while parked (orchestrator/core/power.py); None: caps only",
    )
    power_wake_s: float = Field(60.0, ge=0, description="power controller: cold start of a parked engine, s")
    kv_gap_interval_s: float = Field(
        0.0,
        ge=0,
        description="apply the KV-gap rule (keep, offload or drop an idle pinned conversation's KV; "
        "orchestrator/kv_gaps_live.py) this often, seconds; 0 turns it off",
    )
