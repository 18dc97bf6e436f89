"""`orchestrator power show|apply|restore` and the caps of `orchestrator engines up/down`, in-process with
pynvml patched (autospec) over fake boards."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from nvml_fake import FakeNvml
from typer.testing import CliRunner

from energy.power import CapRequest, Holder, apply_caps
from orchestrator.cli import app


def write_fleet(tmp_path: Path, **d0: Any) -> Path:
    data = {
        "model": "Qwen3-0.6B",
        "backend": "vllm",
        "tiers": [{"name": "a40", "gpu": "A40", "count": 2}],
        "engines": [
            {"id": "p0", "tier": "a40", "role": "prefill", "url": "http://127.0.0.1:9", "gpu_indices": [0]},
            {"id": "d0", "tier": "a40", "role": "decode", "url": "http://127.0.0.1:9", "gpu_indices": [1],
             "power_cap_w": 200, **d0},
            {"id": "r0", "tier": "a40", "role": "decode", "url": "http://gpu-9.example:8000",
             "power_cap_w": 150},
        ],  # fmt: skip
    }
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def run(*args: str) -> Any:
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "240"})


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "power-caps.json"


def test_apply_show_restore(tmp_path: Path, state: Path) -> None:
    fleet = write_fleet(tmp_path)
    with FakeNvml().patched() as nvml:
        res = run("power", "apply", "--fleet", str(fleet), "--engine", "d0", "--state", str(state), "--json")
        assert res.exit_code == 0, res.output
        (r,) = json.loads(res.output)["results"]
        assert (r["engine_id"], r["status"], r["applied_w"], r["gpu_uuid"]) == ("d0", "applied", 200.0,
                                                                                "GPU-bbbb-1111")  # fmt: skip
        assert nvml.boards[1].limit_mw == 200_000
        show = run("power", "show", "--fleet", str(fleet), "--state", str(state), "--json")
        shown = json.loads(show.output)
        assert shown["nvml"]["available"] and [g["limit_w"] for g in shown["nvml"]["gpus"]] == [300.0, 200.0]
        assert shown["changed"][0]["layers"][0]["holder"] == "manual"
        engines = {e["engine_id"]: e for e in shown["engines"]}
        assert (engines["d0"]["cap_w"], engines["d0"]["limits_now_w"]) == (200.0, [200.0])
        assert engines["p0"]["cap_w"] is None and engines["r0"]["local"] is False
        table = run("power", "show", "--fleet", str(fleet), "--state", str(state))
        assert table.exit_code == 0 and "GPU-bbbb-1111" in table.output and "remote" in table.output
        back = run("power", "restore", "--state", str(state), "--json")
        assert back.exit_code == 0 and json.loads(back.output)["results"][0]["status"] == "restored"
        assert nvml.boards[1].limit_mw == 300_000 and not state.exists()
        again = run("power", "restore", "--state", str(state))
        assert again.exit_code == 0 and "nothing to restore" in again.output


def test_apply_reports_every_cap_not_applied_and_exits_1(tmp_path: Path, state: Path) -> None:
    fleet = write_fleet(tmp_path)
    with FakeNvml(permission=False).patched():
        res = run("power", "apply", "--fleet", str(fleet), "--state", str(state))
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert "2 of 2 caps not applied" in res.output and "r0: remote" in res.output
    assert not state.exists()


def test_without_nvml_apply_says_so_and_show_still_lists_the_caps(tmp_path: Path, state: Path) -> None:
    fleet = write_fleet(tmp_path)
    res = run("power", "apply", "--fleet", str(fleet), "--engine", "d0", "--state", str(state), "--json")
    if json.loads(res.stdout)["results"][0]["status"] == "applied":  # pragma: no cover - a GPU host
        pytest.skip("this host has an NVIDIA driver")
    assert res.exit_code == 1 and "no NVIDIA driver" in res.stderr
    assert json.loads(res.stdout)["results"][0]["status"] == "no_nvml"
    shown = json.loads(run("power", "show", "--fleet", str(fleet), "--state", str(state), "--json").output)
    assert not shown["nvml"]["available"] and "not applied" in shown["nvml"]["message"]
    assert {e["engine_id"]: e["cap_w"] for e in shown["engines"]} == {"p0": None, "d0": 200.0, "r0": 150.0}


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--engine", "dO"], "--engine 'dO' is not an engine"),
        (["--plan", "nope.yaml"], "plan file 'nope.yaml' does not exist"),
    ],
    ids=["engine-typo", "missing-plan"],
)
def test_apply_bad_arguments_are_one_line_errors(tmp_path: Path, args: list[str], match: str) -> None:
    res = run("power", "apply", "--fleet", str(write_fleet(tmp_path)), *args)
    assert res.exit_code == 1 and match in res.output and "Traceback" not in res.output


def test_a_cap_outside_the_gpu_range_is_one_line_error(tmp_path: Path) -> None:
    res = run("power", "show", "--fleet", str(write_fleet(tmp_path, power_cap_w=50)))
    assert res.exit_code == 1 and "engines.1.power_cap_w: 50 W is outside" in res.output


def test_restore_after_a_crash_and_refusal_while_serve_lives(state: Path) -> None:
    with FakeNvml().patched() as nvml:
        crashed = Holder("serve", 2**22 + 9, "1")  # above Linux's pid_max: that process is gone
        apply_caps([CapRequest("d0", 150.0, (0, 1))], crashed, state_path=state)
        res = run("power", "restore", "--state", str(state), "--json")
        assert res.exit_code == 0
        assert [r["status"] for r in json.loads(res.output)["results"]] == ["restored"] * 2
        assert [b.limit_mw for b in nvml.boards] == [300_000, 300_000] and not state.exists()
        apply_caps([CapRequest("d1", 150.0, (1,))], Holder.this_process("serve"), state_path=state)  # alive
        res = run("power", "restore", "--state", str(state))
        assert res.exit_code == 1 and "holds these caps" in res.output and "--force" in res.output
        assert nvml.boards[1].limit_mw == 150_000
        res = run("power", "restore", "--state", str(state), "--force")
        assert res.exit_code == 0 and nvml.boards[1].limit_mw == 300_000


def test_engines_up_applies_caps_first_and_down_restores_them(tmp_path: Path, state: Path) -> None:
    from orchestrator.engines import launcher

    fleet = write_fleet(tmp_path)
    started: list[Any] = []

    def start_engines(specs: Any, settings: Any, on_ready: Any = None) -> list[Any]:
        started.append([b.limit_mw for b in nvml.boards])  # the limits the engines start under
        return []

    with FakeNvml().patched() as nvml, pytest.MonkeyPatch.context() as mp:
        mp.setattr(launcher, "start_engines", start_engines)
        (tmp_path / "model").mkdir()
        up = run("engines", "up", "--fleet", str(fleet), "--model", str(tmp_path / "model"), "--vllm-python",
                 "/bin/true", "--state", str(tmp_path / "engines.json"), "--power-state", str(state),
                 "--json")  # fmt: skip
        assert up.exit_code == 0, up.output
        assert started == [[300_000, 200_000]]
        caps = {(r["engine_id"], r["status"]) for r in json.loads(up.output)["power_caps"]}
        assert caps == {("d0", "applied"), ("r0", "remote")}
        down = run("engines", "down", "--state", str(tmp_path / "engines.json"), "--power-state", str(state),
                   "--json")  # fmt: skip
        assert down.exit_code == 0 and json.loads(down.output)["power_restored"][0]["status"] == "restored"
        assert [b.limit_mw for b in nvml.boards] == [300_000, 300_000] and not state.exists()


def test_engines_up_that_fails_restores_the_caps(tmp_path: Path, state: Path) -> None:
    from orchestrator.engines import launcher
    from orchestrator.errors import EngineError

    def start_engines(specs: Any, settings: Any, on_ready: Any = None) -> list[Any]:
        raise EngineError("engine 'd0' exited with code 1 before it was healthy")

    with FakeNvml().patched() as nvml, pytest.MonkeyPatch.context() as mp:
        mp.setattr(launcher, "start_engines", start_engines)
        (tmp_path / "model").mkdir()
        up = run("engines", "up", "--fleet", str(write_fleet(tmp_path)), "--model", str(tmp_path / "model"),
                 "--vllm-python", "/bin/true", "--state", str(tmp_path / "e.json"), "--power-state",
                 str(state))  # fmt: skip
        assert up.exit_code == 1 and "exited with code 1" in up.output
        assert nvml.boards[1].limit_mw == 300_000 and not state.exists()
