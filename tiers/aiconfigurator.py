"""Measured tier profiles from NVIDIA AIConfigurator's kernel tables (optional extra ``aiconfigurator``).

AIConfigurator (https://github.com/ai-dynamo/aiconfigurator, Apache-2.0; the wheel ships its LICENSE) predicts
an engine's forward pass as the sum of per-operation latencies looked up in tables measured on real systems
(GEMM, attention, all-reduce, ... per backend and version, ``aiconfigurator_core/systems/data/<system>``).
We ask it, offline, for the latency of one prefill (``static_ctx``: one request of n tokens) and of one decode
step (``static_gen``: B sequences of c tokens of context each, one token) on a grid of points, and store the
answers as a :class:`tiers.profiles.MeasuredProfile` whose ``source`` cites the AIConfigurator version, the
backend and its table version, the system and the share of the latency that came from measured ("silicon")
rows rather than AIConfigurator's formulas. The tier model then follows those points (ratio to the roofline,
interpolated: tiers/profiles.py).

We never copy AIConfigurator's data files: points are computed from the installed package at run time and
cached as profile YAML under ``$CONSERVE_CACHE_DIR`` (default ``~/.cache/conserve``)``/aiconfigurator/``,
keyed by the package version, backend, table version, system, model and TP size. AIConfigurator has no power
data for these systems (it reports 0% power coverage): the profiles say ``energy_measured: false`` and the
tier's power model stays ours (tiers/power.py).

Used by :class:`tiers.perf.TierModel` for every tier whose GPU, model and TP size AIConfigurator covers (see
:func:`supported`) when the package is installed and ``CONSERVE_AICONFIGURATOR`` is not ``off``.

The package's Python SDK is pinned (``aiconfigurator==0.12.*``): the calls below follow 0.12's
``cli_estimate`` static path (aiconfigurator/cli/api.py::_run_static_estimate). Must not import fastapi,
sqlalchemy, httpx or any ConServe package above tiers/.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tiers.errors import ProfileError
from tiers.profiles import DecodePoint, MeasuredProfile, PrefillPoint, load_profile, save_profile

# Our catalog names (tiers/catalog.py, tiers/models.py) -> AIConfigurator's system and bundled model names.
AIC_SYSTEMS: dict[str, str] = {
    "A100-80GB-SXM": "a100_sxm",
    "H100-SXM": "h100_sxm",
    "H200-SXM": "h200_sxm",
    "B200": "b200_sxm",
    "L40S": "l40s",
}
AIC_MODELS: dict[str, str] = {
    "Qwen3-0.6B": "Qwen/Qwen3-0.6B",
    "Llama-3.1-8B": "meta-llama/Meta-Llama-3.1-8B",
    "Llama-3.1-70B": "meta-llama/Meta-Llama-3.1-70B",
}
AIC_TP_SIZES = (1, 2, 4, 8)  # one 8-GPU node in every system above
DEFAULT_BACKEND = "vllm"  # the engine ConServe drives
# Bump when the grid or the way points are read changes: old cache files are then ignored.
GRID_VERSION = 4

# The grid. Prefill: one request of n new tokens. Decode: B sequences sharing a total of C KV tokens (C/B
# each); the profile's decode grid is bilinear in (log2 B, log2 C), so C runs over powers of two for every B.


def octave_steps(lo: int, hi: int, per_octave: int) -> tuple[int, ...]:
    """Integers 2^k x (1 + j / per_octave) in [lo, hi]. Latency steps with GEMM tile and wave quantisation
    (A100's vLLM table: +44% between 128 and 160 tokens; L40S: +33% between 2,048 and 2,304), so a grid of
    powers of two is too coarse."""
    n = per_octave
    vals = {((n + j) << k) // n for j in range(n) for k in range(0, 24) if ((n + j) << k) % n == 0}
    return tuple(sorted(v for v in vals if lo <= v <= hi))


PREFILL_TOKENS = octave_steps(16, 32768, 8)
PREFILL_CACHED_TOKENS = (0, 1024, 4096, 16384)  # prefix-cache hits: the agentic turn's case
DECODE_BATCHES = octave_steps(1, 512, 4)
DECODE_TOTAL_CONTEXT_TOKENS = tuple(2**k for k in range(8, 23))  # 256 .. 4,194,304
MIN_CONTEXT_PER_SEQUENCE = 16


def installed_version() -> str | None:
    """The installed AIConfigurator's version, or None when it is not installed."""
    from importlib import metadata

    try:
        return metadata.version("aiconfigurator")
    except metadata.PackageNotFoundError:
        return None


def enabled() -> bool:
    """Automatic use by TierModel: on unless CONSERVE_AICONFIGURATOR is off/0/false/no."""
    return os.environ.get("CONSERVE_AICONFIGURATOR", "on").strip().lower() not in ("off", "0", "false", "no")


def supported(gpu: str, model: str, tp: int) -> bool:
    """Whether AIConfigurator 0.12 covers this catalog GPU, model and TP size (package not checked)."""
    return gpu in AIC_SYSTEMS and model in AIC_MODELS and tp in AIC_TP_SIZES


@contextmanager
def _quiet() -> Iterator[None]:
    """AIConfigurator logs INFO/WARNING lines (fallback rows, deprecations) on import and per query."""
    logs = [logging.getLogger(n) for n in ("aiconfigurator", "aiconfigurator_core")]
    levels = [log.level for log in logs]
    for log in logs:
        log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for log, level in zip(logs, levels, strict=True):
            log.setLevel(level)


@dataclass(frozen=True, slots=True)
class Provenance:
    aic_version: str
    backend: str
    backend_version: str
    system: str
    model_path: str
    tp: int
    database_mode: str = "SILICON"


class AicSession:
    """One AIConfigurator inference session (system x backend x model x TP); queries take ~0.1 ms each."""

    def __init__(self, gpu: str, model: str, tp: int, backend: str = DEFAULT_BACKEND) -> None:
        if not supported(gpu, model, tp):
            raise ProfileError(
                f"aiconfigurator: no tables for gpu {gpu!r}, model {model!r}, tp {tp} (covered: GPUs "
                f"{', '.join(AIC_SYSTEMS)}; models {', '.join(AIC_MODELS)}; tp {AIC_TP_SIZES}). To fix: "
                "measure a profile with `orchestrator profile`."
            )
        version = installed_version()
        if version is None:
            raise ProfileError(
                "aiconfigurator is not installed. To fix: pip install 'conserve[aiconfigurator]'."
            )
        system, model_path = AIC_SYSTEMS[gpu], AIC_MODELS[model]
        with _quiet():
            from aiconfigurator.sdk.backends.factory import get_backend
            from aiconfigurator.sdk.config import RuntimeConfig
            from aiconfigurator.sdk.config_builders import build_model_config
            from aiconfigurator.sdk.inference_session import InferenceSession
            from aiconfigurator.sdk.models import get_model, resolve_context_fmha_by_data
            from aiconfigurator.sdk.perf_database import get_latest_database_version

            db_version = get_latest_database_version(system=system, backend=backend)
            if db_version is None:
                raise ProfileError(
                    f"aiconfigurator {version}: no {backend} tables for system {system}. To fix: use another "
                    "backend or measure a profile with `orchestrator profile`."
                )
            db = _database(system, backend, str(db_version))
            # the arguments of 0.12's _run_static_estimate for a dense model with default quantisation (bf16)
            cfg = build_model_config(tp, 1, 1, None, None)
            resolve_context_fmha_by_data(cfg, model_path, db, backend, is_context_role=True)
            model_ops = get_model(model_path, cfg, backend)
            self._session: Any = InferenceSession(model_ops, db, get_backend(backend))
        self._runtime = RuntimeConfig
        self.provenance = Provenance(str(version), backend, str(db_version), system, model_path, tp)

    def _run(self, mode: str, batch: int, isl: int, osl: int, prefix: int = 0) -> float:
        rc = self._runtime(batch_size=batch, isl=isl, osl=osl, prefix=prefix)
        with _quiet():
            return float(self._session.run_static_latency_only(rc, mode))

    def prefill_ms(self, new_tokens: int, cached_tokens: int = 0) -> float:
        """One prefill request of `new_tokens` over `cached_tokens` of prefix (static_ctx, batch 1)."""
        return self._run("static_ctx", 1, new_tokens + cached_tokens, 1, prefix=cached_tokens)

    def decode_step_ms(self, batch: int, context_per_sequence: int) -> float:
        """One decode step of `batch` sequences of `context_per_sequence` tokens each (static_gen, osl 2)."""
        return self._run("static_gen", batch, context_per_sequence, 2)

    def silicon_share(self) -> float:
        """Latency-weighted share of the ops answered from measured table rows (not formulas), over a prefill
        of 4,096 tokens and a decode step of 64 x 2,048 -- for the profile's citation."""
        measured = total = 0.0
        with _quiet():
            for mode, b, isl, osl in (("static_ctx", 1, 4096, 1), ("static_gen", 64, 2048, 2)):
                s = self._session.run_static(self._runtime(batch_size=b, isl=isl, osl=osl), mode)
                ctx = mode == "static_ctx"
                lat = s.get_context_latency_dict() if ctx else s.get_generation_latency_dict()
                src = s.get_context_source_dict() if ctx else s.get_generation_source_dict()
                for op, ms in lat.items():
                    total += ms
                    if src.get(op) == "silicon":
                        measured += ms
        return measured / total if total > 0 else 0.0


@functools.lru_cache(maxsize=16)
def _database(system: str, backend: str, version: str) -> Any:
    from aiconfigurator.sdk.perf_database import get_database_view

    db = get_database_view(
        system, backend, version, allow_missing_data=False, database_mode="SILICON", transfer_policy=None
    )
    if db is None:
        raise ProfileError(f"aiconfigurator: cannot load the {backend} {version} tables of {system}")
    return db


def decode_grid(max_context_tokens: int) -> list[tuple[int, int]]:
    """(batch, total context) points of the decode grid whose per-sequence context is in range."""
    out = []
    for b in DECODE_BATCHES:
        for c in DECODE_TOTAL_CONTEXT_TOKENS:
            if MIN_CONTEXT_PER_SEQUENCE <= c // b <= max_context_tokens:
                out.append((b, c))
    return out


def import_profile(gpu: str, model: str, tp: int, backend: str = DEFAULT_BACKEND) -> MeasuredProfile:
    """Query AIConfigurator on the grid and return the profile (no cache; a few seconds)."""
    from tiers.models import get_model

    max_ctx = get_model(model).max_context_tokens
    s = AicSession(gpu, model, tp, backend)
    p = s.provenance
    prefill = tuple(
        PrefillPoint(n, c, round(s.prefill_ms(n, c), 6))
        for c in PREFILL_CACHED_TOKENS
        for n in PREFILL_TOKENS
        if n + c + 1 <= max_ctx
    )
    decode = tuple(DecodePoint(b, c, round(s.decode_step_ms(b, c // b), 6)) for b, c in decode_grid(max_ctx))
    source = (
        f"AIConfigurator {p.aic_version} (Apache-2.0) static estimates from its measured kernel tables: "
        f"system {p.system}, backend {p.backend} {p.backend_version}, model {p.model_path}, tp {p.tp}, "
        f"database {p.database_mode} ({s.silicon_share():.0%} of the latency from measured rows, the rest "
        "from its formulas); prefill = static_ctx batch 1, decode step = static_gen osl 2; no host overhead; "
        "energy not measured (AIConfigurator has no power data for this system)"
    )
    return MeasuredProfile(
        gpu=gpu, model=model, tp=tp, power_cap_w=None, source=source, energy_measured=False,
        prefill=prefill, decode=decode,
    )  # fmt: skip


def cache_dir() -> Path:
    root = os.environ.get("CONSERVE_CACHE_DIR") or str(Path.home() / ".cache" / "conserve")
    return Path(root) / "aiconfigurator"


def _cache_path(version: str, gpu: str, model: str, tp: int, backend: str) -> Path:
    name = f"{gpu}-{model}-tp{tp}.yaml".replace("/", "_")
    return cache_dir() / f"{version}-grid{GRID_VERSION}" / backend / name


@functools.lru_cache(maxsize=256)
def cached_profile(gpu: str, model: str, tp: int, backend: str = DEFAULT_BACKEND) -> MeasuredProfile | None:
    """The AIConfigurator profile of this tier, or None when it is not covered, the package is not installed
    or ``CONSERVE_AICONFIGURATOR`` is off. Read from the disk cache when present, else imported and written
    there (atomically; a cache that cannot be written is only a slower next run)."""
    if not enabled() or not supported(gpu, model, tp):
        return None
    version = installed_version()
    if version is None:
        return None
    path = _cache_path(version, gpu, model, tp, backend)
    if path.exists():
        try:
            return load_profile(path)
        except ProfileError:
            pass  # a damaged cache file is re-imported below
    prof = import_profile(gpu, model, tp, backend)
    try:
        save_profile(prof, path)
    except OSError as err:
        logging.getLogger(__name__).warning("cannot cache the AIConfigurator profile at %s: %s", path, err)
    return prof


@functools.lru_cache(maxsize=256)
def lookup(gpu: str, model: str, tp: int, backend: str = DEFAULT_BACKEND) -> MeasuredProfile | None:
    """cached_profile, except that a failure inside the optional package is logged (once per tier) and gives
    None: the tier then keeps its fitted calibration, and planning does not break on an optional extra."""
    try:
        return cached_profile(gpu, model, tp, backend)
    except Exception as err:  # noqa: BLE001 - whatever the optional package raises
        logging.getLogger(__name__).warning(
            "AIConfigurator profile of %s %s tp%d unavailable (%s: %s); the tier uses its fitted calibration",
            gpu, model, tp, type(err).__name__, err,
        )  # fmt: skip
        return None
