"""`simulate` and `compare` follow the same rules (orchestrator/cli/sim_setup.py): a timed trace's own
arrivals and its rate as the label, the fleet file's seed, one ConServe local-prefill threshold, and
colocated policies on a disaggregated plan converted (a plan) or refused (an explicit layout) alike."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from orchestrator.cli import app

runner = CliRunner()
MODEL_TIERS = {
    "model": "Qwen3-0.6B",
    "tiers": [
        {"name": "a40", "gpu": "A40", "count": 4, "power_caps_w": [300, 200], "roles": ["prefill", "decode"]}
    ],
}


def _invoke(*args: str) -> dict:
    r = runner.invoke(app, list(args))
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def _trace_fleet(tmp_path: Path) -> Path:
    """6 two-turn conversations starting every 2 s (observed rate (6 - 1) / 10 s = 0.5 conv/s)."""
    rows = []
    for i in range(6):
        a, b, c = 10 * i + 1, 10 * i + 2, 10 * i + 3
        rows.append({"timestamp": 2000 * i, "input_length": 1024, "output_length": 30, "hash_ids": [a, b]})
        rows.append(
            {"timestamp": 2000 * i + 1000, "input_length": 1600, "output_length": 30, "hash_ids": [a, b, c]}
        )
    rows.sort(key=lambda r: r["timestamp"])
    (tmp_path / "trace.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    fleet = {**MODEL_TIERS, "workload": {"format": "mooncake", "path": "trace.jsonl"}}
    p = tmp_path / "fleet.yaml"
    p.write_text(yaml.safe_dump(fleet))
    return p


def _arrivals(csv_path: Path) -> list[float]:
    with csv_path.open() as fh:
        return sorted(float(r["arrival_s"]) for r in csv.DictReader(fh))


TRACE_ARRIVALS = [0.0, 2.0, 4.0, 6.0, 8.0, 10.0]


def test_simulate_labels_a_timed_trace_with_its_rate(tmp_path: Path) -> None:
    doc = _invoke(
        "simulate", "--fleet", str(_trace_fleet(tmp_path)), "--layout", "prefill=1,decode=3", "--json"
    )
    assert doc["arrivals"] == "trace timestamps"
    assert doc["rate_per_s"] == pytest.approx(0.5)
    assert sorted(c["arrival_s"] for c in doc["conversations"]) == pytest.approx(TRACE_ARRIVALS)


def test_compare_keeps_a_timed_trace_s_arrivals(tmp_path: Path) -> None:
    fleet = str(_trace_fleet(tmp_path))
    out = tmp_path / "cmp"
    args = ("--fleet", fleet, "--layout", "prefill=1,decode=3", "--policies", "conserve,colocated", "--json")
    doc = _invoke("compare", *args, "--out", str(out))
    assert {r["arrivals"] for r in doc["runs"]} == {"trace timestamps"}
    assert [r["rate_per_s"] for r in doc["runs"]] == pytest.approx([0.5, 0.5])
    assert _arrivals(out / "conversations.csv") == pytest.approx(sorted(TRACE_ARRIVALS * 2))
    # explicit --rates still draw Poisson arrivals at those rates, labelled so
    doc = _invoke("compare", *args, "--rates", "2")
    assert [(r["arrivals"], r["rate_per_s"]) for r in doc["runs"]] == [("poisson", 2.0)] * 2


def test_compare_honours_the_file_s_seed(tmp_path: Path) -> None:
    fleet = {
        **MODEL_TIERS,
        "workload": {
            "format": "synthetic",
            "conversations": 10,
            "arrival_rate_per_s": 1.0,
            "seed": 7,
            "synthetic": {"turn1_input_tokens_median": 3000, "turns_mean": 2, "output_tokens_mean": 30},
        },
    }
    p = tmp_path / "fleet.yaml"
    p.write_text(yaml.safe_dump(fleet))
    base = (
        "compare",
        "--fleet",
        str(p),
        "--layout",
        "prefill=1,decode=3",
        "--policies",
        "conserve",
        "--json",
    )
    runs = {}
    for name, extra in (("file", ()), ("seed7", ("--seed", "7")), ("seed0", ("--seed", "0"))):
        out = tmp_path / name
        doc = _invoke(*base, *extra, "--out", str(out))
        runs[name] = (doc["seed"], _arrivals(out / "conversations.csv"))
    assert runs["file"] == runs["seed7"]
    assert runs["file"][0] == 7 and runs["seed0"][0] == 0
    assert runs["file"][1] != runs["seed0"][1]


@pytest.fixture(scope="module")
def example(repo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, int]:
    """examples/fleet.yaml, its plan file and the plan's ConServe threshold (> 0 there)."""
    fleet = str(repo_root / "examples" / "fleet.yaml")
    plan = str(tmp_path_factory.mktemp("plan") / "plan.yaml")
    doc = _invoke("plan", "--fleet", fleet, "--out", plan, "--json")
    thr = doc["plan"]["predictions"]["conserve_threshold_tokens"]
    assert thr > 0
    return fleet, plan, thr


def test_one_conserve_threshold_rule(example: tuple[str, str, int]) -> None:
    fleet, plan, thr = example
    n = ("--conversations", "20")
    sim_plan = _invoke("simulate", "--fleet", fleet, "--plan", plan, "--policy", "conserve", *n, "--json")
    sim_ilp = _invoke("simulate", "--fleet", fleet, "--policy", "conserve", *n, "--json")
    cmp_ilp = _invoke("compare", "--fleet", fleet, "--policies", "conserve", *n, "--json")
    cmp_plan = _invoke("compare", "--fleet", fleet, "--plan", plan, "--policies", "conserve", *n, "--json")
    for doc in (sim_plan, sim_ilp, cmp_ilp, cmp_plan):
        assert doc["conserve_threshold"] == {"tokens": thr, "source": "the plan's"}
    summaries = [
        sim_plan["summary"],
        sim_ilp["summary"],
        cmp_ilp["runs"][0]["summary"],
        cmp_plan["runs"][0]["summary"],
    ]
    assert len({s["kv_transfers"] for s in summaries}) == 1, [s["kv_transfers"] for s in summaries]
    # simulate bills energy in 1 s windows, compare (without --out) in one: equal up to rounding
    assert [s["tokens_per_j"] for s in summaries] == pytest.approx(
        [summaries[0]["tokens_per_j"]] * 4, rel=1e-9
    )
    # an explicit threshold wins everywhere, an explicit layout without one has none (and says so)
    doc = _invoke("simulate", "--fleet", fleet, "--local-prefill-below", "0", *n, "--json")
    assert doc["conserve_threshold"]["tokens"] == 0
    doc = _invoke(
        "compare",
        "--fleet",
        fleet,
        "--layout",
        "h200.prefill=1,h200.decode=7",
        "--policies",
        "conserve",
        *n,
        "--json",
    )
    assert (
        doc["conserve_threshold"]["tokens"] == 0 and "explicit layout" in doc["conserve_threshold"]["source"]
    )


def test_colocated_on_a_disaggregated_plan_is_converted_as_in_compare(example: tuple[str, str, int]) -> None:
    fleet, plan, _ = example
    n = ("--conversations", "20")
    sim = _invoke("simulate", "--fleet", fleet, "--plan", plan, "--policy", "colocated", *n, "--json")
    cmp = _invoke("compare", "--fleet", fleet, "--plan", plan, "--policies", "colocated", *n, "--json")
    assert {i["role"] for i in sim["instances"]} == {"colocated"}
    assert "colocated instances at TDP" in sim["layout_conversion"]
    assert sim["summary"]["tokens_per_j"] == pytest.approx(
        cmp["runs"][0]["summary"]["tokens_per_j"], rel=1e-9
    )
    assert sim["summary"]["ttfet_slowdown"] == cmp["runs"][0]["summary"]["ttfet_slowdown"]


@pytest.mark.parametrize(
    "args",
    [
        ("simulate", "--policy", "colocated", "--layout", "prefill=1,decode=3"),
        ("simulate", "--policy", "kv-aware", "--layout", "prefill=1,decode=3"),
        ("compare", "--policies", "colocated", "--colocated-layout", "prefill=1,decode=3"),
    ],
    ids=["simulate-colocated", "simulate-kv-aware", "compare"],
)
def test_explicit_layout_that_does_not_fit_is_refused(tmp_path: Path, args: tuple[str, ...]) -> None:
    r = runner.invoke(app, [*args, "--fleet", str(_trace_fleet(tmp_path)), "--json"])
    assert r.exit_code == 1
    assert "prefill instance(s) that would sit idle. To fix:" in r.output
    assert len(r.output.strip().splitlines()) == 1 and "Traceback" not in r.output
