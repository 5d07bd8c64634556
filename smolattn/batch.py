"""Batch extraction over an image folder (resumable, sharded, local or Ray).

:func:`run` - the image-folder batch behind ``extract_smolvlm_batch.py``: discovery, sharding,
output names, the manifest, resume and the configuration fingerprint. See docs/batch.md. The generic
scheduler it runs on (local or a Ray actor pool) is smolattn.scheduler's :func:`run_engine`.
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
from collections import Counter
from contextlib import ExitStack
from datetime import datetime, timezone
from functools import partial
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from . import engine as eng
from . import extract as ex
from .engine import config_hash
from . import model as mdl
from . import jsonl, outputs, store
from .errors import DeviceError, UserError, is_device_error
from .images import EXTENSIONS
from .manifest import MANIFEST_NAME, _check_row, manifest_path, manifests, read_manifests  # noqa: F401  (batch.* names)
from .scheduler import chunks, run_engine, split_chunk
from .video import EXTENSIONS as VIDEO_EXTENSIONS

CONFIG = "batch_config.json"
CONFIG_MARKER = outputs.JsonField("smolattn-batch-config",   # before the field: {"fingerprint", "config"}
                                  legacy=lambda obj: {"fingerprint", "config"} <= set(obj))
CHUNK_BATCHES = 4      # Ray: batches per call to an actor (the unit of work and of retry)


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
                   and not store.owned_run(Path(folder) / d) and not store.reference_run(Path(folder) / d)]   # runs
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


def open_manifest(path: Path) -> jsonl.Writer:
    """This shard's manifest, locked (fcntl) for the lifetime of the batch: a second batch on the same
    output root and shard stops with one line instead of writing into it."""
    return jsonl.Writer(path, lock=True, check=_check_row,
                        busy=f"{path.parent} is in use by another batch (it holds the lock on "
                                              f"{path.name}); wait for it to finish, or use another --output-root")


def manifest_layout(path: Path) -> int:
    """The ``--shards`` count a manifest's name says (manifest.jsonl: 1)."""
    m = re.fullmatch(r"manifest\.shard-\d+-of-(\d+)\.jsonl", path.name)
    return int(m.group(1)) if m else 1


def recorded_layout(root: Path) -> int | None:
    """The shard layout of the batch on ``root``: the ``shards`` its batch_config.json records (the
    first batch on the root records it), or for a root of an older version without it the one count
    its manifests name; None for a fresh root (or manifests of several counts)."""
    path = root / CONFIG
    try:
        old = json.loads(path.read_text())
    except FileNotFoundError:
        old = {}
    except (OSError, ValueError):
        raise UserError(f"{path} is not valid JSON, so not ours; it is left untouched: move it away or "
                        "choose another --output-root")
    if isinstance(old, dict) and isinstance(old.get("shards"), int):
        return old["shards"]
    counts = {manifest_layout(p) for p in manifests(root)} if root.is_dir() else set()
    return counts.pop() if len(counts) == 1 else None


def check_layout(root: Path, shards: int, overwrite: bool) -> None:
    """Refuse a batch whose ``--shards`` differs from the layout recorded on ``root`` (its shards would
    write the same runs as the other layout's), in one line, before anything is written."""
    old = None if overwrite else recorded_layout(root)
    if old is not None and old != shards:
        raise UserError(f"{root} is filled by a batch with --shards {old} (recorded in {CONFIG}); run every shard "
                        f"with --shards {old}, or pass --overwrite to start it over with --shards {shards}, "
                        f"or choose another --output-root")


def _create_exclusive(path: Path, text: str) -> bool:
    """Create ``path`` with ``text`` atomically, only if it does not exist (complete or not at all; a
    hard link of a fsynced temporary file, atomic also on NFS). False: it exists."""
    tmp = path.with_name(f".{path.name}.tmp-{os.uname().nodename}-{os.getpid()}-{threading.get_ident()}")
    outputs.write_bytes_durably(tmp, text.encode())
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    finally:
        tmp.unlink()
    outputs.fsync_path(path.parent, directory=True)
    return True


def check_config(root: Path, config: dict, overwrite: bool, shards: int = 1) -> None:
    """Record the configuration and the shard layout in batch_config.json, or refuse to mix runs made
    with another configuration or another ``--shards`` count. The first batch on a root creates the
    file atomically, so shards of one layout starting at once all pass, and of two layouts only one."""
    path, fp = root / CONFIG, fingerprint_hash(config)
    outputs.check_file(path, CONFIG_MARKER)          # a batch_config.json of the user's: one line, untouched
    text = json.dumps({"format": CONFIG_MARKER.value, "fingerprint": fp, "config": config, "shards": shards},
                      indent=1)
    if overwrite:
        outputs.replace_file(path, text.encode(), CONFIG_MARKER)    # never a file of the user's
        return
    check_layout(root, shards, overwrite)
    if not path.is_file() and _create_exclusive(path, text):
        return
    try:
        old = json.loads(path.read_text())
    except ValueError:
        raise UserError(f"{path} is not valid JSON, so not ours; it is left untouched: move it away or "
                        "choose another --output-root")
    check_layout(root, shards, overwrite)      # again: another layout may have created it meanwhile
    if old.get("fingerprint") == fp:
        if old.get("shards") is None:          # a root of an older version: record the layout now
            outputs.replace_file(path, text.encode(), CONFIG_MARKER)
        return
    before = old.get("config", {})
    changed = [f"{k}: {before.get(k)!r} -> {config.get(k)!r}" for k in sorted(set(before) | set(config))
               if before.get(k) != config.get(k)]
    raise UserError(f"{root} holds runs made with another configuration ({'; '.join(changed) or 'unknown'}). "
                    f"Pass --overwrite to recompute them, or choose another --output-root")


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
                  batch_size=None, workers=None, preparer=None, replace_reference: bool = False) -> None:
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
                                           v["max_frames"], v["keep_frame_rows"], replace_reference=replace_reference)
            except Exception as e:  # noqa: BLE001 - a bad video is its error row (a CUDA error stops: DeviceError)
                on_result(error_row(it, fingerprint, e, time.perf_counter() - t0))
                continue
            done(it, summary)
        return
    ex.extract_many(loaded, [(it["path"], Path(root) / it["run"], it) for it in items], settings, done,
                    batch_size=batch_size, workers=workers, preparer=preparer, replace_reference=replace_reference,
                    on_error=lambda item, e: error_row(item, fingerprint, e))


def run_local(loaded, settings: ex.Settings, root: Path, fingerprint: str, items: list, on_result, *,
              batch_size=None, workers=None, replace_reference: bool = False) -> None:
    """Every item through the engine's pipeline, in this process, with a progress bar."""
    with tqdm(total=len(items), desc="images", unit="item", dynamic_ncols=True) as bar:
        def done(row):
            bar.update()
            on_result(row)

        extract_items(loaded, settings, root, fingerprint, items, done, batch_size=batch_size, workers=workers,
                      replace_reference=replace_reference)


def failed_rows(fingerprint: str, chunk: list, message: str) -> list[dict]:
    """The manifest rows of a chunk whose worker kept dying on it (Ray retries exhausted; by then a
    chunk of one image)."""
    return [manifest_row(item, fingerprint, error=UserError(message)) for item in chunk]


def make_ray_worker(model_args: dict, settings: ex.Settings, root: str, config: dict, batch_size: int | None = None,
                    workers: int | None = None, replace_reference: bool = False):
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
                      preparer=preparer, replace_reference=replace_reference)
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
        mdl.video_model(args)
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
    if not args.replace_reference_run:   # the reference project's runs: replaced only on request
        store.refuse_reference_runs(root / it["run"] for it in items)
    if loaded is None:   # bad settings fail before the model loads (when its config files are here)
        ex.check_longest_edge(settings.longest_edge, ex.checkpoint_tile_size(args.model_id, args.revision))
    check_layout(root, args.shards, args.overwrite)   # before the model loads; recorded in check_config
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
        make_worker = partial(make_ray_worker, model_args, settings, str(root), config, batch_size, workers,
                              args.replace_reference_run)
        del probe
    else:
        loaded = loaded or mdl.load(args.model_id, args.device, args.dtype, args.revision)
        ex.check_longest_edge(settings.longest_edge, ex.processor_settings(loaded, None)["tile_size"])
        config = ex.fingerprint_config(loaded, settings)
    if _video_args(args):    # frame settings change a video run's content (image batches: unchanged)
        config["video"] = _video_args(args)
    with ExitStack() as held:   # --overwrite: the manifests of another layout go, unless a live batch holds one
        others = [held.enter_context(open_manifest(p)) for p in (manifests(root) if args.overwrite else [])
                  if manifest_layout(p) != args.shards]
        check_config(root, config, args.overwrite, args.shards)
        for other in others:
            other.path.unlink()
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
        run_local(loaded, settings, root, fp, todo, on_result, batch_size=args.batch_size, workers=args.workers,
                  replace_reference=args.replace_reference_run)
    elapsed = time.perf_counter() - t0
    n = counts["ok"] + counts["error"]
    print(f"done {counts['ok']}, skipped {skipped} (finished earlier), failed {counts['error']}"
          + (f", {len(failed_before)} failed earlier (not retried; --retry-failed)" if failed_before else "")
          + f"; {n} images in {elapsed:.1f}s = {n / elapsed if elapsed > 0 else 0:.2f} images/s"
          + f"; outputs in {root}")
    return 1 if counts["error"] or failed_before else 0
