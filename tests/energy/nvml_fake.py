"""A fake set of GPUs behind pynvml's power-limit functions, patched with ``autospec=True`` (tests only).

Each board has a UUID, a PCI bus id, an NVML index (its position in ``order``, which a test may permute to
mimic another enumeration), and a power limit in mW with NVML's constraints. ``permission=False`` makes
``nvmlDeviceSetPowerManagementLimit`` raise ``NVMLError_NoPermission`` as it does for a non-root user.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from unittest import mock

import pynvml


@dataclass
class FakeBoard:
    uuid: str
    pci_bus_id: str
    name: str = "NVIDIA A40"
    limit_mw: int = 300_000
    default_mw: int = 300_000
    min_mw: int = 100_000  # A40: nvidia-smi -q -d POWER reports Min/Max Power Limit 100.00 / 300.00 W
    max_mw: int = 300_000


@dataclass
class FakeNvml:
    boards: list[FakeBoard] = field(
        default_factory=lambda: [
            FakeBoard("GPU-aaaa-0000", "00000000:17:00.0"),
            FakeBoard("GPU-bbbb-1111", "00000000:65:00.0"),
        ]
    )
    permission: bool = True
    sets: list[tuple[str, int]] = field(default_factory=list)  # (uuid, mW) of every successful set
    readback_offset_mw: int = 0  # > 0: another agent changes the limit after each set
    before_set: Callable[[FakeBoard, int], None] | None = None  # called before each set (a crash point)

    def by_uuid(self, uuid: str) -> FakeBoard:
        for b in self.boards:
            if b.uuid == uuid:
                return b
        raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_FOUND)

    def _board(self, handle: object) -> FakeBoard:
        assert isinstance(handle, FakeBoard)
        return handle

    # the patched functions ---------------------------------------------------------------------------
    def handle_by_index(self, i: int) -> FakeBoard:
        if not 0 <= i < len(self.boards):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return self.boards[i]

    def handle_by_pci(self, bus: str) -> FakeBoard:
        for b in self.boards:
            if b.pci_bus_id == bus:
                return b
        raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_FOUND)

    def set_limit(self, h: object, mw: int) -> None:
        b = self._board(h)
        if self.before_set is not None:
            self.before_set(b, mw)
        if not self.permission:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NO_PERMISSION)
        if not b.min_mw <= mw <= b.max_mw:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        b.limit_mw = mw + self.readback_offset_mw
        self.sets.append((b.uuid, mw))

    @contextlib.contextmanager
    def patched(self, *, init_error: Exception | None = None) -> Iterator[FakeNvml]:
        p = "pynvml."
        patches = [
            mock.patch(p + "nvmlInit", autospec=True, side_effect=init_error),
            mock.patch(p + "nvmlShutdown", autospec=True),
            mock.patch(p + "nvmlDeviceGetCount", autospec=True, side_effect=lambda: len(self.boards)),
            mock.patch(p + "nvmlDeviceGetHandleByIndex", autospec=True, side_effect=self.handle_by_index),
            mock.patch(p + "nvmlDeviceGetHandleByUUID", autospec=True, side_effect=self.by_uuid),
            mock.patch(p + "nvmlDeviceGetHandleByPciBusId", autospec=True, side_effect=self.handle_by_pci),
            mock.patch(p + "nvmlDeviceGetIndex", autospec=True, side_effect=lambda h: self.boards.index(h)),
            mock.patch(p + "nvmlDeviceGetUUID", autospec=True, side_effect=lambda h: self._board(h).uuid),
            mock.patch(p + "nvmlDeviceGetName", autospec=True, side_effect=lambda h: self._board(h).name),
            mock.patch(
                p + "nvmlDeviceGetPciInfo",
                autospec=True,
                side_effect=lambda h: SimpleNamespace(busId=self._board(h).pci_bus_id.encode()),
            ),
            mock.patch(
                p + "nvmlDeviceGetPowerManagementLimit", autospec=True, side_effect=lambda h: h.limit_mw
            ),
            mock.patch(
                p + "nvmlDeviceGetPowerManagementDefaultLimit",
                autospec=True,
                side_effect=lambda h: h.default_mw,
            ),
            mock.patch(
                p + "nvmlDeviceGetPowerManagementLimitConstraints",
                autospec=True,
                side_effect=lambda h: [h.min_mw, h.max_mw],
            ),
            mock.patch(p + "nvmlDeviceSetPowerManagementLimit", autospec=True, side_effect=self.set_limit),
        ]
        with contextlib.ExitStack() as stack:
            for patch in patches:
                stack.enter_context(patch)
            yield self
