"""Power caps around `orchestrator serve` (orchestrator/power.py + Runtime start/stop), pynvml patched
(autospec): caps from fleet.yaml and the plan applied at start, shown in /v1/fleet, recorded in the ledger,
restored at stop; a refused permission leaves serving up and says the cap was not applied; a crashed
session's caps are restored by the next start."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from nvml_fake import FakeNvml

from api.app import create_app
from energy.ledger import Ledger
from energy.power import CapRequest, Holder, apply_caps
from orchestrator.config import parse_fleet
from orchestrator.errors import ConfigError
from orchestrator.fleet import Plan, PlanPredictions, Pool
from orchestrator.power import engine_caps
from orchestrator.runtime import ServeSettings, build_runtime


def vllm_fleet(tmp_path: Path, **engine0: Any) -> dict[str, Any]:
    return {
        "model": "Qwen3-0.6B",
        "tiers": [{"name": "a40", "gpu": "A40", "count": 2, "power_caps_w": [200, 300]}],
        "backend": "vllm",
        "engines": [
            # ports nothing listens on: the engines are down, which serving survives
            {"id": "p0", "tier": "a40", "role": "prefill", "url": "http://127.0.0.1:9", "gpu_indices": [0]},
            {
                "id": "d0",
                "tier": "a40",
                "role": "decode",
                "url": "http://127.0.0.1:9",
                "gpu_indices": [1],
                "power_cap_w": 200,
                **engine0,
            },
        ],  # fmt: skip
        "database_url": f"sqlite:///{tmp_path / 'ledger.db'}",
    }


def serve(tmp_path: Path, fleet: dict[str, Any], plan: Path | None = None) -> TestClient:
    cfg = parse_fleet(fleet)
    settings = ServeSettings(
        fleet=Path("inline"), plan=plan, db=fleet["database_url"], energy_interval_s=0,
        ledger_writer="thread", power_state_file=tmp_path / "power-caps.json",
    )  # fmt: skip
    return TestClient(create_app(settings, runtime=build_runtime(settings, cfg)))


def caps_in_ledger(db_url: str) -> list[tuple[str, str, str, float | None]]:
    with Ledger(db_url) as lg:
        return [(r.engine_id, r.event, r.status, r.applied_w) for _, r in lg.power_caps()]


def test_serve_applies_records_shows_and_restores_caps(tmp_path: Path) -> None:
    fleet = vllm_fleet(tmp_path)
    with FakeNvml().patched() as nvml:
        with serve(tmp_path, fleet) as client:
            assert [b.limit_mw for b in nvml.boards] == [300_000, 200_000]
            assert (tmp_path / "power-caps.json").exists()  # a crash now is restored by the next start
            inst = {i["instance_id"]: i for i in client.get("/v1/fleet").json()["instances"]}
            assert inst["p0"]["power_cap"] is None
            cap = inst["d0"]["power_cap"]
            assert (cap["status"], cap["applied"], cap["requested_w"], cap["applied_w"]) == (
                "applied", True, 200.0, 200.0
            )  # fmt: skip
            assert cap["source"] == "engines[1].power_cap_w"
            assert cap["gpus"] == [{"nvml_index": 1, "uuid": "GPU-bbbb-1111", "status": "applied",
                                    "applied_w": 200.0, "previous_w": 300.0}]  # fmt: skip
        assert [b.limit_mw for b in nvml.boards] == [300_000, 300_000]  # restored at stop
    assert not (tmp_path / "power-caps.json").exists()
    assert caps_in_ledger(fleet["database_url"]) == [
        ("d0", "apply", "applied", 200.0), ("d0", "restore", "restored", 300.0)
    ]  # fmt: skip
    from energy.reports import build_report

    with Ledger(fleet["database_url"]) as lg:
        # serve makes a run id per start (issue 14: live-<UTC time>-<hex>)
        pattern = r"power caps of run live-\S+: d0 GPU 1 200 W applied \(read back 200 W\)"
        assert any(re.fullmatch(pattern, n) for n in build_report(lg).notes)


def test_a_refused_permission_leaves_serving_up_and_says_not_applied(tmp_path: Path) -> None:
    fleet = vllm_fleet(tmp_path)
    with FakeNvml(permission=False).patched() as nvml, serve(tmp_path, fleet) as client:
        assert client.get("/health").json()["status"] == "ok"
        cap = {i["instance_id"]: i for i in client.get("/v1/fleet").json()["instances"]}["d0"]["power_cap"]
        assert (cap["status"], cap["applied"], cap["applied_w"]) == ("no_permission", False, None)
        assert "needs root" in cap["message"]
        assert nvml.sets == []
    assert caps_in_ledger(fleet["database_url"]) == [("d0", "apply", "no_permission", None)]
    from energy.reports import build_report

    with Ledger(fleet["database_url"]) as lg:
        notes = build_report(lg, "engine").notes
    assert any(
        re.fullmatch(r"power caps of run live-\S+: d0 GPU 1 200 W NOT applied \(no_permission\)", n)
        for n in notes
    )


def test_without_nvml_serving_goes_on_and_the_cap_is_reported_not_applied(tmp_path: Path) -> None:
    """This machine has no NVIDIA driver: nothing is patched."""
    fleet = vllm_fleet(tmp_path)
    with serve(tmp_path, fleet) as client:
        cap = {i["instance_id"]: i for i in client.get("/v1/fleet").json()["instances"]}["d0"]["power_cap"]
    if cap["status"] == "applied":  # pragma: no cover - a GPU host where this test runs as root
        pytest.skip("this host has an NVIDIA driver")
    assert cap["status"] == "no_nvml" and not cap["applied"] and "not applied" in cap["message"]


def test_the_next_start_restores_a_crashed_sessions_caps(tmp_path: Path) -> None:
    state = tmp_path / "power-caps.json"
    fleet = vllm_fleet(tmp_path)
    with FakeNvml().patched() as nvml:
        # a serve that was SIGKILLed: its layer on GPU 0 names a process that no longer exists
        apply_caps([CapRequest("old", 150.0, (0,))], Holder("serve", 2**22 + 7, "1"), state_path=state)
        assert nvml.boards[0].limit_mw == 150_000
        with serve(tmp_path, fleet):
            assert [b.limit_mw for b in nvml.boards] == [300_000, 200_000]
            assert list(json.loads(state.read_text())["gpus"]) == ["GPU-bbbb-1111"]
    assert not state.exists()


def _plan(*pools: Pool) -> Plan:
    preds = PlanPredictions(**{f: 0.0 for f in PlanPredictions.__dataclass_fields__})  # values unused here
    return Plan("Qwen3-0.6B", "energy", pools, preds)


def test_caps_come_from_the_engine_then_the_plan_then_a_single_allowed_cap(tmp_path: Path) -> None:
    fleet = vllm_fleet(tmp_path)
    fleet["engines"].append({"id": "d1", "tier": "a40", "role": "decode", "url": "http://gpu-7:8000",
                             "gpu_indices": [0]})  # fmt: skip
    cfg = parse_fleet(fleet)
    plan = _plan(Pool("a40", "prefill", 1, 1, 250.0, 1), Pool("a40", "decode", 2, 1, 220.0, 2))
    caps = {c.engine_id: c for c in engine_caps(cfg, plan)}
    assert (caps["p0"].cap_w, caps["p0"].source) == (250.0, "plan pools[0]")
    assert (caps["d0"].cap_w, caps["d0"].source) == (200.0, "engines[1].power_cap_w")  # the engine's own wins
    assert (caps["d1"].cap_w, caps["d1"].local) == (220.0, False)
    assert {c.engine_id: c.cap_w for c in engine_caps(cfg)} == {"p0": None, "d0": 200.0, "d1": None}
    one = dict(fleet, tiers=[dict(fleet["tiers"][0], power_caps_w=[180])])
    assert engine_caps(parse_fleet(one))[0].source == "tiers.a40.power_caps_w"
    assert (
        engine_caps(parse_fleet(dict(fleet, tiers=[dict(fleet["tiers"][0], power_caps_w=[300])])))[0].cap_w
        is None
    )


def test_a_cap_outside_the_gpus_range_fails_naming_the_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"engines\.1\.power_cap_w: 90 W is outside A40's range 100-300 W"):
        engine_caps(parse_fleet(vllm_fleet(tmp_path, power_cap_w=90)))


def test_two_engines_on_one_gpu_with_different_caps_are_refused(tmp_path: Path) -> None:
    fleet = vllm_fleet(tmp_path)
    fleet["engines"][0].update(gpu_indices=[1], power_cap_w=250)
    with pytest.raises(ConfigError, match="share GPU 1 but ask for caps 250 W and 200 W"):
        engine_caps(parse_fleet(fleet))


def test_simulated_engines_say_their_cap_is_modelled(tmp_path: Path) -> None:
    from orchestrator.fleet import instances_from_plan, save_plan

    fleet = {"model": "Qwen3-0.6B", "tiers": [{"name": "a40", "gpu": "A40", "count": 2,
             "power_caps_w": [200, 300]}], "backend": "sim",
             "database_url": f"sqlite:///{tmp_path / 'ledger.db'}"}  # fmt: skip
    plan = _plan(Pool("a40", "prefill", 1, 1, 300.0, 1), Pool("a40", "decode", 1, 1, 200.0, 1))
    assert [i.tier_model.power_cap_w for i in instances_from_plan(parse_fleet(fleet), plan)] == [None, 200.0]
    with FakeNvml().patched() as nvml, serve(tmp_path, fleet, save_plan(plan, tmp_path / "plan.yaml")) as c:
        inst = {i["instance_id"]: i for i in c.get("/v1/fleet").json()["instances"]}
        assert inst["a40-prefill-0"]["power_cap"] is None
        cap = inst["a40-decode-0"]["power_cap"]
        assert (cap["status"], cap["applied"], cap["requested_w"]) == ("simulated", False, 200.0)
        assert "modelled" in cap["message"] and nvml.sets == []
    assert caps_in_ledger(fleet["database_url"]) == [("a40-decode-0", "apply", "simulated", None)]
