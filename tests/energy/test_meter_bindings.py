"""Meters (issue 14 item 1.6): DCGM deltas follow the exporter's samples, the DCGM hostname filter comes from
fleet.yaml, engines sharing a meter without gpu_indices are refused with a fix-it message, and a replay
trace recorded at another time replays from when the meter starts."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from energy.accounting import build_accountant
from energy.errors import EnergyError
from energy.ledger import Ledger
from energy.meters import DcgmMeter, ReplayMeter
from energy.records import EnergySample
from orchestrator.config import parse_fleet
from orchestrator.fleet import InstanceSpec, tier_model
from placement.base import Role

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
LINE = 'DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION{{gpu="{g}",Hostname="{h}"}} {mj}{ts}\n'


def page(counters: dict[int, int], host: str = "node-1", ts: datetime | None = None, extra: str = "") -> str:
    stamp = f" {int(ts.timestamp() * 1000)}" if ts else ""
    return "".join(LINE.format(g=g, h=host, mj=mj, ts=stamp) for g, mj in counters.items()) + extra


class Clock:
    def __init__(self) -> None:
        self.t = T0

    def __call__(self) -> datetime:
        return self.t


def test_dcgm_deltas_follow_the_exporters_refresh_not_the_scrape_clock() -> None:
    # a 5 s exporter scraped every second: the counter changes once per 5 scrapes (400 W -> 2000 J per 5 s)
    values = [0, 0, 0, 0, 0, 2_000_000, 2_000_000, 2_000_000, 2_000_000, 2_000_000, 4_000_000]
    pages = iter(page({0: v}) for v in values)
    clock = Clock()
    m = DcgmMeter("http://node-1:9400/metrics", [0], clock=clock, fetch=lambda url: next(pages))
    readings = []
    for _ in values[1:]:
        clock.t += timedelta(seconds=1)
        readings.append(m.read())
    # unchanged scrapes repeat the previous reading (same time): no 0 J one-second intervals
    distinct = sorted({(r.at - T0).total_seconds(): r.cumulative_j[0] for r in readings}.items())
    assert distinct == [(0.0, 0.0), (5.0, 2000.0), (10.0, 4000.0)]


def test_dcgm_uses_the_samples_own_timestamps_when_present() -> None:
    pages = iter([page({0: 0}, ts=T0), page({0: 1_000_000}, ts=T0 + timedelta(seconds=2.5))])
    clock = Clock()
    m = DcgmMeter("http://x/metrics", [0], clock=clock, fetch=lambda url: next(pages))
    clock.t += timedelta(seconds=4)  # the scrape is later than the sample
    r = m.read()
    assert r.at == T0 + timedelta(seconds=2.5) and r.cumulative_j[0] == 1000.0


def test_dcgm_text_of_two_hosts_needs_the_hostname_from_fleet_yaml(tmp_path: Path) -> None:
    two = page({0: 5_000}, "node-1") + page({0: 9_000}, "node-2")
    with pytest.raises(EnergyError, match=r"2 hosts \(node-1, node-2\).*meters\[\]\.hostname"):
        DcgmMeter("http://agg/metrics", [0], fetch=lambda url: two)
    cfg = parse_fleet(
        {
            "model": "Qwen3-0.6B",
            "backend": "vllm",
            "tiers": [{"name": "a40", "gpu": "A40", "count": 1}],
            "engines": [
                {
                    "id": "d0",
                    "tier": "a40",
                    "role": "decode",
                    "url": "http://h:8000",
                    "meter": "m",
                    "gpu_indices": [0],
                }
            ],  # fmt: skip
            "meters": [{"id": "m", "kind": "dcgm", "url": "http://agg/metrics", "hostname": "node-2"}],
        }
    )
    assert cfg.meters[0].hostname == "node-2"
    import energy.meters as meters

    real = meters.DcgmMeter

    def with_page(*a, **kw):  # the accountant builds the meter: serve it the two-host page
        return real(*a, **kw, fetch=lambda url: two)

    meters_make = meters.make_meter

    def make(kind, **kw):
        if kind == "dcgm":
            return with_page(kw["url"], kw["gpu_indices"], kw["meter_id"], hostname=kw["hostname"])
        return meters_make(kind, **kw)

    import energy.accountant as accounting  # build_accountant looks make_meter up in its own module

    orig = accounting.make_meter
    accounting.make_meter = make
    try:
        with Ledger(f"sqlite:///{tmp_path / 'l.db'}") as lg:
            acct = build_accountant(
                lg, [InstanceSpec("d0", "a40", Role.DECODE, tier_model(cfg, "a40"))], cfg=cfg
            )
            assert acct.meters["m"].read().cumulative_j == {0: 0.0}
            assert acct.meters["m"].hostname == "node-2"
    finally:
        accounting.make_meter = orig


def test_engines_sharing_a_meter_without_gpu_indices_are_refused(tmp_path: Path) -> None:
    cfg = parse_fleet(
        {
            "model": "Qwen3-0.6B",
            "backend": "vllm",
            "tiers": [{"name": "a40", "gpu": "A40", "count": 2}],
            "engines": [
                {"id": "p0", "tier": "a40", "role": "prefill", "url": "http://h:8000", "meter": "node"},
                {"id": "d0", "tier": "a40", "role": "decode", "url": "http://h:8001", "meter": "node"},
            ],
            "meters": [{"id": "node", "kind": "replay", "path": str(tmp_path / "x.jsonl")}],
        }
    )
    tm = tier_model(cfg, "a40")
    insts = [InstanceSpec("p0", "a40", Role.PREFILL, tm), InstanceSpec("d0", "a40", Role.DECODE, tm)]
    with Ledger(f"sqlite:///{tmp_path / 'l.db'}") as lg, pytest.raises(EnergyError) as info:
        build_accountant(lg, insts, cfg=cfg)
    msg = str(info.value)
    assert "share meter 'node'" in msg and "To fix: give every engine" in msg and "gpu_indices" in msg


def test_replay_of_a_trace_from_another_day_starts_when_the_meter_starts() -> None:
    yesterday = T0 - timedelta(days=1)
    recorded = [EnergySample("m", 0, yesterday + timedelta(seconds=s), 100.0 * s) for s in range(0, 61, 10)]
    clock = Clock()
    m = ReplayMeter(recorded, clock=clock)
    assert m.offset_s == pytest.approx(86_400.0)
    assert m.read().cumulative_j == {0: 0.0}
    clock.t += timedelta(seconds=15)
    assert m.read().cumulative_j[0] == pytest.approx(1500.0)  # 100 W, as recorded
    clock.t += timedelta(seconds=600)
    assert m.read().cumulative_j[0] == pytest.approx(6000.0)  # flat after the recording ends
