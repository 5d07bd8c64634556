"""Dataset-level head analysis: which (layer, head) localises, and where the model looks on POPE.

For every run under a root (a batch output root or a POPE ``attention/`` root) one query row is read
(default: the last prompt token, the step that produces the answer's first token, as Kang et al. CVPR
2025) and, per layer x head, its attention over the image keys is scored:

- ``image_sum``: the share of the row that goes to image keys (tiles + global tile).
- ``se``: spatial entropy of the map on the stitched tile grid (the global tile kept apart in
  ``se_global``; an unsplit image has only the global view): B = ReLU(S - mean S), cells with
  B > threshold joined into 8-connected components, p_c = B-mass of component c / B-mass of all
  components, SE = -sum p_c ln p_c. Lower is more focused; an empty map is +inf.
- with COCO boxes: ``hit`` (pointing game: the hottest cell's centre lies in a box of the object),
  ``mass`` (share of the map inside the object's boxes). For a POPE question whose object is absent,
  ``mass`` is the mean over the image's annotated categories of the share inside that category's
  boxes, so a head that ignores the question scores the same on present and absent questions and its
  AUROC is 0.5; ``on_objects`` (share inside any annotated box) and ``hit_any`` are kept for every run.

Localisation heads (Kang et al.): per run, heads whose image_sum exceeds the value at the elbow of
the sorted sums (the point farthest from the chord; values are compared, not indices), ranked by SE,
the top-k of them counted; heads are ranked by how often they are counted over the runs.

Work is spread over a process pool (one task per run, maps are never kept: each run comes back as a
handful of (layers, heads) arrays), so memory is O(runs x layers x heads) numbers.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from . import pope, store
from .errors import UserError
from .geometry import cells_in_boxes

QUERIES = ("last", "object", "answer")
SCORES = {   # name -> (label, higher is better)
    "frequency": ("localisation-head frequency (share of runs in the top-k)", True),
    "image_sum": ("image-attention sum", True),
    "se": ("spatial entropy, median (lower = more focused)", False),
    "hit": ("pointing game (object present)", True),
    "mass": ("attention mass in the object's boxes (object present)", True),
    "auroc": ("AUROC of mass in box: present vs absent", True),
}
PER_RUN = ("image_sum", "se", "se_global", "hit", "mass", "on_objects", "hit_any", "selected", "above_elbow")


@dataclass(frozen=True)
class Params:
    query: str = "last"          # last prompt token | object word (POPE runs) | first answer token
    threshold: float = 0.001     # SE binarisation of ReLU(S - mean S)
    topk: int = 10               # per-run top-k heads (lowest SE above the elbow) counted for frequency
    drop_bottom_row: bool = True  # Kang et al.: a head whose mask covers the whole bottom row is an artifact

    def to_json(self) -> dict:
        return asdict(self)


# ================================================================================ per-map scores

def spatial_entropy(maps: np.ndarray, threshold: float = 0.001, with_masks: bool = False):
    """Spatial entropy of every map in ``maps`` (..., h, w) -> (...) float64 (+inf where no cell is kept).

    One scipy ``label`` call over the whole stack: the structuring element connects the 8 neighbours
    within a map and nothing across maps."""
    from scipy import ndimage

    maps = np.asarray(maps, dtype=np.float64)
    lead, (h, w) = maps.shape[:-2], maps.shape[-2:]
    flat = maps.reshape(-1, h, w)
    b = np.maximum(flat - flat.mean(axis=(1, 2), keepdims=True), 0.0)
    mask = b > threshold
    structure = np.zeros((3, 3, 3), bool)
    structure[1] = True
    labels, n = ndimage.label(mask, structure=structure)
    se = np.full(len(flat), np.inf)
    if n:
        comp = np.arange(1, n + 1)
        mass = ndimage.sum_labels(b, labels, comp)
        owner = np.zeros(n + 1, np.int64)
        owner[labels.reshape(len(flat), -1)] = np.arange(len(flat))[:, None]
        owner = owner[1:]
        total = np.bincount(owner, weights=mass, minlength=len(flat))
        p = mass / total[owner]
        with np.errstate(divide="ignore", invalid="ignore"):
            terms = np.where(p > 0, -p * np.log(p), 0.0)
        has = np.bincount(owner, minlength=len(flat)) > 0
        se[has] = np.bincount(owner, weights=terms, minlength=len(flat))[has]
    se = se.reshape(lead)
    return (se, mask.reshape(maps.shape)) if with_masks else se


def elbow(values) -> float:
    """The elbow of ``values`` sorted from high to low: the point farthest from the chord joining the
    first and the last point, where the curve flattens. Returns its VALUE: the heads above it are those
    with ``values > elbow`` (values are compared, never a flat head index with the elbow's index)."""
    v = np.sort(np.asarray(values, dtype=np.float64).ravel())[::-1]
    if len(v) < 3 or v[0] == v[-1]:
        return float(v[-1]) if len(v) else 0.0
    x = np.arange(len(v), dtype=np.float64)
    dx, dy = x[-1], v[-1] - v[0]
    dist = np.abs(dy * x - dx * (v - v[0])) / np.hypot(dx, dy)
    return float(v[int(np.argmax(dist))])


def select_heads(image_sum: np.ndarray, se: np.ndarray, topk: int, bad=None) -> tuple[np.ndarray, np.ndarray]:
    """Kang et al.'s per-run selection over (L, H) scores -> (selected, above_elbow) boolean (L, H):
    heads with image_sum > the elbow value, not ``bad``, finite SE, the ``topk`` lowest SE among them."""
    above = image_sum > elbow(image_sum)
    ok = above & np.isfinite(se) & (True if bad is None else ~bad)
    idx = np.flatnonzero(ok.ravel())
    keep = idx[np.argsort(se.ravel()[idx], kind="stable")[:topk]]
    selected = np.zeros(image_sum.size, bool)
    selected[keep] = True
    return selected.reshape(image_sum.shape), above


def box_scores(grids: np.ndarray, inside: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(..., gh, gw) maps and a (gh, gw) mask -> (hit, mass): the hottest cell is inside; share inside."""
    flat = grids.reshape(*grids.shape[:-2], -1)
    hit = inside.ravel()[np.argmax(flat, axis=-1)]
    total = flat.sum(-1)
    mass = np.divide((flat * inside.ravel()).sum(-1), total, out=np.zeros(total.shape), where=total > 0)
    return hit.astype(np.float64), mass


def auroc(scores: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """Area under the ROC curve of ``scores`` (N, ...) for the boolean labels ``positive`` (N,), per
    column (Mann-Whitney U with mid-ranks for ties). NaN when a class is empty."""
    from scipy.stats import rankdata

    positive = np.asarray(positive, bool)
    n1, n0 = int(positive.sum()), int((~positive).sum())
    if n1 == 0 or n0 == 0:
        return np.full(scores.shape[1:], np.nan)
    ranks = rankdata(scores, axis=0)
    return (ranks[positive].sum(axis=0) - n1 * (n1 + 1) / 2) / (n1 * n0)


# ================================================================================ one run

def query_rows(run: store.Run, query: str) -> list[int]:
    """Stored row indices of the query token(s); UserError when the run has none."""
    P = run.prompt_length
    if query == "last":
        positions, what = [P - 1], "the last prompt token"
    elif query == "answer":
        positions, what = [P], "the first answer token"
    else:
        positions, what = run.meta.get("pope", {}).get("object_positions") or [], "the object word (a POPE run)"
    rows = [run.row_of(p) for p in positions]
    if not rows or None in rows:
        raise UserError(f"no stored attention row for {what}")
    return rows


def query_maps(run: store.Run, rows) -> tuple[np.ndarray, np.ndarray]:
    """(L, H, K) image attention of the query rows (their mean) and (L, H) image share of the row."""
    maps, share = [], []
    for i in range(run.num_layers):
        layer = run.layer(i)
        image = layer.image[:, rows].mean(axis=1)
        total = image.sum(-1) + layer.text[:, rows].mean(axis=1).sum(-1)
        maps.append(image)
        share.append(np.divide(image.sum(-1), total, out=np.zeros(total.shape, np.float32), where=total > 0))
    return np.stack(maps), np.stack(share)


def run_boxes(run: store.Run, boxes: dict | None) -> dict | None:
    """The image's COCO boxes {category: [[x, y, w, h], ...]}, looked up by the source file name."""
    if not boxes:
        return None
    source = run.meta.get("image", {}).get("source")
    return boxes.get(Path(source).name) if source else None


def scored_boxes(image_boxes: dict | None, pope_info: dict | None) -> tuple[str | None, list]:
    """What a run's ``hit`` / ``mass`` are scored against (analyse_run), as (kind, boxes [[x, y, w, h]]):
    "object" (a POPE question whose object is annotated: its own boxes), "categories" (a POPE object
    that is absent: the mean over the image's categories, so every annotated box), "every" (a batch run
    names no object: every annotated box), or (None, []) (no boxes, or a present object that COCO did
    not box: not scored)."""
    if not image_boxes:
        return None, []
    every = [b for bs in image_boxes.values() for b in bs]
    obj = ((pope_info or {}).get("object") or "").lower()
    if pope_info and obj in image_boxes:
        return "object", list(image_boxes[obj])
    if pope_info and pope_info.get("label") == "yes":
        return None, []
    return ("categories" if pope_info else "every"), every


SINGLE_IMAGE_ONLY = "the head analysis covers single-image runs only"
SEVERAL_SKIPPED = "several images or a video in one prompt"    # how reports name those skipped runs


def skipped_several(skipped: dict) -> list[str]:
    """The skipped runs (name -> reason) that hold several images or a video (analyse_run's reason)."""
    return [name for name, why in skipped.items() if SINGLE_IMAGE_ONLY in str(why)]


def analyse_run(path, params: Params, boxes: dict | None = None) -> dict:
    """Everything the dataset analysis needs from one run: small (L, H) arrays and its labels."""
    run = store.Run(path)
    if len(run.layout) > 1:
        raise UserError(f"{'a video' if run.layout.is_video else 'several images'} in one prompt: {SINGLE_IMAGE_ONLY} "
                        "(skipped)")
    rows = query_rows(run, params.query)
    maps, share = query_maps(run, rows)
    g = run.geometry
    tiles, glob = g.split(maps)
    main = tiles if tiles is not None else glob
    se, masks = spatial_entropy(main, params.threshold, with_masks=True)
    bad = masks[..., -1, :].all(-1) if params.drop_bottom_row else None
    selected, above = select_heads(share, se, params.topk, bad)
    info = run.meta.get("pope") or {}
    answer = run.meta.get("answer")
    out = {"image_sum": share, "se": se, "se_global": spatial_entropy(glob, params.threshold) if tiles is not None else se,
           "selected": selected, "above_elbow": above,
           "model": run.meta.get("model", {}).get("id"), "standin": run.standin, "grid": list(main.shape[-2:]),
           "position": int(run.query_positions[rows[0]]),
           "split": info.get("split"), "question_id": info.get("question_id"), "label": info.get("label"),
           "object": info.get("object"), "answer": answer,
           "pred": pope.PARSERS["official"](answer) if info and answer is not None else None}
    nan = np.full(share.shape, np.nan)
    out.update(hit=nan, mass=nan, on_objects=nan, hit_any=nan, box_fraction=None, boxed=False,
               mean_map={})
    image_boxes = run_boxes(run, boxes)
    if image_boxes:
        size = run.image_size()
        every = [b for bs in image_boxes.values() for b in bs]
        any_mask = cells_in_boxes(main.shape[-2:], size, every)
        out["hit_any"], out["on_objects"] = box_scores(main, any_mask)
        kind, scored = scored_boxes(image_boxes, info)
        mean = main.mean(axis=(0, 1))
        mm = {"on_objects": float(box_scores(mean, any_mask)[1]), "hit_any": float(box_scores(mean, any_mask)[0])}
        if kind == "object":                       # present: its own boxes
            inside = cells_in_boxes(main.shape[-2:], size, scored)
            out["hit"], out["mass"] = box_scores(main, inside)
            out["box_fraction"] = float(inside.mean())
            mm.update(zip(("hit", "mass"), map(float, box_scores(mean, inside))))
        elif kind is None:                         # present but without a COCO box (POPE has such): not scored
            pass
        elif kind == "categories":                 # absent: the mean over the image's categories
            masks_c = [cells_in_boxes(main.shape[-2:], size, bs) for bs in image_boxes.values()]
            out["mass"] = np.mean([box_scores(main, m)[1] for m in masks_c], axis=0)
            out["box_fraction"] = float(np.mean([m.mean() for m in masks_c]))
            mm["mass"] = float(np.mean([box_scores(mean, m)[1] for m in masks_c]))
        else:                                      # a batch run names no object: every annotated box
            out["hit"], out["mass"], out["box_fraction"] = out["hit_any"], out["on_objects"], float(any_mask.mean())
            mm.update(hit=mm["hit_any"], mass=mm["on_objects"])
        out["boxed"], out["mean_map"] = True, mm
    return out


# ================================================================================ many runs

def find_runs(root) -> list[str]:
    """Run directories under ``root`` (relative names, sorted); dot directories (temporary) skipped."""
    root = Path(root)
    if (root / "decoded_tokens.npy").is_file():
        return ["."]
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        if "decoded_tokens.npy" in filenames:
            found.append(Path(dirpath).relative_to(root).as_posix())
            dirnames.clear()
        else:
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
    return sorted(found)


_WORKER: dict = {}


def _init(params, boxes):
    _WORKER.update(params=params, boxes=boxes)


def _task(args):
    root, name = args
    try:
        return name, analyse_run(Path(root) / name, _WORKER["params"], _WORKER["boxes"]), None
    except UserError as e:
        return name, None, str(e)
    except (OSError, ValueError, KeyError, IndexError) as e:
        return name, None, f"{type(e).__name__}: {e}"


def analyse_root(root, params: Params, boxes: dict | None = None, workers: int | None = None,
                 names=None, progress: bool = True) -> "Dataset":
    """Analyse every run under ``root`` over ``workers`` processes (default: all cores)."""
    from scipy import ndimage, stats  # noqa: F401  (import errors show here, in the parent, not in a worker)
    from tqdm import tqdm

    names = find_runs(root) if names is None else list(names)
    workers = max(1, min(workers or os.cpu_count() or 1, len(names) or 1))
    results, skipped = {}, {}
    tasks = [(str(root), n) for n in names]
    bar = tqdm(total=len(tasks), unit="run", desc="heads", disable=not progress, dynamic_ncols=True)
    try:
        if workers == 1:
            _init(params, boxes)
            it = map(_task, tasks)
            pool = None
        else:
            import multiprocessing as mp   # not "fork": forking a process that runs threads (torch, Flask,
            # Ray, tqdm) can deadlock the child on a lock held by a thread that did not come along; the
            # fork server is a fresh single-threaded process that forks the workers
            ctx = mp.get_context("forkserver" if os.name == "posix" else "spawn")
            if os.name == "posix":   # the server imports this module (numpy, scipy) once; workers fork from it
                ctx.set_forkserver_preload(["smolattn.analysis", "scipy.ndimage", "scipy.stats"])
            pool = ctx.Pool(workers, _init, (params, boxes))
            it = pool.imap_unordered(_task, tasks, chunksize=max(1, min(16, len(tasks) // (workers * 8) or 1)))
        for name, res, err in it:
            if err is None:
                results[name] = res
            else:
                skipped[name] = err
            bar.update()
        if pool is not None:
            pool.close()
            pool.join()
    finally:
        bar.close()
    return Dataset(str(root), params, results, skipped)


class Dataset:
    """Per-run results stacked: ``scores[name]`` (N, L, H) in ``names`` order, plus per-run labels."""

    def __init__(self, root: str, params: Params, results: dict, skipped: dict):
        self.root, self.params, self.skipped = root, params, dict(sorted(skipped.items()))
        shapes = {np.shape(r["image_sum"]) for r in results.values()}
        if len(shapes) > 1:
            raise UserError(f"the runs under {root} have different layer x head shapes {sorted(shapes)}; "
                            "analyse one model at a time")
        self.names = sorted(results)
        rs = [results[n] for n in self.names]
        self.runs = [{k: v for k, v in r.items() if k not in PER_RUN} for r in rs]
        self.shape = shapes.pop() if shapes else (0, 0)
        self.scores = {k: np.stack([np.asarray(r[k], np.float32) for r in rs]) if rs
                       else np.zeros((0,) + self.shape, np.float32) for k in PER_RUN}

    def __len__(self) -> int:
        return len(self.names)

    @property
    def standin(self) -> bool:
        return any(r["standin"] for r in self.runs)

    @property
    def models(self) -> list[str]:
        return sorted({str(r["model"]) for r in self.runs})

    def pope_mask(self) -> np.ndarray:
        return np.array([r["label"] in ("yes", "no") for r in self.runs], bool)

    def present(self) -> np.ndarray:
        return np.array([r["label"] == "yes" or (r["label"] is None and r["boxed"]) for r in self.runs], bool)

    def grounding(self) -> np.ndarray:
        """Runs the localisation scores are computed on: those whose object is present when runs carry
        POPE labels (as Kang et al., whose every sample names a present object), else every run."""
        pm = self.pope_mask()
        return np.array([r["label"] == "yes" for r in self.runs], bool) if pm.any() else np.ones(len(self), bool)

    def head_table(self) -> dict[str, np.ndarray]:
        """Per (L, H) summary over runs: every name in SCORES plus helpers."""
        s, L, H = self.scores, *self.shape
        present, gr = self.present(), self.grounding()
        n = int(gr.sum())
        nanmean = lambda a: np.nanmean(a, axis=0) if len(a) and not np.all(np.isnan(a)) else np.full((L, H), np.nan)  # noqa: E731
        mean = lambda k: s[k][gr].mean(axis=0) if n else np.zeros((L, H))  # noqa: E731
        median = lambda k: np.median(s[k][gr], axis=0) if n else np.full((L, H), np.inf)  # noqa: E731
        import warnings
        with np.errstate(invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            table = {"frequency": mean("selected"), "above_elbow": mean("above_elbow"), "image_sum": mean("image_sum"),
                     "se": median("se"), "se_global": median("se_global"),
                     "hit": nanmean(s["hit"][present]), "mass": nanmean(s["mass"][present]),
                     "on_objects": nanmean(s["on_objects"])}
        pm = self.pope_mask() & ~np.isnan(s["mass"][:, 0, 0]) if n else np.zeros(0, bool)
        table["auroc"] = auroc(s["mass"][pm].astype(np.float64), present[pm]) if pm.any() else np.full((L, H), np.nan)
        return table

    def ranked(self, score: str, table=None) -> list[tuple[int, int, float]]:
        """(layer, head, value) best first by ``score`` (NaN last)."""
        table = self.head_table() if table is None else table
        v = np.asarray(table[score], np.float64)
        better_high = SCORES.get(score, (None, True))[1]
        key = np.where(np.isnan(v), np.inf, -v if better_high else v)
        order = np.lexsort((np.arange(v.size), key.ravel()))
        L, H = v.shape
        return [(int(i // H), int(i % H), float(v.ravel()[i])) for i in order]

    def examples(self, layer: int, head: int, score: str = "se", n: int = 4) -> dict:
        """Best and worst runs for one head by a per-run score (runs where it is defined and finite)."""
        key = {"frequency": "se", "auroc": "mass"}.get(score, score)
        v = self.scores[key][:, layer, head].astype(np.float64)
        ok = np.flatnonzero(np.isfinite(v))
        better_high = SCORES.get(key, (None, True))[1]
        order = ok[np.argsort(-v[ok] if better_high else v[ok], kind="stable")]
        pick = lambda idx: [{"run": self.names[i], "value": float(v[i]), **{k: self.runs[i].get(k) for k in  # noqa: E731
                                 ("split", "question_id", "label", "pred", "object", "answer", "position")}}
                            for i in idx]
        return {"score": key, "best": pick(order[:n]), "worst": pick(order[::-1][:n])}

    def lens(self) -> dict | None:
        """POPE hallucination lens: per split and outcome (TP/FP/TN/FN by the official parser), the mean
        over questions of the all-heads map's mass in the object's boxes (present) or the mean category
        box (absent), on any object, and pointing-game rates; plus the same mass for the top heads."""
        rows = [(i, r) for i, r in enumerate(self.runs) if r["label"] in ("yes", "no") and r["boxed"]]
        if not rows:
            return None
        top = [(l, h) for l, h, f in self.ranked("frequency")[:5] if f > 0]
        out: dict = {}
        for split in sorted({r["split"] for _, r in rows}, key=pope._split_rank) + ["all"]:
            groups = {}
            for outcome in ("TP", "FP", "TN", "FN"):
                idx = [i for i, r in rows if (split == "all" or r["split"] == split) and _outcome(r) == outcome]
                mm = [self.runs[i]["mean_map"] for i in idx]
                mean = lambda k: mean_of([m.get(k) for m in mm])  # noqa: E731
                top_mass = [float(np.mean(self.scores["mass"][i][tuple(zip(*top))])) for i in idx] if top else []
                top_mass = mean_of([m for m in top_mass if not np.isnan(m)])
                groups[outcome] = {"n": len(idx), "mass": mean("mass"), "hit": mean("hit"),
                                   "on_objects": mean("on_objects"), "hit_any": mean("hit_any"),
                                   "top_heads_mass": top_mass,
                                   "box_fraction": mean_of([self.runs[i]["box_fraction"] for i in idx])}
            out[split] = groups
        return {"top_heads": top, "splits": out}


def mean_of(values) -> float | None:
    """Mean of the values that are not None (None when there are none)."""
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def _outcome(r) -> str:
    pred = r["pred"]
    if r["label"] == "yes":
        return "TP" if pred == "yes" else "FN"
    return "FP" if pred == "yes" else "TN"
