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
import shutil
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from functools import partial
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from . import extract as ex
from .engine import config_hash
from . import model as mdl
from .errors import UserError
from .images import EXTENSIONS, open_image
from .store import atomic_write_text

CONFIG = "batch_config.json"


# ---------------------------------------------------------------------------------------------
# Engine layer (generic)
# ---------------------------------------------------------------------------------------------
def run_engine(items: list, make_worker, *, engine: str = "local", num_workers: int = 1,
               gpus_per_worker: float = 0, ray_address: str | None = None, prefetch=None,
               on_result=None, progress: str | None = None, cpus_per_worker: float = 1) -> None:
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
    progress: a tqdm description; shows rate and ETA."""
    if not items:
        return
    with tqdm(total=len(items), desc=progress, unit="item", disable=progress is None, dynamic_ncols=True) as bar:
        def emit(row):
            bar.update()
            if on_result is not None:
                on_result(row)

        if engine == "local":
            if num_workers != 1:
                raise ValueError("the local engine runs one worker in this process; use engine='ray' for more")
            _run_local(items, make_worker, prefetch, emit)
        elif engine == "ray":
            _run_ray(items, make_worker, num_workers, cpus_per_worker, gpus_per_worker, ray_address, prefetch, emit)
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
            emit(worker(item, current.result()))


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

    def run(self, item):
        if self.failed is not None:
            raise self.failed
        value = _prefetched(self.prefetch, item)
        with self.lock:
            return self.worker(item, value)


def _run_ray(items, make_worker, num_workers, cpus_per_worker, gpus_per_worker, ray_address, prefetch, emit):
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(address=ray_address, **({} if ray_address else {"include_dashboard": False}))
    actors = []
    try:
        actor_cls = ray.remote(_RayWorker).options(num_cpus=cpus_per_worker, num_gpus=gpus_per_worker,
                                                   max_concurrency=2, max_restarts=2, max_task_retries=2)
        actors = [actor_cls.remote(make_worker, prefetch) for _ in range(min(num_workers, len(items)))]
        todo, pending = iter(items), {}

        def submit(actor):
            item = next(todo, None)
            if item is not None:
                pending[actor.run.remote(item)] = actor

        for actor in actors * 2:
            submit(actor)
        while pending:
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            actor = pending.pop(ref)
            try:
                row = ray.get(ref)
            except ray.exceptions.RayTaskError as e:   # the worker's own exception, e.g. a UserError
                raise e.cause from e
            emit(row)
            submit(actor)
    finally:
        for actor in actors:
            ray.kill(actor)
        if started:
            ray.shutdown()


# ---------------------------------------------------------------------------------------------
# Command-line flags
# ---------------------------------------------------------------------------------------------
def add_batch_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--image-dir", required=True, help="folder of images")
    ap.add_argument("--output-root", default="smol_outputs", help="one run directory per image + manifest")
    ap.add_argument("--recursive", action="store_true", help="also look in subfolders")
    ap.add_argument("--extensions", default=",".join(EXTENSIONS), help="comma-separated, case-insensitive")
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
    """Relative POSIX paths of the images, sorted. Hidden files and folders are skipped, and so is
    ``exclude`` (the output root, when it lies inside the image folder)."""
    root = Path(image_dir)
    exclude = Path(exclude).resolve() if exclude else None
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if recursive and not d.startswith(".")
                   and (exclude is None or (Path(folder) / d).resolve() != exclude)]
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


def read_manifests(root: Path) -> dict[str, dict]:
    """The latest row per image over every manifest*.jsonl (a torn last line is ignored)."""
    latest = {}
    for path in sorted(root.glob("manifest*.jsonl")):
        for line in path.read_text(errors="replace").splitlines():
            try:
                row = json.loads(line)
                key = row["image"]
            except (ValueError, KeyError, TypeError):
                continue
            if key not in latest or row.get("finished_at", "") >= latest[key].get("finished_at", ""):
                latest[key] = row
    return latest


class Manifest:
    """Append-only JSONL; every row is flushed and fsynced before the next image counts as done."""

    def __init__(self, path: Path, truncate: bool = False):
        if not truncate and path.is_file() and path.stat().st_size:
            with open(path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                torn = f.read(1) != b"\n"          # killed in the middle of a row
        else:
            torn = False
        self.file = open(path, "w" if truncate else "a", encoding="utf-8")
        if torn:
            self.file.write("\n")

    def append(self, row: dict) -> None:
        self.file.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self):
        self.file.close()


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
    """Remove temporary run directories (``.<name>.tmp-*``) left by a killed run of these images."""
    names, n = set(names), 0
    for entry in os.scandir(root) if root.is_dir() else ():
        cut = entry.name.rfind(".tmp-")
        if entry.name.startswith(".") and cut > 0 and entry.name[1:cut] in names and entry.is_dir():
            shutil.rmtree(entry.path, ignore_errors=True)
            n += 1
    return n


# ---------------------------------------------------------------------------------------------
# The image worker
# ---------------------------------------------------------------------------------------------
def decode(item: dict):
    """Prefetch step: open the image (raises UserError for bad files)."""
    t = time.perf_counter()
    image = open_image(item["path"])
    return image, round(time.perf_counter() - t, 4)


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


def process(loaded, settings: ex.Settings, root: str, fingerprint: str, item: dict, prefetched) -> dict:
    """One image -> one manifest row (the Ray actors' worker; errors become rows, the batch goes on)."""
    t0 = time.perf_counter()
    try:
        if isinstance(prefetched, Exception):
            raise prefetched
        image, decode_s = prefetched
        s = ex.extract(loaded, item["path"], Path(root) / item["run"], settings, image=image)
        s["timings"]["decode_s"] = decode_s
        return manifest_row(item, fingerprint, s, seconds=time.perf_counter() - t0)
    except Exception as e:  # noqa: BLE001 - one bad image must not stop a days-long run
        return manifest_row(item, fingerprint, error=e, seconds=time.perf_counter() - t0)


def run_local(loaded, settings: ex.Settings, root: Path, fingerprint: str, items: list, on_result, *,
              batch_size=None, workers=None) -> None:
    """Every item through the engine's pipeline (batched generate, decode in worker processes, writes
    in writer threads); on_result(manifest row) per image as it completes, with a progress bar."""
    with tqdm(total=len(items), desc="images", unit="item", dynamic_ncols=True) as bar:
        def done(item, summary):
            row = summary if "status" in summary else manifest_row(item, fingerprint, summary)
            bar.update()
            on_result(row)

        ex.extract_many(loaded, [(it["path"], root / it["run"], it) for it in items], settings, done,
                        batch_size=batch_size, workers=workers,
                        on_error=lambda item, e: manifest_row(item, fingerprint, error=e))


def make_ray_worker(model_args: dict, settings: ex.Settings, root: str, config: dict):
    """Runs in each Ray actor: load the model once and check it gives the driver's configuration."""
    loaded = mdl.load(**model_args)
    mine = ex.fingerprint_config(loaded, settings)
    if mine != config:
        raise UserError(f"worker on {os.uname().nodename} sees another configuration than the driver: "
                        f"{mine} != {config}")
    return partial(process, loaded, settings, root, fingerprint_hash(config))


# ---------------------------------------------------------------------------------------------
# The batch
# ---------------------------------------------------------------------------------------------
def plan(args) -> list[dict]:
    """This invocation's images: discovered, named, limited, then this shard's part."""
    image_dir = Path(args.image_dir)
    rels = discover(image_dir, parse_extensions(args.extensions), args.recursive, exclude=args.output_root)
    if not rels:
        raise UserError(f"no images ({args.extensions}) in {image_dir}"
                        + ("" if args.recursive else " (use --recursive for subfolders)"))
    names = run_names(rels)
    rels = rels[: args.limit] if args.limit else rels
    return [{"image": r, "path": str(image_dir / r), "run": names[r]} for r in rels
            if in_shard(r, args.shards, args.shard_index)]


def validate(args) -> ex.Settings:
    if not Path(args.image_dir).is_dir():
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
    removed = remove_stale(root, [it["run"] for it in items])
    if removed:
        print(f"removed {removed} partial run director{'y' if removed == 1 else 'ies'} of a killed run",
              file=sys.stderr)
    if args.engine == "ray":   # the driver loads on CPU only to learn the configuration
        device = args.device or ("cuda" if args.gpus_per_worker > 0 else "cpu")
        dtype = args.dtype or ("float32" if device == "cpu" else "bfloat16")
        model_args = dict(model_id=args.model_id, device=device, dtype=dtype, revision=args.revision)
        probe = loaded or mdl.load(args.model_id, "cpu", dtype, args.revision)
        config = ex.fingerprint_config(probe, settings)
        make_worker = partial(make_ray_worker, model_args, settings, str(root), config)
        del probe
    else:
        loaded = loaded or mdl.load(args.model_id, args.device, args.dtype, args.revision)
        config = ex.fingerprint_config(loaded, settings)
    root.mkdir(parents=True, exist_ok=True)
    check_config(root, config, args.overwrite)
    fp = fingerprint_hash(config)

    latest = {} if args.overwrite else read_manifests(root)
    todo, skipped, failed_before = [], 0, []
    for it in items:
        row = latest.get(it["image"])
        if row is None or row.get("fingerprint") != fp or row.get("run") != it["run"]:
            todo.append(it)
        elif row.get("status") == "ok" and (root / it["run"] / "meta.json").is_file():
            skipped += 1
        elif row.get("status") == "error" and not args.retry_failed:
            failed_before.append(row)
        else:
            todo.append(it)

    if args.overwrite and args.shards == 1:
        for old in root.glob("manifest*.jsonl"):
            old.unlink()
    manifest = Manifest(manifest_path(root, args.shards, args.shard_index), truncate=args.overwrite)
    counts = Counter()

    def on_result(row):
        manifest.append(row)
        counts[row["status"]] += 1
        if row["status"] == "error":
            tqdm.write(f"error: {row['image']}: {row['error']}", file=sys.stderr)

    t0 = time.perf_counter()
    try:
        if args.engine == "ray":
            run_engine(todo, make_worker, engine=args.engine, num_workers=args.num_workers,
                       cpus_per_worker=args.cpus_per_worker, gpus_per_worker=args.gpus_per_worker,
                       ray_address=args.ray_address, prefetch=decode, on_result=on_result, progress="images")
        elif todo:
            run_local(loaded, settings, root, fp, todo, on_result, batch_size=args.batch_size, workers=args.workers)
    finally:
        manifest.close()
    elapsed = time.perf_counter() - t0
    n = counts["ok"] + counts["error"]
    print(f"done {counts['ok']}, skipped {skipped} (finished earlier), failed {counts['error']}"
          + (f", {len(failed_before)} failed earlier (not retried; --retry-failed)" if failed_before else "")
          + f"; {n} images in {elapsed:.1f}s = {n / elapsed if elapsed > 0 else 0:.2f} images/s"
          + f"; outputs in {root}")
    return 1 if counts["error"] or failed_before else 0
