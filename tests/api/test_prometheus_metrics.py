"""api/metrics.py: the loop-only counters and histograms expose what prometheus_client's own would."""

from __future__ import annotations

from datetime import UTC, datetime

from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from api.metrics import _TBT_BUCKETS_S, ApiMetrics, LoopHistogram
from energy.records import TurnRecord, TurnStatus

T0 = datetime(2025, 1, 1, tzinfo=UTC)


def _samples(registry: CollectorRegistry, name: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in registry.collect():
        for s in fam.samples:
            if s.name.startswith(name) and not s.name.endswith("_created"):
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


# bounds themselves (le is inclusive), values between them, above the last bound and 0
values = st.lists(
    st.one_of(st.sampled_from((0.0, *_TBT_BUCKETS_S, 2.0)), st.floats(0, 5, allow_nan=False)), max_size=60
)


@settings(max_examples=60, deadline=None)
@given(values)
def test_loop_histogram_matches_prometheus_client(xs: list[float]) -> None:
    ref_reg, loop_reg = CollectorRegistry(), CollectorRegistry()
    ref = Histogram("h_seconds", "doc", buckets=_TBT_BUCKETS_S, registry=ref_reg)
    mine = LoopHistogram("h_seconds", "doc", _TBT_BUCKETS_S)

    class C:
        def collect(self):  # type: ignore[no-untyped-def]
            yield mine.family()

    loop_reg.register(C())  # type: ignore[arg-type]
    for x in xs[:30]:
        ref.observe(x)
        mine.observe(x)
    for x in xs[30:]:
        ref.observe(x)
    mine.observe_many(xs[30:])
    got, want = _samples(loop_reg, "h_seconds"), _samples(ref_reg, "h_seconds")
    assert got.keys() == want.keys()
    for k in want:
        assert abs(got[k] - want[k]) <= 1e-9 * max(1.0, abs(want[k])), k
    assert mine.count == len(xs)


def test_turn_counters_in_the_exposition() -> None:
    m = ApiMetrics()
    rec = TurnRecord(
        "c", 1, "r", "d0", T0, output_tokens=5, prompt_tokens=40, is_final=True, remote_prefill=True
    )
    m.turn_done(rec, 0.2, [0.01, 0.02], 0.3)
    m.turn_done(TurnRecord("c", 2, "r2", "d0", T0, status=TurnStatus.ERROR), None, [], None)
    m.request_done("chat", 200)
    m.request_done("chat", 200)
    m.request_done("chat", 404)
    m.kv_transfer("p0", "d0", 1024)
    m.retried("d1")
    text = generate_latest(m.registry).decode()
    for line in (
        'conserve_requests_total{endpoint="chat",status="200"} 2.0',
        'conserve_requests_total{endpoint="chat",status="404"} 1.0',
        'conserve_turns_total{final="true",remote_prefill="true",status="ok"} 1.0',
        'conserve_turns_total{final="false",remote_prefill="false",status="error"} 1.0',
        "conserve_ttft_seconds_count 1.0",
        'conserve_ttft_seconds_bucket{le="0.25"} 1.0',
        "conserve_tbt_seconds_count 2.0",
        "conserve_output_tokens_total 5.0",
        "conserve_prompt_tokens_total 40.0",
        'conserve_kv_transfers_total{decode="d0",prefill="p0"} 1.0',
        "conserve_kv_transfer_bytes_total 1024.0",
        'conserve_retries_total{instance="d1"} 1.0',
        "conserve_replacements_total 0.0",
    ):
        assert line in text.splitlines(), line
