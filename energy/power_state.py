"""The state file of GPU power limits ConServe changed (energy/power.py): written before any limit changes.

JSON (default ``~/.cache/conserve/power-caps.json``): per GPU, keyed by UUID, its NVML index and PCI bus id
at the time, the limit before ConServe first changed it (``original_mw``), and one *layer* per holder that
changed it, oldest first (``before_mw``: the limit the layer found; ``target_mw``: the cap it set). Holders:
``serve`` (bound to its process id and start time: stale once that process is gone), ``engines`` (until
``orchestrator engines down``), ``manual`` (until ``orchestrator power restore``), ``profile`` (``profile
--micro``). The file is edited under an ``flock`` on ``<file>.lock`` and replaced atomically (temp file +
rename); an empty state removes it. Must not import fastapi, sqlalchemy or orchestrator.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from energy.errors import EnergyError

STATE_VERSION = 1
DEFAULT_STATE_FILE = (
    Path(os.environ.get("CONSERVE_CACHE", str(Path.home() / ".cache" / "conserve"))) / "power-caps.json"
)


@dataclass(frozen=True, slots=True)
class Holder:
    """Who holds a cap layer. ``pid`` set: the layer lives as long as that process (a ``serve``)."""

    kind: str  # serve | engines | manual | profile
    pid: int | None = None
    pid_start: str | None = None  # /proc/<pid>/stat start time: guards against a reused pid
    label: str = ""

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.pid}:{self.pid_start}" if self.pid is not None else self.kind

    def alive(self) -> bool:
        if self.pid is None:
            return True
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # someone else's process with that pid
            return self.pid_start is None or _pid_start(self.pid) == self.pid_start
        return self.pid_start is None or _pid_start(self.pid) == self.pid_start

    @classmethod
    def this_process(cls, kind: str, label: str = "") -> Holder:
        pid = os.getpid()
        return cls(kind, pid, _pid_start(pid), label)


def _pid_start(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22 (starttime) counting from after the command name


def _now() -> str:
    return datetime.now(UTC).isoformat()


@dataclass(slots=True)
class _Layer:
    holder: Holder
    engine_id: str
    before_mw: int
    target_mw: int
    at: str = field(default_factory=_now)

    def to_dict(self) -> dict[str, Any]:
        return {"holder": asdict(self.holder), "engine_id": self.engine_id, "before_mw": self.before_mw,
                "target_mw": self.target_mw, "at": self.at}  # fmt: skip


@dataclass(slots=True)
class _GpuState:
    nvml_index: int
    pci_bus_id: str
    name: str
    original_mw: int
    layers: list[_Layer] = field(default_factory=list)


class PowerState:
    """The state file's content; ``with PowerState.locked(path) as st:`` reads it under a lock and saves
    it (atomically) on exit. An empty state removes the file."""

    def __init__(self, path: Path, gpus: dict[str, _GpuState] | None = None) -> None:
        self.path = path
        self.gpus: dict[str, _GpuState] = gpus or {}

    @classmethod
    def read(cls, path: Path) -> PowerState:
        if not path.exists():
            return cls(path)
        try:
            data = json.loads(path.read_text())
            gpus = {
                uuid: _GpuState(
                    int(g["nvml_index"]), str(g["pci_bus_id"]), str(g["name"]), int(g["original_mw"]),
                    [_Layer(Holder(**la["holder"]), str(la["engine_id"]), int(la["before_mw"]),
                            int(la["target_mw"]), str(la["at"])) for la in g["layers"]],
                )
                for uuid, g in data["gpus"].items()
            }  # fmt: skip
        except (ValueError, KeyError, TypeError) as err:
            raise EnergyError(
                f"power-cap state file {path} is unreadable ({err}). To fix: check the GPUs' limits with "
                "`nvidia-smi -q -d POWER`, restore them by hand, then delete the file"
            ) from err
        return cls(path, gpus)

    @classmethod
    @contextlib.contextmanager
    def locked(cls, path: Path) -> Iterator[PowerState]:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_name(path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            st = cls.read(path)
            yield st
            st.save()

    def save(self) -> None:
        if not self.gpus:
            self.path.unlink(missing_ok=True)
            return
        data = {
            "version": STATE_VERSION,
            "host": socket.gethostname(),
            "note": "GPU power limits changed by ConServe; `orchestrator power restore` puts them back",
            "gpus": {
                uuid: {"nvml_index": g.nvml_index, "pci_bus_id": g.pci_bus_id, "name": g.name,
                       "original_mw": g.original_mw, "layers": [la.to_dict() for la in g.layers]}
                for uuid, g in self.gpus.items()
            },
        }  # fmt: skip
        from tiers.fileio import write_text_atomic

        write_text_atomic(self.path, json.dumps(data, indent=2) + "\n")

    def holders(self) -> list[Holder]:
        seen: dict[str, Holder] = {}
        for g in self.gpus.values():
            for la in g.layers:
                seen.setdefault(la.holder.key, la.holder)
        return list(seen.values())

    def layers_of(self, holder_key: str) -> list[tuple[str, _Layer]]:
        return [(u, la) for u, g in self.gpus.items() for la in g.layers if la.holder.key == holder_key]


def _pop_layer(st: PowerState, uuid: str, layer: _Layer) -> int | None:
    """Remove ``layer``; the limit the GPU must go back to when it was on top, else None (no change)."""
    g = st.gpus[uuid]
    k = g.layers.index(layer)
    top = k == len(g.layers) - 1
    if not top:
        g.layers[k + 1].before_mw = layer.before_mw
    del g.layers[k]
    if not g.layers:
        del st.gpus[uuid]
    return layer.before_mw if top else None


def state_summary(state_path: Path = DEFAULT_STATE_FILE) -> list[dict[str, Any]]:
    """The state file as rows (GPU, original limit, layers with holder and liveness), for `power show`."""
    st = PowerState.read(state_path)
    return [
        {"gpu_uuid": uuid, "nvml_index": g.nvml_index, "name": g.name, "original_w": g.original_mw / 1000,
         "layers": [{"holder": la.holder.kind, "pid": la.holder.pid, "alive": la.holder.alive(),
                     "engine_id": la.engine_id, "before_w": la.before_mw / 1000,
                     "target_w": la.target_mw / 1000, "at": la.at} for la in g.layers]}
        for uuid, g in st.gpus.items()
    ]  # fmt: skip
