"""The simulator's instance mechanics (queueing, KV admission, step planning, committing a step or stretch,
the end of a turn, the KV hand-off) and failures (re-placing the turns an instance took down with it).

Split out of orchestrator/sim/core.py (issue 11 item 6); pure move.
"""

from __future__ import annotations

import heapq
import math

from orchestrator.core import Reserve, abandoned_prefill_cached_tokens, handoff_refused, kv_shipped_tokens
from orchestrator.sim.base import _ARRIVE, _STEP, _XFER, SimBase
from orchestrator.sim.instance import (
    _D,
    _DECODE_ONLY,
    _FULL,
    _H,
    _J,
    _P,
    _PREFILL_ONLY,
    _T,
    _W,
    _X,
    _cum,
    _Instance,
    _Seq,
    _steps_by,
    _TurnState,
)
from orchestrator.sim.result import Feedback
from tiers.steps import handoff_time_s, plan_chunks, prefill_step_power_w, prefill_step_time_s


class Stepping(SimBase):
    # ---- instance mechanics --------------------------------------------------------------------------
    def _enqueue(self, inst: _Instance, s: _Seq, t: float) -> None:
        if s.kind != _DECODE_ONLY:
            hit = inst.cache.get(s.cid, 0) if inst.cache_on else 0
            s.queued_estimate = max(1, s.ts.input_tokens - max(hit, s.pulled))
            inst.queued_prefill += s.queued_estimate
        s.inst = inst.idx
        s.state = _W
        inst.waiting.append(s)
        inst.dirty = True
        self._wake(inst, t)

    def _wake(self, inst: _Instance, t: float) -> None:
        """Something changed at `inst`: plan now if idle, else end the current stretch at the next step."""
        if not inst.healthy:
            return
        if not inst.busy:
            self._plan(inst, t)
            return
        cur = inst.cur
        if cur is None or cur[5]:
            return  # a prefill step is a single step: the change is seen at its end
        t0, n, a, d, pw, _, _ = cur
        m = _steps_by(t - t0, a, d, n)
        new_n = min(n, m + 1)
        if new_n < n:
            inst.cur = (t0, new_n, a, d, pw, False, [])
            inst.version += 1
            self._push(t0 + _cum(new_n, a, d), _STEP, inst, inst.version)

    def _admit(self, inst: _Instance, t: float) -> None:
        waiting = inst.waiting
        while waiting:
            s = waiting[0]
            running = len(inst.prefilling) + inst.n_decode + inst.running_other + len(inst.pending_join)
            if running >= inst.max_seqs:
                return
            own = inst.cache.get(s.cid, 0)
            # Every unpinned cache entry can be evicted; the conversation's own entry becomes part of this
            # sequence's KV. If the footprint does not fit next to the admitted ones: wait (head-of-line).
            if inst.reserved + s.reserve > inst.cap:
                return
            waiting.popleft()
            ts = s.ts
            # Take the conversation's own cache entry out (it becomes part of this sequence's KV).
            if own:
                inst.cache_take(s.cid)
            if self.gap_on and inst.reserved + s.reserve + inst.cache_total > inst.cap:
                # the engine must evict cached KV to admit: pressure (orchestrator.sim.gaps) before the LRU
                self._gap_pressure_check(inst, t, inst.reserved + s.reserve + inst.cache_total - inst.cap)
            inst.cache_evict(s.reserve)
            inst.reserved += s.reserve
            if inst.reserved > inst.peak_reserved:
                inst.peak_reserved = inst.reserved
            s.admitted = True
            inst.dirty = True
            blk = inst.block
            if s.kind == _DECODE_ONLY:
                tokens = kv_shipped_tokens(ts.input_tokens, own if inst.cache_on else 0, blk)
                nbytes = tokens * inst.kvb
                src = self.insts[ts.prefill_inst]
                # a round trip also pays both sides' block bookkeeping over history + new (the whole prompt)
                dur = handoff_time_s(
                    tokens, inst.kvb, inst.link, src.link, ts.input_tokens if ts.history_tokens else 0
                )
                ts.kv_admit_s = t
                ts.transfer_tokens = tokens
                ts.transfer_bytes = nbytes
                self.kv_transfers += 1
                self.kv_transfer_bytes += nbytes
                inst.running_other += 1
                inst.nondecode_kv += ts.input_tokens
                s.state = _T
                self._push(t + dur, _XFER, s, None)
                continue
            hit = min(own, ts.input_tokens - 1) // blk * blk if inst.cache_on else 0
            if s.pulled > hit:  # history KV shipped in from the decoder (a round trip)
                hit = min(s.pulled, ts.input_tokens - 1) // blk * blk
            s.cached = hit
            s.prefill_total = ts.input_tokens - hit
            s.prefill_done = 0
            inst.queued_prefill += s.prefill_total - s.queued_estimate
            ts.cached_tokens = hit
            ts.prefilled_tokens = s.prefill_total
            ts.prefill_start_s = t
            if s.kind == _FULL:
                ts.kv_admit_s = t
            inst.nondecode_kv += ts.input_tokens
            s.state = _P
            inst.prefilling.append(s)

    def _plan(self, inst: _Instance, t: float) -> None:
        inst.busy = False
        inst.cur = None
        self._admit(inst, t)
        if self.gap_on:  # KV pressure releases idle conversations past their hold (orchestrator.sim.gaps)
            self._gap_pressure_check(inst, t)
        if inst.pending_join:
            for s in inst.pending_join:
                ts = s.ts
                inst.running_other -= 1
                inst.nondecode_kv -= ts.input_tokens
                s.ctx_entry = ts.input_tokens
                s.entry_step = inst.steps_done
                ts.first_step = inst.steps_done + 1
                s.last_step = ts.last_step = inst.steps_done + ts.output_tokens
                heapq.heappush(inst.heap, (s.last_step, s.key, s))
                s.state = _D
                inst.n_decode += 1
                inst.ctx_sum += s.ctx_entry
            inst.pending_join.clear()
            inst.dirty = True
        tm = inst.tm
        nd = inst.n_decode
        if inst.prefilling:
            sizes = plan_chunks(inst.budget, nd, [s.prefill_total - s.prefill_done for s in inst.prefilling])
            if sizes:
                chunks = [(inst.prefilling[i], c) for i, c in enumerate(sizes)]
                work = [(c, s.cached + s.prefill_done) for s, c in chunks]
                dt = prefill_step_time_s(tm, work, nd, inst.ctx_sum)
                pw = prefill_step_power_w(tm, work, nd, inst.ctx_sum)
                inst.busy = True
                inst.version += 1
                inst.cur = (t, 1, dt, 0.0, pw, True, chunks)
                self._push(t + dt, _STEP, inst, inst.version)
                return
        if nd:
            n = inst.heap[0][0] - inst.steps_done
            a = tm.decode_step_time_s(nd, inst.ctx_sum)
            d = tm.decode_step_time_s(nd, inst.ctx_sum + nd) - a
            # One draw for the whole stretch, at its mean context (context grows by nd tokens per step).
            pw = tm.step_power_w(0, nd, inst.ctx_sum + (nd * n) // 2)
            inst.busy = True
            inst.version += 1
            inst.cur = (t, n, a, d, pw, False, [])
            self._push(t + _cum(n, a, d), _STEP, inst, inst.version)

    def _commit(self, inst: _Instance, t: float) -> None:
        cur = inst.cur
        assert cur is not None
        t0, n, a, d, pw, is_prefill, chunks = cur
        nd = inst.n_decode
        inst.segments.append((t0, t, n, a, d, pw, inst.steps_done))
        if nd:  # the power controller's token-weighted TBT (orchestrator.sim.power)
            inst.tbt_gap_token_s += (t - t0) * nd
            inst.tbt_tokens += nd * n
        inst.steps_done += n
        inst.ctx_sum += nd * n
        inst.decode_tokens += nd * n
        inst.dirty = True
        # decoders that emitted their last token
        heap = inst.heap
        while heap and heap[0][0] <= inst.steps_done:
            _, _, s = heapq.heappop(heap)
            inst.n_decode -= 1
            inst.ctx_sum -= s.ctx_entry + (inst.steps_done - s.entry_step)
            self._finish_turn(inst, s, t)
        if not is_prefill:
            return
        for s, c in chunks:
            s.prefill_done += c
            inst.queued_prefill -= c
            inst.prefill_tokens += c
            inst.prefill_log.append((t0, t, s.ts, c))  # the step's span: energy books it where it ran
        done = [s for s, _ in chunks if s.prefill_done >= s.prefill_total]
        if not done:
            return
        inst.prefilling = [s for s in inst.prefilling if s.prefill_done < s.prefill_total]
        for s in done:
            ts = s.ts
            ts.prefill_end_s = t
            if s.kind == _FULL:
                # the step that finishes a prefill samples the first token
                ts.first_token_s = t
                ts.first_step = inst.steps_done
                inst.decode_tokens += 1
                inst.nondecode_kv -= ts.input_tokens
                if ts.output_tokens == 1:
                    ts.last_step = inst.steps_done
                    s.ctx_entry, s.entry_step = ts.input_tokens + 1, inst.steps_done
                    self._finish_turn(inst, s, t)
                    continue
                s.ctx_entry = ts.input_tokens + 1
                s.entry_step = inst.steps_done
                s.last_step = ts.last_step = inst.steps_done + ts.output_tokens - 1
                heapq.heappush(heap, (s.last_step, s.key, s))
                s.state = _D
                inst.n_decode += 1
                inst.ctx_sum += s.ctx_entry
            else:  # prefill-only: hand the KV to the decoder (which must allocate it first)
                s.state = _H
                partner = s.partner
                assert partner is not None
                dec = self.insts[ts.decode_inst]
                if handoff_refused(dec.healthy):  # re-placed now (orchestrator.core.failures)
                    self._restart(ts, t)
                    continue
                self._enqueue(dec, partner, t)

    def _finish_turn(self, inst: _Instance, s: _Seq, t: float) -> None:
        ts = s.ts
        s.state = _X
        ts.last_token_s = t
        if ts.first_step == ts.last_step and math.isnan(ts.first_token_s):
            ts.first_token_s = t
        inst.reserved -= s.reserve
        conv = self.convs[ts.conv]
        if inst.cache_on:
            inst.cache_put(s.cid, ts.input_tokens + ts.output_tokens, ts.turn < len(conv.turns))
        inst.dirty = True
        cid = conv.conversation_id
        self.policy.observe_turn_end(cid, ts.turn, ts.output_tokens)
        final = ts.turn >= len(conv.turns)
        if not final:  # the router's accounting after a turn: its whole context (Router._finish)
            self._pin_account(ts.conv, ts.input_tokens + ts.output_tokens)
        self.feedback.append(Feedback(t, cid, ts.turn, ts.output_tokens, final, self._next_call()))
        if self.admission and (final or self.rule.reserve is Reserve.TURN):
            self._adm_release(ts.conv, t)
        if ts.turn < len(conv.turns):
            gap = conv.turns[ts.turn].tool_gap_s
            if gap > 0:
                if self.gap_on:
                    self._gap_start(ts.conv, inst, t)
                self._push(t + gap, _ARRIVE, ts.conv, ts.turn + 1)
            else:  # no tool gap: the next turn is queued before the instance schedules its next step
                self._arrive(ts.conv, ts.turn + 1, t)
        else:
            self.policy.forget(cid)
            self._unpin(ts.conv)
            self.done += 1
            if self.progress is not None:
                self.progress(self.done, len(self.convs))

    def _xfer_done(self, s: _Seq, t: float) -> None:
        ts = s.ts
        if s.epoch != ts.epoch:
            return  # the turn was restarted after a failure
        src = self.insts[ts.prefill_inst]
        dec = self.insts[ts.decode_inst]
        p = s.partner
        assert p is not None
        # the prefiller frees its copy (kept in its prefix cache)
        p.state = _X
        s.state = _J
        src.reserved -= p.reserve
        src.nondecode_kv -= ts.input_tokens
        if src.cache_on and src.healthy:
            src.cache_put(p.cid, ts.input_tokens, False)
        src.dirty = True
        self._wake(src, t)
        if not dec.healthy:
            return
        dec.pending_join.append(s)
        dec.dirty = True
        self._wake(dec, t)

    # ---- failures ------------------------------------------------------------------------------------
    def _fail(self, inst: _Instance, t: float) -> None:
        """The instance stops: its sequences are re-placed (full re-prefill); turns elsewhere that depend
        on it restart too. It keeps drawing idle power (the GPU is still powered)."""
        if not inst.healthy:
            return
        if inst.busy and inst.cur is not None:
            t0, n, a, d, pw, is_pre, _ = inst.cur
            m = 0 if is_pre else _steps_by(t - t0, a, d, n)
            # bill the interrupted step(s) up to the failure; the partial work is lost
            inst.segments.append((t0, t, m, a, d, pw, inst.steps_done))
            inst.steps_done += m
        inst.healthy = False
        inst.busy = False
        inst.cur = None
        inst.version += 1
        inst.dirty = True
        victims = [
            st[-1]
            for st in self.turn_states
            if st and any(q.inst == inst.idx and q.state != _X for q in st[-1].seqs)
        ]
        for q in list(inst.waiting) + inst.prefilling + [x[2] for x in inst.heap] + inst.pending_join:
            q.state = _X
        inst.waiting.clear()
        inst.prefilling.clear()
        inst.heap.clear()
        inst.pending_join.clear()
        inst.cache.clear()
        inst.live.clear()
        inst.live_total = 0
        inst.n_decode = inst.ctx_sum = inst.reserved = inst.nondecode_kv = 0
        inst.cache_total = inst.queued_prefill = inst.running_other = 0
        for ts in victims:
            for q in ts.seqs:
                if q.inst == inst.idx:
                    q.state = _X
            self._restart(ts, t)
        if self.adm_parked:  # decisions waiting for room on the failed instance are taken again
            lost = [
                ts
                for ts, pl in self.adm_parked
                if pl.decode_instance == inst.id or pl.prefill_instance == inst.id
            ]
            self.adm_parked = [(ts, pl) for ts, pl in self.adm_parked if ts not in lost]
            self.adm_waiting[:0] = lost
        if self.admission:
            self._adm_retry(t)

    def _restart(self, ts: _TurnState, t: float) -> None:
        """Re-place a turn that lost an instance: release its footprint on healthy instances, place again."""
        ts.epoch += 1
        touched = []
        for q in ts.seqs:
            if q.state != _X and self.insts[q.inst].healthy:
                inst = self.insts[q.inst]
                # an abandoned remote prefill's prompt KV stays in the prefiller's prefix cache
                # (orchestrator.core.failures)
                kept = (
                    abandoned_prefill_cached_tokens(q.ts.input_tokens, q.cached, q.prefill_done)
                    if q.kind == _PREFILL_ONLY and q.state in (_P, _H) and inst.cache_on
                    else 0
                )
                self._release(inst, q)
                if kept:
                    inst.cache_put(q.cid, kept, False)
                touched.append(inst)
        ts.seqs = []
        ts.restarts += 1
        ts.prefill_start_s = ts.prefill_end_s = ts.kv_admit_s = ts.first_token_s = math.nan
        ts.transfer_tokens = ts.transfer_bytes = ts.first_step = ts.last_step = ts.history_tokens = 0
        for inst in touched:
            self._wake(inst, t)
        self._arrive(ts.conv, ts.turn, t, ts)

    def _release(self, inst: _Instance, q: _Seq) -> None:
        inp = q.ts.input_tokens
        st = q.state
        if st == _W:
            inst.waiting.remove(q)
            if q.kind != _DECODE_ONLY:
                inst.queued_prefill -= q.queued_estimate
        elif st == _P:
            inst.prefilling.remove(q)
            inst.queued_prefill -= q.prefill_total - q.prefill_done
            inst.reserved -= q.reserve
            inst.nondecode_kv -= inp
        elif st == _H:
            inst.reserved -= q.reserve
            inst.nondecode_kv -= inp
        elif st in (_T, _J):
            if st == _J:
                inst.pending_join.remove(q)
            inst.running_other -= 1
            inst.nondecode_kv -= inp
            inst.reserved -= q.reserve
        elif st == _D:
            inst.heap = [x for x in inst.heap if x[2] is not q]
            heapq.heapify(inst.heap)
            inst.n_decode -= 1
            inst.ctx_sum -= q.ctx_entry + (inst.steps_done - q.entry_step)
            inst.reserved -= q.reserve
        q.state = _X
        inst.dirty = True
