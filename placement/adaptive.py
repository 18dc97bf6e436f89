"""ConServe with observation-based turn-1 placement (issue 12 item 2): ``conserve-adaptive``.

The paper's ConServe always prefills turn 1 on a prefiller. Under load the single prefill pool queues, and a
short prompt waits seconds for a prefill that its decoder could have run in tens of milliseconds. This policy
decides turn 1's placement from what it observes *at that moment* and from the tier model's cost of each
choice; no fixed threshold, no prediction of output length, tool time or KV growth. Later turns are ConServe's
(the pinned decoder prefills the increment locally; a lost pin re-prefills on a healthy decoder).

Cost of each option, in seconds of added latency summed over the requests it touches (all terms from
:class:`tiers.perf.TierModel` of the instance that would do the work, evaluated on the observed state):

    n       turn 1's prompt tokens (observable: its length)
    W(i)    time until instance i reaches a new prefill: its queued prefill tokens q_i split evenly over its
            k_i = max(1, waiting_i + running_i) observed sequences, k_i * prefill_time_s(q_i / k_i)
    remote(p, d) = W(p) + prefill_time_s_p(n) + kv_transfer_time(n, slower of the links of p and d)
            p: any healthy prefiller (the cheapest is taken), d: the worst-fit decoder (ConServe's pin rule).
            The decoder's running batch pays nothing (the KV arrives over the link).
    local(d)     = W(d) + step_time_s_d(n, 0, B_d, C_d)            (the turn's own first token)
                   + B_d * (step_time_s_d(n, 0, B_d, C_d) - decode_step_time_s_d(B_d, C_d))
            d: any healthy decoder whose free KV holds the turn (n + the client's output cap) and on which no
            request waits (a waiting request means the engine cannot admit more now: a local prefill would
            queue behind it for a time nothing observable bounds; the remote option overlaps that wait
            with the prefill); B_d its
            observed running sequences and C_d its observed used KV tokens; equal costs (idle decoders) go
            to the most free KV, ConServe's worst fit. The second line is the stall: each
            of the B_d running sequences waits for the prefill's share of the step (chunked prefill spreads it
            over several steps; the sum is the same).

Two objectives (option ``objective``), both from the same observed terms:

- ``latency`` (the default; the rule's first version): the seconds above, summed over the requests a choice
  touches (the new turn, and each of the B_d running sequences for its stall).
- ``slowdown``: the SLO's unit, and the worst request a choice touches instead of the sum. With
  alone(n) = prefill_time_s_d(n) (the new turn's first token alone on an idle decoder of its tier):
      remote  = remote(p, d) / alone(n)
      local   = max((W(d) + step_time_s_d(n, 0, B_d, C_d)) / alone(n),
                    step_time_s_d(n, 0, B_d, C_d) / decode_step_time_s_d(1, C_d / B_d))
  the second term: the running sequences' token during the local prefill's step, over that token alone
  (batch 1 at their mean observed context); 0 when nothing runs. It grows with the observed batch.
  A running sequence's SLO is on its mean TBT over its final turn, which one stalled token moves by the
  stall over its output length; the rule cannot see that length (no prediction), so it counts the stalled
  token itself (the bound for one token).

The turn prefills locally on the cheapest local decoder when that is strictly cheaper than the cheapest remote
option; otherwise ConServe's rule (the cheapest prefiller, the worst-fit decoder, one KV transfer). Properties
(tests/placement/test_adaptive.py): a local placement always fits its decoder, and a remote one fits whenever
any decoder does; more observed prefill queue never turns a local decision into a remote one (remote costs
only grow with it), and more observed prefill work on a decoder never moves a turn there; a short prompt goes
local once the prefillers are busy enough, a long one stays remote while a prefiller is idle.

The costs need every instance's tier model (and link): the drivers pass ``instance_models`` (instance id ->
TierModel) and ``instance_links`` (instance id -> link type) through :func:`fleet_options`; the simulator and
the live router build them from the same fleet file. An instance without a model cannot be costed: the turn
then takes ConServe's rule, and the reason says so.

Must not import fastapi, sqlalchemy, httpx, or anything that reads wall-clock time; no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from placement.base import FleetView, InstanceView, Placement, Role, TurnRequest
from placement.errors import PlacementError
from placement.policies import ConservePolicy, _decoders, _need_tokens, _prefillers, _worst_fit_decoder
from tiers.links import kv_transfer_time_s, link_spec
from tiers.perf import TierModel

__all__ = ["AdaptiveConservePolicy", "AdaptiveStats", "fleet_options", "local_cost_s", "remote_cost_s"]

DEFAULT_LINK = "pcie"  # the fleet file's default link type (orchestrator.config)
# what the rule minimises (module doc): the summed seconds of added latency (the default), or the worst
# slowdown of the requests a choice touches (the SLO's unit)
OBJECTIVES = ("latency", "slowdown")


def queue_wait_s(tm: TierModel, inst: InstanceView) -> float:
    """Seconds until `inst` reaches a prefill queued behind its observed prefill work (see the module doc)."""
    q = inst.queued_prefill_tokens
    if q <= 0:
        return 0.0
    k = max(1, inst.waiting_seqs + inst.running_seqs)
    return k * tm.prefill_time_s(-(-q // k))


def remote_cost_s(
    n_tokens: int,
    pre: InstanceView,
    pre_tm: TierModel,
    pre_link: str,
    dec: InstanceView,
    dec_link: str,
    kv_bytes_per_token: int,
) -> float:
    """Added latency of prefilling `n_tokens` on `pre` and shipping the KV to `dec` (module doc: remote)."""
    xfer = max(
        kv_transfer_time_s(n_tokens, kv_bytes_per_token, pre_link),
        kv_transfer_time_s(n_tokens, kv_bytes_per_token, dec_link),
    )
    return queue_wait_s(pre_tm, pre) + pre_tm.prefill_time_s(n_tokens) + xfer


def local_cost_s(n_tokens: int, dec: InstanceView, dec_tm: TierModel) -> float:
    """Added latency of prefilling `n_tokens` on decoder `dec`, its running batch's stall included."""
    b, c = dec.running_seqs, dec.kv_used_tokens
    step = dec_tm.step_time_s(n_tokens, 0, b, c)
    stall = step - dec_tm.decode_step_time_s(b, c) if b > 0 else 0.0
    return queue_wait_s(dec_tm, dec) + step + b * stall


def stall_slowdown(n_tokens: int, dec: InstanceView, dec_tm: TierModel) -> float:
    """Slowdown of the running sequences' token during a local prefill of `n_tokens` on `dec`: the step's time
    over the time of that token for one of them alone (batch 1, the batch's mean observed context); 0 when
    nothing runs. Grows with the observed batch (more sequences share the step, each alone is no slower)."""
    b, c = dec.running_seqs, dec.kv_used_tokens
    if b <= 0:
        return 0.0
    return dec_tm.step_time_s(n_tokens, 0, b, c) / dec_tm.decode_step_time_s(1, c // b)


def local_slowdown(n_tokens: int, dec: InstanceView, dec_tm: TierModel, alone_s: float) -> float:
    """The worst slowdown a local prefill causes (module doc, slowdown rule): the new turn's first token, or
    the running sequences' token stalled by it."""
    own = queue_wait_s(dec_tm, dec) + dec_tm.step_time_s(n_tokens, 0, dec.running_seqs, dec.kv_used_tokens)
    return max(own / alone_s, stall_slowdown(n_tokens, dec, dec_tm))


@dataclass(frozen=True, slots=True)
class AdaptiveStats:
    """What the adaptive rule decided for turn 1s so far."""

    local_turn1: int
    remote_turn1: int
    uncosted_turn1: int  # an instance had no tier model: ConServe's rule applied


class AdaptiveConservePolicy:
    """ConServe whose turn-1 prefill goes where the observed cost is lower (module docstring).

    Options:
        instance_models: instance id -> TierModel of every instance (the drivers pass it; fleet_options).
        instance_links: instance id -> link type (tiers.links; default pcie).
    """

    name = "conserve-adaptive"

    def __init__(
        self,
        instance_models: Mapping[str, TierModel] | None = None,
        instance_links: Mapping[str, str] | None = None,
        objective: str = OBJECTIVES[0],
    ) -> None:
        if objective not in OBJECTIVES:
            raise PlacementError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
        self.objective = objective
        for iid, link in (instance_links or {}).items():
            try:
                link_spec(link)
            except Exception as err:
                raise PlacementError(f"instance {iid!r}: {err}") from err
        self.instance_models: dict[str, TierModel] = dict(instance_models or {})
        self.instance_links: dict[str, str] = dict(instance_links or {})
        self._base = ConservePolicy()  # later turns and re-placements: ConServe's rule
        self._local = 0
        self._remote = 0
        self._uncosted = 0

    def _link(self, iid: str) -> str:
        return self.instance_links.get(iid, DEFAULT_LINK)

    def place(self, turn: TurnRequest, view: FleetView) -> Placement:
        if not turn.is_first:
            return self._base.place(turn, view)
        need = _need_tokens(turn)
        decoders = _decoders(view)
        dec, fits = _worst_fit_decoder(decoders, need)
        suffix = "" if fits else "; no decoder fits, queued on the most free"
        pres = [p for p in _prefillers(view) if p.instance_id != dec.instance_id]
        if not pres:
            return Placement(
                decode_instance=dec.instance_id,
                pin=True,
                reason=f"no healthy prefiller: local prefill{suffix}",
            )
        models = self.instance_models
        dec_tm = models.get(dec.instance_id)
        missing = [i.instance_id for i in (dec, *pres) if i.instance_id not in models]
        if missing or dec_tm is None:
            self._uncosted += 1
            pre = min(
                pres, key=lambda i: (i.queued_prefill_tokens, i.waiting_seqs + i.running_seqs, i.instance_id)
            )
            return self._remote_placement(
                turn, pre, dec, f"turn 1: no tier model for {', '.join(missing)}: ConServe's rule{suffix}"
            )
        kvb = dec_tm.model.kv_bytes_per_token
        n = turn.input_tokens
        dec_link = self._link(dec.instance_id)
        remote = [
            (
                remote_cost_s(n, p, models[p.instance_id], self._link(p.instance_id), dec, dec_link, kvb),
                p.instance_id,
                p,
            )
            for p in pres
        ]
        r_cost, _, pre = min(remote, key=lambda x: (x[0], x[1]))
        slowdown = self.objective == "slowdown"
        alone = dec_tm.prefill_time_s(n)  # the new turn's first token alone on an idle decoder of its tier
        if slowdown:
            r_cost /= alone

        def cost(d: InstanceView) -> float:
            tm = models[d.instance_id]
            return local_slowdown(n, d, tm, alone) if slowdown else local_cost_s(n, d, tm)

        # local candidates: decoders (not prefill-only instances) that hold the turn and have a model
        # (ties, e.g. idle decoders: the most free KV, ConServe's worst fit, so pins stay balanced)
        local = [
            (cost(d), -d.kv_free_tokens, d.instance_id, d)
            for d in decoders
            if d.role is not Role.PREFILL
            and d.kv_free_tokens >= need
            and d.waiting_seqs == 0
            and d.instance_id in models
        ]
        if local:
            l_cost, _, _, ldec = min(local, key=lambda x: x[:3])
            unit = "x" if slowdown else " s"
            if l_cost < r_cost:
                self._local += 1
                return Placement(
                    decode_instance=ldec.instance_id,
                    pin=True,
                    reason=f"turn 1: local prefill costs {l_cost:.3f}{unit} < remote {r_cost:.3f}{unit}",
                )
        unit = "x" if slowdown else " s"
        return self._remote_placement(
            turn,
            pre,
            dec,
            f"turn 1: remote prefill costs {r_cost:.3f}{unit}, no cheaper local decoder{suffix}",
        )

    def _remote_placement(
        self, turn: TurnRequest, pre: InstanceView, dec: InstanceView, reason: str
    ) -> Placement:
        self._remote += 1
        return Placement(
            decode_instance=dec.instance_id,
            prefill_instance=pre.instance_id,
            transfer_kv=True,
            transfer_tokens=turn.input_tokens,
            pin=True,
            reason=reason,
        )

    def stats(self) -> AdaptiveStats:
        return AdaptiveStats(self._local, self._remote - self._uncosted, self._uncosted)

    def observe_turn_end(self, conversation_id: str, turn: int, output_tokens: int) -> None:
        return None

    def forget(self, conversation_id: str) -> None:
        return None


def fleet_options(
    policy_name: str, instance_models: Mapping[str, TierModel], instance_links: Mapping[str, str]
) -> dict[str, Any]:
    """The options a driver passes to ``make_policy`` so a policy that costs its decisions with the tier model
    (``conserve-adaptive``) sees every instance's model and link; {} for the other policies."""
    if policy_name.strip().lower().replace("_", "-") != AdaptiveConservePolicy.name:
        return {}
    return {"instance_models": dict(instance_models), "instance_links": dict(instance_links)}
