"""The paper's measured points with the artifact's harness, through the mechanisms wired into the simulator.

``orchestrator.artifact`` holds the pure pieces of the ConServe artifact's experiment harness; this module is
the experiment driver that runs a paper configuration (``orchestrator.sim.paper.CONFIGS``) with them (issue
12 item 1; docs/paper-reproduction.md, section "Fidelity to measurement", wiring items W1-W7). A
:class:`Mechanisms` value turns each on or off; everything off is the simulator as
``orchestrator.sim.paper`` runs the experiment:

- ``replay_arrivals`` (W2): a prefiller-only run is simulated first (turn 1 of every conversation, 2 output
  tokens, through the prefiller at the *recorded* rate: 2.0 conv/s for the 1.634 label; proxy engines, so
  no prefix caching), and each policy's run replays its turn-1 prefill starts (colocated, full-disagg) or
  decode starts (conserve, per-turn) as arrivals, as the artifact did.
- ``proxy_no_prefix_cache`` (W3): full disaggregation with prefix caching off on every engine
  (``SimOptions.prefix_cache``; the artifact launched the proxy path's engines with
  ``--no-enable-prefix-caching``). The standalone normaliser keeps the reference engine's prefix caching
  (``StandaloneCache``; the artifact's baseline runs used plain ``vllm serve``).
- ``ampd_virtual_prefiller`` (W4): the per-turn baseline as the artifact emulated it
  (:class:`ArtifactAmpdPolicy`: ConServe's own placement with the per-turn KV reservation; the decoder
  serves every turn itself, no real KV round trip and no migration), and each wrongly predicted turn
  (``random.Random(42)``, 10%) waits for the virtual prefiller's backlog plus the modelled wait of
  ``tiers.connector`` before it is placed: ``orchestrator.artifact.AmpdEmulation``, a turn delay of the
  simulator (``run_simulation(turn_delay=...)``), so the waits follow the run's own event order. Needs W2's
  recorded run.
- ``serving_overhead`` (W5): every engine pays the ``vllm serve`` per-step overhead
  (``SimOptions.serving_step_overhead``; tiers.serving), the prefiller-only run's engines too.
- ``split_energy_window`` (W6): under the artifact convention, conserve's and per-turn's energy = their
  decoders' energy + the prefiller's energy in the prefiller-only run over its own window
  (``orchestrator.metrics.SplitEnergyWindow``), as ``s5_metrics.workload_energy`` measured it.

The paper's per-token last-turn TBT (W1) is ``Summary.tbt_token_slowdown`` (``PAPER_SIM_OPTIONS`` records
the gaps). Latencies are simulated and energy is modelled (tier power model), never measured. Must not
import fastapi, sqlalchemy or httpx.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path

import numpy as np

from orchestrator.artifact import (
    REPLAY_POINT,
    AmpdEmulation,
    RecordedTurn1,
    artifact_arrival_offsets_s,
    compound_prompt_tokens,
    recorded_rate,
    replay_offsets_s,
    wrong_predicted_turns,
)
from orchestrator.config import FleetConfig
from orchestrator.errors import SimulationError
from orchestrator.metrics import (
    Convention,
    SloSpec,
    SplitEnergyWindow,
    Summary,
    conversation_metrics,
    summarize,
)
from orchestrator.sim.core import SimOptions, run_simulation
from orchestrator.sim.fleet import build_instances, links_of, reference_tier_model, unallocated_idle_w
from orchestrator.sim.paper import CONFIGS, PAPER_SIM_OPTIONS
from orchestrator.sim.result import SimResult
from orchestrator.sim.standalone import StandaloneCache
from orchestrator.workload import ConversationSpec, TurnSpec, load_conserve_trace, workload_from_config
from placement.base import Policy, Role
from placement.policies import ConservePolicy, make_policy

# max_tokens of the prefiller-only run's single request (conversation.py run_conversation_prefiller)
PREFILLER_RUN_OUTPUT_TOKENS = 2


class ArtifactAmpdPolicy(ConservePolicy):
    """The per-turn ("AMPD") baseline as the artifact ran it: ``run_conversation_per_turn_adaptive_disagg_
    decoders`` (conversation.py lines 368-463) is ConServe's runner (turn 1 through the prefiller, then
    pinned to the decoder the tracker chose for the whole conversation, every later turn a local prefix-hit
    prefill) with two differences only: the router-side reservation covers turn 1 and grows per turn, and
    wrongly predicted turns sleep first. It makes no per-turn placement decision and never migrates. Named
    ``per-turn`` so the simulator applies that policy's reservation rule (orchestrator.sim.admission)."""

    name = "per-turn"


@dataclass(frozen=True, slots=True)
class Mechanisms:
    replay_arrivals: bool = False  # W2
    proxy_no_prefix_cache: bool = False  # W3
    ampd_virtual_prefiller: bool = False  # W4
    split_energy_window: bool = False  # W6
    wrong_prediction_rate: float = 0.10  # run_sweep.sh line 82
    serving_overhead: bool = False  # W5


ALL_MECHANISMS = Mechanisms(True, True, True, True, serving_overhead=True)


@dataclass(frozen=True, slots=True)
class PointRun:
    """One (configuration, rate, seed) run and its summaries under both clocks (router admission on)."""

    label: str
    rate: float
    seed: int | str
    result: SimResult
    conversations: tuple[ConversationSpec, ...]
    artifact: Summary  # t0 = admission (conserve, per-turn: past turn 1's prefiller queue); W6 energy
    honest: Summary  # t0 = arrival of turn 1, every wait counted; energy of every GPU over the run
    waits_s: dict[tuple[str, int], float] = field(default_factory=dict)  # W4: each wrong turn's wait
    recorded: SimResult | None = None  # W2: the prefiller-only run

    def summary(self, clock: str = "artifact") -> Summary:
        return self.artifact if clock == "artifact" else self.honest

    def p95(self, metric: str, clock: str = "artifact") -> float:
        """p95 of ``ttfet``, ``e2e``, ``tbt`` (per conversation) or ``tbt_token`` (the paper's, per token)."""
        s = self.summary(clock)
        if metric == "tbt_token":
            return s.tbt_token_slowdown.get("p95", float("nan"))
        return getattr(s, f"{metric}_slowdown")["p95"]

    def violation_pct(self, metric: str, clock: str = "artifact") -> float:
        """Per-metric SLO violation share (``ttfet``, ``tbt``, ``e2e``), as the paper's headline reports."""
        return self.summary(clock).slo_violation_pct_by.get(f"{metric}_slowdown", 0.0)

    def any_violation_pct(self, clock: str = "artifact") -> float:
        return self.summary(clock).slo_violation_pct

    @property
    def tokens_per_j(self) -> float:
        return self.artifact.tokens_per_j


@lru_cache(maxsize=4)
def _compounds(trace: Path) -> tuple[int, ...]:
    return compound_prompt_tokens(c.turns[0].appended_tokens for c in load_conserve_trace(trace))


def _with_arrivals(
    convs: Sequence[ConversationSpec], arrivals: Mapping[str, float]
) -> list[ConversationSpec]:
    return [replace(c, arrival_s=float(arrivals[c.conversation_id])) for c in convs]


def send_times(convs: Sequence[ConversationSpec], rate: float, seed: int | str) -> dict[str, float]:
    """Poisson sends: the artifact's own sequence (``seed="paper"``: random.Random(42)) or numpy's (int, the
    same draws as ``orchestrator.workload.poisson_arrivals``)."""
    if seed == "paper":
        offs = artifact_arrival_offsets_s(len(convs), rate)
    else:
        rng = np.random.default_rng(int(seed))
        gaps = rng.exponential(1.0 / rate, len(convs))
        offs = list(np.concatenate(([0.0], np.cumsum(gaps[1:])))) if len(convs) else []
    return {c.conversation_id: float(t) for c, t in zip(convs, offs, strict=True)}


def prefiller_only_run(
    cfg: FleetConfig,
    convs: Sequence[ConversationSpec],
    sends: Mapping[str, float],
    options: SimOptions = PAPER_SIM_OPTIONS,
) -> tuple[list[RecordedTurn1], SimResult]:
    """The artifact's ``adaptive_disagg_prefiller`` run: every conversation's turn 1 only (2 output tokens)
    through the prefiller and a decoder, no router admission, proxy engines without prefix caching."""
    insts = build_instances(cfg, layout=CONFIGS["conserve"][1])
    one = [
        ConversationSpec(
            c.conversation_id,
            sends[c.conversation_id],
            (TurnSpec(c.turns[0].appended_tokens, PREFILLER_RUN_OUTPUT_TOKENS),),
        )
        for c in convs
    ]
    opts = replace(options, router_admission=False, prefix_cache=False)
    res = run_simulation(
        insts, one, make_policy("conserve"), seed=0, energy_window_s=None, options=opts, links=links_of(cfg)
    )
    recs = [
        RecordedTurn1(t.conversation_id, t.arrival_s, t.prefill_start_s, t.first_token_s, t.last_token_s)
        for t in res.turns
    ]
    return recs, res


def split_window_of(recorded: SimResult, idle_w: float) -> SplitEnergyWindow:
    """W6: the recorded prefiller-only run's prefiller, billed over that run's window."""
    pre = next(i for i in recorded.instances if i.role == str(Role.PREFILL))
    return SplitEnergyWindow(pre.energy_j - pre.idle_energy_j, pre.busy_s, recorded.makespan_s, idle_w)


def run_point(
    cfg: FleetConfig,
    label: str,
    rate: float,
    seed: int | str,
    mech: Mechanisms = ALL_MECHANISMS,
    standalone: StandaloneCache | None = None,
) -> PointRun:
    """Simulate one paper configuration (orchestrator.sim.paper.CONFIGS) at `rate` with the mechanisms of
    `mech`, router admission as the artifact, and both clocks. `seed` is an int (numpy Poisson arrivals, as
    orchestrator.sim.paper) or ``"paper"`` (the artifact's own arrival sequence). Pass a `standalone` cache
    (built with :func:`paper_standalone`) to share the normaliser between points."""
    if label not in CONFIGS:
        raise SimulationError(f"unknown configuration {label!r}; known: {', '.join(CONFIGS)}")
    policy_name, layout, popts = CONFIGS[label]
    wcfg = cfg.workload
    if wcfg.format != "conserve" or wcfg.path is None:
        raise SimulationError("the paper's points need the conserve trace workload (examples/paper-a40.yaml)")
    base = workload_from_config(wcfg)
    insts = build_instances(cfg, layout=layout)
    base_opts = replace(PAPER_SIM_OPTIONS, serving_step_overhead=mech.serving_overhead)
    emulate_ampd = policy_name == "per-turn" and mech.ampd_virtual_prefiller
    split = mech.split_energy_window and policy_name in ("conserve", "per-turn")
    records: list[RecordedTurn1] = []
    recorded: SimResult | None = None
    if mech.replay_arrivals or split or emulate_ampd:
        sends = send_times(base, recorded_rate(rate), seed)
        records, recorded = prefiller_only_run(cfg, base, sends, base_opts)
    if mech.replay_arrivals:
        arrivals = replay_offsets_s(records, REPLAY_POINT[policy_name])
    else:
        arrivals = send_times(base, rate, seed)
    convs = _with_arrivals(base, arrivals)
    opts = replace(base_opts, router_admission=True)
    if policy_name == "full-disagg" and mech.proxy_no_prefix_cache:
        opts = replace(opts, prefix_cache=False)
    popts = dict(popts)
    run_seed = seed if isinstance(seed, int) else 42
    delay: AmpdEmulation | None = None
    policy: Policy
    if emulate_ampd:
        policy = ArtifactAmpdPolicy()
        wrong = wrong_predicted_turns(
            [(c.conversation_id, len(c.turns)) for c in convs], mech.wrong_prediction_rate
        )
        kvb = insts[0].tier_model.model.kv_bytes_per_token
        delay = AmpdEmulation(records, convs, wrong, _compounds(Path(wcfg.path)), kvb)
    else:
        if policy_name == "per-turn":
            popts["seed"] = run_seed
            popts["mispredict_rate"] = mech.wrong_prediction_rate
        policy = make_policy(policy_name, **popts)
    res = run_simulation(
        insts,
        convs,
        policy,
        seed=run_seed,
        energy_window_s=None,
        options=opts,
        links=links_of(cfg),
        turn_delay=delay,
    )
    sa = standalone if standalone is not None else paper_standalone(cfg)
    slo = SloSpec.from_config(cfg.slo)
    idle = unallocated_idle_w(cfg, insts)
    window = None
    if split and recorded is not None:
        pre_idle_w = next(i.tier_model.idle_w for i in insts if i.role == Role.PREFILL)
        window = split_window_of(recorded, pre_idle_w)
    art = summarize(
        res, conversation_metrics(res, convs, sa, slo, Convention.ARTIFACT), Convention.ARTIFACT, idle, window
    )
    honest = conversation_metrics(res, convs, sa, slo, Convention.HONEST)
    hon = summarize(res, honest, Convention.HONEST, idle)
    return PointRun(
        label,
        rate,
        seed,
        res,
        tuple(convs),
        art,
        hon,
        waits_s=dict(delay.waits_s) if delay is not None else {},
        recorded=recorded,
    )


def paper_standalone(cfg: FleetConfig) -> StandaloneCache:
    """The normaliser: each conversation alone on an idle colocated reference A40 with the paper's engine
    settings (prefix caching on, as the artifact's baseline runs), never with injected waits."""
    return StandaloneCache(reference_tier_model(cfg), PAPER_SIM_OPTIONS)
