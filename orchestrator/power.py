"""Power caps of a fleet's engines: which cap each engine gets, and applying them around a serving session.

An engine's cap (watts per GPU), the first of:
  1. fleet.yaml ``engines[].power_cap_w``;
  2. the plan (``--plan``): the engines of a tier and role take the caps of the plan's pools of that tier and
     role, in order (pool k's ``instances`` engines get its ``power_cap_w``);
  3. the tier's ``power_caps_w`` when it lists exactly one cap.
A cap at or above the GPU's TDP is no cap. The GPUs are the engine's ``gpu_indices`` (NVML indices, as
``nvidia-smi`` numbers them). Engines on another host are reported ``remote``: caps are set where the GPUs are
(``orchestrator power apply --fleet F --engine ID`` on that host).

:class:`SessionPowerCaps` is what ``orchestrator serve`` runs: apply at start (after restoring what a crashed
session left), record every result in the ledger, answer ``/v1/fleet``, restore at stop. Simulated engines
get a ``simulated`` result: their cap is modelled by the tier model and no GPU is touched.
The NVML work is energy/power.py's. Must not import fastapi.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from energy.power import (
    DEFAULT_STATE_FILE,
    CapRequest,
    CapResult,
    CapStatus,
    Holder,
    apply_caps,
    restore_caps,
)
from orchestrator.config import FleetConfig
from orchestrator.errors import ConfigError
from orchestrator.fleet import Plan, find_tier

log = logging.getLogger("conserve.power")


@dataclass(frozen=True, slots=True)
class EngineCap:
    """The cap one engine of the fleet should run at (None: none asked) and where it came from."""

    engine_id: str
    tier: str
    role: str
    cap_w: float | None
    source: str  # e.g. "engines[2].power_cap_w", "plan pools[1]", "tiers.a40.power_caps_w"
    gpus: tuple[int, ...] = ()
    host: str = "127.0.0.1"

    @property
    def local(self) -> bool:
        return _is_local(self.host)


def _is_local(host: str) -> bool:
    return host in ("127.0.0.1", "localhost", "::1", "0.0.0.0", socket.gethostname(), socket.getfqdn())


def engine_caps(cfg: FleetConfig, plan: Plan | None = None) -> list[EngineCap]:
    """Every engine of ``cfg.engines`` with its cap (rules in the module docstring); ConfigError naming the
    field for a cap outside the GPU's range."""
    plan_caps: dict[tuple[str, str], list[tuple[float, str]]] = {}
    if plan is not None:
        for k, pool in enumerate(plan.pools):
            plan_caps.setdefault((pool.tier, pool.role), []).extend(
                [(pool.power_cap_w, f"plan pools[{k}]")] * pool.instances
            )
    taken: dict[tuple[str, str], int] = {}
    out = []
    for i, e in enumerate(cfg.engines):
        gpu = find_tier(cfg, e.tier).gpu_spec()
        tier = find_tier(cfg, e.tier)
        cap, source = None, ""
        if e.power_cap_w is not None:
            cap, source = e.power_cap_w, f"engines[{i}].power_cap_w"
            if not gpu.power_cap_min_w <= cap <= gpu.power_cap_max_w:
                raise ConfigError(
                    f"engines.{i}.power_cap_w: {cap:g} W is outside {gpu.name}'s range "
                    f"{gpu.power_cap_min_w:g}-{gpu.power_cap_max_w:g} W. To fix: choose a cap in that range."
                )
        elif (pool_caps := plan_caps.get((e.tier, e.role))) and taken.get((e.tier, e.role), 0) < len(
            pool_caps
        ):
            n = taken[(e.tier, e.role)] = taken.get((e.tier, e.role), 0) + 1
            cap, source = pool_caps[n - 1]
        elif tier.power_caps_w is not None and len(tier.power_caps_w) == 1:
            cap, source = tier.power_caps_w[0], f"tiers.{e.tier}.power_caps_w"
        if cap is not None and cap >= gpu.tdp_w:
            cap, source = None, f"{source} (at or above TDP {gpu.tdp_w:g} W: no cap)"
        host = urlsplit(e.url).hostname or "127.0.0.1"
        out.append(EngineCap(e.id, e.tier, e.role, cap, source, tuple(e.gpu_indices), host))
    _check_shared_gpus(out)
    return out


def _check_shared_gpus(caps: Sequence[EngineCap]) -> None:
    seen: dict[tuple[str, int], EngineCap] = {}
    for c in caps:
        if c.cap_w is None:
            continue
        for g in c.gpus:
            other = seen.setdefault((c.host, g), c)
            if other.cap_w != c.cap_w:
                raise ConfigError(
                    f"engines {other.engine_id!r} and {c.engine_id!r} share GPU {g} but ask for caps "
                    f"{other.cap_w:g} W and {c.cap_w:g} W. To fix: give them the same power_cap_w."
                )


def cap_requests(
    caps: Iterable[EngineCap], only: Sequence[str] = ()
) -> tuple[list[CapRequest], list[CapResult]]:
    """The NVML requests for the capped local engines (of ``only``, when given), and a ``remote`` result for
    each capped engine on another host."""
    requests, remote = [], []
    for c in caps:
        if c.cap_w is None or (only and c.engine_id not in only):
            continue
        if not c.local:
            msg = (f"engine {c.engine_id!r} runs on {c.host}: run `orchestrator power apply --fleet FILE "
                   f"--engine {c.engine_id}` there")  # fmt: skip
            remote.append(CapResult(c.engine_id, CapStatus.REMOTE, msg, c.cap_w, tier=c.tier))
            continue
        requests.append(CapRequest(c.engine_id, c.cap_w, c.gpus, c.tier))
    return requests, remote


def simulated_caps(instances: Iterable[Any]) -> list[CapResult]:
    """A ``simulated`` result per simulated instance whose tier model has a cap (objects with instance_id,
    tier and tier_model, as orchestrator/runtime.py builds them)."""
    return [
        CapResult(
            inst.instance_id,
            CapStatus.SIMULATED,
            "simulated engine: the cap is modelled by the tier model; no GPU limit is set",
            inst.tier_model.power_cap_w,
            tier=inst.tier,
        )  # fmt: skip
        for inst in instances
        if inst.tier_model.power_cap_w is not None
    ]


def summarize(results: Sequence[CapResult]) -> dict[str, Any]:
    """One engine's results (one per GPU) as the view /v1/fleet shows: applied only if every GPU is."""
    worst = next((r for r in results if not r.status.in_force), results[0])
    applied = [r.applied_w for r in results if r.applied_w is not None and r.status.in_force]
    return {
        "requested_w": results[0].requested_w,
        "applied_w": min(applied) if applied and len(applied) == len(results) else None,
        "status": str(worst.status),
        "applied": all(r.status is CapStatus.APPLIED for r in results),
        "message": worst.message,
        "gpus": [
            {"nvml_index": r.gpu_index, "uuid": r.gpu_uuid, "status": str(r.status), "applied_w": r.applied_w,
             "previous_w": r.previous_w}
            for r in results if r.gpu_index is not None or r.gpu_uuid is not None
        ],
    }  # fmt: skip


@dataclass
class SessionPowerCaps:
    """Apply a serving session's caps at start and restore them at stop (both blocking: run in a thread)."""

    requests: list[CapRequest]
    pre_results: list[CapResult]  # decided without NVML: simulated, remote
    sources: dict[str, str] = field(default_factory=dict)  # engine id -> where its cap came from
    state_path: Path = DEFAULT_STATE_FILE
    holder: Holder | None = None
    results: dict[str, list[CapResult]] = field(default_factory=dict)

    @classmethod
    def for_fleet(
        cls, cfg: FleetConfig, plan: Plan | None, state_path: Path | None, instances: Iterable[Any] = ()
    ) -> SessionPowerCaps:
        if cfg.backend == "sim":
            sim = simulated_caps(instances)
            sources = {r.engine_id: "the simulated instance's tier model" for r in sim}
            return cls([], sim, sources, state_path or DEFAULT_STATE_FILE)
        caps = engine_caps(cfg, plan)
        requests, remote = cap_requests(caps)
        return cls(requests, remote, {c.engine_id: c.source for c in caps if c.cap_w is not None},
                   state_path or DEFAULT_STATE_FILE)  # fmt: skip

    def start(self, ledger: Any = None) -> list[CapResult]:
        results = list(self.pre_results)
        if self.requests:
            self.holder = Holder.this_process("serve", "orchestrator serve")
            results += apply_caps(self.requests, self.holder, state_path=self.state_path)
        asked = {r.engine_id for r in self.requests} | {r.engine_id for r in self.pre_results}
        for r in results:
            if r.status is CapStatus.RESTORED and r.engine_id not in asked:
                log.warning("restored GPU %s to %g W, left capped by a session that crashed", r.gpu_index,
                            r.applied_w or 0.0)  # fmt: skip
                continue
            self.results.setdefault(r.engine_id, []).append(r)
            if not r.status.in_force and r.status is not CapStatus.SIMULATED:
                log.warning("power cap of engine %s NOT applied (%s): %s", r.engine_id, r.status, r.message)
            elif r.status is CapStatus.APPLIED:
                log.info(
                    "power cap of engine %s: GPU %s at %g W", r.engine_id, r.gpu_index, r.applied_w or 0.0
                )
        self._record(ledger, results, "apply")
        return results

    def stop(self, ledger: Any = None) -> list[CapResult]:
        if self.holder is None:
            return []
        results = restore_caps(self.holder, state_path=self.state_path)
        self.holder = None
        self._record(ledger, results, "restore")
        return results

    def view(self, engine_id: str) -> dict[str, Any] | None:
        res = self.results.get(engine_id)
        if not res:
            return None
        return {**summarize(res), "source": self.sources.get(engine_id, "")}

    @staticmethod
    def _record(ledger: Any, results: Sequence[CapResult], event: str) -> None:
        if ledger is None or not results:
            return
        try:
            ledger.record_power_caps([r.record(event) for r in results])
        except Exception as err:  # noqa: BLE001 - the caps are in force either way; serving goes on
            log.error("could not record power caps in the ledger: %s", err)
