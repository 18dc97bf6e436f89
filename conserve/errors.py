"""The base of the project's error hierarchy.

Every error a user can cause derives from :class:`ConServeError`; each capability has its own subclass in its
own package (``tiers.errors``, ``placement.errors``, ``energy.errors``, ``orchestrator.errors``). Messages say
what was wrong and how to fix it ("To fix: ..."). The CLI prints ``str(err)`` on one line and exits 1; the API
maps these to 4xx JSON bodies. The base lives here, below every layer, so every package can raise its errors
without import cycles.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class ConServeError(Exception):
    """Base of every error a user can cause or fix."""


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """Return ' Did you mean X?' for the closest choice, or '' when nothing is close."""
    match = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    if not match:
        match = [c for c in choices if name.lower() in c.lower() or c.lower() in name.lower()][:1]
    return f" Did you mean {match[0]!r}?" if match else ""
