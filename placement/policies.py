"""Online placement policies: ConServe and the baselines, as pure functions of a FleetView.

Every policy implements :class:`placement.base.Policy`: ``place(turn, view) -> Placement``. The live router
(orchestrator/router.py) and the simulator (orchestrator/sim/) are two drivers of the *same* objects.

What a policy may keep: its options and per-conversation state it derives from what it was told (the
per-turn predictor's moving averages, round-robin's cursor, kv-aware's record of where it sent each
conversation). Pins live in the driver and reach the policy through ``FleetView.pins``. Randomness (the
per-turn policy's injected mispredictions) comes from a ``random.Random`` owned by the instance and seeded
by an option, so two policies never share state and a replay with the same seed gives the same decisions.

Must not import fastapi, sqlalchemy, httpx, or anything that reads wall-clock time; no I/O.

Policies (DESIGN.md section 5):
    conserve     turn 1 on the least-loaded prefiller, KV transferred once, pinned to the decoder with the
                 most free KV that fits (worst-fit); later turns prefill the increment locally on the pinned
                 decoder. The pin moves only when its decoder is unhealthy or gone (full re-prefill).
    per-turn     AMPD-like: every turn predicts (per-conversation moving average) KV growth and decides remote
                 vs local prefill and the decoder; optional injected misprediction rate; reports its error.
    full-disagg  every turn's whole prompt prefilled on a prefiller, KV shipped to a decoder every turn.
    colocated    no prefillers; conversation affinity to the least-loaded instance.
    round-robin  every turn to the next decode-capable instance, prefilled there.
    kv-aware     Dynamo-style: minimise prefill-blocks-to-compute (after prefix overlap) + active blocks.
    conserve-adaptive  ConServe whose turn-1 prefill goes local or remote by the observed cost
                 (placement/adaptive.py).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from conserve.errors import did_you_mean
from placement.base import FleetView, InstanceView, Placement, Policy, Role, TurnRequest
from placement.errors import PlacementError

__all__ = [
    "POLICY_NAMES",
    "ColocatedPolicy",
    "ConservePolicy",
    "FullDisaggPolicy",
    "KvAwarePolicy",
    "PerTurnPolicy",
    "PredictionStats",
    "RoundRobinPolicy",
    "make_policy",
    "policy_options",
]


# ---- shared selection helpers (pure) ------------------------------------------------------------------


def _prefillers(view: FleetView) -> tuple[InstanceView, ...]:
    """Healthy dedicated prefillers; when there are none, healthy colocated instances can prefill remotely."""
    pre = view.healthy(Role.PREFILL)
    return pre if pre else view.healthy(Role.COLOCATED)


def _decoders(view: FleetView) -> tuple[InstanceView, ...]:
    return tuple(i for i in view.instances if i.healthy and i.role.can_decode)


def _least_loaded_prefiller(view: FleetView) -> InstanceView | None:
    """Least queued prefill work; ties by queue length, then id (deterministic)."""
    pre = _prefillers(view)
    if not pre:
        return None
    return min(pre, key=lambda i: (i.queued_prefill_tokens, i.waiting_seqs + i.running_seqs, i.instance_id))


def _worst_fit_decoder(
    decoders: Iterable[InstanceView], need_tokens: int, exclude: str | None = None
) -> tuple[InstanceView, bool]:
    """The decoder with the most free KV among those that can hold `need_tokens`; else the most free overall.

    Returns (decoder, fits). Ties by fewer pinned conversations, then id. When none fits, the decoder with the
    fewest waiting requests (then the most free KV). Raises when the list is empty.
    """
    cands = [d for d in decoders if d.instance_id != exclude]
    if not cands:
        raise PlacementError(
            "no healthy decode-capable instance to place the turn on. To fix: bring a decoder or colocated "
            "instance back, or add one to the fleet."
        )

    def key(d: InstanceView) -> tuple[int, int, str]:
        return (-d.kv_free_tokens, d.pinned_conversations, d.instance_id)

    fitting = [d for d in cands if d.kv_free_tokens >= need_tokens]
    if fitting:
        return min(fitting, key=key), True
    # Nothing fits: queue where the fewest requests already wait (observable), then the most free KV.
    return min(cands, key=lambda d: (d.waiting_seqs,) + key(d)), False


def _least_loaded_instance(cands: Iterable[InstanceView]) -> InstanceView:
    """vLLM production-stack style: fewest requests (running + waiting), then KV occupancy, then id."""
    lst = list(cands)
    if not lst:
        raise PlacementError(
            "no healthy decode-capable instance to place the turn on. To fix: bring an instance back."
        )
    return min(
        lst,
        key=lambda i: (
            i.running_seqs + i.waiting_seqs,
            i.queued_prefill_tokens,
            i.kv_occupancy,
            i.instance_id,
        ),
    )


def _need_tokens(turn: TurnRequest) -> int:
    return turn.input_tokens + (turn.max_output_tokens or 0)


# ---- conserve -----------------------------------------------------------------------------------------


class ConservePolicy:
    """Conversation-level disaggregation: one transfer, one pin, no predictor.

    Options:
        local_prefill_below_tokens: a turn-1 prompt shorter than this prefills directly on the chosen decoder
            (observable: its length). None (default) always uses a prefiller when one is healthy.
    """

    name = "conserve"

    def __init__(self, local_prefill_below_tokens: int | None = None) -> None:
        if local_prefill_below_tokens is not None and local_prefill_below_tokens < 0:
            raise PlacementError(
                f"local_prefill_below_tokens must be >= 0, got {local_prefill_below_tokens}. "
                "To fix: pass a token count or None."
            )
        self.local_prefill_below_tokens = local_prefill_below_tokens

    def place(self, turn: TurnRequest, view: FleetView) -> Placement:
        pinned = view.pins.get(turn.conversation_id)
        if not turn.is_first and pinned is not None:
            inst = view.get(pinned)
            if inst is not None and inst.healthy:
                return Placement(decode_instance=pinned, reason="pinned decoder, local incremental prefill")
        decoders = _decoders(view)
        if not turn.is_first:
            # The pin is gone (decoder failed / removed, or the driver lost it): re-place and re-prefill the
            # whole history locally on a healthy decoder. The only case in which a conversation moves.
            dec, fits = _worst_fit_decoder(decoders, _need_tokens(turn), exclude=pinned)
            why = "absent" if pinned is None or view.get(pinned) is None else "unhealthy"
            return Placement(
                decode_instance=dec.instance_id,
                pin=True,
                reason=f"re-placed: pinned decoder {pinned} {why}; full re-prefill"
                + ("" if fits else "; no decoder fits, queued on the most free"),
            )
        dec, fits = _worst_fit_decoder(decoders, _need_tokens(turn))
        suffix = "" if fits else "; no decoder fits, queued on the most free"
        thr = self.local_prefill_below_tokens
        if thr is not None and turn.input_tokens < thr:
            return Placement(
                decode_instance=dec.instance_id,
                pin=True,
                reason=f"turn-1 input < {thr} tokens: local prefill{suffix}",
            )
        pre = _least_loaded_prefiller(view)
        if pre is None or pre.instance_id == dec.instance_id:
            return Placement(
                decode_instance=dec.instance_id,
                pin=True,
                reason=f"no healthy prefiller: local prefill{suffix}",
            )
        return Placement(
            decode_instance=dec.instance_id,
            prefill_instance=pre.instance_id,
            transfer_kv=True,
            transfer_tokens=turn.input_tokens,
            pin=True,
            reason=f"turn 1: least-loaded prefiller, worst-fit decoder{suffix}",
        )

    def observe_turn_end(self, conversation_id: str, turn: int, output_tokens: int) -> None:
        return None

    def forget(self, conversation_id: str) -> None:
        return None


# ---- per-turn (AMPD-like) -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PredictionStats:
    """How well the per-turn predictor guessed each turn's output length (tokens)."""

    predictions: int
    mean_abs_error_tokens: float
    mean_abs_pct_error: float  # mean |pred - actual| / max(actual, 1), as a fraction
    injected_mispredictions: int
    remote_followup_turns: int
    migrations: int


@dataclass(slots=True)
class _ConvState:
    """Mutable per-conversation predictor state (private to one policy instance)."""

    out_avg_tokens: float
    app_avg_tokens: float
    seen_outputs: int = 0
    last_decoder: str | None = None
    pending_prediction: float | None = None


class PerTurnPolicy:
    """Turn-level P/D decisions from predicted KV growth (AMPD-like baseline).

    Predictor: per-conversation exponential moving average of output tokens and appended tokens, seeded
    with fleet-wide running means. Per turn k >= 2 it predicts growth = new_tokens + predicted output and
    keeps the conversation on the decoder holding its KV when the growth fits there; otherwise it migrates
    (remote prefill of the whole prompt on the least-loaded prefiller, KV shipped to the decoder with the most
    free KV). Increments longer than ``remote_prefill_above_tokens`` prefill remotely even when it stays.

    ``mispredict_rate`` emulates the paper's injected error (10%): that fraction of follow-up turns is
    wrongly sent to the prefiller as a KV round trip (``Placement.history_tokens``), as the paper's AMPD
    emulation costed it: the history's KV goes decoder -> prefiller, the prefiller queues and prefills the new
    tokens over it, their KV comes back, and both sides pay block bookkeeping. A migration (growth does not
    fit at home) re-prefills the whole prompt on the prefiller and ships it to the new decoder.
    """

    name = "per-turn"

    def __init__(
        self,
        mispredict_rate: float = 0.0,
        seed: int = 0,
        ema_alpha: float = 0.5,
        remote_prefill_above_tokens: int = 2048,
        prior_output_tokens: float = 128.0,
        prior_appended_tokens: float = 64.0,
    ) -> None:
        if not 0.0 <= mispredict_rate <= 1.0:
            raise PlacementError(
                f"mispredict_rate must be in [0, 1], got {mispredict_rate}. To fix: e.g. 0.1."
            )
        if not 0.0 < ema_alpha <= 1.0:
            raise PlacementError(f"ema_alpha must be in (0, 1], got {ema_alpha}.")
        self.mispredict_rate = mispredict_rate
        self.seed = seed
        self.ema_alpha = ema_alpha
        self.remote_prefill_above_tokens = remote_prefill_above_tokens
        self._rng = random.Random(seed)
        self._convs: dict[str, _ConvState] = {}
        # Fleet-wide running means seed new conversations' predictors.
        self._global_out_sum = 0.0
        self._global_out_n = 0
        self._prior_out = prior_output_tokens
        self._prior_app = prior_appended_tokens
        self._abs_err_sum = 0.0
        self._abs_pct_err_sum = 0.0
        self._n_pred = 0
        self._injected = 0
        self._remote_followups = 0
        self._migrations = 0

    def _state(self, cid: str) -> _ConvState:
        st = self._convs.get(cid)
        if st is None:
            prior = self._global_out_sum / self._global_out_n if self._global_out_n else self._prior_out
            st = _ConvState(out_avg_tokens=prior, app_avg_tokens=self._prior_app)
            self._convs[cid] = st
        return st

    def place(self, turn: TurnRequest, view: FleetView) -> Placement:
        st = self._state(turn.conversation_id)
        pred_out = st.out_avg_tokens
        st.pending_prediction = pred_out
        decoders = _decoders(view)
        if turn.is_first:
            need = turn.input_tokens + int(round(pred_out))
            dec, _ = _worst_fit_decoder(decoders, need)
            st.last_decoder = dec.instance_id
            pre = _least_loaded_prefiller(view)
            if pre is None or pre.instance_id == dec.instance_id:
                return Placement(
                    decode_instance=dec.instance_id, reason="turn 1: no prefiller, local prefill"
                )
            return Placement(
                decode_instance=dec.instance_id,
                prefill_instance=pre.instance_id,
                transfer_kv=True,
                transfer_tokens=turn.input_tokens,
                reason=f"turn 1: remote prefill; predicted output {pred_out:.0f} tokens",
            )
        # Follow-up turn: observed appended tokens feed the appended-token average.
        a = self.ema_alpha
        st.app_avg_tokens = (1 - a) * st.app_avg_tokens + a * turn.new_tokens
        growth = turn.new_tokens + int(round(pred_out))
        home = view.get(st.last_decoder) if st.last_decoder else None
        stays = home is not None and home.healthy and home.role.can_decode and home.kv_free_tokens >= growth
        pre = _least_loaded_prefiller(view)
        if stays and home is not None:
            remote = turn.new_tokens > self.remote_prefill_above_tokens
            injected = False
            if not remote and self.mispredict_rate > 0.0 and self._rng.random() < self.mispredict_rate:
                remote, injected = True, True
                self._injected += 1
            if remote and pre is not None and pre.instance_id != home.instance_id:
                self._remote_followups += 1
                # AMPD-style round trip (the paper's emulation): the history's KV goes from the decoder to the
                # prefiller, which prefills only the new tokens and ships their KV back.
                return Placement(
                    decode_instance=home.instance_id,
                    prefill_instance=pre.instance_id,
                    transfer_kv=True,
                    transfer_tokens=turn.new_tokens,
                    history_tokens=turn.input_tokens - turn.new_tokens,
                    reason="injected misprediction: KV round trip via the prefiller"
                    if injected
                    else "long increment: remote prefill over the shipped history",
                )
            return Placement(
                decode_instance=home.instance_id,
                reason=f"predicted growth {growth} fits: local incremental prefill",
            )
        # Predicted growth does not fit where the KV lives (or that decoder is gone): migrate.
        dec, _ = _worst_fit_decoder(decoders, turn.input_tokens + int(round(pred_out)))
        self._migrations += 1
        st.last_decoder = dec.instance_id
        if pre is None or pre.instance_id == dec.instance_id:
            return Placement(
                decode_instance=dec.instance_id, reason="migrate: local re-prefill (no prefiller)"
            )
        self._remote_followups += 1
        return Placement(
            decode_instance=dec.instance_id,
            prefill_instance=pre.instance_id,
            transfer_kv=True,
            transfer_tokens=turn.input_tokens,
            reason=f"migrate: predicted growth {growth} does not fit; remote re-prefill",
        )

    def observe_turn_end(self, conversation_id: str, turn: int, output_tokens: int) -> None:
        st = self._state(conversation_id)
        if st.pending_prediction is not None:
            err = abs(st.pending_prediction - output_tokens)
            self._abs_err_sum += err
            self._abs_pct_err_sum += err / max(output_tokens, 1)
            self._n_pred += 1
            st.pending_prediction = None
        a = self.ema_alpha
        st.out_avg_tokens = (
            output_tokens if st.seen_outputs == 0 else (1 - a) * st.out_avg_tokens + a * output_tokens
        )
        st.seen_outputs += 1
        self._global_out_sum += output_tokens
        self._global_out_n += 1

    def forget(self, conversation_id: str) -> None:
        self._convs.pop(conversation_id, None)

    def prediction_stats(self) -> PredictionStats:
        n = self._n_pred
        return PredictionStats(
            predictions=n,
            mean_abs_error_tokens=self._abs_err_sum / n if n else 0.0,
            mean_abs_pct_error=self._abs_pct_err_sum / n if n else 0.0,
            injected_mispredictions=self._injected,
            remote_followup_turns=self._remote_followups,
            migrations=self._migrations,
        )


# ---- full disaggregation ------------------------------------------------------------------------------


class FullDisaggPolicy:
    """Every turn: the whole prompt prefilled on the least-loaded prefiller, KV shipped to a decoder.

    The decoder is chosen per turn, worst-fit on free KV; nothing is pinned.
    """

    name = "full-disagg"

    def place(self, turn: TurnRequest, view: FleetView) -> Placement:
        dec, _ = _worst_fit_decoder(_decoders(view), _need_tokens(turn))
        pre = _least_loaded_prefiller(view)
        if pre is None or pre.instance_id == dec.instance_id:
            return Placement(decode_instance=dec.instance_id, reason="no healthy prefiller: local prefill")
        return Placement(
            decode_instance=dec.instance_id,
            prefill_instance=pre.instance_id,
            transfer_kv=True,
            transfer_tokens=turn.input_tokens,
            reason="every turn: remote prefill of the whole prompt, KV shipped",
        )

    def observe_turn_end(self, conversation_id: str, turn: int, output_tokens: int) -> None:
        return None

    def forget(self, conversation_id: str) -> None:
        return None


# ---- colocated ----------------------------------------------------------------------------------------


class ColocatedPolicy:
    """No disaggregation: session affinity to the least-loaded instance (vLLM production-stack style).

    The affinity is a pin (kept by the driver); it moves only if its instance is unhealthy or gone.
    """

    name = "colocated"

    def place(self, turn: TurnRequest, view: FleetView) -> Placement:
        pinned = view.pins.get(turn.conversation_id)
        if pinned is not None:
            inst = view.get(pinned)
            if inst is not None and inst.healthy and inst.role.can_decode:
                return Placement(decode_instance=pinned, reason="session affinity")
        inst = _least_loaded_instance(i for i in _decoders(view) if i.instance_id != pinned)
        why = "new session" if pinned is None else f"re-placed: {pinned} unavailable; full re-prefill"
        return Placement(decode_instance=inst.instance_id, pin=True, reason=f"{why}: least-loaded instance")

    def observe_turn_end(self, conversation_id: str, turn: int, output_tokens: int) -> None:
        return None

    def forget(self, conversation_id: str) -> None:
        return None


# ---- round-robin --------------------------------------------------------------------------------------


class RoundRobinPolicy:
    """Every turn to the next healthy decode-capable instance (sorted by id), prefilled there. No affinity."""

    name = "round-robin"

    def __init__(self) -> None:
        self._cursor = 0

    def place(self, turn: TurnRequest, view: FleetView) -> Placement:
        cands = sorted(_decoders(view), key=lambda i: i.instance_id)
        if not cands:
            raise PlacementError("no healthy decode-capable instance for round-robin. To fix: add one.")
        inst = cands[self._cursor % len(cands)]
        self._cursor += 1
        return Placement(decode_instance=inst.instance_id, reason="round-robin")

    def observe_turn_end(self, conversation_id: str, turn: int, output_tokens: int) -> None:
        return None

    def forget(self, conversation_id: str) -> None:
        return None


# ---- kv-aware -----------------------------------------------------------------------------------------


class KvAwarePolicy:
    """Dynamo-style KV-aware routing over decode-capable instances, prefill local to the chosen one.

    cost(i) = overlap_weight * blocks_to_prefill(i) + active_blocks(i) + new_blocks; lowest cost wins.
    blocks_to_prefill uses the policy's own index of where it sent each conversation and how long its
    prompt+output was there (Dynamo learns the same from KV events); it is an estimate, since the instance
    may have evicted those blocks since.
    """

    name = "kv-aware"

    def __init__(self, overlap_weight: float = 1.0, block_size_tokens: int = 16) -> None:
        if overlap_weight < 0 or block_size_tokens < 1:
            raise PlacementError("kv-aware needs overlap_weight >= 0 and block_size_tokens >= 1.")
        self.overlap_weight = overlap_weight
        self.block_size_tokens = block_size_tokens
        self._where: dict[str, tuple[str, int]] = {}  # conversation -> (instance, tokens cached there)

    def place(self, turn: TurnRequest, view: FleetView) -> Placement:
        cands = _decoders(view)
        if not cands:
            raise PlacementError("no healthy decode-capable instance for kv-aware routing. To fix: add one.")
        bs = self.block_size_tokens
        prev = self._where.get(turn.conversation_id)
        new_blocks = -(-turn.input_tokens // bs)

        def cost(i: InstanceView) -> tuple[float, str]:
            overlap = min(prev[1], turn.input_tokens) if prev is not None and prev[0] == i.instance_id else 0
            to_prefill = -(-(turn.input_tokens - overlap) // bs)
            active = -(-i.kv_used_tokens // bs) + -(-i.queued_prefill_tokens // bs)
            return (self.overlap_weight * to_prefill + active + new_blocks, i.instance_id)

        best = min(cands, key=cost)
        # Remember the prompt as cached there; the output is added at turn end.
        self._where[turn.conversation_id] = (best.instance_id, turn.input_tokens)
        return Placement(decode_instance=best.instance_id, reason="kv-aware: lowest prefill+load cost")

    def observe_turn_end(self, conversation_id: str, turn: int, output_tokens: int) -> None:
        prev = self._where.get(conversation_id)
        if prev is not None:
            self._where[conversation_id] = (prev[0], prev[1] + output_tokens)

    def forget(self, conversation_id: str) -> None:
        self._where.pop(conversation_id, None)


# ---- registry -----------------------------------------------------------------------------------------


def _adaptive(**options: Any) -> Policy:
    """placement/adaptive.py builds on the helpers above: imported when first asked for (no import cycle)."""
    from placement.adaptive import AdaptiveConservePolicy

    return AdaptiveConservePolicy(**options)


_REGISTRY: dict[str, Callable[..., Policy]] = {
    "conserve": ConservePolicy,
    "conserve-adaptive": _adaptive,
    "per-turn": PerTurnPolicy,
    "full-disagg": FullDisaggPolicy,
    "colocated": ColocatedPolicy,
    "round-robin": RoundRobinPolicy,
    "kv-aware": KvAwarePolicy,
}

POLICY_NAMES: tuple[str, ...] = tuple(_REGISTRY)

_OPTIONS: dict[str, tuple[str, ...]] = {
    "conserve": ("local_prefill_below_tokens",),
    "conserve-adaptive": ("instance_models", "instance_links"),
    "per-turn": (
        "mispredict_rate",
        "seed",
        "ema_alpha",
        "remote_prefill_above_tokens",
        "prior_output_tokens",
        "prior_appended_tokens",
    ),
    "full-disagg": (),
    "colocated": (),
    "round-robin": (),
    "kv-aware": ("overlap_weight", "block_size_tokens"),
}


def _canonical(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def policy_options(name: str) -> tuple[str, ...]:
    """Option names a policy accepts (for CLIs and error messages)."""
    return _OPTIONS[_resolve(name)]


def _resolve(name: str) -> str:
    key = _canonical(name)
    if key in _REGISTRY:
        return key
    raise PlacementError(
        f"unknown policy {name!r}.{did_you_mean(key, POLICY_NAMES)} "
        f"Known policies: {', '.join(POLICY_NAMES)}."
    )


def make_policy(name: str, **options: Any) -> Policy:
    """Build a fresh policy instance by name (case-insensitive; '_' and '-' are equivalent).

    Options that a policy does not take raise a PlacementError naming them and the accepted ones.
    A fresh instance per call: policies never share state.
    """
    key = _resolve(name)
    allowed = _OPTIONS[key]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        accepted = ", ".join(allowed) if allowed else "none"
        raise PlacementError(
            f"policy {key!r} does not take option(s) {', '.join(unknown)}. Accepted options: {accepted}."
        )
    return _REGISTRY[key](**options)
