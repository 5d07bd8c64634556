"""Run registry: which runs are served, safe name -> directory resolution, and bounded caches.

A run is a directory holding ``decoded_tokens.npy``. Names are paths relative to the served root with
'/' separators (a single served run is named after its directory). Names never leave the root: no
absolute paths, no '..' or dot components, and the resolved path (symlinks followed) must stay inside.
"""
from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import numpy as np

from smolattn.errors import UserError
from smolattn import summary
from smolattn.store import Layer, Run

from .index import RUN_MARKER, Index

MAX_OPEN_RUNS = 32
LAYER_SHARE = 0.85   # of the cache bytes; the rest holds summaries


class TextRows(NamedTuple):
    positions: np.ndarray     # token position of each cached row
    row: dict                 # position -> cached row
    keep: np.ndarray | None   # stored rows kept in the cache (None: all of them)


@lru_cache(maxsize=MAX_OPEN_RUNS)
def text_rows(run: Run) -> TextRows:
    """The stored rows the viewer uses: every query outside the image block (summary.kept_rows; the
    summary's rows). Reference-format runs store a row for every position; dropping the image tokens'
    rows makes their cached layers several times smaller."""
    positions, keep = summary.kept_rows(run)
    return TextRows(positions, {int(p): r for r, p in enumerate(positions)}, keep)


class NotFound(LookupError):
    """An unknown run, token or layer (HTTP 404)."""


class LRU:
    """Thread-safe LRU bounded by the total ``size(value)``; each key is loaded at most once at a time."""

    def __init__(self, capacity: float, size=lambda value: 1):
        self.capacity, self._size = capacity, size
        self._items: OrderedDict = OrderedDict()
        self._loading: dict = {}
        self._lock = threading.Lock()
        self.total = self.hits = self.misses = 0

    def get(self, key, load):
        while True:
            with self._lock:
                if key in self._items:
                    self._items.move_to_end(key)
                    self.hits += 1
                    return self._items[key]
                pending = self._loading.get(key)
                if pending is None:
                    pending = self._loading[key] = threading.Event()
                    self.misses += 1
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

    def stats(self) -> dict:
        with self._lock:
            return {"entries": len(self._items), "size": self.total, "capacity": self.capacity,
                    "hits": self.hits, "misses": self.misses}


class Registry:
    """The runs under ``root`` (``single``: root is itself the one run), their index and caches.

    Memory is bounded whatever is browsed: at most MAX_OPEN_RUNS runs open (tokens and meta), and
    layers and summaries in LRUs bounded by bytes (``cache_bytes`` in all, LAYER_SHARE of it for
    layers). Summaries missing from a run are computed once and cached under ``cache_dir``.
    """

    def __init__(self, root, single: bool, allow_pickle: bool = False, cache_bytes: float = 512e6,
                 cache_dir=None):
        self.root = Path(root).resolve()
        self.single, self.allow_pickle = single, allow_pickle
        if not self.root.is_dir():
            raise UserError(f"not a directory: {root}")
        self.single_name = self.root.name or "run"
        self.cache_dir = Path(cache_dir) if cache_dir else summary.default_cache_dir()
        self.runs = LRU(MAX_OPEN_RUNS)
        self.layers = LRU(cache_bytes * LAYER_SHARE, size=lambda layer: layer.nbytes)
        self.summaries = LRU(cache_bytes * (1 - LAYER_SHARE), size=lambda s: s.nbytes)
        self.index = Index(self.root, self.single_name if single else None, cache_dir=self.cache_dir)
        self._ids = weakref.WeakKeyDictionary()   # Run -> (name, disk identity) it was read as

    # -- discovery ------------------------------------------------------------------------------
    def names(self) -> list[str]:
        """Every run name in the index, sorted."""
        return self.index.names()

    def path(self, name: str) -> Path:
        """The directory of run ``name``; NotFound unless it is a run inside the root (serving one
        run: that run, or its base run when it is an intervened run's sibling)."""
        if self.single:
            if name != self.single_name:
                from .interventions import related_run
                path = related_run(self, name)
                if path is None:
                    raise NotFound(f"unknown run {name!r}; this server shows only {self.single_name!r}")
                return path
            return self.root
        path = self.folder(name)
        if not (path / RUN_MARKER).is_file():
            raise NotFound(f"unknown run {name!r}")
        return path

    def folder(self, name: str, what: str = "run") -> Path:
        """The resolved directory ``name`` names inside the root (a runs root); NotFound for a name
        that is absolute, has '..' or dot components, or resolves outside the root."""
        parts = name.split("/")
        if not name or "\\" in name or "\0" in name or any(p.startswith(".") or not p for p in parts):
            raise NotFound(f"unknown {what} {name!r}")
        path = (self.root / name).resolve()
        if not path.is_relative_to(self.root):
            raise NotFound(f"unknown {what} {name!r}")
        return path

    def inside(self, path: Path) -> bool:
        """Whether a file is inside what is served: the root (serving one run: also its base run)."""
        path = path.resolve()
        if path.is_relative_to(self.root):
            return True
        if self.single:
            from .interventions import sibling_base
            base = sibling_base(self)
            return base is not None and path.is_relative_to(base)
        return False

    # -- cached access ------------------------------------------------------------------------
    def run(self, name: str) -> Run:
        """The run, read again whenever it changed on disk (caches are keyed by its disk identity, so
        old and new data never mix)."""
        path = self.path(name)
        key = (name, summary.identity(path))    # a rewritten run is a new directory, new meta.json
        run = self.runs.get(key, lambda: Run(path, allow_pickle=self.allow_pickle))
        self._ids[run] = key
        return run

    def layer(self, name: str, run: Run, i: int) -> Layer:
        """Layer ``i`` restricted to the rows of ``text_rows(run)`` (cached)."""
        if not 0 <= i < run.num_layers:
            raise NotFound(f"unknown layer {i}: the run has layers 0..{run.num_layers - 1}")

        def same():
            if (name, summary.identity(run.path)) != self._ids.get(run):   # rewritten since it was read
                raise NotFound(f"run {name!r} changed on disk since it was read; reload it")

        def load():
            same()
            layer, keep = run.layer(i), text_rows(run).keep
            same()
            return layer if keep is None else Layer(layer.image[:, keep], layer.text[:, keep])
        return self.layers.get((self._ids.get(run, name), i), load)

    def summary(self, name: str, run: Run) -> summary.Summary:
        """The run's summary (its summary.npz, or computed once and cached under cache_dir)."""
        return self.summaries.get(self._ids.get(run, name), lambda: summary.cached(
            run, self.cache_dir, lambda i: self.layer(name, run, i)))

    def health(self) -> dict:
        return {"layers": self.layers.stats(), "summaries": self.summaries.stats(), "runs": self.runs.stats(),
                "index": self.index.stats(), "cache_bytes": self.layers.capacity + self.summaries.capacity}
