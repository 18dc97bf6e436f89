"""Interconnects: KV-cache transfer time between tiers and the intra-node link used by tensor parallelism.

Pure; must not import fastapi, sqlalchemy, httpx -- nor orchestrator (``LinkType`` here mirrors
``orchestrator.config.LinkType`` value for value, so a config value converts with ``LinkType(str(value))``).

Transfer model (per prefill->decode hand-off of `tokens` tokens):

    bytes   = tokens * kv_bytes_per_token
    t_s     = small_transfer_s                         if bytes <= small_transfer_max_bytes
            = latency_s + bytes / bandwidth_bytes_per_s otherwise

``pcie`` is the *calibrated* same-node default: the ConServe artifact measured LMCache-over-NIXL transfers
between two A40s of one node (shared/data/conserve/cost_model_constants.csv, network_kv_transfer.csv):
4.849 ms flat up to 1,024 tokens, then 5.27 ms + 0.985 us/token, for Qwen3-0.6B (114,688 B/token). In bytes:
the knee is 1,024 x 114,688 B = 117.4 MB and the slope is 114,688 B / 0.985 us = 116.4 GB/s, so the same
model scales with any model's KV size. Note that 116.4 GB/s is above PCIe 4.0 x16's 31.5 GB/s per direction:
the measured hand-off overlaps part of the copy with other work (or used the A40's NVLink bridge, 112.5 GB/s);
we keep the measured value because it is what the paper's stack achieved.

The other links have no measurement in shared/data: they keep the measured stack's software cost (the 4.849 ms
floor, 5.27 ms offset: LMCache/NIXL bookkeeping, not wire time) and replace the slope by the link's datasheet
bandwidth. These are modelled, not measured.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from tiers.errors import CatalogError

# ConServe artifact, cost_model_constants.csv (NETWORK_* rows) and KV_BYTES_PER_TOKEN (Qwen3-0.6B).
_A40_FLAT_S = 4.849e-3
_A40_KNEE_TOKENS = 1024
_A40_OFFSET_S = 5.27e-3
_A40_SLOPE_S_PER_TOKEN = 0.985e-6
_QWEN3_06B_KV_BYTES = 114_688


class LinkType(StrEnum):
    NVLINK = "nvlink"
    PCIE = "pcie"
    INFINIBAND = "infiniband"
    ETHERNET = "ethernet"


@dataclass(frozen=True, slots=True)
class LinkSpec:
    link: LinkType
    bandwidth_bytes_per_s: float
    latency_s: float
    small_transfer_s: float
    small_transfer_max_bytes: float
    source: str


LINKS: dict[LinkType, LinkSpec] = {
    LinkType.PCIE: LinkSpec(
        LinkType.PCIE,
        _QWEN3_06B_KV_BYTES / _A40_SLOPE_S_PER_TOKEN,  # 116.4 GB/s, measured (see module docstring)
        _A40_OFFSET_S,
        _A40_FLAT_S,
        _A40_KNEE_TOKENS * _QWEN3_06B_KV_BYTES,
        "measured: ConServe artifact A40 node, LMCache over NIXL (cost_model_constants.csv)",
    ),
    # NVLink 4 (H100 SXM datasheet): 900 GB/s bidirectional per GPU = 450 GB/s per direction.
    LinkType.NVLINK: LinkSpec(
        LinkType.NVLINK,
        450e9,
        _A40_OFFSET_S,
        _A40_FLAT_S,
        _A40_KNEE_TOKENS * _QWEN3_06B_KV_BYTES,
        "modelled: NVLink 4 datasheet bandwidth + the measured LMCache/NIXL software cost",
    ),
    # InfiniBand NDR (NVIDIA ConnectX-7 datasheet): 400 Gb/s per port = 50 GB/s.
    LinkType.INFINIBAND: LinkSpec(
        LinkType.INFINIBAND,
        50e9,
        _A40_OFFSET_S,
        _A40_FLAT_S,
        _A40_KNEE_TOKENS * _QWEN3_06B_KV_BYTES,
        "modelled: InfiniBand NDR 400 Gb/s datasheet bandwidth + the measured LMCache/NIXL software cost",
    ),
    # 100 Gigabit Ethernet (IEEE 802.3ba/bj): 12.5 GB/s line rate.
    LinkType.ETHERNET: LinkSpec(
        LinkType.ETHERNET,
        12.5e9,
        _A40_OFFSET_S,
        _A40_FLAT_S,
        _A40_KNEE_TOKENS * _QWEN3_06B_KV_BYTES,
        "modelled: 100 GbE line rate + the measured LMCache/NIXL software cost",
    ),
}


def link_spec(link: LinkType | str) -> LinkSpec:
    try:
        return LINKS[LinkType(str(link))]
    except ValueError:
        raise CatalogError(
            f"unknown link type {link!r}. To fix: use one of {', '.join(t.value for t in LinkType)}."
        ) from None


def kv_transfer_time_s(tokens: int, kv_bytes_per_token: int, link: LinkType | str) -> float:
    """Seconds to hand `tokens` tokens of KV cache (kv_bytes_per_token each) over `link`."""
    if tokens <= 0:
        return 0.0
    spec = link_spec(link)
    nbytes = tokens * kv_bytes_per_token
    if nbytes <= spec.small_transfer_max_bytes:
        return spec.small_transfer_s
    return spec.latency_s + nbytes / spec.bandwidth_bytes_per_s


# Intra-node GPU-to-GPU bandwidth per direction, used by tensor parallelism's all-reduces (tiers.perf).
# Sources: NVIDIA A100 datasheet (NVLink 3: 600 GB/s bidirectional), H100/H200 SXM datasheets (NVLink 4:
# 900 GB/s), HGX B200 datasheet (NVLink 5: 1.8 TB/s), AMD MI300X datasheet (Infinity Fabric: 896 GB/s peer
# aggregate), PCIe 4.0 x16 (31.5 GB/s per direction) for PCIe boards without NVLink (A40 NVLink bridges pair
# only two GPUs, so TP > 2 on A40 goes over PCIe).
_TP_LINK_BYTES_PER_S: dict[str, float] = {
    "A100-80GB-SXM": 300e9,
    "H100-SXM": 450e9,
    "H200-SXM": 450e9,
    "B200": 900e9,
    "MI300X": 448e9,
    "A40": 31.5e9,
    "L40S": 31.5e9,
    "L4": 31.5e9,
}
_PCIE4_X16_BYTES_PER_S = 31.5e9


def tp_link_bandwidth_bytes_per_s(gpu_name: str) -> float:
    """Per-direction GPU-to-GPU bandwidth inside a node (PCIe 4.0 x16 for GPUs not in the table)."""
    return _TP_LINK_BYTES_PER_S.get(gpu_name, _PCIE4_X16_BYTES_PER_S)
