"""Live viewer speed (issue 20), ratios against baselines measured in this same run:

1. Ask -> first streamed token: a real local server (werkzeug, threaded) with the live worker; the
   time from the POST of /api/live/ask (an uploaded 640x480 photo) to the first server-sent event that
   carries a token, with the event stream already open (as the page has it), against the CLI path's
   preprocessing + prefill of the same request in this process (extract.extract with the model loaded,
   to its first generated token; the same torch threads as the worker). Goal <= 1.2x.
2. An intervention rerun (two heads ablated: the core's intervene, through the worker) against a plain
   rerun of the same run's configuration (an ask of the same image, prompt and tokens), both from
   submit to done. Goal <= 1.15x.
3. Read-only routes (/api/runs, /api/initialize, /api/attention, /api/image) p95 latency idle and while a
   long job runs. Goal <= 2x.

    python bench/bench_live.py [--shape tiny|smolvlm-256m] [--rounds 3] [--tokens 32] [--requests 60]

Stand-in weights (random): timings only. Prints one line per figure.
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import shutil
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from PIL import Image  # noqa: E402
from smolattn import standin  # noqa: E402


def photo(path: Path, size=(640, 480)) -> Path:
    im = Image.effect_noise(size, 40).convert("RGB")
    im.paste((200, 60, 40), (200, 120, 420, 360))
    im.save(path, quality=92)
    return path


class Client:
    def __init__(self, url: str, token: str):
        self.url, self.token = url, token

    def get(self, path: str) -> bytes:
        with urllib.request.urlopen(self.url + path, timeout=600) as r:
            return r.read()

    def post(self, path: str, body: bytes, ctype: str) -> dict:
        req = urllib.request.Request(self.url + path, data=body, method="POST",
                                     headers={"Content-Type": ctype, "X-Live-Token": self.token})
        with urllib.request.urlopen(req, timeout=600) as r:
            return json.loads(r.read())

    def ask(self, fields: dict, file: Path | None = None) -> dict:
        boundary = uuid.uuid4().hex
        parts = []
        for k, v in fields.items():
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode())
        if file is not None:
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{file.name}"\r\n'
                         f'Content-Type: application/octet-stream\r\n\r\n'.encode() + file.read_bytes() + b"\r\n")
        parts.append(f"--{boundary}--\r\n".encode())
        return self.post("/api/live/ask", b"".join(parts), f"multipart/form-data; boundary={boundary}")


class Events:
    """The page's event stream, read in a thread: the time each job first showed a token / finished."""

    def __init__(self, url: str):
        self.first, self.done, self.lock = {}, {}, threading.Lock()
        self.resp = urllib.request.urlopen(url + "/api/live/events", timeout=600)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.resp:
            if not line.startswith(b"data: "):
                continue
            now = time.perf_counter()
            for job in json.loads(line[6:])["jobs"]:
                with self.lock:
                    if job["tokens"] >= 1 and job["id"] not in self.first:
                        self.first[job["id"]] = now
                    if job["status"] in ("done", "failed", "cancelled") and job["id"] not in self.done:
                        self.done[job["id"]] = (now, job["status"], job["error"])

    def wait(self, table: str, job: str, timeout=1800.0) -> float:
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < timeout:
            with self.lock:
                if job in getattr(self, table):
                    return getattr(self, table)[job]
            time.sleep(0.002)
        raise RuntimeError(f"job {job} did not reach {table}")


def p95(xs):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(0.95 * (len(xs) - 1))))]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="tiny", help="stand-in shape (tiny, smolvlm-256m = the real shape)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=32, help="max new tokens of the plain / intervened reruns")
    ap.add_argument("--requests", type=int, default=60, help="read-only requests per route and condition")
    args = ap.parse_args()
    sys.stdout.reconfigure(line_buffering=True)      # each figure as it comes, also into a file
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    import torch
    from werkzeug.serving import make_server

    from smolattn import extract as ex
    from smolattn import model as mdl
    from viewer import create_app
    from viewer.jobs import Live, worker_threads

    model_dir = str(standin.ensure(args.shape))
    tmp = Path(tempfile.mkdtemp(prefix="bench-live-"))
    try:
        img = photo(tmp / "photo.jpg")
        prompt = "Is there a red box in the image?"
        root = tmp / "runs"
        root.mkdir()
        # -- the CLI's preprocessing + prefill, in this process, the worker's threads ----------------
        torch.set_num_threads(worker_threads())
        loaded = mdl.load(model_dir, "cpu")
        settings = ex.Settings(prompt, 1)

        class First:
            def __init__(self):
                self.seen, self.t = False, None

            def put(self, value):
                if self.seen and self.t is None:
                    self.t = time.perf_counter()
                self.seen = True

            def end(self):
                pass

        def cli_first(k):
            s = First()
            t0 = time.perf_counter()
            with mdl.streaming(s):
                ex.extract(loaded, img, tmp / f"cli{k}", settings)   # open, prepare, prefill + first token
            return s.t - t0

        cli_first(-1)   # warm-up
        worker = Live({"id": model_dir, "device": "cpu"})
        worker.wait_ready(1800)
        app = create_app({"RUNS": str(root), "CACHE_DIR": str(tmp / "cache"), "LIVE": worker})
        srv = make_server("127.0.0.1", 0, app, threaded=True)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{srv.server_port}"
        html = urllib.request.urlopen(url + "/live").read().decode()
        c = Client(url, html.split('name="live-token" content="')[1].split('"')[0])
        ev = Events(url)
        fields = {"prompt": prompt, "max_new_tokens": "1"}
        first = ev.wait("done", c.ask(fields, img)["job"])       # warm-up of the worker
        live_s, cli_s = [], []
        for k in range(args.rounds):   # interleaved, so drift on a shared machine hits both
            cli_s.append(cli_first(k))
            t0 = time.perf_counter()
            job = c.ask(fields, img)["job"]
            live_s.append(ev.wait("first", job) - t0)
            ev.wait("done", job)
        print(f"[{args.shape}] ask -> first streamed token {statistics.median(live_s):.3f}s vs CLI preprocess + prefill "
              f"{statistics.median(cli_s):.3f}s (same request, {worker.threads} threads): "
              f"{statistics.median(live_s) / statistics.median(cli_s):.3f}x  (goal <= 1.2x; medians of {args.rounds})")

        # -- plain rerun vs intervention rerun ---------------------------------------------------------------
        base = c.ask({"prompt": prompt, "max_new_tokens": str(args.tokens)}, img)
        end = ev.wait("done", base["job"])
        assert end[1] == "done", end
        name = base["run"]
        try:
            from smolattn import interventions  # noqa: F401
            have_core = True
        except ImportError:
            have_core = False
        if have_core:
            import argparse as _ap

            from smolattn import interventions as ivc

            def cli_intervene(k):   # intervene.py's path in this process, the model loaded: the same spec
                p = _ap.ArgumentParser()
                ivc.add_arguments(p)
                argv = ["--run", str(root / name), "--ablate-heads", "0:0,1:1", "--output-dir", str(tmp / f"cli-iv{k}")]
                t0 = time.perf_counter()
                pl = ivc.plan(p.parse_args(argv), argv)
                ivc.check_output(pl)
                ivc.intervene(pl, loaded=loaded)
                return time.perf_counter() - t0

            def live_intervene():
                t0 = time.perf_counter()
                j = c.post("/api/live/intervene", json.dumps({"run": name, "heads": [[0, 0], [1, 1]]}).encode(),
                           "application/json")["job"]
                got = ev.wait("done", j)
                assert got[1] == "done", got
                return time.perf_counter() - t0

            cli_intervene(-1)      # warm-ups: the first pass through the core's code in each process
            live_intervene()
            plain, iv, cli = [], [], []
            for k in range(args.rounds):
                cli.append(cli_intervene(k))
                t0 = time.perf_counter()
                j = c.ask({"image_run": name, "prompt": prompt, "max_new_tokens": str(args.tokens)})["job"]
                ev.wait("done", j)
                plain.append(time.perf_counter() - t0)
                iv.append(live_intervene())
            print(f"[{args.shape}] intervention rerun (2 heads ablated) {statistics.median(iv):.3f}s vs plain rerun "
                  f"{statistics.median(plain):.3f}s ({args.tokens} max new tokens): "
                  f"{statistics.median(iv) / statistics.median(plain):.3f}x  (goal <= 1.15x; medians of {args.rounds})")
            print(f"[{args.shape}] the same intervention in this process (intervene.py's path, model loaded) "
                  f"{statistics.median(cli):.3f}s: the live job is {statistics.median(iv) / statistics.median(cli):.3f}x it")
        else:
            print(f"[{args.shape}] intervention rerun: skipped (no smolattn.interventions in this checkout)")

        # -- read-only p95 idle vs during a job ----------------------------------------------------------------
        init = json.loads(c.get(f"/api/initialize?run={name}"))
        index = init["tokens"][0]["index"]
        routes = ["/api/runs", f"/api/initialize?run={name}", f"/api/attention?run={name}&index={index}&layers=0-1",
                  f"/api/image?run={name}"]

        def running() -> bool:
            return any(j["status"] == "running" for j in worker.snapshot()["jobs"])

        def timed(busy: bool):
            out, jobs = [], []
            while len(out) < args.requests * len(routes):
                for r in routes:
                    if busy and not any(j["status"] in ("queued", "running") for j in worker.snapshot()["jobs"]):
                        jobs.append(c.ask({"prompt": prompt, "max_new_tokens": "512"}, img)["job"])
                        ev.wait("first", jobs[-1])
                    before = running()
                    t0 = time.perf_counter()
                    c.get(r)
                    dt = time.perf_counter() - t0
                    if not busy or (before and running()):     # only requests made while the model worked
                        out.append(dt)
            for j in jobs:
                c.post("/api/live/cancel", json.dumps({"job": j}).encode(), "application/json")
                ev.wait("done", j)
            return out, len(jobs)

        idle, _ = timed(False)
        busy, n_jobs = timed(True)
        print(f"[{args.shape}] read-only p95 {p95(busy) * 1e3:.1f} ms during a job vs {p95(idle) * 1e3:.1f} ms idle: "
              f"{p95(busy) / p95(idle):.2f}x  (goal <= 2x; {len(idle)} requests each over {len(routes)} routes, "
              f"{n_jobs} long job(s) running)")
        srv.shutdown()
        worker.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
