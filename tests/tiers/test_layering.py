"""tiers/ is the model layer: it imports nothing from the packages above it (issue 11 item 6)."""

from __future__ import annotations

import ast
from pathlib import Path

import tiers

ABOVE = ("energy", "orchestrator", "placement", "api")


def test_tiers_imports_nothing_above_it() -> None:
    found = []
    for path in sorted(Path(tiers.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):  # also imports inside functions / TYPE_CHECKING
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            found += [f"{path.name}:{node.lineno} {n}" for n in names if n.split(".")[0] in ABOVE]
    assert not found, f"tiers/ imports from a layer above it: {found}"
