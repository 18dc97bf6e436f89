"""Per-GPU calibrations fitted on AIConfigurator estimates; the tier model's error against them.

Offline, like tiers/calibration.py: ``python -m tiers.calibration_aic [GPU ...]`` queries the installed
AIConfigurator (tiers/aiconfigurator.py) on each covered model and TP size of a GPU, fits the speed constants
of one :class:`tiers.presets.Calibration` per GPU (loss: mean squared log error, prefill and decode weighted
alike) and prints them with their errors; the values were copied by hand into tiers/presets.py
(``AIC_GPU_CALIBRATIONS``). tests/tiers/test_aiconfigurator.py re-evaluates the shipped presets and the tier
models that apply AIConfigurator's profile. Uses numpy (fits only). Must not import fastapi, sqlalchemy,
httpx.

Points (per GPU, every model of ``AIC_MODELS`` at every TP size of ``AIC_TP_SIZES`` whose weights fit):
prefill of one request of n = 64 .. 32,768 new tokens (powers of two); decode steps of B = 1 .. 512 sequences
over a total of C = 256 .. 4M KV tokens (powers of two, C/B >= 16 per sequence), kept when C fits the tier's
KV capacity (the states an engine can reach).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, replace

from tiers.aiconfigurator import (
    AIC_MODELS,
    AIC_SYSTEMS,
    AIC_TP_SIZES,
    PREFILL_TOKENS,
    AicSession,
    decode_grid,
)
from tiers.calibration import ErrorRow, _fit, _log_loss
from tiers.catalog import get_gpu
from tiers.models import get_model
from tiers.perf import Calibration, TierModel


@dataclass(frozen=True, slots=True)
class AicPoint:
    """One AIConfigurator answer: a prefill (batch 0) or a decode step (batch >= 1)."""

    gpu: str
    model: str
    tp: int
    batch: int  # 0: prefill of `tokens` new tokens; else decode over `tokens` total KV tokens
    tokens: int
    ms: float

    @property
    def kind(self) -> str:
        return "prefill" if self.batch == 0 else "decode"


# L40S boards have no NVLink: AIConfigurator's L40S all-reduce tables make TP 4/8 prefills 2.5-25x slower than
# TP 1 (Llama-3.1-8B, 16k tokens: 1.57 s at TP 1, 3.9 s at TP 4, 7.9 s at TP 8), which the model's linear link
# term cannot follow; its preset is fitted on TP 1-2, and TP 4/8 L40S tiers rely on the imported profile.
FIT_MAX_TP = {"L40S": 2}


def tier_sizes(gpu: str) -> list[tuple[str, int]]:
    """(model, tp) pairs whose bf16 weights leave KV room on `gpu` (70B needs >= 2 x 80 GB)."""
    out = []
    for m in AIC_MODELS:
        for tp in AIC_TP_SIZES:
            if tp > FIT_MAX_TP.get(gpu, 8):
                continue
            tm = TierModel(get_gpu(gpu), get_model(m), tp=tp, calibration=Calibration())
            if tm.kv_capacity_tokens >= 16_384 and not (m == "Qwen3-0.6B" and tp > 1):
                out.append((m, tp))
    return out


def points(gpu: str, model: str, tp: int, prefill_min_tokens: int = 64) -> list[AicPoint]:
    s = AicSession(gpu, model, tp)
    spec = get_model(model)
    cap = TierModel(get_gpu(gpu), spec, tp=tp, calibration=Calibration()).kv_capacity_tokens
    out = [
        AicPoint(gpu, model, tp, 0, n, s.prefill_ms(n))
        for n in PREFILL_TOKENS
        if prefill_min_tokens <= n < spec.max_context_tokens
    ]
    out += [
        AicPoint(gpu, model, tp, b, c, s.decode_step_ms(b, c // b))
        for b, c in decode_grid(spec.max_context_tokens)
        if c <= cap
    ]
    return out


def errors(pts: Sequence[AicPoint], cal: Calibration | None = None) -> list[ErrorRow]:
    """Modelled vs AIConfigurator for each point; cal None = the tier model as planning builds it (default
    calibration and, when installed, AIConfigurator's own profile)."""
    cache: dict[tuple[str, str, int], TierModel] = {}
    rows = []
    for p in pts:
        key = (p.gpu, p.model, p.tp)
        tm = cache.get(key)
        if tm is None:
            g, m = get_gpu(p.gpu), get_model(p.model)
            tm = TierModel(g, m, tp=p.tp) if cal is None else TierModel(g, m, tp=p.tp, calibration=cal)
            cache[key] = tm
        if p.batch == 0:
            t = tm.prefill_time_s(p.tokens)
            label = f"{p.gpu} {p.model} tp{p.tp} prefill {p.tokens}"
        else:
            t = tm.decode_step_time_s(p.batch, p.tokens)
            label = f"{p.gpu} {p.model} tp{p.tp} decode B={p.batch} C={p.tokens}"
        rows.append(ErrorRow(f"aic-{p.kind}", label, p.ms / 1e3, t))
    return rows


SPEED_PARAMS = (
    "compute_efficiency",
    "prefill_overhead_s",
    "bandwidth_efficiency",
    "layer_overhead_s",
    "gpu_per_sequence_s",
    "tp_layer_latency_s",
    "tp_link_efficiency",
)


def fit_gpu(gpu: str, pts: Sequence[AicPoint], start: Calibration) -> Calibration:
    """Fit the speed constants of `gpu` on its points; host-side overheads held at ~0 (AIConfigurator models
    GPU time only)."""
    base = replace(start, step_overhead_s=1e-6, per_sequence_s=0.0)
    pre = [p for p in pts if p.batch == 0]
    dec = [p for p in pts if p.batch > 0]

    def loss(c: Calibration) -> float:
        # prefill and decode weigh the same whatever their point counts
        return _log_loss(errors(pre, c)) / len(pre) + _log_loss(errors(dec, c)) / len(dec)

    cal = _fit(base, list(SPEED_PARAMS), loss, restarts=3)
    return replace(cal, name=f"aic-{AIC_SYSTEMS[gpu]}-vllm", source="fit_gpu (tiers/calibration_aic.py)")


def summary(rows: Sequence[ErrorRow]) -> str:
    errs = [abs(r.rel_err) for r in rows]
    return f"n={len(errs)} median |err| {statistics.median(errs):.1%} max {max(errs):.1%}"


def main(argv: Sequence[str] | None = None) -> None:  # pragma: no cover - offline tool
    import sys

    from tiers.perf import CONSERVE_A40_VLLM011

    gpus = list(sys.argv[1:] if argv is None else argv) or list(AIC_SYSTEMS)
    for gpu in gpus:
        pts = [p for m, tp in tier_sizes(gpu) for p in points(gpu, m, tp)]
        cal = fit_gpu(gpu, pts, CONSERVE_A40_VLLM011)
        print(f"# {gpu}: {len(pts)} points")
        for k in SPEED_PARAMS:
            v = getattr(cal, k)
            print(f"    {k}={v:.4g},")
        rows = errors(pts, cal)
        for kind in ("aic-prefill", "aic-decode"):
            sel = [r for r in rows if r.dataset == kind]
            print(f"  {kind}: {summary(sel)}")
        worst = sorted(rows, key=lambda r: -abs(r.rel_err))[:5]
        for r in worst:
            ms = f"{r.measured * 1e3:.2f} ms vs {r.modelled * 1e3:.2f} ms"
            print(f"    worst {r.label}: {ms} ({r.rel_err:+.1%})")
        sys.stdout.flush()


if __name__ == "__main__":  # pragma: no cover
    main()
