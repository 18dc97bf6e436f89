"""Root test configuration: locations of shared reference data and skip rules for optional services.

Never `import tests` (the zeus wheel installs a top-level `tests` package into site-packages).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
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
