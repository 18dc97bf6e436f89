"""Prometheus metrics of one app: its own CollectorRegistry (no process globals), router hooks, fleet gauges.

Counters/histograms are updated by the router through the RouterObserver hooks (once per turn, not per
chunk); the per-instance gauges (health, KV occupancy, pins, queues) are read from the router when
/metrics is scraped, so they cost nothing on the request path.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

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


class ApiMetrics:
    """The app's metrics; implements orchestrator.router.RouterObserver."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "conserve_requests", "HTTP requests to the serving endpoints", ["endpoint", "status"], registry=r
        )
        self.turns = Counter(
            "conserve_turns",
            "turns recorded, by status and whether final",
            ["status", "final", "remote_prefill"],
            registry=r,
        )
        self.ttft = Histogram(
            "conserve_ttft_seconds",
            "arrival of a turn to its first token",
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.ttfet = Histogram(
            "conserve_ttfet_seconds",
            "arrival of turn 1 to the first token of the final turn",
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.tbt = Histogram(
            "conserve_tbt_seconds",
            "gap between consecutive tokens of a turn",
            buckets=_TBT_BUCKETS_S,
            registry=r,
        )
        self.output_tokens = Counter("conserve_output_tokens", "tokens decoded", registry=r)
        self.prompt_tokens = Counter("conserve_prompt_tokens", "prompt tokens of every turn", registry=r)
        self.kv_transfers = Counter(
            "conserve_kv_transfers", "KV transfers prefiller -> decoder", ["prefill", "decode"], registry=r
        )
        self.kv_transfer_bytes = Counter(
            "conserve_kv_transfer_bytes", "bytes the prefillers reported sending", registry=r
        )
        self.replacements = Counter(
            "conserve_replacements", "conversations re-placed on another decoder", registry=r
        )
        self.retries = Counter(
            "conserve_retries", "turns retried after an engine failure", ["instance"], registry=r
        )

        self._turn_children: dict[tuple[Any, bool, bool], Any] = {}

    def attach_fleet(self, status: Callable[[], list[dict[str, Any]]]) -> None:
        self.registry.register(_FleetCollector(status))

    # RouterObserver
    def turn_done(
        self, rec: TurnRecord, ttft_s: float | None, tbt_gaps_s: list[float], ttfet_s: float | None
    ) -> None:
        key = (rec.status, rec.is_final, rec.remote_prefill)
        child = self._turn_children.get(key)
        if child is None:  # bind the label set once (labels() costs a lock and a dict lookup per call)
            final, remote = ("true" if f else "false" for f in (rec.is_final, rec.remote_prefill))
            child = self._turn_children[key] = self.turns.labels(str(rec.status), final, remote)
        child.inc()
        if ttft_s is not None:
            self.ttft.observe(ttft_s)
        if ttfet_s is not None:
            self.ttfet.observe(ttfet_s)
        obs = self.tbt.observe
        for g in tbt_gaps_s:
            obs(g)
        self.output_tokens.inc(rec.output_tokens)
        self.prompt_tokens.inc(rec.prompt_tokens)

    def kv_transfer(self, prefill_instance: str, decode_instance: str, nbytes: int) -> None:
        self.kv_transfers.labels(prefill_instance, decode_instance).inc()
        if nbytes:
            self.kv_transfer_bytes.inc(nbytes)

    def replaced(self, conversation_id: str, old_instance: str | None, new_instance: str) -> None:
        self.replacements.inc()

    def retried(self, instance_id: str) -> None:
        self.retries.labels(instance_id).inc()
