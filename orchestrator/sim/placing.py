"""Arrivals and placement in the simulator: the fleet view, router-side KV admission, asking the policy, and
applying its Placement (pins, remote prefill, the per-turn KV round trip) through the driver core.

Split out of orchestrator/sim/core.py (issue 11 item 6); pure move.
"""

from __future__ import annotations

from orchestrator.core import (
    growth_tokens,
    has_room,
    moves_pin,
    reservation_tokens,
    round_trip_tokens,
)
from orchestrator.errors import SimulationError
from orchestrator.sim.base import _PULL, _REFUSE, _RESUME, SimBase
from orchestrator.sim.instance import _DECODE_ONLY, _FULL, _PREFILL_ONLY, _Instance, _Seq, _TurnState
from orchestrator.sim.result import Decision
from placement.base import FleetView, Placement, Role, TurnRequest
from placement.errors import PlacementError
from tiers.steps import handoff_time_s


class Placing(SimBase):
    # ---- arrivals and placement ----------------------------------------------------------------------
    def _fleet_view(self) -> FleetView:
        # every instance's own cached view (rebuilt when dirty): a make_view elsewhere (the power step, the
        # KV-gap rule) clears the dirty flag, so testing it here would keep a stale view in this list
        views = self.views
        for inst in self.insts:
            views[inst.idx] = inst.make_view()
        return FleetView(tuple(views), self.pins)

    # ---- router-side KV admission (SimOptions.router_admission; orchestrator.sim.admission) ------------
    def _adm_need(self, ci: int, turn: int) -> tuple[int, int]:
        """(decoder tokens, prefiller tokens) a turn reserves when it is admitted; (0, 0): no admission."""
        outs = [t.output_tokens for t in self.convs[ci].turns]
        return reservation_tokens(self.rule, turn, self.inputs[ci], outs)

    def _adm_open(self, ts: _TurnState) -> bool:
        """Some healthy engine has room for the reservation (then the policy is asked to place)."""
        nd, npre = self._adm_need(ts.conv, ts.turn)
        dec_ok = any(i.healthy and i.role.can_decode and has_room(i.cap, i.adm_used, nd) for i in self.insts)
        if not dec_ok or npre == 0:
            return dec_ok
        pre = [i for i in self.insts if i.healthy and i.role == Role.PREFILL]
        return not pre or any(has_room(i.cap, i.adm_used, npre) for i in pre)

    def _adm_fits(self, ts: _TurnState, pl: Placement) -> bool:
        nd, npre = self._adm_need(ts.conv, ts.turn)
        dec = self.by_id[pl.decode_instance]
        if not has_room(dec.cap, dec.adm_used, nd):
            return False
        if npre and pl.remote_prefill:
            pre = self._instance(pl.prefill_instance or "", "prefill")
            return pre.role != Role.PREFILL or has_room(pre.cap, pre.adm_used, npre)
        return True

    def _adm_hold(self, held: list[tuple[int, int] | None], ci: int, idx: int, tokens: int) -> None:
        old = held[ci]
        if old is not None:
            self.insts[old[0]].adm_used -= old[1]
            self.insts[old[0]].dirty = True
        held[ci] = (idx, tokens) if tokens else None
        if tokens:
            self.insts[idx].adm_used += tokens
            self.insts[idx].dirty = True

    def _adm_account(self, ts: _TurnState, pl: Placement, admitting: bool, fresh: bool, t: float) -> None:
        """Reserve (admitting), grow (per-turn rule, a new later turn) or move (the decoder changed)."""
        ci = ts.conv
        dec = self.by_id[pl.decode_instance]
        if admitting:
            nd, npre = self._adm_need(ci, ts.turn)
            self._adm_hold(self.adm_dec, ci, dec.idx, nd)
            if npre and pl.remote_prefill and self.by_id[pl.prefill_instance or ""].role == Role.PREFILL:
                self._adm_hold(self.adm_pre, ci, self.by_id[pl.prefill_instance or ""].idx, npre)
            if ts.turn == 1:
                self.admitted_s[ci] = t
            return
        held = self.adm_dec[ci]
        if held is None:
            return
        tokens = held[1]
        if fresh:  # AMPD's first-turn rule: grow, never block (0 under the other rules)
            spec = self.convs[ci].turns[ts.turn - 1]
            tokens += growth_tokens(self.rule, spec.appended_tokens, spec.output_tokens)
        if tokens != held[1] or held[0] != dec.idx:
            self._adm_hold(self.adm_dec, ci, dec.idx, tokens)

    def _adm_release(self, ci: int, t: float) -> None:
        self._adm_hold(self.adm_dec, ci, 0, 0)
        self._adm_hold(self.adm_pre, ci, 0, 0)
        self._adm_retry(t)

    def _adm_retry(self, t: float) -> None:
        """Room was freed: placed turns waiting for their engine first, then waiting turns in arrival
        order, each admitted when it fits (no head-of-line blocking, like the artifact's polling clients)."""
        if self.adm_parked:
            parked, self.adm_parked = self.adm_parked, []
            for ts, pl in parked:
                if self._adm_fits(ts, pl) and self.by_id[pl.decode_instance].healthy:
                    self._adm_account(ts, pl, True, True, t)
                    self._apply(ts, pl, t)
                else:
                    self.adm_parked.append((ts, pl))
        if self.adm_waiting:
            waiting, self.adm_waiting = self.adm_waiting, []
            for ts in waiting:
                if self._adm_open(ts):
                    self._place(ts, t, admitting=True, fresh=True)
                else:
                    self.adm_waiting.append(ts)

    def _refuse(self, ts: _TurnState, t: float) -> None:
        """Turn 1 waited the bound and, if still not admitted, the conversation is refused (live: 503)."""
        if ts not in self.adm_waiting:
            return  # admitted meanwhile
        # this event is at arrival + the bound: the core rule's REJECT (orchestrator.core.admission.admit with
        # waited == bound), without recomputing the wait in floating point
        self.adm_waiting.remove(ts)
        self.turn_states[ts.conv].remove(ts)
        self.refused.append(ts.conv)
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, len(self.convs))

    def _arrive(
        self, ci: int, turn: int, t: float, ts: _TurnState | None = None, resumed: bool = False
    ) -> None:
        conv = self.convs[ci]
        inp = self.inputs[ci][turn - 1]
        spec = conv.turns[turn - 1]
        fresh = ts is None or resumed
        if ts is None:
            ts = _TurnState(ci, turn, t, inp, spec.output_tokens)
            self.turn_states[ci].append(ts)
            wait = 0.0
            if self.turn_delay is not None and turn > 1:
                wait = self.turn_delay.delay_s(conv.conversation_id, turn, t)
            if self.gap_on and turn > 1:  # its KV copied back from host memory first (orchestrator.sim.gaps)
                wait += self._gap_end(ci, t)
            if wait > 0:  # issued now (ts.arrival_s), placed after the wait
                self._push(t + wait, _RESUME, ts, None)
                return
        elif resumed and self.gap_on:
            self._gap_restored(ci)
        admitting = False
        if self.admission and fresh and self._adm_need(ci, turn)[0] > 0:
            if not self._adm_open(ts):
                self.adm_waiting.append(ts)
                bound = self.opts.admission_wait_s
                if bound is not None and turn == 1:  # serve's bounded wait (orchestrator.core.admission)
                    self._push(t + bound, _REFUSE, ts, None)
                return
            admitting = True
        self._place(ts, t, admitting, fresh)

    def _place(self, ts: _TurnState, t: float, admitting: bool = False, fresh: bool = True) -> None:
        """Ask the policy where the turn goes and apply it (after the router-side reservation, if any)."""
        ci, turn = ts.conv, ts.turn
        conv = self.convs[ci]
        inp = ts.input_tokens
        spec = conv.turns[turn - 1]
        new = spec.appended_tokens
        req = TurnRequest(conv.conversation_id, turn, inp, new)
        view = self._fleet_view()
        try:
            pl = self.policy.place(req, view)
        except PlacementError as err:
            raise SimulationError(
                f"policy {self.policy.name!r} could not place {conv.conversation_id!r} turn {turn} at "
                f"t={t:.3f}s: {err}"
            ) from err
        if self.opts.record_views:
            snap = FleetView(
                view.instances,
                {conv.conversation_id: self.pins[conv.conversation_id]}
                if conv.conversation_id in self.pins
                else {},
            )
            self.decisions.append(Decision(t, req, pl, snap, self._next_call()))
        else:
            self.decisions.append(Decision(t, req, pl, None, self._next_call()))
        if self.admission:
            self._instance(pl.decode_instance, "decode")
            if admitting and not self._adm_fits(ts, pl):
                self.adm_parked.append((ts, pl))  # KvTracker.wait_for_engine: hold the decision until room
                self.adm_parked_count += 1
                return
            self._adm_account(ts, pl, admitting, fresh, t)
        self._apply(ts, pl, t)

    def _instance(self, iid: str, what: str) -> _Instance:
        inst = self.by_id.get(iid)
        if inst is None:
            raise SimulationError(f"policy {self.policy.name!r} returned unknown {what} instance {iid!r}")
        if not inst.healthy:
            raise SimulationError(f"policy {self.policy.name!r} placed on unhealthy instance {iid!r}")
        return inst

    def _apply(self, ts: _TurnState, pl: Placement, t: float) -> None:
        cid = self.convs[ts.conv].conversation_id
        dec = self._instance(pl.decode_instance, "decode")
        if not dec.role.can_decode:
            raise SimulationError(
                f"policy {self.policy.name!r} chose {dec.id!r} (role {dec.role}) to decode; it cannot decode"
            )
        ci = ts.conv
        pst = self.pin_state[ci]
        if moves_pin(pl, pst.pin):
            old = self.book.pin(pst, dec.id)
            if old is not None:
                self.by_id[old].dirty = True
            dec.dirty = True
        # a placed turn is counted for its prompt (+ the client's output cap, which the simulator's turns do
        # not carry: orchestrator.core.running_turn_kv_tokens) on the pinned decoder until the turn ends
        self._pin_account(ci, ts.input_tokens)
        ts.decode_inst = dec.idx
        need = dec.block_round(ts.input_tokens + ts.output_tokens)
        if need > dec.cap:
            raise SimulationError(
                f"conversation {cid!r} turn {ts.turn} needs {need} KV tokens but {dec.id} holds {dec.cap}. "
                "To fix: cap the turns (--max-turns) or use a tier with more memory."
            )
        if pl.remote_prefill:
            pre = self._instance(pl.prefill_instance or "", "prefill")
            ts.prefill_inst = pre.idx
            ts.remote = True
            s = self._new_seq(ts, _PREFILL_ONLY)
            s.reserve = pre.block_round(ts.input_tokens)
            if s.reserve > pre.cap:
                raise SimulationError(
                    f"conversation {cid!r} turn {ts.turn}: prompt of {ts.input_tokens} tokens exceeds "
                    f"prefiller {pre.id}'s KV capacity {pre.cap}. To fix: cap turns or use a larger "
                    "prefill tier."
                )
            d = self._new_seq(ts, _DECODE_ONLY)
            d.reserve = need
            s.partner, d.partner = d, s
            hist = self._history_to_pull(ts, pl, dec, cid)
            if hist > 0:
                # KV round trip: the history's KV goes decoder -> prefiller, then the prefill of the rest
                ts.history_tokens = hist
                nbytes = hist * dec.kvb
                self.kv_transfers += 1
                self.kv_transfer_bytes += nbytes
                s.pulled = hist
                s.inst = pre.idx
                self._push(t + handoff_time_s(hist, dec.kvb, dec.link, pre.link), _PULL, s, pre)
                return
            self._enqueue(pre, s, t)
        else:
            ts.prefill_inst = dec.idx
            ts.remote = False
            s = self._new_seq(ts, _FULL)
            s.reserve = need
            self._enqueue(dec, s, t)

    def _pin_account(self, ci: int, tokens: int) -> None:
        """Set the KV tokens conversation `ci` is counted for on its pinned instance (none: no-op)."""
        iid = self.book.account(self.pin_state[ci], tokens)
        if iid is not None:
            self.by_id[iid].dirty = True

    def _unpin(self, ci: int) -> None:
        iid = self.book.unpin(self.pin_state[ci])
        if iid is not None:
            self.by_id[iid].dirty = True

    def _history_to_pull(self, ts: _TurnState, pl: Placement, dec: _Instance, cid: str) -> int:
        """History tokens a round-trip placement ships to the prefiller: what the decoder still holds of it
        (whole blocks); 0 when the placement asks for none or the decoder has lost it."""
        held = dec.cache.get(cid, 0) if dec.cache_on else 0
        new = self.convs[ts.conv].turns[ts.turn - 1].appended_tokens
        turn = TurnRequest(cid, ts.turn, ts.input_tokens, new)
        return round_trip_tokens(pl, turn, held, dec.block)

    def _pull_done(self, s: _Seq, pre: _Instance, t: float) -> None:
        """The history KV has reached the prefiller: queue the prefill of the rest there."""
        ts = s.ts
        if s.epoch != ts.epoch:
            return  # the turn was restarted after a failure
        if not pre.healthy:
            self._restart(ts, t)
            return
        self._enqueue(pre, s, t)
