"""The batch manifests of an output root (``manifest.jsonl``, ``manifest.shard-I-of-N.jsonl``): their names
and the reader that gives the latest row per image. Light (no torch, no engine): the viewer lists a
batch's runs with it; smolattn.batch writes the rows."""
from __future__ import annotations

import re
from pathlib import Path

from . import jsonl

MANIFEST_NAME = re.compile(r"^manifest(\.shard-\d+-of-\d+)?\.jsonl$")


def manifest_path(root: Path, shards: int, index: int) -> Path:
    return root / ("manifest.jsonl" if shards == 1 else f"manifest.shard-{index}-of-{shards}.jsonl")


def _check_row(row) -> str | None:
    ok = isinstance(row.get("image"), str) and row.get("status") in ("ok", "error")
    return None if ok else "not a manifest row (needs image and status)"


def manifests(root: Path) -> list[Path]:
    """The batch's own manifests in ``root`` (exactly the names :func:`manifest_path` gives; a user's
    ``manifest_notes.jsonl`` is neither read nor, with --overwrite, deleted)."""
    return sorted(p for p in root.glob("manifest*.jsonl") if MANIFEST_NAME.match(p.name))


def read_manifests(root: Path) -> dict[str, dict]:
    """The latest row per image over every manifest*.jsonl (smolattn.jsonl: a torn last line is
    ignored with a note, any other bad line is refused with path:line)."""
    latest = {}
    for path in manifests(root):
        for row in jsonl.read(path, _check_row):
            key = row["image"]
            if key not in latest or row.get("finished_at", "") >= latest[key].get("finished_at", ""):
                latest[key] = row
    return latest
