"""`orchestrator serve`: the OpenAI-compatible router in front of a fleet (simulated engines or vLLM).

    orchestrator serve --fleet examples/fleet.yaml [--plan plan.yaml] [--host 127.0.0.1] [--port 8000]
                       [--db URL] [--policy NAME] [--sim-speedup X] [--served-model-name NAME]

Builds the runtime (orchestrator/runtime.py) before binding, so a bad fleet, plan, policy or database fails
with one line and exit code 1; then runs uvicorn (uvloop and httptools when installed).
"""

from __future__ import annotations

import gc
import importlib.util
import sys
from pathlib import Path

import typer

from orchestrator.cli.common import console, handle_errors, print_json
from orchestrator.errors import ConfigError

SWITCH_INTERVAL_S = 0.0002  # GIL switch interval while serving (measured; see serve())


@handle_errors
def serve(
    fleet: Path = typer.Option(Path("examples/fleet.yaml"), "--fleet", help="fleet.yaml to serve"),
    plan: Path | None = typer.Option(
        None, "--plan", help="plan.yaml (orchestrator plan): sim instances, or vllm engines' power caps"
    ),
    host: str = typer.Option("127.0.0.1", "--host", help="address to bind"),
    port: int = typer.Option(8000, "--port", min=0, max=65535, help="port to bind"),
    db: str | None = typer.Option(None, "--db", help="ledger URL (default: the fleet's database_url)"),
    policy: str | None = typer.Option(None, "--policy", help="placement policy (default: the fleet's)"),
    sim_speedup: float = typer.Option(
        1.0, "--sim-speedup", min=1e-3, help="run simulated engines X times faster"
    ),
    served_model_name: str | None = typer.Option(None, "--served-model-name", help="model id clients send"),
    ledger_writer: str = typer.Option(
        "process",
        "--ledger-writer",
        help="where ledger SQL runs: 'process' (a child process, off the serving GIL) or 'thread'",
    ),
    log_level: str = typer.Option("info", "--log-level", help="uvicorn log level"),
    json_out: bool = typer.Option(False, "--json", help="print the fleet as JSON before serving"),
) -> None:
    """Serve the OpenAI-compatible API with conversation-level placement."""
    import uvicorn

    from api.app import create_app
    from orchestrator.runtime import ServeSettings, build_runtime

    if ledger_writer not in ("process", "thread"):
        raise ConfigError(f"--ledger-writer {ledger_writer!r}: use 'process' or 'thread'")
    settings = ServeSettings(
        fleet=fleet,
        plan=plan,
        host=host,
        port=port,
        db=db,
        policy=policy,
        sim_speedup=sim_speedup,
        served_model_name=served_model_name,
        ledger_writer=ledger_writer,  # type: ignore[arg-type]  # validated by ServeSettings
    )
    rt = build_runtime(settings)
    app = create_app(settings, runtime=rt)
    status = rt.router.instance_status()
    if json_out:
        print_json(
            {
                "url": f"http://{host}:{port}",
                "backend": rt.backend,
                "policy": rt.policy_name,
                "model": rt.served_model_name,
                "fleet_source": rt.fleet_source,
                "instances": [{k: s[k] for k in ("instance_id", "role", "tier")} for s in status],
            }
        )
    else:
        from rich.table import Table

        table = Table(title=f"ConServe {rt.backend} fleet ({rt.fleet_source}), policy {rt.policy_name}")
        for col in ("instance", "role", "tier", "KV capacity (tokens)"):
            table.add_column(col)
        for s in status:
            table.add_row(s["instance_id"], s["role"], s["tier"], f"{s['kv_capacity_tokens']:,}")
        console.print(table)
        sim_note = " (simulated engines: text is synthetic)" if rt.backend == "sim" else ""
        console.print(
            f"serving model [bold]{rt.served_model_name}[/] on http://{host}:{port}/v1{sim_note}; "
            f"ledger {settings.db or rt.cfg.database_url}"
        )
    # Move everything built so far (modules, the app, schemas, SQLAlchemy metadata) out of the cyclic
    # GC's generations: full collections then scan only objects created while serving. Without it a gen-2
    # collection over the startup heap paused the event loop for ~100 ms now and then under load
    # (benchmarks/bench_router.py TTFT max).
    gc.collect()
    gc.freeze()
    # Background threads (ledger shipper, energy accounting, executor jobs) hold the GIL for up to the
    # switch interval (5 ms by default) while the event loop waits for it. 0.2 ms cut the router's TTFT p99
    # at 1 connection from 3.4-4.7 ms to 1.8-3.1 ms (benchmarks/bench_router.py setup, 2-core dev box).
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level=log_level,
        loop="uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
        http="httptools" if importlib.util.find_spec("httptools") else "h11",
    )


# ServeSettings without a flag, settable as environment variables (tests/cli/test_serve_cli.py keeps this
# list in step with ServeSettings).
ENV_SETTINGS_EPILOG = (
    "Environment settings (CONSERVE_<NAME>, defaults in brackets): "
    "CONSERVE_POLL_INTERVAL_S [1.0] engine health/metrics poll period; "
    "CONSERVE_PIN_TTL_S [900] release the pin of a conversation idle this long; "
    "CONSERVE_RUN_ID [new per start] ledger run the turns are recorded in (replicas sharing a ledger: set "
    "the same id); "
    "CONSERVE_LEDGER_PROCESS_PRIORITY [idle] ledger writer CPU priority, 'idle' (SCHED_IDLE; nice 10 if it "
    "falls behind) or 'nice'; "
    "CONSERVE_LEDGER_BATCH_MAX [500] records per ledger transaction at most; "
    "CONSERVE_LEDGER_FLUSH_INTERVAL_S [0.25] ship ledger records this often; "
    "CONSERVE_ENERGY_INTERVAL_S [1.0] energy accounting period, 0 turns it off; "
    "CONSERVE_ENERGY_LAG_S [10] attribute an energy interval this long after it ends; "
    "CONSERVE_POWER_STATE_FILE [~/.cache/conserve/power-caps.json] GPU power limits serve changed, "
    "restored at stop or by `orchestrator power restore` after a crash."
)


def register(app: typer.Typer) -> None:
    app.command("serve", epilog=ENV_SETTINGS_EPILOG)(serve)
