"""Measured power-cap curves (tiers/capcurves.py): the file round trip, the slowdown interpolation, the tier
model's hook (compute-bound prefill and memory-bound decode stretched by the curves), and fleet.yaml loading
that refuses a CPU run. The curve values below are made up for the tests, not measurements."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from orchestrator.config import parse_fleet
from orchestrator.errors import ConfigError
from orchestrator.fleet import tier_model
from tiers.capcurves import CapCurves, CapPoint, load_cap_curves, save_cap_curves
from tiers.catalog import get_gpu
from tiers.errors import ProfileError
from tiers.models import get_model
from tiers.perf import TierModel

GPU_CURVES = CapCurves(
    gpu="A40", device="cuda", gpu_measured=True, caps_applied=True, power_measured=True,
    source="made up for tests",
    points=(CapPoint(300.0, 100.0, 600.0, 298.0, 210.0), CapPoint(250.0, 90.0, 600.0, 249.0, 205.0),
            CapPoint(200.0, 75.0, 570.0, 199.0, 198.0)),
)  # fmt: skip
CPU_CURVES = CapCurves(None, "cpu", False, False, False, "made up: a CPU run", (CapPoint(None, 0.05, 8.0),))


def test_file_round_trip(tmp_path: Path) -> None:
    save_cap_curves(GPU_CURVES, tmp_path / "c.yaml", header="made up for tests")
    assert (tmp_path / "c.yaml").read_text().startswith("# made up for tests\n")
    assert load_cap_curves(tmp_path / "c.yaml") == GPU_CURVES


def test_slowdowns_interpolate_hold_outside_and_never_speed_up() -> None:
    assert GPU_CURVES.slowdowns(300.0) == (1.0, 1.0)
    assert GPU_CURVES.slowdowns(200.0) == pytest.approx((100 / 75, 600 / 570))
    assert GPU_CURVES.slowdowns(225.0)[0] == pytest.approx(100 / 82.5)  # midway between 250 and 200 W
    assert GPU_CURVES.slowdowns(150.0) == GPU_CURVES.slowdowns(200.0)  # held below the lowest cap
    assert GPU_CURVES.slowdowns(400.0) == (1.0, 1.0)
    noisy = replace(GPU_CURVES, points=(CapPoint(300.0, 100.0, 600.0), CapPoint(200.0, 101.0, 605.0)))
    assert noisy.slowdowns(200.0) == (1.0, 1.0)


@pytest.mark.parametrize(
    ("bad", "match"),
    [({"points": []}, "points"), ({"version": 9}, "version 9"), ({"gpu_measured": "maybe"}, "gpu_measured")],
    ids=["no-points", "version", "bad-bool"],
)
def test_bad_files_name_the_field(tmp_path: Path, bad: dict[str, object], match: str) -> None:
    save_cap_curves(GPU_CURVES, tmp_path / "c.yaml")
    data = yaml.safe_load((tmp_path / "c.yaml").read_text()) | bad
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(ProfileError, match=match):
        load_cap_curves(tmp_path / "c.yaml")


def _tm(cap: float | None, curves: CapCurves | None) -> TierModel:
    return TierModel(get_gpu("A40"), get_model("Llama-3.1-8B"), power_cap_w=cap, cap_curves=curves)


def test_the_tier_model_stretches_compute_and_memory_time_by_the_curves() -> None:
    s_c, s_m = GPU_CURVES.slowdowns(200.0)
    n = 16_384
    full, capped = _tm(None, GPU_CURVES), _tm(200.0, GPU_CURVES)
    overhead = full.calibration.prefill_overhead_s  # fixed time: not stretched
    assert capped.prefill_time_s(n) - overhead == pytest.approx((full.prefill_time_s(n) - overhead) * s_c)
    # a memory-bound decode step: weights + KV reads stretched by the memory curve
    gpu_fixed = full.calibration.layer_overhead_s * full.model.layers
    b, ctx = 8, 8 * 4096
    per_seq = full.calibration.gpu_per_sequence_s * b
    d_full = full.decode_step_time_s(b, ctx) - gpu_fixed - per_seq
    d_capped = capped.decode_step_time_s(b, ctx) - gpu_fixed - per_seq
    assert d_capped == pytest.approx(d_full * s_m)
    # without curves the modelled DVFS slowdown applies: memory-bound decode is unchanged by the cap
    no_curves = _tm(200.0, None).decode_step_time_s(b, ctx)
    assert no_curves == pytest.approx(_tm(None, None).decode_step_time_s(b, ctx))
    assert full.without_profile().cap_curves is GPU_CURVES


def _fleet(tmp_path: Path, curves: CapCurves) -> dict[str, object]:
    save_cap_curves(curves, tmp_path / "curves.yaml")
    return {"model": "Llama-3.1-8B", "tiers": [{"name": "a40", "gpu": "A40", "count": 2,
            "power_caps_w": [200, 300], "cap_curves": "curves.yaml"}]}  # fmt: skip


def test_fleet_yaml_names_the_curves_file(tmp_path: Path) -> None:
    from orchestrator.config import load_fleet

    (tmp_path / "fleet.yaml").write_text(yaml.safe_dump(_fleet(tmp_path, GPU_CURVES)))
    cfg = load_fleet(tmp_path / "fleet.yaml")  # relative path: beside the fleet file
    assert tier_model(cfg, "a40", 200.0).cap_curves == GPU_CURVES
    n = 16_384
    assert tier_model(cfg, "a40", 200.0).prefill_time_s(n) == _tm(200.0, GPU_CURVES).prefill_time_s(n)
    assert tier_model(cfg, "a40", 200.0).prefill_time_s(n) != _tm(200.0, None).prefill_time_s(n)


def test_a_cpu_run_is_refused_as_a_tiers_curves(tmp_path: Path) -> None:
    cfg = parse_fleet(_fleet(tmp_path, CPU_CURVES), base_dir=tmp_path)
    with pytest.raises((ProfileError, ConfigError), match=r"tiers\.a40\.cap_curves: .*cpu.*no cap applied"):
        tier_model(cfg, "a40")


def test_another_gpus_curves_are_refused(tmp_path: Path) -> None:
    cfg = parse_fleet(_fleet(tmp_path, replace(GPU_CURVES, gpu="H100-SXM")), base_dir=tmp_path)
    with pytest.raises(ProfileError, match="measured on GPU 'H100-SXM' but the tier's GPU is 'A40'"):
        tier_model(cfg, "a40")
