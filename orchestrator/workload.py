"""Agentic workloads: conversations of turns, from traces or a synthetic generator.

THIS IS THE CONTRACT the planner and the simulator code against (the dataclasses and function names below).
A conversation's turn k input is the previous turn's input + the previous turn's output + the tokens appended
this turn (the paper's trace satisfies total_input[k] = total_input[k-1] + out[k-1] + appended[k]).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from orchestrator.config import SyntheticWorkload, WorkloadConfig
from orchestrator.errors import WorkloadError


@dataclass(frozen=True, slots=True)
class TurnSpec:
    appended_tokens: int  # new input tokens this turn (turn 1: the whole first prompt)
    output_tokens: int  # tokens decoded this turn
    tool_gap_s: float = 0.0  # gap between the end of the previous turn and this turn's arrival (0 for turn 1)


@dataclass(frozen=True, slots=True)
class ConversationSpec:
    conversation_id: str
    arrival_s: float  # arrival of turn 1, seconds from the start of the run
    turns: tuple[TurnSpec, ...]

    def input_tokens(self, turn: int) -> int:
        """Whole prompt of 1-based `turn`: history (inputs and outputs so far) + appended tokens."""
        total = 0
        for k, t in enumerate(self.turns[:turn], start=1):
            total += t.appended_tokens
            if k < turn:
                total += t.output_tokens
        return total

    @property
    def total_tokens(self) -> int:
        """Prompt + output tokens of every turn (the paper's tokens/J numerator)."""
        return sum(self.input_tokens(k) + t.output_tokens for k, t in enumerate(self.turns, start=1))


# =====================================================================================================
# Loaders, generators and statistics (planning helper). Pure apart from reading the trace file given.
# Must not import fastapi, sqlalchemy or httpx.
# =====================================================================================================

_CONSERVE_COLUMNS = ("conv_id", "iter_id", "appended_input", "total_input", "out_token_size", "carried_over")
_MAX_REPORTED = 5  # bad rows quoted in one error message


def _open_trace(path: str | Path, what: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise WorkloadError(
            f"{what} trace {str(p)!r} does not exist. To fix: check workload.path (relative paths resolve "
            "against the fleet file's directory)."
        )
    return p


def _int_field(row: dict[str, str], name: str, where: str) -> int:
    raw = row.get(name)
    if raw is None or raw == "":
        raise WorkloadError(f"{where}: column {name!r} is empty. To fix: give a non-negative integer.")
    try:
        f = float(raw)
        if not f.is_integer():
            raise ValueError(raw)
        value = int(f)
    except ValueError:
        raise WorkloadError(
            f"{where}: column {name!r} is {raw!r}, not an integer. To fix: correct the row."
        ) from None
    if value < 0:
        raise WorkloadError(f"{where}: column {name!r} is negative ({value}). To fix: token counts are >= 0.")
    return value


def load_conserve_trace(
    path: str | Path, max_conversations: int | None = None, max_turns: int | None = None
) -> list[ConversationSpec]:
    """Read the ConServe paper's trace CSV (trace_profile_summary.csv), streaming, into conversations.

    Columns: conv_id, iter_id (0-based turn), appended_input, total_input, out_token_size, carried_over.
    Rows of one conversation must be contiguous with iter_id 0, 1, 2, ... Every later row must satisfy
    total_input[k] == total_input[k-1] + out_token_size[k-1] + appended_input[k] (and turn 0:
    total_input == appended_input); violations raise WorkloadError listing file:line of the first rows.
    Arrivals are all 0 and tool gaps 0 (the trace has no timing): use poisson_arrivals() for arrivals.
    Stops reading once `max_conversations` conversations are complete; `max_turns` truncates each one.
    """
    p = _open_trace(path, "conserve")
    convs: list[ConversationSpec] = []
    violations: list[str] = []
    seen: set[str] = set()
    cur_id: str | None = None
    cur_turns: list[TurnSpec] = []
    prev_total = prev_out = 0

    def flush() -> None:
        if cur_id is not None:
            turns = cur_turns[:max_turns] if max_turns else cur_turns
            convs.append(ConversationSpec(conversation_id=cur_id, arrival_s=0.0, turns=tuple(turns)))

    with p.open(newline="") as fh:
        reader = csv.DictReader(fh)
        header = reader.fieldnames or []
        missing = [c for c in _CONSERVE_COLUMNS if c not in header]
        if missing:
            raise WorkloadError(
                f"{p}:1: header lacks columns {missing} (found {header}). To fix: the conserve format needs "
                f"{', '.join(_CONSERVE_COLUMNS)}."
            )
        for row in reader:
            line = reader.line_num
            where = f"{p}:{line}"
            conv_id = (row.get("conv_id") or "").strip()
            if not conv_id:
                raise WorkloadError(f"{where}: conv_id is empty. To fix: every row needs a conversation id.")
            it = _int_field(row, "iter_id", where)
            appended = _int_field(row, "appended_input", where)
            total = _int_field(row, "total_input", where)
            out = _int_field(row, "out_token_size", where)
            if conv_id != cur_id:
                if max_conversations is not None and len(convs) + (cur_id is not None) >= max_conversations:
                    break
                if conv_id in seen:
                    raise WorkloadError(
                        f"{where}: conversation {conv_id!r} reappears after other conversations. "
                        "To fix: keep each conversation's rows together, ordered by iter_id."
                    )
                flush()
                seen.add(conv_id)
                cur_id, cur_turns = conv_id, []
                if it != 0:
                    raise WorkloadError(
                        f"{where}: conversation {conv_id!r} starts at iter_id {it}, expected 0. "
                        "To fix: iter_id is the 0-based turn index."
                    )
                if total != appended and len(violations) < _MAX_REPORTED:
                    violations.append(f"line {line}: turn 0 total_input {total} != appended_input {appended}")
            else:
                if it != len(cur_turns):
                    raise WorkloadError(
                        f"{where}: conversation {conv_id!r} iter_id {it} follows {len(cur_turns) - 1}, "
                        f"expected {len(cur_turns)}. To fix: a conversation's rows must be consecutive turns."
                    )
                expected = prev_total + prev_out + appended
                if total != expected and len(violations) < _MAX_REPORTED:
                    violations.append(
                        f"line {line}: total_input {total} != previous total_input {prev_total} + previous "
                        f"out_token_size {prev_out} + appended_input {appended} = {expected}"
                    )
            cur_turns.append(TurnSpec(appended_tokens=appended, output_tokens=out))
            prev_total, prev_out = total, out
    if violations:
        raise WorkloadError(
            f"{p}: rows break total_input[k] = total_input[k-1] + out[k-1] + appended[k]: "
            + "; ".join(violations)
            + ". To fix: correct those rows (or regenerate the trace)."
        )
    flush()
    if max_conversations is not None:
        convs = convs[:max_conversations]
    if not convs:
        raise WorkloadError(
            f"{p}: no conversations found. To fix: the file needs data rows after the header."
        )
    return convs


def load_mooncake(
    path: str | Path,
    max_conversations: int | None = None,
    max_turns: int | None = None,
    block_tokens: int = 512,
) -> list[ConversationSpec]:
    """Read a Mooncake JSONL trace (one request per line), streaming, and regroup requests into conversations.

    Fields: ``timestamp`` (ms from the trace start), ``input_length``, ``output_length`` (tokens) and
    ``hash_ids`` (ids of the prompt's `block_tokens`-token blocks; equal ids = equal content).

    Grouping rule (a heuristic: the trace has no conversation ids): request r continues conversation c when
    r's hash_ids start with all of the hash_ids of c's latest request (all but the last one, when that
    request's last block was partial: its content changes once the next turn appends to it), and that
    matched prefix contains at least one block that c introduced and no other conversation has used
    (c's *private* prefix; a shared system prompt alone does not join two conversations). Among several
    candidates the longest match wins. r's input_length must exceed the earlier request's (the history grows).
    Otherwise r starts a new conversation. (A conversation whose only private block was a partial last block
    cannot be followed: its next turn rewrites that block.)

    Derived turns: appended_tokens = input_length - (previous input_length + previous output_length), clamped
    at 0 (the trace's block-level prefix says the history is reused; a negative value means the client
    truncated history); tool_gap_s = (timestamp - previous timestamp) / 1000, i.e. the inter-arrival time,
    which *includes* the previous turn's service time (the trace does not record completion times).
    arrival_s of a conversation = its first request's timestamp / 1000 minus the trace's first timestamp.
    """
    p = _open_trace(path, "mooncake")
    # conversation index -> [first_ts_ms, last_hash_ids, turns, last_in, last_out, last_ts_ms]
    convs: list[list[Any]] = []
    owner: dict[int, int] = {}  # block id -> conversation that introduced it
    shared: set[int] = set()  # blocks used by more than one conversation
    first_ts: float | None = None
    prev_ts: float = float("-inf")

    with p.open() as fh:
        for line_no, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            where = f"{p}:{line_no}"
            try:
                rec = json.loads(raw)
            except json.JSONDecodeError as err:
                raise WorkloadError(
                    f"{where}: not valid JSON ({err.msg}). To fix: one JSON object per line."
                ) from None
            if not isinstance(rec, dict):
                raise WorkloadError(f"{where}: expected a JSON object. To fix: one request object per line.")
            for key in ("timestamp", "input_length", "output_length", "hash_ids"):
                if key not in rec:
                    raise WorkloadError(
                        f"{where}: field {key!r} is missing. To fix: Mooncake rows need timestamp, "
                        "input_length, output_length, hash_ids."
                    )
            ts, in_len, out_len, hashes = (
                rec["timestamp"],
                rec["input_length"],
                rec["output_length"],
                rec["hash_ids"],
            )
            if isinstance(ts, bool) or not isinstance(ts, (int, float)) or ts < 0:
                raise WorkloadError(
                    f"{where}: timestamp {ts!r} is not a number of ms >= 0. To fix: correct it."
                )
            for key, v in (("input_length", in_len), ("output_length", out_len)):
                if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                    raise WorkloadError(f"{where}: {key} {v!r} is not an integer >= 0. To fix: correct it.")
            if not isinstance(hashes, list) or not all(
                isinstance(h, int) and not isinstance(h, bool) for h in hashes
            ):
                raise WorkloadError(f"{where}: hash_ids must be a list of integers. To fix: correct it.")
            if ts < prev_ts:
                raise WorkloadError(
                    f"{where}: timestamp {ts} is earlier than the previous row's {prev_ts}. "
                    "To fix: sort the trace by timestamp."
                )
            prev_ts = ts
            if first_ts is None:
                first_ts = float(ts)

            best, best_len = _continued(hashes, in_len, convs, owner, shared, block_tokens, max_turns)
            if best is not None:
                c = convs[best]
                appended = max(0, in_len - (c[3] + c[4]))
                gap_s = (ts - c[5]) / 1000.0
                c[2].append(TurnSpec(appended_tokens=appended, output_tokens=out_len, tool_gap_s=gap_s))
                c[1], c[3], c[4], c[5] = list(hashes), in_len, out_len, ts
                ci = best
                new_blocks = hashes[best_len:]
            else:
                if max_conversations is not None and len(convs) >= max_conversations:
                    continue  # keep reading: later turns of the conversations we hold may still come
                ci = len(convs)
                convs.append([ts, list(hashes), [TurnSpec(in_len, out_len)], in_len, out_len, ts])
                new_blocks = hashes
            for h in new_blocks:
                o = owner.setdefault(h, ci)
                if o != ci:
                    shared.add(h)
    if not convs:
        raise WorkloadError(f"{p}: no requests found. To fix: the file needs one JSON request per line.")
    t0 = first_ts or 0.0
    return [
        ConversationSpec(conversation_id=f"mc-{i}", arrival_s=(c[0] - t0) / 1000.0, turns=tuple(c[2]))
        for i, c in enumerate(convs)
    ]


def _continued(
    hashes: list[int],
    in_len: int,
    convs: list[list[Any]],
    owner: dict[int, int],
    shared: set[int],
    block_tokens: int,
    max_turns: int | None,
) -> tuple[int | None, int]:
    """(conversation, matched prefix length) a request continues under load_mooncake's rule, or (None, 0).

    Linear in the request's length, whatever the trace's: a continued conversation must own a block of the
    request that no other conversation uses (its private prefix), so only the owners of the request's
    unshared blocks are candidates -- usually one -- and each is tried at its (at most two) continuation
    lengths, longest first. At most one candidate can match a given length: a block private to one
    conversation is, by construction, shared as soon as another conversation's request holds it.
    """
    best: int | None = None
    best_len = 0
    tried: set[int] = set()
    for pos, h in enumerate(hashes):
        ci = owner.get(h)
        if ci is None or ci in tried or h in shared:
            continue
        tried.add(ci)  # pos: the first of ci's private blocks in the request
        c_hashes, c_in = convs[ci][1], convs[ci][3]
        if in_len <= c_in:  # a later turn's prompt holds the earlier one: it grows
            continue
        if max_turns is not None and len(convs[ci][2]) >= max_turns:
            continue
        lengths = [len(c_hashes)]
        if len(c_hashes) >= 2 and c_in % block_tokens:  # a partial last block changes when appended to
            lengths.append(len(c_hashes) - 1)
        for k in lengths:
            if k <= best_len or k > len(hashes) or hashes[k - 1] != c_hashes[k - 1]:
                continue
            if hashes[:k] != c_hashes[:k]:
                continue
            if pos >= k:  # the matched prefix must hold one of ci's private blocks
                continue
            best, best_len = ci, k
            break
    return best, best_len


def synthetic_conversations(params: SyntheticWorkload, n: int, seed: int = 0) -> list[ConversationSpec]:
    """Generate `n` agentic conversations; deterministic for `seed`. Arrivals are 0 (see poisson_arrivals).

    Distributions (parameters are the fields of ``SyntheticWorkload``):
    - turn-1 input tokens: log-normal with median ``turn1_input_tokens_median`` and log-sigma
      ``turn1_input_tokens_sigma`` (sigma 0 gives the median exactly), at least 1;
    - turns per conversation: 1 + Geometric, i.e. P(T = t) = p (1-p)^(t-1) with p = 1 / ``turns_mean``,
      so the mean is ``turns_mean`` (turns_mean 1 gives single-turn conversations);
    - appended tokens of turns 2..n: Poisson with mean ``appended_tokens_mean``;
    - output tokens of every turn: 1 + Geometric with mean ``output_tokens_mean`` (an exponential-like tail,
      as decode lengths of tool-calling agents are);
    - tool gap before turns 2..n: exponential with mean ``tool_gap_s_mean`` (0 gives no gaps).
    """
    if n < 0:
        raise WorkloadError(f"number of conversations must be >= 0, got {n}. To fix: pass a count >= 0.")
    rng = np.random.default_rng(seed)
    mu = math.log(params.turn1_input_tokens_median)
    first = np.maximum(1, np.rint(rng.lognormal(mu, params.turn1_input_tokens_sigma, n))).astype(int)
    n_turns = rng.geometric(1.0 / params.turns_mean, n) if params.turns_mean > 1 else np.ones(n, dtype=int)
    out_p = 1.0 / params.output_tokens_mean
    convs: list[ConversationSpec] = []
    for i in range(n):
        t = int(n_turns[i])
        outs = rng.geometric(out_p, t) if out_p < 1 else np.ones(t, dtype=int)
        appended = rng.poisson(params.appended_tokens_mean, t - 1)
        gaps = (
            rng.exponential(params.tool_gap_s_mean, t - 1) if params.tool_gap_s_mean > 0 else np.zeros(t - 1)
        )
        turns = [TurnSpec(int(first[i]), int(outs[0]))]
        turns += [TurnSpec(int(appended[k]), int(outs[k + 1]), float(gaps[k])) for k in range(t - 1)]
        convs.append(ConversationSpec(conversation_id=f"syn-{i}", arrival_s=0.0, turns=tuple(turns)))
    return convs


def poisson_arrivals(
    convs: Sequence[ConversationSpec], rate_per_s: float, seed: int = 0
) -> list[ConversationSpec]:
    """Give conversations Poisson arrivals (exponential inter-arrival times, mean 1/rate), in list order.

    The first conversation arrives at time 0. Deterministic for `seed`; the input is not modified.
    """
    if not rate_per_s > 0 or not math.isfinite(rate_per_s):
        raise WorkloadError(
            f"arrival rate must be > 0 conversations/s, got {rate_per_s}. To fix: pass a rate > 0."
        )
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1.0 / rate_per_s, len(convs))
    times = np.concatenate(([0.0], np.cumsum(gaps[1:]))) if len(convs) else np.array([])
    return [replace(c, arrival_s=float(t)) for c, t in zip(convs, times, strict=True)]


_DEFAULT_SYNTHETIC_CONVERSATIONS = 1000


def workload_from_config(wcfg: WorkloadConfig) -> list[ConversationSpec]:
    """Build the conversations a fleet file describes (see docs/fleet-yaml.md, section workload).

    conserve and synthetic: Poisson arrivals at ``arrival_rate_per_s`` (seeded by ``seed``).
    mooncake: the trace's own timestamps, unless ``arrival_rate_per_s`` is set explicitly in the file, in
    which case Poisson arrivals at that rate replace them. ``tool_gap_s`` overrides every later turn's gap.
    """
    if wcfg.format in ("conserve", "mooncake"):
        if wcfg.path is None:  # also enforced by the schema
            raise WorkloadError(
                f"workload.path: format {wcfg.format!r} needs a trace path. To fix: set workload.path."
            )
        if not Path(wcfg.path).is_file():
            raise WorkloadError(
                f"workload.path: trace file {str(wcfg.path)!r} does not exist. To fix: correct the path "
                "(relative paths resolve against the fleet file's directory) or use format: synthetic."
            )
    if wcfg.format == "conserve":
        assert wcfg.path is not None
        convs = load_conserve_trace(wcfg.path, wcfg.conversations, wcfg.max_turns)
        convs = poisson_arrivals(convs, wcfg.arrival_rate_per_s, wcfg.seed)
    elif wcfg.format == "mooncake":
        assert wcfg.path is not None
        convs = load_mooncake(wcfg.path, wcfg.conversations, wcfg.max_turns)
        if "arrival_rate_per_s" in wcfg.model_fields_set:
            convs = poisson_arrivals(convs, wcfg.arrival_rate_per_s, wcfg.seed)
    else:
        n = wcfg.conversations or _DEFAULT_SYNTHETIC_CONVERSATIONS
        convs = synthetic_conversations(wcfg.synthetic, n, wcfg.seed)
        if wcfg.max_turns:
            convs = [replace(c, turns=c.turns[: wcfg.max_turns]) for c in convs]
        convs = poisson_arrivals(convs, wcfg.arrival_rate_per_s, wcfg.seed)
    if wcfg.tool_gap_s is not None:
        gap = wcfg.tool_gap_s
        convs = [
            replace(c, turns=(c.turns[0], *(replace(t, tool_gap_s=gap) for t in c.turns[1:]))) for c in convs
        ]
    return convs


@dataclass(frozen=True, slots=True)
class WorkloadStats:
    """What the planner needs to know about a workload (all means are per conversation unless named per turn).

    KV-token-seconds of a conversation on its decoder, for a decode step time t (seconds per output token):
        KVTS(t) = kv_decode_token_steps_mean * t + kv_gap_token_seconds_mean
    where kv_decode_token_steps_mean = E[sum_k out_k * (input_k + out_k / 2)] (context held while decoding
    turn k, growing by one token per step) and
    kv_gap_token_seconds_mean = E[sum_{k>=2} gap_k * (input_{k-1} + out_{k-1})].
    Residence on the decoder: R(t) = decode_tokens_mean * t + tool_gap_s_total_mean (+ tail prefill time).
    """

    conversations: int
    arrival_rate_per_s: float
    turns_total: int
    turns_per_conversation_mean: float
    turn1_input_tokens_mean: float
    turn1_input_tokens_p50: float
    turn1_input_tokens_p95: float
    turn1_input_tokens_quantiles: tuple[int, ...]  # 100 evenly spaced quantiles (for E[S], E[S^2] of prefill)
    appended_tokens_per_later_turn_mean: float
    output_tokens_per_turn_mean: float
    output_tokens_per_later_turn_mean: float
    tool_gap_s_mean: float  # per later turn
    tool_gap_s_total_mean: float  # per conversation
    decode_tokens_mean: float  # sum of output tokens per conversation
    decode_tokens_before_final_mean: (
        float  # outputs of turns 1..n-1 (decoded before the final turn's 1st token)
    )
    tail_prefill_tokens_mean: float  # sum over turns 2..n of (appended_k + out_{k-1}): incremental prefill
    tail_prefill_context_tokens_mean: float  # mean cached context those incremental prefills attend over
    later_turns_mean: float
    kv_decode_token_steps_mean: float
    kv_gap_token_seconds_mean: float
    final_context_tokens_mean: float
    final_context_tokens_p95: float
    final_context_tokens_max: int
    tokens_per_conversation_mean: float  # prompt + output of every turn (the paper's tokens/J numerator)
    turn1_input_tokens_max: int = 0

    def kv_token_seconds(self, step_time_s: float) -> float:
        """Mean KV-token-seconds a conversation holds on its decoder when a decode step takes step_time_s."""
        return self.kv_decode_token_steps_mean * step_time_s + self.kv_gap_token_seconds_mean

    def residence_s(self, step_time_s: float, tail_prefill_s: float = 0.0) -> float:
        """Mean time a conversation stays pinned to its decoder (Little's law: pinned = rate x residence)."""
        return self.decode_tokens_mean * step_time_s + self.tool_gap_s_total_mean + tail_prefill_s

    @property
    def tokens_per_s(self) -> float:
        return self.arrival_rate_per_s * self.tokens_per_conversation_mean


def _quantile(sorted_vals: Sequence[float], q: float) -> float:
    return float(np.quantile(np.asarray(sorted_vals, dtype=float), q)) if sorted_vals else 0.0


def workload_stats(convs: Sequence[ConversationSpec], rate_per_s: float | None = None) -> WorkloadStats:
    """Summarise conversations. rate_per_s None: estimate from arrivals, (n - 1) / (last - first arrival)."""
    if not convs:
        raise WorkloadError(
            "workload has no conversations. To fix: use a trace or set workload.conversations > 0."
        )
    if any(not c.turns for c in convs):
        bad = next(c.conversation_id for c in convs if not c.turns)
        raise WorkloadError(f"conversation {bad!r} has no turns. To fix: drop it from the trace.")
    if rate_per_s is None:
        arrivals = sorted(c.arrival_s for c in convs)
        span = arrivals[-1] - arrivals[0]
        if len(convs) < 2 or span <= 0:
            raise WorkloadError(
                "cannot estimate the arrival rate: all conversations arrive at once. To fix: set "
                "workload.arrival_rate_per_s."
            )
        rate_per_s = (len(convs) - 1) / span
    n = len(convs)
    turn1 = np.array([c.turns[0].appended_tokens for c in convs], dtype=float)
    later_app: list[int] = []
    outs_all: list[int] = []
    outs_later: list[int] = []
    gaps: list[float] = []
    gap_tot = dec_tot = dec_before = tail_tok = tail_ctx_w = kv_steps = kv_gap = tokens = 0.0
    finals: list[int] = []
    turns_total = 0
    for c in convs:
        ctx_in = 0  # input tokens of the current turn
        prev_in = prev_out = 0
        for k, t in enumerate(c.turns, start=1):
            ctx_in = t.appended_tokens if k == 1 else prev_in + prev_out + t.appended_tokens
            outs_all.append(t.output_tokens)
            if k > 1:
                later_app.append(t.appended_tokens)
                outs_later.append(t.output_tokens)
                gaps.append(t.tool_gap_s)
                gap_tot += t.tool_gap_s
                kv_gap += t.tool_gap_s * (prev_in + prev_out)
                new = t.appended_tokens + prev_out
                tail_tok += new
                tail_ctx_w += new * prev_in
            kv_steps += t.output_tokens * (ctx_in + t.output_tokens / 2.0)
            dec_tot += t.output_tokens
            if k < len(c.turns):
                dec_before += t.output_tokens
            tokens += ctx_in + t.output_tokens
            prev_in, prev_out = ctx_in, t.output_tokens
        turns_total += len(c.turns)
        finals.append(prev_in + prev_out)
    fin = np.array(finals, dtype=float)
    qs = np.quantile(turn1, np.linspace(0.005, 0.995, 100))
    return WorkloadStats(
        conversations=n,
        arrival_rate_per_s=float(rate_per_s),
        turns_total=turns_total,
        turns_per_conversation_mean=turns_total / n,
        turn1_input_tokens_mean=float(turn1.mean()),
        turn1_input_tokens_p50=float(np.quantile(turn1, 0.5)),
        turn1_input_tokens_p95=float(np.quantile(turn1, 0.95)),
        turn1_input_tokens_quantiles=tuple(int(round(q)) for q in qs),
        appended_tokens_per_later_turn_mean=float(np.mean(later_app)) if later_app else 0.0,
        output_tokens_per_turn_mean=float(np.mean(outs_all)),
        output_tokens_per_later_turn_mean=float(np.mean(outs_later)) if outs_later else 0.0,
        tool_gap_s_mean=float(np.mean(gaps)) if gaps else 0.0,
        tool_gap_s_total_mean=gap_tot / n,
        decode_tokens_mean=dec_tot / n,
        decode_tokens_before_final_mean=dec_before / n,
        tail_prefill_tokens_mean=tail_tok / n,
        tail_prefill_context_tokens_mean=tail_ctx_w / tail_tok if tail_tok else 0.0,
        later_turns_mean=turns_total / n - 1.0,
        kv_decode_token_steps_mean=kv_steps / n,
        kv_gap_token_seconds_mean=kv_gap / n,
        final_context_tokens_mean=float(fin.mean()),
        final_context_tokens_p95=float(np.quantile(fin, 0.95)),
        final_context_tokens_max=int(fin.max()),
        tokens_per_conversation_mean=tokens / n,
        turn1_input_tokens_max=int(turn1.max()),
    )
