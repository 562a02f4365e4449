"""Reader for the state-dict manifests in tests/data (``key\\tshape\\tdtype_note`` TSV)."""

import json
from pathlib import Path

HEADER = ["key", "shape", "dtype_note"]


def read_manifest(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Return ``{key: shape}`` from a manifest TSV.

    Lines starting with ``#`` are comments (they may appear anywhere); the first other
    line must be the header; the shape column is a JSON list.
    """
    rows = [line for line in Path(path).read_text().splitlines() if line.strip() and not line.startswith("#")]
    if not rows or rows[0].split("\t") != HEADER:
        raise ValueError(f"{path}: expected header {HEADER!r}, got {rows[:1]!r}")
    manifest: dict[str, tuple[int, ...]] = {}
    for line in rows[1:]:
        key, shape, _note = line.split("\t")
        if key in manifest:
            raise ValueError(f"{path}: duplicate key {key!r}")
        manifest[key] = tuple(json.loads(shape))
    return manifest
