"""fleet.yaml validation: every error names the field path and the fix (orchestrator/config.py)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestrator.config import load_fleet, parse_fleet
from orchestrator.errors import ConfigError, WorkloadError

BASE: dict[str, Any] = {
    "model": "Llama-3.1-8B",
    "tiers": [
        {"name": "h100", "gpu": "H100-SXM", "count": 4},
        {"name": "h200", "gpu": "H200-SXM", "count": 4},
    ],
}


def _with(path: str, value: Any) -> dict[str, Any]:
    d = copy.deepcopy(BASE)
    cur: Any = d
    keys = path.split(".")
    for k in keys[:-1]:
        cur = cur[int(k)] if k.isdigit() else cur.setdefault(k, {})
    last = keys[-1]
    if value is _DELETE:
        del cur[int(last) if last.isdigit() else last]
    elif last.isdigit():
        cur[int(last)] = value
    else:
        cur[last] = value
    return d


_DELETE = object()


@pytest.mark.parametrize(
    ("path", "value", "match"),
    [
        ("tiers.0.colour", "red", r"tiers\.0\.colour: unknown field"),
        ("tiers.0.count", _DELETE, r"tiers\.0\.count: required field is missing"),
        ("model", _DELETE, r"model: required field is missing"),
        ("tiers.1.count", "many", r"tiers\.1\.count: .*integer"),
        ("slo.ttfet_slowdown", -1, r"slo\.ttfet_slowdown: .*greater than 0"),
        ("tiers.0.tp", [0], r"tiers\.0\.tp: .*tp must list sizes >= 1"),
        ("workload.format", "csv", r"workload\.format: "),
        ("workload.format", "conserve", r"workload: .*needs 'path'"),
        ("tiers.0.gpu", "H100-SMX", r"tiers\.0\.gpu: unknown GPU 'H100-SMX'\. Did you mean 'H100-SXM'"),
        ("model", "Llama-3.1-8", r"model: unknown model 'Llama-3.1-8'\. Did you mean"),
        ("reference_tier", "h300", r"reference_tier 'h300' is not a tier"),
        ("objective", "speed", r"objective: "),
    ],
    ids=[
        "unknown-field",
        "missing-field",
        "missing-model",
        "bad-type",
        "bad-range",
        "bad-tp",
        "bad-format",
        "trace-without-path",
        "unknown-gpu",
        "unknown-model",
        "bad-tier-reference",
        "bad-objective",
    ],
)
def test_errors_name_the_field(path: str, value: Any, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_fleet(_with(path, value), source="fleet.yaml")


def test_duplicate_tiers_and_engine_tier_reference() -> None:
    d = copy.deepcopy(BASE)
    d["tiers"][1]["name"] = "h100"
    with pytest.raises(ConfigError, match="tier names must be unique"):
        parse_fleet(d)
    d = copy.deepcopy(BASE)
    d["engines"] = [{"id": "e0", "tier": "h900", "role": "decode", "url": "http://127.0.0.1:1"}]
    with pytest.raises(ConfigError, match="engine 'e0' names tier 'h900'"):
        parse_fleet(d)


def test_load_fleet_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_fleet(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: line \d+ is not valid YAML"):
        load_fleet(bad)
    top = tmp_path / "list.yaml"
    top.write_text("- 1\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_fleet(top)


def test_missing_trace_path_names_field(tmp_path: Path) -> None:
    from orchestrator.planner import fleet_stats

    d = copy.deepcopy(BASE)
    d["workload"] = {"format": "conserve", "path": "traces/missing.csv"}
    f = tmp_path / "fleet.yaml"
    f.write_text(yaml.safe_dump(d))
    cfg = load_fleet(f)
    assert cfg.workload.path == tmp_path / "traces/missing.csv"  # relative to the fleet file
    with pytest.raises(WorkloadError, match=r"workload\.path: trace file .*missing\.csv' does not exist"):
        fleet_stats(cfg)


def test_yaml_off_and_inline_model(tmp_path: Path) -> None:
    f = tmp_path / "fleet.yaml"
    f.write_text(
        "model: {name: tiny, layers: 2, hidden_size: 64, attention_heads: 2, kv_heads: 1, head_dim: "
        "32, params: 1.0e6}\n"
        "tiers: [{name: a, gpu: A40, count: 2}]\nunallocated: off\n"
    )
    cfg = load_fleet(f)
    assert cfg.unallocated == "off"
    assert cfg.model_spec().kv_bytes_per_token == 2 * 2 * 1 * 32 * 2


@pytest.mark.parametrize("name", ["fleet.yaml", "paper-a40.yaml", "paper-a40-disagg.yaml"])
def test_examples_load(repo_root: Path, name: str) -> None:
    cfg = load_fleet(repo_root / "examples" / name)
    assert cfg.tiers
