"""Measured profiles: file format, errors naming the field, atomic save, and the override of the roofline."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from tiers.catalog import get_gpu
from tiers.errors import ProfileError
from tiers.models import get_model
from tiers.perf import TierModel
from tiers.profiles import (
    DecodePoint,
    MeasuredProfile,
    PrefillPoint,
    apply_profile,
    load_profile,
    parse_profile,
    save_profile,
)


def a40(cap: float | None = None) -> TierModel:
    return TierModel(get_gpu("A40"), get_model("Qwen3-0.6B"), power_cap_w=cap)


def profile(**kw: object) -> MeasuredProfile:
    base = MeasuredProfile(
        gpu="A40",
        model="Qwen3-0.6B",
        tp=1,
        power_cap_w=300,
        source="unit test",
        energy_measured=True,
        prefill=(
            PrefillPoint(1024, 0, 50.0, 10.0),
            PrefillPoint(4096, 0, 150.0, 36.0),
            PrefillPoint(16384, 0, 800.0, 200.0),
        ),
        decode=(
            DecodePoint(1, 1024, 20.0, 3.0),
            DecodePoint(8, 65536, 25.0, 5.0),
            DecodePoint(32, 131072, 40.0, 9.0),
        ),
        idle_w=80.0,
    )
    return replace(base, **kw)  # type: ignore[arg-type]


def test_round_trip(tmp_path: Path) -> None:
    p = profile()
    path = tmp_path / "sub" / "a40.yaml"
    save_profile(p, path)
    assert load_profile(path) == p
    assert [f.name for f in path.parent.iterdir()] == ["a40.yaml"]  # no temp file left behind


def test_save_is_atomic_on_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "a40.yaml"
    save_profile(profile(), path)
    before = path.read_text()

    def boom(*_: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("tiers.fileio.os.replace", boom)
    with pytest.raises(OSError):
        save_profile(profile(source="other"), path)
    assert path.read_text() == before
    assert [f.name for f in tmp_path.iterdir()] == ["a40.yaml"]


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda d: d["decode"][1].update(step_ms=-1), r"decode\[1\]\.step_ms"),
        (lambda d: d["prefill"][0].pop("latency_ms"), r"prefill\[0\]\.latency_ms"),
        (lambda d: d.pop("energy_measured"), "energy_measured"),
        (lambda d: d.update(tp=0), "tp"),
        (lambda d: d.update(gpu="A4O"), "gpu"),
        (lambda d: d.update(modle="x"), "modle"),
        (lambda d: d.update(prefill=[], decode=[]), "no points"),
    ],
    ids=[
        "negative-step",
        "missing-latency",
        "missing-energy-flag",
        "tp-zero",
        "typo-gpu",
        "unknown-key",
        "empty",
    ],
)
def test_errors_name_the_field(tmp_path: Path, mutate: object, field: str) -> None:
    from tiers.profiles import profile_to_dict

    d = profile_to_dict(profile())
    mutate(d)  # type: ignore[operator]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(d))
    with pytest.raises(ProfileError, match=field):
        load_profile(path)


def test_unreadable_and_non_mapping(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="cannot read"):
        load_profile(tmp_path / "missing.yaml")
    with pytest.raises(ProfileError, match="mapping"):
        parse_profile([1, 2])
    (tmp_path / "x.yaml").write_text("gpu: [unclosed")
    with pytest.raises(ProfileError, match="YAML"):
        load_profile(tmp_path / "x.yaml")


def test_profile_overrides_roofline_at_points() -> None:
    base, prof = a40(), profile()
    tm = apply_profile(base, prof)
    for p in prof.prefill:
        assert tm.prefill_time_s(p.new_tokens) == pytest.approx(p.latency_ms / 1e3, rel=1e-9)
        assert tm.prefill_time_s(p.new_tokens) != pytest.approx(base.prefill_time_s(p.new_tokens), rel=0.01)
        assert tm.prefill_energy_j(p.new_tokens) == pytest.approx(p.energy_j, rel=1e-9)
    for d in prof.decode:
        assert tm.decode_step_time_s(d.batch, d.context_tokens) == pytest.approx(d.step_ms / 1e3, rel=1e-9)
        assert tm.decode_step_energy_j(d.batch, d.context_tokens) == pytest.approx(d.energy_j, rel=1e-6)
    assert tm.idle_w == 80.0 and base.idle_w == 77.0


def test_profile_interpolates_inside_and_scales_outside() -> None:
    base, prof = a40(), profile()
    tm = apply_profile(base, prof)
    mid = tm.prefill_time_s(8192)
    assert 0.150 < mid < 0.800
    # outside the range: the roofline scaled by the nearest point's ratio
    r_hi = 0.800 / base.prefill_time_s(16384)
    assert tm.prefill_time_s(32768) == pytest.approx(base.prefill_time_s(32768) * r_hi)
    r_lo = 0.050 / base.prefill_time_s(1024)
    assert tm.prefill_time_s(128) == pytest.approx(base.prefill_time_s(128) * r_lo)
    # decode between points stays between the neighbouring ratios
    r = [d.step_ms / 1e3 / base.decode_step_time_s(d.batch, d.context_tokens) for d in prof.decode]
    q = tm.decode_step_time_s(4, 20000) / base.decode_step_time_s(4, 20000)
    assert min(r) - 1e-9 <= q <= max(r) + 1e-9


def test_profile_at_another_cap_keeps_the_cap_effect() -> None:
    prof = profile()
    at300 = apply_profile(a40(), prof)
    at200 = apply_profile(a40(200), prof)
    assert at200.prefill_time_s(16384) > at300.prefill_time_s(16384)


def test_energy_ignored_when_modelled() -> None:
    base = a40()
    tm = apply_profile(base, profile(energy_measured=False, idle_w=None))
    assert tm.prefill_energy_j(1024) / tm.prefill_time_s(1024) == pytest.approx(base.prefill_power_w(1024))


def test_mismatched_profile_is_rejected() -> None:
    with pytest.raises(ProfileError, match="gpu"):
        apply_profile(TierModel(get_gpu("L40S"), get_model("Qwen3-0.6B")), profile())
    with pytest.raises(ProfileError, match="model"):
        apply_profile(TierModel(get_gpu("A40"), get_model("Llama-3.1-8B")), profile())
    with pytest.raises(ProfileError, match="tp"):
        apply_profile(TierModel(get_gpu("A40"), get_model("Qwen3-0.6B"), tp=2), profile())


def test_aliases_match() -> None:
    tm = apply_profile(a40(), profile(gpu="a40", model="Qwen/Qwen3-0.6B"))
    assert tm.profile is not None
