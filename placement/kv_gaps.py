"""Pinned KV across tool gaps (issue 12 item 3): keep it, offload it to host memory, or drop it.

A pinned conversation holds its decoder's KV through a tool gap that may last minutes. This rule decides, from
what is observable while the gap runs -- the decoder's KV pressure and how long the conversation has already
been idle -- what to do with that KV. No prediction of the tool's duration.

- **No pressure** (the decoder has no waiting request and free KV): ``KEEP``. Holding costs nothing a release
  would save: HBM draws the same power whether its blocks hold KV or not, and the next turn starts from the
  prefix cache.
- **Pressure** (requests wait on the decoder, or its KV is full): the idle conversation's KV displaces work
  that could run. Releasing it costs the conversation a *restore* on its next turn: reading the KV back from
  host memory (``OFFLOAD``, when the host tier has room) or re-prefilling its whole context (``DROP``); the
  cheaper one (in seconds on the next turn's critical path) is the release mechanism. The conversation keeps
  its KV while it has been idle for less than that restore time and releases it after: the deterministic
  ski-rental rule (rent until the rent paid equals the price of buying; 2-competitive against an oracle that
  knew the gap, Karlin et al., "Competitive randomized algorithms for non-uniform problems", 1988). A gap
  shorter than a restore never pays one; a long gap holds KV at most as long as its restore would take.

Energy of each (:func:`gap_costs`, modelled from the tier power model, never measured):
    keep     0 J beyond what the GPUs draw anyway;
    offload  copy out + copy back over the host link, billed at the decoder's idle draw for the copy time
             (the copy engines run while the SMs idle; no DMA power measurement of the A40 exists here);
    drop     the re-prefill of the whole context on the decoder (TierModel.prefill_energy_j).

Pure; must not import fastapi, sqlalchemy, httpx, or anything that reads wall-clock time; no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from placement.base import InstanceView
from placement.errors import PlacementError
from tiers.perf import TierModel

__all__ = [
    "GapAction",
    "GapCosts",
    "HostMemory",
    "PCIE4_X16_BYTES_PER_S",
    "gap_action",
    "gap_costs",
    "kv_pressure",
]

# PCIe 4.0 x16, per direction: 31.5 GB/s (PCI-SIG PCIe 4.0 specification: 16 GT/s x 16 lanes, 128b/130b; the
# link of the NVIDIA A40, A40 datasheet). Host <-> GPU copies of offloaded KV cross it.
PCIE4_X16_BYTES_PER_S = 31.5e9


class GapAction(StrEnum):
    KEEP = "keep"
    OFFLOAD = "offload"  # KV copied to host memory; copied back when the next turn arrives
    DROP = "drop"  # KV freed; the next turn re-prefills the whole context


@dataclass(frozen=True, slots=True)
class HostMemory:
    """The host-memory KV tier of one decoder: its link bandwidth and how many bytes of KV it may hold."""

    capacity_bytes: float
    bandwidth_bytes_per_s: float = PCIE4_X16_BYTES_PER_S

    def __post_init__(self) -> None:
        if not self.capacity_bytes >= 0 or not self.bandwidth_bytes_per_s > 0:
            raise PlacementError(
                f"host memory needs capacity_bytes >= 0 and bandwidth_bytes_per_s > 0, got "
                f"{self.capacity_bytes} and {self.bandwidth_bytes_per_s}. To fix: e.g. 256e9 and 31.5e9."
            )


@dataclass(frozen=True, slots=True)
class GapCosts:
    """What releasing a conversation's KV costs its next turn (seconds) and the fleet (joules), modelled."""

    kv_bytes: float
    offload_restore_s: float | None  # None: no host tier
    offload_energy_j: float | None
    drop_restore_s: float
    drop_energy_j: float


def gap_costs(context_tokens: int, tm: TierModel, host: HostMemory | None) -> GapCosts:
    """Restore time and energy of each release mechanism for a context of `context_tokens` on tier `tm`."""
    kv_bytes = float(context_tokens * tm.model.kv_bytes_per_token)
    if host is None:
        off_s, off_j = None, None
    else:
        off_s = kv_bytes / host.bandwidth_bytes_per_s  # copy back before the next turn's prefill
        off_j = 2.0 * off_s * tm.idle_w  # out and back, at the idle draw (module docstring)
    return GapCosts(
        kv_bytes, off_s, off_j, tm.prefill_time_s(context_tokens), tm.prefill_energy_j(context_tokens)
    )


def kv_pressure(decoder: InstanceView) -> bool:
    """The decoder's KV is wanted: requests wait on it (vLLM's num_requests_waiting), or its KV is full."""
    return decoder.waiting_seqs > 0 or decoder.kv_free_tokens <= 0


def gap_action(idle_s: float, pressure: bool, costs: GapCosts, host_free_bytes: float = 0.0) -> GapAction:
    """Keep, offload or drop an idle pinned conversation's KV (module docstring): keep without pressure; under
    pressure keep until it has been idle as long as the cheaper restore takes, then release that way."""
    if not pressure:
        return GapAction.KEEP
    offload_ok = costs.offload_restore_s is not None and host_free_bytes >= costs.kv_bytes
    if offload_ok and costs.offload_restore_s is not None and costs.offload_restore_s <= costs.drop_restore_s:
        action, restore_s = GapAction.OFFLOAD, costs.offload_restore_s
    else:
        action, restore_s = GapAction.DROP, costs.drop_restore_s
    return GapAction.KEEP if idle_s < restore_s else action
