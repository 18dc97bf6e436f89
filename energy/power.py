"""GPU power caps, really applied: NVML (or the zeusd daemon) sets, reads back and restores power limits.

``apply_caps(requests, holder)`` sets each requested GPU's power management limit
(``nvmlDeviceSetPowerManagementLimit``, milliwatts), reads it back (``nvmlDeviceGetPowerManagementLimit``) and
returns one :class:`CapResult` per GPU; ``restore_caps(holder)`` puts back what was there before. Nothing is
raised for a GPU that cannot be capped (no NVML, no permission, a cap outside
``nvmlDeviceGetPowerManagementLimitConstraints``): its result says so and why, so serving goes on.

Restoring survives crashes: before any limit changes, the state file (energy/power_state.py) records per GPU,
keyed by UUID, the limit before ConServe first touched it and one *layer* per holder that changed it. A holder
restores its own layers: the top one goes back to the limit it found, a lower one hands that limit to the
layer above it. A ``serve`` layer whose process has died is stale; the next start (or ``orchestrator power
restore``) restores it.

GPU identity: a selector is an NVML index (``nvidia-smi`` order, which ``CUDA_VISIBLE_DEVICES`` does not
renumber and which differs from CUDA's default fastest-first order unless ``CUDA_DEVICE_ORDER=PCI_BUS_ID``),
a UUID (``GPU-...``) or a PCI bus id. The state file stores UUIDs, so restoring finds the same board whatever
the enumeration order is then.

Without root, NVML refuses to set limits (``NVML_ERROR_NO_PERMISSION``); when the Zeus daemon is configured
(``ZEUSD_SOCK_PATH`` or ``ZEUSD_HOST_PORT``, zeus >= 0.16) the limit is set through it instead.
Must not import fastapi, sqlalchemy or orchestrator.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from energy.errors import EnergyError
from energy.power_state import (
    DEFAULT_STATE_FILE,
    Holder,
    PowerState,
    _GpuState,
    _Layer,
    _pop_layer,
    state_summary,
)
from energy.records import PowerCapRecord

__all__ = [
    "DEFAULT_STATE_FILE", "CapRequest", "CapResult", "CapStatus", "GpuPower", "Holder", "NvmlPower",
    "PowerState", "apply_caps", "restore_caps", "state_summary",
]  # fmt: skip

# NVML reports and accepts whole milliwatts; a read-back within 1 W of the target counts as applied (drivers
# may round to their own step).
READBACK_TOLERANCE_MW = 1000


class CapStatus(StrEnum):
    APPLIED = "applied"  # set and read back equal (within 1 W)
    DIFFERS = "differs"  # set, but the read-back limit is another value
    RESTORED = "restored"  # put back to the limit found before
    SIMULATED = "simulated"  # a simulated engine: the cap is modelled, no GPU exists
    NO_NVML = "no_nvml"  # no NVIDIA driver / nvidia-ml-py
    NO_PERMISSION = "no_permission"
    OUT_OF_RANGE = "out_of_range"  # outside the GPU's NVML limit constraints
    NO_GPUS = "no_gpus"  # the engine names no GPUs to cap
    REMOTE = "remote"  # the engine runs on another host: caps are set where its GPUs are
    HELD = "held"  # another live holder's layer is on top of this GPU
    FAILED = "failed"  # any other NVML error

    @property
    def in_force(self) -> bool:
        return self in (CapStatus.APPLIED, CapStatus.DIFFERS)


@dataclass(frozen=True, slots=True)
class GpuPower:
    """One GPU's power-limit facts as NVML reports them (watts)."""

    nvml_index: int
    uuid: str
    pci_bus_id: str
    name: str
    limit_w: float
    default_w: float
    min_w: float
    max_w: float


@dataclass(frozen=True, slots=True)
class CapRequest:
    """Cap every GPU of one engine at ``cap_w`` watts each (GPU selectors: NVML index, UUID or PCI bus id)."""

    engine_id: str
    cap_w: float
    gpus: tuple[int | str, ...] = ()
    tier: str | None = None


@dataclass(frozen=True, slots=True)
class CapResult:
    engine_id: str
    status: CapStatus
    message: str = ""
    requested_w: float | None = None
    applied_w: float | None = None  # the limit read back after setting (None: not read)
    previous_w: float | None = None  # the limit before this change
    gpu_index: int | None = None
    gpu_uuid: str | None = None
    tier: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["status"] = str(self.status)
        return d

    def record(self, event: str, at: datetime | None = None) -> PowerCapRecord:
        """This result as a ledger row (``event``: apply or restore)."""
        return PowerCapRecord(
            self.engine_id, event, str(self.status), at or datetime.now(UTC), self.tier, self.requested_w,
            self.applied_w, self.previous_w, self.gpu_index, self.gpu_uuid, self.message,
        )  # fmt: skip


# ---- NVML --------------------------------------------------------------------------------------------
NO_NVML_HINT = "power caps are not applied (serving goes on uncapped)"


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


class NvmlPower:
    """Power limits through nvidia-ml-py; raises EnergyError (one line) when NVML is not there."""

    def __init__(self) -> None:
        try:
            import pynvml
        except ImportError:
            raise EnergyError(
                f"nvidia-ml-py is not installed (pip install 'conserve[gpu]'); {NO_NVML_HINT}"
            ) from None
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as err:
            raise EnergyError(f"no NVIDIA driver (NVML: {err}); {NO_NVML_HINT}") from err
        self._nvml = pynvml
        self.NVMLError: type[Exception] = pynvml.NVMLError

    def is_permission_error(self, err: Exception) -> bool:
        return isinstance(err, self._nvml.NVMLError_NoPermission)

    def close(self) -> None:
        with contextlib.suppress(self._nvml.NVMLError):
            self._nvml.nvmlShutdown()

    def __enter__(self) -> NvmlPower:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def count(self) -> int:
        return int(self._nvml.nvmlDeviceGetCount())

    def _handle(self, selector: int | str) -> Any:
        n = self._nvml
        if isinstance(selector, int) or (isinstance(selector, str) and selector.isdigit()):
            return n.nvmlDeviceGetHandleByIndex(int(selector))
        if selector.startswith(("GPU-", "MIG-")):
            return n.nvmlDeviceGetHandleByUUID(selector)
        return n.nvmlDeviceGetHandleByPciBusId(selector)

    def gpu(self, selector: int | str) -> GpuPower:
        """Facts of one GPU; EnergyError naming the selector when NVML does not know it."""
        n = self._nvml
        try:
            h = self._handle(selector)
            lo, hi = n.nvmlDeviceGetPowerManagementLimitConstraints(h)
            return GpuPower(
                nvml_index=int(n.nvmlDeviceGetIndex(h)),
                uuid=_s(n.nvmlDeviceGetUUID(h)),
                pci_bus_id=_s(n.nvmlDeviceGetPciInfo(h).busId),
                name=_s(n.nvmlDeviceGetName(h)),
                limit_w=n.nvmlDeviceGetPowerManagementLimit(h) / 1000.0,
                default_w=n.nvmlDeviceGetPowerManagementDefaultLimit(h) / 1000.0,
                min_w=lo / 1000.0,
                max_w=hi / 1000.0,
            )
        except n.NVMLError as err:
            raise EnergyError(
                f"GPU {selector!r}: NVML cannot read it ({err}). To fix: use an NVML index from "
                "`nvidia-smi -L` (not a CUDA_VISIBLE_DEVICES position), a GPU UUID or a PCI bus id"
            ) from err

    def gpus(self) -> list[GpuPower]:
        return [self.gpu(i) for i in range(self.count())]

    def limit_mw(self, uuid: str) -> int:
        return int(self._nvml.nvmlDeviceGetPowerManagementLimit(self._handle(uuid)))

    def set_limit_mw(self, gpu: GpuPower, limit_mw: int) -> None:
        """Set the limit; without permission, through zeusd when it is configured. Raises NVMLError."""
        n = self._nvml
        try:
            n.nvmlDeviceSetPowerManagementLimit(self._handle(gpu.uuid), int(limit_mw))
        except n.NVMLError_NoPermission:
            client = _zeusd_client()
            if client is None:
                raise
            client.set_power_limit([gpu.nvml_index], int(limit_mw), True)  # zeusd numbers GPUs as NVML


def _zeusd_client() -> Any | None:
    """A zeusd client when ZEUSD_SOCK_PATH / ZEUSD_HOST_PORT is set (zeus >= 0.16), else None."""
    try:
        from zeus.utils.zeusd import ZeusdClient, ZeusdConfig
    except ImportError:
        return None
    config = ZeusdConfig.from_env()
    return None if config is None else ZeusdClient(config)


def _permission_message(gpu: GpuPower, cap_w: float, err: Exception) -> str:
    return (
        f"setting GPU {gpu.nvml_index} ({gpu.uuid}) to {cap_w:g} W needs root (CAP_SYS_ADMIN); NVML said "
        f"'{err}'. To fix: run as root, or run the Zeus daemon (zeusd) and set ZEUSD_SOCK_PATH, or have an "
        f"admin run `nvidia-smi -i {gpu.nvml_index} -pl {cap_w:g}`"
    )


# ---- apply / restore -----------------------------------------------------------------------------------
def _open(nvml: NvmlPower | None) -> tuple[NvmlPower | None, str]:
    if nvml is not None:
        return nvml, ""
    try:
        return NvmlPower(), ""
    except EnergyError as err:
        return None, str(err)


def apply_caps(
    requests: Sequence[CapRequest],
    holder: Holder,
    *,
    state_path: Path = DEFAULT_STATE_FILE,
    clamp: bool = False,
    nvml: NvmlPower | None = None,
) -> list[CapResult]:
    """Set every request's GPUs to its cap, read them back, and record the layers (before changing anything).

    ``clamp``: a cap outside the GPU's NVML constraints is set to the nearest allowed limit instead of being
    refused. Stale layers of dead holders are restored first (their results come first, status ``restored``).
    Never raises for a GPU that cannot be capped: its result says why."""
    dev, why = _open(nvml)
    if dev is None:
        return [CapResult(r.engine_id, CapStatus.NO_NVML, why, r.cap_w, tier=r.tier) for r in requests]
    try:
        with PowerState.locked(state_path) as st:
            out = _restore_stale(st, dev)
            for r in requests:
                out += _apply_request(st, dev, r, holder, clamp)
        return out
    finally:
        if nvml is None:
            dev.close()


def _apply_request(
    st: PowerState, dev: NvmlPower, req: CapRequest, holder: Holder, clamp: bool
) -> list[CapResult]:
    def result(status: CapStatus, msg: str, gpu: GpuPower | None = None, **kw: Any) -> CapResult:
        return CapResult(req.engine_id, status, msg, req.cap_w, gpu_index=gpu.nvml_index if gpu else None,
                         gpu_uuid=gpu.uuid if gpu else None, tier=req.tier, **kw)  # fmt: skip

    if not req.gpus:
        return [result(CapStatus.NO_GPUS, f"engine {req.engine_id!r} names no GPUs. To fix: list its GPUs' "
                       "NVML indices in fleet.yaml engines[].gpu_indices")]  # fmt: skip
    out = []
    for sel in req.gpus:
        try:
            gpu = dev.gpu(sel)
        except EnergyError as err:
            out.append(result(CapStatus.FAILED, str(err)))
            continue
        before = {"previous_w": gpu.limit_w}
        target_w, note = req.cap_w, ""
        if not gpu.min_w <= target_w <= gpu.max_w:
            allowed = f"NVML allows {gpu.min_w:g}-{gpu.max_w:g} W on GPU {gpu.nvml_index} ({gpu.name})"
            if not clamp:
                msg = (f"cap {target_w:g} W for engine {req.engine_id!r} is outside what {allowed}. To fix: "
                       "choose a cap in that range (or clamp with --clamp)")  # fmt: skip
                out.append(result(CapStatus.OUT_OF_RANGE, msg, gpu, **before))
                continue
            target_w = min(max(target_w, gpu.min_w), gpu.max_w)
            note = f"clamped to {target_w:g} W ({allowed})"
        g = st.gpus.get(gpu.uuid)
        top = g.layers[-1] if g else None
        mine_below = g is not None and any(la.holder.key == holder.key for la in g.layers)
        if top is not None and top.holder.key != holder.key and (top.holder.kind == "serve" or mine_below):
            out.append(result(CapStatus.HELD, f"GPU {gpu.nvml_index} is capped by `{top.holder.kind}` (pid "
                              f"{top.holder.pid}, engine {top.engine_id}). To fix: stop it first", gpu,
                              **before))  # fmt: skip
            continue
        current_mw, target_mw = round(gpu.limit_w * 1000), round(target_w * 1000)
        if top is not None and top.holder.key == holder.key:  # re-applying our own layer keeps what it found
            undo = (top, top.target_mw)
            top.target_mw, top.engine_id = target_mw, req.engine_id
        else:
            if g is None:
                g = st.gpus[gpu.uuid] = _GpuState(gpu.nvml_index, gpu.pci_bus_id, gpu.name, current_mw)
            undo = None
            new_layer = _Layer(holder, req.engine_id, current_mw, target_mw)
            g.layers.append(new_layer)
        st.save()  # recorded before the limit changes: a crash from here on is restored from the file
        try:
            if current_mw != target_mw:
                dev.set_limit_mw(gpu, target_mw)
            readback_mw = dev.limit_mw(gpu.uuid)
        except dev.NVMLError as err:
            if undo is None:
                _pop_layer(st, gpu.uuid, new_layer)
            else:
                undo[0].target_mw = undo[1]
            st.save()
            perm = dev.is_permission_error(err)
            msg = _permission_message(gpu, target_w, err) if perm else f"NVML failed setting the limit: {err}"
            out.append(result(CapStatus.NO_PERMISSION if perm else CapStatus.FAILED, msg, gpu, **before))
            continue
        status = CapStatus.APPLIED
        if abs(readback_mw - target_mw) > READBACK_TOLERANCE_MW:
            status = CapStatus.DIFFERS
            note = (f"set {target_w:g} W but NVML reads back {readback_mw / 1000:g} W (another agent, e.g. a "
                    "DCGM policy or nvidia-smi, may be setting it)")  # fmt: skip
        out.append(result(status, note, gpu, applied_w=readback_mw / 1000, **before))
    return out


def _set_limit(dev: NvmlPower, uuid: str, engine_id: str, mw: int, gpu_index: int) -> CapResult:
    """Put GPU ``uuid`` back to ``mw`` and read it back."""
    try:
        gpu = dev.gpu(uuid)
        if round(gpu.limit_w * 1000) != mw:
            dev.set_limit_mw(gpu, mw)
        back = dev.limit_mw(uuid)
    except (dev.NVMLError, EnergyError) as err:
        msg = f"restoring GPU {gpu_index} ({uuid}) to {mw / 1000:g} W failed: {err}"
        if isinstance(err, dev.NVMLError) and dev.is_permission_error(err):
            msg += "; run `orchestrator power restore` as root (the state file keeps the limit to restore)"
        return CapResult(engine_id, CapStatus.FAILED, msg, mw / 1000, gpu_index=gpu_index, gpu_uuid=uuid)
    status = CapStatus.RESTORED if abs(back - mw) <= READBACK_TOLERANCE_MW else CapStatus.DIFFERS
    return CapResult(engine_id, status, "", mw / 1000, back / 1000, gpu_index=gpu_index, gpu_uuid=uuid)


def _restore_layers(st: PowerState, dev: NvmlPower, pairs: Sequence[tuple[str, _Layer]]) -> list[CapResult]:
    """Remove the layers (newest first); a top layer's GPU goes back to the limit it found. A layer whose
    restore fails stays in the file, so a later `orchestrator power restore` can finish it."""
    out = []
    for uuid, layer in reversed(pairs):
        g = st.gpus[uuid]
        if g.layers[-1] is layer:
            res = _set_limit(dev, uuid, layer.engine_id, layer.before_mw, g.nvml_index)
            out.append(res)
            if res.status is CapStatus.FAILED:
                continue
        _pop_layer(st, uuid, layer)
        st.save()
    return out


def _restore_stale(st: PowerState, dev: NvmlPower) -> list[CapResult]:
    out = []
    for h in st.holders():
        if not h.alive():
            out += _restore_layers(st, dev, st.layers_of(h.key))
    return out


def restore_caps(
    holder: Holder | None = None,
    *,
    state_path: Path = DEFAULT_STATE_FILE,
    force: bool = False,
    nvml: NvmlPower | None = None,
) -> list[CapResult]:
    """Restore the limits ``holder`` changed (and those of dead holders). ``holder=None``: every GPU in the
    state file back to the limit it had before ConServe first changed it; refused while a live ``serve`` holds
    caps, unless ``force``.

    Raises EnergyError when there is something to restore but NVML is not there (the file is kept)."""
    if not state_path.exists():
        return []
    dev, why = _open(nvml)
    try:
        with PowerState.locked(state_path) as st:
            if not st.gpus:
                return []
            if dev is None:
                raise EnergyError(f"{why.split(';')[0]}: cannot restore the limits recorded in {state_path}")
            if holder is not None:
                return _restore_stale(st, dev) + _restore_layers(st, dev, st.layers_of(holder.key))
            live = [h for h in st.holders() if h.kind == "serve" and h.alive()]
            if live and not force:
                raise EnergyError(
                    f"`orchestrator serve` (pid {live[0].pid}) holds these caps and restores them when it "
                    "stops. To fix: stop it, or pass --force"
                )
            out = []
            for uuid, g in list(st.gpus.items()):
                res = _set_limit(dev, uuid, g.layers[-1].engine_id, g.original_mw, g.nvml_index)
                out.append(res)
                if res.status is not CapStatus.FAILED:
                    del st.gpus[uuid]
                    st.save()
            return out
    finally:
        if dev is not None and nvml is None:
            dev.close()
