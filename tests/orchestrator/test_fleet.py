"""Tier models per tier/cap/TP, plan files and instance lists (orchestrator/fleet.py)."""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import pytest

from orchestrator.config import parse_fleet
from orchestrator.errors import ConfigError
from orchestrator.fleet import (
    Plan,
    PlanPredictions,
    Pool,
    instances_from_plan,
    load_plan,
    save_plan,
    tier_model,
)
from placement.base import Role

CFG = parse_fleet(
    {
        "model": "Qwen3-0.6B",
        "tiers": [
            {"name": "a40", "gpu": "A40", "count": 4, "power_caps_w": [300, 200]},
            {"name": "h100", "gpu": "H100-SXM", "count": 2, "tp": [1, 2]},
        ],
    }
)


def _plan(pools: tuple[Pool, ...]) -> Plan:
    preds = PlanPredictions(1.0, 6, 4, 500.0, 0.0, 500.0, 1e4, 20.0, 10.0, 5.0, 2.0, 30.0, 14.0, 2.1)
    return Plan(model="Qwen3-0.6B", objective="energy", pools=pools, predictions=preds, notes=("why",))


def test_tier_model_caps_and_tp() -> None:
    full = tier_model(CFG, "a40")
    capped = tier_model(CFG, "a40", power_cap_w=200)
    assert capped.cap_w == 200 and full.cap_w == 300
    assert capped.prefill_time_s(16000) > full.prefill_time_s(16000)  # a cap slows compute-bound prefill
    assert tier_model(CFG, "h100", tp=2).gpus == 2
    with pytest.raises(ConfigError, match=r"tiers\.a40\.tp: tensor-parallel size 2 is not allowed"):
        tier_model(CFG, "a40", tp=2)
    with pytest.raises(ConfigError, match="tier 'a4' is not in the fleet. Did you mean 'a40'"):
        tier_model(CFG, "a4")


def test_plan_roundtrip_and_instances(tmp_path: Path) -> None:
    plan = _plan((Pool("a40", "prefill", 1, 1, 300.0, 1), Pool("a40", "decode", 3, 1, 200.0, 3)))
    path = save_plan(plan, tmp_path / "plan.yaml")
    assert load_plan(path) == plan
    insts = instances_from_plan(CFG, load_plan(path))
    assert [i.instance_id for i in insts] == ["a40-prefill-0", "a40-decode-0", "a40-decode-1", "a40-decode-2"]
    assert insts[0].role is Role.PREFILL and insts[1].tier_model.cap_w == 200
    assert instances_from_plan(CFG, plan) == insts  # stable ids


def test_instances_check_gpu_budget_and_roles() -> None:
    with pytest.raises(ConfigError, match="would use 5 GPUs but has 4"):
        instances_from_plan(CFG, _plan((Pool("a40", "decode", 5, 1, 300.0, 5),)))
    with pytest.raises(ConfigError, match="role 'colocated' is not allowed"):
        instances_from_plan(CFG, _plan((Pool("a40", "colocated", 1, 1, 300.0, 1),)))


def test_save_is_atomic(tmp_path: Path) -> None:
    target = tmp_path / "plan.yaml"
    good = _plan((Pool("a40", "decode", 1, 1, 300.0, 1),))
    save_plan(good, target)
    before = target.read_text()
    with (
        mock.patch("tiers.fileio.os.replace", autospec=True, side_effect=OSError("disk full")),
        pytest.raises(OSError),
    ):
        save_plan(_plan((Pool("a40", "decode", 2, 1, 300.0, 2),)), target)
    assert target.read_text() == before  # the old plan is intact
    assert [p.name for p in tmp_path.iterdir()] == ["plan.yaml"]  # no temp file left behind


def test_load_plan_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_plan(tmp_path / "none.yaml")
    p = tmp_path / "p.yaml"
    p.write_text("model: x\nobjective: energy\npools: []\n")
    with pytest.raises(ConfigError, match="predictions: required field is missing"):
        load_plan(p)
