"""Build a simulation from fleet.yaml: instances (a plan, an explicit layout, or the ILP) and the workload.

Layout syntax (``--layout``): comma-separated ``[tier.]role=count[@capW]`` items, e.g. ``prefill=1,decode=3``
or ``prefill=1,decode=3@200`` (decoders capped at 200 W) or ``a40.colocated=4``. The tier defaults to the
fleet's first tier; the cap defaults to the GPU's TDP. An explicit layout may use any role on any tier (it is
the user's experiment), but not more GPUs than the tier has.

Must not import fastapi, sqlalchemy or httpx.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from orchestrator.config import FleetConfig
from orchestrator.errors import ConfigError, SimulationError
from orchestrator.fleet import InstanceSpec, Plan, find_tier, instances_from_plan, tier_model
from orchestrator.planner import make_plan  # one direction only: the planner never imports the simulator
from orchestrator.sim.core import SimOptions, run_simulation
from orchestrator.sim.result import SimResult
from orchestrator.workload import ConversationSpec, poisson_arrivals, workload_from_config
from placement.adaptive import fleet_options
from placement.base import Role
from placement.policies import make_policy

_ITEM = re.compile(
    r"^(?:(?P<tier>[A-Za-z0-9_\-]+)\.)?(?P<role>[a-z]+)=(?P<n>\d+)(?:@(?P<cap>\d+(?:\.\d+)?)W?)?$"
)


@dataclass(frozen=True, slots=True)
class LayoutItem:
    tier: str
    role: Role
    instances: int
    power_cap_w: float | None


def parse_layout(text: str, cfg: FleetConfig) -> list[LayoutItem]:
    items: list[LayoutItem] = []
    for raw in (p.strip() for p in text.split(",")):
        if not raw:
            continue
        m = _ITEM.match(raw)
        if m is None:
            raise ConfigError(
                f"--layout item {raw!r} is not [tier.]role=count[@capW]. To fix: e.g. "
                "'prefill=1,decode=3@200' or 'a40.colocated=4'."
            )
        role_name = m.group("role")
        try:
            role = Role(role_name)
        except ValueError:
            raise ConfigError(
                f"--layout item {raw!r}: role {role_name!r} is not prefill, decode or colocated."
            ) from None
        tier = m.group("tier") or cfg.tiers[0].name
        find_tier(cfg, tier)
        cap = float(m.group("cap")) if m.group("cap") else None
        items.append(LayoutItem(tier, role, int(m.group("n")), cap))
    if not items:
        raise ConfigError("--layout is empty. To fix: e.g. 'prefill=1,decode=3'.")
    return items


def instances_from_layout(cfg: FleetConfig, items: Sequence[LayoutItem]) -> list[InstanceSpec]:
    used: dict[str, int] = {}
    counters: dict[tuple[str, str], int] = {}
    out: list[InstanceSpec] = []
    for it in items:
        tc = find_tier(cfg, it.tier)
        tm = tier_model(cfg, it.tier, it.power_cap_w, 1)
        used[it.tier] = used.get(it.tier, 0) + it.instances * tm.gpus
        if used[it.tier] > tc.count:
            raise ConfigError(
                f"--layout uses {used[it.tier]} GPUs of tier {it.tier!r}, which has {tc.count}. "
                "To fix: lower the counts or raise the tier's count in the fleet file."
            )
        for _ in range(it.instances):
            k = counters.get((it.tier, it.role), 0)
            counters[(it.tier, it.role)] = k + 1
            out.append(InstanceSpec(f"{it.tier}-{it.role}-{k}", it.tier, it.role, tm))
    return out


def unallocated_idle_w(cfg: FleetConfig, instances: Sequence[InstanceSpec]) -> float:
    """Idle draw of GPUs the fleet has but the instances do not use (0 with ``unallocated: off``)."""
    if cfg.unallocated == "off":
        return 0.0
    used: dict[str, int] = {}
    for i in instances:
        used[i.tier] = used.get(i.tier, 0) + i.gpus
    return sum(max(0, t.count - used.get(t.name, 0)) * t.gpu_spec().idle_w for t in cfg.tiers)


def reference_tier_model(cfg: FleetConfig):  # type: ignore[no-untyped-def]
    """The standalone normaliser's tier: the fleet's reference tier (default: first) at TDP, at the smallest
    of its allowed TP sizes that holds the model with room for KV (TP 1 for every model that fits one GPU; the
    planner's reference instance, placement.ilp.reference_for, is chosen by the same rule)."""
    name = cfg.reference_tier or cfg.tiers[0].name
    tier = next((t for t in cfg.tiers if t.name == name), None)
    sizes = sorted(set(tier.tp)) if tier is not None else [1]
    if tier is not None and tier.count:
        sizes = [tp for tp in sizes if tp <= tier.count] or [1]
    for tp in sizes:
        tm = tier_model(cfg, name, None, tp)
        if tm.kv_capacity_tokens > 0:
            return tm
    return tier_model(cfg, name, None, sizes[0])


def links_of(cfg: FleetConfig) -> dict[str, str]:
    return {t.name: str(t.link.value) for t in cfg.tiers}


def fleet_workload(
    cfg: FleetConfig,
    rate: float | None = None,
    seed: int | None = None,
    conversations: int | None = None,
    max_turns: int | None = None,
) -> list[ConversationSpec]:
    """The fleet file's workload, with optional overrides (rate and seed re-draw the Poisson arrivals)."""
    upd: dict[str, object] = {}
    if conversations is not None:
        upd["conversations"] = conversations
    if max_turns is not None:
        upd["max_turns"] = max_turns
    if seed is not None:
        upd["seed"] = seed
    wcfg = cfg.workload.model_copy(update=upd)
    convs = workload_from_config(wcfg)
    if rate is not None:
        convs = poisson_arrivals(convs, rate, wcfg.seed)
    return convs


def build_instances(
    cfg: FleetConfig,
    plan: Plan | None = None,
    layout: str | None = None,
    policy_name: str = "conserve",
    rate: float | None = None,
) -> list[InstanceSpec]:
    """Instances from an explicit layout, a plan, or else a plan the ILP makes now (at `rate` if given)."""
    if plan is not None and layout is not None:
        raise ConfigError("--plan and --layout exclude each other. To fix: pass one of them.")
    if layout is not None:
        return instances_from_layout(cfg, parse_layout(layout, cfg))
    if plan is not None:
        return instances_from_plan(cfg, plan)
    run = make_plan(cfg, rate_per_s=rate)
    return instances_from_plan(cfg, run.plan)


def simulate_fleet(
    cfg: FleetConfig,
    plan: Plan | None = None,
    policy_name: str = "conserve",
    rate: float | None = None,
    *,
    layout: str | None = None,
    seed: int = 0,
    conversations: Sequence[ConversationSpec] | None = None,
    policy_options: dict[str, object] | None = None,
    options: SimOptions | None = None,
    energy_window_s: float | None = 1.0,
    failures: Sequence[tuple[str, float]] = (),
    progress: Callable[[int, int], None] | None = None,
    plan_rate: float | None = None,
) -> tuple[SimResult, list[InstanceSpec]]:
    """Simulate the fleet file's workload (or `conversations`) on a plan / layout / the ILP's plan.

    Without a plan or layout the ILP plans the fleet now, for `plan_rate` (default: `rate`, else the file's).
    """
    if plan is None and layout is None:
        # the ILP's plan, made now; kept so its hybrid threshold is applied like a --plan file's
        plan = make_plan(cfg, rate_per_s=plan_rate if plan_rate is not None else rate).plan
    insts = build_instances(cfg, plan, layout, policy_name, plan_rate if plan_rate is not None else rate)
    convs = list(conversations) if conversations is not None else fleet_workload(cfg, rate, seed)
    if conversations is not None and rate is not None:
        convs = poisson_arrivals(convs, rate, seed)
    opts = dict(policy_options or {})
    key = policy_name.replace("_", "-").lower()
    if key == "per-turn":
        opts.setdefault("seed", seed)
    threshold = plan.predictions.conserve_threshold_tokens if plan is not None else 0
    if key == "conserve" and threshold > 0:
        # the planner's observable refinement: turn-1 prompts below this prefill on the decoder
        opts.setdefault("local_prefill_below_tokens", threshold)
    # a policy that costs its decisions with the tier model (conserve-adaptive) sees every instance's model
    links = links_of(cfg)
    for k, v in fleet_options(
        policy_name,
        {i.instance_id: i.tier_model for i in insts},
        {i.instance_id: links.get(i.tier, "pcie") for i in insts},
    ).items():
        opts.setdefault(k, v)
    policy = make_policy(policy_name, **opts)
    if not any(i.role.can_decode for i in insts):
        raise SimulationError(
            "the fleet has no decode-capable instance. To fix: add decode or colocated instances."
        )
    res = run_simulation(
        insts,
        convs,
        policy,
        seed=seed,
        energy_window_s=energy_window_s,
        options=options,
        links=links_of(cfg),
        failures=failures,
        progress=progress,
    )
    return res, insts


def simulate_plan(
    cfg: FleetConfig, plan: Plan, policy_name: str = "conserve", rate: float | None = None, seed: int = 0
) -> SimResult:
    """Validate a plan by simulating it (the hook `orchestrator plan --validate` looks for)."""
    res, _ = simulate_fleet(cfg, plan, policy_name, rate, seed=seed, energy_window_s=None)
    return res


def with_rate(convs: Sequence[ConversationSpec], rate: float, seed: int) -> list[ConversationSpec]:
    return poisson_arrivals([replace(c, arrival_s=0.0) for c in convs], rate, seed)
