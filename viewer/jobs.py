"""The live viewer's model: one worker process that loads the model once, and one job at a time.

The server (Flask threads) never touches torch: :class:`Live` owns a worker process (spawned, with
torch threads = the cores minus one) and one pipe to it. A job is queued with :meth:`Live.submit`; one
thread of the server sends the jobs to the worker in order and follows each: the worker sends its
phase, every generated token (a per-step streamer inside ``generate``) and, at the end, the run it wrote
or the one line that says why not. :meth:`Live.cancel` takes a queued job off the queue; a running
job's worker is killed (also in the middle of a long prefill) and started again. A killed writer leaves
only its temporary folder, which is removed here (store.recover: dead processes' entries only), and an
upload made for a job that did not finish is deleted: nothing half-written stays.
"""
from __future__ import annotations

import itertools
import logging
import os
import secrets
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from smolattn.errors import UserError

log = logging.getLogger(__name__)
KEEP_JOBS = 30            # finished jobs listed in the queue view
POLL_S = 0.05             # how often the job thread looks at a cancel request while a job runs


def worker_threads() -> int:
    """Torch threads of the worker: the cores minus one, so the server stays responsive."""
    return max(1, (os.cpu_count() or 2) - 1)


# ============================================================================ the worker process

class _Stream:
    """A transformers streamer (put/end, the BaseStreamer interface): the first put() is the prompt,
    every later one a new token; each sends the answer so far to the server."""

    def __init__(self, send, tokenizer):
        self.send, self.tok, self.ids, self.prompt_seen, self.t0 = send, tokenizer, [], False, time.perf_counter()

    def put(self, value):
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.ids.extend(int(x) for x in value.reshape(-1).tolist())
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        self.send(("token", len(self.ids), text.rstrip("\ufffd")))   # a character's later bytes still to come

    def end(self):
        self.send(("phase", "writing"))


def _ask(loaded, a: dict, send) -> dict:
    from smolattn import extract as ex
    from smolattn import model as mdl
    from smolattn.images import open_image

    settings = ex.Settings(a["prompt"], int(a["max_new_tokens"]), None, a.get("store", "compact"),
                           tuple(a["methods"])).check()
    image = open_image(a["image"])
    send(("phase", "prefill"))
    with mdl.streaming(_Stream(send, loaded.processor.tokenizer)):
        summary = ex.extract(loaded, a["image"], a["out"], settings, image=image)
    return {"run": summary["run"], "answer": summary["answer"], "new_tokens": summary["new_tokens"],
            "timings": summary["timings"]}


def _intervene(loaded, a: dict, send) -> dict:
    """An intervention or a sweep through the interventions core's Python API (intervene.py's words)."""
    import argparse

    from smolattn import interventions as iv
    from smolattn import model as mdl

    ap = argparse.ArgumentParser(prog="intervene.py", add_help=False, exit_on_error=False)
    iv.add_arguments(ap)
    try:
        args = ap.parse_args(a["argv"])
    except (argparse.ArgumentError, SystemExit) as e:
        raise UserError(f"bad intervention: {e}")
    pl = iv.plan(args, a["argv"])
    iv.check_output(pl)
    send(("phase", "prefill"))
    if pl.sweep:
        res = iv.sweep(pl, loaded=loaded)
        return {"sweep": str(res["run"]), "pixels": res["pixels"]}
    with mdl.streaming(_Stream(send, loaded.processor.tokenizer)):
        res = iv.intervene(pl, loaded=loaded)
    return {"run": res["run"], "answer": res["answer"], "pixels": res["pixels"]}


HANDLERS = {"ask": _ask, "intervene": _intervene, "sweep": _intervene}


def worker_main(conn, model: dict, threads: int) -> None:
    """The worker process: load the model once, then run the jobs the server sends, one at a time."""
    import torch

    parent = os.getppid()

    def orphaned():   # the server died (killed, no atexit): leave too, also in the middle of a job
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=orphaned, daemon=True, name="orphan-watch").start()
    torch.set_num_threads(threads)
    send = conn.send
    try:
        from smolattn import model as mdl
        loaded = mdl.load(model["id"], model.get("device"), model.get("dtype"), model.get("revision"))
    except UserError as e:
        send(("fatal", str(e)))
        return
    except Exception as e:  # noqa: BLE001 - one line for the server's startup
        send(("fatal", f"could not load the model: {type(e).__name__}: {e}"))
        return
    cfg = loaded.model.config.text_config
    send(("ready", {"model": loaded.model_id, "revision": loaded.revision, "device": loaded.device,
                    "dtype": loaded.dtype, "standin": bool(loaded.standin), "source": loaded.source,
                    "num_layers": int(cfg.num_hidden_layers), "num_heads": int(cfg.num_attention_heads),
                    "load_s": round(loaded.load_seconds, 2), "threads": threads, "pid": os.getpid()}))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        job_id, kind, args = msg
        try:
            send(("done", HANDLERS[kind](loaded, args, send)))
        except UserError as e:
            send(("error", str(e)))
        except Exception as e:  # noqa: BLE001 - the job's error; the worker keeps serving
            traceback.print_exc()
            send(("error", f"internal error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"))


# ============================================================================ the server side

@dataclass
class Job:
    id: str
    kind: str                    # "ask" | "intervene" | "sweep"
    label: str
    args: dict
    created: float = field(default_factory=time.time)
    status: str = "queued"       # queued | running | done | failed | cancelled
    phase: str = ""              # prefill | generating | writing
    tokens: int = 0
    text: str = ""
    error: str | None = None
    result: dict | None = None
    started: float | None = None
    finished: float | None = None
    first_token: float | None = None
    cancel: bool = False
    cleanup: list = field(default_factory=list)   # our files to delete when the job does not finish

    @property
    def done(self) -> bool:
        return self.status in ("done", "failed", "cancelled")

    def to_json(self, position: int | None = None) -> dict:
        end = self.finished or time.time()
        return {"id": self.id, "kind": self.kind, "label": self.label, "status": self.status, "phase": self.phase,
                "tokens": self.tokens, "max_tokens": self.args.get("max_new_tokens"), "text": self.text,
                "error": self.error, "result": self.result, "position": position,
                "target": self.args.get("name"),
                "elapsed": round(end - self.started, 2) if self.started else 0.0,
                "waited": round((self.started or end) - self.created, 2),
                "first_token_s": round(self.first_token - self.started, 3) if self.first_token and self.started else None}


class Live:
    """The worker process and its job queue. ``model``: {"id", "revision", "device", "dtype"}."""

    def __init__(self, model: dict, threads: int | None = None):
        self.model_args, self.threads = dict(model), threads or worker_threads()
        self.token = secrets.token_urlsafe(32)       # the per-server POST token the pages embed
        self.cond = threading.Condition()
        self.queue: deque[Job] = deque()
        self.jobs: dict[str, Job] = {}
        self.version = 0
        self.state, self.error, self.info = "loading", None, None
        self.restarts = 0
        self._ids = itertools.count(1)
        self._closed = False
        self.proc = self.conn = None
        self._start_worker()
        self.thread = threading.Thread(target=self._loop, daemon=True, name="live-jobs")
        self.thread.start()

    # -- the worker process ---------------------------------------------------------------------
    def _start_worker(self) -> None:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")            # a fresh process: no Flask threads or locks forked
        parent, child = ctx.Pipe()
        self.proc = ctx.Process(target=worker_main, args=(child, self.model_args, self.threads), daemon=True,
                                name="smolattn-live-worker")
        self.proc.start()
        child.close()
        self.conn = parent
        self._set(state="loading", error=None)

    def _kill_worker(self) -> None:
        if self.proc is not None and self.proc.is_alive():
            self.proc.kill()
        if self.proc is not None:
            self.proc.join(10)
        if self.conn is not None:
            self.conn.close()

    def _wait_ready(self) -> None:
        """Read the worker's first message: ready (with the model's facts) or fatal (one line)."""
        while not self._closed:
            try:
                if self.conn.poll(0.2):
                    kind, payload = self.conn.recv()
                    if kind == "ready":
                        self._set(state="ready", info=payload)
                    else:
                        self._set(state="failed", error=str(payload))
                    return
            except (EOFError, OSError):
                pass
            if not self.proc.is_alive() and not self.conn.poll(0):
                self._set(state="failed", error=f"the model worker exited while loading (exit code {self.proc.exitcode})")
                return

    def wait_ready(self, timeout: float | None = None) -> dict:
        """Block until the model is loaded; UserError (one line) when it cannot be."""
        with self.cond:
            if not self.cond.wait_for(lambda: self.state != "loading", timeout):
                raise UserError("the model did not load in time")
            if self.state == "failed":
                raise UserError(self.error)
            return self.info

    # -- state ------------------------------------------------------------------------------------
    def _set(self, **kw) -> None:
        with self.cond:
            for k, v in kw.items():
                setattr(self, k, v)
            self.version += 1
            self.cond.notify_all()

    def _update(self, job: Job, **kw) -> None:
        with self.cond:
            for k, v in kw.items():
                setattr(job, k, v)
            self.version += 1
            self.cond.notify_all()

    def snapshot(self) -> dict:
        with self.cond:
            queued = {j.id: k for k, j in enumerate(self.queue)}
            jobs = sorted(self.jobs.values(), key=lambda j: j.created, reverse=True)
            return {"version": self.version, "closed": self._closed, "state": self.state, "error": self.error,
                    "model": self.info,
                    "restarts": self.restarts, "jobs": [j.to_json(queued.get(j.id)) for j in jobs]}

    def wait_change(self, version: int, timeout: float) -> dict:
        with self.cond:
            self.cond.wait_for(lambda: self.version != version or self._closed, timeout)
        return self.snapshot()

    def job(self, job_id: str) -> Job | None:
        with self.cond:
            return self.jobs.get(job_id)

    # -- jobs ---------------------------------------------------------------------------------------
    def submit(self, kind: str, label: str, args: dict, cleanup=()) -> Job:
        with self.cond:
            if self.state == "failed":
                raise UserError(f"the model is not available: {self.error}")
            job = Job(f"{next(self._ids)}-{secrets.token_hex(3)}", kind, label, dict(args), cleanup=list(cleanup))
            self.jobs[job.id] = job
            self.queue.append(job)
            done = [j for j in sorted(self.jobs.values(), key=lambda j: j.created) if j.done]
            for old in done[:max(0, len(done) - KEEP_JOBS)]:
                del self.jobs[old.id]
            self.version += 1
            self.cond.notify_all()
            return job

    def reserved(self) -> set[str]:
        """The output folders of jobs not finished yet (new names must not collide with them)."""
        with self.cond:
            return {j.args.get("out") for j in self.jobs.values() if not j.done and j.args.get("out")}

    def cancel(self, job_id: str) -> Job:
        """Cancel a queued job at once, a running one by killing the worker (the job thread does it)."""
        with self.cond:
            job = self.jobs.get(job_id)
            if job is None:
                raise KeyError(job_id)
            if job.done:
                return job
            if job.status == "queued":
                self.queue.remove(job)
                self._finish(job, "cancelled", "cancelled by the user before it started")
            else:
                job.cancel = True
            self.version += 1
            self.cond.notify_all()
            return job

    def _finish(self, job: Job, status: str, error: str | None = None, result: dict | None = None) -> None:
        """(with self.cond held)"""
        job.status, job.error, job.result, job.finished = status, error, result, time.time()
        if status != "done":
            for path in job.cleanup:
                try:
                    Path(path).unlink(missing_ok=True)
                except OSError:
                    pass

    def _loop(self) -> None:
        while not self._closed:
            if self.state == "loading":
                self._wait_ready()
            with self.cond:
                self.cond.wait_for(lambda: self._closed or (self.queue and self.state != "loading"))
                if self._closed:
                    return
                job = self.queue.popleft()
                if self.state == "failed":
                    self._finish(job, "failed", f"the model is not available: {self.error}")
                    self.version += 1
                    self.cond.notify_all()
                    continue
                job.status, job.started, job.phase = "running", time.time(), "prefill"
                self.version += 1
                self.cond.notify_all()
            try:
                self._follow(job)
            except Exception as e:  # noqa: BLE001 - never let the job thread die
                log.exception("live job %s", job.id)
                with self.cond:
                    self._finish(job, "failed", f"internal error: {type(e).__name__}: {e}")
                self._restart()

    def _follow(self, job: Job) -> None:
        pid = self.proc.pid
        self.conn.send((job.id, job.kind, job.args))
        while True:
            # a cancel waits for messages already sent: a job that finished (its run renamed in) is done
            if job.cancel and not self._pending():
                phase = job.phase or "prefill"
                self._restart()
                self._clean_partial(job, pid)
                with self.cond:
                    self._finish(job, "cancelled", f"cancelled by the user during {phase}; the model worker was "
                                 "stopped and is started again; nothing was written")
                    self.version += 1
                    self.cond.notify_all()
                return
            try:
                ready = self.conn.poll(POLL_S)
                msg = self.conn.recv() if ready else None
            except (EOFError, OSError):
                msg, ready = None, False
                self.proc.join(1)
            if msg is None:
                if not self.proc.is_alive():
                    code = self.proc.exitcode
                    self._restart()
                    self._clean_partial(job, pid)
                    with self.cond:
                        self._finish(job, "failed", f"the model worker died (exit code {code}; out of memory?); "
                                     "it is started again; nothing was written")
                        self.version += 1
                        self.cond.notify_all()
                    return
                continue
            kind = msg[0]
            if kind == "token":
                self._update(job, tokens=msg[1], text=msg[2], phase="generating",
                             first_token=job.first_token or time.time())
            elif kind == "phase":
                self._update(job, phase=msg[1])
            elif kind in ("done", "error"):
                with self.cond:
                    if kind == "done":
                        self._finish(job, "done", result=msg[1])
                    else:
                        self._finish(job, "failed", msg[1])
                    self.version += 1
                    self.cond.notify_all()
                return

    def _pending(self) -> bool:
        try:
            return self.conn.poll(0)
        except (EOFError, OSError):
            return False

    def _restart(self) -> None:
        self._kill_worker()
        self.restarts += 1
        if not self._closed:
            self._start_worker()

    @staticmethod
    def _clean_partial(job: Job, pid: int) -> None:
        """What a killed worker left of this job's output: the one writer's temporary (or set-aside)
        folders of dead processes (runs and sweep folders alike)."""
        from smolattn import outputs

        out = job.args.get("out")
        if out:
            outputs.recover(Path(out).parent, [Path(out).name])

    def close(self) -> None:
        with self.cond:
            self._closed = True
            self.cond.notify_all()
        try:
            self.conn.send(None)
        except (OSError, ValueError):
            pass
        if self.proc is not None:
            self.proc.join(2)
        self._kill_worker()
