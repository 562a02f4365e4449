"""Issue 23, "A user's first hour": what a new user and a user of the authors' code tripped over.

Each test names the item of the issue it keeps fixed. Tiny runs train the random-weight
``configs/vico-tiny.yaml`` or the shipped miniature base for a couple of steps.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    names |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    return names


# ------------------------------------------------------------------ item 7: layers
def test_util_imports_nothing_from_the_model_layer():
    """ldm/util.py is the bottom layer: base checkpoint reading (diffusers folders included) is
    ldm/models/base_checkpoint.py's, and importing ldm.util loads no ldm.models module."""
    assert not [m for m in _imported_modules(ROOT / "ldm" / "util.py") if m.startswith("ldm.models")]
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, ldm.util; print([m for m in sys.modules if m.startswith('ldm.models')])"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    assert loaded == "[]"
