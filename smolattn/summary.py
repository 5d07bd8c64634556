"""Per-run summary: the small file a viewer reads to open a run, instead of every attention layer.

For every kept row (each stored query outside the image block: the prompt text, the chat template and
every answer token) it holds, per layer and head, the attention mass on the image keys and on the text
keys; per layer and head reduction (each head, the mean and the max over heads) the min, max and sum of
the map over the image keys, which give the shared colour scale with or without drop-sink; and the
default view's map (mean over all layers of the mean over heads), so the first map of a run is drawn
from this file alone. Layers are read only when another map is asked for.

``store.write_run`` writes it into every new run (``summary.npz``). For runs without one (the
reference format, older runs) the viewer computes it once and caches it outside the run
(:func:`cached`), never inside a directory we did not create.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np

FILE = "summary.npz"
VERSION = 1
ARRAYS = ("positions", "image_mass", "text_mass", "vmin", "vmax", "vsum", "mean_map")


class Summary:
    """``positions`` (Q,): the kept rows' token positions. With L layers, H heads, K image keys and
    V = H + 2 reductions (heads 0..H-1, then "mean", then "max"):

    image_mass, text_mass (Q, L, H): the row's attention summed over the image keys / the text keys;
    vmin, vmax, vsum (Q, L, V): min, max and sum over the image keys of each reduction's map;
    mean_map (Q, K): the mean over all layers of the mean over heads.
    """

    def __init__(self, arrays: dict):
        for name in ARRAYS:
            setattr(self, name, np.asarray(arrays[name]))
        self.row = {int(p): r for r, p in enumerate(self.positions)}

    @property
    def num_heads(self) -> int:
        return self.image_mass.shape[-1]

    @property
    def nbytes(self) -> int:
        return sum(getattr(self, name).nbytes for name in ARRAYS) + 100 * len(self.row)

    def variant(self, heads) -> int:
        """Index along V of a head reduction ("mean", "max" or a head index)."""
        return {"mean": self.num_heads, "max": self.num_heads + 1}.get(heads, heads)

    def lh_mass(self, row: int) -> np.ndarray:
        """(L, H): share of the row's attention on the image keys, image / (image + text)."""
        image, total = self.image_mass[row], self.image_mass[row] + self.text_mass[row]
        return np.divide(image, total, out=np.zeros_like(total), where=total > 0)

    def scale(self, row: int, heads, drop: bool) -> tuple[float, float]:
        """(vmin, vmax) of the per-layer maps over every layer (the shared colour scale)."""
        v = self.variant(heads)
        lo, hi = self.vmin[row, :, v].astype(np.float64), self.vmax[row, :, v].astype(np.float64)
        if drop:   # drop-sink divides each layer's map by its sum (all zeros when the sum is 0)
            s = self.vsum[row, :, v].astype(np.float64)
            lo = np.divide(lo, s, out=np.zeros_like(lo), where=s > 0)
            hi = np.divide(hi, s, out=np.zeros_like(hi), where=s > 0)
        return float(lo.min()), float(hi.max())


def compute(layers, positions) -> Summary:
    """Summary from an iterable of layers (objects with ``image`` (H, Q, K) and ``text`` (H, Q, T)
    holding exactly the kept rows, in the order of ``positions``)."""
    image_mass, text_mass, vmin, vmax, vsum, acc, n = [], [], [], [], [], None, 0
    for layer in layers:
        image = np.asarray(layer.image, dtype=np.float32)                    # (H, Q, K)
        variants = np.concatenate([image, image.mean(0, keepdims=True), image.max(0, keepdims=True)])
        image_mass.append(image.sum(-1).T)                                    # (Q, H)
        text_mass.append(np.asarray(layer.text, dtype=np.float32).sum(-1).T)
        vmin.append(variants.min(-1).T)                                       # (Q, V)
        vmax.append(variants.max(-1).T)
        vsum.append(variants.sum(-1).T)
        mean = variants[-2].astype(np.float64)
        acc = mean if acc is None else acc + mean
        n += 1
    if not n:
        raise ValueError("a run without layers has no summary")
    stack = lambda xs: np.stack(xs, axis=1).astype(np.float32)  # noqa: E731  list of (Q, .) -> (Q, L, .)
    return Summary({"positions": np.asarray(positions, dtype=np.int32), "image_mass": stack(image_mass),
                    "text_mass": stack(text_mass), "vmin": stack(vmin), "vmax": stack(vmax), "vsum": stack(vsum),
                    "mean_map": (acc / n).astype(np.float32)})


def kept(query_positions, geometry) -> tuple[np.ndarray, np.ndarray | None]:
    """(positions, indices into the stored rows or None for all of them): every stored query row
    outside the image block, the rows a viewer shows."""
    q = np.asarray(query_positions)
    keep = np.flatnonzero(geometry.outside_image(q))
    return q[keep], None if len(keep) == len(q) else keep


def kept_rows(run) -> tuple[np.ndarray, np.ndarray | None]:
    return kept(run.query_positions, run.geometry)


def from_run(run, layer=None) -> Summary:
    """Compute a run's summary by reading its layers (``layer(i)``: an optional cached reader that
    returns layer i restricted to the kept rows; default: ``run.layer`` then the restriction)."""
    positions, keep = kept_rows(run)

    def layers():
        for i in range(run.num_layers):
            if layer is not None:
                yield layer(i)
                continue
            full = run.layer(i)
            yield full if keep is None else type(full)(full.image[:, keep], full.text[:, keep])
    return compute(layers(), positions)


def save(summary: Summary, path) -> None:
    """Write atomically (temporary sibling, renamed)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez_compressed(f, version=np.int32(VERSION), **{k: getattr(summary, k) for k in ARRAYS})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load(path, run) -> Summary | None:
    """The summary at ``path`` if it is readable, of this version and fits ``run``; else None."""
    try:
        with np.load(path) as z:
            if int(z["version"]) != VERSION:
                return None
            s = Summary({k: z[k] for k in ARRAYS})
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return None
    positions, _ = kept_rows(run)
    shape_ok = s.image_mass.shape[1:] == (run.num_layers, run.num_heads) and \
        s.mean_map.shape[-1] == run.geometry.num_keys
    return s if shape_ok and np.array_equal(s.positions, positions) else None


def identity(run_dir) -> str:
    """What a cached summary is keyed by: the run's resolved path and the size, mtime and inode of
    the files that define it (a rewritten run gets a new key)."""
    run_dir = Path(run_dir).resolve()
    parts = [str(run_dir)]
    for name in ("decoded_tokens.npy", "meta.json", "attentions_5", "attention_array.npy", "attention"):
        try:
            st = (run_dir / name).stat()
        except OSError:
            continue
        parts.append(f"{name}:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


def default_cache_dir() -> Path:
    return Path(os.environ.get("SMOLATTN_CACHE") or Path.home() / ".cache" / "smolattn")


def cached(run, cache_dir, layer=None) -> Summary:
    """The run's summary: its own ``summary.npz``, else one cached under ``cache_dir/summaries``,
    else computed now and cached there (a cache that cannot be written is only a lost speed-up)."""
    own = load(run.path / FILE, run) if (run.path / FILE).is_file() else None
    if own is not None:
        return own
    path = Path(cache_dir) / "summaries" / f"{identity(run.path)}.npz"
    hit = load(path, run) if path.is_file() else None
    if hit is not None:
        return hit
    s = from_run(run, layer)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save(s, path)
    except OSError:
        pass
    return s
