"""The bounded admission wait of orchestrator/core/admission.py, as both drivers apply it."""

from __future__ import annotations

import pytest

from orchestrator.core import Admit, admit, any_room, refusal_message, retry_after_s
from placement.base import InstanceView, Role


def inst(
    iid: str, used: int, cap: int = 1000, healthy: bool = True, role: Role = Role.DECODE
) -> InstanceView:
    return InstanceView(iid, role, "a40", healthy=healthy, kv_used_tokens=used, kv_capacity_tokens=cap)


@pytest.mark.parametrize(
    ("room", "waited", "bound", "expected"),
    [
        (True, 0.0, 30.0, Admit.ADMIT),
        (True, 99.0, 30.0, Admit.ADMIT),
        (False, 0.0, 30.0, Admit.WAIT),
        (False, 29.9, 30.0, Admit.WAIT),
        (False, 30.0, 30.0, Admit.REJECT),
        (False, 5.0, 0.0, Admit.ADMIT),  # 0: admission off
    ],
    ids=["room", "room-late", "no-room", "just-before", "bound-reached", "off"],
)
def test_admit(room: bool, waited: float, bound: float, expected: Admit) -> None:
    assert admit(room, waited, bound) is expected


def test_room_is_on_a_healthy_decode_capable_instance() -> None:
    assert any_room([inst("d0", 900), inst("d1", 400)], 500)
    assert not any_room([inst("d0", 900), inst("d1", 600)], 500)
    # a prefiller's free KV does not count, nor an unhealthy decoder's
    assert not any_room(
        [inst("p0", 0, role=Role.PREFILL), inst("d0", 900), inst("d1", 0, healthy=False)], 500
    )
    # no healthy decoder at all: waiting cannot help, placement answers at once
    assert any_room([inst("d0", 0, healthy=False)], 500)


def test_retry_after_is_the_bound_in_whole_seconds() -> None:
    assert [retry_after_s(w) for w in (0.2, 1.0, 2.5, 30.0)] == [1, 1, 3, 30]
    assert "To fix" in refusal_message(1234, 2.0) and "1234" in refusal_message(1234, 2.0)
