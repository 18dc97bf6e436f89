"""Discrete-event simulator of a serving fleet in virtual time, driving the same policy objects as the router.

Model (DESIGN.md section 6), per engine instance, vLLM-like:
- Continuous batching with chunked prefill: each step decodes one token for every running decode sequence and
  spends the rest of a token budget (``max_batched_tokens``) on prefill chunks, first come first served;
  at most ``max_seqs`` sequences run at once. The step time is the tier model's ``step_time_s``.
- KV capacity and admission: a sequence is admitted (FCFS, head-of-line) only when its whole footprint
  (prompt + output tokens, block-rounded) fits next to the admitted ones after evicting unpinned prefix-cache
  entries; otherwise it waits. Nothing is dropped and nothing is preempted. (vLLM allocates blocks lazily and
  preempts on overflow; reserving the footprint avoids modelling recomputation: a documented simplification.)
- Prefix cache: when a turn ends its KV (prompt + output) stays cached on its instance, unpinned, evicted LRU
  (whole or trimmed entries) only when an admission needs the room. A later turn of the same conversation hits
  it at block granularity (at least one token is always recomputed, as vLLM does).
- Disaggregated prefill: the prefiller computes the prompt (from its own prefix cache where it can), then the
  decoder allocates the KV (admission), the KV not already cached on the decoder is transferred over the link
  (``tiers.links.kv_transfer_time_s``; transfers do not contend) and the prefiller frees its copy, which stays
  in its prefix cache. The decoder emits the first token at its next step.
- Energy: each step draws ``step_power_w`` (prefill or decode phase) for its duration; an instance with no
  step running draws ``idle_w``. Every instance is billed until the last conversation ends (makespan).

Speed: between events that change an instance's batch (a sequence finishing, one joining, a prefill chunk),
decode steps differ only by context growth (one token per sequence per step), so a whole stretch of n steps is
scheduled as one event with the closed-form sum n*A + D*n(n-1)/2 (A = first step, D = per-step growth,
linear in context as the tier model is). An event that reaches a busy instance truncates its stretch to the
step in progress. Per-sequence progress is implicit: a decoding sequence knows the instance step at which it
emits its first and its last token, so committing a stretch costs O(log batch), never O(batch) or O(tokens).

Observables for the policies (``FleetView``) are refreshed whenever an instance's batch composition changes,
like a metrics scrape; they never include a sequence's future (its output length). Views, pins, the meaning
of every Placement field, admission reservations and the per-conversation summary come from the driver core
(orchestrator/core/), shared with the live router: KV used is the larger of the resident KV and the driver's
own accounting (its pinned conversations' tokens, its reservations), capped at capacity.

Nothing here reads the wall clock except ``wall_s`` in the result (run time, for benchmarks). No module or
class state: every run builds its own objects.

Layout (split along responsibilities, issue 11 item 6): options.py (SimOptions and the protocols), instance.py
(the instance model), base.py (shared state, event queue), placing.py (arrivals, admission, placement, pins),
steps.py (batching, steps, hand-offs, failures), collect.py (records, TBT, energy), this module (the event
loop and :func:`run_simulation`). ``orchestrator.sim.core`` re-exports the public names.
"""

from __future__ import annotations

import gc
import heapq
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from orchestrator.core import AdmissionRule, PinBook, PinState, rule_for
from orchestrator.errors import SimulationError
from orchestrator.sim.base import _ARRIVE, _FAIL, _GAP, _POWER, _PULL, _REFUSE, _RESUME, _STEP, _XFER
from orchestrator.sim.clock import VirtualClock
from orchestrator.sim.collect import Collecting
from orchestrator.sim.gaps import GapRule
from orchestrator.sim.instance import _Instance, _TurnState
from orchestrator.sim.options import InstanceLike, SimOptions, TurnDelay
from orchestrator.sim.placing import Placing
from orchestrator.sim.result import Decision, Feedback, SimResult
from orchestrator.sim.steps import Stepping
from orchestrator.workload import ConversationSpec
from placement.base import InstanceView, Placement, Policy
from tiers.perf import TierModel


class _Sim(Placing, Stepping, GapRule, Collecting):
    def __init__(
        self,
        instances: Sequence[InstanceLike],
        conversations: Sequence[ConversationSpec],
        policy: Policy,
        seed: int,
        opts: SimOptions,
        links: Mapping[str, str] | None,
        failures: Sequence[tuple[str, float]],
        progress: Callable[[int, int], None] | None,
        turn_delay: TurnDelay | None = None,
    ) -> None:
        if not instances:
            raise SimulationError("no instances to simulate. To fix: give the fleet at least one instance.")
        ids = [i.instance_id for i in instances]
        if len(set(ids)) != len(ids):
            raise SimulationError(f"instance ids must be unique, got {ids}")
        cids = [c.conversation_id for c in conversations]
        if len(set(cids)) != len(cids):
            raise SimulationError("conversation ids must be unique. To fix: deduplicate the workload.")
        for c in conversations:
            if not c.turns:
                raise SimulationError(f"conversation {c.conversation_id!r} has no turns")
            if not math.isfinite(c.arrival_s) or c.arrival_s < 0:
                raise SimulationError(f"conversation {c.conversation_id!r}: arrival_s must be >= 0")
        self.opts = opts
        self.turn_delay = turn_delay
        self.insts = [
            _Instance(k, s, opts, (links or {}).get(s.tier, "pcie")) for k, s in enumerate(instances)
        ]
        self.by_id = {inst.id: inst for inst in self.insts}
        self.convs = list(conversations)
        self.policy = policy
        self.seed = seed
        self.clock = VirtualClock()
        self.heap: list[tuple[float, int, int, Any, Any]] = []
        self.order = 0
        self.calls = 0
        self.key = 0
        # pins and the tokens counted on them (orchestrator.core.PinBook; book.pins is FleetView.pins)
        self.book = PinBook(self.by_id)
        self.pins = self.book.pins
        self.pin_state = [PinState(c.conversation_id) for c in self.convs]
        self.decisions: list[Decision] = []
        self.feedback: list[Feedback] = []
        self.turn_states: list[list[_TurnState]] = [[] for _ in self.convs]
        self.inputs: list[list[int]] = []
        for c in self.convs:
            if c.turns[0].appended_tokens < 1:
                raise SimulationError(
                    f"conversation {c.conversation_id!r}: turn 1 needs a prompt of >= 1 token"
                )
            acc, ins = 0, []
            for k, t in enumerate(c.turns):
                acc += t.appended_tokens
                ins.append(acc)
                acc += t.output_tokens
                if t.output_tokens < 1:
                    raise SimulationError(
                        f"conversation {c.conversation_id!r} turn {k + 1}: output_tokens must be >= 1"
                    )
            self.inputs.append(ins)
        self.done = 0
        self.progress = progress
        self.events = 0
        self.kv_transfers = 0
        self.kv_transfer_bytes = 0
        self.views: list[InstanceView] = [i.make_view() for i in self.insts]
        # router-side KV admission (orchestrator.sim.admission); None: conversations are placed on arrival
        self.rule: AdmissionRule = rule_for(policy.name)
        self.admission = opts.router_admission
        self.admitted_s = [math.nan] * len(self.convs)
        self.adm_dec: list[tuple[int, int] | None] = [None] * len(self.convs)  # (instance, tokens) held
        self.adm_pre: list[tuple[int, int] | None] = [None] * len(self.convs)
        self.adm_waiting: list[_TurnState] = []  # turns waiting for room, in arrival order
        self.adm_parked: list[tuple[_TurnState, Placement]] = []  # placed; the chosen engine has no room yet
        self.adm_parked_count = 0
        self.refused: list[int] = []
        if self.admission:
            caps = [i.cap for i in self.insts if i.role.can_decode]
            for ci, c in enumerate(self.convs):
                need = max(self._adm_need(ci, k + 1)[0] for k in range(len(c.turns)))
                if caps and need > max(caps):
                    raise SimulationError(
                        f"conversation {c.conversation_id!r} needs a router-side KV reservation of {need} "
                        f"tokens but the largest decode-capable instance holds {max(caps)}; it would wait "
                        "forever. To fix: cap the turns (--max-turns) or turn router admission off."
                    )
        for inst_id, fail_s in failures:
            if inst_id not in self.by_id:
                raise SimulationError(f"failure names unknown instance {inst_id!r}; instances: {ids}")
            self._push(fail_s, _FAIL, self.by_id[inst_id], None)
        for ci, c in enumerate(self.convs):
            self._push(c.arrival_s, _ARRIVE, ci, 1)
        self._gap_init()  # SimOptions.kv_gap_rule (orchestrator.sim.gaps)
        self.power = None  # the power controller's driver (SimOptions.power_controller)
        if opts.power_controller is not None:
            from orchestrator.sim.power import SimPowerDriver

            self.power = SimPowerDriver(opts.power_controller, self.insts)
            self._push(opts.power_controller.interval_s, _POWER, None, None)

    def run(self) -> None:
        heap = self.heap
        clock = self.clock
        while heap:
            t, _, kind, a, b = heapq.heappop(heap)
            clock.advance_to(t)
            self.events += 1
            if kind == _STEP:
                if a.healthy and b == a.version:
                    self._commit(a, t)
                    self._plan(a, t)
            elif kind == _ARRIVE:
                self._arrive(a, b, t)
            elif kind == _XFER:
                self._xfer_done(a, t)
            elif kind == _PULL:
                self._pull_done(a, b, t)
            elif kind == _RESUME:
                self._arrive(a.conv, a.turn, t, a, resumed=True)
            elif kind == _REFUSE:
                self._refuse(a, t)
            elif kind == _GAP:
                self._gap_check(a, b, t)
            elif kind == _POWER:
                self.power.step(self, t)
                if self.done < len(self.convs):
                    self._push(t + self.opts.power_controller.interval_s, _POWER, None, None)
            else:
                self._fail(a, t)
        if self.done != len(self.convs):
            stuck = [
                c.conversation_id
                for ci, c in enumerate(self.convs)
                if not self.turn_states[ci]
                or math.isnan(self.turn_states[ci][-1].last_token_s)
                or len(self.turn_states[ci]) < len(c.turns)
            ]
            raise SimulationError(
                f"{len(stuck)} conversation(s) never finished (e.g. {stuck[:3]}): the fleet cannot hold them "
                "(KV capacity) or every instance that could serve them failed. To fix: add decoders or "
                "reduce the per-conversation context."
            )


def run_simulation(
    instances: Sequence[InstanceLike],
    conversations: Sequence[ConversationSpec],
    policy: Policy,
    *,
    seed: int = 0,
    energy_window_s: float | None = 1.0,
    options: SimOptions | None = None,
    links: Mapping[str, str] | None = None,
    failures: Sequence[tuple[str, float]] = (),
    progress: Callable[[int, int], None] | None = None,
    reference_tier_model: TierModel | None = None,
    slo: Any = None,
    turn_delay: TurnDelay | None = None,
) -> SimResult:
    """Simulate `conversations` on `instances` under `policy`; deterministic for the same inputs and seed.

    `links` maps a tier label to its link type (tiers.links; default pcie). `failures` lists (instance_id,
    time_s) at which an instance stops; its conversations are re-placed. `seed` is recorded (the simulator
    itself draws no random numbers; seeded randomness lives in the workload and in policies' options).
    With `reference_tier_model`, the result also carries per-conversation metrics and their summary
    (orchestrator.metrics: slowdowns against each conversation alone on an idle instance of that tier, SLO
    `slo` -- an orchestrator.metrics.SloSpec, default slowdown 5). `turn_delay` inserts a wait before later
    turns are placed (an emulated client-side delay; :class:`TurnDelay`).
    """
    sim = _Sim(
        instances, conversations, policy, seed, options or SimOptions(), links, failures, progress, turn_delay
    )
    w0 = time.perf_counter()
    # The run allocates millions of small objects that all stay alive until the end; the cyclic garbage
    # collector would rescan them over and over (a 2-3x slowdown) without ever freeing any.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        sim.run()
        if sim.power is not None:
            sim.power.finish()
        wall = time.perf_counter() - w0
        res = sim.result(wall, energy_window_s)
    finally:
        if gc_was_enabled:
            gc.enable()
    if reference_tier_model is None:
        return res
    from orchestrator import metrics as m  # imported here: metrics itself runs the simulator
    from orchestrator.sim.standalone import StandaloneCache

    sa = StandaloneCache(reference_tier_model, sim.opts)
    mets = m.conversation_metrics(res, conversations, sa, slo if slo is not None else m.SloSpec())
    return replace(res, metrics=tuple(mets), summary=m.summarize(res, mets))
