"""KV transfer model: the A40 node's measured two-regime model as the calibrated 'pcie' default."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from tiers.errors import CatalogError
from tiers.links import LINKS, LinkType, kv_transfer_time_s, link_spec

QWEN_KV = 114_688


def test_pcie_reproduces_the_papers_model(shared_data: Path) -> None:
    path = shared_data / "conserve" / "network_kv_transfer.csv"
    for r in csv.DictReader(path.open()):
        n = int(r["L_tokens"])
        model_ms = kv_transfer_time_s(n, QWEN_KV, LinkType.PCIE) * 1e3
        assert model_ms == pytest.approx(float(r["model_ms_per_turn_cost_model"]), abs=0.01), n
        if r["net_p50_ms_measured"]:
            measured = float(r["net_p50_ms_measured"])
            print(f"L={n}: measured p50 {measured} ms, model {model_ms:.3f} ms")
            assert model_ms == pytest.approx(measured, rel=0.20)


def test_links_are_ordered_and_monotonic() -> None:
    big = 65_536
    t = {link: kv_transfer_time_s(big, QWEN_KV, link) for link in LinkType}
    assert t[LinkType.NVLINK] < t[LinkType.INFINIBAND] < t[LinkType.ETHERNET]
    for link in LinkType:
        times = [kv_transfer_time_s(n, QWEN_KV, link) for n in (0, 1, 1024, 1025, 8192, 65536)]
        assert times[0] == 0.0
        assert all(a <= b for a, b in zip(times, times[1:], strict=False))


def test_scales_with_kv_bytes() -> None:
    # the knee and slope are in bytes: 4x the bytes per token reach the knee at 1/4 of the tokens
    assert kv_transfer_time_s(4096, 4 * QWEN_KV, "pcie") == pytest.approx(
        kv_transfer_time_s(16384, QWEN_KV, "pcie")
    )


def test_values_match_orchestrator_enum() -> None:
    from orchestrator.config import LinkType as ConfigLinkType

    assert {v.value for v in ConfigLinkType} == {v.value for v in LinkType}
    assert set(LINKS) == set(LinkType)
    assert kv_transfer_time_s(100_000, QWEN_KV, ConfigLinkType.ETHERNET) > 0


def test_unknown_link() -> None:
    with pytest.raises(CatalogError, match="To fix"):
        link_spec("carrier-pigeon")
