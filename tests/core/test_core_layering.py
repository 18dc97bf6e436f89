"""The driver core sits below both drivers: it imports only placement/ (the policy contract), its own
modules and the standard library -- never a driver (router, simulator, engines), the API, the ledger or a
framework."""

from __future__ import annotations

import ast
from pathlib import Path

import orchestrator.core

CORE = Path(orchestrator.core.__file__).parent
ALLOWED = (
    "orchestrator.core",
    "placement.base",
    "placement.power",  # the power controller's contract (PowerView in, PowerDecision out), as placement.base
    "placement.errors",  # is the placement policy's; the core's power view raises its PlacementError
    "__future__",
    "collections",
    "dataclasses",
    "enum",
    "typing",
)


def test_the_core_imports_nothing_above_it() -> None:
    found: dict[str, set[str]] = {}
    for path in sorted(CORE.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            bad = {n for n in names if not n.startswith(ALLOWED)}
            if bad:
                found.setdefault(path.name, set()).update(bad)
    assert found == {}
    assert len(list(CORE.glob("*.py"))) >= 6  # the check saw the package
