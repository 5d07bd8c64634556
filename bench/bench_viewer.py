"""Viewer latency on a real-shape run (30 layers, 9 heads, 3x4 tiles, ~50 answer tokens).

Compares GET /api/attention (cold: fresh caches; warm: layers cached) with the reference viewer's
per-click approach on the same attention (np.load of the full-format layer npz, the 3x4 map on a
1536x2048 canvas, hot colour map, PNG via PIL, base64), then runs C concurrent clients x N requests
against a real local server and counts errors.

    python bench/bench_viewer.py [--layers 30 --heads 9 --answer 50 --clients 8 --requests 200]
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import logging
import random
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
from viewer import create_app  # noqa: E402

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


def bench_api(run_dir: Path, positions, layers, heads, warm_n: int, cold_n: int, rng):
    cold = []
    for _ in range(cold_n):                      # a fresh app each time: every layer read from disk
        client = create_app({"RUN": str(run_dir)}).test_client()
        t = time.perf_counter()
        assert client.get(f"/api/attention?{query(rng, rng.choice(positions), layers, heads)}").status_code == 200
        cold.append(time.perf_counter() - t)
    for p in positions:                          # the client caches layers for all tokens at once anyway
        client.get(f"/api/attention?index={p}")
    warm = []
    for _ in range(warm_n):
        url = f"/api/attention?{query(rng, rng.choice(positions), layers, heads)}"
        t = time.perf_counter()
        resp = client.get(url)
        warm.append(time.perf_counter() - t)
        assert resp.status_code == 200, resp.get_json()
    return cold, warm, client


def hammer(run_dir: Path, positions, layers, heads, clients: int, requests: int):
    from werkzeug.serving import make_server
    server = make_server("127.0.0.1", 0, create_app({"RUN": str(run_dir)}), threaded=True)
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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--answer", type=int, default=50, help="answer tokens")
    p.add_argument("--warm", type=int, default=300, help="warm requests")
    p.add_argument("--cold", type=int, default=10, help="cold requests (a fresh app each)")
    p.add_argument("--reference", type=int, default=40, help="reference-route requests")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=200, help="requests per client")
    args = p.parse_args(argv)
    rng = random.Random(0)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)   # no access log lines
    with tempfile.TemporaryDirectory(prefix="bench_viewer_") as tmp:
        t = time.perf_counter()
        compact, reference, positions = build(Path(tmp), args.layers, args.heads, args.answer)
        tokens = store.Run(reference).tokens
        print(f"run: {args.layers} layers x {args.heads} heads, {len(tokens)} tokens, {ROWS}x{COLS} tiles, "
              f"{len(positions)} selectable tokens (built in {time.perf_counter() - t:.1f} s)")

        ref_times = []
        for _ in range(args.reference):
            t = time.perf_counter()
            reference_route(reference, rng.randrange(args.layers), rng.randrange(args.heads), rng.choice(positions), tokens)
            ref_times.append(time.perf_counter() - t)
        cold, warm, client = bench_api(compact, positions, args.layers, args.heads, args.warm, args.cold, rng)
        gen = []
        for _ in range(50):
            body = {"word_index": rng.choice(positions), "layer": rng.randrange(args.layers),
                    "head": rng.randrange(args.heads), "threshold": 0}
            t = time.perf_counter()
            assert client.post("/api/generate_attention_map", json=body).status_code == 200
            gen.append(time.perf_counter() - t)
        ref_cold, ref_warm, _ = bench_api(reference, positions, args.layers, args.heads, 100, 3, rng)

        print(f"reference route (npz read + map + PNG) : {pct(ref_times)}")
        print(f"/api/attention cold (fresh caches)     : {pct(cold)}")
        print(f"/api/attention warm                    : {pct(warm)}")
        print(f"/api/generate_attention_map warm       : {pct(gen)}")
        print(f"/api/attention on full-format data     : cold {pct(ref_cold)}")
        print(f"                                         warm {pct(ref_warm)}")
        r50 = np.percentile(ref_times, 50) / np.percentile(warm, 50)
        r95 = np.percentile(ref_times, 95) / np.percentile(warm, 95)
        w95 = np.percentile(warm, 95) * 1000
        print(f"speed-up warm vs reference: {r50:.0f}x at p50, {r95:.0f}x at p95 "
              f"(goal >= 20x; warm p95 {w95:.1f} ms, goal <= 25 ms: {'met' if w95 <= 25 and r95 >= 20 else 'NOT met'})")

        errors, times, wall = hammer(compact, positions, args.layers, args.heads, args.clients, args.requests)
        n = args.clients * args.requests
        print(f"{args.clients} clients x {args.requests} requests on 127.0.0.1: {len(errors)} errors, "
              f"{n / wall:.0f} req/s, {pct(times)}")
        for e in errors[:5]:
            print("  error:", e)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
