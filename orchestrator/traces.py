"""Agentic traces read into conversations: the paper's ConServe CSV and Mooncake JSONL.

Pure apart from reading the trace file given; a bad row is named (file, line, field) with how to fix it.
Must not import fastapi, sqlalchemy or httpx.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from orchestrator.errors import WorkloadError
from orchestrator.workload_spec import ConversationSpec, TurnSpec

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
