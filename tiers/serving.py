"""Serving-path step overhead: what a ``vllm serve`` engine pays per step beyond the offline decode grid.

Pure; must not import fastapi, sqlalchemy, httpx or orchestrator. SI units.

The tier model's decode step is fitted to ``shared/data/conserve/decode_grid_300W.csv``, which the ConServe
artifact measured with vLLM's offline engine in one process (``profiling/run_decode_grid.py``: ``LLM(...,
enforce_eager=True)``). Its section-5 experiments ran OpenAI servers (``vllm serve``, V1 multiprocessing:
an API-server process in front of the engine core), as did its interference experiment
(``profiling/run_interference.py`` lines 72-94). That experiment measures the server's steps directly: in a
``B_sweep`` cell, B requests with 8-token prompts decode 300 tokens each while one prefill of L tokens is
submitted 1 s in (``interference_cell_wall.csv``). Subtracting the tier model's time for exactly that work
(the decoders' prompts, 300 decode steps at the cell's batch and growing context, the prefill's stall, and
for ``hit`` cells the warm-up prefill) from the measured wall time leaves, per decode step:

    B = 1: -0.24 ms (none: the single-request server step is the grid's step)
    B = 2, 4, 8, 16, 32: +1.39, +1.32, +1.31, +1.07, +1.01 ms (median over the cell's 8 L x cache cells)

i.e. a roughly constant ~1.2 ms per step once two or more requests run (40 cells with B >= 2: median 1.17 ms,
10-90 % 0.94-1.46 ms; the walls are rounded to 0.1 s, +-0.17 ms per step). Per-request output processing
in the server (detokenising and streaming each running request's token every step) is the likely cause; the
data cannot say whether it grows at contexts far beyond the cells' (<= 32 x 308 tokens), so it is modelled
as a constant. :func:`fit_step_overhead_s` reproduces the fit from the CSV
(tests/tiers/test_serving_overhead.py).

Applied by :func:`with_serving_overhead` (``TierModel.serving_overhead_s``, added to every decode step with
B >= 2, so mixed prefill+decode steps carry it too); the simulator applies it with
``SimOptions(serving_step_overhead=True)`` (off by default).
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping
from dataclasses import replace

from tiers.perf import TierModel

# Median of the 40 B_sweep cells with B >= 2 (see the module docstring; fit_step_overhead_s).
SERVING_STEP_OVERHEAD_S = 1.17e-3
# run_interference.py: the background decoders' prompt and output lengths, the steady-state delay
B_SWEEP_DECODER_PROMPT_TOKENS = 8
B_SWEEP_DECODER_OUTPUT_TOKENS = 300


def serving_step_overhead_s(batch: int) -> float:
    """Extra seconds a serving engine's step takes over the offline grid, for `batch` running requests."""
    return SERVING_STEP_OVERHEAD_S if batch >= 2 else 0.0


def with_serving_overhead(tm: TierModel, overhead_s: float = SERVING_STEP_OVERHEAD_S) -> TierModel:
    """`tm` as a serving (``vllm serve``) engine: each decode step with >= 2 running requests takes
    `overhead_s` longer (default: the measured median, SERVING_STEP_OVERHEAD_S)."""
    return replace(tm, serving_overhead_s=overhead_s)


def b_sweep_model_wall_s(tm: TierModel, batch: int, l_prefill: int, hit: bool) -> float:
    """The tier model's time for one B_sweep cell's work (no serving overhead): the decoders' prompts, their
    300 decode steps (context grows one token per request per step), the prefill's stall on them (mid-run
    context), and for a hit cell the warm-up prefill of the same prompt, which runs inside the cell."""
    prompt = B_SWEEP_DECODER_PROMPT_TOKENS
    out = B_SWEEP_DECODER_OUTPUT_TOKENS
    decode = sum(tm.decode_step_time_s(batch, batch * (prompt + k)) for k in range(out))
    mid_ctx = batch * (prompt + out // 2)
    new, cached = (1, l_prefill - 1) if hit else (l_prefill, 0)
    stall = tm.step_time_s(new, cached, batch, mid_ctx) - tm.decode_step_time_s(batch, mid_ctx)
    warm = tm.prefill_time_s(l_prefill) if hit else 0.0
    return tm.prefill_time_s(prompt * batch) + decode + stall + warm


def fit_step_overhead_s(
    tm: TierModel, cells: Iterable[Mapping[str, str]], min_batch: int = 2
) -> dict[int, list[float]]:
    """Per batch size, (measured wall - model wall) / decode steps of the B_sweep cells with B >= min_batch.

    `cells` are rows of interference_cell_wall.csv (as csv.DictReader gives them)."""
    out: dict[int, list[float]] = {}
    for row in cells:
        if row["phase"] != "B_sweep":
            continue
        b = int(row["B_decode"])
        if b < min_batch:
            continue
        model = b_sweep_model_wall_s(tm, b, int(row["L_prefill"]), row["cache"] == "hit")
        out.setdefault(b, []).append((float(row["wall_s_p50"]) - model) / B_SWEEP_DECODER_OUTPUT_TOKENS)
    return out


def median_overhead_s(per_batch: Mapping[int, list[float]]) -> float:
    return statistics.median(v for vals in per_batch.values() for v in vals)
