"""The paper's measured points, emulated with the artifact's harness around the unchanged simulator.

``orchestrator.artifact`` holds the pure pieces of the ConServe artifact's experiment harness; this module
runs them around the simulator, through its public API only, so each paper figure can be attributed to a
mechanism before anything is wired into the simulator itself (round 2 of issue 12 item 1; the wiring plan is
in docs/paper-reproduction.md, section "Fidelity to measurement"). A :class:`Mechanisms` value turns each
emulated mechanism on or off:

- ``replay_arrivals``: a prefiller-only run is simulated first (turn 1 of every conversation, 2 output
  tokens, through the prefiller at the *recorded* rate: 2.0 conv/s for the 1.634 label; proxy engines, so
  no prefix caching), and each policy's run replays its turn-1 prefill starts (colocated, full-disagg) or
  decode starts (conserve, per-turn) as arrivals, as the artifact did.
- ``proxy_no_prefix_cache``: full disaggregation with prefix caching off on every engine (the artifact
  launched the proxy path's engines with ``--no-enable-prefix-caching``). The standalone normaliser keeps
  the paper's colocated engine with prefix caching (the artifact's baseline runs used plain ``vllm serve``).
- ``ampd_virtual_prefiller``: the per-turn baseline as the artifact emulated it (:class:`ArtifactAmpdPolicy`:
  ConServe's own placement with the per-turn KV reservation; the decoder serves every turn itself, no real
  KV round trip and no migration), and each wrongly predicted turn (``random.Random(42)``, 10 %) first
  waits for the virtual prefiller's backlog plus the modelled wait of ``tiers.connector``; the waits are
  injected as pauses before those turns and found by fixed-point iteration (each wait depends on when the
  turn happens). The synthetic turn-1 queueing the blocks cause is added to the conversation's clock.
- ``split_energy_window``: conserve's and per-turn's energy = their decoders' energy + the prefiller's
  energy in the prefiller-only run (its own window), as ``s5_metrics.workload_energy`` measured it.

Latencies are simulated and energy is modelled (tier power model), never measured. Must not import fastapi,
sqlalchemy or httpx.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path

import numpy as np

from orchestrator.artifact import (
    REPLAY_POINT,
    RecordedTurn1,
    VirtualPrefiller,
    artifact_arrival_offsets_s,
    compound_prompt_tokens,
    recorded_rate,
    replay_offsets_s,
    split_window_energy_j,
    wrong_predicted_turns,
)
from orchestrator.config import FleetConfig
from orchestrator.errors import SimulationError
from orchestrator.fleet import InstanceSpec
from orchestrator.metrics import StandaloneCache
from orchestrator.sim.core import SimOptions, run_simulation
from orchestrator.sim.fleet import build_instances, links_of, reference_tier_model
from orchestrator.sim.paper import CONFIGS, PAPER_SIM_OPTIONS
from orchestrator.sim.result import SimResult
from orchestrator.workload import ConversationSpec, TurnSpec, load_conserve_trace, workload_from_config
from placement.base import Policy, Role
from placement.policies import ConservePolicy, make_policy
from tiers.connector import artifact_prefill_hit_s, wrong_predict_wait_s

# max_tokens of the prefiller-only run's single request (conversation.py run_conversation_prefiller)
PREFILLER_RUN_OUTPUT_TOKENS = 2
# fixed-point iteration of the AMPD pauses: stop when no pause moves by more than this
_PAUSE_TOLERANCE_S = 0.01
_PAUSE_ITERATIONS = 8

Runner = Callable[
    [Sequence[InstanceSpec], Sequence[ConversationSpec], Policy, int, SimOptions, Mapping[str, str]],
    SimResult,
]


def public_runner(
    instances: Sequence[InstanceSpec],
    conversations: Sequence[ConversationSpec],
    policy: Policy,
    seed: int,
    options: SimOptions,
    links: Mapping[str, str],
) -> SimResult:
    return run_simulation(
        instances, conversations, policy, seed=seed, energy_window_s=None, options=options, links=links
    )


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
    replay_arrivals: bool = False
    proxy_no_prefix_cache: bool = False
    ampd_virtual_prefiller: bool = False
    split_energy_window: bool = False
    wrong_prediction_rate: float = 0.10  # run_sweep.sh line 82


ALL_MECHANISMS = Mechanisms(True, True, True, True)


@dataclass(frozen=True, slots=True)
class PointRun:
    """One (configuration, rate, seed) run, with per-conversation slowdowns under both clocks."""

    label: str
    rate: float
    seed: int | str
    result: SimResult
    ttfet_artifact: np.ndarray  # slowdowns, in result.conversations order
    ttfet_honest: np.ndarray
    e2e_artifact: np.ndarray
    e2e_honest: np.ndarray
    tbt: np.ndarray  # last-turn mean TBT / standalone mean, per conversation
    standalone_tbt_s: dict[str, float]
    tokens_per_j: float
    pauses_s: dict[tuple[str, int], float] = field(default_factory=dict)

    def p95(self, name: str) -> float:
        return float(np.percentile(getattr(self, name), 95))

    def violation_pct(self, name: str, clock: str = "artifact", slo: float = 5.0) -> float:
        """Per-metric SLO violation share, as the paper's headline reports it (one column per metric)."""
        arr = self.tbt if name == "tbt" else getattr(self, f"{name}_{clock}")
        return float(100.0 * np.mean(arr > slo))

    def any_violation_pct(self, clock: str = "artifact", slo: float = 5.0) -> float:
        v = (getattr(self, f"ttfet_{clock}") > slo) | (getattr(self, f"e2e_{clock}") > slo) | (self.tbt > slo)
        return float(100.0 * np.mean(v))


@lru_cache(maxsize=4)
def _compounds(trace: Path) -> tuple[int, ...]:
    return compound_prompt_tokens(c.turns[0].appended_tokens for c in load_conserve_trace(trace))


def _with_arrivals(
    convs: Sequence[ConversationSpec], arrivals: Mapping[str, float]
) -> list[ConversationSpec]:
    return [replace(c, arrival_s=float(arrivals[c.conversation_id])) for c in convs]


def _send_times(convs: Sequence[ConversationSpec], rate: float, seed: int | str) -> dict[str, float]:
    """Poisson sends: the artifact's own sequence (``seed="paper"``: random.Random(42)) or numpy's (int)."""
    if seed == "paper":
        offs = artifact_arrival_offsets_s(len(convs), rate)
    else:
        rng = np.random.default_rng(int(seed))
        gaps = rng.exponential(1.0 / rate, len(convs))
        offs = list(np.concatenate(([0.0], np.cumsum(gaps[1:])))) if len(convs) else []
    return {c.conversation_id: float(t) for c, t in zip(convs, offs, strict=True)}


def prefiller_only_run(
    cfg: FleetConfig, convs: Sequence[ConversationSpec], sends: Mapping[str, float], runner: Runner
) -> tuple[list[RecordedTurn1], SimResult]:
    """The artifact's ``adaptive_disagg_prefiller`` run: every conversation's turn 1 only (2 output tokens)
    through the prefiller and a decoder, no router admission, proxy engines without prefix caching."""
    insts = build_instances(cfg, layout=CONFIGS["conserve"][1])
    one = [
        ConversationSpec(c.conversation_id, sends[c.conversation_id],
                         (TurnSpec(c.turns[0].appended_tokens, PREFILLER_RUN_OUTPUT_TOKENS),))
        for c in convs
    ]
    opts = replace(PAPER_SIM_OPTIONS, router_admission=False, prefix_cache=False)
    res = runner(insts, one, make_policy("conserve"), 0, opts, links_of(cfg))
    recs = [
        RecordedTurn1(t.conversation_id, t.arrival_s, t.prefill_start_s, t.first_token_s, t.last_token_s)
        for t in res.turns
    ]
    return recs, res


def _ampd_pauses(
    res: SimResult,
    convs: Sequence[ConversationSpec],
    wrong: frozenset[tuple[str, int]],
    compounds: tuple[int, ...],
    records: Sequence[RecordedTurn1],
    kv_bytes_per_token: int,
) -> tuple[dict[tuple[str, int], float], dict[str, float]]:
    """Each wrong turn's pause (virtual prefiller queue + modelled wait), queried in time order at the end
    of the turn before it, as the artifact's clients did; and the turn-1 shifts the blocks caused."""
    index = {c.conversation_id: k for k, c in enumerate(convs)}
    ends = {(t.conversation_id, t.turn): t.last_token_s for t in res.turns}
    vp = VirtualPrefiller(records)
    pauses: dict[tuple[str, int], float] = {}
    for cid, turn in sorted(wrong, key=lambda w: (ends[(w[0], w[1] - 1)], w)):
        conv = convs[index[cid]]
        # conversation.py line 408: the history starts from the whole compound prompt, then grows by every
        # earlier turn's appended tokens + output
        hist = compounds[index[cid] % len(compounds)] + sum(
            t.appended_tokens + t.output_tokens for t in conv.turns[: turn - 1]
        )
        new = conv.turns[turn - 1].appended_tokens
        queue = vp.query_and_block(ends[(cid, turn - 1)], artifact_prefill_hit_s(hist + new))
        pauses[(cid, turn)] = queue + wrong_predict_wait_s(hist, new, kv_bytes_per_token)
    return pauses, vp.turn1_shift_s()


def _with_pauses(
    convs: Sequence[ConversationSpec], pauses: Mapping[tuple[str, int], float]
) -> list[ConversationSpec]:
    out = []
    for c in convs:
        turns = tuple(
            replace(t, tool_gap_s=t.tool_gap_s + pauses.get((c.conversation_id, k), 0.0))
            for k, t in enumerate(c.turns, start=1)
        )
        out.append(replace(c, turns=turns))
    return out


def run_point(
    cfg: FleetConfig,
    label: str,
    rate: float,
    seed: int | str,
    mech: Mechanisms = ALL_MECHANISMS,
    runner: Runner = public_runner,
    standalone: StandaloneCache | None = None,
) -> PointRun:
    """Simulate one paper configuration (orchestrator.sim.paper.CONFIGS) at `rate` with the emulated
    mechanisms of `mech`, router admission as the artifact, and both clocks. `seed` is an int (numpy
    Poisson arrivals, as orchestrator.sim.paper) or ``"paper"`` (the artifact's own arrival sequence).
    Pass a `standalone` cache (built with :func:`paper_standalone`) to share the normaliser between points."""
    if label not in CONFIGS:
        raise SimulationError(f"unknown configuration {label!r}; known: {', '.join(CONFIGS)}")
    policy_name, layout, popts = CONFIGS[label]
    wcfg = cfg.workload
    if wcfg.format != "conserve" or wcfg.path is None:
        raise SimulationError("the paper's points need the conserve trace workload (examples/paper-a40.yaml)")
    base = workload_from_config(wcfg)
    insts = build_instances(cfg, layout=layout)
    links = links_of(cfg)
    need_recording = mech.replay_arrivals or (
        mech.split_energy_window and policy_name in ("conserve", "per-turn")
    ) or (mech.ampd_virtual_prefiller and policy_name == "per-turn")
    records: list[RecordedTurn1] = []
    pre_res: SimResult | None = None
    if need_recording:
        records, pre_res = prefiller_only_run(
            cfg, base, _send_times(base, recorded_rate(rate), seed), runner
        )
    if mech.replay_arrivals:
        arrivals = replay_offsets_s(records, REPLAY_POINT[policy_name])
    else:
        arrivals = _send_times(base, rate, seed)
    convs = _with_arrivals(base, arrivals)
    opts = replace(PAPER_SIM_OPTIONS, router_admission=True)
    if policy_name == "full-disagg" and mech.proxy_no_prefix_cache:
        opts = replace(opts, prefix_cache=False)
    popts = dict(popts)
    run_seed = seed if isinstance(seed, int) else 42
    emulate_ampd = policy_name == "per-turn" and mech.ampd_virtual_prefiller
    if policy_name == "per-turn":
        popts["seed"] = run_seed
        popts["mispredict_rate"] = mech.wrong_prediction_rate

    def policy() -> Policy:
        return ArtifactAmpdPolicy() if emulate_ampd else make_policy(policy_name, **popts)

    pauses: dict[tuple[str, int], float] = {}
    shift: dict[str, float] = {}
    res = runner(insts, convs, policy(), run_seed, opts, links)
    if emulate_ampd:
        wrong = wrong_predicted_turns(
            [(c.conversation_id, len(c.turns)) for c in convs], mech.wrong_prediction_rate
        )
        compounds = _compounds(Path(wcfg.path))
        kvb = insts[0].tier_model.model.kv_bytes_per_token
        for _ in range(_PAUSE_ITERATIONS):
            new, shift = _ampd_pauses(res, convs, wrong, compounds, records, kvb)
            moved = max((abs(new[k] - pauses.get(k, 0.0)) for k in new), default=0.0)
            pauses = new
            res = runner(insts, _with_pauses(convs, pauses), policy(), run_seed, opts, links)
            if moved < _PAUSE_TOLERANCE_S:
                break
    sa = standalone if standalone is not None else paper_standalone(cfg)
    return _point(label, rate, seed, res, convs, shift, pauses, mech, pre_res, sa, insts)


def paper_standalone(cfg: FleetConfig) -> StandaloneCache:
    """The normaliser: each conversation alone on an idle colocated reference A40 with the paper's engine
    settings (prefix caching on, as the artifact's baseline runs), never with injected pauses."""
    return StandaloneCache(reference_tier_model(cfg), PAPER_SIM_OPTIONS)


def _point(
    label: str,
    rate: float,
    seed: int | str,
    res: SimResult,
    convs: Sequence[ConversationSpec],
    shift: Mapping[str, float],
    pauses: dict[tuple[str, int], float],
    mech: Mechanisms,
    pre_res: SimResult | None,
    sa: StandaloneCache,
    insts: Sequence[InstanceSpec],
) -> PointRun:
    spec = {c.conversation_id: c for c in convs}
    rows = []
    for c in res.conversations:
        alone = sa.get(spec[c.conversation_id])
        extra = shift.get(c.conversation_id, 0.0)
        rows.append((
            (c.ttfet_admission_s + extra) / alone.ttfet_s,
            (c.ttfet_s + extra) / alone.ttfet_s,
            (c.e2e_admission_s + extra) / alone.e2e_s,
            (c.e2e_s + extra) / alone.e2e_s,
            c.last_turn_tbt_mean_s / alone.tbt_mean_s if alone.tbt_mean_s > 0 else math.nan,
        ))
    arr = np.asarray(rows, dtype=float)
    policy_name = CONFIGS[label][0]
    energy = res.energy_j
    if mech.split_energy_window and policy_name in ("conserve", "per-turn") and pre_res is not None:
        dec = sum(i.energy_j for i in res.instances if i.role != str(Role.PREFILL))
        pre = next(i for i in pre_res.instances if i.role == str(Role.PREFILL))
        idle_w = next(i.tier_model.idle_w for i in insts if i.role == Role.PREFILL)
        energy = split_window_energy_j(
            dec, pre.energy_j - pre.idle_energy_j, pre.busy_s, pre_res.makespan_s, idle_w
        )
    return PointRun(
        label, rate, seed, res,
        ttfet_artifact=arr[:, 0], ttfet_honest=arr[:, 1], e2e_artifact=arr[:, 2], e2e_honest=arr[:, 3],
        tbt=arr[:, 4],
        standalone_tbt_s={c.conversation_id: sa.get(spec[c.conversation_id]).tbt_mean_s for c in convs},
        tokens_per_j=res.tokens / energy if energy > 0 else 0.0,
        pauses_s=pauses,
    )
