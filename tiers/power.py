"""Power model of one GPU: idle + dynamic draw by activity, limited by a power cap.

Pure functions of floats (no catalog lookups), used by :mod:`tiers.perf` to precompute per-tier constants.
Must not import fastapi, sqlalchemy or httpx.

The model (symbols as in the code):

    dyn_w     = tdp_w - idle_w                       dynamic range of one GPU
    demand_w  = idle_w + frac * dyn_w                what an activity would draw at full clocks
    draw_w    = idle_w + min(frac * dyn_w, cap_w - idle_w)      the power limiter holds draw <= cap
    slowdown  = max(1, frac * dyn_w / (cap_w - idle_w)) ** (1 / cap_exponent)

``frac`` is the activity's demand as a fraction of the dynamic range (it may exceed 1: such work is throttled
even at TDP). The slowdown follows from DVFS: dynamic power grows ~ f**cap_exponent with the SM clock f, and
compute-bound time ~ 1/f, so holding dynamic power at (cap - idle) stretches compute by the factor above.
Memory-bound time is *not* stretched: a cap lowers SM clocks, not the memory clock, which is why a 200 W cap
barely changes A40 decode (shared/data/conserve/decode_grid_diff_200W_vs_300W.csv, within +-10%) while it
slows long prefills by 22-46% (prefill_vs_L_300W_200W.csv). The demand fractions per activity and the
exponent are fitted in :mod:`tiers.calibration`.

Memory traffic has a floor the cap cannot go under: moving a bit to or from DRAM costs the memory devices a
fixed energy whatever the SM clock (Micron, "Ultra-Bandwidth Solutions" memory comparison,
https://www.micron.com/products/ultra-bandwidth-solutions: average device power 7.5 pJ/bit for GDDR6, 6.0 for
HBM2E). So memory-bound work streaming at ``bw_bytes_per_s`` needs at least ``dram_w = bw * 8 * pj_per_bit``
above idle; a cap leaving less than that stretches memory time (energy per bit conserved):

    mem_slowdown = max(1, dram_w / (cap_w - idle_w))

This is a lower bound on the slowdown (the GPU side of the interface, the memory controllers and the SMs at
their lowest clock draw too). It never binds at 200 W on the A40 (35 W of DRAM traffic against 123 W of
headroom), matching the measured +-10% of decode_grid_diff_200W_vs_300W.csv; at the A40's 100 W minimum
(23 W above its 77 W idle) it slows memory-bound decode 1.54x. Without it the model let a 100 W cap cut a
decode step's dynamic energy to 5 pJ/bit moved (issue 14: "lower caps cost nothing"), below what the DRAM
devices alone draw. GPUs without a per-bit figure here (HBM3/HBM3e parts) get no floor.

Idle: the catalog's idle_w (A40 77 W measured with vLLM loaded, ConServe artifact cost_model_constants.csv;
A100 63 W and H100 75 W from Splitwise's configs/power_model/constant.yaml).
"""

from __future__ import annotations

from tiers.errors import CatalogError

# Splitwise's constant per-phase power model (Mutinifni/splitwise-sim configs/power_model/constant.yaml,
# copied in shared/data/splitwise/configs_power_model_constant.yaml): watts per GPU.
SPLITWISE_POWER_W: dict[str, dict[str, float]] = {
    "A100-80GB-SXM": {"idle": 63.0, "prefill": 400.0, "decode": 250.0},
    "H100-SXM": {"idle": 75.0, "prefill": 700.0, "decode": 380.0},
}


# DRAM device energy per bit moved, by catalog GPU (Micron's memory comparison cited in the module docstring):
# GDDR6 7.5 pJ/bit (A40, L40S, L4 carry GDDR6 per their NVIDIA datasheets), HBM2E 6.0 pJ/bit (A100 80GB).
DRAM_PJ_PER_BIT: dict[str, float] = {
    "A40": 7.5,
    "L40S": 7.5,
    "L4": 7.5,
    "A100-80GB-SXM": 6.0,
}


def dram_traffic_w(bw_bytes_per_s: float, pj_per_bit: float | None) -> float:
    """Watts above idle the DRAM devices draw streaming ``bw_bytes_per_s`` (0 without a per-bit figure)."""
    if pj_per_bit is None:
        return 0.0
    return bw_bytes_per_s * 8.0 * pj_per_bit * 1e-12


def mem_cap_slowdown(dram_w: float, idle_w: float, cap_w: float) -> float:
    """Factor (>= 1) by which memory-bound work slows when the cap leaves less than ``dram_w`` above idle."""
    head = cap_w - idle_w
    if dram_w <= head:
        return 1.0
    return dram_w / head


def check_cap(cap_w: float, idle_w: float, gpu_name: str) -> None:
    """A cap at or below idle draw cannot be honoured by any workload."""
    if cap_w <= idle_w:
        raise CatalogError(
            f"power cap {cap_w:g} W for {gpu_name} is not above its idle draw {idle_w:g} W. "
            "To fix: choose a cap above the idle power (or correct idle_w in the GPU spec)."
        )


def draw_w(frac: float, idle_w: float, tdp_w: float, cap_w: float) -> float:
    """Draw of one GPU doing an activity of demand fraction `frac`, under cap `cap_w` (>= idle_w)."""
    dyn = max(frac, 0.0) * (tdp_w - idle_w)
    return idle_w + min(dyn, cap_w - idle_w)


def cap_slowdown(frac: float, idle_w: float, tdp_w: float, cap_w: float, cap_exponent: float) -> float:
    """Factor (>= 1) by which compute-bound work of demand fraction `frac` slows under cap `cap_w`."""
    over = max(frac, 0.0) * (tdp_w - idle_w) / (cap_w - idle_w)
    if over <= 1.0:
        return 1.0
    return float(over ** (1.0 / cap_exponent))
