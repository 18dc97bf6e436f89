"""Issue 14 acceptance: `serve` of examples/fleet.yaml (sim engines) with 20 conversations of the fleet's own
workload, and the same conversations through the simulator (as `orchestrator simulate` runs them: the fleet's
links).

Properties on the served ledger: every prefiller that prefilled has conversation energy > 0; no idle row
exceeds its engine's idle draw over its interval; the rows conserve the metered (modelled) energy within
1e-9. Then serve and simulate agree on energy per conversation within 10% (both ledgers attribute with the
same tier-model phase weights; the numbers are printed so a failure says by how much).

The served side runs on virtual time (tests/core/vloop.py): the whole app -- HTTP routes, router, simulated
engines, scheduled jobs, energy accountant, ledger writer -- on a virtual-time event loop with
``conserve.clock.LoopClock`` (``build_runtime(clock=...)``), the clients' arrivals and tool gaps as virtual
sleeps, so the comparison is deterministic (on wall time it depended on the machine's load: total ratio 0.947
in one run, 0.909 under load)."""

from __future__ import annotations

import asyncio
import math
import sys
from pathlib import Path

import httpx
import pytest

from api.app import create_app
from conserve.clock import LoopClock
from energy.accounting import write_simulation
from energy.ledger import Ledger
from orchestrator.config import load_fleet
from orchestrator.runtime import ServeSettings, _sim_instances, build_runtime
from orchestrator.sim.core import run_simulation
from orchestrator.sim.fleet import links_of
from orchestrator.workload import ConversationSpec, workload_from_config
from placement.policies import make_policy

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "core"))  # tests/core/vloop.py, a plain module
from vloop import run_virtual  # noqa: E402

N_CONV = 20


def _joules_by_conversation(url: str) -> dict[str, float]:
    out: dict[str, float] = {}
    with Ledger(url) as lg:
        for _, a in lg.attributions():
            if a.conversation_id is not None:
                out[a.conversation_id] = out.get(a.conversation_id, 0.0) + a.joules
    return out


def _serve_virtually(settings: ServeSettings, cfg, insts, convs: list[ConversationSpec]) -> list[str]:  # type: ignore[no-untyped-def]
    """The conversations through the served app at their arrival times and tool gaps, in virtual time."""
    errors: list[str] = []

    async def main() -> None:
        rt = build_runtime(settings, cfg, instances=insts, clock=LoopClock())
        for eng in rt.engines.values():  # decode what the workload asks (not the sim engine's natural 120)
            eng.natural_output_tokens = 10**6  # type: ignore[attr-defined]
        app = create_app(settings, runtime=rt)
        async with app.router.lifespan_context(app):  # Runtime.start / stop, as `serve` runs them
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(
                transport=transport, base_url="http://serve", timeout=None
            ) as client:

                async def conversation(c: ConversationSpec) -> None:
                    await asyncio.sleep(c.arrival_s)
                    for turn, spec in enumerate(c.turns, start=1):
                        if turn > 1:
                            await asyncio.sleep(spec.tool_gap_s)
                        headers = {"X-Conversation-Id": c.conversation_id}
                        if turn == len(c.turns):
                            headers["X-Conversation-Final"] = "true"
                        body = {"model": rt.served_model_name, "prompt": [7] * c.input_tokens(turn),
                                "max_tokens": spec.output_tokens}  # fmt: skip
                        r = await client.post("/v1/completions", headers=headers, json=body)
                        if (
                            r.status_code != 200
                            or r.json()["usage"]["completion_tokens"] != spec.output_tokens
                        ):
                            errors.append(f"{c.conversation_id} turn {turn}: {r.status_code} {r.text[:200]}")
                            return

                await asyncio.gather(*(conversation(c) for c in convs))

    run_virtual(main())
    return errors


@pytest.fixture(scope="module")
def runs(repo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("acceptance")
    cfg = load_fleet(repo_root / "examples" / "fleet.yaml")
    convs = workload_from_config(cfg.workload)[:N_CONV]
    insts, _ = _sim_instances(cfg, None)

    # simulate
    sim_url = f"sqlite:///{tmp / 'sim.db'}"
    res = run_simulation(
        insts, convs, make_policy("conserve"), seed=0, energy_window_s=1.0, links=links_of(cfg)
    )
    with Ledger(sim_url) as lg:
        models = {i.tier_model.name: i.tier_model for i in insts}
        write_simulation(lg, res, "conserve", "sim", tier_models=models)

    # serve: the same conversations; the ledger writer in a thread whose commits nobody waits for (a worker
    # thread finishes at a wall-clock moment: virtual time would race it)
    url = f"sqlite:///{tmp / 'serve.db'}"
    settings = ServeSettings(
        fleet=repo_root / "examples" / "fleet.yaml", db=url, poll_interval_s=0.5,
        ledger_flush_interval_s=0.05, energy_interval_s=0.5, energy_lag_s=1.0, ledger_writer="thread",
        ledger_durable=False,
    )  # fmt: skip
    errors = _serve_virtually(settings, cfg, insts, convs)
    assert not errors, errors
    return {"sim_url": sim_url, "url": url, "insts": insts, "res": res}


def test_served_ledger_prefillers_idle_rows_and_conservation(runs: dict) -> None:
    idle_w = {i.instance_id: i.tier_model.idle_w for i in runs["insts"]}
    with Ledger(runs["url"]) as probe:
        (run,) = [r.run_id for r in probe.runs()]
    with Ledger(runs["url"], run_id=run) as lg:
        rows = [a for _, a in lg.attributions()]
        samples = lg.samples()
        turns = lg.turns_overlapping(min(a.interval_start for a in rows), max(a.interval_end for a in rows))
    prefilled_on = {t.prefill_instance_id for t in turns if t.remote_prefill}
    assert prefilled_on, "no remote prefill happened"
    for p in prefilled_on:
        conv_j = math.fsum(a.joules for a in rows if a.engine_id == p and not a.is_idle)
        assert conv_j > 0, f"prefiller {p} prefilled but its conversation energy is {conv_j} J"
    over = []
    for a in rows:
        if a.is_idle:
            draw = idle_w[a.engine_id] * (a.interval_end - a.interval_start).total_seconds()
            if a.joules > draw * (1 + 1e-9) + 1e-9:
                over.append((a.engine_id, a.interval_start, a.joules, draw))
    assert not over, f"{len(over)} idle rows above the idle draw, e.g. {over[:3]}"
    for inst in runs["insts"]:
        series = [s.cumulative_j for s in samples if s.engine_id == inst.instance_id and s.gpu_index == 0]
        gpus = len({s.gpu_index for s in samples if s.engine_id == inst.instance_id})
        metered = (series[-1] - series[0]) * gpus
        attributed = math.fsum(a.joules for a in rows if a.engine_id == inst.instance_id)
        assert abs(attributed - metered) <= 1e-9 * metered, (inst.instance_id, attributed, metered)


def _ratios(runs: dict) -> tuple[dict[str, float], float]:
    served = _joules_by_conversation(runs["url"])
    simulated = _joules_by_conversation(runs["sim_url"])
    assert set(served) == set(simulated) and len(served) == N_CONV
    ratios = {c: served[c] / simulated[c] for c in served}
    print("serve/simulate energy per conversation:", {c: round(r, 3) for c, r in sorted(ratios.items())})
    total = math.fsum(served.values()) / math.fsum(simulated.values())
    print("total serve/simulate:", round(total, 4))
    return ratios, total


def _placements(url: str) -> dict[tuple[str, int], tuple[str, str | None]]:
    with Ledger(url) as probe:
        (run,) = [r.run_id for r in probe.runs()]
    with Ledger(url, run_id=run) as lg:
        rows = [a for _, a in lg.attributions()]
        turns = lg.turns_overlapping(min(a.interval_start for a in rows), max(a.interval_end for a in rows))
    return {(t.conversation_id, t.turn): (t.instance_id, t.prefill_instance_id) for t in turns}


def test_serve_places_every_turn_where_the_simulator_did(runs: dict) -> None:
    """One engine model (tiers/steps.py) and virtual time: the live policy sees what the simulated one saw, so
    every turn has the same decoder and prefiller (before: 9 of 20 conversations' turn 1 did)."""
    served, simulated = _placements(runs["url"]), _placements(runs["sim_url"])
    assert len(simulated) == len(runs["res"].turns)
    assert served == simulated


def test_serve_and_simulate_agree_on_the_conversations_energy_in_total(runs: dict) -> None:
    ratios, total = _ratios(runs)
    # measured 0.99997: both charge each engine its steps at the tier model's step power and the idle draw
    # between them (the simulator's decode stretch at its mean context, the engine per step)
    assert abs(total - 1) <= 0.01
    assert abs(sorted(ratios.values())[N_CONV // 2] - 1) <= 0.10  # the median conversation too


def test_serve_and_simulate_agree_on_energy_per_conversation(runs: dict) -> None:
    """Measured 0.937-1.040 (dev box, 2026-12-07; deterministic). What still differs is the split, not the
    energy: serve spreads a turn's prefill over [arrival, first token) and its decode evenly over [first, last
    token] of each 0.5 s interval, the simulator books each step's tokens where the step ran (1 s windows)."""
    ratios, _ = _ratios(runs)
    bad = {c: round(r, 3) for c, r in ratios.items() if abs(r - 1) > 0.10}
    assert not bad, f"{len(bad)} of {N_CONV} conversations differ by more than 10%: {bad}"
