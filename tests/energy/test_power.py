"""GPU power caps through NVML (energy/power.py), with pynvml patched (autospec) over fake boards: caps
applied and read back, layers recorded before any change, restored on stop and after a crash, refusals
reported."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pynvml
import pytest
from nvml_fake import FakeBoard, FakeNvml

from energy.errors import EnergyError
from energy.power import (
    CapRequest,
    CapStatus,
    Holder,
    NvmlPower,
    PowerState,
    apply_caps,
    restore_caps,
    state_summary,
)


@pytest.fixture
def nvml():
    with FakeNvml().patched() as fake:
        yield fake


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "power-caps.json"


def test_caps_are_applied_read_back_recorded_and_restored(nvml: FakeNvml, state: Path) -> None:
    serve = Holder.this_process("serve")
    res = apply_caps([CapRequest("d0", 200.0, (1,), tier="a40")], serve, state_path=state)
    assert [(r.engine_id, r.status, r.gpu_index, r.gpu_uuid) for r in res] == [
        ("d0", CapStatus.APPLIED, 1, "GPU-bbbb-1111")
    ]
    assert res[0].applied_w == 200.0 and res[0].previous_w == 300.0 and res[0].requested_w == 200.0
    assert nvml.boards[1].limit_mw == 200_000 and nvml.boards[0].limit_mw == 300_000
    saved = json.loads(state.read_text())
    layer = saved["gpus"]["GPU-bbbb-1111"]["layers"][0]
    assert saved["gpus"]["GPU-bbbb-1111"]["original_mw"] == 300_000
    assert (layer["before_mw"], layer["target_mw"], layer["holder"]["kind"]) == (300_000, 200_000, "serve")

    back = restore_caps(serve, state_path=state)
    assert [(r.status, r.applied_w) for r in back] == [(CapStatus.RESTORED, 300.0)]
    assert nvml.boards[1].limit_mw == 300_000
    assert not state.exists()  # nothing left to restore


def test_the_state_is_written_before_the_limit_changes(nvml: FakeNvml, state: Path) -> None:
    seen = []  # what a crash at the instant of the set would leave behind
    nvml.before_set = lambda board, mw: seen.append(json.loads(state.read_text()))
    apply_caps([CapRequest("d0", 180.0, (0,))], Holder("manual"), state_path=state)
    assert seen and seen[0]["gpus"]["GPU-aaaa-0000"]["layers"][0]["before_mw"] == 300_000


def test_refused_permission_is_reported_and_nothing_is_recorded(nvml: FakeNvml, state: Path) -> None:
    nvml.permission = False
    res = apply_caps([CapRequest("d0", 200.0, (0, 1))], Holder.this_process("serve"), state_path=state)
    assert [r.status for r in res] == [CapStatus.NO_PERMISSION] * 2
    assert "needs root (CAP_SYS_ADMIN)" in res[0].message and "nvidia-smi -i 0 -pl 200" in res[0].message
    assert "ZEUSD_SOCK_PATH" in res[0].message and "\n" not in res[0].message
    assert res[0].applied_w is None and res[0].previous_w == 300.0
    assert [b.limit_mw for b in nvml.boards] == [300_000, 300_000]
    assert not state.exists()


def test_without_permission_the_zeus_daemon_sets_the_limit(nvml: FakeNvml, state: Path) -> None:
    nvml.permission = False
    from zeus.utils import zeusd

    def daemon_set(self: object, gpu_ids: list[int], mw: int, block: bool = True) -> None:
        for i in gpu_ids:  # zeusd runs as root and numbers GPUs as NVML does
            nvml.boards[i].limit_mw = mw

    with (
        mock.patch.object(zeusd.ZeusdConfig, "from_env", autospec=True, return_value=object()),
        mock.patch.object(zeusd.ZeusdClient, "__init__", autospec=True, return_value=None),
        mock.patch.object(zeusd.ZeusdClient, "set_power_limit", autospec=True, side_effect=daemon_set) as sp,
    ):
        res = apply_caps([CapRequest("d0", 250.0, (1,))], Holder("manual"), state_path=state)
    assert res[0].status is CapStatus.APPLIED and res[0].applied_w == 250.0
    assert sp.call_args.args[1:] == ([1], 250_000, True)


def test_a_cap_outside_the_nvml_constraints_is_refused_or_clamped(nvml: FakeNvml, state: Path) -> None:
    res = apply_caps([CapRequest("d0", 80.0, (0,))], Holder("manual"), state_path=state)
    assert res[0].status is CapStatus.OUT_OF_RANGE
    assert "NVML allows 100-300 W on GPU 0 (NVIDIA A40)" in res[0].message and "--clamp" in res[0].message
    assert nvml.sets == [] and not state.exists()
    res = apply_caps([CapRequest("d0", 80.0, (0,))], Holder("manual"), state_path=state, clamp=True)
    assert res[0].status is CapStatus.APPLIED and res[0].applied_w == 100.0
    assert "clamped to 100 W" in res[0].message


def test_a_read_back_that_differs_is_reported(nvml: FakeNvml, state: Path) -> None:
    nvml.readback_offset_mw = 25_000
    res = apply_caps([CapRequest("d0", 200.0, (0,))], Holder("manual"), state_path=state)
    assert res[0].status is CapStatus.DIFFERS and res[0].applied_w == 225.0
    assert "reads back 225 W" in res[0].message


def test_without_nvml_every_request_says_it_was_not_applied(state: Path) -> None:
    err = pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)
    with FakeNvml().patched(init_error=err):
        res = apply_caps([CapRequest("d0", 200.0, (0,)), CapRequest("d1", 200.0, (1,))], Holder("manual"),
                         state_path=state)  # fmt: skip
    assert [r.status for r in res] == [CapStatus.NO_NVML] * 2
    assert res[0].message.startswith("no NVIDIA driver (NVML: ") and "not applied" in res[0].message


def test_this_machine_without_a_driver_reports_no_nvml(state: Path) -> None:
    """Unpatched: on a host without an NVIDIA driver (CI) pynvml.nvmlInit raises; nothing is touched."""
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        pass
    else:  # pragma: no cover - a GPU host
        pynvml.nvmlShutdown()
        pytest.skip("this host has an NVIDIA driver")
    res = apply_caps([CapRequest("d0", 200.0, (0,))], Holder("manual"), state_path=state)
    assert res[0].status is CapStatus.NO_NVML and not state.exists()


def test_an_engine_without_gpus_is_reported(nvml: FakeNvml, state: Path) -> None:
    res = apply_caps([CapRequest("d0", 200.0, ())], Holder("manual"), state_path=state)
    assert res[0].status is CapStatus.NO_GPUS and "engines[].gpu_indices" in res[0].message


def test_gpus_are_found_by_index_uuid_or_pci_bus_id(nvml: FakeNvml, state: Path) -> None:
    res = apply_caps(
        [CapRequest("a", 210.0, ("GPU-aaaa-0000",)), CapRequest("b", 220.0, ("00000000:65:00.0",))],
        Holder("manual"),
        state_path=state,
    )
    assert [(r.gpu_index, r.applied_w) for r in res] == [(0, 210.0), (1, 220.0)]
    with NvmlPower() as dev, pytest.raises(EnergyError, match=r"GPU 7.*nvidia-smi -L.*CUDA_VISIBLE_DEVICES"):
        dev.gpu(7)


def test_restore_finds_the_board_by_uuid_after_the_enumeration_changed(nvml: FakeNvml, state: Path) -> None:
    apply_caps([CapRequest("d0", 200.0, (1,))], Holder("manual"), state_path=state)
    nvml.boards.reverse()  # e.g. after a reboot with another PCI enumeration: index 1 is now the other board
    restore_caps(state_path=state)
    assert nvml.by_uuid("GPU-bbbb-1111").limit_mw == 300_000
    assert ("GPU-aaaa-0000", 300_000) not in nvml.sets  # the other board was never touched


def _dead_holder() -> Holder:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)  # fmt: skip
    return Holder("serve", int(proc.stdout), "1", "crashed serve")


def test_a_crashed_serve_is_restored_by_the_next_start(nvml: FakeNvml, state: Path) -> None:
    apply_caps([CapRequest("d0", 150.0, (0,))], _dead_holder(), state_path=state)
    assert nvml.boards[0].limit_mw == 150_000  # the crashed process left its cap behind
    res = apply_caps([CapRequest("d1", 200.0, (1,))], Holder.this_process("serve"), state_path=state)
    assert [(r.engine_id, r.status) for r in res] == [("d0", CapStatus.RESTORED), ("d1", CapStatus.APPLIED)]
    assert [b.limit_mw for b in nvml.boards] == [300_000, 200_000]
    assert list(json.loads(state.read_text())["gpus"]) == ["GPU-bbbb-1111"]


def test_power_restore_after_a_crash_puts_back_the_original_limits(nvml: FakeNvml, state: Path) -> None:
    nvml.boards[0].limit_mw = 280_000  # an admin's own limit, not the default: that is what comes back
    apply_caps([CapRequest("d0", 150.0, (0, 1))], _dead_holder(), state_path=state)
    res = restore_caps(state_path=state)
    assert sorted((r.gpu_index, r.status, r.applied_w) for r in res) == [
        (0, CapStatus.RESTORED, 280.0), (1, CapStatus.RESTORED, 300.0)
    ]  # fmt: skip
    assert not state.exists()


def test_layers_of_two_holders_unwind_to_what_each_found(nvml: FakeNvml, state: Path) -> None:
    engines, serve = Holder("engines"), Holder.this_process("serve")
    apply_caps([CapRequest("d0", 250.0, (0,))], engines, state_path=state)
    apply_caps([CapRequest("d0", 200.0, (0,))], serve, state_path=state)
    assert nvml.boards[0].limit_mw == 200_000
    restore_caps(serve, state_path=state)  # serve stops: back to the cap `engines up` had set
    assert nvml.boards[0].limit_mw == 250_000
    restore_caps(engines, state_path=state)  # engines down: back to the original
    assert nvml.boards[0].limit_mw == 300_000 and not state.exists()


def test_restoring_a_lower_layer_hands_its_limit_to_the_layer_above(nvml: FakeNvml, state: Path) -> None:
    engines, manual = Holder("engines"), Holder("manual")
    apply_caps([CapRequest("d0", 250.0, (0,))], engines, state_path=state)
    apply_caps([CapRequest("d0", 200.0, (0,))], manual, state_path=state)
    restore_caps(engines, state_path=state)  # not on top: no limit changes now
    assert nvml.boards[0].limit_mw == 200_000
    restore_caps(manual, state_path=state)
    assert nvml.boards[0].limit_mw == 300_000


def test_a_live_serve_keeps_its_gpus(nvml: FakeNvml, state: Path) -> None:
    apply_caps([CapRequest("d0", 200.0, (0,))], Holder.this_process("serve"), state_path=state)
    res = apply_caps([CapRequest("x", 150.0, (0,))], Holder("manual"), state_path=state)
    assert res[0].status is CapStatus.HELD and nvml.boards[0].limit_mw == 200_000
    with pytest.raises(EnergyError, match=r"holds these caps.*--force"):
        restore_caps(state_path=state)
    restore_caps(state_path=state, force=True)
    assert nvml.boards[0].limit_mw == 300_000


def test_reapplying_keeps_the_limit_found_first(nvml: FakeNvml, state: Path) -> None:
    h = Holder("manual")
    apply_caps([CapRequest("d0", 250.0, (0,))], h, state_path=state)
    apply_caps([CapRequest("d0", 200.0, (0,))], h, state_path=state)
    assert [la["before_w"] for la in state_summary(state)[0]["layers"]] == [300.0]
    restore_caps(h, state_path=state)
    assert nvml.boards[0].limit_mw == 300_000


def test_a_failed_restore_keeps_the_record(nvml: FakeNvml, state: Path) -> None:
    apply_caps([CapRequest("d0", 200.0, (0,))], Holder("manual"), state_path=state)
    nvml.permission = False
    res = restore_caps(state_path=state)
    assert res[0].status is CapStatus.FAILED and "as root" in res[0].message
    assert state.exists() and PowerState.read(state).gpus["GPU-aaaa-0000"].original_mw == 300_000
    nvml.permission = True
    assert restore_caps(state_path=state)[0].status is CapStatus.RESTORED


def test_restore_without_nvml_keeps_the_file_and_says_why(state: Path) -> None:
    with FakeNvml().patched():
        apply_caps([CapRequest("d0", 200.0, (0,))], Holder("manual"), state_path=state)
    err = pynvml.NVMLError(pynvml.NVML_ERROR_DRIVER_NOT_LOADED)
    with FakeNvml().patched(init_error=err), pytest.raises(EnergyError, match="cannot restore the limits"):
        restore_caps(state_path=state)
    assert state.exists()


def test_an_unreadable_state_file_says_how_to_recover(state: Path) -> None:
    state.write_text("{not json")
    with pytest.raises(EnergyError, match=r"unreadable.*nvidia-smi -q -d POWER"):
        PowerState.read(state)


def test_boards_with_other_constraints(state: Path) -> None:
    fake = FakeNvml(boards=[FakeBoard("GPU-h100", "00000000:01:00.0", "NVIDIA H100", 700_000, 700_000,
                                      200_000, 700_000)])  # fmt: skip
    with fake.patched():
        res = apply_caps([CapRequest("p0", 450.0, (0,))], Holder("manual"), state_path=state)
    assert res[0].status is CapStatus.APPLIED and fake.boards[0].limit_mw == 450_000
