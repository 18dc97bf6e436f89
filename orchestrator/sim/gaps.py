"""The keep / offload / drop rule for KV across tool gaps, closed loop in the simulator (issue 12 item 3;
``SimOptions.kv_gap_rule``).

When a turn of a conversation that has more turns ends and its next turn comes after a tool gap, the
conversation's KV (prompt + output of the turn) sits in its decoder's prefix cache and, if it is pinned, in
the driver's pin accounting (the view counts it as used KV). The rule (placement/kv_gaps.py ``gap_action``) is
applied while the gap runs, from what is observable: the decoder's KV pressure (a request waits on it, or its
KV is full as the policies see it) and the time already idle.

- It is first evaluated when the conversation has been idle as long as the cheaper release's restore would
  take (before that, ``gap_action`` keeps under any pressure); from then on, whenever the decoder is under
  pressure until the next turn arrives. Pressure is checked each time the instance plans a step, after it
  admitted what it could (``kv_pressure`` on its view: a request still waits, or its KV is full as the
  policies see it, pinned conversations counted), and when it must evict cached KV to admit a request (its KV
  is full; checked before the prefix cache's LRU evicts, so an offload saves what the LRU would have lost).
- **offload**: the KV leaves the decoder's cache for its host-memory tier (``SimOptions.kv_gap_host``,
  per decoder, its capacity shared by that decoder's offloaded conversations); the driver counts the
  conversation for 0 KV tokens on its pin, so the policies see the room. The next turn waits the copy back
  (``gap_costs``: bytes / host-link bandwidth) before it is placed; the KV is then in the decoder's prefix
  cache again and the turn prefills only its new tokens.
- **drop**: the KV leaves the cache and the pin accounting; the next turn re-prefills its whole context on
  the decoder (the simulator's step rule, ``tiers.steps``, prices it like any prefill). A drop is applied only
  when the engine must evict cached KV to admit a request, oldest idle conversation first, for the room that
  admission needs beyond the cached KV of conversations that have ended (the driver knows a conversation has
  ended: its last turn ended without tool calls): a cached entry is room the engine can take anyway, and
  dropping every idle conversation past its hold under any pressure re-prefilled 26-37 million tokens on
  examples/fleet-long-gaps.yaml where the prefix cache's LRU alone lost 0.75-31 million
  (docs/paper-reproduction.md).
- **keep**: nothing moves. The prefix cache may still evict the entry when an admission needs the room (LRU,
  as without the rule): counted as ``evicted_while_kept`` (the next turn found less than it left).

Energy (modelled): the copies out and back are billed at the decoder's idle draw for their duration
(``gap_costs``), added to the run's energy (``SimResult.energy_j``); a re-prefill is billed as the steps that
run it. The rule never sees a tool's duration.

Mixin over :class:`orchestrator.sim.base.SimBase`; engine.py combines it with the other parts.
"""

from __future__ import annotations

from orchestrator.sim.base import _GAP, SimBase
from orchestrator.sim.instance import _Instance
from orchestrator.sim.result import KvGapStats
from placement.kv_gaps import GapAction, GapCosts, gap_action, gap_costs, kv_pressure


class _Gap:
    """One open tool gap of a conversation: where its KV is and what the rule did with it."""

    __slots__ = ("action", "costs", "dec", "hold_s", "offloaded", "serial", "start_s", "tokens", "released_s")

    def __init__(self, dec: int, start_s: float, tokens: int, costs: GapCosts, serial: int) -> None:
        self.dec = dec
        self.start_s = start_s
        self.tokens = tokens
        self.costs = costs
        self.serial = serial
        self.action = GapAction.KEEP
        self.offloaded = 0  # tokens copied to host memory
        self.hold_s = 0.0  # the hold the last check was scheduled for (idle seconds)
        self.released_s = float("nan")


class GapRule(SimBase):
    def _gap_init(self) -> None:
        self.gap_on = self.opts.kv_gap_rule
        self.gap_host = self.opts.kv_gap_host
        self.gap_open: dict[int, _Gap] = {}
        self.gap_eligible: list[dict[int, None]] = [{} for _ in self.insts]  # past their hold, no pressure
        self.host_used_bytes = [0.0] * len(self.insts)
        self.gap_restoring: dict[int, tuple[int, int]] = {}  # conversation -> (instance, tokens) copied back
        self.gap_serial = 0
        self.gap_counts = {"gaps": 0, "kept": 0, "offloaded": 0, "dropped": 0, "evicted_while_kept": 0}
        self.gap_restore_s = 0.0
        self.gap_copy_j = 0.0
        self.gap_idle_token_s = 0.0
        self.gap_released_token_s = 0.0

    def _host_free(self, idx: int) -> float:
        return 0.0 if self.gap_host is None else self.gap_host.capacity_bytes - self.host_used_bytes[idx]

    def _gap_start(self, ci: int, inst: _Instance, t: float) -> None:
        """A turn of conversation `ci` ended on `inst` and its next turn comes after a tool gap."""
        cid = self.convs[ci].conversation_id
        tokens = inst.cache.get(cid, 0) if inst.cache_on else 0
        if tokens <= 0:
            return
        self.gap_serial += 1
        g = _Gap(inst.idx, t, tokens, gap_costs(tokens, inst.tm, self.gap_host), self.gap_serial)
        self.gap_open[ci] = g
        self.gap_counts["gaps"] += 1
        self._gap_schedule(ci, g, t)

    def _gap_schedule(self, ci: int, g: _Gap, t: float) -> None:
        """The next time the rule can release: idle for the restore time of the release it would choose."""
        action = gap_action(float("inf"), True, g.costs, self._host_free(g.dec))
        hold = g.costs.offload_restore_s if action is GapAction.OFFLOAD else g.costs.drop_restore_s
        assert hold is not None
        g.hold_s = hold
        self._push(max(t, g.start_s + hold), _GAP, ci, g.serial)

    def _gap_check(self, ci: int, serial: int, t: float) -> None:
        """A gap's hold time is over: release under pressure now, else wait for pressure on its decoder."""
        g = self.gap_open.get(ci)
        if g is None or g.serial != serial or g.action is not GapAction.KEEP:
            return
        inst = self.insts[g.dec]
        if not inst.healthy:
            return
        pressure = kv_pressure(inst.make_view())
        # idle at least the hold this check was scheduled for: start + hold - start may round below hold
        idle = max(t - g.start_s, g.hold_s)
        action = gap_action(idle, pressure, g.costs, self._host_free(g.dec))
        if action is GapAction.OFFLOAD:
            self._gap_release(ci, g, action, t)
        elif action is GapAction.DROP:  # a drop waits until an admission needs the room (module doc)
            self.gap_eligible[g.dec][ci] = None
        elif pressure:  # the host tier filled meanwhile: the slower release's hold is not over yet
            self._gap_schedule(ci, g, t)
        else:
            self.gap_eligible[g.dec][ci] = None

    def _gap_pressure_check(self, inst: _Instance, t: float, need_tokens: int = 0) -> None:
        """Called when `inst` has admitted what it could (pressure: as its view shows, ``kv_pressure``) and
        when it must evict `need_tokens` > 0 of cached KV to admit a request (its KV is full, seen before the
        LRU evicts): under pressure, offload its idle conversations past their hold; drop them, oldest idle
        first, only for the room an admission needs beyond the cached KV of conversations that have ended."""
        eligible = self.gap_eligible[inst.idx]
        if not eligible or not (need_tokens > 0 or kv_pressure(inst.make_view())):
            return
        # the cached KV of conversations that have ended covers that much of the need first
        need_tokens -= inst.cache_total - inst.live_total
        for ci in list(eligible):
            g = self.gap_open.get(ci)
            if g is None:
                eligible.pop(ci, None)
                continue
            action = gap_action(max(t - g.start_s, g.hold_s), True, g.costs, self._host_free(g.dec))
            if action is GapAction.KEEP or (action is GapAction.DROP and need_tokens <= 0):
                continue
            if action is GapAction.DROP:
                need_tokens -= inst.cache.get(self.convs[ci].conversation_id, 0)
            eligible.pop(ci, None)
            self._gap_release(ci, g, action, t)

    def _gap_release(self, ci: int, g: _Gap, action: GapAction, t: float) -> None:
        inst = self.insts[g.dec]
        cid = self.convs[ci].conversation_id
        tokens = inst.cache_take(cid) if inst.cache_on else 0
        g.action = action
        g.released_s = t
        if action is GapAction.OFFLOAD and tokens > 0:
            assert self.gap_host is not None
            nbytes = tokens * inst.kvb
            self.host_used_bytes[g.dec] += nbytes
            g.offloaded = tokens
            self.gap_copy_j += nbytes / self.gap_host.bandwidth_bytes_per_s * inst.tm.idle_w  # copy out
            self.gap_counts["offloaded"] += 1
        else:
            self.gap_counts["dropped"] += 1
        if self.pin_state[ci].pin == inst.id:
            self._pin_account(ci, 0)  # the driver no longer counts its KV on the decoder
        inst.dirty = True

    def _gap_end(self, ci: int, t: float) -> float:
        """Turn k+1 of `ci` arrived at `t`: close its gap; the seconds it waits for its KV's copy back."""
        g = self.gap_open.pop(ci, None)
        if g is None:
            return 0.0
        self.gap_eligible[g.dec].pop(ci, None)
        held_until = t if g.action is GapAction.KEEP else g.released_s
        self.gap_idle_token_s += g.tokens * (t - g.start_s)
        self.gap_released_token_s += g.tokens * (t - held_until)
        inst = self.insts[g.dec]
        if g.action is GapAction.KEEP:
            self.gap_counts["kept"] += 1
            if inst.cache_on and inst.cache.get(self.convs[ci].conversation_id, 0) < g.tokens:
                self.gap_counts["evicted_while_kept"] += 1
            return 0.0
        if not g.offloaded:
            return 0.0
        assert self.gap_host is not None
        nbytes = g.offloaded * inst.kvb
        self.host_used_bytes[g.dec] -= nbytes
        if not inst.healthy:  # the decoder is gone: the turn is re-placed from its history anyway
            return 0.0
        restore = nbytes / self.gap_host.bandwidth_bytes_per_s
        self.gap_copy_j += restore * inst.tm.idle_w  # copy back
        self.gap_restore_s += restore
        self.gap_restoring[ci] = (g.dec, g.offloaded)
        return restore

    def _gap_restored(self, ci: int) -> None:
        """The copy back ended: the KV is in the decoder's prefix cache again (then the turn is placed)."""
        got = self.gap_restoring.pop(ci, None)
        if got is None:
            return
        inst = self.insts[got[0]]
        if inst.healthy and inst.cache_on:
            inst.cache_put(self.convs[ci].conversation_id, got[1], True)
            inst.cache_evict(0)  # room as any cache entry: the LRU ones go first
            inst.dirty = True

    def _gap_stats(self) -> KvGapStats | None:
        if not self.gap_on:
            return None
        c = self.gap_counts
        return KvGapStats(
            gaps=c["gaps"],
            kept=c["kept"],
            offloaded=c["offloaded"],
            dropped=c["dropped"],
            evicted_while_kept=c["evicted_while_kept"],
            restore_s=self.gap_restore_s,
            copy_energy_j=self.gap_copy_j,
            idle_kv_token_s=self.gap_idle_token_s,
            released_kv_token_s=self.gap_released_token_s,
        )
