"""The simulator's injected clock: the project's virtual clock (conserve/clock.py), advanced only by the
simulator's event loop.

Policies never read a clock; the simulator's event loop owns one VirtualClock per run (no module state), so
two simulations in one process never share time.
"""

from __future__ import annotations

from conserve.clock import Clock, VirtualClock

__all__ = ["Clock", "VirtualClock"]
