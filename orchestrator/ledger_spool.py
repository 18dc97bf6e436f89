"""The ledger writer's spool: records it had to give up, kept on disk until a ledger takes them.

The writer gives a batch up only in two cases: at shutdown, when the database has been away for as long as
the retry back-off's cap (orchestrator/ledger_worker.py), and when a batch fails with an error that is not a
database error (a bug). Either way the records are not dropped: they are appended to this file, one JSON line
per record (the run they belong to, and the turn as ``turn_to_wire`` encodes it or the pin's fields), flushed
and fsynced before the writer moves on. The next ``serve`` on the same database replays the file into the
ledger before it takes traffic (turns already there are skipped as duplicates) and removes it once every line
is written; a replay that fails leaves the file as it was.

The default file is derived from the ledger's URL (:func:`default_spool_path`), so two servers on two
databases never replay each other's records.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from energy.records import PinRecord, turn_from_wire

log = logging.getLogger("conserve.ledger_writer")

SPOOL_DIR = Path("~/.cache/conserve").expanduser()


def default_spool_path(db_url: str) -> Path:
    """Beside a SQLite ledger file (``<file>.spool.jsonl``); else one file per database URL in the cache."""
    from sqlalchemy.engine import make_url

    url = make_url(db_url)
    db = url.database or ""
    if url.get_backend_name() == "sqlite" and db and db != ":memory:":
        return Path(db + ".spool.jsonl")
    key = hashlib.sha256(url.render_as_string(hide_password=True).encode()).hexdigest()[:16]
    return SPOOL_DIR / f"ledger-spool-{key}.jsonl"


@dataclass(frozen=True, slots=True)
class SpoolReplay:
    """What a replay wrote."""

    turns: int = 0
    pins: int = 0
    duplicates: int = 0  # turns the ledger already had
    runs: tuple[str, ...] = ()


class LedgerSpool:
    """Append-only JSON lines of given-up records (see the module docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def append(self, run: tuple[str, str | None, str], records: Iterable[Any]) -> int:
        """Write ``records`` (turns as wire tuples, PinRecords) of run ``(run_id, policy, kind)``; return how
        many. Flushed and fsynced before it returns."""
        run_id, policy, kind = run
        lines = []
        for r in records:
            if isinstance(r, PinRecord):
                rec = {"pin": [r.conversation_id, r.instance_id, r.at.timestamp(), r.reason]}
            elif type(r) is tuple:
                rec = {"turn": list(r)}
            else:  # an energy job: not a ledger row (its intervals stay unattributed; logged by the writer)
                continue
            lines.append(json.dumps({"run_id": run_id, "policy": policy, "kind": kind, **rec}))
        if not lines:
            return 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
            f.flush()
            os.fsync(f.fileno())
        log.error("ledger: %d records kept in the spool %s; the next serve on this database writes them",
                  len(lines), self.path)  # fmt: skip
        return len(lines)

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        out = []
        with open(self.path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut by a crash mid-write: everything before it is whole
                    log.error("ledger spool %s: line %d is not JSON (cut by a crash?); skipped", self.path, n)
        return out

    def replay(self, db_url: str) -> SpoolReplay:
        """Write every spooled record into the ledger at ``db_url`` (each run with its own run id), then
        remove the file. Raises (and keeps the file) if the database refuses them."""
        from energy.errors import DuplicateTurnError
        from energy.ledger import Ledger
        from energy.records import RunKind

        lines = self.read()
        if not lines:
            return SpoolReplay()
        by_run: dict[tuple[str, str | None, str], list[dict[str, Any]]] = {}
        for rec in lines:
            by_run.setdefault((rec["run_id"], rec.get("policy"), rec["kind"]), []).append(rec)
        turns_n = pins_n = dup = 0
        for (run_id, policy, kind), recs in by_run.items():
            led = Ledger(db_url, run_id=run_id, policy=policy, kind=RunKind(kind))
            try:
                pins = [
                    PinRecord(p[0], p[1], datetime.fromtimestamp(p[2], UTC), p[3])
                    for p in (r["pin"] for r in recs if "pin" in r)
                ]
                turns = [turn_from_wire(tuple(r["turn"])) for r in recs if "turn" in r]
                if pins:
                    led.record_pins(pins)
                    pins_n += len(pins)
                while turns:
                    try:
                        led.record_turns(turns)
                        turns_n += len(turns)
                        turns = []
                    except DuplicateTurnError as err:
                        before = len(turns)
                        turns = [t for t in turns if t.request_id not in err.request_ids]
                        dup += before - len(turns)
                        if len(turns) == before:  # nothing to skip: not a duplicate we can resolve
                            raise
            finally:
                led.close()
        self.path.unlink()
        runs = tuple(sorted(k[0] for k in by_run))
        log.warning("ledger: replayed %d turns and %d pins from the spool %s (%d already written)",
                    turns_n, pins_n, self.path, dup)  # fmt: skip
        return SpoolReplay(turns_n, pins_n, dup, runs)
