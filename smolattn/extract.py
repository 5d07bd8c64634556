"""Image + prompt -> one run directory (answer, tokens, attention). Used by every script that extracts."""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import engine
from . import methods as mth
from . import model as mdl
from . import runmeta, store
from .errors import UserError
from .images import open_image
from .runmeta import DEFAULT_PROMPT, processor_settings, versions  # noqa: F401  (extract.X: their old home)


@dataclass(frozen=True)
class Settings:
    prompt: str = DEFAULT_PROMPT
    max_new_tokens: int = runmeta.DEFAULT_MAX_NEW_TOKENS
    longest_edge: int | None = None     # None: the checkpoint's own processor setting
    store: str = runmeta.DEFAULT_STORE
    methods: tuple = (mth.RAW,)     # raw attention, plus any of smolattn.methods.METHODS

    def check(self):
        if not self.prompt.strip():
            raise UserError("the prompt is empty")
        if self.max_new_tokens < 1:
            raise UserError("--max-new-tokens must be at least 1")
        if self.longest_edge is not None and self.longest_edge < 1:
            raise UserError("--longest-edge must be positive")
        if self.store not in store.STORES:
            raise UserError(f"unknown --store {self.store!r}; choose one of {', '.join(store.STORES)}")
        mth.parse(",".join(self.methods))
        return self

    @property
    def keep(self) -> str:
        return "all" if self.store == "full" else "text"


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The extraction flags shared by every script that runs the model on images."""
    ap.add_argument("--prompt", default=DEFAULT_PROMPT)
    mdl.add_model_arguments(ap)
    ap.add_argument("--max-new-tokens", type=int, default=runmeta.DEFAULT_MAX_NEW_TOKENS,
                    help="greedy decoding, stops at end of utterance")
    ap.add_argument("--longest-edge", type=int, default=None,
                    help="processor resize of the longest edge (default: the checkpoint's own processor setting)")
    ap.add_argument("--store", choices=store.STORES, default=runmeta.DEFAULT_STORE,
                    help="compact: text/answer rows, fp16; compact8: same, 8-bit; full: reference (1,H,S,S) npz")
    ap.add_argument("--methods", default=mth.RAW, help=f"comma list of {', '.join(mth.names())} (default raw; "
                    "the others are stored next to it, see docs/run-format.md)")
    ap.add_argument("--batch-size", type=int, default=None,
                    help="images per generate call (default: 8 on a GPU, 1 on CPU); answers and rows do not change")
    ap.add_argument("--workers", type=int, default=None,
                    help="decode + processor worker processes (default: none on CPU, up to 8 on a GPU)")
    ap.add_argument(store.REPLACE_REFERENCE_FLAG, action="store_true",
                    help="replace an output directory that holds a reference-format run (the reference project's "
                         "decoded_tokens.npy + attentions_5/; refused without this flag)")


def settings_from_args(args) -> Settings:
    if getattr(args, "batch_size", None) is not None and args.batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    if getattr(args, "workers", None) is not None and args.workers < 0:
        raise UserError("--workers must be 0 or more")
    return Settings(args.prompt, args.max_new_tokens, args.longest_edge, args.store,
                    tuple(mth.parse(args.methods))).check()


def check_writable(directory) -> None:
    """Fail early (before loading a model) if ``directory`` cannot be created; creates nothing."""
    d = Path(directory).absolute()
    parent = d
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"cannot write to {d}: {parent} is not a directory")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".write-test-", dir=parent))
    except OSError as e:
        raise UserError(f"cannot write to {d}: {e.strerror or e}")


MAX_TILES_PER_SIDE = 6    # the processor has <row_r_col_c> markers for at most 6 x 6 tiles


def check_longest_edge(longest_edge: int | None, tile_size: int | None) -> None:
    """--longest-edge above 6 tiles per side cannot work: refuse it in one line."""
    if longest_edge and tile_size and longest_edge > MAX_TILES_PER_SIDE * tile_size:
        raise UserError(f"--longest-edge {longest_edge} is above this model's limit of {MAX_TILES_PER_SIDE * tile_size} "
                        f"({MAX_TILES_PER_SIDE} tiles of {tile_size} px per side)")


def checkpoint_tile_size(model_id: str, revision: str | None = None) -> int | None:
    """The image processor's tile size from the checkpoint's config files, without loading the model
    (None when they are not on this machine: then the check runs after loading)."""
    model_id = mdl.ALIASES.get(model_id, model_id)
    names = ("preprocessor_config.json", "processor_config.json")
    local = Path(model_id).expanduser()
    paths = [local / n for n in names] if local.is_dir() else []
    if not paths and model_id.count("/") == 1:
        try:
            from huggingface_hub import try_to_load_from_cache
            paths = [Path(p) for n in names if isinstance(p := try_to_load_from_cache(model_id, n, revision=revision), str)]
        except Exception:  # noqa: BLE001 - no cache, odd id: the check after loading still runs
            paths = []
    for path in paths:
        try:
            cfg = json.loads(path.read_text())
            size = cfg.get("image_processor", cfg).get("max_image_size", {}).get("longest_edge")
        except (OSError, ValueError, AttributeError):
            continue
        if size:
            return int(size)
    return None


def fingerprint_config(loaded: mdl.Loaded, settings: Settings) -> dict:
    """Everything that changes a run's content (the batch manifest refuses to mix these; each run
    records it as meta.config)."""
    return runmeta.fingerprint(loaded.model_id, loaded.dtype, runmeta.model_info(loaded, settings.longest_edge),
                               runmeta.extract_settings(settings.prompt, settings.max_new_tokens,
                                                        settings.longest_edge, settings.store, settings.methods))


def extract(loaded: mdl.Loaded, image_path, out_dir, settings: Settings, image=None,
            replace_reference: bool = False) -> dict:
    """Run the model on one image and write the run to ``out_dir`` atomically. Returns a summary.

    ``image``: an already opened ``(rgb, info)`` pair. ``replace_reference``: a reference-format run
    at ``out_dir`` may be replaced (--replace-reference-run).
    """
    settings.check()
    check_longest_edge(settings.longest_edge, processor_settings(loaded, None)["tile_size"])
    store.check_target(out_dir, replace_reference)     # before the model works: never a folder of the user's
    t0 = time.perf_counter()
    rgb, info = image or open_image(image_path)
    prep = engine.prepare(loaded.processor, rgb, settings.prompt, settings.longest_edge, settings.keep, info)
    prep.seconds = time.perf_counter() - t0
    return write(loaded, settings, prep, step(loaded, settings, [prep])[0], out_dir, replace_reference)


def extract_many(loaded: mdl.Loaded, jobs, settings: Settings, on_result, *, batch_size: int | None = None,
                 workers: int | None = None, writers: int | None = None, on_error=None,
                 preparer: engine.Preparer | None = None, replace_reference: bool = False) -> None:
    """Extract many images through the pipeline: ``jobs`` are (image path, run directory, tag) triples;
    on_result(tag, summary) per finished run, on_error(tag, exception) -> summary for a failed one.
    ``preparer``: an engine.Preparer made for these settings, to reuse its worker processes."""
    settings.check()
    check_longest_edge(settings.longest_edge, processor_settings(loaded, None)["tile_size"])
    batch_size = batch_size or engine.default_batch_size(loaded.device)
    workers = engine.default_workers(loaded.device) if workers is None else workers
    writers = writers or engine.default_writers(loaded.device)
    prep = preparer or engine.Preparer(loaded, settings.prompt, settings.longest_edge, settings.keep, workers)
    try:
        engine.pipeline(
            list(jobs), lambda job: prep.submit(job[0]),
            lambda batch: step(loaded, settings, batch),
            lambda job, p, out: (job, write(loaded, settings, p, out, job[1], replace_reference)),
            lambda res: on_result(res[0][2], res[1]),
            batch_size=batch_size, writers=writers,
            on_error=(lambda job, e: (job, on_error(job[2], e))) if on_error else None)
    finally:
        if preparer is None:
            prep.close()


def extract_images(loaded: mdl.Loaded, image_paths, out_dir, settings: Settings, images=None,
                   replace_reference: bool = False) -> dict:
    """Several images in ONE prompt, in order (each with its own tiles and global tile): one run.
    ``images``: already opened ``(rgb, info)`` pairs."""
    settings.check()
    image_paths = list(image_paths)
    if len(image_paths) == 1 and images is None:
        return extract(loaded, image_paths[0], out_dir, settings, replace_reference=replace_reference)
    check_longest_edge(settings.longest_edge, processor_settings(loaded, None)["tile_size"])
    store.check_target(out_dir, replace_reference)
    t0 = time.perf_counter()
    opened = images or [open_image(p) for p in image_paths]
    prep = engine.prepare_images(loaded.processor, [im for im, _ in opened], settings.prompt, settings.longest_edge,
                                 settings.keep, [info for _, info in opened])
    prep.seconds = time.perf_counter() - t0
    return write(loaded, settings, prep, step(loaded, settings, [prep])[0], out_dir, replace_reference)


def extract_video(loaded: mdl.Loaded, video_path, out_dir, settings: Settings, fps: float | None = None,
                  max_frames: int | None = None, keep_frame_rows: bool = False, frames=None,
                  replace_reference: bool = False) -> dict:
    """A video's sampled frames + prompt (SmolVLM2 checkpoints): one run, the frames stored in it.
    ``fps`` / ``max_frames`` None: the checkpoint's ``video_sampling``. ``frames``: already read."""
    from . import video

    settings.check()
    cfg = video.settings(loaded.processor)      # refuses models without video support
    store.check_target(out_dir, replace_reference)
    t0 = time.perf_counter()
    frames = frames or video.read(video_path, fps or cfg["fps"], max_frames or cfg["max_frames"])
    prep = engine.prepare_video(loaded.processor, frames, settings.prompt, settings.keep, keep_frame_rows)
    prep.seconds = time.perf_counter() - t0
    return write(loaded, settings, prep, step(loaded, settings, [prep])[0], out_dir, replace_reference)


def query_rows(prep: engine.Prepared, new: list[int]) -> np.ndarray:
    """The stored query positions: the kept prompt rows, then every generated token."""
    return np.concatenate([prep.rows, np.arange(len(prep.ids), len(prep.ids) + len(new))])


def step(loaded: mdl.Loaded, settings: Settings, batch: list[engine.Prepared]) -> list:
    """The model step of a batch: one generate (engine.run), then each image's derived methods, if
    any, on its own slice of the batch's image features (no second vision pass). Returns an Output
    per prepared image, or, for one whose derived methods would not fit in memory, the UserError that
    says so (checked before generating; :func:`write` raises it, so only that image fails)."""
    refused = {}
    if any(m != mth.RAW for m in settings.methods):
        for i, prep in enumerate(batch):   # a method that cannot fit is one line, not an OOM kill
            try:
                mth.check_memory(loaded, settings.methods, len(prep.ids) + settings.max_new_tokens)
            except UserError as e:
                refused[i] = e
    todo = [p for i, p in enumerate(batch) if i not in refused]
    with mth.keep_image_features(loaded) as kept:
        outs = engine.run(loaded, todo, settings.max_new_tokens) if todo else []
    if any(m != mth.RAW for m in settings.methods):
        first = 0
        for prep, out in zip(todo, outs):
            t0, tiles = time.perf_counter(), prep.pixel_values.shape[0]
            out.methods = mth.compute(loaded, prep.ids + out.new, len(prep.ids), prep.geometry,
                                      query_rows(prep, out.new), settings.methods, kept.features[first:first + tiles])
            out.methods_s, first = time.perf_counter() - t0, first + tiles
    done = iter(outs)
    return [refused[i] if i in refused else next(done) for i in range(len(batch))]


def write(loaded: mdl.Loaded, settings: Settings, prep: engine.Prepared, out: engine.Output, out_dir,
          replace_reference: bool = False, intervention: dict | None = None, extra_files: dict | None = None) -> dict:
    """The run directory of one prepared image and its model output (atomically). Returns a summary.
    ``intervention``: meta.intervention of an intervened run; ``extra_files``: its effects.json.
    ``out`` may be the UserError :func:`step` refused this image with: it is raised here."""
    if isinstance(out, Exception):
        raise out
    store.check_target(out_dir, replace_reference)     # never a folder of the user's
    t0 = time.perf_counter()
    tok = loaded.processor.tokenizer
    g, new, P = prep.geometry, out.new, len(prep.ids)
    ids = prep.ids + new
    tokens = tok.convert_ids_to_tokens(ids)
    layers = list(out.layers)
    query_positions = query_rows(prep, new)
    eos = set(mdl.generation_kwargs(loaded, 1)["eos_token_id"])
    proc = processor_settings(loaded, settings.longest_edge)
    info = prep.info
    layout = prep.layout
    several = len(layout) > 1 or layout.is_video
    tiles = [{"rows": a.rows, "cols": a.cols, "global_last": True,
              "resized_size": [max(a.cols, 1) * proc["tile_size"], max(a.rows, 1) * proc["tile_size"]],
              "tokens_per_tile_side": a.side} for a in layout.images]
    if layout.is_video:     # meta.image: the video (meta.video has the rest, meta.images every frame)
        image_section = {"source": info.get("source"), "size": list(prep.images[0].size), "kind": "video"}
    else:
        image_section = info
    meta = runmeta.run_meta(
        loaded, fingerprint_config(loaded, settings), prompt=settings.prompt, chat_text=prep.text,
        answer=tok.decode(new, skip_special_tokens=True).strip(), token_ids=ids, prompt_length=P, layers=layers,
        generation={"new_tokens": len(new), "stopped_at_eos": bool(new) and new[-1] in eos, "batch_size": out.batch},
        image=image_section, processor=proc, **({} if several else {"tiles": tiles[0]}))
    images = None
    if several:      # v3: every image / frame in images/NN.jpg|png, described in meta.images
        meta["images"] = [dict({k: v for k, v in i.items() if k != "decode_s"}, kind=kind, timestamp=ts, tiles=t)
                          for i, kind, ts, t in zip(prep.infos, layout.kinds, layout.timestamps, tiles)]
        images = [(im, "jpg" if i.get("format") == "JPEG" else "png") for im, i in zip(prep.images, prep.infos)]
        if layout.is_video:
            meta["video"] = {k: v for k, v in info.items() if k != "decode_s"}
    image_name = store.image_name(info)
    timings = {"preprocess_s": round(prep.seconds, 4), "generate_s": round(out.generate_s, 4), "batch": out.batch,
               "methods_s": round(out.methods_s, 4)}
    meta["timings"] = timings
    if intervention is not None:
        meta["intervention"] = intervention
    store.write_run(out_dir, tokens=tokens, layers=layers, query_positions=query_positions,
                    store=settings.store, geometry=layout if several else g, meta=meta,
                    image=None if several else prep.image, image_name=image_name, methods=out.methods,
                    images=images, replace_reference=replace_reference, extra_files=extra_files)
    timings["write_s"] = round(time.perf_counter() - t0, 4)
    first = layout.images[0]
    return {"run": str(out_dir), "answer": meta["answer"], "new_tokens": len(new), "grid": [first.rows, first.cols],
            "images": len(layout), "video": layout.is_video, "timings": timings}
