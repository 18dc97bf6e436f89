"""`orchestrator keys create/list/revoke` and `serve --auth` (issue 13 item 1), as a user runs them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from energy.api_keys import KeyStore
from energy.errors import EnergyError
from orchestrator.cli import app

runner = CliRunner()


def test_create_shows_the_key_once_list_never_and_revoke_refuses_it(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'ledger.db'}"
    out = runner.invoke(app, ["keys", "create", "--tenant", "acme", "--db", db, "--json"])
    assert out.exit_code == 0, out.output
    made = json.loads(out.output)
    assert made["tenant"] == "acme" and made["admin"] is False and made["key"].startswith("cs_")
    admin = runner.invoke(app, ["keys", "create", "--tenant", "ops", "--admin", "--db", db, "--json"])
    assert json.loads(admin.output)["admin"] is True
    listed = runner.invoke(app, ["keys", "list", "--db", db, "--json"])
    assert listed.exit_code == 0 and made["key"] not in listed.output
    rows = {r["key_id"]: r for r in json.loads(listed.output)}
    assert rows[made["key_id"]]["revoked_at"] is None and len(rows) == 2
    store = KeyStore.open(db)
    assert store.check(made["key"]) is not None
    assert runner.invoke(app, ["keys", "revoke", made["key_id"], "--db", db]).exit_code == 0
    assert store.check(made["key"]) is None
    store.close()
    listed = json.loads(runner.invoke(app, ["keys", "list", "--db", db, "--json"]).output)
    assert next(r for r in listed if r["key_id"] == made["key_id"])["revoked_at"] is not None


def test_bad_input_is_one_line_and_exit_1(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'ledger.db'}"
    bad = runner.invoke(app, ["keys", "create", "--tenant", "a/b", "--db", db])
    assert bad.exit_code == 1 and "tenant 'a/b'" in bad.output and "Traceback" not in bad.output
    gone = runner.invoke(app, ["keys", "revoke", "0123456789abcdef", "--db", db])
    assert gone.exit_code == 1 and "keys list" in gone.output


def test_a_store_in_a_with_block_disposes_its_pool_when_the_block_raises(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'ledger.db'}"
    with pytest.raises(EnergyError, match="keys list"), KeyStore.open(db) as store:
        used = store._engine.pool
        store.revoke("0123456789abcdef")
    assert store._engine.pool is not used  # Engine.dispose() replaced the pool the block used


def _serve(repo_root: Path, tmp_path: Path, port: int, *extra: str) -> tuple[subprocess.Popen[bytes], Path]:
    log = tmp_path / f"serve-{port}.log"
    argv = [sys.executable, "-c", "from orchestrator.cli import main; main()", "serve",
            "--fleet", str(repo_root / "examples" / "fleet.yaml"), "--port", str(port),
            "--db", f"sqlite:///{tmp_path / 'ledger.db'}", "--sim-speedup", "50",
            "--log-level", "warning", "--ledger-writer", "thread", *extra]  # fmt: skip
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc, log
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.3)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


def test_serve_says_whether_keys_are_required(
    repo_root: Path, tmp_path: Path, free_port: Callable[[], int]
) -> None:
    port = free_port()
    proc, log = _serve(repo_root, tmp_path, port, "--auth", "off")
    try:
        assert "auth off" in log.read_text()
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models").status_code == 200
    finally:
        _stop(proc)
    port = free_port()
    proc, log = _serve(repo_root, tmp_path, port, "--auth", "on")
    try:
        assert "auth on" in log.read_text()
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models").status_code == 401
        key = json.loads(
            runner.invoke(
                app,
                ["keys", "create", "--tenant", "t1", "--db", f"sqlite:///{tmp_path / 'ledger.db'}", "--json"],
            ).output
        )["key"]
        r = httpx.get(f"http://127.0.0.1:{port}/v1/models", headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 200
    finally:
        _stop(proc)
