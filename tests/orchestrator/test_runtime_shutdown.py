"""`serve` stopping while a scheduled job runs: the run finishes, and nothing is logged as an error
(APScheduler logs a cancelled run as "Error running job" with a traceback, seen on a stop mid-tick)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from orchestrator.config import parse_fleet
from orchestrator.fleet import tier_model
from orchestrator.runtime import ServeSettings, SimInstance, build_runtime
from placement.base import Role


async def test_stop_waits_for_a_running_job_and_logs_no_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
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
    settings = ServeSettings(fleet=Path("inline"), db=db_url, poll_interval_s=0.1, energy_interval_s=0.1)
    rt = build_runtime(settings, cfg, instances=instances)
    calls: list[str] = []
    real_poll = rt.router.poll

    async def slow_poll() -> None:
        calls.append("start")
        await asyncio.sleep(0.5)
        await real_poll()
        calls.append("end")

    rt.router.poll = slow_poll  # type: ignore[method-assign]
    caplog.set_level(logging.DEBUG)
    await rt.start()  # polls once itself, then schedules the job
    for _ in range(100):  # until a scheduled run is in progress
        if calls.count("start") >= 2:
            break
        await asyncio.sleep(0.02)
    assert calls.count("start") >= 2
    await rt.stop()
    assert calls[-1] == "end" and calls.count("start") == calls.count("end")
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]
