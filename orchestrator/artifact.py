"""The ConServe paper's experiment harness, emulated: what its measured numbers went through besides policy.

Read from the artifact (github eicchen/conserve, commit 4ab277d; file:line references below) for issue 12
item 1. Nothing here is a serving policy: these are the arrival replay, the AMPD emulation's virtual
prefiller and the measurement conventions of the paper's section-5 runs, so the simulator can offer them as
options and reproduce the paper's figures, and docs/paper-reproduction.md can say which figure came from
which of them.

- **Arrivals are replayed from a prefiller-only run.** The sweep first runs ``adaptive_disagg_prefiller``
  (Poisson arrivals from one global ``random.seed(42)``, ``conserve/src/scheduler.py`` lines 8 and 142-144),
  then extracts each conversation's turn-1 prefill start and decode start from that run's engine logs
  (``conserve/common/extract_arrival_traces.py`` lines 67-98) and replays them: the prefill starts for
  colocated and full disaggregation, the decode starts for ConServe and the per-turn baseline
  (``conserve/run_sweep.sh`` lines 149-178). The rate labelled 1.634 conv/s replays the run at 2 conv/s
  (``run_sweep.sh`` line 152, ``rerun_cell.sh`` line 93, ``s5_metrics.py`` line 199), whose prefiller was
  over-saturated (``s5_metrics.py`` lines 449-452): 1.634 is the rate its prefiller got through, and every
  replay at "1.634" sees arrivals paced by that prefiller. :func:`artifact_arrival_offsets_s`,
  :func:`recorded_rate`, :func:`replay_offsets_s`.
- **The per-turn baseline's wrong predictions wait for a virtual prefiller** seeded from that recorded run
  (``conserve/src/virtual_prefiller.py``): a wrongly predicted turn waits until every recorded turn-1
  request that is in flight at that moment has finished, where "in flight" spans the client's send to the
  response (``per_step_latency.csv`` start/end, ``virtual_prefiller.py`` lines 73-103 and 127-151), i.e.
  the recorded prefiller's whole backlog. At 1.634 that is the backlog of the over-saturated 2 conv/s run.
  :class:`VirtualPrefiller`.
- **Which turns are wrong** is drawn once per run from ``random.Random(42)`` over (conversation, turn >= 2)
  in conversation order (``scheduler.py`` lines 364-374). :func:`wrong_predicted_turns`.
- **The history a wrong prediction ships** starts from the whole pre-warmed compound prompt
  (``conversation.py`` line 408: ``cumulative_tokens = len(compound_tokens)``); the compounds concatenate
  the trace's longest turn-1 prompts until each holds >= 25,000 tokens (``prepare_compound_prompts.py``
  lines 21-54) and conversation k uses compound k % 4 (``scheduler.py`` lines 25, 285).
  :func:`compound_prompt_tokens`.
- **Last-turn TBT is pooled per token**: the paper's "Last-turn TBT" statistic is taken over every
  inter-token gap of every conversation's last turn, each divided by that conversation's standalone mean
  last-turn TBT (``s5_metrics.py`` lines 587-599, ``plot_headline.py`` line 59); its SLO violation is per
  conversation on the mean gap (``plot_headline.py`` lines 65-71). :func:`pooled_token_slowdowns`.
- **ConServe's and the per-turn baseline's energy** is the decoders' energy over their own run plus the
  prefiller GPU's energy over the *recorded prefiller run's* window (``s5_metrics.py`` lines 376-404), not
  over the decoders' run. :func:`split_window_energy_j`.

Pure (no I/O, no clock); :class:`VirtualPrefiller` holds the emulation's state as the artifact's does.
Must not import fastapi, sqlalchemy or httpx.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

import numpy as np

from orchestrator.errors import WorkloadError
from orchestrator.workload import ConversationSpec
from tiers.connector import artifact_prefill_hit_s, wrong_predict_wait_s

# scheduler.py line 8: random.seed(42) at import; every Poisson draw of the sweep comes from it
ARTIFACT_ARRIVAL_SEED = 42
# scheduler.py line 366: --wrong-pred-seed default 42 (run_sweep.sh line 83, rerun_cell.sh line 83)
WRONG_PREDICTION_SEED = 42
# run_sweep.sh line 82: AMPD's wrong-predict rate in the paper's runs
PAPER_WRONG_PREDICTION_RATE = 0.10
# prepare_compound_prompts.py lines 21-22 and scheduler.py line 25: 4 compounds of >= 25,000 tokens in use
COMPOUND_TARGET_TOKENS = 25_000
COMPOUNDS_IN_USE = 4
# the labelled rate -> the rate of the recorded prefiller run it replays (run_sweep.sh line 152)
_REPLAYED_RATE: dict[float, float] = {1.634: 2.0}


class ReplayPoint(StrEnum):
    """Which recorded turn-1 event a replay uses as the conversation's arrival (run_sweep.sh 164-171)."""

    PREFILL_START = "prefill-start"  # the prefiller's first execution: colocated, full disaggregation
    DECODE_START = "decode-start"  # the decoder's first execution: ConServe, per-turn


# policy name (placement.policies) -> the replay point of the artifact run that measured it
REPLAY_POINT: dict[str, ReplayPoint] = {
    "colocated": ReplayPoint.PREFILL_START,
    "full-disagg": ReplayPoint.PREFILL_START,
    "conserve": ReplayPoint.DECODE_START,
    "per-turn": ReplayPoint.DECODE_START,
}


def recorded_rate(rate_per_s: float) -> float:
    """The offered rate of the prefiller-only run that the artifact replayed for `rate_per_s`."""
    for labelled, replayed in _REPLAYED_RATE.items():
        if abs(rate_per_s - labelled) < 1e-9:
            return replayed
    return rate_per_s


def artifact_arrival_offsets_s(n: int, rate_per_s: float, seed: int = ARTIFACT_ARRIVAL_SEED) -> list[float]:
    """The artifact's Poisson arrivals: conversation k is sent after k draws of ``expovariate(rate)`` from
    ``random.Random(seed)`` (scheduler.py lines 142-144; the first at 0). With seed 42 this is the paper's
    own arrival sequence (one per rate, the same uniforms scaled by 1/rate)."""
    if n < 0:
        raise WorkloadError(f"n must be >= 0, got {n}")
    if not rate_per_s > 0:
        raise WorkloadError(f"rate_per_s must be > 0, got {rate_per_s}. To fix: pass a rate > 0.")
    rng = random.Random(seed)
    out: list[float] = []
    t = 0.0
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate_per_s)
    return out


@dataclass(frozen=True, slots=True)
class RecordedTurn1:
    """One conversation's turn 1 in the recorded prefiller-only run (times in seconds, any origin)."""

    conversation_id: str
    send_s: float  # the client sent it (the Poisson arrival): per_step_latency.csv start_time
    prefill_start_s: float  # the prefiller's first step with it (core log first execution)
    decode_start_s: float  # the decoder's first step with it (the KV arrived)
    end_s: float  # the client got the response (per_step_latency.csv end_time)

    def __post_init__(self) -> None:
        if not self.send_s <= self.prefill_start_s <= self.decode_start_s <= self.end_s:
            raise WorkloadError(
                f"recorded turn 1 of {self.conversation_id!r} is out of order: send {self.send_s}, prefill "
                f"start {self.prefill_start_s}, decode start {self.decode_start_s}, end {self.end_s}"
            )


def replay_offsets_s(records: Iterable[RecordedTurn1], point: ReplayPoint) -> dict[str, float]:
    """Arrival offsets of the replay: the recorded event, minus the earliest one (so the first is at 0),
    as extract_arrival_traces.py lines 84-98 writes them."""
    recs = list(records)
    if not recs:
        return {}
    key = "prefill_start_s" if point is ReplayPoint.PREFILL_START else "decode_start_s"
    t0 = min(getattr(r, key) for r in recs)
    return {r.conversation_id: getattr(r, key) - t0 for r in recs}


class VirtualPrefiller:
    """The per-turn baseline's virtual prefiller (virtual_prefiller.py), from a recorded prefiller run.

    Each recorded turn 1 occupies ``[send, send + latency)`` relative to the first send, where latency is
    the client-observed one (queue + prefill + hand-off + the decoder's token). A wrong prediction at replay
    time ``t`` waits until the latest end among the recorded requests in flight at ``t`` (their starts pushed
    past earlier blocks) and then blocks the prefiller for ``block_s``; a recorded start that falls inside a
    block moves to the block's end. Replay time 0 is the first conversation reaching a decoder, which the
    artifact aligns with the recorded run's first send (virtual_prefiller.py lines 63-71).
    """

    def __init__(self, records: Iterable[RecordedTurn1]) -> None:
        recs = sorted(records, key=lambda r: r.send_s)
        if not recs:
            raise WorkloadError("a virtual prefiller needs at least one recorded turn 1")
        t_ref = recs[0].send_s
        self._events: list[tuple[str, float, float]] = [
            (r.conversation_id, r.send_s - t_ref, r.end_s - r.send_s) for r in recs
        ]
        self._blocks: list[tuple[float, float]] = []

    @property
    def blocks(self) -> tuple[tuple[float, float], ...]:
        return tuple(self._blocks)

    def _effective_start(self, start: float) -> float:
        result = start
        moved = True
        while moved:
            moved = False
            for b_start, b_end in self._blocks:
                if b_start > result:
                    break
                if b_start <= result < b_end:
                    result = b_end
                    moved = True
                    break
        return result

    def busy_until_s(self, t: float) -> float:
        """The latest end among recorded requests in flight at replay time `t` (`t` when none is)."""
        busy = t
        for _, start, dur in self._events:
            eff = self._effective_start(start)
            if eff <= t < eff + dur and eff + dur > busy:
                busy = eff + dur
        return busy

    def query_and_block(self, t: float, block_s: float) -> float:
        """A wrong prediction at replay time `t`: its queueing delay (s); blocks the prefiller after it."""
        if block_s < 0:
            raise WorkloadError(f"block_s must be >= 0, got {block_s}")
        start = self.busy_until_s(t)
        bisect.insort(self._blocks, (start, start + block_s))
        return start - t

    def turn1_shift_s(self) -> dict[str, float]:
        """Extra turn-1 queueing the blocks caused each recorded conversation: the synthetic trace's start
        minus the recorded one, each relative to its own earliest start (s5_metrics.py lines 227-244)."""
        orig = [start for _, start, _ in self._events]
        syn = [self._effective_start(s) for s in orig]
        o0, s0 = min(orig), min(syn)
        return {cid: (s - s0) - (o - o0) for (cid, _, _), o, s in zip(self._events, orig, syn, strict=True)}


class AmpdEmulation:
    """The per-turn baseline's client-side waits as the artifact emulated them, as a simulator turn delay
    (``orchestrator.sim.core.TurnDelay``): a wrongly predicted turn (:func:`wrong_predicted_turns`), issued at
    replay time ``t``, sleeps for the virtual prefiller's queue (:meth:`VirtualPrefiller.query_and_block`,
    blocking it for the artifact's prefix-hit prefill of history + new) plus the modelled wait
    (``tiers.connector.wrong_predict_wait_s``) before its request is sent (conversation.py lines 430-446);
    its history starts from the conversation's compound prompt (:func:`compound_prompt_tokens`). After the
    run each conversation's clock also carries the turn-1 queueing the blocks caused
    (:meth:`VirtualPrefiller.turn1_shift_s`, s5_metrics.py lines 227-244). Replay time 0 is the simulation's
    time 0 (the first replayed arrival). Records every wait it imposed in :attr:`waits_s`."""

    def __init__(
        self,
        records: Iterable[RecordedTurn1],
        conversations: Sequence[ConversationSpec],
        wrong: frozenset[tuple[str, int]],
        compounds: Sequence[int],
        kv_bytes_per_token: int,
    ) -> None:
        if not compounds:
            raise WorkloadError("the AMPD emulation needs at least one compound prompt size")
        self.prefiller = VirtualPrefiller(records)
        self._convs = {c.conversation_id: (k, c) for k, c in enumerate(conversations)}
        self._wrong = wrong
        self._compounds = tuple(compounds)
        self._kvb = kv_bytes_per_token
        self.waits_s: dict[tuple[str, int], float] = {}
        self._shift: dict[str, float] | None = None

    def delay_s(self, conversation_id: str, turn: int, t: float) -> float:
        if (conversation_id, turn) not in self._wrong:
            return 0.0
        k, conv = self._convs[conversation_id]
        # conversation.py line 408: the history starts from the whole compound prompt, then grows by every
        # earlier turn's appended tokens + output
        hist = self._compounds[k % len(self._compounds)] + sum(
            x.appended_tokens + x.output_tokens for x in conv.turns[: turn - 1]
        )
        new = conv.turns[turn - 1].appended_tokens
        queue = self.prefiller.query_and_block(t, artifact_prefill_hit_s(hist + new))
        wait = queue + wrong_predict_wait_s(hist, new, self._kvb)
        self.waits_s[(conversation_id, turn)] = wait
        self._shift = None
        return wait

    def conversation_offset_s(self, conversation_id: str) -> float:
        if self._shift is None:
            self._shift = self.prefiller.turn1_shift_s()
        return self._shift.get(conversation_id, 0.0)


def wrong_predicted_turns(
    turns_per_conversation: Sequence[tuple[str, int]],
    rate: float = PAPER_WRONG_PREDICTION_RATE,
    seed: int = WRONG_PREDICTION_SEED,
) -> frozenset[tuple[str, int]]:
    """(conversation_id, 1-based turn) pairs the AMPD emulation predicts wrongly: one ``random()`` draw per
    turn >= 2 in conversation order, wrong when below `rate` (scheduler.py lines 364-374)."""
    if not 0.0 <= rate <= 1.0:
        raise WorkloadError(f"rate must be in [0, 1], got {rate}. To fix: e.g. 0.1.")
    rng = random.Random(seed)
    out: set[tuple[str, int]] = set()
    for cid, n_turns in turns_per_conversation:
        for turn in range(2, n_turns + 1):
            if rng.random() < rate:
                out.add((cid, turn))
    return frozenset(out)


def compound_prompt_tokens(
    turn1_prompt_tokens: Iterable[int],
    target_tokens: int = COMPOUND_TARGET_TOKENS,
    compounds: int = COMPOUNDS_IN_USE,
) -> tuple[int, ...]:
    """Token lengths of the pre-warmed compound prompts: the trace's turn-1 prompts, longest first, each
    used once, concatenated until a compound reaches `target_tokens` (prepare_compound_prompts.py 29-54;
    the artifact estimates a compound's length as the sum of its parts, line 49)."""
    sizes = sorted((int(x) for x in turn1_prompt_tokens), reverse=True)
    out: list[int] = []
    cursor = 0
    for k in range(compounds):
        total = 0
        while total < target_tokens and cursor < len(sizes):
            total += sizes[cursor]
            cursor += 1
        if total < target_tokens:
            raise WorkloadError(
                f"ran out of turn-1 prompts for compound {k}: {total} < {target_tokens} tokens. To fix: "
                "use the whole trace (the artifact builds the compounds from all of its conversations)."
            )
        out.append(total)
    return tuple(out)


def pooled_token_slowdowns(
    last_turn_gaps_s: Mapping[str, Sequence[float] | np.ndarray], standalone_mean_tbt_s: Mapping[str, float]
) -> np.ndarray:
    """Every last-turn inter-token gap divided by its conversation's standalone mean last-turn TBT, pooled
    over conversations (s5_metrics.py ``lastturn_tbt_tokens``). The paper's "p95 last-turn TBT" is the 95th
    percentile of this array: a per-token statistic, so long last turns weigh by their length."""
    parts: list[np.ndarray] = []
    for cid, gaps in last_turn_gaps_s.items():
        base = standalone_mean_tbt_s.get(cid)
        if base is None or not base > 0 or not len(gaps):
            continue
        parts.append(np.asarray(gaps, dtype=float) / base)
    return np.concatenate(parts) if parts else np.empty(0)


def split_window_energy_j(
    decoder_energy_j: float,
    prefiller_busy_energy_j: float,
    prefiller_busy_s: float,
    prefiller_window_s: float,
    prefiller_idle_w: float,
) -> float:
    """ConServe's and the per-turn baseline's energy as the artifact measured it: the decoders over their
    own run + the prefiller GPU over the recorded prefiller-only run's window [first send, last response]
    (s5_metrics.py ``workload_energy``), idle included only inside that window."""
    if prefiller_busy_s > prefiller_window_s + 1e-9:
        raise WorkloadError(
            f"the prefiller cannot be busy {prefiller_busy_s:.3f} s in a {prefiller_window_s:.3f} s window"
        )
    idle_j = prefiller_idle_w * (prefiller_window_s - prefiller_busy_s)
    return decoder_energy_j + prefiller_busy_energy_j + idle_j
