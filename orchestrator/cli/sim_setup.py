"""The rules `simulate` and `compare` share, so a policy means the same thing in both commands.

- Seed: ``--seed`` when given, else the fleet file's ``workload.seed``.
- Arrivals: a Mooncake trace without an explicit ``arrival_rate_per_s`` keeps its own timestamps (as `plan`
  does) unless ``--rate``/``--rates`` is given; the run is labelled with the trace's observed rate,
  (n - 1) / (last - first arrival), and "trace timestamps". Otherwise Poisson arrivals at the rate.
- Instances: ``--plan``, ``--layout``, or else the ILP's plan made now (at the requested rate, else the
  workload's). The colocated family (colocated, round-robin, kv-aware) prefills on the instance that decodes,
  so prefill-role instances would sit idle and be billed: a plan is converted to the same GPUs as colocated
  instances at TDP (`colocated_layout`), an explicit layout with prefill instances is refused.
- ConServe's local-prefill threshold: ``--local-prefill-below`` when given; else the plan's
  (``predictions.conserve_threshold_tokens``, from the plan file or the ILP's plan, the rule `plan
  --validate` applies); with an explicit layout there is no plan to derive it from, so it is off (0).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from orchestrator.config import FleetConfig
from orchestrator.errors import ConfigError
from orchestrator.fleet import InstanceSpec, Plan
from orchestrator.sim.fleet import build_instances
from orchestrator.workload import ConversationSpec, trace_timed
from placement.base import Role

COLOCATED_FAMILY = ("colocated", "round-robin", "kv-aware")
TRACE_ARRIVALS = "trace timestamps"
POISSON_ARRIVALS = "poisson"


def policy_key(name: str) -> str:
    return name.replace("_", "-").lower()


def effective_seed(cfg: FleetConfig, seed: int | None) -> int:
    return cfg.workload.seed if seed is None else seed


def observed_rate_per_s(convs: Sequence[ConversationSpec]) -> float | None:
    """(n - 1) / (last - first arrival), the estimate `plan` uses for a timed trace; None if undefined."""
    if len(convs) < 2:
        return None
    times = [c.arrival_s for c in convs]
    span = max(times) - min(times)
    return (len(convs) - 1) / span if span > 0 else None


def arrivals(
    cfg: FleetConfig, rate: float | None, convs: Sequence[ConversationSpec]
) -> tuple[float | None, str]:
    """(the rate to label the run with, how arrivals were made) for a run of `convs`."""
    if rate is None and trace_timed(cfg.workload):
        return observed_rate_per_s(convs), TRACE_ARRIVALS
    return (cfg.workload.arrival_rate_per_s if rate is None else rate), POISSON_ARRIVALS


def plan_or_layout(
    cfg: FleetConfig, plan: Plan | None, layout: str | None, rate: float | None
) -> tuple[Plan | None, str | None]:
    """The plan file, the explicit layout, or else the ILP's plan made now at `rate` (None: the file's)."""
    if plan is not None and layout is not None:
        raise ConfigError("--plan and --layout exclude each other. To fix: pass one of them.")
    if plan is None and layout is None:
        from orchestrator.planner import make_plan

        plan = make_plan(cfg, rate_per_s=rate).plan
    return plan, layout


def colocated_layout(instances: Sequence[InstanceSpec]) -> str:
    """The same GPUs as `instances`, every one a colocated instance at TDP."""
    per_tier: dict[str, int] = {}
    for i in instances:
        per_tier[i.tier] = per_tier.get(i.tier, 0) + i.gpus
    return ",".join(f"{t}.colocated={n}" for t, n in per_tier.items())


@dataclass(frozen=True, slots=True)
class Fitted:
    plan: Plan | None
    layout: str | None
    note: str | None  # what was converted, to print; None when nothing was


def fit_policy(policy: str, cfg: FleetConfig, plan: Plan | None, layout: str | None) -> Fitted:
    """Instances the policy can use: see the module docstring (converted plans, refused layouts)."""
    key = policy_key(policy)
    if key not in COLOCATED_FAMILY:
        return Fitted(plan, layout, None)
    insts = build_instances(cfg, plan, layout)
    pre = sum(1 for i in insts if i.role == Role.PREFILL)
    if not pre:
        return Fitted(plan, layout, None)
    coloc = colocated_layout(insts)
    if layout is not None:
        raise ConfigError(
            f"--policy {key} prefills on the instance that decodes, but the layout has {pre} prefill "
            f"instance(s) that would sit idle. To fix: use colocated instances (e.g. --layout '{coloc}') "
            "or a disaggregated policy (conserve, per-turn, full-disagg)."
        )
    gpus = sum(i.gpus for i in insts)
    note = f"{key} runs the plan's {gpus} GPUs as colocated instances at TDP ({coloc}), as compare does"
    return Fitted(None, coloc, note)


def conserve_threshold(plan: Plan | None, explicit: int | None) -> tuple[int, str]:
    """ConServe's local-prefill threshold (tokens; 0: off) and where it came from."""
    if explicit is not None:
        return explicit, "--local-prefill-below"
    if plan is not None:
        return plan.predictions.conserve_threshold_tokens, "the plan's"
    return 0, "off: an explicit layout has no plan to derive it from (set --local-prefill-below)"


def threshold_line(tokens: int, source: str) -> str:
    shown = f"{tokens:,} tokens" if tokens > 0 else "0 (every turn 1 on a prefiller)"
    return f"ConServe local-prefill threshold: {shown} ({source})"
