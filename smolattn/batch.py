"""Batch extraction over an image folder (resumable, sharded, local or Ray) and the generic engine.

Two layers:

* :func:`run_engine` - generic: load a worker once per process (local) or per Ray actor, feed it
  items, decode the next item in the background, hand every result row to the driver. The POPE
  benchmark uses it too.
* :func:`run` - the image-folder batch behind ``extract_smolvlm_batch.py``: discovery, sharding,
  output names, the manifest, resume and the configuration fingerprint. See docs/batch.md.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import threading
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from functools import partial
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from . import engine as eng
from . import extract as ex
from .engine import config_hash
from . import model as mdl
from . import jsonl, store
from .errors import DeviceError, UserError, is_device_error
from .images import EXTENSIONS
from .video import EXTENSIONS as VIDEO_EXTENSIONS
from .store import atomic_write_text

CONFIG = "batch_config.json"
CHUNK_BATCHES = 4      # Ray: batches per call to an actor (the unit of work and of retry)


# ---------------------------------------------------------------------------------------------
# Engine layer (generic)
# ---------------------------------------------------------------------------------------------
def run_engine(items: list, make_worker, *, engine: str = "local", num_workers: int = 1,
               gpus_per_worker: float = 0, ray_address: str | None = None, prefetch=None,
               on_result=None, progress: str | None = None, cpus_per_worker: float = 1,
               on_failure=None, retries: int = 2, size=None, split=None) -> None:
    """Run make_worker() once per process/actor (it loads the model), then worker(item, prefetched) for
    every item; on_result(result) is called in the driver, in completion order, with each item's
    return value as is (JSON-serialisable: a row dict, or a list of rows for POPE's per-image items).
    prefetch(item) (e.g. image decoding) runs one item ahead in a
    background thread (local) so it overlaps the model work; its exceptions are passed to the worker
    as the prefetched value (an Exception instance) so it can turn them into error rows.
    engine="ray": a Ray actor pool of num_workers actors (each calls make_worker once),
    ray.init(address=ray_address) (local if None), gpus_per_worker per actor. make_worker must be
    picklable (a top-level function or functools.partial). cpus_per_worker: Ray CPUs per actor; Ray
    sets OMP_NUM_THREADS to it, so it is also torch's thread count in a CPU actor.
    Ray: an actor whose process dies is restarted by Ray; the items it had in flight are tried again,
    each alone on an actor (so an innocent item is not failed with the one that kills the process), at
    most ``retries`` more times; then on_failure(item, message) gives the item's result (an error row)
    and the batch goes on (without on_failure: the error is raised). A DeviceError (CUDA error) stops
    that actor with one line on stderr; its items go to the others; when none is left it is raised.
    An item may be a chunk of work (a batch of images): split(item) -> its parts, or None for a single
    one; when a worker process dies on a chunk, its parts are retried alone (so one image that kills
    the process fails alone). progress: a tqdm description; shows rate and ETA, counting size(item)
    units per item (default 1)."""
    if not items:
        return
    size = size or (lambda item: 1)
    with tqdm(total=sum(map(size, items)), desc=progress, unit="item", disable=progress is None,
              dynamic_ncols=True) as bar:
        def emit(item, row):
            bar.update(size(item))
            if on_result is not None:
                on_result(row)

        if engine == "local":
            if num_workers != 1:
                raise ValueError("the local engine runs one worker in this process; use engine='ray' for more")
            _run_local(items, make_worker, prefetch, emit)
        elif engine == "ray":
            _run_ray(items, make_worker, num_workers, cpus_per_worker, gpus_per_worker, ray_address, prefetch, emit,
                     on_failure, retries, split)
        else:
            raise ValueError(f"unknown engine {engine!r}")


def _prefetched(prefetch, item):
    if prefetch is None:
        return None
    try:
        return prefetch(item)
    except Exception as e:  # noqa: BLE001 - handed to the worker, which makes an error row of it
        return e


def _run_local(items, make_worker, prefetch, emit):
    worker = make_worker()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch") as pool:
        upcoming = pool.submit(_prefetched, prefetch, items[0])
        for i, item in enumerate(items):
            current = upcoming
            if i + 1 < len(items):   # decode the next item while the model works on this one
                upcoming = pool.submit(_prefetched, prefetch, items[i + 1])
            emit(item, worker(item, current.result()))


class _RayWorker:
    """One actor: the worker is made once; two calls in flight per actor, so one call decodes its item
    while the other holds the model (the lock keeps model work one at a time). A failure to make the
    worker is raised by every call, so the driver gets the original exception, not a dead actor."""

    def __init__(self, make_worker, prefetch):
        self.prefetch, self.lock, self.failed = prefetch, threading.Lock(), None
        try:
            self.worker = make_worker()
        except Exception as e:  # noqa: BLE001 - re-raised in run()
            self.failed = e

    def ping(self):
        return True

    def run(self, item):
        if self.failed is not None:
            raise self.failed
        value = _prefetched(self.prefetch, item)
        with self.lock:
            return self.worker(item, value)


def _run_ray(items, make_worker, num_workers, cpus_per_worker, gpus_per_worker, ray_address, prefetch, emit,
             on_failure=None, retries: int = 2, split=None):
    import ray

    items = list(items)   # the parts of a split chunk are appended

    started = not ray.is_initialized()
    if started:
        ray.init(address=ray_address, **({} if ray_address else {"include_dashboard": False}))
    actors = []
    try:   # Ray restarts a dead actor (max_restarts=-1); the driver retries its items (see run_engine)
        actor_cls = ray.remote(_RayWorker).options(num_cpus=cpus_per_worker, num_gpus=gpus_per_worker,
                                                   max_concurrency=2, max_restarts=-1, max_task_retries=0)
        actors = [actor_cls.remote(make_worker, prefetch) for _ in range(min(num_workers, len(items)))]
        queue, suspects, tries = deque(range(len(items))), deque(), Counter()
        busy, alone, waking = {a: 0 for a in actors}, set(), set()   # busy: usable actor -> items in flight
        pending = {}   # ref -> (actor, item index, or None for a ping to an actor that is restarting)

        def submit(actor, i, isolated=False):
            pending[actor.run.remote(items[i])] = (actor, i)
            busy[actor] += 1
            if isolated:
                alone.add(actor)

        def fill():   # items that were in flight when a process died run alone, on an actor that is up
            for slot in (1, 2):   # breadth first: every idle actor gets work before any gets a second item
                for actor in busy:
                    if actor in alone or actor in waking:
                        continue
                    if suspects:
                        if busy[actor] == 0:
                            submit(actor, suspects.popleft(), isolated=True)
                        continue
                    if queue and busy[actor] < slot:
                        submit(actor, queue.popleft())

        def ping(actor):
            waking.add(actor)
            pending[actor.ping.remote()] = (actor, None)

        fill()
        while pending:
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            actor, i = pending.pop(ref)
            if i is None:                            # is the restarted actor up again?
                try:
                    ray.get(ref)
                    waking.discard(actor)
                except ray.exceptions.ActorUnavailableError:
                    time.sleep(0.2)
                    ping(actor)
                except ray.exceptions.RayError:      # gone for good
                    busy.pop(actor, None)
                    waking.discard(actor)
                    if not busy:
                        raise UserError("every Ray worker is gone; rerun to resume") from None
                fill()
                continue
            if actor in busy:
                busy[actor] -= 1
                alone.discard(actor)
            try:
                emit(items[i], ray.get(ref))
            except ray.exceptions.RayTaskError as e:   # the worker's own exception
                if not isinstance(e.cause, DeviceError):
                    raise e.cause from e             # e.g. the model could not be loaded: stop the batch
                if actor in busy:                    # a CUDA error: this actor stops, the others go on
                    print(f"error: Ray worker {actors.index(actor)} stopped: {e.cause}", file=sys.stderr)
                    del busy[actor]
                    alone.discard(actor)
                    ray.kill(actor, no_restart=True)
                if not busy:
                    raise e.cause from e
                suspects.append(i)
            except ray.exceptions.RayError as e:     # the actor's process died with the item in flight
                if actor not in busy:                # an actor stopped by us above: not this item's fault
                    queue.appendleft(i)
                    fill()
                    continue
                if actor not in waking:
                    ping(actor)                      # Ray restarts it; nothing goes to it until it answers
                parts = split(items[i]) if split is not None else None
                if parts is not None and len(parts) > 1:   # a chunk: which of its items was it? each alone,
                    for part in parts:                     # this death counted as each one's first try
                        tries[len(items)] = tries[i] + 1
                        suspects.append(len(items))
                        items.append(part)
                    fill()
                    continue
                tries[i] += 1
                if tries[i] <= retries:
                    suspects.append(i)
                elif on_failure is None:
                    raise
                else:
                    emit(items[i], on_failure(items[i], f"the worker process died on this item {tries[i]} times "
                                                        f"(retries exhausted): {type(e).__name__}"))
            fill()
    finally:
        for actor in actors:
            ray.kill(actor)
        if started:
            ray.shutdown()


# ---------------------------------------------------------------------------------------------
# Command-line flags
# ---------------------------------------------------------------------------------------------
def add_batch_args(ap: argparse.ArgumentParser) -> None:
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--image-dir", help="folder of images")
    src.add_argument("--video-dir", help="folder of videos (SmolVLM2 checkpoints): one run per video, its frames in it")
    ap.add_argument("--fps", type=float, default=None, help="--video-dir: frames sampled per second (default: the "
                    "checkpoint's video_sampling)")
    ap.add_argument("--max-frames", type=int, default=None, help="--video-dir: at most this many frames per video")
    ap.add_argument("--keep-frame-rows", action="store_true", help="--video-dir: also keep each frame's text rows")
    ap.add_argument("--output-root", default="smol_outputs", help="one run directory per image + manifest")
    ap.add_argument("--recursive", action="store_true", help="also look in subfolders")
    ap.add_argument("--extensions", default=None, help="comma-separated, case-insensitive (default: "
                    f"{','.join(EXTENSIONS)}; with --video-dir {','.join(VIDEO_EXTENSIONS)})")
    ap.add_argument("--limit", type=int, default=0, help="first N images of the sorted list (0 = all)")
    ap.add_argument("--shards", type=int, default=1, help="split the images into N shards ...")
    ap.add_argument("--shard-index", type=int, default=0, help="... and run shard I (0..N-1)")
    ap.add_argument("--retry-failed", action="store_true", help="reprocess images whose last row is an error")
    ap.add_argument("--overwrite", action="store_true",
                    help="recompute every image, also when the configuration changed")
    ap.add_argument("--engine", choices=("local", "ray"), default="local")
    ap.add_argument("--ray-address", default=None, help="Ray cluster address ('auto', HOST:6379); default: local")
    ap.add_argument("--num-workers", type=int, default=1, help="Ray actors, each loads the model once")
    ap.add_argument("--cpus-per-worker", type=float, default=1, help="CPUs per Ray actor (= torch threads on CPU)")
    ap.add_argument("--gpus-per-worker", type=float, default=0, help="GPUs per Ray actor (0 = CPU)")
    ex.add_arguments(ap)


# ---------------------------------------------------------------------------------------------
# Image folder: discovery, names, shards
# ---------------------------------------------------------------------------------------------
def parse_extensions(text: str) -> tuple[str, ...]:
    exts = tuple(sorted({("." + e.strip().lstrip(".")).lower() for e in text.split(",") if e.strip()}))
    if not exts:
        raise UserError("--extensions is empty")
    return exts


def discover(image_dir, extensions, recursive: bool = False, exclude=None) -> list[str]:
    """Relative POSIX paths of the images, sorted. Hidden files and folders are skipped, and so are
    ``exclude`` (the output root, when it lies inside the image folder) and our run directories."""
    root = Path(image_dir)
    exclude = Path(exclude).resolve() if exclude else None
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if recursive and not d.startswith(".")
                   and (exclude is None or (Path(folder) / d).resolve() != exclude)
                   and not store.owned_run(Path(folder) / d)]     # our runs (output root = image folder)
        rel = Path(folder).relative_to(root)
        found += [(rel / f).as_posix() for f in files
                  if not f.startswith(".") and os.path.splitext(f)[1].lower() in extensions]
    return sorted(found)


def run_names(rels) -> dict[str, str]:
    """Output directory name per image: its stem; where stems clash (case-insensitively, or with the
    batch's own files), the relative path with '/' -> '__' (extension kept); a clash left after that
    gets '-<8 hex of sha1(path)>' appended."""
    def clean(names):
        count = Counter(n.casefold() for n in names.values())
        return {r: count[n.casefold()] == 1 and not _reserved(n) for r, n in names.items()}

    names = {r: PurePosixPath(r).stem for r in rels}
    ok = clean(names)
    names = {r: n if ok[r] else r.replace("/", "__") for r, n in names.items()}
    ok = clean(names)
    return {r: n if ok[r] else f"{n}-{hashlib.sha1(r.encode()).hexdigest()[:8]}" for r, n in names.items()}


def _reserved(name: str) -> bool:
    """Names of the batch's own files in the output root."""
    n = name.casefold()
    return n == CONFIG or (n.startswith("manifest") and n.endswith(".jsonl"))


def in_shard(rel: str, shards: int, index: int) -> bool:
    """Shard of an image: sha1 of its relative path mod N (stable when files are added or removed)."""
    return int(hashlib.sha1(rel.encode()).hexdigest(), 16) % shards == index


# ---------------------------------------------------------------------------------------------
# Manifest and configuration
# ---------------------------------------------------------------------------------------------
fingerprint_hash = config_hash


def manifest_path(root: Path, shards: int, index: int) -> Path:
    return root / ("manifest.jsonl" if shards == 1 else f"manifest.shard-{index}-of-{shards}.jsonl")


def _check_row(row) -> str | None:
    ok = isinstance(row.get("image"), str) and row.get("status") in ("ok", "error")
    return None if ok else "not a manifest row (needs image and status)"


MANIFEST_NAME = re.compile(r"^manifest(\.shard-\d+-of-\d+)?\.jsonl$")


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


def open_manifest(path: Path) -> jsonl.Writer:
    """This shard's manifest, locked (fcntl) for the lifetime of the batch: a second batch on the same
    output root and shard stops with one line instead of writing into it."""
    return jsonl.Writer(path, lock=True, check=_check_row,
                        busy=f"{path.parent} is in use by another batch (it holds the lock on "
                                              f"{path.name}); wait for it to finish, or use another --output-root")


def check_config(root: Path, config: dict, overwrite: bool) -> None:
    """Write batch_config.json, or refuse to mix runs made with another configuration."""
    path, fp = root / CONFIG, fingerprint_hash(config)
    if path.is_file() and not overwrite:
        try:
            old = json.loads(path.read_text())
        except ValueError:
            raise UserError(f"{path} is not valid JSON; remove it or pass --overwrite")
        if old.get("fingerprint") == fp:
            return
        before = old.get("config", {})
        changed = [f"{k}: {before.get(k)!r} -> {config.get(k)!r}" for k in sorted(set(before) | set(config))
                   if before.get(k) != config.get(k)]
        raise UserError(f"{root} holds runs made with another configuration ({'; '.join(changed) or 'unknown'}). "
                        f"Pass --overwrite to recompute them, or choose another --output-root")
    atomic_write_text(path, json.dumps({"fingerprint": fp, "config": config}, indent=1))


def remove_stale(root: Path, names) -> int:
    """Clean up after killed runs of these images (store.recover): temporary run directories of dead
    processes are removed, an old run set aside by a killed replace is put back. Never touches the
    entries of a live process."""
    return store.recover(root, names)


# ---------------------------------------------------------------------------------------------
# The image worker
# ---------------------------------------------------------------------------------------------
def manifest_row(item: dict, fingerprint: str, summary: dict | None = None, error: Exception | None = None,
                 seconds: float | None = None) -> dict:
    """The manifest row of one image: its extraction summary, or the error that stopped it."""
    row = {"image": item["image"], "run": item["run"], "status": "ok", "error": None, "timings": {},
           "answer": None, "new_tokens": None, "grid": None, "fingerprint": fingerprint}
    if error is not None:
        row.update(status="error", error=str(error) if isinstance(error, UserError) else f"{type(error).__name__}: {error}")
    else:
        row.update(answer=summary["answer"], new_tokens=summary["new_tokens"], grid=summary["grid"],
                   timings=dict(summary["timings"]))
    t = row["timings"]
    t["total_s"] = round(seconds if seconds is not None else
                         t.get("preprocess_s", 0) + t.get("generate_s", 0) / t.get("batch", 1) + t.get("write_s", 0), 4)
    row["finished_at"] = datetime.now(timezone.utc).isoformat(timespec="microseconds")
    return row


def error_row(item: dict, fingerprint: str, error: Exception, seconds: float | None = None) -> dict:
    """The error row of one image. A CUDA error instead stops the worker (DeviceError, one line): the
    device is broken, and every later image would fail the same way."""
    if is_device_error(error):
        first = str(error).splitlines()[0] if str(error) else ""
        raise DeviceError(f"{item['image']}: {type(error).__name__}: {first}; the worker stopped "
                          "(rerun to resume; for out of memory, lower --longest-edge or --batch-size)") from error
    return manifest_row(item, fingerprint, error=error, seconds=seconds)


def extract_items(loaded, settings: ex.Settings, root: Path, fingerprint: str, items: list, on_result, *,
                  batch_size=None, workers=None, preparer=None) -> None:
    """Images through the engine's pipeline (batched generate, decode ahead, writes in writer threads);
    on_result(manifest row) per image as it completes. A bad image is its error row; a CUDA error
    stops the worker (DeviceError)."""
    def done(item, summary):
        on_result(summary if "status" in summary else manifest_row(item, fingerprint, summary))

    if items and items[0].get("video"):     # videos: one at a time (each is already a batch of frames)
        for it in items:
            t0 = time.perf_counter()
            try:
                v = it["video"]
                summary = ex.extract_video(loaded, it["path"], Path(root) / it["run"], settings, v["fps"],
                                           v["max_frames"], v["keep_frame_rows"])
            except Exception as e:  # noqa: BLE001 - a bad video is its error row (a CUDA error stops: DeviceError)
                on_result(error_row(it, fingerprint, e, time.perf_counter() - t0))
                continue
            done(it, summary)
        return
    ex.extract_many(loaded, [(it["path"], Path(root) / it["run"], it) for it in items], settings, done,
                    batch_size=batch_size, workers=workers, preparer=preparer,
                    on_error=lambda item, e: error_row(item, fingerprint, e))


def run_local(loaded, settings: ex.Settings, root: Path, fingerprint: str, items: list, on_result, *,
              batch_size=None, workers=None) -> None:
    """Every item through the engine's pipeline, in this process, with a progress bar."""
    with tqdm(total=len(items), desc="images", unit="item", dynamic_ncols=True) as bar:
        def done(row):
            bar.update()
            on_result(row)

        extract_items(loaded, settings, root, fingerprint, items, done, batch_size=batch_size, workers=workers)


def chunks(items: list, size: int) -> list[list[dict]]:
    """The Ray work items: chunks of ``size`` images (each one call to an actor's pipeline)."""
    return [items[i:i + size] for i in range(0, len(items), max(1, size))]


def split_chunk(chunk: list) -> list[list[dict]] | None:
    """A chunk's parts, to retry one image at a time after its worker process died."""
    return [[item] for item in chunk]


def failed_rows(fingerprint: str, chunk: list, message: str) -> list[dict]:
    """The manifest rows of a chunk whose worker kept dying on it (Ray retries exhausted; by then a
    chunk of one image)."""
    return [manifest_row(item, fingerprint, error=UserError(message)) for item in chunk]


def make_ray_worker(model_args: dict, settings: ex.Settings, root: str, config: dict, batch_size: int | None = None,
                    workers: int | None = None):
    """Runs in each Ray actor: load the model once, check it gives the driver's configuration, and
    return worker(chunk, _) -> the chunk's manifest rows (the engine's pipeline over the chunk: batched
    generate, decode ahead in this actor's own decode workers, made once, writes in writer threads)."""
    loaded = mdl.load(**model_args)
    mine = ex.fingerprint_config(loaded, settings)
    if mine != {k: v for k, v in config.items() if k != "video"}:
        raise UserError(f"worker on {os.uname().nodename} sees another configuration than the driver: "
                        f"{mine} != {config}")
    workers = eng.default_workers(loaded.device) if workers is None else workers
    preparer = eng.Preparer(loaded, settings.prompt, settings.longest_edge, settings.keep, workers)
    fingerprint = fingerprint_hash(config)

    def worker(chunk, _prefetched=None):
        rows = []
        extract_items(loaded, settings, Path(root), fingerprint, chunk, rows.append, batch_size=batch_size,
                      preparer=preparer)
        return rows

    return worker


# ---------------------------------------------------------------------------------------------
# The batch
# ---------------------------------------------------------------------------------------------
def _video_args(args) -> dict | None:
    """--video-dir's frame settings (each video item carries them; part of the configuration)."""
    if not getattr(args, "video_dir", None):
        return None
    return {"fps": args.fps, "max_frames": args.max_frames, "keep_frame_rows": bool(args.keep_frame_rows)}


def _extensions(args) -> str:
    if getattr(args, "extensions", None):
        return args.extensions
    return ",".join(VIDEO_EXTENSIONS if getattr(args, "video_dir", None) else EXTENSIONS)


def plan(args) -> list[dict]:
    """This invocation's images (or videos): discovered, named, limited, then this shard's part."""
    image_dir = Path(getattr(args, "video_dir", None) or args.image_dir)
    what = "videos" if _video_args(args) else "images"
    rels = discover(image_dir, parse_extensions(_extensions(args)), args.recursive, exclude=args.output_root)
    if not rels:
        raise UserError(f"no {what} ({_extensions(args)}) in {image_dir}"
                        + ("" if args.recursive else " (use --recursive for subfolders)"))
    names = run_names(rels)
    rels = rels[: args.limit] if args.limit else rels
    extra = {"video": _video_args(args)} if _video_args(args) else {}
    return [{"image": r, "path": str(image_dir / r), "run": names[r], **extra} for r in rels
            if in_shard(r, args.shards, args.shard_index)]


def validate(args) -> ex.Settings:
    video_dir = getattr(args, "video_dir", None)
    if video_dir:
        if not Path(video_dir).is_dir():
            raise UserError(f"--video-dir {video_dir} is not a folder")
        if (args.fps is not None and args.fps <= 0) or (args.max_frames is not None and args.max_frames < 1):
            raise UserError("--fps must be positive and --max-frames at least 1")
    elif getattr(args, "fps", None) is not None or getattr(args, "max_frames", None) is not None \
            or getattr(args, "keep_frame_rows", False):
        raise UserError("--fps, --max-frames and --keep-frame-rows are for --video-dir")
    elif not Path(args.image_dir).is_dir():
        raise UserError(f"--image-dir {args.image_dir} is not a folder")
    if args.limit < 0:
        raise UserError("--limit must be 0 (all) or positive")
    if args.shards < 1 or not 0 <= args.shard_index < args.shards:
        raise UserError(f"--shard-index must be in 0..{args.shards - 1} (and --shards at least 1)")
    if args.num_workers < 1 or args.cpus_per_worker < 0 or args.gpus_per_worker < 0:
        raise UserError("--num-workers must be at least 1, --cpus/gpus-per-worker not negative")
    if args.engine == "local" and (args.num_workers != 1 or args.gpus_per_worker or args.ray_address
                                   or args.cpus_per_worker != 1):
        raise UserError("--num-workers, --cpus-per-worker, --gpus-per-worker and --ray-address need --engine ray")
    if args.engine == "ray":
        try:
            import ray  # noqa: F401
        except ImportError:
            raise UserError("--engine ray needs Ray: pip install -r requirements-ray.txt")
    return ex.settings_from_args(args)


def run(args, loaded: mdl.Loaded | None = None) -> int:
    """The whole batch. Returns the exit status: 0 every image ok, 1 some failed.
    ``loaded``: an already loaded model (local engine; the benchmark uses it)."""
    settings = validate(args)
    items = plan(args)
    root = Path(args.output_root)
    ex.check_writable(root)
    if loaded is None:   # bad settings fail before the model loads (when its config files are here)
        ex.check_longest_edge(settings.longest_edge, ex.checkpoint_tile_size(args.model_id, args.revision))
    created = not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    manifest = open_manifest(manifest_path(root, args.shards, args.shard_index))
    try:
        return _run_locked(args, loaded, settings, items, root, manifest)
    finally:
        manifest.close()
        if manifest.created and not manifest.path.stat().st_size:   # nothing happened: leave nothing behind
            manifest.path.unlink()
            if created and not any(root.iterdir()):
                root.rmdir()


def _run_locked(args, loaded, settings, items, root: Path, manifest: jsonl.Writer) -> int:
    """The batch, with this shard's manifest locked (no other batch writes these runs meanwhile)."""
    removed = remove_stale(root, [it["run"] for it in items])
    if removed:
        print(f"cleaned up {removed} partial run director{'y' if removed == 1 else 'ies'} of a killed run",
              file=sys.stderr)
    if args.engine == "ray":   # the driver loads on CPU only to learn the configuration
        device = args.device or ("cuda" if args.gpus_per_worker > 0 else "cpu")
        dtype = args.dtype or mdl.default_dtype(device)
        model_args = dict(model_id=args.model_id, device=device, dtype=dtype, revision=args.revision)
        probe = loaded or mdl.load(args.model_id, "cpu", dtype, args.revision)
        ex.check_longest_edge(settings.longest_edge, ex.processor_settings(probe, None)["tile_size"])
        config = ex.fingerprint_config(probe, settings)
        batch_size = args.batch_size or eng.default_batch_size(device)
        workers = args.workers if args.workers is not None else min(eng.default_workers(device),
                                                                    max(0, int(args.cpus_per_worker) - 1))
        make_worker = partial(make_ray_worker, model_args, settings, str(root), config, batch_size, workers)
        del probe
    else:
        loaded = loaded or mdl.load(args.model_id, args.device, args.dtype, args.revision)
        ex.check_longest_edge(settings.longest_edge, ex.processor_settings(loaded, None)["tile_size"])
        config = ex.fingerprint_config(loaded, settings)
    if _video_args(args):    # frame settings change a video run's content (image batches: unchanged)
        config["video"] = _video_args(args)
    check_config(root, config, args.overwrite)
    fp = fingerprint_hash(config)

    latest = {} if args.overwrite else read_manifests(root)
    todo, skipped, failed_before = [], 0, []
    for it in items:
        row = latest.get(it["image"])
        if row is None or row.get("fingerprint") != fp or row.get("run") != it["run"]:
            todo.append(it)
        elif row.get("status") == "ok" and store.incomplete(root / it["run"]) is None:   # ok AND complete on disk
            skipped += 1
        elif row.get("status") == "error" and not args.retry_failed:
            failed_before.append(row)
        else:
            todo.append(it)

    if args.overwrite:
        if args.shards == 1:   # the other shards' manifests go too, unless a live batch holds one
            for old in manifests(root):
                if old != manifest.path:
                    with open_manifest(old):
                        old.unlink()
        manifest.truncate()
    counts = Counter()

    def on_result(rows):
        for row in rows if isinstance(rows, list) else [rows]:
            manifest.append(row)
            counts[row["status"]] += 1
            if row["status"] == "error":
                tqdm.write(f"error: {row['image']}: {row['error']}", file=sys.stderr)

    t0 = time.perf_counter()
    if args.engine == "ray":   # chunks of a few batches per call (fewer when there are few images per actor)
        per_actor = -(-len(todo) // args.num_workers)
        run_engine(chunks(todo, min(CHUNK_BATCHES * batch_size, max(batch_size, per_actor))), make_worker,
                   engine=args.engine,
                   num_workers=args.num_workers, cpus_per_worker=args.cpus_per_worker,
                   gpus_per_worker=args.gpus_per_worker, ray_address=args.ray_address, on_result=on_result,
                   progress="images", on_failure=partial(failed_rows, fp), size=len, split=split_chunk)
    elif todo:
        run_local(loaded, settings, root, fp, todo, on_result, batch_size=args.batch_size, workers=args.workers)
    elapsed = time.perf_counter() - t0
    n = counts["ok"] + counts["error"]
    print(f"done {counts['ok']}, skipped {skipped} (finished earlier), failed {counts['error']}"
          + (f", {len(failed_before)} failed earlier (not retried; --retry-failed)" if failed_before else "")
          + f"; {n} images in {elapsed:.1f}s = {n / elapsed if elapsed > 0 else 0:.2f} images/s"
          + f"; outputs in {root}")
    return 1 if counts["error"] or failed_before else 0
