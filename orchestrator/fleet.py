"""From fleet.yaml to engine instances: tier models per (tier, power cap, TP), the Plan value and its file.

The planner (orchestrator/planner.py) writes a :class:`Plan`; the simulator and the live server read it back
and call :func:`instances_from_plan` to build their fleets, so every consumer sees the same instance ids
("h100-prefill-0") and the same tier models. Plan files are written atomically (temp file + rename): a failed
save never leaves a half-written plan behind.

Must not import fastapi, sqlalchemy or httpx. Pydantic appears only at the plan file's edge.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from conserve.errors import did_you_mean
from orchestrator.config import FleetConfig, TierConfig, read_yaml
from orchestrator.errors import ConfigError
from placement.base import Role
from tiers.fileio import write_text_atomic
from tiers.perf import TierModel

PLAN_FORMAT_VERSION = 1


# ---------------------------------------------------------------------------------------------------------
# tier models
# ---------------------------------------------------------------------------------------------------------


def find_tier(cfg: FleetConfig, tier_name: str) -> TierConfig:
    for t in cfg.tiers:
        if t.name == tier_name:
            return t
    names = [t.name for t in cfg.tiers]
    raise ConfigError(
        f"tier {tier_name!r} is not in the fleet.{did_you_mean(tier_name, names)} Tiers: {', '.join(names)}."
    )


def _apply_profile(tm: TierModel, tier: TierConfig) -> TierModel:
    """Calibrate `tm` with the tier's measured profile (tiers.profiles, from the tiers helper) when given."""
    if tier.profile is None:
        return tm
    try:
        from tiers import profiles  # type: ignore[attr-defined,unused-ignore]
    except ImportError:
        raise ConfigError(
            f"tiers.{tier.name}.profile: measured profiles are not supported by this build "
            "(tiers.profiles is missing). To fix: remove 'profile' or update ConServe."
        ) from None
    prof = profiles.load_profile(tier.profile)
    apply = getattr(profiles, "apply_profile", None)
    if apply is not None:
        return apply(tm, prof)  # type: ignore[no-any-return]
    if "profile" in {f.name for f in fields(TierModel)}:
        from dataclasses import replace

        return replace(tm, profile=prof)  # type: ignore[call-arg]
    raise ConfigError(
        f"tiers.{tier.name}.profile: this build can read profiles but not apply them to the tier model. "
        "To fix: remove 'profile' or update ConServe."
    )


def tier_model(cfg: FleetConfig, tier_name: str, power_cap_w: float | None = None, tp: int = 1) -> TierModel:
    """The performance/power model of one instance of `tier_name` at `power_cap_w` (None: TDP) and TP `tp`."""
    tier = find_tier(cfg, tier_name)
    gpu = tier.gpu_spec()
    if tp not in tier.tp:
        raise ConfigError(
            f"tiers.{tier_name}.tp: tensor-parallel size {tp} is not allowed (allowed: {tier.tp}). "
            "To fix: add it to the tier's tp list."
        )
    if tp > tier.count and tier.count > 0:
        raise ConfigError(
            f"tiers.{tier_name}: tp {tp} needs {tp} GPUs but the tier has count {tier.count}. "
            "To fix: lower tp or raise count."
        )
    cap = None if power_cap_w is None or power_cap_w >= gpu.tdp_w else float(power_cap_w)
    curves = None
    if tier.cap_curves is not None:  # measured cap slowdowns (tiers/capcurves.py)
        from tiers.capcurves import load_cap_curves

        curves = load_cap_curves(tier.cap_curves)
        curves.check_usable(gpu.name, f"tiers.{tier_name}.cap_curves")
    tm = TierModel(gpu=gpu, model=cfg.model_spec(), tp=tp, power_cap_w=cap, cap_curves=curves)
    return _apply_profile(tm, tier)


def allowed_caps_w(tier: TierConfig) -> list[float]:
    """The tier's allowed power caps in watts (the GPU's TDP when the tier lists none)."""
    gpu = tier.gpu_spec()
    caps = tier.power_caps_w or [gpu.tdp_w]
    return sorted({float(c) for c in caps}, reverse=True)


# ---------------------------------------------------------------------------------------------------------
# the plan
# ---------------------------------------------------------------------------------------------------------

RoleName = Literal["prefill", "decode", "colocated"]


@dataclass(frozen=True, slots=True)
class Pool:
    """`instances` engine instances of one tier, each `tp` GPUs at `power_cap_w`, in one role."""

    tier: str
    role: RoleName
    instances: int
    tp: int
    power_cap_w: float
    gpus: int
    arrival_rate_per_s: float = 0.0  # conversations/s this pool serves (its share of the load)
    utilisation: float = 0.0  # prefill: busy fraction (rho); decode: max of KV, TBT and tail-prefill use
    kv_occupancy: float = 0.0  # decode/colocated: planned mean KV occupancy
    batch: float = 0.0  # decode/colocated: planned mean running conversations per instance
    step_time_ms: float = 0.0  # decode/colocated: planned mean decode step (= mean TBT)
    watts: float = 0.0  # modelled draw of the whole pool at the planned load


@dataclass(frozen=True, slots=True)
class PlanPredictions:
    """Modelled (not measured) figures of a plan at its planned load. See docs/planning.md."""

    arrival_rate_per_s: float
    gpus_available: int
    gpus_used: int
    watts_allocated: float  # allocated GPUs: idle + dynamic at the planned load
    watts_unallocated: float  # unallocated GPUs: idle draw, or 0 with `unallocated: off`
    watts_total: float
    tokens_per_s: float  # prompt + output tokens of every turn (the paper's count)
    tokens_per_j: float  # tokens_per_s / watts_total
    ttfet_p95_s: float
    ttfet_standalone_s: float
    ttfet_p95_slowdown: float
    tbt_mean_ms: float  # worst decode pool's planned mean step
    tbt_standalone_ms: float
    tbt_slowdown: float
    slo_ttfet_slowdown: float | None = None
    slo_ttfet_s: float | None = None
    slo_tbt_slowdown: float | None = None
    slo_tbt_ms: float | None = None
    conserve_threshold_tokens: int = 0  # turn-1 inputs below this prefill on the decoder (0: never)
    cost_per_hour: float | None = None


@dataclass(frozen=True, slots=True)
class FiniteRun:
    """A finite run whose arrival rate exceeds what the fleet sustains in steady state (docs/planning.md).

    The plan's pools and predictions are for `plan_rate_per_s`; these figures say what happens to the run of
    `conversations` arriving at `requested_rate_per_s` (fluid backlog model, placement.ilp.Burst). Modelled.
    """

    conversations: int
    requested_rate_per_s: float
    sustainable_rate_per_s: float  # the most any split of this fleet sustains within the SLOs
    plan_rate_per_s: float  # the most the planned instances sustain within the SLOs
    excess_pct: float  # requested / plan_rate - 1, in percent
    arrival_span_s: float
    backlog_conversations: float  # waiting when the last conversation arrives
    drain_s: float  # after the last arrival
    makespan_s: float
    extra_wait_mean_s: float  # admission wait beyond the planned (steady-state) waits
    extra_wait_p95_s: float
    ttfet_p95_run_s: float  # planned p95 TTFET + p95 extra wait
    ttfet_p95_run_slowdown: float
    energy_run_j: float  # watts_total / plan rate x conversations (the plan's joules per conversation)


@dataclass(frozen=True, slots=True)
class Plan:
    model: str
    objective: str
    pools: tuple[Pool, ...]
    predictions: PlanPredictions
    solver: str = ""
    status: str = ""
    solve_time_s: float = 0.0
    notes: tuple[str, ...] = ()  # why the plan looks the way it does, in sentences
    fleet_file: str | None = None
    version: int = PLAN_FORMAT_VERSION
    finite_run: FiniteRun | None = None  # set when a finite run's rate exceeds the steady-state capacity

    @property
    def gpus_used(self) -> int:
        return sum(p.gpus for p in self.pools)

    def pools_of(self, role: RoleName) -> tuple[Pool, ...]:
        return tuple(p for p in self.pools if p.role == role and p.instances > 0)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["pools"] = [asdict(p) for p in self.pools]
        d["notes"] = list(self.notes)
        return d


# pydantic mirror of the plan file (edge only): unknown or missing fields are errors naming the field path.
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _PoolFile(_Strict):
    tier: str
    role: RoleName
    instances: int = Field(ge=0)
    tp: int = Field(1, ge=1)
    power_cap_w: float = Field(gt=0)
    gpus: int = Field(ge=0)
    arrival_rate_per_s: float = 0.0
    utilisation: float = 0.0
    kv_occupancy: float = 0.0
    batch: float = 0.0
    step_time_ms: float = 0.0
    watts: float = 0.0


class _PredictionsFile(_Strict):
    arrival_rate_per_s: float
    gpus_available: int
    gpus_used: int
    watts_allocated: float
    watts_unallocated: float
    watts_total: float
    tokens_per_s: float
    tokens_per_j: float
    ttfet_p95_s: float
    ttfet_standalone_s: float
    ttfet_p95_slowdown: float
    tbt_mean_ms: float
    tbt_standalone_ms: float
    tbt_slowdown: float
    slo_ttfet_slowdown: float | None = None
    slo_ttfet_s: float | None = None
    slo_tbt_slowdown: float | None = None
    slo_tbt_ms: float | None = None
    conserve_threshold_tokens: int = 0
    cost_per_hour: float | None = None


class _FiniteRunFile(_Strict):
    conversations: int
    requested_rate_per_s: float
    sustainable_rate_per_s: float
    plan_rate_per_s: float
    excess_pct: float
    arrival_span_s: float
    backlog_conversations: float
    drain_s: float
    makespan_s: float
    extra_wait_mean_s: float
    extra_wait_p95_s: float
    ttfet_p95_run_s: float
    ttfet_p95_run_slowdown: float
    energy_run_j: float


class _PlanFile(_Strict):
    version: int = PLAN_FORMAT_VERSION
    model: str
    objective: str
    pools: list[_PoolFile]
    predictions: _PredictionsFile
    solver: str = ""
    status: str = ""
    solve_time_s: float = 0.0
    notes: list[str] = Field(default_factory=list)
    fleet_file: str | None = None
    finite_run: _FiniteRunFile | None = None


def plan_from_dict(data: Any, source: str = "plan") -> Plan:
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source}: expected a mapping (model:, pools:, predictions:, ...). To fix: pass a "
            "file written by `orchestrator plan --out`."
        )
    try:
        pf = _PlanFile.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        loc = ".".join(str(p) for p in first["loc"]) or "(top level)"
        msg = first["msg"]
        if first["type"] == "extra_forbidden":
            msg = "unknown field; remove it (plan files are written by `orchestrator plan --out`)"
        elif first["type"] == "missing":
            msg = "required field is missing; regenerate the plan with `orchestrator plan --out`"
        raise ConfigError(f"{source}: {loc}: {msg}") from None
    if pf.version != PLAN_FORMAT_VERSION:
        raise ConfigError(
            f"{source}: version: plan format {pf.version} is not supported (this build reads "
            f"{PLAN_FORMAT_VERSION}). To fix: regenerate the plan with `orchestrator plan --out`."
        )
    return Plan(
        model=pf.model,
        objective=pf.objective,
        pools=tuple(Pool(**p.model_dump()) for p in pf.pools),
        predictions=PlanPredictions(**pf.predictions.model_dump()),
        solver=pf.solver,
        status=pf.status,
        solve_time_s=pf.solve_time_s,
        notes=tuple(pf.notes),
        fleet_file=pf.fleet_file,
        version=pf.version,
        finite_run=None if pf.finite_run is None else FiniteRun(**pf.finite_run.model_dump()),
    )


def save_plan(plan: Plan, path: str | Path) -> Path:
    """Write `plan` as YAML atomically: a temp file in the same directory, fsync, then rename over `path`."""
    p = Path(path)
    text = (
        "# ConServe plan (orchestrator plan --out). Figures under predictions are modelled, not measured.\n"
    )
    text += yaml.safe_dump(plan.to_dict(), sort_keys=False)
    directory = p.parent if str(p.parent) else Path(".")
    if not directory.is_dir():
        raise ConfigError(
            f"cannot write plan to {str(p)!r}: directory {str(directory)!r} does not exist. "
            "To fix: create it or choose another --out path."
        )
    write_text_atomic(p, text)
    return p


def load_plan(path: str | Path) -> Plan:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(
            f"plan file {str(p)!r} does not exist. To fix: create one with "
            "`orchestrator plan --fleet FILE --out plan.yaml`."
        )
    return plan_from_dict(read_yaml(p), source=str(p))


# ---------------------------------------------------------------------------------------------------------
# instances
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class InstanceSpec:
    """One engine instance to build: a stable id, its tier label, its role and its performance model."""

    instance_id: str
    tier: str
    role: Role
    tier_model: TierModel = field(repr=False)

    @property
    def gpus(self) -> int:
        return self.tier_model.gpus


def instances_from_plan(cfg: FleetConfig, plan: Plan) -> list[InstanceSpec]:
    """Expand a plan's pools into instances with stable ids "<tier>-<role>-<i>" (i counts per tier and role).

    Checks the plan against the fleet: every pool's tier must exist and no tier may use more GPUs than it has.
    """
    used: dict[str, int] = {}
    counters: dict[tuple[str, str], int] = {}
    out: list[InstanceSpec] = []
    for k, pool in enumerate(plan.pools):
        tier = find_tier(cfg, pool.tier)
        if pool.role not in tier.roles:
            raise ConfigError(
                f"plan pools.{k}: role {pool.role!r} is not allowed on tier {pool.tier!r} "
                f"(roles: {tier.roles}). To fix: regenerate the plan for this fleet file."
            )
        used[pool.tier] = used.get(pool.tier, 0) + pool.instances * pool.tp
        if used[pool.tier] > tier.count:
            raise ConfigError(
                f"plan pools.{k}: tier {pool.tier!r} would use {used[pool.tier]} GPUs but has {tier.count}. "
                "To fix: regenerate the plan for this fleet file."
            )
        tm = tier_model(cfg, pool.tier, pool.power_cap_w, pool.tp)
        for _ in range(pool.instances):
            i = counters.get((pool.tier, pool.role), 0)
            counters[(pool.tier, pool.role)] = i + 1
            out.append(InstanceSpec(f"{pool.tier}-{pool.role}-{i}", pool.tier, Role(pool.role), tm))
    return out
