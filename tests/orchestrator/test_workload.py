"""Workload loaders, generator and statistics (orchestrator/workload.py)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from types import FrameType

import pytest

from orchestrator.config import SyntheticWorkload, WorkloadConfig
from orchestrator.errors import WorkloadError
from orchestrator.workload import (
    load_conserve_trace,
    load_mooncake,
    poisson_arrivals,
    synthetic_conversations,
    workload_from_config,
    workload_stats,
)

HEADER = "conv_id,iter_id,appended_input,total_input,out_token_size,carried_over\n"


def _write(tmp_path: Path, text: str, name: str = "t.csv") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_conserve_trace_roundtrip(tmp_path: Path) -> None:
    p = _write(tmp_path, HEADER + "a,0,100,100,10,0\na,1,5,115,7,110\nb,0,50,50,3,0\n")
    convs = load_conserve_trace(p)
    assert [c.conversation_id for c in convs] == ["a", "b"]
    a = convs[0]
    assert [t.appended_tokens for t in a.turns] == [100, 5]
    assert a.input_tokens(2) == 115  # the trace's total_input is reproduced by the contract's arithmetic
    assert all(c.arrival_s == 0.0 for c in convs)


def test_conserve_trace_limits(tmp_path: Path) -> None:
    rows = "".join(f"c{i},{k},{10 if k == 0 else 1},{10 + 2 * k},1,0\n" for i in range(5) for k in range(4))
    p = _write(tmp_path, HEADER + rows)
    convs = load_conserve_trace(p, max_conversations=2, max_turns=3)
    assert len(convs) == 2 and all(len(c.turns) == 3 for c in convs)


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ("a,0,100,100,10,0\na,1,5,999,7,0\n", r"t\.csv.*line 3"),
        ("a,0,100,100,10,0\na,2,5,115,7,0\n", r"t\.csv:3: .*iter_id 2"),
        ("a,1,100,100,10,0\n", r"t\.csv:2: .*starts at iter_id 1"),
        ("a,0,x,100,10,0\n", r"t\.csv:2: column 'appended_input' is 'x'"),
        ("a,0,-3,100,10,0\n", r"t\.csv:2: .*negative"),
        ("a,0,10,10,1,0\nb,0,10,10,1,0\na,1,1,12,1,0\n", r"t\.csv:4: conversation 'a' reappears"),
    ],
    ids=["total-mismatch", "skipped-turn", "bad-start", "not-int", "negative", "split-conversation"],
)
def test_conserve_trace_bad_rows(tmp_path: Path, body: str, match: str) -> None:
    with pytest.raises(WorkloadError, match=match):
        load_conserve_trace(_write(tmp_path, HEADER + body))


def test_conserve_trace_missing_column_and_file(tmp_path: Path) -> None:
    with pytest.raises(WorkloadError, match="header lacks columns"):
        load_conserve_trace(_write(tmp_path, "conv_id,iter_id\n1,0\n"))
    with pytest.raises(WorkloadError, match="does not exist"):
        load_conserve_trace(tmp_path / "nope.csv")


def _mooncake(tmp_path: Path, rows: list[dict]) -> Path:
    p = tmp_path / "m.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def test_mooncake_groups_by_private_prefix(tmp_path: Path) -> None:
    rows = [
        {"timestamp": 0, "input_length": 1100, "output_length": 50, "hash_ids": [1, 2, 3]},
        # shares only the system prompt [1, 2] and does not grow: a new conversation
        {"timestamp": 100, "input_length": 1100, "output_length": 60, "hash_ids": [1, 2, 9]},
        # extends conversation 2's private block 9
        {"timestamp": 2500, "input_length": 1300, "output_length": 40, "hash_ids": [1, 2, 9, 10]},
        {"timestamp": 4000, "input_length": 1700, "output_length": 40, "hash_ids": [1, 2, 9, 10, 11]},
    ]
    convs = load_mooncake(_mooncake(tmp_path, rows))
    assert [len(c.turns) for c in convs] == [1, 3]
    c = convs[1]
    assert c.arrival_s == pytest.approx(0.1)
    assert c.turns[1].appended_tokens == 1300 - (1100 + 60)
    assert c.turns[1].tool_gap_s == pytest.approx(2.4)
    assert c.turns[2].appended_tokens == 1700 - (1300 + 40)


def _two_turn_trace(tmp_path: Path, n: int) -> Path:
    """n two-turn conversations behind one shared 3-block system prompt: every turn 1 first (each ends in a
    partial private block, so one of its continuation keys is the shared prefix), then every turn 2 (which
    completes that block and adds one)."""
    rows = []
    for i in range(n):
        rows.append(
            {
                "timestamp": i,
                "input_length": 3 * 512 + 100,
                "output_length": 20,
                "hash_ids": [0, 1, 2, 10 + i],
            }
        )
    for i in range(n):
        hashes = [0, 1, 2, 10 + i, 10 + n + i]
        rows.append(
            {"timestamp": n + i, "input_length": 4 * 512 + 50, "output_length": 20, "hash_ids": hashes}
        )
    d = tmp_path / f"n{n}"
    d.mkdir()
    return _mooncake(d, rows)


def _lines_executed(fn: Callable[[], object]) -> int:
    """Python lines run in the loader's module (orchestrator/traces.py) while fn runs (an operation count, not
    a time)."""
    target, count = load_mooncake.__code__.co_filename, 0

    def local(frame: FrameType, event: str, arg: object) -> object:
        nonlocal count
        if event == "line":
            count += 1
        return local

    def tracer(frame: FrameType, event: str, arg: object) -> object:
        return local if frame.f_code.co_filename == target else None

    sys.settrace(tracer)
    try:
        fn()
    finally:
        sys.settrace(None)
    return count


def test_mooncake_loader_is_linear_in_trace_length(tmp_path: Path) -> None:
    # Every row costs the same here, so a linear loader does 4x the work on 4x the rows; the loader that kept
    # every conversation under its continuation key scanned all earlier ones per row (16x, 2.3 s at 12k rows).
    small, large = _two_turn_trace(tmp_path, 200), _two_turn_trace(tmp_path, 800)
    convs = load_mooncake(large)
    assert len(convs) == 800 and all(len(c.turns) == 2 for c in convs)
    ratio = _lines_executed(lambda: load_mooncake(large)) / _lines_executed(lambda: load_mooncake(small))
    assert ratio < 4.4, ratio


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ("{not json", r"m\.jsonl:2: not valid JSON"),
        (
            '{"timestamp": 5, "input_length": 3, "output_length": 1}',
            r"m\.jsonl:2: field 'hash_ids' is missing",
        ),
        (
            '{"timestamp": 5, "input_length": -1, "output_length": 1, "hash_ids": []}',
            r"m\.jsonl:2: input_length",
        ),
        ('{"timestamp": 0, "input_length": 1, "output_length": 1, "hash_ids": []}', r"m\.jsonl:2: .*sort"),
    ],
    ids=["json", "missing", "negative", "unsorted"],
)
def test_mooncake_bad_rows(tmp_path: Path, line: str, match: str) -> None:
    p = tmp_path / "m.jsonl"
    p.write_text('{"timestamp": 1, "input_length": 10, "output_length": 1, "hash_ids": [1]}\n' + line + "\n")
    with pytest.raises(WorkloadError, match=match):
        load_mooncake(p)


def test_synthetic_is_deterministic_and_matches_parameters() -> None:
    params = SyntheticWorkload(turn1_input_tokens_median=8000, turns_mean=6, output_tokens_mean=100)
    a = synthetic_conversations(params, 2000, seed=3)
    assert a == synthetic_conversations(params, 2000, seed=3)
    assert a != synthetic_conversations(params, 2000, seed=4)
    s = workload_stats(a, rate_per_s=1.0)
    assert s.turn1_input_tokens_p50 == pytest.approx(8000, rel=0.05)
    assert s.turns_per_conversation_mean == pytest.approx(6, rel=0.08)
    assert s.output_tokens_per_turn_mean == pytest.approx(100, rel=0.08)
    assert s.appended_tokens_per_later_turn_mean == pytest.approx(67, rel=0.08)


def test_poisson_arrivals_rate_and_purity() -> None:
    convs = synthetic_conversations(SyntheticWorkload(), 3000, seed=1)
    timed = poisson_arrivals(convs, 2.0, seed=9)
    assert all(c.arrival_s == 0.0 for c in convs)  # input untouched
    times = [c.arrival_s for c in timed]
    assert times == sorted(times) and times[0] == 0.0
    assert workload_stats(timed).arrival_rate_per_s == pytest.approx(2.0, rel=0.06)
    assert timed == poisson_arrivals(convs, 2.0, seed=9)
    with pytest.raises(WorkloadError, match="rate"):
        poisson_arrivals(convs, 0.0)


def test_stats_kv_helpers_are_consistent() -> None:
    convs = synthetic_conversations(SyntheticWorkload(tool_gap_s_mean=1.0), 200, seed=0)
    s = workload_stats(convs, rate_per_s=1.0)
    # KVTS grows linearly with the step time; residence = decode tokens x step + gaps
    assert s.kv_token_seconds(0.02) - s.kv_token_seconds(0.01) == pytest.approx(
        s.kv_decode_token_steps_mean * 0.01
    )
    assert s.residence_s(0.0) == pytest.approx(s.tool_gap_s_total_mean)
    assert s.final_context_tokens_max >= s.final_context_tokens_p95 >= s.turn1_input_tokens_p50 * 0.5
    assert s.tokens_per_conversation_mean == pytest.approx(sum(c.total_tokens for c in convs) / len(convs))


def test_workload_from_config_errors_and_overrides(tmp_path: Path) -> None:
    with pytest.raises(WorkloadError, match=r"workload\.path: trace file .* does not exist"):
        workload_from_config(WorkloadConfig(format="conserve", path=tmp_path / "missing.csv"))
    convs = workload_from_config(WorkloadConfig(conversations=50, tool_gap_s=3.0, max_turns=2))
    assert len(convs) == 50 and all(len(c.turns) <= 2 for c in convs)
    assert all(t.tool_gap_s == 3.0 for c in convs for t in c.turns[1:])


def test_real_trace(shared_data: Path) -> None:
    path = shared_data / "conserve" / "trace_profile_summary.csv"
    convs = load_conserve_trace(path)
    assert len(convs) == 2294
    assert sum(len(c.turns) for c in convs) == 22805
    s = workload_stats(convs, rate_per_s=1.634)
    assert 15_000 < s.turn1_input_tokens_p50 < 16_500  # README: turn-1 input ~15.9k tokens (p50)
    assert 60 < s.appended_tokens_per_later_turn_mean < 75  # ~67 appended tokens per later turn
    assert len(load_conserve_trace(path, max_conversations=255, max_turns=5)) == 255
