"""The shipped calibration presets against every measured point in shared/data (run with -s for the tables).

Each test computes the model against the data; nothing is written to the repository.
"""

from __future__ import annotations

import csv
import statistics
from pathlib import Path

import pytest

from tiers import calibration as cal
from tiers.catalog import get_gpu
from tiers.models import get_model
from tiers.perf import CONSERVE_A40_VLLM011, SPLITWISE_VLLM, TierModel


def _table(title: str, rows: list[cal.ErrorRow], unit: str = "ms", scale: float = 1e3) -> None:
    print(f"\n== {title} ({len(rows)} points) ==")
    print(f"{'point':58s} {'measured':>10s} {'model':>10s} {'err':>7s}")
    for r in rows:
        print(
            f"{r.label:58s} {r.measured * scale:10.2f} {r.modelled * scale:10.2f} {r.rel_err:+7.1%}  {unit}"
        )
    errs = [abs(r.rel_err) for r in rows]
    print(f"median |err| {statistics.median(errs):.1%}   max |err| {max(errs):.1%}")


def _median_abs(rows: list[cal.ErrorRow]) -> float:
    return statistics.median(abs(r.rel_err) for r in rows)


def _a40(cap_w: float | None = None) -> TierModel:
    return TierModel(
        get_gpu("A40"), get_model("Qwen3-0.6B"), power_cap_w=cap_w, calibration=CONSERVE_A40_VLLM011
    )


def test_a40_prefill_error(shared_data: Path) -> None:
    rows = cal.prefill_errors(cal.load_a40_prefill(shared_data), CONSERVE_A40_VLLM011)
    _table("A40 Qwen3-0.6B cold prefill, 300 W and 200 W", rows)
    assert len(rows) == 38
    assert _median_abs(rows) <= 0.15


def test_a40_decode_error(shared_data: Path) -> None:
    rows = cal.decode_errors(cal.load_a40_decode(shared_data), CONSERVE_A40_VLLM011)
    _table("A40 Qwen3-0.6B decode step (p50), 300 W", rows)
    assert len(rows) >= 100
    assert _median_abs(rows) <= 0.15


def test_splitwise_prefill_and_decode_error(shared_data: Path) -> None:
    pre, dec = cal.load_splitwise(shared_data)
    pre_rows = cal.prefill_errors(pre, SPLITWISE_VLLM)
    dec_rows = cal.decode_errors(dec, SPLITWISE_VLLM)
    _table("Splitwise prompt_time (A100/H100, llama2-70b/bloom-176b, TP 2/4/8)", pre_rows)
    _table("Splitwise token_time", dec_rows)
    assert len(pre_rows) > 90 and len(dec_rows) > 140
    assert _median_abs(pre_rows) <= 0.15
    assert _median_abs(dec_rows) <= 0.15


def test_a40_powercap_prefill_slowdown_at_16k(shared_data: Path) -> None:
    rows = {
        int(r["L_tokens"]): r
        for r in csv.DictReader((shared_data / "conserve" / "prefill_vs_L_300W_200W.csv").open())
    }
    measured = float(rows[16384]["miss_ms_p50_200W"]) / float(rows[16384]["miss_ms_p50_300W"]) - 1
    assert measured == pytest.approx(0.225, abs=0.005)  # 622.09 ms -> 762.14 ms
    modelled = _a40(200).prefill_time_s(16384) / _a40().prefill_time_s(16384) - 1
    print(f"\n200 W vs 300 W prefill at 16,384 tokens: measured {measured:+.1%}, model {modelled:+.1%}")
    assert abs(modelled - measured) <= 0.10


def test_a40_powercap_prefill_slowdown_curve(shared_data: Path) -> None:
    """Whole curve: short prefills are overhead-bound (no slowdown), long ones slow down more."""
    errs = []
    for r in csv.DictReader((shared_data / "conserve" / "prefill_vs_L_300W_200W.csv").open()):
        n = int(r["L_tokens"])
        meas = float(r["ratio_200W_over_300W"])
        model = _a40(200).prefill_time_s(n) / _a40().prefill_time_s(n)
        errs.append(model - meas)
        print(f"L={n:6d} ratio measured {meas:.3f} model {model:.3f}")
    assert max(abs(e) for e in errs) <= 0.10


def test_a40_decode_barely_changes_under_200w(shared_data: Path) -> None:
    worst = 0.0
    for b, length, measured_pct in cal.load_a40_decode_cap_diff(shared_data):
        ctx = b * length
        change = _a40(200).decode_step_time_s(b, ctx) / _a40().decode_step_time_s(b, ctx) - 1
        worst = max(worst, abs(change))
        assert abs(measured_pct) <= 13.0  # the data's own spread (noise), for the record
    print(f"\nmodel decode change at 200 W, worst over the grid: {worst:+.1%} (measured within +-12.7%)")
    assert worst <= 0.10


def test_splitwise_power_error(shared_data: Path) -> None:
    rows = cal.power_errors(cal.load_splitwise_power(shared_data), SPLITWISE_VLLM)
    avg = [r for r in rows if r.dataset == "splitwise-power-avg"]
    peak = [r for r in rows if r.dataset == "splitwise-power-peak"]
    _table("Splitwise A100 mean draw per GPU over a run (average_power)", avg, "W", 1.0)
    _table("Splitwise A100 prefill mean draw vs peak_power (reported, not fitted)", peak, "W", 1.0)
    assert _median_abs(avg) <= 0.15
    # a mean prefill draw cannot exceed the measured peak by much
    assert all(r.modelled <= r.measured * 1.10 for r in peak)


def test_splitwise_constant_power_model_compared() -> None:
    """Splitwise's per-phase constants (configs/power_model/constant.yaml): prefill 400/700 W, decode
    250/380 W.

    Their constants ignore TP; ours fall with TP (fewer bytes per GPU per step, more time in all-reduce), as
    the measured A100 average_power does (294/240/174 W at TP 2/4/8). We compare the mean over TP 2/4/8 and
    report it; the prefill bound is loose because our prefill mean counts all-reduce time at the low "active"
    draw while Splitwise charges the whole prompt phase at TDP."""
    from tiers.power import SPLITWISE_POWER_W

    for gpu in ("A100-80GB-SXM", "H100-SXM"):
        ref = SPLITWISE_POWER_W[gpu]
        pre, dec = [], []
        for tp in (2, 4, 8):
            tm = TierModel(get_gpu(gpu), get_model("Llama-2-70B"), tp=tp, calibration=SPLITWISE_VLLM)
            assert tm.idle_w / tp == ref["idle"]
            pre.append(tm.prefill_power_w(8192) / tp)
            dec.append(tm.decode_power_w(8, 8 * 576) / tp)
        p, d = statistics.mean(pre), statistics.mean(dec)
        print(
            f"\n{gpu}: prefill {p:.0f} W (Splitwise {ref['prefill']:.0f}), decode {d:.0f} W "
            f"(Splitwise {ref['decode']:.0f}); per TP prefill {[round(x) for x in pre]} decode "
            f"{[round(x) for x in dec]}"
        )
        assert ref["idle"] < d < p <= get_gpu(gpu).tdp_w
        assert p == pytest.approx(ref["prefill"], rel=0.40)
        assert d == pytest.approx(ref["decode"], rel=0.20)


_MLENERGY = {
    "meta-llama/Llama-3.1-8B-Instruct": "Llama-3.1-8B",
    "meta-llama/Llama-3.1-70B-Instruct": "Llama-3.1-70B",
}
_MLENERGY_GPU = {"H100": "H100-SXM", "B200": "B200"}
_ASSUMED_PROMPT_TOKENS = 1000  # not published per config: an assumption, stated in the output


def test_mlenergy_energy_per_token(shared_data: Path) -> None:
    """ML.ENERGY v3 (vLLM serving, lm-arena-chat): J per output token vs the model's decode energy per token.

    Not like for like: the measurement includes the prefills interleaved with decoding and the prompt length
    is
    not published (we assume 1,000 tokens), so the model (decode only) should read low at large batches.
    The bound is loose on purpose: a factor-of-2 error would still fail."""
    path = shared_data / "mlenergy" / "mlenergy_v3_llm_configurations.csv"
    errs = []
    print("\nML.ENERGY v3: measured vs modelled J/output token (default calibration, decode only)")
    for r in csv.DictReader(path.open()):
        if (
            r["model_id"] not in _MLENERGY
            or r["task"] != "lm-arena-chat"
            or r["gpu_model"] not in _MLENERGY_GPU
        ):
            continue
        tm = TierModel(
            get_gpu(_MLENERGY_GPU[r["gpu_model"]]),
            get_model(_MLENERGY[r["model_id"]]),
            tp=int(r["tensor_parallel"]),
        )
        b = max(1, round(float(r["avg_batch_size"])))
        ctx = int(b * (_ASSUMED_PROMPT_TOKENS + float(r["avg_output_len"]) / 2))
        modelled = tm.decode_step_energy_j(b, ctx) / b
        measured = float(r["energy_per_token_joules"])
        errs.append(modelled / measured - 1)
        print(
            f"{r['gpu_model']:5s} {_MLENERGY[r['model_id']]:14s} tp{r['tensor_parallel']} B={b:5d} "
            f"measured {measured:7.3f} J  model {modelled:7.3f} J  {errs[-1]:+.0%}"
        )
    med = statistics.median(abs(e) for e in errs)
    print(f"median |err| {med:.0%}, max {max(abs(e) for e in errs):.0%} over {len(errs)} configs")
    assert len(errs) >= 30
    assert med <= 0.5
