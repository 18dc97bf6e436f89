"""File helpers shared by tiers and the layers above it (orchestrator): atomic text writes.

Standard library only; must not import fastapi, sqlalchemy or httpx -- nor orchestrator, energy or api.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` atomically: a temp file in the same directory, fsync, then rename over `path`.

    The directory must exist. On any error the temp file is removed and `path` keeps its old content."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
