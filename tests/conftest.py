"""Root test configuration: locations of shared reference data, skip rules for optional services, and a
throwaway PostgreSQL 15 server.

The PostgreSQL server starts once per session (initdb + pg_ctl, < 1 s) when its binaries exist under
/usr/lib/postgresql/15/bin (Debian `apt-get install postgresql`), listens on 127.0.0.1 and a private
socket directory only, and is stopped and deleted at session end. Without the binaries, PostgreSQL tests
skip (or fail when CONSERVE_REQUIRE_POSTGRES=1, as .ci/run sets).

Never `import tests` (the zeus wheel installs a top-level `tests` package into site-packages).
"""

from __future__ import annotations

import itertools
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data beside the checkout; tests that need it skip with a reason when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"reference data not found at {SHARED_DATA} (clone shared/ beside the repository)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


def require_or_skip(env_flag: str, reason: str) -> None:
    """Skip, unless CI demands the capability (env_flag=1), in which case fail loudly."""
    if os.environ.get(env_flag) == "1":
        pytest.fail(f"{reason} (and {env_flag}=1 requires it)")
    pytest.skip(reason)


@pytest.fixture(name="require_or_skip", scope="session")
def _require_or_skip_fixture() -> Callable[[str, str], None]:
    """`require_or_skip` for tests and sub-conftests, which may not `import tests` to reach this module."""
    return require_or_skip


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free just now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(name="free_port", scope="session")
def _free_port_fixture() -> Callable[[], int]:
    """`free_port` for tests and sub-conftests (they cannot import this module)."""
    return free_port


# ---- PostgreSQL ------------------------------------------------------------------------------------------

PG_BIN = Path(os.environ.get("CONSERVE_PG_BIN", "/usr/lib/postgresql/15/bin"))
_db_counter = itertools.count()


def _as_postgres(cmd: list[str]) -> list[str]:
    # initdb refuses to run as root; run the server binaries as the 'postgres' system user then.
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def _stop_orphans() -> None:
    """Stop servers left by a test session that was killed (SIGTERM/SIGKILL skip fixture teardown)."""
    for owner in Path(tempfile.gettempdir()).glob("conserve-pg-*/owner.pid"):
        try:
            pid = int(owner.read_text())
            os.kill(pid, 0)
            continue  # its session is still running
        except ProcessLookupError:
            pass
        except (ValueError, OSError):
            continue
        root = owner.parent
        subprocess.run(
            _as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(root / "data"), "-m", "immediate", "-w", "stop"]),
            capture_output=True,
            timeout=60,
        )
        shutil.rmtree(root, ignore_errors=True)


class _PgServer:
    def __init__(self, port: int) -> None:
        _stop_orphans()
        self.root = Path(tempfile.mkdtemp(prefix="conserve-pg-"))
        (self.root / "owner.pid").write_text(str(os.getpid()))
        self.data = self.root / "data"
        self.sock = self.root / "sock"
        self.sock.mkdir()
        self.port = port
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres")
            shutil.chown(self.sock, "postgres")
        run = {"check": True, "capture_output": True, "timeout": 120}
        subprocess.run(
            _as_postgres(
                [str(PG_BIN / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync"]
            ),
            **run,
        )
        opts = f"-p {self.port} -k {self.sock} -c listen_addresses=127.0.0.1 -c fsync=off"
        subprocess.run(
            _as_postgres(
                [
                    str(PG_BIN / "pg_ctl"),
                    "-D",
                    str(self.data),
                    "-o",
                    opts,
                    "-l",
                    str(self.root / "log"),
                    "-w",
                    "start",
                ]
            ),
            **run,
        )

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        import psycopg

        name = f"ledger_{os.getpid()}_{next(_db_counter)}"
        with psycopg.connect(
            f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres", autocommit=True
        ) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        subprocess.run(
            _as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop"]),
            capture_output=True,
            timeout=60,
        )
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_server(
    require_or_skip: Callable[[str, str], None], free_port: Callable[[], int]
) -> Iterator[_PgServer]:
    if not (PG_BIN / "initdb").exists():
        require_or_skip(
            "CONSERVE_REQUIRE_POSTGRES",
            f"PostgreSQL 15 binaries not found in {PG_BIN} (apt-get install postgresql)",
        )
    server = _PgServer(free_port())
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def pg_url(pg_server: _PgServer) -> str:
    """A fresh, empty PostgreSQL database for one test."""
    return pg_server.create_database()
