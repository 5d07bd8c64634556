"""Viewer latency and memory: a real-shape run (30 layers, 9 heads, 3x4 tiles, ~50 answer tokens) and a
synthetic root of 40,000 small runs.

1. Cold open: a fresh app's first GET /api/attention, as the page asks it (the default view, served
   from the run's summary), interleaved with the previous viewer's cold cost (every layer read,
   which its first request did); also cold maps that need one layer or every layer, and a
   reference-format run (summary computed on first open, then from the cache).
2. Warm /api/attention (layers cached) vs the reference viewer's per-click approach on the same
   attention (np.load of the full-format layer npz, the 3x4 map on a 1536x2048 canvas, hot colour map,
   PNG via PIL, base64).
3. C concurrent clients x N requests against a real local server (errors counted).
4. A root of 40,000 runs made with links to one run's files, with a batch manifest: viewer start (a
   fresh process, imports included, to the first /api/runs answer), /api/runs?q= search latency vs
   the previous viewer's walk of the root, and the RSS of a fresh process browsing 1,000 different
   runs (initialize + default map + a one-layer map each) against its cache size.
5. The same root without manifests: ``app.py --runs ROOT`` started as a user starts it, timed from
   the subprocess start to its first HTTP 200 on /api/runs, cold (no index cache) and on a restart
   (the index cached under --cache-dir), against the goals (<= 3 s, <= 1 s); and until every run's
   answer is read (``complete``). "Cold" means no index cache; the OS page cache is warm (the root
   was just written). ``--parts plain`` builds only this root and times only this.

    python bench/bench_viewer.py [--layers 30 --heads 9 --answer 50 --clients 8 --requests 200 --root-runs 40000]
    python bench/bench_viewer.py --parts plain [--root-runs 40000 --starts 2]
    python bench/bench_viewer.py --parts video [--frames 64 --video-shape smolvlm2-256m]

6. ``--parts video`` (issue 19): a 64-frame video run with the real-shape SmolVLM2-256M stand-in's
   token layout and store (random attention): the first map of a fresh app (/api/initialize, then the
   page's default view, whose answer holds the per-frame timeline) and the timeline of other tokens, against the goals
   (p95 <= 50 ms each) and the previous viewer's cold cost (every layer read) in the same run.
"""
from __future__ import annotations

import argparse
import base64
import gc
import io
import json
import logging
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from smolattn import geometry as geo  # noqa: E402
from smolattn import heatmap as hm  # noqa: E402
from smolattn import store, synthetic  # noqa: E402
from smolattn.analysis import find_runs  # noqa: E402
from viewer import create_app  # noqa: E402
from viewer.index import Index  # noqa: E402

ROWS, COLS = 3, 4


def build(out: Path, layers: int, heads: int, answer_len: int):
    """The same random causal attention written twice: our compact store and the full (reference) store."""
    answer = [f"Ġw{i}" for i in range(answer_len - 1)] + ["."]
    tokens, plen = synthetic.make_tokens(ROWS, COLS, answer=answer)
    g = geo.from_tokens(tokens)
    S = len(tokens)
    rng = np.random.default_rng(0)
    causal = np.tril(np.ones((S, S), np.float32))
    full = []
    for _ in range(layers):
        a = rng.random((heads, S, S), dtype=np.float32) ** 4 * causal
        full.append((a / a.sum(-1, keepdims=True)).astype(np.float16))
    first, last = g.image_block
    q = np.array([i for i in range(S) if not first <= i <= last])
    meta = {"model": {"id": "synthetic-bench", "standin": True}, "prompt_length": plen,
            "image": {"size": [640, 480]}}
    image = synthetic.test_image((640, 480))
    compact = store.write_run(out / "compact", tokens=tokens, layers=[a[:, q] for a in full], query_positions=q,
                              store="compact", geometry=g, meta=meta, image=image)
    reference = store.write_run(out / "reference", tokens=tokens, layers=full, query_positions=np.arange(S),
                                store="full", geometry=g, meta=meta, image=image)
    return compact, reference, [int(p) for p in q if p >= plen - 6]   # prompt words + answer


def reference_route(run_dir: Path, layer: int, head: int, index: int, tokens) -> str:
    """What the reference viewer does per click (matplotlib replaced by PIL, which is faster)."""
    with np.load(run_dir / store.FULL_FILE.format(layer)) as z:
        row = z["attention"][0, head, index, :].astype(np.float32)
    canvas = np.zeros((ROWS * 512, COLS * 512), np.float32)
    for i, tok in enumerate(tokens):
        m = geo.ROW_COL.match(tok)
        if m:
            r, c = int(m.group(1)) - 1, int(m.group(2)) - 1
            block = np.kron(row[i + 1:i + 65].reshape(8, 8), np.ones((64, 64), np.float32))
            canvas[r * 512:(r + 1) * 512, c * 512:(c + 1) * 512] = block
    lo, hi = canvas.min(), canvas.max()
    canvas = (canvas - lo) / (hi - lo) if hi > lo else np.full_like(canvas, 0.5)
    png = Image.fromarray(hm.hot(canvas)).resize((682, 512), Image.NEAREST)
    buf = io.BytesIO()
    png.save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def pct(times_s) -> str:
    ms = np.array(times_s) * 1000
    return f"p50 {np.percentile(ms, 50):8.2f} ms   p95 {np.percentile(ms, 95):8.2f} ms   (n={len(ms)})"


def query(rng, index, layers: int, heads: int) -> str:
    a = rng.randrange(layers)
    spec = rng.choice([f"{a}", f"{a}-{rng.randrange(a, layers)}", f"0-{layers - 1}"])
    return (f"index={index}&layers={spec}&heads={rng.choice(['mean', 'max', str(rng.randrange(heads))])}"
            f"&drop_sink={rng.choice('01')}&norm={rng.choice(['map', 'shared'])}")


CPU = {}   # label -> CPU seconds of each timed request (this process), next to the wall times


def cold_open(run_dir: Path, url: str, cache_dir: Path, label: str = "") -> float:
    """Seconds for a fresh app's first request (a restart: nothing cached in memory)."""
    client = create_app({"RUN": str(run_dir), "CACHE_DIR": str(cache_dir)}).test_client()
    t, c = time.perf_counter(), time.process_time()
    resp = client.get(url)
    elapsed = time.perf_counter() - t
    CPU.setdefault(label, []).append(time.process_time() - c)
    assert resp.status_code == 200, resp.get_json()
    return elapsed


def every_layer(run_dir: Path, layers: int) -> float:
    """The previous viewer's cold cost: its first /api/attention read every layer (for the overview
    and the shared colour scale) before drawing anything."""
    t = time.perf_counter()
    run = store.Run(run_dir)
    np.stack([run.layer(i).image[:, 0] for i in range(layers)])
    return time.perf_counter() - t


def bench_cold(run_dir: Path, positions, layers, heads, n: int, rng, cache_dir: Path):
    first = positions[6]   # the page opens on the first answer token, default settings
    new, old, one, every = [], [], [], []
    for _ in range(n):     # interleaved, so drift hits both
        new.append(cold_open(run_dir, f"/api/attention?index={first}&norm=map", cache_dir, label="cold"))
        old.append(every_layer(run_dir, layers))
        one.append(cold_open(run_dir, f"/api/attention?index={rng.choice(positions)}&layers={rng.randrange(layers)}"
                                      f"&heads={rng.randrange(heads)}", cache_dir))
    for _ in range(max(2, n // 5)):
        every.append(cold_open(run_dir, f"/api/attention?index={rng.choice(positions)}&layers=0-{layers - 1}&heads=max",
                               cache_dir))
    return new, old, one, every


def bench_warm(run_dir: Path, positions, layers, heads, n: int, rng, cache_dir: Path):
    client = create_app({"RUN": str(run_dir), "CACHE_DIR": str(cache_dir)}).test_client()
    client.get(f"/api/attention?index={positions[0]}&layers=0-{layers - 1}&heads=0")   # every layer cached
    warm = []
    for _ in range(n):
        url = f"/api/attention?{query(rng, rng.choice(positions), layers, heads)}"
        t, c = time.perf_counter(), time.process_time()
        resp = client.get(url)
        warm.append(time.perf_counter() - t)
        CPU.setdefault("warm", []).append(time.process_time() - c)
        assert resp.status_code == 200, resp.get_json()
    return warm, client


def hammer(run_dir: Path, positions, layers, heads, clients: int, requests: int, cache_dir: Path):
    from werkzeug.serving import make_server
    server = make_server("127.0.0.1", 0, create_app({"RUN": str(run_dir), "CACHE_DIR": str(cache_dir)}), threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_port}"
    urllib.request.urlopen(f"{base}/api/attention?index={positions[0]}").read()   # load the layers once
    errors, times = [], []

    def worker(seed):
        rng = random.Random(seed)
        for _ in range(requests):
            url = f"{base}/api/attention?{query(rng, rng.choice(positions), layers, heads)}"
            t = time.perf_counter()
            try:
                with urllib.request.urlopen(url, timeout=30) as resp:   # raises on any non-2xx status
                    if json.loads(resp.read()).get("success") is not True:
                        errors.append(f"{url}: success is not true")
            except (urllib.error.URLError, OSError, ValueError) as e:
                errors.append(f"{url}: {e!r}")
            times.append(time.perf_counter() - t)
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    server.shutdown()
    return errors, times, wall


# -- a root of 40,000 runs ------------------------------------------------------------------------
WORDS = "cat dog zebra skier bus train pizza sofa horse kite surfer clock bench giraffe boat".split()


def build_root(root: Path, n: int, manifest: bool = True) -> float:
    """n run directories made cheaply: meta.json copied (so every run has its own on-disk identity),
    tokens, summary and image hard-linked, the attention folder a symlink to one source run's; plus
    (``manifest``) a batch manifest with an answer per image."""
    t = time.perf_counter()
    src = Path(synthetic.make_run(root / ".source", 3, 4, layers=4, heads=3))
    files = [f.name for f in src.iterdir() if f.is_file() and f.name != "meta.json"]
    rows = []
    for k in range(n):
        name = f"COCO_val2014_{k:012d}"
        d = root / name
        d.mkdir()
        shutil.copyfile(src / "meta.json", d / "meta.json")
        for f in files:
            os.link(src / f, d / f)
        os.symlink("../.source/attention", d / "attention")
        a, b = WORDS[k % len(WORDS)], WORDS[(k // len(WORDS)) % len(WORDS)]
        rows.append(json.dumps({     # a row as the batch writes it (docs/batch.md)
            "image": f"{name}.jpg", "run": name, "status": "ok", "error": None,
            "timings": {"decode_s": 0.004, "preprocess_s": 0.05, "generate_s": 3.1, "write_s": 0.02, "total_s": 3.2},
            "answer": f"A {a} next to a {b} ({k}).", "new_tokens": 9, "grid": [3, 4], "fingerprint": "3f9a0c12d4e5",
            "finished_at": f"2026-11-27T16:40:{k % 60:02d}.123456+00:00"}))
    if manifest:
        (root / "manifest.jsonl").write_text("\n".join(rows) + "\n")
    return time.perf_counter() - t


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far (Linux /proc; NaN elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")


def app_start(root: Path, cache_dir: Path, n: int) -> tuple[float, float | None, dict, float]:
    """``app.py --runs root`` in a fresh process: (seconds from the subprocess start to the first HTTP
    200 on /api/runs, seconds until the index is complete (None: it was at the first answer), first body,
    CPU seconds the process had used at that first answer)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/api/runs?limit=200"
    app_py = Path(__file__).resolve().parent.parent / "app.py"
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(app_py), "--runs", str(root), "--port", str(port),
                             "--cache-dir", str(cache_dir)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        first = body = None
        while time.perf_counter() - t0 < 120:
            if proc.poll() is not None:
                raise SystemExit(f"app.py exited with {proc.returncode}: {proc.stderr.read().decode()[-2000:]}")
            try:
                with urllib.request.urlopen(url, timeout=30) as resp:
                    got = json.loads(resp.read())
            except (urllib.error.URLError, OSError):
                time.sleep(0.01)
                continue
            if first is None:
                first, body, cpu = time.perf_counter() - t0, got, cpu_s(proc.pid)
                assert got["total"] == n, got["total"]
            if got.get("complete", True):
                return first, (None if got is body else time.perf_counter() - t0), body, cpu
            time.sleep(0.1)
        raise SystemExit("app.py did not answer /api/runs completely within 120 s")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def bench_plain_start(root: Path, tmp: Path, n: int, starts: int) -> None:
    """Item 5: app.py's first /api/runs on a root without manifests, cold and on a restart."""
    cold, full, warm, cold_cpu, warm_cpu = [], [], [], [], []
    for k in range(starts):
        cache = tmp / f"plain-cache{k}"
        first, complete, body, cpu = app_start(root, cache, n)            # no index cache yet
        cold.append(first)
        cold_cpu.append(cpu)
        full.append(complete if complete is not None else first)
        again = app_start(root, cache, n)                                 # a restart: the index cached
        warm.append(again[0])
        warm_cpu.append(again[3])
        if k == 0:
            state = "complete" if body.get("complete", True) else f"still reading {body['pending']} answers"
    print(f"\nroot of {n} runs without manifests: app.py --runs ROOT, subprocess start -> first HTTP 200 on "
          f"/api/runs (first answer: {state}):")
    print(f"  cold (no index cache)      : {' '.join(f'{x:.2f}' for x in cold)} s  (goal <= 3 s: "
          f"{'met' if max(cold) <= 3 else 'NOT met'}); every answer read after {' '.join(f'{x:.1f}' for x in full)} s")
    print(f"  restart (index cache)      : {' '.join(f'{x:.2f}' for x in warm)} s  (goal <= 1 s: "
          f"{'met' if max(warm) <= 1 else 'NOT met'})")
    print(f"  CPU s of app.py at its first answer: cold {' '.join(f'{x:.2f}' for x in cold_cpu)}, restart "
          f"{' '.join(f'{x:.2f}' for x in warm_cpu)} (wall > CPU: other processes; os.getloadavg() "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")


def bench_plain(n: int, starts: int) -> None:
    with tempfile.TemporaryDirectory(prefix="bench_viewer_plain_") as tmp:
        root = Path(tmp) / "runs"
        root.mkdir()
        built = build_root(root, n, manifest=False)
        print(f"built {n} runs without a manifest in {built:.1f} s")
        bench_plain_start(root, Path(tmp), n, starts)


def walk_names(root: Path) -> list[str]:
    """The previous viewer's /api/runs: a walk of the whole root on every request."""
    return find_runs(root)


def child_start(root: str, cache_dir: str) -> None:
    """A fresh process: imports, app, first /api/runs answer; prints the seconds since it started."""
    t0 = float(os.environ["BENCH_T0"])
    from viewer import create_app as make
    client = make({"RUNS": root, "CACHE_DIR": cache_dir}).test_client()
    body = client.get("/api/runs?limit=200").get_json()
    print(json.dumps({"start_s": time.time() - t0, "total": body["total"]}))


def rss_mib(field: str = "VmRSS") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) / 1024
    return float("nan")


def child_browse(root: str, cache_dir: str, cache_mb: float, n: int) -> None:
    """A fresh process browsing n different runs (initialize, the default map, a one-layer map)."""
    from viewer import create_app as make
    app = make({"RUNS": root, "CACHE_DIR": cache_dir, "CACHE_MB": cache_mb})
    client = app.test_client()
    names = [e["name"] for e in client.get(f"/api/runs?limit={min(n, 1000)}").get_json()["runs"]]
    base = rss_mib()
    Path("/proc/self/clear_refs").write_text("5")   # reset the peak (VmHWM) to now
    for k, name in enumerate(names[:n]):
        info = client.get(f"/api/initialize?run={name}").get_json()
        index = info["tokens"][0]["index"]
        for url in (f"/api/attention?run={name}&index={index}",
                    f"/api/attention?run={name}&index={index}&layers={k % info['num_layers']}&heads=0"):
            assert client.get(url).status_code == 200
    health = client.get("/api/health").get_json()
    print(json.dumps({"base_mib": base, "peak_mib": rss_mib("VmHWM"), "end_mib": rss_mib(), "runs": len(names[:n]),
                      "layers": health["layers"], "summaries": health["summaries"]}))


def child(mode: str, *args) -> dict:
    env = {**os.environ, "BENCH_T0": repr(time.time()), "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    done = subprocess.run([sys.executable, __file__, "--child", mode, *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=900)
    if done.returncode:
        raise SystemExit(f"child {mode} failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_root(n: int, browse: int, cache_mb: float, queries: int, rng, plain_starts: int = 2) -> None:
    with tempfile.TemporaryDirectory(prefix="bench_viewer_root_") as tmp:
        root, cache = Path(tmp) / "runs", Path(tmp) / "cache"
        root.mkdir()
        built = build_root(root, n)
        firsts = [child("start", root, Path(tmp) / f"fresh{k}") for k in range(3)]   # no index cache yet
        starts = [child("start", root, cache) for _ in range(4)][1:]                    # a restart: cached index
        assert all(s["total"] == n for s in firsts + starts)
        first, start = [s["start_s"] for s in firsts], [s["start_s"] for s in starts]
        print(f"\nroot of {n} runs (links to one run, built in {built:.1f} s), batch manifest "
              f"({(root / 'manifest.jsonl').stat().st_size / 1e6:.1f} MB)")
        print(f"viewer start (fresh process, imports + app + first /api/runs): first ever {' '.join(f'{x:.2f}' for x in first)} s"
              f" (every manifest row read); restart {' '.join(f'{x:.2f}' for x in start)} s (index cache)"
              f"  (goal <= 3 s: {'met' if max(first + start) <= 3 else 'NOT met'})")
        os.rename(root / "manifest.jsonl", root / "batch.jsonl.off")   # no manifest: the fallback scan
        t = time.perf_counter()
        scanned = len(Index(root, inline_details=n))
        print(f"without a manifest: one scan of the {scanned} run directories, every meta.json read, in "
              f"{time.perf_counter() - t:.1f} s (in this process)")
        bench_plain_start(root, Path(tmp), n, plain_starts)
        os.rename(root / "batch.jsonl.off", root / "manifest.jsonl")

        client = create_app({"RUNS": str(root), "CACHE_DIR": str(cache)}).test_client()
        client.get("/api/runs")
        terms = [rng.choice(WORDS) for _ in range(queries // 2)] + [str(rng.randrange(n)) for _ in range(queries // 2)]
        times, old = [], []
        for k, q in enumerate(terms):
            t = time.perf_counter()
            body = client.get(f"/api/runs?q={q}&limit=200").get_json()
            times.append(time.perf_counter() - t)
            assert body["success"] and body["total"] > 0
            if k % max(1, queries // 10) == 0:        # the previous viewer: a walk of the root per keystroke
                t = time.perf_counter()
                [x for x in walk_names(root) if q in x.lower()]
                old.append(time.perf_counter() - t)
        p95 = np.percentile(times, 95) * 1000
        print(f"/api/runs?q=… (name/answer search, 200 per page): {pct(times)}  (goal p95 <= 50 ms: "
              f"{'met' if p95 <= 50 else 'NOT met'})")
        print(f"previous viewer (walk the root per request)   : {pct(old)}  -> {np.median(old) / np.median(times):.0f}x "
              "slower at p50")
        sort_t = []
        for sort in ("answer", "grid", "error", "name"):
            t = time.perf_counter()
            client.get(f"/api/runs?sort={sort}&desc=1&offset={n // 2}")
            sort_t.append(time.perf_counter() - t)
        print(f"/api/runs sorted (first request of each sort): {' '.join(f'{x * 1000:.0f}' for x in sort_t)} ms")

        b = child("browse", root, cache, cache_mb, browse)
        goal = cache_mb + 200
        print(f"browse {b['runs']} different runs (initialize + default map + one-layer map each), --cache-mb {cache_mb:g}:")
        print(f"  RSS before {b['base_mib']:.0f} MiB, peak {b['peak_mib']:.0f} MiB, end {b['end_mib']:.0f} MiB "
              f"(goal peak <= cache + 200 = {goal:.0f} MiB: {'met' if b['peak_mib'] <= goal else 'NOT met'})")
        for k in ("layers", "summaries"):
            c = b[k]
            print(f"  {k:9s} cache: {c['entries']} entries, {c['size'] / 1e6:.1f} of {c['capacity'] / 1e6:.0f} MB, "
                  f"{c['hits']} hits, {c['misses']} misses")


def reference_plain(full_run: Path, out: Path) -> Path:
    """The full-store run as the reference project lays it out: tokens, image and attentions_5 only
    (no meta.json, no summary), hard-linked."""
    (out / "attentions_5").mkdir(parents=True)
    for f in ["decoded_tokens.npy", "image.png"] + [f"attentions_5/{p.name}" for p in (full_run / "attentions_5").iterdir()]:
        os.link(full_run / f, out / f)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--answer", type=int, default=50, help="answer tokens")
    p.add_argument("--warm", type=int, default=300, help="warm requests")
    p.add_argument("--cold", type=int, default=20, help="cold requests (a fresh app each)")
    p.add_argument("--reference", type=int, default=40, help="reference-route requests")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=200, help="requests per client")
    p.add_argument("--root-runs", type=int, default=40000, help="runs in the synthetic root (0: skip that part)")
    p.add_argument("--browse", type=int, default=1000, help="different runs browsed for the RSS check")
    p.add_argument("--cache-mb", type=float, default=128, help="cache size of the browsing process")
    p.add_argument("--queries", type=int, default=200, help="/api/runs?q= requests")
    p.add_argument("--parts", default="run,root", help="which parts to run: run (the real-shape run), root (40,000 "
                   "runs, with and without a manifest), plain (only a root without manifests and its app.py starts)")
    p.add_argument("--starts", type=int, default=2, help="app.py starts timed on the root without manifests "
                   "(each: cold, then a restart)")
    p.add_argument("--frames", type=int, default=64, help="video part: frames of its run")
    p.add_argument("--video-shape", default="smolvlm2-256m", help="video part: the stand-in whose processor and "
                   "text shape the run has")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        mode, *rest = args.child
        if mode == "video":
            return build_video(Path(rest[0]), int(rest[1]), 16, rest[2]) and 0
        return child_start(*rest) if mode == "start" else child_browse(rest[0], rest[1], float(rest[2]), int(rest[3]))
    rng = random.Random(0)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)   # no access log lines
    errors = []
    if "run" in args.parts.split(","):
        errors = bench_run(args, rng)
    if "video" in args.parts.split(","):
        bench_video(args, rng)
    if args.root_runs and "root" in args.parts.split(","):
        bench_root(args.root_runs, args.browse, args.cache_mb, args.queries, rng, args.starts)
    elif args.root_runs and "plain" in args.parts.split(","):
        bench_plain(args.root_runs, args.starts)
    return 1 if errors else 0


# -- a 64-frame video run (issue 19) ----------------------------------------------------------------
def build_video(out: Path, frames: int, answer_len: int, shape: str) -> Path:
    """A video run with the exact token layout, kept rows and store of a real one: the frames of a clip
    made here, SmolVLM2's video prompt from the ``shape`` stand-in's processor (real-shape 256M: 30 layers
    x 9 heads), ``answer_len`` answer tokens; random causal attention (the viewer's cost does not depend on
    the values)."""
    from bench_video import make_clip
    from smolattn import engine, model as mdl, standin, video

    clip = out / "clip.mp4"
    make_clip(clip, frames)
    model_dir = standin.ensure(shape)
    cfg = json.loads((model_dir / "config.json").read_text())["text_config"]
    layers, heads = cfg["num_hidden_layers"], cfg["num_attention_heads"]
    processor = mdl.load_processor(str(model_dir))
    got = video.read(clip, 1.0, frames)
    prep = engine.prepare_video(processor, got, "What happens in this video?")
    tok = processor.tokenizer
    new = tok(" The box moves from the left to the right of the frame while the colour changes slowly.",
              add_special_tokens=False)["input_ids"][:answer_len]
    ids = prep.ids + new
    tokens = tok.convert_ids_to_tokens(ids)
    S = len(ids)
    q = np.concatenate([prep.rows, np.arange(len(prep.ids), S)])
    rng = np.random.default_rng(0)
    arrays = []
    for _ in range(layers):
        a = rng.random((heads, len(q), S), dtype=np.float32) ** 4
        a[..., np.arange(S)[None, :] > q[:, None]] = 0
        arrays.append((a / a.sum(-1, keepdims=True)).astype(np.float16))
    layout = prep.layout
    meta = {"model": {"id": f"standin-{shape} (random weights)", "standin": True}, "prompt_length": len(prep.ids),
            "prompt": "What happens in this video?", "answer": tok.decode(new), "chat_text": prep.text,
            "image": {"source": str(clip), "size": list(prep.images[0].size), "kind": "video"},
            "images": [dict(i, kind=k, timestamp=t, tiles={"rows": 0, "cols": 0})
                       for i, k, t in zip(prep.infos, layout.kinds, layout.timestamps)],
            "video": dict(prep.info)}
    run = store.write_run(out / "video", tokens=tokens, layers=arrays, query_positions=q, store="compact",
                          geometry=layout, meta=meta, images=[(im, "jpg") for im in prep.images])
    full = heads * S * S * 2 * layers
    size = sum(f.stat().st_size for f in run.rglob("*") if f.is_file())
    print(f"video run: {len(layout)} frames, {layers} layers x {heads} heads, S = {S}, {len(q)} kept rows; "
          f"{size / 1e6:.1f} MB on disk vs {full / 1e9:.2f} GB for the full store (1/{full / size:.0f})")
    return run


def bench_video(args, rng) -> None:
    """The viewer on a 64-frame run: the first map (a fresh app's first /api/attention, the page's default
    view, with the per-frame timeline in the same answer) and the timeline of other tokens and views,
    against the previous viewer's cold cost (every layer read) measured in the same run."""
    with tempfile.TemporaryDirectory(prefix="bench_viewer_video_") as tmp:
        tmp = Path(tmp)
        cache = tmp / "cache"
        t = time.perf_counter()
        # built in a child: this process, like a viewer's, never imports transformers (its ~600,000
        # objects would make each full garbage collection here a 300 ms pause no viewer has)
        subprocess.run([sys.executable, __file__, "--child", "video", str(tmp), str(args.frames), args.video_shape],
                       check=True)
        run = tmp / "video"
        positions = [int(p) for p in store.Run(run).query_positions]
        layers = store.Run(run).num_layers
        print(f"  (built in {time.perf_counter() - t:.1f} s)")
        first = positions[-16]                 # the page opens on the first answer token
        cold, old = [], []
        for _ in range(args.cold):     # what the page asks first: /api/initialize, then its first map
            gc.collect()               # the earlier apps' garbage is this loop's, not a restarted viewer's
            app = create_app({"RUN": str(run), "CACHE_DIR": str(cache)}).test_client()
            t = time.perf_counter()
            assert app.get("/api/initialize").status_code == 200
            assert app.get(f"/api/attention?index={first}&norm=map").status_code == 200
            cold.append(time.perf_counter() - t)
            old.append(every_layer(run, layers))
        client = create_app({"RUN": str(run), "CACHE_DIR": str(cache)}).test_client()
        body = client.get(f"/api/attention?index={first}&image=3").get_json()
        assert len(body["image_masses"]) == args.frames, body.get("error")
        timeline, frame, layer_cold = [], [], []
        for _ in range(args.warm):          # another token, the default view: its timeline
            t = time.perf_counter()
            r = client.get(f"/api/attention?index={rng.choice(positions)}")
            timeline.append(time.perf_counter() - t)
            assert r.status_code == 200 and len(r.get_json()["image_masses"]) == args.frames
        for _ in range(args.warm):          # a click on a frame: that frame's map, same token
            t = time.perf_counter()
            r = client.get(f"/api/attention?index={first}&image={rng.randrange(args.frames)}")
            frame.append(time.perf_counter() - t)
            assert r.status_code == 200
        for _ in range(max(5, args.cold // 2)):   # a fresh app, a one-layer view (that layer is read)
            layer_cold.append(cold_open(run, f"/api/attention?index={rng.choice(positions)}&layers="
                                             f"{rng.randrange(layers)}&heads=mean", cache))
        warm_views = []
        for _ in range(args.warm):          # warm random views (layers cached after the first reads)
            t = time.perf_counter()
            r = client.get(f"/api/attention?{query(rng, rng.choice(positions), layers, 9)}&image={rng.randrange(args.frames)}")
            warm_views.append(time.perf_counter() - t)
            assert r.status_code == 200, r.get_json()
        c95, t95 = np.percentile(cold, 95) * 1000, np.percentile(timeline, 95) * 1000
        print(f"first map (fresh app: /api/initialize + default view + timeline): {pct(cold)}")
        print(f"  previous viewer's cold cost (every layer read)               : {pct(old)}")
        print(f"  -> {np.median(old) / np.median(cold):.0f}x faster at p50 (goal p95 <= 50 ms: "
              f"{'met' if c95 <= 50 else 'NOT met'})")
        print(f"timeline of another token (default view, warm app)            : {pct(timeline)} "
              f"(goal p95 <= 50 ms: {'met' if t95 <= 50 else 'NOT met'})")
        print(f"a frame clicked (its map, same token)                         : {pct(frame)}")
        print(f"fresh app, a one-layer view + timeline (reads that layer)     : {pct(layer_cold)}")
        print(f"warm random views (layers, heads, drop-sink, norm, frame)     : {pct(warm_views)}")
        print(f"os.getloadavg() {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")


def bench_run(args, rng) -> list:
    with tempfile.TemporaryDirectory(prefix="bench_viewer_") as tmp:
        tmp = Path(tmp)
        cache = tmp / "cache"
        t = time.perf_counter()
        compact, reference, positions = build(tmp, args.layers, args.heads, args.answer)
        tokens = store.Run(reference).tokens
        print(f"run: {args.layers} layers x {args.heads} heads, {len(tokens)} tokens, {ROWS}x{COLS} tiles, "
              f"{len(positions)} selectable tokens (built in {time.perf_counter() - t:.1f} s); "
              f"summary.npz {(compact / 'summary.npz').stat().st_size / 1e3:.0f} kB, "
              f"attention/ {sum(f.stat().st_size for f in (compact / 'attention').iterdir()) / 1e6:.1f} MB")

        new, old, one, every = bench_cold(compact, positions, args.layers, args.heads, args.cold, rng, cache)
        print(f"cold open, first /api/attention (default view): {pct(new)}")
        print(f"                                      CPU time: {pct(CPU['cold'])}")
        print(f"  previous viewer's cold cost (every layer read): {pct(old)}")
        c95 = np.percentile(new, 95) * 1000
        print(f"  -> {np.median(old) / np.median(new):.0f}x faster at p50, {np.percentile(old, 95) / np.percentile(new, 95):.0f}x "
              f"at p95 (goal p95 <= 50 ms: {'met' if c95 <= 50 else 'NOT met'})")
        print(f"cold, a one-layer map (reads that layer)      : {pct(one)}")
        print(f"cold, every layer with max over heads (30 reads): {pct(every)}")

        plain = reference_plain(reference, tmp / "reference_plain")
        index = positions[6]
        first = cold_open(plain, f"/api/attention?index={index}", cache)
        again = [cold_open(plain, f"/api/attention?index={index}", cache) for _ in range(5)]
        print(f"reference-format run (no summary): first open {first * 1000:.0f} ms (summary computed, cached outside "
              f"the run), then {pct(again)}")

        ref_times = []
        for _ in range(args.reference):
            t = time.perf_counter()
            reference_route(reference, rng.randrange(args.layers), rng.randrange(args.heads), rng.choice(positions), tokens)
            ref_times.append(time.perf_counter() - t)
        warm, client = bench_warm(compact, positions, args.layers, args.heads, args.warm, rng, cache)
        gen = []
        for _ in range(50):
            body = {"word_index": rng.choice(positions), "layer": rng.randrange(args.layers),
                    "head": rng.randrange(args.heads), "threshold": 0}
            t = time.perf_counter()
            assert client.post("/api/generate_attention_map", json=body).status_code == 200
            gen.append(time.perf_counter() - t)
        print(f"reference route (npz read + map + PNG) : {pct(ref_times)}")
        print(f"/api/attention warm (random views)     : {pct(warm)}")
        print(f"                              CPU time : {pct(CPU['warm'])}")
        print(f"/api/generate_attention_map warm       : {pct(gen)}")
        r50 = np.percentile(ref_times, 50) / np.percentile(warm, 50)
        r95 = np.percentile(ref_times, 95) / np.percentile(warm, 95)
        w95 = np.percentile(warm, 95) * 1000
        print(f"speed-up warm vs reference: {r50:.0f}x at p50, {r95:.0f}x at p95 "
              f"(warm p95 {w95:.1f} ms, goal <= 5 ms: {'met' if w95 <= 5 else 'NOT met'}; "
              f"os.getloadavg() {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")

        errors, times, wall = hammer(compact, positions, args.layers, args.heads, args.clients, args.requests, cache)
        n = args.clients * args.requests
        print(f"{args.clients} clients x {args.requests} requests on 127.0.0.1: {len(errors)} errors, "
              f"{n / wall:.0f} req/s, {pct(times)}")
        for e in errors[:5]:
            print("  error:", e)
    return errors


if __name__ == "__main__":
    sys.exit(main())
