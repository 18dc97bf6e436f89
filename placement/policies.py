"""Online placement policies: ConServe and the baselines, as pure functions of a FleetView.

Every policy implements :class:`placement.base.Policy`: ``place(turn, view) -> Placement``. The live router
(orchestrator/router/) and the simulator (orchestrator/sim/) are two drivers of the *same* objects.

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

from collections.abc import Callable
from typing import Any

from conserve.errors import did_you_mean
from placement.base import FleetView, InstanceView, Placement, Policy, TurnRequest
from placement.errors import PlacementError
from placement.per_turn import PerTurnPolicy, PredictionStats
from placement.selection import (  # noqa: F401  (re-exported: tests import the helpers from here)
    _decoders,
    _least_loaded_instance,
    _least_loaded_prefiller,
    _need_tokens,
    _prefillers,
    _worst_fit_decoder,
)

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
    "conserve-adaptive": ("instance_models", "instance_links", "objective"),
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
