"""Run registry: which runs are served, safe name -> directory resolution, and bounded caches.

A run is a directory holding ``decoded_tokens.npy``. Names are paths relative to the served root with
'/' separators (a single served run is named after its directory). Names never leave the root: no
absolute paths, no '..' or dot components, and the resolved path (symlinks followed) must stay inside.
"""
from __future__ import annotations

import os
import threading
import weakref
from collections import OrderedDict
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import numpy as np

from smolattn.errors import UserError
from smolattn.store import Layer, Run

RUN_MARKER = "decoded_tokens.npy"
MAX_OPEN_RUNS = 32


class TextRows(NamedTuple):
    positions: np.ndarray     # token position of each cached row
    row: dict                 # position -> cached row
    keep: np.ndarray | None   # stored rows kept in the cache (None: all of them)


@lru_cache(maxsize=MAX_OPEN_RUNS)
def text_rows(run: Run) -> TextRows:
    """The stored rows the viewer uses: every query outside the image block. Reference-format runs store
    a row for every position; dropping the image tokens' rows makes their cached layers several times smaller."""
    first, last = run.geometry.image_block
    q = run.query_positions
    keep = np.flatnonzero((q < first) | (q > last))
    positions = q[keep]
    return TextRows(positions, {int(p): r for r, p in enumerate(positions)}, None if len(keep) == len(q) else keep)


class NotFound(LookupError):
    """An unknown run, token or layer (HTTP 404)."""


def disk_identity(path: Path) -> tuple:
    """What changes when a run is rewritten on disk: the inode of its directory (a replaced run is a
    new directory) and the inode, mtime and size of its meta.json (or token file, reference format)."""
    meta = path / "meta.json"
    d, m = path.stat(), (meta if meta.exists() else path / RUN_MARKER).stat()
    return d.st_ino, m.st_ino, m.st_mtime_ns, m.st_size


class LRU:
    """Thread-safe LRU bounded by the total ``size(value)``; each key is loaded at most once at a time."""

    def __init__(self, capacity: float, size=lambda value: 1):
        self.capacity, self._size = capacity, size
        self._items: OrderedDict = OrderedDict()
        self._loading: dict = {}
        self._lock = threading.Lock()
        self.total = 0

    def get(self, key, load):
        while True:
            with self._lock:
                if key in self._items:
                    self._items.move_to_end(key)
                    return self._items[key]
                pending = self._loading.get(key)
                if pending is None:
                    pending = self._loading[key] = threading.Event()
                    break
            pending.wait()  # another thread is loading it; look again (it may have failed)
        try:
            value = load()
            with self._lock:
                self._items[key] = value
                self.total += self._size(value)
                while self.total > self.capacity and self._items:
                    self.total -= self._size(self._items.popitem(last=False)[1])
            return value
        finally:
            with self._lock:
                del self._loading[key]
            pending.set()

    def __len__(self) -> int:
        return len(self._items)


class Registry:
    """The runs under ``root`` (``single``: root is itself the one run) and their caches."""

    def __init__(self, root, single: bool, allow_pickle: bool = False, cache_bytes: float = 512e6):
        self.root = Path(root).resolve()
        self.single, self.allow_pickle = single, allow_pickle
        if not self.root.is_dir():
            raise UserError(f"not a directory: {root}")
        self.single_name = self.root.name or "run"
        self.runs = LRU(MAX_OPEN_RUNS)
        self.layers = LRU(cache_bytes, size=lambda layer: layer.nbytes)
        self._summaries: dict = {}
        self._ids = weakref.WeakKeyDictionary()   # Run -> (name, disk identity) it was read as

    # -- discovery ------------------------------------------------------------------------------
    def names(self) -> list[str]:
        """Every run name, sorted. Skips dot directories (temporary and hidden ones) and symlinks."""
        if self.single:
            return [self.single_name]
        found = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            if RUN_MARKER in filenames:
                found.append(Path(dirpath).relative_to(self.root).as_posix())
                dirnames.clear()  # a run's own folders hold no runs
            else:
                dirnames[:] = [d for d in dirnames if not d.startswith(".") and d != "__pycache__"]
        return sorted(found)

    def path(self, name: str) -> Path:
        """The directory of run ``name``; NotFound unless it is a run inside the root."""
        if self.single:
            if name != self.single_name:
                raise NotFound(f"unknown run {name!r}; this server shows only {self.single_name!r}")
            return self.root
        parts = name.split("/")
        if not name or "\\" in name or "\0" in name or any(p.startswith(".") or not p for p in parts):
            raise NotFound(f"unknown run {name!r}")
        path = (self.root / name).resolve()
        if not path.is_relative_to(self.root) or not (path / RUN_MARKER).is_file():
            raise NotFound(f"unknown run {name!r}")
        return path

    def inside(self, path: Path) -> bool:
        return path.resolve().is_relative_to(self.root)

    # -- cached access ------------------------------------------------------------------------
    def _identity(self, name: str, path: Path) -> tuple:
        try:
            return disk_identity(path)
        except OSError:      # replaced or removed between two looks
            raise NotFound(f"run {name!r} is being rewritten on disk; try again") from None

    def run(self, name: str) -> Run:
        """The run, read again whenever it changed on disk (caches are keyed by its disk identity, so
        old and new data never mix)."""
        path = self.path(name)
        key = (name, self._identity(name, path))
        run = self.runs.get(key, lambda: Run(path, allow_pickle=self.allow_pickle))
        self._ids[run] = key
        return run

    def layer(self, name: str, run: Run, i: int) -> Layer:
        """Layer ``i`` restricted to the rows of ``text_rows(run)`` (cached)."""
        if not 0 <= i < run.num_layers:
            raise NotFound(f"unknown layer {i}: the run has layers 0..{run.num_layers - 1}")

        def same():
            if (name, self._identity(name, run.path)) != self._ids.get(run):   # rewritten since it was read
                raise NotFound(f"run {name!r} changed on disk since it was read; reload it")

        def load():
            same()
            layer, keep = run.layer(i), text_rows(run).keep
            same()
            return layer if keep is None else Layer(layer.image[:, keep], layer.text[:, keep])
        return self.layers.get((self._ids.get(run, name), i), load)

    def summary(self, name: str) -> dict:
        """Picker entry for a run (kept for every run seen: a few hundred bytes each; read again when
        the run changed on disk)."""
        try:
            key = (name, self._identity(name, self.path(name)))
            if key not in self._summaries:
                run = self.run(name)
                g = run.geometry
                self._summaries[key] = {"name": name, "standin": run.standin, "image_size": list(run.image_size()),
                                        "grid": [g.rows, g.cols], "model": run.meta.get("model", {}).get("id")}
        except (UserError, NotFound) as e:
            return {"name": name, "error": str(e)}
        return self._summaries[key]
