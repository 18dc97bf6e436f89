"""fleet.yaml: the one file that describes a deployment (pydantic-validated at the edge).

Errors name the field path and the fix. Everything inside the core uses frozen dataclasses built from this;
this module is the only place that knows the YAML shape. See docs/fleet-yaml.md for the reference.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from conserve.errors import ConServeError
from energy.estimate import DEFAULT_GRID_G_PER_KWH
from orchestrator.errors import ConfigError
from tiers.catalog import GpuSpec, get_gpu
from tiers.models import ModelSpec, get_model


class Objective(StrEnum):
    ENERGY = "energy"
    GPUS = "gpus"
    COST = "cost"


class LinkType(StrEnum):
    NVLINK = "nvlink"
    PCIE = "pcie"
    INFINIBAND = "infiniband"
    ETHERNET = "ethernet"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InlineModel(_Strict):
    name: str
    layers: int = Field(gt=0)
    hidden_size: int = Field(gt=0)
    attention_heads: int = Field(gt=0)
    kv_heads: int = Field(gt=0)
    head_dim: int = Field(gt=0)
    params: float = Field(gt=0, description="total parameter count, e.g. 8.03e9")
    dtype_bytes: int = Field(2, gt=0)
    max_context_tokens: int = Field(32768, gt=0)

    def to_spec(self) -> ModelSpec:
        return ModelSpec(**self.model_dump(), source="inline in fleet.yaml")


class InlineGpu(_Strict):
    name: str
    bf16_dense_tflops: float = Field(gt=0)
    memory_gb: float = Field(gt=0)
    memory_bandwidth_gbps: float = Field(gt=0)
    tdp_w: float = Field(gt=0)
    idle_w: float = Field(ge=0)
    power_cap_min_w: float | None = None
    power_cap_max_w: float | None = None

    def to_spec(self) -> GpuSpec:
        d = self.model_dump()
        d["power_cap_min_w"] = d["power_cap_min_w"] or self.tdp_w * 0.5
        d["power_cap_max_w"] = d["power_cap_max_w"] or self.tdp_w
        return GpuSpec(**d, source="inline in fleet.yaml")


def _split_roles() -> list[Literal["prefill", "decode", "colocated"]]:
    """A tier's default roles: prefill and decode in separate instances (colocated is opt-in per tier)."""
    return ["prefill", "decode"]


class TierConfig(_Strict):
    name: str = Field(description="label of this tier, unique in the fleet (e.g. 'h100')")
    gpu: str | InlineGpu
    count: int = Field(ge=0, description="GPUs of this type available")
    power_caps_w: list[float] | None = Field(
        None, description="allowed power caps; default: the GPU's TDP only"
    )
    tp: list[int] = Field(default_factory=lambda: [1], description="allowed tensor-parallel sizes")
    roles: list[Literal["prefill", "decode", "colocated"]] = Field(
        default_factory=_split_roles, description="roles this tier may take"
    )
    profile: Path | None = Field(None, description="measured profile YAML (orchestrator profile --out)")
    cap_curves: Path | None = Field(
        None, description="measured power-cap curves YAML (orchestrator profile --micro --out)"
    )
    link: LinkType = LinkType.PCIE
    cost_per_gpu_hour: float | None = Field(None, ge=0, description="$ per GPU-hour, for objective: cost")

    @field_validator("tp")
    @classmethod
    def _tp_positive(cls, v: list[int]) -> list[int]:
        if not v or any(t < 1 for t in v):
            raise ValueError("tp must list sizes >= 1, e.g. [1, 2]")
        return v

    def gpu_spec(self) -> GpuSpec:
        return self.gpu.to_spec() if isinstance(self.gpu, InlineGpu) else get_gpu(self.gpu)


class SyntheticWorkload(_Strict):
    """Synthetic agentic conversations (see orchestrator/workload.py for the generator)."""

    turn1_input_tokens_median: int = Field(15900, gt=0)
    turn1_input_tokens_sigma: float = Field(0.35, ge=0, description="log-normal sigma of turn-1 input")
    turns_mean: float = Field(10.0, ge=1)
    appended_tokens_mean: int = Field(67, ge=0)
    output_tokens_mean: int = Field(120, gt=0)
    tool_gap_s_mean: float = Field(0.0, ge=0)


class WorkloadConfig(_Strict):
    format: Literal["conserve", "mooncake", "synthetic"] = "synthetic"
    path: Path | None = Field(None, description="trace file for format conserve or mooncake")
    synthetic: SyntheticWorkload = Field(default_factory=SyntheticWorkload)
    arrival_rate_per_s: float = Field(1.0, gt=0, description="conversations per second (Poisson)")
    conversations: int | None = Field(
        None, gt=0, description="use this many conversations (default: all/1000)"
    )
    max_turns: int | None = Field(None, gt=0, description="cap turns per conversation")
    tool_gap_s: float | None = Field(None, ge=0, description="override the gap between turns")
    seed: int = 0

    @model_validator(mode="after")
    def _path_for_traces(self) -> WorkloadConfig:
        if self.format in ("conserve", "mooncake") and self.path is None:
            raise ValueError(f"format {self.format!r} needs 'path' to the trace file")
        return self


class SloConfig(_Strict):
    percentile: float = Field(95, gt=0, le=100)
    ttfet_slowdown: float | None = Field(5.0, gt=0)
    tbt_slowdown: float | None = Field(5.0, gt=0)
    e2e_slowdown: float | None = Field(5.0, gt=0)
    ttfet_s: float | None = Field(None, gt=0, description="absolute TTFET SLO in seconds")
    tbt_ms: float | None = Field(None, gt=0, description="absolute mean TBT SLO in milliseconds")


class EngineConfig(_Strict):
    id: str
    tier: str = Field(description="name of a tier in 'tiers'")
    role: Literal["prefill", "decode", "colocated"]
    url: str = Field(description="base URL of a vLLM OpenAI server, e.g. http://127.0.0.1:8100")
    meter: str | None = Field(None, description="id of a meter in 'meters'")
    gpu_indices: list[int] = Field(default_factory=list)
    power_cap_w: float | None = Field(
        None, gt=0, description="power limit per GPU, applied through NVML by serve / engines up (W)"
    )


class MeterConfig(_Strict):
    id: str
    kind: Literal["zeus", "nvml", "dcgm", "model", "replay"]
    url: str | None = Field(None, description="DCGM exporter URL (kind dcgm)")
    hostname: str | None = Field(
        None, description="kind dcgm: only this Hostname label (an endpoint serving several hosts' GPUs)"
    )
    path: Path | None = Field(None, description="recorded samples (kind replay)")


class FleetConfig(_Strict):
    model: str | InlineModel
    tiers: list[TierConfig] = Field(min_length=1)
    workload: WorkloadConfig = Field(default_factory=WorkloadConfig)
    slo: SloConfig = Field(default_factory=SloConfig)
    objective: Objective = Objective.ENERGY
    unallocated: Literal["idle", "off"] = Field("idle", description="bill unallocated GPUs as idle, or off")
    reference_tier: str | None = Field(None, description="tier for standalone latency (default: first)")
    policy: str = "conserve"
    backend: Literal["sim", "vllm"] = "sim"
    engines: list[EngineConfig] = Field(default_factory=list)
    meters: list[MeterConfig] = Field(default_factory=list)
    database_url: str = "sqlite:///conserve.db"
    grid_carbon_g_per_kwh: float = Field(
        DEFAULT_GRID_G_PER_KWH,
        ge=0,
        description="carbon intensity of the electricity (gCO2e/kWh) for carbon figures; default: 2023 world "
        "average, Ember Global Electricity Review 2024 (energy/estimate.py)",
    )

    @model_validator(mode="after")
    def _cross_checks(self) -> FleetConfig:
        names = [t.name for t in self.tiers]
        dupes = {n for n in names if names.count(n) > 1}
        if dupes:
            raise ValueError(f"tier names must be unique; repeated: {sorted(dupes)}")
        if self.reference_tier is not None and self.reference_tier not in names:
            raise ValueError(f"reference_tier {self.reference_tier!r} is not a tier; tiers are {names}")
        for e in self.engines:
            if e.tier not in names:
                raise ValueError(f"engine {e.id!r} names tier {e.tier!r}, which is not in tiers {names}")
        if self.backend == "vllm" and not self.engines:
            raise ValueError("backend 'vllm' needs an 'engines' list (id, tier, role, url)")
        return self

    @field_validator("unallocated", mode="before")
    @classmethod
    def _yaml_off(cls, v: Any) -> Any:
        # YAML 1.1 reads a bare `off` as the boolean false
        return "off" if v is False else v

    def model_spec(self) -> ModelSpec:
        return self.model.to_spec() if isinstance(self.model, InlineModel) else get_model(self.model)


def _format_validation_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or "(top level)"
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown field; remove it or check its spelling (see docs/fleet-yaml.md)"
    elif first["type"] == "missing":
        msg = "required field is missing; add it (see examples/fleet.yaml)"
    more = f" (+{len(err.errors()) - 1} more problems)" if len(err.errors()) > 1 else ""
    return f"{source}: {loc}: {msg}{more}"


def parse_fleet(data: Any, source: str = "fleet.yaml", base_dir: Path | None = None) -> FleetConfig:
    """Validate a parsed YAML mapping; relative paths resolve against base_dir."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level (model:, tiers:, ...)")
    try:
        cfg = FleetConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None
    try:  # resolve catalog names now so a typo fails at load time, naming the field
        cfg.model_spec()
    except ConServeError as err:
        raise ConfigError(f"{source}: model: {err}") from None
    for i, t in enumerate(cfg.tiers):
        try:
            t.gpu_spec()
        except ConServeError as err:
            raise ConfigError(f"{source}: tiers.{i}.gpu: {err}") from None
    if base_dir is not None:
        cfg = _resolve_paths(cfg, base_dir)
    return cfg


def _resolve_paths(cfg: FleetConfig, base: Path) -> FleetConfig:
    def fix(p: Path | None) -> Path | None:
        return p if p is None or p.is_absolute() else (base / p)

    tiers = [
        t.model_copy(update={"profile": fix(t.profile), "cap_curves": fix(t.cap_curves)}) for t in cfg.tiers
    ]
    wl = cfg.workload.model_copy(update={"path": fix(cfg.workload.path)})
    return cfg.model_copy(update={"tiers": tiers, "workload": wl})


def load_fleet(path: str | Path) -> FleetConfig:
    p = Path(path)
    if not p.exists():
        raise ConfigError(
            f"fleet file {str(p)!r} does not exist. To fix: pass --fleet examples/fleet.yaml or a path."
        )
    return parse_fleet(read_yaml(p), source=str(p), base_dir=p.parent)


def read_yaml(p: Path) -> Any:
    """Parse the YAML file `p` (fleet or plan file); ConfigError naming file and line if it is not YAML."""
    try:
        return yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{p}:{where} is not valid YAML ({getattr(err, 'problem', err)})") from None
