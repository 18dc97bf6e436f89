"""Prefill-decode interference: the simulator's cost of a step that mixes a prefill with decodes, against the
ConServe artifact's measurement (shared/data/conserve/interference_cell_wall.csv).

The measurement (eicchen/conserve profiling/run_interference.py and run_interference_kv.py, vLLM 0.11, A40
300 W, Qwen3-0.6B, --enforce-eager, --max-num-batched-tokens 33792 so a prefill of up to 32k tokens is one
chunk): per cell, B background requests decode 300 tokens (B_sweep, 8-token prompts) or 200 tokens (KV_sweep,
B=8 with L_decoder_prompt-token prompts); 1.0 s later one prefill of L_prefill tokens (2 output tokens) is
submitted; the cell's wall time runs until every request has finished. ``hit`` cells first run the same prompt
once (a full prefill, inside the cell's wall time), so the measured prefill is a prefix-cache hit.

Two comparisons, printed with ``-s``:
1. Whole-cell wall time of the B_sweep cells, simulated by driving orchestrator.sim with the experiment
   itself (one colocated A40, the experiment's engine settings). This includes the decode path, not only the
   interference.
2. The interference itself: how much longer a cell gets when the co-running prefill grows from 1,024 tokens
   to L (same B, same decoders; everything else cancels). The simulator costs a mixed step as
   tiers.perf.step_time_s = decode step + the prefill chunk's GPU time (additive). The data say the same: a
   cold prefill delays co-running decodes by about its standalone time, for every B (1-32) and decoder
   context (1k-32k tokens per request). Needs ../shared/data.
"""

from __future__ import annotations

import csv
import statistics
from pathlib import Path

import pytest
from simkit import Inst, a40

from orchestrator.sim import SimOptions, run_simulation
from orchestrator.workload import ConversationSpec, TurnSpec
from placement.base import Role
from placement.policies import ColocatedPolicy

# the experiment's engine flags (run_interference.py): one chunk holds a whole 32k prefill
EXPERIMENT_OPTIONS = SimOptions(max_batched_tokens=33792, max_seqs=128)
DECODE_STEADY_DELAY_S = 1.0  # run_interference.py: wait after submitting the decoders
B_SWEEP_OUTPUT_TOKENS = 300  # DECODE_MAX_TOKENS in run_interference.py
KV_SWEEP_OUTPUT_TOKENS = 200  # DECODE_MAX_TOKENS in run_interference_kv.py
DECODER_PROMPT_TOKENS = 8  # DECODE_PROMPT_LEN in run_interference.py
PREFILL_OUTPUT_TOKENS = 2  # PREFILL_MAX_TOKENS

Cell = tuple[str, str, int, int, int]  # phase, cache, B, L_decoder_prompt, L_prefill


@pytest.fixture(scope="module")
def cells(shared_data: Path) -> dict[Cell, float]:
    with (shared_data / "conserve" / "interference_cell_wall.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    return {
        (r["phase"], r["cache"], int(r["B_decode"]), int(r["L_decoder_prompt"]), int(r["L_prefill"])):
        float(r["wall_s_p50"])
        for r in rows
    }


def simulated_b_sweep_wall_s(b: int, l_prefill: int, hit: bool) -> float:
    """One B_sweep cell driven through the simulator: B decoders at t0, the prefill 1.0 s later."""
    inst = [Inst("a40", "a40", Role.COLOCATED, a40())]
    t0 = 0.0
    convs: list[ConversationSpec] = []
    if hit:
        # the warm-up request runs alone first; the measured request is its prompt again (a cache hit),
        # modelled as the same conversation's next turn, 1.0 s after the decoders were submitted
        warm = run_simulation(
            inst, [ConversationSpec("pref", 0.0, (TurnSpec(l_prefill, PREFILL_OUTPUT_TOKENS),))],
            ColocatedPolicy(), energy_window_s=None, options=EXPERIMENT_OPTIONS,
        )
        t0 = warm.makespan_s
        convs.append(ConversationSpec("pref", 0.0, (
            TurnSpec(l_prefill, PREFILL_OUTPUT_TOKENS),
            TurnSpec(1, PREFILL_OUTPUT_TOKENS, DECODE_STEADY_DELAY_S),
        )))
    else:
        convs.append(ConversationSpec(
            "pref", DECODE_STEADY_DELAY_S, (TurnSpec(l_prefill, PREFILL_OUTPUT_TOKENS),)
        ))
    convs += [
        ConversationSpec(f"dec{i}", t0, (TurnSpec(DECODER_PROMPT_TOKENS, B_SWEEP_OUTPUT_TOKENS),))
        for i in range(b)
    ]
    res = run_simulation(inst, convs, ColocatedPolicy(), energy_window_s=None, options=EXPERIMENT_OPTIONS)
    return res.makespan_s


def test_whole_cell_wall_time_b_sweep(cells: dict[Cell, float]) -> None:
    rel: list[float] = []
    print("\nB_sweep cell wall time: measured p50 vs simulated (s)")
    for (phase, cache, b, _, lp), wall in sorted(cells.items()):
        if phase != "B_sweep":
            continue
        sim = simulated_b_sweep_wall_s(b, lp, cache == "hit")
        rel.append(abs(sim - wall) / wall)
        print(f"  {cache:4} B={b:2} L={lp:5}  measured {wall:5.2f}  simulated {sim:5.2f}  "
              f"{sim / wall - 1:+.1%}")
    med, worst = statistics.median(rel), max(rel)
    print(f"  {len(rel)} cells: median |error| {med:.1%}, max {worst:.1%}")
    # The decode path dominates these cells (300 steps of ~14-16 ms under --enforce-eager); at B >= 2 the
    # engine's measured steps are ~1.5 ms slower than the calibrated decode grid predicts.
    assert med <= 0.15
    assert worst <= 0.25


def _stall_s(l_prefill: int, b: int, ctx_tokens: int, hit: bool) -> float:
    """The simulator's extra time for a step that also prefills: step_time_s - decode_step_time_s."""
    tm = a40()
    n, cached = (1, l_prefill - 1) if hit else (l_prefill, 0)
    return tm.step_time_s(n, cached, b, ctx_tokens) - tm.decode_step_time_s(b, ctx_tokens)


def test_interference_increment_matches_the_measurement(cells: dict[Cell, float]) -> None:
    """wall(B, L) - wall(B, 1024) for B > 0: measured vs modelled (hit cells add the warm-up prefill)."""
    tm = a40()
    errs: list[float] = []
    big: list[float] = []
    print("\nInterference increment wall(L) - wall(1024), B > 0 (s)")
    for (phase, cache, b, ld, lp), wall in sorted(cells.items()):
        if b == 0 or lp == 1024:
            continue
        meas = wall - cells[(phase, cache, b, ld, 1024)]
        out = B_SWEEP_OUTPUT_TOKENS if phase == "B_sweep" else KV_SWEEP_OUTPUT_TOKENS
        ctx = b * (ld + out // 2)  # decoders' KV when the prefill lands (mid-run)
        hit = cache == "hit"
        model = _stall_s(lp, b, ctx, hit) - _stall_s(1024, b, ctx, hit)
        if hit:  # the warm-up is a full prefill inside the cell
            model += tm.prefill_time_s(lp) - tm.prefill_time_s(1024)
        errs.append(abs(model - meas))
        if lp == 32768:
            big.append(abs(model - meas) / meas)
        print(f"  {phase:8} {cache:4} B={b:2} Ldec={ld:5} L={lp:5}  measured {meas:+.2f}  model {model:+.2f}")
    print(f"  {len(errs)} increments: median |error| {statistics.median(errs):.3f} s, max {max(errs):.3f} s; "
          f"at L=32768 median {statistics.median(big):.1%}, max {max(big):.1%} (data rounded to 0.1 s)")
    assert statistics.median(errs) <= 0.1  # the wall times are printed to 0.1 s
    assert max(errs) <= 0.2
    assert max(big) <= 0.10


def test_mixed_step_is_additive_and_independent_of_decode_context() -> None:
    """The property the data support: the stall is the prefill's GPU time, whatever the decode batch."""
    tm = a40()
    alone = tm.prefill_time_s(16384) - tm.calibration.prefill_overhead_s
    for b, ctx in ((1, 300), (8, 8 * 16384), (32, 32 * 4096)):
        assert _stall_s(16384, b, ctx, hit=False) == pytest.approx(alone, rel=1e-9)
