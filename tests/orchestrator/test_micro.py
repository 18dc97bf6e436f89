"""`orchestrator profile --micro` (orchestrator/micro.py) on this machine's CPU with torch CPU: real
kernels, small sizes; the file and the output say the figures are not a GPU's and no cap was applied, and a
tier refuses such a file. The GPU path needs a GPU (none here); its CUDA-order mapping is tested as a pure
function."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from unittest import mock

import pytest
import yaml
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.errors import ConfigError
from orchestrator.micro import MicroSettings, run_micro, zeus_index
from tiers.capcurves import load_cap_curves

TINY = MicroSettings(seconds=0.02, repeats=2, gemm_n=64, mem_bytes=2**20)


def test_cpu_run_measures_both_kernels_and_says_it_is_not_a_gpu() -> None:
    torch = pytest.importorskip("torch", reason="torch not installed (pip install 'conserve[micro]')")
    if torch.cuda.is_available():  # pragma: no cover - a GPU host
        pytest.skip("this host has a GPU: the CPU path is not taken")
    notes: list[str] = []
    curves = run_micro(MicroSettings(caps_w=(300.0, 200.0), seconds=0.02, repeats=2, gemm_n=64,
                                     mem_bytes=2**20), on_point=notes.append)  # fmt: skip
    assert (curves.device, curves.gpu_measured, curves.caps_applied, curves.power_measured) == (
        "cpu", False, False, False
    )  # fmt: skip
    assert "NOT a GPU's figures" in curves.source and "no power cap applied" in curves.source
    (p,) = curves.points
    assert p.cap_w is None and p.gemm_tflops > 0 and p.mem_gbps > 0 and p.gemm_power_w is None
    assert any("not applied" in n for n in notes)


def test_cli_writes_a_cpu_file_that_a_tier_refuses(tmp_path: Path) -> None:
    pytest.importorskip("torch", reason="torch not installed (pip install 'conserve[micro]')")
    out = tmp_path / "curves.yaml"
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(yaml.safe_dump({"model": "Qwen3-0.6B", "tiers": [
        {"name": "a40", "gpu": "A40", "count": 1, "power_caps_w": [300, 200], "cap_curves": "curves.yaml"}]}))
    args = ["--micro-seconds", "0.02", "--repeats", "1", "--json"]
    res = CliRunner().invoke(app, ["profile", "--micro", "--fleet", str(fleet), "--tier", "a40", "--out",
                                   str(out), *args])  # fmt: skip
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["device"] == "cpu" and data["caps_applied"] is False and data["gpu"] is None
    assert out.read_text().startswith("# CPU run: these figures are NOT a GPU's, no power cap was applied")
    assert load_cap_curves(out).points[0].gemm_tflops == pytest.approx(data["points"][0]["gemm_tflops"])
    table = CliRunner().invoke(app, ["profile", "--micro", "--out", str(out), "--micro-seconds", "0.02",
                                     "--repeats", "1"], env={"COLUMNS": "200"})  # fmt: skip
    assert table.exit_code == 0 and "NOT a GPU's" in table.stdout
    plan = CliRunner().invoke(app, ["plan", "--fleet", str(fleet)])
    assert plan.exit_code == 1 and "cap_curves" in plan.output and "no cap applied" in plan.output


def test_without_torch_micro_says_how_to_install_it(tmp_path: Path) -> None:
    with mock.patch.dict(sys.modules, {"torch": None}):  # import torch -> ImportError
        res = CliRunner().invoke(app, ["profile", "--micro", "--out", str(tmp_path / "c.yaml")])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert "pip install 'conserve[micro]'" in res.output  # not eaten as rich markup


def test_profile_without_micro_still_needs_an_engine(tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["profile", "--tier", "A40", "--out", str(tmp_path / "p.yaml")])
    assert res.exit_code == 1 and "--engine is required (or pass --micro)" in res.output


@pytest.mark.parametrize(
    ("nvml_index", "visible", "expected"),
    [(2, "", 2), (2, "3,2", 1), (0, "0", 0)],
    ids=["unset", "reordered", "single"],
)
def test_zeus_index_follows_cuda_visible_devices(nvml_index: int, visible: str, expected: int) -> None:
    assert zeus_index(nvml_index, visible) == expected


def test_zeus_index_refuses_a_hidden_gpu_or_uuids() -> None:
    with pytest.raises(ConfigError, match="not in CUDA_VISIBLE_DEVICES"):
        zeus_index(1, "0,2")
    with pytest.raises(ConfigError, match="by UUID"):
        zeus_index(0, "GPU-aaaa")


def test_bad_settings_are_refused() -> None:
    pytest.importorskip("torch", reason="torch not installed (pip install 'conserve[micro]')")
    with pytest.raises(ConfigError, match="--repeats must be >= 1"):
        run_micro(MicroSettings(repeats=0))
    assert TINY.seconds > 0  # the module-level settings used above stay valid
