"""Meters: NVML counter resets/wraps, DCGM exporter parsing, zeus windows (hardware layers patched with
autospec), the model meter against the tier power model, and replay."""

# ruff: noqa: E501  (the DCGM sample keeps the exporter's real one-line-per-sample layout)
from __future__ import annotations

from datetime import UTC, datetime, timedelta
from unittest import mock

import pynvml
import pytest

from energy import meters
from energy.errors import EnergyError
from energy.meters import (
    U64,
    Activity,
    CounterTracker,
    DcgmMeter,
    ModelMeter,
    NvmlMeter,
    ReplayMeter,
    ZeusMeter,
    make_meter,
    modelled_energy_j,
    parse_dcgm_energy,
    read_samples,
    write_samples,
)
from energy.records import EnergySample, Source
from tiers.catalog import get_gpu
from tiers.models import get_model
from tiers.perf import TierModel

T0 = datetime(2025, 1, 1, tzinfo=UTC)


class FakeClock:
    def __init__(self) -> None:
        self.t = T0

    def __call__(self) -> datetime:
        return self.t

    def tick(self, s: float) -> None:
        self.t += timedelta(seconds=s)


# ---- counter folding --------------------------------------------------------------------------------
def test_counter_tracker_handles_reset_and_wrap() -> None:
    c = CounterTracker()
    assert c.update(1_000_000, T0) == 0.0  # baseline
    assert c.update(1_300_000, T0 + timedelta(seconds=1)) == pytest.approx(300.0)
    # driver reload: counter restarts near 0; the 50 J since the reset are kept
    assert c.update(50_000, T0 + timedelta(seconds=2)) == pytest.approx(350.0)
    assert c.resets == 1
    # near the top of 64 bits, then wrapping past zero by 200 J
    c2 = CounterTracker()
    c2.update(U64 - 100_000, T0)
    assert c2.update(100_000, T0 + timedelta(seconds=1)) == pytest.approx(200.0)
    assert c2.wraps == 1 and c2.resets == 0


# ---- NVML (patched, autospec) ---------------------------------------------------------------------------
@pytest.fixture
def fake_nvml():
    readings = {
        0: iter([5_000_000, 5_100_000, 5_400_000, 20_000, 120_000]),
        1: iter([10, 1_010, 2_010, 3_010, 4_010]),
    }
    handles = {0: object(), 1: object()}
    by_handle = {id(h): i for i, h in handles.items()}
    with (
        mock.patch("pynvml.nvmlInit", autospec=True) as init,
        mock.patch("pynvml.nvmlShutdown", autospec=True),
        mock.patch("pynvml.nvmlDeviceGetCount", autospec=True, return_value=2),
        mock.patch("pynvml.nvmlDeviceGetHandleByIndex", autospec=True, side_effect=lambda i: handles[i]),
        mock.patch(
            "pynvml.nvmlDeviceGetTotalEnergyConsumption",
            autospec=True,
            side_effect=lambda h: next(readings[by_handle[id(h)]]),
        ) as energy,
    ):
        yield init, energy


def test_nvml_meter_is_monotonic_across_a_driver_reset(fake_nvml) -> None:
    clock = FakeClock()
    m = NvmlMeter([0, 1], clock=clock)
    seen = []
    for _ in range(4):
        clock.tick(1.0)
        seen.append(m.read())
    gpu0 = [r.cumulative_j[0] for r in seen]
    assert gpu0 == pytest.approx(
        [100.0, 400.0, 420.0, 520.0]
    )  # reset at the 3rd read keeps the 20 J after it
    assert all(b >= a for a, b in zip(gpu0, gpu0[1:], strict=False))
    assert [r.cumulative_j[1] for r in seen] == pytest.approx([1.0, 2.0, 3.0, 4.0])
    assert m.resets == 1
    assert seen[-1].at == T0 + timedelta(seconds=4)
    samples = seen[-1].samples("nvml", m.source, {0: "d0"})
    assert samples[0].engine_id == "d0" and samples[0].source == Source.MEASURED


def test_nvml_without_driver_names_the_alternative() -> None:
    err = pynvml.NVMLError_LibraryNotFound(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)
    with (
        mock.patch("pynvml.nvmlInit", autospec=True, side_effect=err),
        pytest.raises(
            EnergyError, match=r"^no NVIDIA driver \(NVML not found.*use meter kind 'model' or 'dcgm'"
        ),
    ):
        NvmlMeter([0])


def test_nvml_unsupported_counter_says_what_to_use(fake_nvml) -> None:
    _, energy = fake_nvml
    m = NvmlMeter([0, 1])
    energy.side_effect = pynvml.NVMLError_NotSupported(pynvml.NVML_ERROR_NOT_SUPPORTED)
    with pytest.raises(EnergyError, match="pre-Volta.*'zeus'"):
        m.read()


def test_real_environment_without_gpu_gives_one_line_errors() -> None:
    """On a machine without an NVIDIA driver (like CI), both hardware meters fail in one line."""
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        pass
    else:  # pragma: no cover - a GPU host
        pynvml.nvmlShutdown()
        pytest.skip("this host has an NVIDIA driver")
    for kind in ("nvml", "zeus"):
        with pytest.raises(EnergyError, match="no NVIDIA driver.*use meter kind 'model' or 'dcgm'") as info:
            make_meter(kind, gpu_indices=[0])
        assert "\n" not in str(info.value)


# ---- zeus (patched device layer and monitor, autospec) ---------------------------------------------
def test_zeus_meter_sums_consecutive_windows() -> None:
    from zeus.monitor.energy import Measurement

    windows = iter(
        [
            Measurement(1.0, {0: 250.0, 1: 100.0}),
            Measurement(1.0, {0: 300.0, 1: 90.0}),
            Measurement(0.5, {0: 0.0, 1: 0.0}),
        ]
    )
    with (
        mock.patch("zeus.device.get_gpus", autospec=True, return_value=[object(), object()]),
        mock.patch("zeus.monitor.ZeusMonitor", autospec=True) as monitor_cls,
    ):
        monitor = monitor_cls.return_value
        monitor.end_window.side_effect = lambda key, sync_execution=True, cancel=False: next(windows)
        clock = FakeClock()
        m = ZeusMeter([0, 1], clock=clock)
        monitor_cls.assert_called_once_with(gpu_indices=[0, 1], cpu_indices=[])
        r1 = m.read()
        r2 = m.read()
        r3 = m.read()
    assert r1.cumulative_j == {0: 250.0, 1: 100.0}
    assert r2.cumulative_j == {0: 550.0, 1: 190.0}
    assert r3.cumulative_j == r2.cumulative_j
    # one window open at any time: begin at start, then end+begin on every read
    assert monitor.begin_window.call_count == 4 and monitor.end_window.call_count == 3
    keys = {c.args[0] for c in monitor.begin_window.call_args_list + monitor.end_window.call_args_list}
    assert keys == {ZeusMeter._KEY}


def test_zeus_bad_gpu_index_is_named() -> None:
    with (
        mock.patch("zeus.device.get_gpus", autospec=True, return_value=[object()]),
        mock.patch("zeus.monitor.ZeusMonitor", autospec=True),
        pytest.raises(EnergyError, match=r"GPU indices \[3\] do not exist"),
    ):
        ZeusMeter([0, 3])


# ---- DCGM exporter ---------------------------------------------------------------------------------------
# What dcgm-exporter 3.x serves on :9400/metrics for a 2 x A40 node (trimmed to a few fields; label set and
# HELP/TYPE lines as in its default-counters.csv).
DCGM_TEXT = """\
# HELP DCGM_FI_DEV_SM_CLOCK SM clock frequency (in MHz).
# TYPE DCGM_FI_DEV_SM_CLOCK gauge
DCGM_FI_DEV_SM_CLOCK{gpu="0",UUID="GPU-6b1e2c3d-aaaa-bbbb-cccc-0123456789ab",pci_bus_id="00000000:3B:00.0",device="nvidia0",modelName="NVIDIA A40",Hostname="gpu-node-1",DCGM_FI_DRIVER_VERSION="550.54.15"} 1740
DCGM_FI_DEV_SM_CLOCK{gpu="1",UUID="GPU-7c2f3d4e-aaaa-bbbb-cccc-0123456789ab",pci_bus_id="00000000:AF:00.0",device="nvidia1",modelName="NVIDIA A40",Hostname="gpu-node-1",DCGM_FI_DRIVER_VERSION="550.54.15"} 210
# HELP DCGM_FI_DEV_POWER_USAGE Power draw (in W).
# TYPE DCGM_FI_DEV_POWER_USAGE gauge
DCGM_FI_DEV_POWER_USAGE{gpu="0",UUID="GPU-6b1e2c3d-aaaa-bbbb-cccc-0123456789ab",pci_bus_id="00000000:3B:00.0",device="nvidia0",modelName="NVIDIA A40",Hostname="gpu-node-1",DCGM_FI_DRIVER_VERSION="550.54.15"} 287.512000
DCGM_FI_DEV_POWER_USAGE{gpu="1",UUID="GPU-7c2f3d4e-aaaa-bbbb-cccc-0123456789ab",pci_bus_id="00000000:AF:00.0",device="nvidia1",modelName="NVIDIA A40",Hostname="gpu-node-1",DCGM_FI_DRIVER_VERSION="550.54.15"} 77.034000
# HELP DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION Total energy consumption since boot (in mJ).
# TYPE DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION counter
DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION{gpu="0",UUID="GPU-6b1e2c3d-aaaa-bbbb-cccc-0123456789ab",pci_bus_id="00000000:3B:00.0",device="nvidia0",modelName="NVIDIA A40",Hostname="gpu-node-1",DCGM_FI_DRIVER_VERSION="550.54.15",container="vllm",namespace="llm",pod="decoder-0"} {e0}
DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION{gpu="1",UUID="GPU-7c2f3d4e-aaaa-bbbb-cccc-0123456789ab",pci_bus_id="00000000:AF:00.0",device="nvidia1",modelName="NVIDIA A40",Hostname="gpu-node-1",DCGM_FI_DRIVER_VERSION="550.54.15"} {e1}
# HELP DCGM_FI_DEV_GPU_UTIL GPU utilization (in %).
# TYPE DCGM_FI_DEV_GPU_UTIL gauge
DCGM_FI_DEV_GPU_UTIL{gpu="0",UUID="GPU-6b1e2c3d-aaaa-bbbb-cccc-0123456789ab",pci_bus_id="00000000:3B:00.0",device="nvidia0",modelName="NVIDIA A40",Hostname="gpu-node-1",DCGM_FI_DRIVER_VERSION="550.54.15"} 97
"""


def dcgm(e0: int, e1: int) -> str:
    return DCGM_TEXT.replace("{e0}", str(e0)).replace("{e1}", str(e1))


def test_parse_dcgm_energy_reads_only_the_energy_counter() -> None:
    assert parse_dcgm_energy(dcgm(8_795_439_243, 1_234_567)) == {0: 8_795_439_243, 1: 1_234_567}
    assert parse_dcgm_energy(dcgm(1, 2), hostname="other-node") == {}


def test_dcgm_meter_scrapes_and_folds_counters() -> None:
    pages = iter([dcgm(8_795_439_243, 1_000_000), dcgm(8_795_739_243, 1_077_000), dcgm(30_000, 1_154_000)])
    clock = FakeClock()
    m = DcgmMeter("http://gpu-node-1:9400/metrics", [0, 1], clock=clock, fetch=lambda url: next(pages))
    clock.tick(1)
    r1 = m.read()
    clock.tick(1)
    r2 = m.read()
    assert r1.cumulative_j == pytest.approx({0: 300.0, 1: 77.0})
    assert r2.cumulative_j == pytest.approx({0: 330.0, 1: 154.0})  # GPU 0 reset: +30 J since


def test_dcgm_missing_field_and_bad_text_are_explained() -> None:
    no_energy = "\n".join(line for line in DCGM_TEXT.splitlines() if "TOTAL_ENERGY" not in line) + "\n"
    with pytest.raises(
        EnergyError, match="no DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION for GPUs \\[0\\].*counters CSV"
    ):
        DcgmMeter("http://x:9400/metrics", [0], fetch=lambda url: no_energy)
    with pytest.raises(EnergyError, match="needs 'url'"):
        DcgmMeter("", [0])


def test_dcgm_meter_against_a_real_http_exporter_stub() -> None:
    """Scrape over real HTTP from a local server serving the sample text."""
    import http.server
    import threading

    body = dcgm(1_000_000, 2_000_000).encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - stdlib name
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        m = DcgmMeter(f"http://127.0.0.1:{server.server_port}/metrics")
        assert m.gpu_indices == (0, 1)
        assert m.read().cumulative_j == {0: 0.0, 1: 0.0}
    finally:
        server.shutdown()
        server.server_close()


# ---- model meter -------------------------------------------------------------------------------------------
def a40() -> TierModel:
    return TierModel(get_gpu("A40"), get_model("Qwen3-0.6B"))


def test_model_energy_is_idle_when_nothing_runs_and_capped_when_busy() -> None:
    tier = a40()
    assert modelled_energy_j(tier, Activity(), 10.0) == pytest.approx(tier.idle_w * 10.0)
    busy = modelled_energy_j(tier, Activity(prefill_tokens=10**7), 1.0)
    assert busy == pytest.approx(tier.cap_w * tier.gpus * 1.0)
    some = modelled_energy_j(tier, Activity(prefill_tokens=4096), 10.0)
    assert tier.idle_w * 10 < some < tier.cap_w * 10


def test_model_meter_integrates_activity_and_labels_it_modelled() -> None:
    tier = a40()
    clock = FakeClock()
    calls = []

    def activity(start: datetime, end: datetime) -> Activity:
        calls.append((start, end))
        return Activity(decode_tokens=640, decode_batch=32, decode_context_tokens=32 * 2000)

    m = ModelMeter(tier, activity, clock=clock)
    clock.tick(2.0)
    r1 = m.read()
    clock.tick(2.0)
    r2 = m.read()
    assert m.source == Source.MODELLED
    assert calls == [(T0, T0 + timedelta(seconds=2)), (T0 + timedelta(seconds=2), T0 + timedelta(seconds=4))]
    one = modelled_energy_j(tier, activity(T0, T0), 2.0)
    assert r1.cumulative_j[0] == pytest.approx(one)
    assert r2.cumulative_j[0] == pytest.approx(2 * one)


# ---- replay ------------------------------------------------------------------------------------------------
def test_replay_meter_interpolates_recorded_samples(tmp_path) -> None:
    recorded = [EnergySample("m", 0, T0 + timedelta(seconds=s), 1000.0 + 100.0 * s) for s in (0, 10, 20)]
    path = tmp_path / "samples.jsonl"
    write_samples(path, recorded)
    assert read_samples(path)[1].cumulative_j == 2000.0
    clock = FakeClock()
    m = ReplayMeter.from_file(path, clock=clock)
    assert m.read().cumulative_j == {0: 0.0}
    clock.tick(15)
    assert m.read().cumulative_j[0] == pytest.approx(1500.0)
    clock.tick(100)
    assert m.read().cumulative_j[0] == pytest.approx(2000.0)
    with pytest.raises(EnergyError, match="decreases"):
        ReplayMeter([recorded[1], EnergySample("m", 0, T0 + timedelta(seconds=30), 0.0)])


def test_unknown_meter_kind_suggests_the_closest() -> None:
    with pytest.raises(EnergyError, match="Did you mean 'nvml'"):
        make_meter("nvm")
    assert set(meters.METER_KINDS) == {"zeus", "nvml", "dcgm", "model", "replay"}
