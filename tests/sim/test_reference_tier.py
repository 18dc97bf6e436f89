"""The standalone normaliser of a model that does not fit one GPU: the reference instance is the smallest
allowed TP that holds the model with room for KV, the same one for the planner and the simulator (before: the
simulator always took TP 1, so `plan` of Llama-3.1-70B on H200/H100 failed its verification with "standalone
holds 0" KV tokens)."""

from __future__ import annotations

from orchestrator.config import parse_fleet
from orchestrator.fleet import tier_model
from orchestrator.planner import demand_from_stats, fleet_stats, tier_supplies
from orchestrator.sim.fleet import reference_tier_model
from placement import ilp


def _fleet(model: str, gpu: str, tp: list[int]) -> dict:
    return {
        "model": model,
        "tiers": [{"name": "g", "gpu": gpu, "count": 8, "tp": tp, "link": "nvlink"}],
        "workload": {
            "format": "synthetic",
            "synthetic": {"turn1_input_tokens_median": 4000, "turn1_input_tokens_sigma": 0.0, "turns_mean": 1,
                          "output_tokens_mean": 500},
            "conversations": 50,
            "arrival_rate_per_s": 1.0,
        },
        "reference_tier": "g",
    }  # fmt: skip


def test_a_model_that_does_not_fit_one_gpu_is_normalised_on_the_smallest_tp_that_holds_it() -> None:
    cfg = parse_fleet(_fleet("Llama-3.1-70B", "H200-SXM", [1, 2, 4, 8]))
    ref = reference_tier_model(cfg)
    assert ref.tp > 1 and ref.kv_capacity_tokens > 0
    assert tier_model(cfg, "g", None, 1).kv_capacity_tokens == 0  # why TP 1 cannot be the reference
    # the planner's reference is the same instance: same standalone prefill and decode step
    demand = demand_from_stats(fleet_stats(cfg))
    planned = ilp.reference_for(tier_supplies(cfg), demand, "g")
    assert planned == ilp.reference_latencies(ref, demand, "g")


def test_a_model_that_fits_one_gpu_keeps_tp_1() -> None:
    cfg = parse_fleet(_fleet("Llama-3.1-8B", "H200-SXM", [1, 2, 4, 8]))
    assert reference_tier_model(cfg).tp == 1
