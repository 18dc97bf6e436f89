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
from typing import Any

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
    admission_wait_s: float | None = typer.Option(
        None,
        "--admission-wait",
        min=0,
        help="seconds a turn that no decoder can hold waits for room before a 503 with Retry-After "
        "(0: off); default: the fleet's admission_wait_s, else 30",
    ),
    ledger_writer: str = typer.Option(
        "process",
        "--ledger-writer",
        help="where ledger SQL runs: 'process' (a child process, off the serving GIL) or 'thread'",
    ),
    shared_state: str = typer.Option(
        "auto",
        "--shared-state",
        help="who numbers turns and pins conversations: database (replicas on one PostgreSQL ledger agree), "
        "memory (one replica), auto (database on PostgreSQL)",
    ),
    auth: str = typer.Option(
        "auto",
        "--auth",
        help="require API keys (`orchestrator keys create`): auto (when --host is not a loopback address), "
        "on, or off (local development: anyone who reaches the port may use every endpoint)",
    ),
    log_level: str = typer.Option("info", "--log-level", help="uvicorn log level"),
    json_out: bool = typer.Option(False, "--json", help="print the fleet as JSON before serving"),
    power_controller: bool = typer.Option(
        False,
        "--power-controller",
        help="move each pool's GPU power caps online within its tier's power_caps_w (NVML; without it the "
        "caps are reported not applied and serving goes on)",
    ),
) -> None:
    """Serve the OpenAI-compatible API with conversation-level placement."""
    import uvicorn

    from api.app import create_app
    from api.server import http_protocol
    from api.settings import ApiSettings
    from orchestrator.runtime import ServeSettings, build_runtime

    if ledger_writer not in ("process", "thread"):
        raise ConfigError(f"--ledger-writer {ledger_writer!r}: use 'process' or 'thread'")
    if shared_state not in ("auto", "memory", "database"):
        raise ConfigError(f"--shared-state {shared_state!r}: use 'auto', 'memory' or 'database'")
    if auth not in ("auto", "on", "off"):
        raise ConfigError(f"--auth {auth!r}: use 'auto', 'on' or 'off'")
    api_settings = ApiSettings(auth=auth)  # type: ignore[arg-type]  # checked above
    settings = ServeSettings(
        fleet=fleet,
        plan=plan,
        host=host,
        port=port,
        db=db,
        policy=policy,
        sim_speedup=sim_speedup,
        served_model_name=served_model_name,
        admission_wait_s=admission_wait_s,
        ledger_writer=ledger_writer,  # type: ignore[arg-type]  # validated by ServeSettings
        power_controller=power_controller,
        shared_state=shared_state,  # type: ignore[arg-type]  # checked above
    )
    rt = build_runtime(settings)
    app = create_app(settings, runtime=rt, api_settings=api_settings)
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
    _print_auth(api_settings, host, json_out)
    # Move everything built so far (modules, the app, schemas, SQLAlchemy metadata) out of the cyclic
    # GC's generations: full collections then scan only objects created while serving. Without it a gen-2
    # collection over the startup heap paused the event loop for ~100 ms now and then under load
    # (benchmarks/bench_router.py TTFT max).
    gc.collect()
    gc.freeze()
    # Background threads (ledger writer, energy accounting, executor jobs) hold the GIL for up to the
    # switch interval (5 ms by default) while the event loop waits for it. 0.2 ms cut the router's TTFT p99
    # at 1 connection from 3.4-4.7 ms to 1.8-3.1 ms (benchmarks/bench_router.py setup, 2-core dev box).
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level=log_level,
        loop="uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
        # api/server.py: httptools with header deadline/size and connection caps (httptools is a dependency
        # of uvicorn[standard])
        http=http_protocol(api_settings),
    )


def _print_auth(api_settings: Any, host: str, json_out: bool) -> None:
    """Say at start whether API keys are required (stderr with --json: stdout is the fleet)."""
    from api.settings import is_loopback
    from orchestrator.cli.common import err_console

    out = err_console if json_out else console
    if api_settings.auth_required(host):
        out.print(
            "auth on: every request needs 'Authorization: Bearer <key>' (orchestrator keys create --tenant "
            "NAME); /metrics and /v1/fleet need an admin key or CONSERVE_SCRAPE_TOKEN",
            highlight=False,
        )
    elif is_loopback(host):
        out.print(
            f"[yellow]auth off[/] (--auth {api_settings.auth}, loopback address {host}): no API keys, one "
            "tenant; for local development only",
            highlight=False,
        )
    else:
        out.print(
            f"[bold red]auth off on {host}[/]: anyone who can reach this port can serve, read every "
            "conversation and report; drop --auth off to require API keys",
            highlight=False,
        )


# ServeSettings without a flag, settable as environment variables (tests/cli/test_serve_cli.py keeps this
# list in step with ServeSettings).
ENV_SETTINGS_EPILOG = (
    "Environment settings (CONSERVE_<NAME>, defaults in brackets): "
    "CONSERVE_POLL_INTERVAL_S [1.0] engine health/metrics poll period; "
    "CONSERVE_PIN_TTL_S [900] release the pin of a conversation idle this long; "
    "CONSERVE_RUN_ID [new per start] ledger run the turns are recorded in (replicas sharing a ledger: set "
    "the same id); "
    "CONSERVE_LEDGER_DURABLE [true] hold an answer's last byte until its turn is committed to the ledger; "
    "CONSERVE_LEDGER_SPOOL_FILE [beside the SQLite file, else ~/.cache/conserve] records the ledger writer "
    "had to give up, replayed into the ledger at the next start; "
    "CONSERVE_LEDGER_BATCH_MAX [500] records per ledger transaction at most; "
    "CONSERVE_LEDGER_FLUSH_INTERVAL_S [0.25] write records nobody waits for this often; "
    "CONSERVE_ENERGY_INTERVAL_S [1.0] energy accounting period, 0 turns it off; "
    "CONSERVE_ENERGY_LAG_S [10] attribute an energy interval this long after it ends; "
    "CONSERVE_POWER_STATE_FILE [~/.cache/conserve/power-caps.json] GPU power limits serve changed, "
    "restored at stop or by `orchestrator power restore` after a crash; "
    "CONSERVE_POWER_CONTROLLER_INTERVAL_S [5] period of the power controller (--power-controller); "
    "CONSERVE_POWER_BUDGET_W [none] the controller's fleet cap budget, W (sum of GPUs x cap); "
    "CONSERVE_POWER_PARK_W [none] the controller parks decoders in troughs (simulated engines), a parked GPU "
    "drawing this, W; CONSERVE_POWER_WAKE_S [60] cold start of a parked engine, s; "
    "CONSERVE_KV_GAP_INTERVAL_S [0] apply the KV-gap rule to idle pinned conversations this often, 0 turns "
    "it off. "
    "HTTP edge (api/settings.py): "
    "CONSERVE_SCRAPE_TOKEN [none] bearer token that may read /metrics only; "
    "CONSERVE_AUTH_CACHE_TTL_S [5] a checked key is trusted this long (a revoked key works at most this "
    "long after `keys revoke`); "
    "CONSERVE_MAX_BODY_BYTES [8388608] larger request bodies get 413; "
    "CONSERVE_HEADER_TIMEOUT_S [10] connections whose request headers take longer are closed; "
    "CONSERVE_BODY_TIMEOUT_S [30] a request body that takes longer gets 408; "
    "CONSERVE_MAX_CONNECTIONS [4096] more open connections get 503 with Retry-After; "
    "CONSERVE_MAX_CONCURRENT_REQUESTS [2048] more completion requests in flight get 503 with Retry-After; "
    "CONSERVE_TENANT_MAX_CONCURRENT_REQUESTS [0] per tenant, more get 429 (0: no limit); "
    "CONSERVE_TENANT_REQUESTS_PER_S [0] per tenant request rate, 429 above (0: no limit); "
    "CONSERVE_TENANT_BURST [20] requests a tenant may send at once above its rate; "
    "CONSERVE_TENANT_TOKENS_PER_MIN [0] per tenant prompt + max_tokens per minute, 429 above (0: no limit); "
    "CONSERVE_RETRY_AFTER_S [1] Retry-After of 503 answers."
)


def register(app: typer.Typer) -> None:
    app.command("serve", epilog=ENV_SETTINGS_EPILOG)(serve)
