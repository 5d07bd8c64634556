"""The generic scheduler: a worker made once per process (local) or per Ray actor, fed work items.

:func:`run_engine` loads a worker once per process or actor, feeds it items, decodes the next item in
the background and hands every result to the driver; on Ray it restarts dead actors and retries
their items alone. The image-folder batch (smolattn.batch) and the POPE benchmark (benchmark.py with
smolattn.pope_runner's items and worker) use it. See docs/batch.md, "The engine layer".
"""
from __future__ import annotations

import sys
import threading
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor

from tqdm import tqdm

from .errors import DeviceError, UserError


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


def chunks(items: list, size: int) -> list[list[dict]]:
    """The Ray work items: chunks of ``size`` images (each one call to an actor's pipeline)."""
    return [items[i:i + size] for i in range(0, len(items), max(1, size))]


def split_chunk(chunk: list) -> list[list[dict]] | None:
    """A chunk's parts, to retry one image at a time after its worker process died."""
    return [[item] for item in chunk]
