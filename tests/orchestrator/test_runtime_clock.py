"""`serve` on an injected clock (build_runtime(clock=...)): the router, the simulated engines and the energy
accountant share it, and the scheduled jobs sleep on it (APScheduler runs on wall time), so a whole runtime
runs on a virtual-time event loop (tests/core/vloop.py): polls and energy ticks at their virtual periods, a
failing run logged and the next one on time."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from conserve.clock import LoopClock
from orchestrator.config import parse_fleet
from orchestrator.fleet import tier_model
from orchestrator.runtime import ServeSettings, SimInstance, build_runtime
from placement.base import Role

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "core"))  # tests/core/vloop.py, a plain module
from vloop import run_virtual  # noqa: E402


def test_scheduled_jobs_run_on_the_runtime_clock(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    db_url = f"sqlite:///{tmp_path / 'ledger.db'}"
    cfg = parse_fleet(
        {
            "model": "Qwen3-0.6B",
            "backend": "sim",
            "tiers": [{"name": "a40", "gpu": "A40", "count": 2, "roles": ["prefill", "decode"]}],
            "database_url": db_url,
        }
    )
    tm = tier_model(cfg, "a40")
    instances = [SimInstance("p0", "a40", Role.PREFILL, tm), SimInstance("d0", "a40", Role.DECODE, tm)]
    settings = ServeSettings(
        fleet=Path("inline"), db=db_url, poll_interval_s=0.25, energy_interval_s=1.0, ledger_writer="thread"
    )
    polls: list[float] = []
    ticks: list[float] = []

    async def main() -> float:
        loop = asyncio.get_running_loop()
        rt = build_runtime(settings, cfg, instances=instances, clock=LoopClock())
        assert rt.router.clock is rt.clock and all(e.clock is rt.clock for e in rt.engines.values())  # type: ignore[attr-defined]
        real_poll, real_tick = rt.router.poll, rt.accountant.tick

        async def poll() -> None:
            polls.append(loop.time())
            if len(polls) == 2:
                raise RuntimeError("a failing poll")
            await real_poll()

        async def tick() -> None:
            ticks.append(loop.time())
            await real_tick()

        rt.router.poll = poll  # type: ignore[method-assign]
        rt.accountant.tick = tick
        await rt.start()
        await asyncio.sleep(10.1)
        await rt.stop()
        return loop.time()

    end = run_virtual(main())
    assert end == pytest.approx(10.1)
    assert polls == pytest.approx([0.0] + [0.25 * k for k in range(1, 41)])  # start() polls once at 0
    assert ticks == pytest.approx([float(k) for k in range(1, 11)])
    assert "a failing poll" in caplog.text
