"""`orchestrator power show|apply|restore`: GPU power caps by hand (what `serve` and `engines up` do too).

    orchestrator power show    [--fleet F] [--plan P] [--state FILE] [--json]
    orchestrator power apply   --fleet F [--plan P] [--engine ID ...] [--clamp] [--state FILE] [--json]
    orchestrator power restore [--state FILE] [--force] [--json]

`show` lists the GPUs NVML sees (limit, default, allowed range), the limits ConServe changed (state file), and
with --fleet the cap each engine gets and where it comes from. `apply` sets the caps and keeps them until
`restore` (exit 1 when a cap could not be applied: no NVML, no permission, out of range). `restore` puts every
GPU in the state file back to the limit it had before ConServe changed it (also after a crash).
Rules and NVML details: orchestrator/power.py, energy/power.py, docs/energy.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from orchestrator.cli.common import console, fail, handle_errors, print_json

_STATE_HELP = "power-cap state file (default ~/.cache/conserve/power-caps.json)"


def _state(path: Path | None) -> Path:
    from energy.power import DEFAULT_STATE_FILE

    return path or DEFAULT_STATE_FILE


def _caps(fleet: Path, plan: Path | None) -> list[Any]:
    from orchestrator.config import load_fleet
    from orchestrator.fleet import load_plan
    from orchestrator.power import engine_caps

    return engine_caps(load_fleet(fleet), load_plan(plan) if plan is not None else None)


def _results_table(title: str, results: list[Any]) -> None:
    from rich.table import Table

    t = Table(title=title)
    for c in ("engine", "GPU", "uuid", "status", "requested W", "read back W", "before W", "note"):
        t.add_column(c)
    for r in results:
        t.add_row(
            r.engine_id, "" if r.gpu_index is None else str(r.gpu_index), r.gpu_uuid or "", str(r.status),
            _w(r.requested_w), _w(r.applied_w), _w(r.previous_w), r.message,
        )  # fmt: skip
    console.print(t)


def _w(v: float | None) -> str:
    return "" if v is None else f"{v:g}"


def show(
    fleet: Path | None = typer.Option(None, "--fleet", help="fleet.yaml: show the cap of each engine"),
    plan: Path | None = typer.Option(None, "--plan", help="plan.yaml whose pools give caps"),
    state: Path | None = typer.Option(None, "--state", help=_STATE_HELP),
    json_out: bool = typer.Option(False, "--json", help="print JSON for scripts"),
) -> None:
    """Show the GPUs' power limits, the limits ConServe changed, and the caps a fleet asks for."""
    from dataclasses import asdict

    from energy.errors import EnergyError
    from energy.power import NvmlPower, state_summary

    gpus: list[dict[str, Any]] = []
    message = ""
    try:
        with NvmlPower() as dev:
            gpus = [asdict(g) for g in dev.gpus()]
    except EnergyError as err:
        message = str(err)
    state_path = _state(state)
    layers = state_summary(state_path)
    engines = [asdict(c) | {"local": c.local} for c in _caps(fleet, plan)] if fleet is not None else []
    limits = {g["nvml_index"]: g["limit_w"] for g in gpus}
    for e in engines:
        e["limits_now_w"] = [limits.get(i) for i in e["gpus"]] if gpus and e["local"] else None
    if json_out:
        print_json({"nvml": {"available": not message, "message": message, "gpus": gpus},
                    "state_file": str(state_path), "changed": layers, "engines": engines})  # fmt: skip
        return
    from rich.table import Table

    if message:
        console.print(f"NVML: {message}")
    else:
        t = Table(title="GPUs (NVML index = nvidia-smi order, not CUDA_VISIBLE_DEVICES positions)")
        for c in ("index", "uuid", "PCI bus", "name", "limit W", "default W", "allowed W"):
            t.add_column(c)
        for g in gpus:
            t.add_row(str(g["nvml_index"]), g["uuid"], g["pci_bus_id"], g["name"], f"{g['limit_w']:g}",
                      f"{g['default_w']:g}", f"{g['min_w']:g}-{g['max_w']:g}")  # fmt: skip
        console.print(t)
    if layers:
        t = Table(title=f"limits changed by ConServe ({state_path}; undone by `orchestrator power restore`)")
        for c in ("GPU", "uuid", "original W", "holder", "pid", "alive", "engine", "before W", "cap W"):
            t.add_column(c)
        for g in layers:
            for la in g["layers"]:
                t.add_row(str(g["nvml_index"]), g["gpu_uuid"], f"{g['original_w']:g}", la["holder"],
                          str(la["pid"] or ""), str(la["alive"]), la["engine_id"], f"{la['before_w']:g}",
                          f"{la['target_w']:g}")  # fmt: skip
        console.print(t)
    else:
        console.print(f"no limits changed by ConServe (no state in {state_path})")
    if fleet is not None and not engines:
        console.print(f"{fleet} lists no engines (simulated backend): its caps are modelled, not applied")
    if engines:
        t = Table(title=f"caps asked by {fleet}" + (f" and {plan}" if plan else ""))
        for c in ("engine", "tier", "role", "GPUs", "cap W", "from", "limit now W"):
            t.add_column(c)
        for e in engines:
            now = e["limits_now_w"]
            now_text = ",".join(_w(v) for v in now) if now else ("remote" if not e["local"] else "?")
            t.add_row(e["engine_id"], e["tier"], e["role"], ",".join(map(str, e["gpus"])) or "-",
                      _w(e["cap_w"]) or "none", e["source"] or "-", now_text)  # fmt: skip
        console.print(t)


def apply(
    fleet: Path = typer.Option(..., "--fleet", help="fleet.yaml whose engines' caps to apply"),
    plan: Path | None = typer.Option(None, "--plan", help="plan.yaml whose pools give caps"),
    engine: list[str] = typer.Option([], "--engine", help="only these engine ids (repeatable)"),
    clamp: bool = typer.Option(False, "--clamp", help="set a cap outside NVML's range to the nearest limit"),
    state: Path | None = typer.Option(None, "--state", help=_STATE_HELP),
    json_out: bool = typer.Option(False, "--json", help="print JSON for scripts"),
) -> None:
    """Apply the fleet's power caps until `orchestrator power restore` (exit 1 if any was not applied)."""
    from conserve.errors import did_you_mean
    from energy.power import Holder, apply_caps
    from orchestrator.errors import ConfigError
    from orchestrator.power import cap_requests

    caps = _caps(fleet, plan)
    ids = [c.engine_id for c in caps]
    for e in engine:
        if e not in ids:
            raise ConfigError(f"--engine {e!r} is not an engine of {fleet}.{did_you_mean(e, ids)}")
    requests, remote = cap_requests(caps, only=engine)
    if not requests and not remote:
        msg = f"no engine of {fleet} asks for a power cap (engines[].power_cap_w, a --plan, or one tier cap)"
        print_json({"results": [], "note": msg}) if json_out else console.print(msg)
        return
    results = remote + apply_caps(requests, Holder("manual", label="orchestrator power apply"),
                                  state_path=_state(state), clamp=clamp)  # fmt: skip
    if json_out:
        print_json({"results": [r.to_dict() for r in results], "state_file": str(_state(state))})
    else:
        _results_table("power caps (kept until `orchestrator power restore`)", results)
    bad = [r for r in results if not r.status.in_force]
    if bad:
        b = bad[0]
        fail(f"{len(bad)} of {len(results)} caps not applied; {b.engine_id}: {b.status}: {b.message}")


def restore(
    state: Path | None = typer.Option(None, "--state", help=_STATE_HELP),
    force: bool = typer.Option(False, "--force", help="also while a live `serve` holds caps"),
    json_out: bool = typer.Option(False, "--json", help="print JSON for scripts"),
) -> None:
    """Put every GPU ConServe capped back to the limit it had before (also after a crash)."""
    from energy.power import restore_caps

    results = restore_caps(state_path=_state(state), force=force)
    if json_out:
        print_json({"results": [r.to_dict() for r in results]})
    elif not results:
        console.print(f"nothing to restore (no state in {_state(state)})")
    else:
        _results_table("restored power limits", results)
    failed = [r for r in results if r.status.value == "failed"]
    if failed:
        fail(failed[0].message)


def register(app: typer.Typer) -> None:
    power_app = typer.Typer(help="GPU power caps through NVML: show, apply, restore.", no_args_is_help=True)
    power_app.command("show")(handle_errors(show))
    power_app.command("apply")(handle_errors(apply))
    power_app.command("restore")(handle_errors(restore))
    app.add_typer(power_app, name="power")
