"""A virtual-time asyncio event loop for tests: the live router and its simulated engines run unchanged, and
time advances only when every task waits for a timer (to that timer), never with the wall clock.

``loop.time()`` is the virtual time in seconds (0 at the start); ``asyncio.sleep``, ``wait_for`` and every
other timer use it; ``asyncio.to_thread`` runs its call inline (:class:`InlineExecutor`). A run with nothing
scheduled and nothing ready is a deadlock and raises. Real I/O is still polled (without blocking), so only
in-process work belongs here.

A plain module (not conftest.py), imported as ``from vloop import ...`` like tests/sim/simkit.py.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import selectors
from collections.abc import Awaitable
from typing import Any, TypeVar

T = TypeVar("T")


class _Selector(selectors.DefaultSelector):  # type: ignore[misc,valid-type]
    loop: VirtualTimeLoop

    def select(self, timeout: float | None = None) -> list[Any]:
        ready = super().select(0)
        if ready or (timeout is not None and timeout <= 0):
            return ready
        if timeout is None:
            raise RuntimeError("virtual-time loop: nothing is scheduled and nothing is ready (a deadlock)")
        self.loop.advance(timeout)
        return ready


class InlineExecutor(concurrent.futures.ThreadPoolExecutor):
    """The virtual loop's default executor: ``asyncio.to_thread`` / ``run_in_executor`` run the call at once,
    on the loop's thread. A worker thread would finish at a wall-clock moment while virtual time jumps ahead
    to the next timer (a race); inline, the call takes no virtual time and the run stays deterministic."""

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
        try:
            fut.set_result(fn(*args, **kwargs))
        except BaseException as err:  # handed to the awaiting coroutine, as a worker thread would
            fut.set_exception(err)
        return fut


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    def __init__(self) -> None:
        sel = _Selector()
        super().__init__(sel)
        sel.loop = self
        self._virtual_s = 0.0
        self._clock_resolution = 1e-9
        self.set_default_executor(InlineExecutor(max_workers=1))

    def time(self) -> float:
        return self._virtual_s

    def advance(self, seconds: float) -> None:
        self._virtual_s += seconds


def run_virtual(main: Awaitable[T]) -> T:
    """Run a coroutine to completion on a fresh virtual-time loop."""
    loop = VirtualTimeLoop()
    try:
        return loop.run_until_complete(main)
    finally:
        loop.close()
