"""Prometheus metrics of one app: its own CollectorRegistry (no process globals), router hooks, fleet gauges.

Request and turn counters and the latency histograms are plain Python numbers updated by the router's
RouterObserver hooks and the serving endpoints, once per turn, on the event loop only; a collector turns
them into Prometheus families when /metrics is scraped (an async route: on the same loop, so a scrape never
sees half an update). prometheus_client's own Counter/Histogram take a lock per increment and two per
observation: ~22 locked increments per streamed 8-token turn, ~15% of the router's Python time per request
(cProfile of the in-process request path, BENCHMARKS.md router overhead). The per-instance gauges (health,
KV occupancy, pins, queues) are read from the router at scrape time too.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter as Tally
from collections.abc import Callable, Iterable, Iterator
from contextvars import ContextVar
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from energy.estimate import EnergyEstimates, co2e_g, usage_energy
from energy.records import TurnRecord

# Buckets: TTFT/TTFET span ms (sim, short prompts) to minutes (16k-token prefills queued behind others).
_LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
# TBT: decode steps are ~12 ms on an A40 (DESIGN.md s4) and faster/slower per tier and batch.
_TBT_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1)


class _FleetCollector(Collector):
    def __init__(self, status: Callable[[], list[dict[str, Any]]]) -> None:
        self._status = status

    def collect(self) -> Iterator[Any]:
        labels = ["instance", "role", "tier"]
        healthy = GaugeMetricFamily(
            "conserve_instance_healthy", "1 if the instance is healthy", labels=labels
        )
        occ = GaugeMetricFamily(
            "conserve_instance_kv_occupancy",
            "KV used / capacity as the router sees it (max of engine and pin accounting)",
            labels=labels,
        )
        pins = GaugeMetricFamily(
            "conserve_pinned_conversations", "conversations pinned to the instance", labels=labels
        )
        queued = GaugeMetricFamily(
            "conserve_instance_queued_prefill_tokens",
            "prefill tokens in flight on the instance (router accounting)",
            labels=labels,
        )
        running = GaugeMetricFamily(
            "conserve_instance_running_requests", "requests in flight via this router", labels=labels
        )
        xfer = CounterMetricFamily(
            "conserve_instance_kv_transfers_in", "KV transfers accepted by the instance", labels=labels
        )
        for s in self._status():
            lv = [s["instance_id"], s["role"], s["tier"]]
            healthy.add_metric(lv, 1.0 if s["healthy"] else 0.0)
            occ.add_metric(lv, s["kv_occupancy"])
            pins.add_metric(lv, s["pinned_conversations"])
            queued.add_metric(lv, s["queued_prefill_tokens"])
            running.add_metric(lv, s["inflight_requests"])
            xfer.add_metric(lv, s["kv_transfers_in"])
        yield from (healthy, occ, pins, queued, running, xfer)


class LoopHistogram:
    """A Prometheus histogram kept as bucket counts (event loop only, no lock). ``le`` is inclusive."""

    __slots__ = ("name", "doc", "bounds", "counts", "total")

    def __init__(self, name: str, doc: str, bounds: Iterable[float]) -> None:
        self.name, self.doc = name, doc
        self.bounds = tuple(float(b) for b in bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last is +Inf
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    def observe_many(self, values: Iterable[float]) -> None:
        counts, bounds = self.counts, self.bounds
        for v in values:
            counts[bisect_left(bounds, v)] += 1
            self.total += v

    @property
    def count(self) -> int:
        return sum(self.counts)

    def family(self) -> HistogramMetricFamily:
        buckets, running = [], 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += n
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), running))
        return HistogramMetricFamily(self.name, self.doc, buckets=buckets, sum_value=self.total)


def _labelled(name: str, doc: str, labels: list[str], values: Tally[tuple[str, ...]]) -> CounterMetricFamily:
    fam = CounterMetricFamily(name, doc, labels=labels)
    for lv, n in sorted(values.items()):
        fam.add_metric(list(lv), float(n))
    return fam


class _ServingCollector(Collector):
    def __init__(self, m: ApiMetrics) -> None:
        self._m = m

    def collect(self) -> Iterator[Any]:
        m = self._m
        yield _labelled(
            "conserve_requests", "HTTP requests to the serving endpoints", ["endpoint", "status"], m.requests
        )
        turns: Tally[tuple[str, ...]] = Tally()
        for (status, final, remote), n in m.turns.items():
            turns[(str(status), "true" if final else "false", "true" if remote else "false")] += n
        yield _labelled(
            "conserve_turns",
            "turns recorded, by status and whether final",
            ["status", "final", "remote_prefill"],
            turns,
        )
        yield from (m.ttft.family(), m.ttfet.family(), m.tbt.family())
        yield CounterMetricFamily("conserve_output_tokens", "tokens decoded", value=m.output_tokens)
        yield CounterMetricFamily(
            "conserve_prompt_tokens", "prompt tokens of every turn", value=m.prompt_tokens
        )
        yield _labelled(
            "conserve_kv_transfers",
            "KV transfers prefiller -> decoder",
            ["prefill", "decode"],
            m.kv_transfers,
        )
        yield CounterMetricFamily(
            "conserve_kv_transfer_bytes", "bytes the prefillers reported sending", value=m.kv_transfer_bytes
        )
        yield CounterMetricFamily(
            "conserve_replacements", "conversations re-placed on another decoder", value=m.replacements
        )
        yield _labelled("conserve_retries", "turns retried after an engine failure", ["instance"], m.retries)


# The turn a non-streaming request just finished, for its response's usage.energy (api/routes_openai.py,
# api/fastpath.py): set by the route before it awaits the router; the router calls turn_done in the same task.
TURN_CAPTURE: ContextVar[list[TurnRecord] | None] = ContextVar("conserve_turn_capture", default=None)


class _EnergyCollector(Collector):
    """Joules and watts per engine and per tier (from the energy accountant's meters), carbon from the
    fleet's grid intensity, and estimated joules per tenant (from the usage.energy estimates)."""

    def __init__(self, snapshot: Callable[[], list[tuple[str, str, str, float, float]]],
                 g_per_kwh: float, tenant_j: Callable[[], dict[str, float]]) -> None:  # fmt: skip
        self._snapshot = snapshot
        self._g_per_kwh = g_per_kwh
        self._tenant_j = tenant_j

    def collect(self) -> Iterator[Any]:
        labels = ["instance", "tier", "source"]
        joules = CounterMetricFamily(
            "conserve_energy_joules",
            "energy of the instance's GPUs since serve started (source: measured by a meter or modelled)",
            labels=labels,
        )
        watts = GaugeMetricFamily(
            "conserve_power_watts",
            "mean draw of the instance's GPUs over the latest meter interval",
            labels=labels,
        )
        tier_j = CounterMetricFamily(
            "conserve_tier_energy_joules",
            "energy of a tier's instances since serve started",
            labels=["tier", "source"],
        )
        tier_w = GaugeMetricFamily(
            "conserve_tier_power_watts",
            "draw of a tier's instances over the latest interval",
            labels=["tier", "source"],
        )
        carbon = CounterMetricFamily(
            "conserve_carbon_grams",
            f"gCO2e of the instance's energy at {self._g_per_kwh:g} gCO2e/kWh "
            "(fleet.yaml grid_carbon_g_per_kwh)",
            labels=labels,
        )
        tiers: dict[tuple[str, str], list[float]] = {}
        for engine, tier, source, j, w in self._snapshot():
            joules.add_metric([engine, tier, source], j)
            watts.add_metric([engine, tier, source], w)
            carbon.add_metric([engine, tier, source], co2e_g(j, self._g_per_kwh))
            acc = tiers.setdefault((tier, source), [0.0, 0.0])
            acc[0] += j
            acc[1] += w
        for (tier, source), (j, w) in sorted(tiers.items()):
            tier_j.add_metric([tier, source], j)
            tier_w.add_metric([tier, source], w)
        tenant = CounterMetricFamily(
            "conserve_tenant_energy_estimated_joules",
            "estimated joules of the turns served per tenant (tier model, as in usage.energy; "
            "'default' until API keys name tenants)",
            labels=["tenant"],
        )
        for t, j in sorted(self._tenant_j().items()):
            tenant.add_metric([t], j)
        yield from (joules, watts, tier_j, tier_w, carbon, tenant)


class ApiMetrics:
    """The app's metrics; implements orchestrator.router.RouterObserver. Updated on the event loop only."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests: Tally[tuple[str, ...]] = Tally()  # (endpoint, status)
        self.turns: Tally[tuple[Any, bool, bool]] = Tally()  # (status, final, remote prefill)
        self.ttft = LoopHistogram(
            "conserve_ttft_seconds", "arrival of a turn to its first token", _LATENCY_BUCKETS_S
        )
        self.ttfet = LoopHistogram(
            "conserve_ttfet_seconds",
            "arrival of turn 1 to the first token of the final turn",
            _LATENCY_BUCKETS_S,
        )
        self.tbt = LoopHistogram(
            "conserve_tbt_seconds", "gap between consecutive tokens of a turn", _TBT_BUCKETS_S
        )
        self.output_tokens = 0
        self.prompt_tokens = 0
        self.kv_transfers: Tally[tuple[str, ...]] = Tally()  # (prefill, decode)
        self.kv_transfer_bytes = 0
        self.replacements = 0
        self.retries: Tally[tuple[str, ...]] = Tally()  # (instance,)
        self.estimates: EnergyEstimates | None = None  # attach_energy
        self.registry.register(_ServingCollector(self))

    def attach_fleet(self, status: Callable[[], list[dict[str, Any]]]) -> None:
        self.registry.register(_FleetCollector(status))

    def attach_energy(self, accountant: Any, g_per_kwh: float) -> None:
        """Energy series from ``accountant`` (energy.accounting.EnergyAccountant) and per-turn estimates."""
        estimates = self.estimates = EnergyEstimates(accountant.weights_by_engine())
        self.registry.register(
            _EnergyCollector(accountant.power_snapshot, g_per_kwh, lambda: dict(estimates.tenant_j))
        )

    def usage_energy(self, rec: TurnRecord | None, conversation_id: str | None) -> dict[str, Any] | None:
        """usage.energy for a finished turn (None without energy accounting)."""
        if rec is None or self.estimates is None:
            return None
        got = self.estimates.last.get(rec.request_id)
        if got is None:
            return None
        est, so_far = got
        return usage_energy(est, so_far, conversation_id)

    def request_done(self, endpoint: str, status: int | str) -> None:
        self.requests[(endpoint, str(status))] += 1

    # RouterObserver
    def turn_done(
        self, rec: TurnRecord, ttft_s: float | None, tbt_gaps_s: list[float], ttfet_s: float | None
    ) -> None:
        self.turns[(rec.status, rec.is_final, rec.remote_prefill)] += 1
        if self.estimates is not None and str(rec.status) == "ok":
            self.estimates.record(rec)
        capture = TURN_CAPTURE.get()
        if capture is not None:
            capture.append(rec)
        if ttft_s is not None:
            self.ttft.observe(ttft_s)
        if ttfet_s is not None:
            self.ttfet.observe(ttfet_s)
        if tbt_gaps_s:
            self.tbt.observe_many(tbt_gaps_s)
        self.output_tokens += rec.output_tokens
        self.prompt_tokens += rec.prompt_tokens

    def kv_transfer(self, prefill_instance: str, decode_instance: str, nbytes: int) -> None:
        self.kv_transfers[(prefill_instance, decode_instance)] += 1
        self.kv_transfer_bytes += nbytes

    def replaced(self, conversation_id: str, old_instance: str | None, new_instance: str) -> None:
        self.replacements += 1

    def forgotten(self, conversation_id: str) -> None:
        """The router forgot the conversation: so does its running energy estimate (issue 13 item 5)."""
        if self.estimates is not None:
            self.estimates.forget(conversation_id)

    def retried(self, instance_id: str) -> None:
        self.retries[(instance_id,)] += 1
