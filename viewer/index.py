"""The run index of a runs root: one entry per run, for the picker's search, sort and paging.

Built from the batch manifests where there are any (``manifest*.jsonl``, read with
``smolattn.manifest.read_manifests``: the latest row per image, so error rows are listed too and a batch
of 40,000 images is indexed without touching its run directories), and from one scan of the other
directories (a run is a directory holding ``decoded_tokens.npy``; its meta.json gives the answer and
grid). A directory holding a manifest is a batch root: the scan does not descend into it. The index
is kept in memory and rebuilt when a manifest or a scanned directory changes (checked at most every
``check_every`` seconds, by stat only), and saved under ``cache_dir/index`` so that a restart with
unchanged manifests and directories reads one small file instead of every manifest row (checked by
stat only: the root, its other directories and the manifests; no scan).

The scan finds runs by name and one stat each; when it finds more than ``inline_details`` runs
outside any manifest, their meta.json files (answer, grid, source image) are read in a background
thread after the first answer: until then the index lists them by name, ``complete`` is False and
``pending`` counts the runs still to read (search and sort by answer see what is read so far).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import NamedTuple

from smolattn.manifest import MANIFEST_NAME, read_manifests
from smolattn.errors import UserError

log = logging.getLogger(__name__)

RUN_MARKER = "decoded_tokens.npy"
SORTS = ("name", "answer", "grid", "error")
INLINE_DETAILS = 2000     # runs outside a manifest whose meta.json is read before the index answers
FILL_CHUNK = 1000         # runs read per step of the background reader


class Entry(NamedTuple):
    name: str
    answer: str | None = None
    grid: tuple | None = None      # (rows, cols) of tiles
    error: str | None = None       # the manifest's error for an image that failed
    image: str | None = None       # the source image, relative to the batch's image folder

    def to_json(self) -> dict:
        return {"name": self.name, "answer": self.answer, "grid": list(self.grid) if self.grid else None,
                "error": self.error, "image": self.image}


def _is_manifest(name: str) -> bool:
    return bool(MANIFEST_NAME.match(name))


def _join(prefix: str, name: str) -> str:
    return f"{prefix}/{name}" if prefix else name


def _grid(value):
    try:
        rows, cols = (int(x) for x in value)
        return rows, cols
    except (TypeError, ValueError):
        return None


def run_entry(path, name: str) -> Entry:
    """An entry from a run directory's meta.json (reference-format runs have none: name only)."""
    try:
        with open(os.path.join(path, "meta.json"), "rb") as f:
            meta = json.loads(f.read())
        g = meta.get("geometry") or {}
        return Entry(name, meta.get("answer"), _grid((g.get("rows"), g.get("cols"))), None,
                     (meta.get("image") or {}).get("source"))
    except (OSError, ValueError, AttributeError):
        return Entry(name)


def _hay(e: Entry) -> str:
    return f"{e.name}\n{e.answer or ''}\n{e.image or ''}".lower()


class Index:
    def __init__(self, root: Path, single_name: str | None = None, check_every: float = 2.0, cache_dir=None,
                 inline_details: int | None = None):
        self.root, self.single_name, self.check_every = Path(root), single_name, check_every
        self.cache_dir = cache_dir
        self.inline_details = INLINE_DETAILS if inline_details is None else inline_details
        self._generation = 0      # bumped by every rebuild: a background reader of an older one stops
        self.pending = 0          # scanned runs whose meta.json is not read yet
        self._filling = False     # the background reader runs (until the index it completed is saved)
        self._lock = threading.Lock()
        self._entries: list[Entry] = []
        self._hay: list[str] = []
        self._orders: dict = {}
        self._signature = None
        self._checked = 0.0
        self.builds = 0
        self.build_seconds = 0.0

    # -- building -------------------------------------------------------------------------------
    def _scan(self):
        """(batch roots [(path, prefix)], run directories [(path, name)], signature) by listing the
        directories that are not runs and one stat per subdirectory (is it a run?); the signature: the
        stat of every manifest and of every directory listed (a run added or replaced changes its
        parent's mtime)."""
        batches, runs, signature, stack = [], [], [], [(self.root, "")]
        isfile, join = os.path.isfile, os.path.join
        while stack:
            path, prefix = stack.pop()
            try:
                with os.scandir(path) as it:
                    children = list(it)
                signature.append((str(path), os.stat(path).st_mtime_ns))
                manifests = sorted(c.name for c in children if _is_manifest(c.name))
                for m in manifests:
                    st = os.stat(join(path, m))
                    signature.append((join(path, m), st.st_size, st.st_mtime_ns))
            except OSError:
                continue
            if manifests:
                batches.append((Path(path), prefix))
                continue
            for c in children:
                if c.name.startswith(".") or c.name == "__pycache__" or not c.is_dir(follow_symlinks=False):
                    continue
                if isfile(join(c.path, RUN_MARKER)):
                    runs.append((c.path, _join(prefix, c.name)))
                else:
                    stack.append((c.path, _join(prefix, c.name)))
        return batches, runs, tuple(sorted(signature))

    def _read(self, batches, runs) -> tuple[list[Entry], list]:
        """(entries, pending): entries from the manifests' latest rows and the runs' meta.json, sorted
        by name, unique; beyond ``inline_details`` runs, the runs are listed by name and returned as
        pending [(path, name)] (their meta.json read later, by _fill)."""
        inline = len(runs) <= self.inline_details
        entries = [run_entry(path, name) if inline else Entry(name) for path, name in runs]
        for path, prefix in batches:
            try:
                rows = read_manifests(path).values()
            except (UserError, OSError) as e:   # a damaged manifest: list the batch's run directories instead
                log.warning("%s: %s; listing its run directories instead", path, e)
                entries += [run_entry(d, _join(prefix, d.name)) for d in sorted(path.iterdir())
                            if not d.name.startswith(".") and (d / RUN_MARKER).is_file()]
                continue
            for row in rows:
                if isinstance(row.get("run"), str) and row["run"]:
                    entries.append(Entry(_join(prefix, row["run"]), row.get("answer"), _grid(row.get("grid")),
                                         row.get("error") if row.get("status") != "ok" else None, row.get("image")))
        entries.sort(key=lambda e: e.name)
        entries = [e for k, e in enumerate(entries) if k == 0 or e.name != entries[k - 1].name]
        return entries, ([] if inline else runs)

    def _cache_file(self) -> Path | None:
        if self.cache_dir is None:
            return None
        return Path(self.cache_dir) / "index" / f"{hashlib.sha256(str(self.root).encode()).hexdigest()[:32]}.json"

    def _cached(self):
        """(entries, signature) from the disk cache when every directory and manifest it was made from
        still has the same stat (a restart), else None. Stat only: no scan, no manifest read."""
        path = self._cache_file()
        try:
            cached = json.loads(path.read_text()) if path and path.is_file() else None
            if not cached or cached.get("version") != 1 or cached.get("root") != str(self.root):
                return None
            signature = tuple(tuple(s) for s in cached["signature"])
            if not signature or self._signature_now(signature) != signature:
                return None
            return [Entry(n, a, tuple(g) if g else None, e, i) for n, a, g, e, i in cached["entries"]], signature
        except (OSError, ValueError, TypeError, AttributeError, KeyError):
            return None

    def _save(self, entries, signature) -> None:
        path = self._cache_file()
        if path is None:
            return
        try:   # a cache that cannot be written is only a lost speed-up
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
            tmp.write_text(json.dumps({"version": 1, "root": str(self.root), "signature": signature,
                                       "entries": [list(e) for e in entries]}))
            os.replace(tmp, path)
        except OSError:
            pass

    def _walk(self):
        """(entries, signature, pending runs), from the disk cache when its signature still holds."""
        if self.single_name is not None:
            return [run_entry(self.root, self.single_name)], (), []
        cached = self._cached()
        if cached is not None:
            return (*cached, [])
        batches, runs, signature = self._scan()
        entries, pending = self._read(batches, runs)
        if not pending:
            self._save(entries, signature)
        return entries, signature, pending

    def _fill(self, generation: int, pending: list, signature) -> None:
        """Read the pending runs' meta.json into the index, FILL_CHUNK at a time (searches between the
        steps see what is read so far); then save the index. Stops when the index was rebuilt."""
        where = None
        try:
            for k in range(0, len(pending), FILL_CHUNK):
                chunk = [run_entry(path, name) for path, name in pending[k:k + FILL_CHUNK]]
                with self._lock:
                    if generation != self._generation:
                        return
                    if where is None:
                        where = {e.name: i for i, e in enumerate(self._entries)}
                    for e in chunk:
                        i = where[e.name]
                        self._entries[i], self._hay[i] = e, _hay(e)
                    self._orders = {}
                    self.pending -= len(chunk)
            with self._lock:
                if generation != self._generation:
                    return
                entries = list(self._entries)
            self._save(entries, signature)
        finally:
            with self._lock:
                if generation == self._generation:
                    self._filling = False

    def _signature_now(self, signature=None):
        """The current signature, by stat only (a new manifest or run changes its directory's mtime)."""
        sig = []
        for item in (self._signature if signature is None else signature) or ():
            try:
                st = os.stat(item[0])
            except OSError:
                sig.append((item[0], None) if len(item) == 2 else (item[0], None, None))
                continue
            sig.append((item[0], st.st_mtime_ns) if len(item) == 2 else (item[0], st.st_size, st.st_mtime_ns))
        return tuple(sorted(sig))

    def refresh(self, force: bool = False) -> None:
        with self._lock:
            now = time.monotonic()
            if not force and self._signature is not None and now - self._checked < self.check_every:
                return
            self._checked = now
            if not force and self._signature is not None and self._signature_now() == self._signature:
                return
            t = time.perf_counter()
            entries, signature, pending = self._walk()
            self._entries, self._signature, self._orders = entries, signature, {}
            self._hay = [_hay(e) for e in entries]
            self._generation += 1
            self.pending, self._filling = len(pending), bool(pending)
            self.builds += 1
            self.build_seconds = time.perf_counter() - t
            if pending:
                threading.Thread(target=self._fill, args=(self._generation, pending, signature), daemon=True,
                                 name="index-details").start()

    # -- queries --------------------------------------------------------------------------------
    def _order(self, sort: str) -> list[int]:
        if sort not in self._orders:
            e = self._entries
            key = {
                "name": None,
                "answer": lambda i: (e[i].answer is None, (e[i].answer or "").lower(), e[i].name),
                "grid": lambda i: (e[i].grid is None, (e[i].grid[0] * e[i].grid[1], e[i].grid) if e[i].grid else (),
                                   e[i].name),
                "error": lambda i: (e[i].error is None, e[i].error or "", e[i].name),
            }[sort]
            self._orders[sort] = list(range(len(e))) if key is None else sorted(range(len(e)), key=key)
        return self._orders[sort]

    def query(self, q: str = "", sort: str = "name", desc: bool = False, offset: int = 0, limit: int = 200):
        """(total matches, entries[offset:offset + limit]) for a case-insensitive substring of the name,
        answer or image, in ``sort`` order."""
        self.refresh()
        with self._lock:
            order, hay, entries = self._order(sort), self._hay, self._entries
        if desc:
            order = order[::-1]
        q = q.strip().lower()
        hits = order if not q else [i for i in order if q in hay[i]]
        return len(hits), [entries[i] for i in hits[offset:offset + limit]]

    def names(self) -> list[str]:
        self.refresh()
        return [e.name for e in self._entries]

    def __len__(self) -> int:
        self.refresh()
        return len(self._entries)

    @property
    def complete(self) -> bool:
        """Every entry's details are read and the index saved (False while the background reader runs)."""
        return not self._filling

    def stats(self) -> dict:
        self.refresh()
        return {"entries": len(self._entries), "builds": self.builds, "pending": self.pending,
                "last_build_s": round(self.build_seconds, 4),
                "manifests": sum(1 for s in self._signature or () if len(s) == 3)}
