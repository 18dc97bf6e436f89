"""Per-turn energy estimates for the answer itself (issue 14 item 6) and carbon from a grid intensity.

A chat completion cannot wait for the meters: its interval is attributed ``lag_s`` later
(energy/accounting.py). So the response's ``usage.energy`` carries an *estimate* from the tier model: the
prompt tokens each instance computed times that tier's modelled prefill energy per token, plus the output
tokens times the decoder's modelled decode energy per token (energy.attribution.phase_weights: the tier
model's draw x time per token at a reference operating point, idle share included). It is labelled
``estimated``; the attributed (metered or modelled, conserving) figure is in ``GET /v1/conversations/{id}``
once the conversation's intervals are settled.

Pure: no clock, no I/O. Must not import fastapi or sqlalchemy.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

from energy.attribution import PhaseWeights
from energy.records import TurnRecord

# Carbon intensity of grid electricity when fleet.yaml does not give one: the 2023 world average of the power
# sector, 480 gCO2/kWh (Ember, Global Electricity Review 2024). Set `grid_carbon_g_per_kwh` in fleet.yaml to
# your grid's (or your supplier's) figure; reports and /metrics say which figure they used.
DEFAULT_GRID_G_PER_KWH = 480.0
J_PER_KWH = 3.6e6


def co2e_g(joules: float, g_per_kwh: float) -> float:
    """Grams of CO2-equivalent for ``joules`` of electricity at ``g_per_kwh``."""
    return joules / J_PER_KWH * g_per_kwh


@dataclass(frozen=True, slots=True)
class TurnEnergyEstimate:
    prefill_j: float
    decode_j: float

    @property
    def total_j(self) -> float:
        return self.prefill_j + self.decode_j


def estimate_turn(rec: TurnRecord, weights: Mapping[str, PhaseWeights]) -> TurnEnergyEstimate | None:
    """The turn's modelled joules, prefill and decode apart; None when an instance's weights are unknown."""
    dec = weights.get(rec.instance_id)
    if dec is None:
        return None
    prefill_j = max(rec.prompt_tokens - rec.cached_tokens, 0) * dec.prefill_j_per_token
    if rec.remote_prefill and rec.prefill_instance_id:
        pre = weights.get(rec.prefill_instance_id)
        if pre is None:
            return None
        prefill_j += max(rec.prompt_tokens - rec.prefill_cached_tokens, 0) * pre.prefill_j_per_token
    return TurnEnergyEstimate(prefill_j, rec.output_tokens * dec.decode_j_per_token)


class EnergyEstimates:
    """Running estimates: per conversation so far (the most recent ``max_conversations``), per tenant."""

    def __init__(self, weights: Mapping[str, PhaseWeights], max_conversations: int = 100_000) -> None:
        self.weights = dict(weights)
        self.max_conversations = max_conversations
        self._conv: OrderedDict[str, float] = OrderedDict()
        self.tenant_j: dict[str, float] = {}
        # request id -> (estimate, conversation so far) of the latest turns, for their responses
        self.last: OrderedDict[str, tuple[TurnEnergyEstimate, float]] = OrderedDict()

    def record(self, rec: TurnRecord) -> None:
        got = self.add(rec)
        if got is not None:
            self.last[rec.request_id] = got
            while len(self.last) > 10_000:
                self.last.popitem(last=False)

    def add(self, rec: TurnRecord) -> tuple[TurnEnergyEstimate, float] | None:
        """Add a finished turn; returns its estimate and its conversation's estimate so far."""
        est = estimate_turn(rec, self.weights)
        if est is None:
            return None
        so_far = self._conv.pop(rec.conversation_id, 0.0) + est.total_j
        self._conv[rec.conversation_id] = so_far
        while len(self._conv) > self.max_conversations:
            self._conv.popitem(last=False)
        self.tenant_j[rec.tenant] = self.tenant_j.get(rec.tenant, 0.0) + est.total_j
        return est, so_far

    def forget(self, conversation_id: str) -> None:
        """Drop a conversation's running estimate (the router forgot the conversation)."""
        self._conv.pop(conversation_id, None)

    def conversation_j(self, conversation_id: str) -> float | None:
        return self._conv.get(conversation_id)


def usage_energy(est: TurnEnergyEstimate, conversation_j: float, conversation_id: str | None) -> dict:
    """The ``usage.energy`` extension object of a completion (JSON-ready)."""
    out = {
        "estimated": True,
        "source": "modelled",
        "turn_j": round(est.total_j, 6),
        "turn_prefill_j": round(est.prefill_j, 6),
        "turn_decode_j": round(est.decode_j, 6),
        "conversation_j": round(conversation_j, 6),
    }
    if conversation_id is not None:
        out["attributed"] = f"/v1/conversations/{conversation_id}"
    return out
