"""The per-turn policy (AMPD-like), a baseline of placement/policies.py: every turn predicts the
conversation's KV growth from per-conversation moving averages and decides remote vs local prefill and the
decoder; an optional injected misprediction rate emulates the paper's AMPD runs; it reports its error.
Must not import fastapi, sqlalchemy, httpx, or anything that reads wall-clock time; no I/O.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from placement.base import FleetView, Placement, TurnRequest
from placement.errors import PlacementError
from placement.selection import (
    _decoders,
    _least_loaded_prefiller,
    _worst_fit_decoder,
)

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
