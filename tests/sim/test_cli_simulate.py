"""`orchestrator simulate` / `compare` end to end on a small synthetic fleet (typer's CliRunner)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from typer.testing import CliRunner

from orchestrator.cli import app

FLEET = {
    "model": "Qwen3-0.6B",
    "tiers": [
        {"name": "a40", "gpu": "A40", "count": 4, "power_caps_w": [300, 200], "roles": ["prefill", "decode"]}
    ],
    "workload": {
        "format": "synthetic",
        "conversations": 12,
        "arrival_rate_per_s": 1.0,
        "synthetic": {"turn1_input_tokens_median": 4000, "turns_mean": 3, "output_tokens_mean": 40},
    },
}


def fleet_file(tmp_path: Path) -> Path:
    p = tmp_path / "fleet.yaml"
    p.write_text(yaml.safe_dump(FLEET))
    return p


def test_simulate_json_and_out(tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = CliRunner().invoke(
        app,
        [
            "simulate",
            "--fleet",
            str(fleet_file(tmp_path)),
            "--layout",
            "prefill=1,decode=3@200",
            "--policy",
            "per-turn",
            "--json",
            "--out",
            str(out),
        ],
    )
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["policy"] == "per-turn" and doc["policy_options"] == {"mispredict_rate": 0.1}
    assert len(doc["conversations"]) == 12
    assert doc["summary"]["tokens_counted"] == "prompt + output tokens of every turn"
    assert {i["tier_model"] for i in doc["instances"]} == {"A40@300W/tp1", "A40@200W/tp1"}
    assert (out / "conversations.csv").read_text().count("\n") == 13
    assert json.loads((out / "summary.json").read_text())["summary"]["conversations"] == 12


def test_compare_writes_plots(tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    r = CliRunner().invoke(
        app,
        [
            "compare",
            "--fleet",
            str(fleet_file(tmp_path)),
            "--layout",
            "prefill=1,decode=3",
            "--policies",
            "conserve,colocated",
            "--rates",
            "0.5,2",
            "--decode-caps",
            "200",
            "--out",
            str(out),
            "--json",
        ],
    )
    assert r.exit_code == 0, r.output
    runs = json.loads(r.stdout)["runs"]
    assert sorted({x["config"] for x in runs}) == ["colocated", "conserve", "conserve@200W"]
    assert len(runs) == 6
    for png in ("ttfet_p95_slowdown.png", "tbt_p95_slowdown.png", "e2e_p95_slowdown.png", "tokens_per_j.png"):
        assert (out / png).stat().st_size > 1000


def test_errors_are_one_line_exit_1(tmp_path: Path) -> None:
    f = fleet_file(tmp_path)
    for args, msg in (
        (
            ["simulate", "--fleet", str(f), "--policy", "conserv", "--layout", "prefill=1,decode=3"],
            "Did you mean",
        ),
        (["simulate", "--fleet", str(f), "--layout", "prefill=1,decode=9"], "has 4"),
        (["simulate", "--fleet", str(f), "--layout", "pre=1"], "role"),
        (
            ["compare", "--fleet", str(f), "--rates", "a,b", "--layout", "prefill=1,decode=3"],
            "comma-separated",
        ),
    ):
        r = CliRunner().invoke(app, args)
        assert r.exit_code == 1, (args, r.output)
        assert msg in r.output and "Traceback" not in r.output


def test_batch_budget_options(tmp_path: Path) -> None:
    """A smaller chunked-prefill budget on the decoders changes the run; a bad one is a one-line error."""
    base = ["simulate", "--fleet", str(fleet_file(tmp_path)), "--layout", "colocated=2", "--policy",
            "colocated", "--json", "--no-standalone"]
    runs = {}
    for budget in ("8192", "512"):
        r = CliRunner().invoke(app, base + ["--max-batched-tokens", budget])
        assert r.exit_code == 0, r.output
        runs[budget] = json.loads(r.output)["summary"]["ttft_s"]["mean"]
    assert runs["512"] > runs["8192"]  # 4k-token prompts take 8 chunks instead of 1: later first tokens
    r = CliRunner().invoke(app, base + ["--prefill-max-batched-tokens", "0"])
    assert r.exit_code == 1
    assert "--prefill-max-batched-tokens must be >= 1" in r.output


def test_view_cached_histories_option(tmp_path: Path) -> None:
    """--view-cached-histories: the paper tables' view (SimOptions.view_cached_histories), which kv-aware
    reads: its decoder choices change; without it the views count what a live engine reports."""
    base = ["simulate", "--fleet", str(fleet_file(tmp_path)), "--layout", "colocated=4", "--policy",
            "kv-aware", "--json", "--no-standalone"]  # fmt: skip
    decoders = {}
    for flag in ([], ["--view-cached-histories"]):
        r = CliRunner().invoke(app, base + flag)
        assert r.exit_code == 0, r.output
        decoders[bool(flag)] = [c["decoders"] for c in json.loads(r.output)["conversations"]]
    assert decoders[True] != decoders[False]
