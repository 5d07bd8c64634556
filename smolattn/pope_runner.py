"""POPE, model side: answer every question about a few images at once, reusing each image's prompt prefix.

All POPE questions about an image share the prompt up to the end of the image block
(``<|im_start|>User:`` + the tile tokens + the closing ``<fake_token_around_image>``): only the text
after it differs. So per image the processor, the vision encoder and the prefix run ONCE
(``engine.prefill``), and the questions of several images are answered together in one greedy batch
on top of their stacked prefix caches (``engine.answer_cached``). The naive path (``naive=True``) is
the plain per-question ``generate(**encode(...))``; tests check that both give the same answers.
With attention, the object word's rows (and the answer's) are captured in the same batch and
stored as a run directory per question, and, with COCO boxes, scored with the pointing game.

Also here: the work items (groups of images) and their worker. The questions, the answers file, the
scoring and the report are pope.py's.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import engine, heatmap, pope, runmeta, store
from . import geometry as geo
from . import interventions as iv
from . import methods as mth
from . import model as mdl
from .errors import UserError
from .images import open_image
from .pope import load_boxes  # noqa: F401  (pope_runner.load_boxes: its old home)


@dataclass(frozen=True)
class Config:
    model_id: str = mdl.DEFAULT_MODEL
    revision: str | None = None
    device: str | None = None
    dtype: str | None = None
    suffix: str = pope.DEFAULT_SUFFIX
    longest_edge: int | None = None      # None: the checkpoint's own processor setting
    max_new_tokens: int = runmeta.POPE_MAX_NEW_TOKENS
    naive: bool = False
    attention_dir: str | None = None     # store object-word attention runs under this folder
    batch_size: int | None = None        # images whose questions share one generate call (None: per device)
    methods: tuple = (mth.RAW,)          # of the attention runs
    info: dict | None = None             # runmeta.model_info of the loaded model (the driver's; workers check it)
    benchmark: dict | None = None        # where the questions came from, for the runs' rebuild command (meta.pope)
    heads: tuple = ()                    # ablated (layer, head)s: an arm of --ablate-heads (smolattn.pope_arms)
    ablation: str = "zero"

    def fingerprint(self) -> dict:
        """What changes the answers and the attention runs (runmeta.fingerprint); answers.jsonl refuses
        to mix fingerprints."""
        return runmeta.fingerprint(self.model_id, self.dtype, self.info, runmeta.pope_settings(
            self.suffix, self.longest_edge, self.max_new_tokens, self.attention_dir is not None, self.methods,
            self.heads, self.ablation), runs=self.attention_dir is not None)

    def spec(self):
        """The arm's intervention (interventions.Spec), or None."""
        return iv.Spec(tuple(map(tuple, self.heads)), self.ablation) if self.heads else None

    def key(self) -> str:
        return runmeta.config_hash(self.fingerprint())

    def record(self) -> dict:
        """meta.pope.benchmark of the attention runs: what rebuilds them (runmeta.command)."""
        return {**(self.benchmark or {}), "batch_size": self.batch_size, "naive": self.naive}


def _object_offsets(tokenizer, tail: str, suffix: list[int], obj: str) -> list[int]:
    """Indices into ``suffix`` of the tokens that spell the question's object."""
    enc = tokenizer(tail, add_special_tokens=False, return_offsets_mapping=True)
    start = tail.lower().find(obj.lower())
    if enc["input_ids"] != suffix or start < 0:
        return []
    end = start + len(obj)
    return [i for i, (a, b) in enumerate(enc["offset_mapping"]) if a < end and b > start]


# ============================================================================ answering

def answer_images(loaded, images: list[dict], suffix: str, max_new_tokens: int, longest_edge=None, *,
                  naive: bool = False, batch: int | bool = True, attention_dir=None, methods=(mth.RAW,),
                  benchmark: dict | None = None, spec=None) -> list[dict]:
    """Answer every question (``pope.Question``) about a few images; ``images``: dicts with ``image``
    (PIL), ``questions``, optional ``boxes`` (category name -> COCO [x, y, w, h] boxes) and ``info``.
    One row per question, image by image in order: raw answer, the parsed answer per convention,
    ``path`` ("cached" or "naive") and, with ``attention_dir``, the object word's attention run (with
    the derived ``methods`` too; ``benchmark``: recorded in its meta.pope, Config.record) and
    localisation.

    Cached: one prefill per image, then the questions of ALL the images in one batch (``batch``: at
    most that many questions per generate call; False: one at a time), with attention too (each
    question's rows come out of the batch as if it had run alone). The naive path: one question at a
    time.

    ``spec`` (an ``interventions.Spec``, an arm of ``--ablate-heads``): applied to every forward, the
    prefix's included (its keys and values are the ablated model's, one prefill per image and arm).
    A mean ablation's mean runs over the whole prompt, the question included, so no prefix can be
    shared: its questions take the naive path."""
    if spec:
        with iv.applied(spec):
            return answer_images(loaded, images, suffix, max_new_tokens, longest_edge,
                                 naive=naive or (spec.ablation == "mean" and bool(spec.heads)), batch=batch,
                                 attention_dir=attention_dir, methods=methods, benchmark=benchmark)
    rows, jobs = {}, []
    rec = None
    if attention_dir is not None:
        methods = mth.parse(",".join(methods))
        config = runmeta.fingerprint(loaded.model_id, loaded.dtype, runmeta.model_info(loaded, longest_edge),
                                     runmeta.pope_settings(suffix, longest_edge, max_new_tokens, True, methods))
        rec = {"config": config, "methods": methods, "benchmark": benchmark, "longest_edge": longest_edge}
    for n, im in enumerate(images):
        prompts = [q.text + suffix for q in im["questions"]]
        suffixes = [None] * len(prompts)
        prefix = None
        if not naive:
            with mth.keep_image_features(loaded) as kept:
                prefix, first_ids = engine.prefill(loaded, im["image"], prompts[0], longest_edge)
            if rec is not None and len(rec["methods"]) > 1:     # derived methods reuse the image features
                im = dict(im, features=kept.features)
            if engine.suffix_ids(loaded, prefix, prompts[0]) == first_ids[len(prefix.ids):]:   # else: all naive
                suffixes = [engine.suffix_ids(loaded, prefix, p) for p in prompts]
        for i, (q, s) in enumerate(zip(im["questions"], suffixes)):
            if s is None:
                rows[n, i] = _answer_naive(loaded, im, q, prompts[i], longest_edge, max_new_tokens, attention_dir,
                                           rec)
            else:
                jobs.append(((n, i), prefix, s, q, prompts[i], im))
    size = max(1, len(jobs)) if batch is True else max(1, int(batch))
    for k in range(0, len(jobs), size):
        chunk = jobs[k:k + size]
        pairs = [(p, s) for _, p, s, _, _, _ in chunk]
        if attention_dir is None:
            news, layers = engine.answer_cached(loaded, pairs, max_new_tokens), [None] * len(chunk)
        else:
            offsets = [_object_offsets(loaded.processor.tokenizer, engine.split_chat(loaded, prompt)[2], s,
                                       pope.object_of(q.text)) for _, _, s, q, prompt, _ in chunk]
            news, layers = engine.answer_cached(loaded, pairs, max_new_tokens,
                                                rows=[_kept(o, len(s)) for o, (_, s) in zip(offsets, pairs)])
        for j, ((key, prefix, s, q, prompt, im), new) in enumerate(zip(chunk, news)):
            rows[key] = _row(loaded, q, prompt, new, "cached")
            if attention_dir is not None:
                rows[key]["attention"] = _store_attention(
                    loaded, q, Path(attention_dir), prefix.ids + s, new, len(prefix.ids), offsets[j],
                    layers[j] if offsets[j] else None, prefix.geometry, rows[key]["prompt"], rows[key]["raw_answer"],
                    im.get("info") or {}, im.get("boxes"), im["image"], rec, im.get("features"))
    return [rows[n, i] for n, im in enumerate(images) for i in range(len(im["questions"]))]


def _kept(offsets: list[int], suffix_len: int) -> list[int]:
    """The captured rows of a question, as indices into the tokens after the image block: the object
    word's, then the last prompt token's (the step that produces the answer's first token)."""
    return sorted(set(offsets) | {suffix_len - 1})


def answer_image(loaded, image, questions, suffix: str, max_new_tokens: int, longest_edge=None, *,
                 naive: bool = False, batch: int | bool = True, attention_dir=None, boxes: dict | None = None,
                 info: dict | None = None) -> list[dict]:
    """:func:`answer_images` for one image."""
    return answer_images(loaded, [{"image": image, "questions": questions, "boxes": boxes, "info": info}], suffix,
                         max_new_tokens, longest_edge, naive=naive, batch=batch, attention_dir=attention_dir)


def _row(loaded, q, prompt, new, path) -> dict:
    raw = loaded.processor.tokenizer.decode(new, skip_special_tokens=True).strip()
    return {"split": q.split, "question_id": q.question_id, "image": q.image, "question": q.text,
            "label": q.label, "prompt": mdl.chat_text(loaded.processor, prompt), "raw_answer": raw,
            "parsed": {c: parse(raw) for c, parse in pope.PARSERS.items()},
            "status": "ok", "path": path, "new_tokens": len(new)}


def _answer_naive(loaded, im: dict, q, prompt, longest_edge, max_new_tokens, attention_dir, rec=None) -> dict:
    """One question the naive way: processor + vision encoder + generate; with ``attention_dir``, also
    its attention run."""
    tok = loaded.processor.tokenizer
    _, inputs = mdl.encode(loaded, im["image"], prompt, longest_edge)
    full = inputs["input_ids"][0].tolist()
    g = geo.from_tokens(tok.convert_ids_to_tokens(full))
    start = g.block_end
    recorder = offsets = None
    if attention_dir is not None:
        offsets = _object_offsets(tok, engine.split_chat(loaded, prompt)[2], full[start:], pope.object_of(q.text))
        if offsets:   # recorder rows index the whole prompt
            recorder = mdl.Recorder(np.array(_kept(offsets, len(full) - start)) + start)
    with mth.keep_image_features(loaded) as kept:
        new = mdl.generate(loaded, inputs, max_new_tokens, recorder)
    row = _row(loaded, q, prompt, new, "naive")
    if attention_dir is not None:
        layers = recorder.stacked(key_len=len(full) + len(new)) if recorder is not None else None
        row["attention"] = _store_attention(loaded, q, Path(attention_dir), full, new, start, offsets, layers, g,
                                            row["prompt"], row["raw_answer"], im.get("info") or {}, im.get("boxes"),
                                            im["image"], rec, kept.features)
    return row


# ============================================================================ attention

def object_map(layers, n_rows: int, g: geo.Geometry) -> np.ndarray:
    """Heat grid of the first ``n_rows`` stored rows (the object word): image attention averaged over
    those tokens, the heads and the layers; the tiled grid, or the global one for an unsplit image."""
    keys = g.key_positions
    maps = np.stack([a[:, :n_rows][..., keys].astype(np.float32).mean(axis=1) for a in layers])   # (L, H, K)
    tiles, glob = g.split(heatmap.reduce(maps))
    return tiles if tiles is not None else glob


def localise(grid: np.ndarray, image_size, boxes) -> dict:
    """Pointing game and attention mass for COCO ``boxes`` ([x, y, w, h] in pixels of the original image,
    which the grid covers uniformly). A cell is inside when its centre lies in a box (edges included).

    hit: the hottest cell is inside; mass: share of the grid's total inside; box_fraction: share of cells
    inside (what a uniform map would score as mass)."""
    inside = geo.cells_in_boxes(grid.shape, image_size, boxes)
    total = float(grid.sum())
    return {"hit": bool(inside.flat[int(np.argmax(grid))]),
            "mass": float(grid[inside].sum() / total) if total > 0 else 0.0,
            "box_fraction": float(inside.mean())}


def _store_attention(loaded, q, root: Path, full, new, start, offsets, layers, g, chat, raw, info, boxes, image,
                     rec: dict, features=None):
    """Write the question's run: rows of the object word, of the last prompt token (the step that
    produces the answer's first token) and of every answer token, with the image (so it opens in the
    viewer with its overlay), and the derived ``rec["methods"]`` (from the image ``features``), and
    score the object word's map against the object's COCO boxes. ``layers``: the captured rows (None
    when the object word was not found); ``rec``: the configuration answer_images records."""
    obj = pope.object_of(q.text)
    out = {"object": obj, "run": None, "hit": None, "mass": None, "box_fraction": None,
           "has_boxes": bool(boxes and boxes.get(obj.lower()))}
    if layers is None:
        out["error"] = f"object {obj!r} not found among the question's tokens"
        return out
    tok = loaded.processor.tokenizer
    ids = full + new
    P, S = len(full), len(full) + len(new)
    layers = list(layers)
    prompt_rows = _kept(offsets, P - start)      # as the captured rows, in this order
    positions = np.concatenate([start + np.array(prompt_rows), np.arange(P, S)])
    eos = set(mdl.generation_kwargs(loaded, 1)["eos_token_id"])
    pope_meta = {"split": q.split, "question_id": q.question_id, "label": q.label, "object": obj,
                 "object_positions": [start + int(o) for o in offsets], "benchmark": rec["benchmark"]}
    meta = runmeta.run_meta(loaded, rec["config"], prompt=q.text, chat_text=chat, answer=raw, token_ids=ids,
                            prompt_length=P, layers=layers,
                            generation={"new_tokens": len(new), "stopped_at_eos": bool(new) and new[-1] in eos},
                            image=dict(info), processor=runmeta.processor_settings(loaded, rec["longest_edge"]),
                            pope=pope_meta)
    derived = {}
    if any(m != mth.RAW for m in rec["methods"]):
        derived = mth.compute(loaded, ids, P, g, positions, rec["methods"], features)
    run = root / q.split / str(q.question_id)
    store.write_run(run, tokens=tok.convert_ids_to_tokens(ids), layers=layers, query_positions=positions,
                    store=runmeta.POPE_STORE, geometry=g, meta=meta, image=image, image_name=store.image_name(info),
                    methods=derived)
    out["run"] = str(run)
    if out["has_boxes"] and q.label == "yes" and info.get("size"):
        out.update(localise(object_map(layers, len(offsets), g), info["size"], boxes[obj.lower()]))
    return out


def remove_other_runs(root, key: str) -> int:
    """``--overwrite``: remove the attention runs under ``root`` (ROOT/SPLIT/QUESTION_ID) that POPE
    wrote with another configuration than ``key``: only our own runs (store.owned_run, our meta.json
    with a ``pope`` section) whose ``config_key`` differs; anything else is left as it is. Returns how
    many were removed."""
    root, n = Path(root), 0
    if root.is_symlink() or not root.is_dir():
        return 0
    for split in sorted(root.iterdir()):
        if split.is_symlink() or not split.is_dir():
            continue
        for run in sorted(split.iterdir()):
            if run.name.startswith(".") or not store.owned_run(run):
                continue
            try:
                meta = json.loads((run / "meta.json").read_text())
            except (OSError, ValueError):
                continue
            if isinstance(meta, dict) and meta.get("pope") and meta.get("config_key") != key:
                store.remove_run(run)
                n += 1
    return n


# ============================================================================ batch items + worker

_MODELS: dict = {}


def get_model(cfg: Config):
    """Load once per process (the local engine's worker reuses the driver's copy)."""
    key = (cfg.model_id, cfg.revision, cfg.device, cfg.dtype)
    if key not in _MODELS:
        _MODELS[key] = mdl.load(cfg.model_id, cfg.device, cfg.dtype, cfg.revision)
    return _MODELS[key]


def make_items(questions, image_root, boxes: dict | None = None, batch_size: int = 1) -> list[list[dict]]:
    """Work items: groups of ``batch_size`` images (their questions are answered in one batch); per
    image its questions in file order, images in order of first appearance."""
    items: dict = {}
    for q in questions:
        item = items.setdefault(q.image, {"image": q.image, "path": str(Path(image_root) / q.image),
                                          "questions": [], "boxes": (boxes or {}).get(q.image)})
        item["questions"].append(q)
    images = list(items.values())
    return [images[i:i + batch_size] for i in range(0, len(images), max(1, batch_size))]


def prefetch(group):
    """Decode the group's images (runs ahead in a thread); a bad image comes back as its error."""
    out = []
    for item in group:
        try:
            out.append(open_image(item["path"]))
        except UserError as e:
            out.append(e)
    return out


def error_rows(item, message: str) -> list[dict]:
    return [{"split": q.split, "question_id": q.question_id, "image": q.image, "question": q.text,
             "label": q.label, "raw_answer": None, "status": "error", "error": message} for q in item["questions"]]


def failed_rows(cfg: Config, group, message: str) -> list[dict]:
    """Error rows for a group whose worker process kept dying on it (Ray retries exhausted); retried
    on resume like any error row."""
    return [dict(r, config=cfg.key(), model=cfg.model_id) for item in group for r in error_rows(item, message)]


def make_worker(cfg: Config):
    """Called once per process: loads the model, returns ``worker(group, prefetched) -> rows``."""
    loaded = get_model(cfg)
    mine = runmeta.model_info(loaded, cfg.longest_edge)
    if cfg.info is not None and mine != cfg.info:
        raise UserError(f"this worker's model gives another configuration than the driver's: {mine} != {cfg.info}")

    def worker(group, prefetched=None):
        got = prefetched if prefetched is not None else prefetch(group)
        if isinstance(got, Exception):
            got = [got] * len(group)
        ok = [{"image": g[0], "info": g[1], "questions": item["questions"], "boxes": item.get("boxes")}
              for item, g in zip(group, got) if not isinstance(g, Exception)]
        answered = iter(answer_images(loaded, ok, cfg.suffix, cfg.max_new_tokens, cfg.longest_edge,
                                      naive=cfg.naive, attention_dir=cfg.attention_dir, methods=cfg.methods,
                                      benchmark=cfg.record(), spec=cfg.spec()))
        rows = []
        for item, g in zip(group, got):
            rows += error_rows(item, str(g)) if isinstance(g, Exception) else \
                [next(answered) for _ in item["questions"]]
        for r in rows:
            r.update(config=cfg.key(), model=cfg.model_id, standin=bool(loaded.standin))
        return rows

    return worker
