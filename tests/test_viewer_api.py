"""The viewer's JSON API on synthetic runs with known attention."""
from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from smolattn import synthetic
from smolattn.errors import UserError
from smolattn.store import Run
from viewer.runs import LAYER_SHARE, LRU, MAX_OPEN_RUNS

ROOT = Path(__file__).resolve().parent.parent
HOT = (5, 27)                     # tiled cell (row, col) of the one-hot in a 3 x 4 run


def tile_key(rows, cols, i, j, side=8):
    return ((i // side) * cols + j // side) * side * side + (i % side) * side + j % side


def answer_pos(rows=3, cols=4, offset=1):
    return synthetic.make_tokens(rows, cols)[1] + offset


@pytest.fixture
def run_dir(make_run):
    return make_run("hot", layers=3, heads=2, one_hot={answer_pos(): tile_key(3, 4, *HOT)})


@pytest.fixture
def hot_client(make_app, run_dir):
    return make_app(RUN=run_dir).test_client()


@pytest.fixture
def root(make_run, tmp_path):
    """A batch root: nested runs, plus a dot-dir, a temp dir and a broken run."""
    make_run("a/cat", layers=2)
    make_run("b/dog", rows=4, cols=3, image_size=(480, 640), layers=2)
    make_run(".hidden/x")
    make_run("b/.dog.tmp-123")
    (tmp_path / "runs" / "broken").mkdir()
    (tmp_path / "runs" / "broken" / "decoded_tokens.npy").write_bytes(b"garbage")
    return tmp_path / "runs"


def ok(resp):
    assert resp.status_code == 200, resp.get_json()
    body = resp.get_json()
    assert body["success"] is True
    return body


def test_initialize_keeps_the_reference_fields(client):
    body = ok(client.get("/api/initialize"))
    for key in ("prompt", "tokens", "num_layers", "num_heads", "image_url"):
        assert key in body
    assert body["prompt"] == "Can you describe this image?"
    assert body["run"] == "run" and body["standin"] is True and body["model"] == "synthetic"
    assert body["geometry"]["rows"] == 3 and body["geometry"]["cols"] == 4
    assert body["geometry"]["grid"] == [24, 32] and body["geometry"]["image_size"] == [640, 480]
    assert {t["text"] for t in body["tokens"]} >= {" skier", " &", "<", "'s"}
    kinds = {t["kind"] for t in body["token_table"]}
    assert kinds == {"prompt", "answer", "special", "marker", "image"}
    assert "query" in body["query_semantics"]
    image = client.get(body["image_url"])
    assert image.status_code == 200 and image.mimetype == "image/png"
    assert not (ROOT / "static" / "image.png").exists()   # the reference overwrote static/image.png


@pytest.mark.parametrize("rows,cols,size", [(3, 4, (640, 480)), (4, 3, (480, 640)), (4, 4, (500, 500))])
def test_attention_one_hot_lands_on_its_cell(make_run, make_app, rows, cols, size):
    i, j = rows * 8 - 3, 2
    run = make_run(one_hot={answer_pos(rows, cols): tile_key(rows, cols, i, j)}, rows=rows, cols=cols,
                   image_size=size)
    body = ok(make_app(RUN=run).test_client().get(f"/api/attention?index={answer_pos(rows, cols)}"))
    grid = np.array(body["grid"])
    assert grid.shape == (rows * 8, cols * 8) and np.array(body["global"]).shape == (8, 8)
    assert np.unravel_index(grid.argmax(), grid.shape) == (i, j) and grid.sum() == pytest.approx(1)
    assert body["image_mass"] == pytest.approx(1) and body["vmax"] == pytest.approx(1)
    assert np.allclose(body["layer_head_mass"], 1)


def test_unsplit_run_has_only_the_global_grid(make_run, make_app):
    pos = answer_pos(0, 0)
    body = ok(make_app(RUN=make_run(rows=0, cols=0, one_hot={pos: 9})).test_client().get(f"/api/attention?index={pos}"))
    assert body["grid"] is None and np.array(body["global"])[1, 1] == pytest.approx(1)


def test_attention_matches_numpy(hot_client, run_dir):
    run = Run(run_dir)
    pos = answer_pos(offset=3)
    row = run.row_of(pos)
    image = np.stack([run.layer(i).image[:, row] for i in range(3)])                  # (L, H, K)
    text = np.stack([run.layer(i).text[:, row].sum(-1) for i in range(3)])             # (L, H)
    mass = image.sum(-1) / (image.sum(-1) + text)

    body = ok(hot_client.get(f"/api/attention?index={pos}&layers=1-2&heads=max"))
    expect = image[1:3].max(axis=1).mean(axis=0)
    tiles, glob = run.geometry.split(expect)
    assert np.allclose(body["grid"], tiles, atol=1e-6) and np.allclose(body["global"], glob, atol=1e-6)
    assert body["image_mass"] == pytest.approx(mass[1:3].max(axis=1).mean(), rel=1e-5)
    assert np.allclose(body["layer_head_mass"], mass, atol=1e-6)
    assert body["vmax"] == pytest.approx(expect.max(), rel=1e-5)

    body = ok(hot_client.get(f"/api/attention?index={pos}&layers=1&heads=0&drop_sink=1&norm=shared"))
    per_layer = image[:, 0] / image[:, 0].sum(-1, keepdims=True)
    assert sum(map(sum, body["grid"])) + sum(map(sum, body["global"])) == pytest.approx(1, rel=1e-5)
    assert body["vmax"] == pytest.approx(per_layer.max(), rel=1e-5)   # over every layer, not just layer 1
    assert body["vmin"] == pytest.approx(per_layer.min(), abs=1e-7)


def test_generate_attention_map_reference_route(hot_client):
    pos = answer_pos()
    body = ok(hot_client.post("/api/generate_attention_map",
                              json={"word": "Ġskier", "word_index": pos, "layer": 2, "head": 1, "threshold": 0.0}))
    assert (body["word_index"], body["layer"], body["head"], body["threshold"]) == (pos, 2, 1, 0.0)
    assert body["stats"] == {"min": 0.0, "max": 1.0}
    png = Image.open(io.BytesIO(base64.b64decode(body["heatmap"])))
    assert png.size == (body["heatmap_width"], body["heatmap_height"]) == (640, 480)
    alpha = np.array(png)[..., 3]
    ys, xs = np.nonzero(alpha == alpha.max())
    assert (int(ys.mean()) // 20, int(xs.mean()) // 20) == HOT     # 640 / 32 = 480 / 24 = 20 px per cell
    by_word = ok(hot_client.post("/api/generate_attention_map", json={"word": "Ġskier", "layer": 0, "head": 0}))
    assert by_word["word_index"] == pos


def test_reverse_ranks_the_one_hot_token_first(hot_client):
    body = ok(hot_client.get("/api/reverse?cell=5,27&view=tiles"))
    assert body["tokens"][0]["index"] == answer_pos() and body["tokens"][0]["value"] == pytest.approx(1)
    assert len(body["tokens"]) == 20 and {t["kind"] for t in body["tokens"]} <= {"prompt", "answer", "special"}
    glob = ok(hot_client.get("/api/reverse?cell=0,0&view=global&layers=0&heads=1"))
    assert glob["key"] == 12 * 64 and answer_pos() not in [t["index"] for t in glob["tokens"][:1]]


def test_overlay_png(hot_client):
    resp = hot_client.get(f"/api/overlay.png?index={answer_pos()}&smooth=1")
    assert resp.status_code == 200 and resp.mimetype == "image/png"
    assert Image.open(io.BytesIO(resp.data)).size == (640, 480)


@pytest.mark.parametrize("url,status,message", [
    ("/api/attention", 400, "'index' is required"),
    ("/api/attention?index=abc", 400, "integer"),
    ("/api/attention?index=99999", 404, "unknown token"),
    ("/api/attention?index=10", 404, "only text/answer tokens have rows"),
    (f"/api/attention?index={answer_pos()}&layers=7", 404, "unknown layer 7"),
    (f"/api/attention?index={answer_pos()}&layers=2-1", 400, "reversed"),
    (f"/api/attention?index={answer_pos()}&layers=x", 400, "layers must be"),
    (f"/api/attention?index={answer_pos()}&heads=5", 400, "head 5 out of range"),
    (f"/api/attention?index={answer_pos()}&heads=median", 400, "integer"),
    (f"/api/attention?index={answer_pos()}&drop_sink=yes", 400, "drop_sink must be one of"),
    (f"/api/attention?index={answer_pos()}&norm=global", 400, "norm must be one of"),
    (f"/api/attention?index={answer_pos()}&run=other", 404, "unknown run"),
    ("/api/reverse?cell=24,0", 400, "outside the 24x32"),
    ("/api/reverse?cell=1;2", 400, "cell must be"),
    ("/api/reverse?cell=1,2&view=side", 400, "view must be one of"),
    ("/api/runs?limit=0", 400, "limit"),
    ("/api/nothing", 404, "Not Found"),
])
def test_bad_parameters_are_json_errors(hot_client, url, status, message):
    resp = hot_client.get(url)
    assert resp.status_code == status and resp.is_json
    body = resp.get_json()
    assert body["success"] is False and message in body["error"], body


@pytest.mark.parametrize("body,status,message", [
    ({"word_index": answer_pos(), "layer": 9}, 404, "unknown layer 9"),
    ({"word_index": answer_pos(), "layer": "one"}, 400, "layer must be an integer"),
    ({"word_index": answer_pos(), "head": -1}, 400, "head -1 out of range"),
    ({"word_index": answer_pos(), "threshold": "high"}, 400, "threshold must be a number"),
    ({"word": "zebra"}, 404, "not found"),
    ({}, 400, "word_index"),
    ([1, 2], 400, "JSON object"),
])
def test_generate_attention_map_errors(hot_client, body, status, message):
    resp = hot_client.post("/api/generate_attention_map", json=body)
    assert resp.status_code == status and message in resp.get_json()["error"]


def test_runs_discovery_and_search(make_app, root):
    client = make_app(RUNS=root).test_client()
    body = ok(client.get("/api/runs"))
    assert [r["name"] for r in body["runs"]] == ["a/cat", "b/dog", "broken"] and body["single"] is False
    dog = body["runs"][1]
    assert dog["grid"] == [4, 3] and "skier" in dog["answer"] and dog["error"] is None
    assert body["runs"][2]["answer"] is None          # no meta.json: listed by name, its error shows on opening
    assert [r["name"] for r in ok(client.get("/api/runs?q=B/DO"))["runs"]] == ["b/dog"]    # name, answer or image
    assert ok(client.get("/api/runs?limit=1"))["total"] == 3
    assert ok(client.get("/api/initialize?run=b/dog"))["geometry"]["rows"] == 4
    resp = client.get("/api/initialize")
    assert resp.status_code == 400 and "'run' is required" in resp.get_json()["error"]
    resp = client.get("/api/initialize?run=broken")
    assert resp.status_code == 500 and "cannot be read" in resp.get_json()["error"]


@pytest.mark.parametrize("name", ["../runs/a/cat", "a/../a/cat", "/etc", "a//cat", ".hidden/x", "b/.dog.tmp-123",
                                  "a/cat/attention", "a\\cat", "escape", "inside"])
def test_run_names_cannot_escape_the_root(make_app, root, tmp_path, make_run, name):
    outside = make_run("../outside")                      # a real run, outside the served root
    (root / "escape").symlink_to(outside)
    (root / "inside").symlink_to(root / "a" / "nope")     # dangling
    resp = make_app(RUNS=root).test_client().get("/api/initialize", query_string={"run": name})
    assert resp.status_code == 404 and "unknown run" in resp.get_json()["error"]


def test_image_symlink_out_of_the_root_is_refused(make_app, make_run, tmp_path):
    run = make_run("r")
    secret = tmp_path / "secret.png"
    Image.new("RGB", (4, 4)).save(secret)
    (run / "image.png").unlink()
    (run / "image.png").symlink_to(secret)
    resp = make_app(RUNS=tmp_path / "runs").test_client().get("/api/image?run=r")
    assert resp.status_code == 404


def test_meta_json_naming_a_non_image_file_is_not_served(make_run, make_app):
    """A shared runs folder whose meta.json names x.html next to a .js file must not make the viewer serve
    it (script in the viewer's origin): only the writer's image names, typed by their content."""
    run = make_run("r")
    (run / "x.html").write_text('<html><script src="x.js"></script></html>')
    (run / "x.js").write_text("fetch('/api/runs').then(r => r.text()).then(alert)")
    meta = json.loads((run / "meta.json").read_text())
    meta["image"]["file"] = "x.html"
    (run / "meta.json").write_text(json.dumps(meta))
    client = make_app(RUNS=run.parent).test_client()
    resp = client.get("/api/image?run=r")                  # the run's own image.png, never x.html
    assert resp.status_code == 200 and resp.mimetype == "image/png" and resp.data[:4] == b"\x89PNG"
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    (run / "image.png").unlink()
    resp = client.get("/api/image?run=r")                  # nothing else to serve: 404, not x.html
    assert resp.status_code == 404 and resp.mimetype == "application/json" and b"<script" not in resp.data
    (run / "image.png").write_text('<html><script src="x.js"></script></html>')   # HTML under an image name
    resp = client.get("/api/image?run=r")
    assert resp.status_code == 404 and "text/html" not in resp.content_type and "not a PNG or JPEG" in resp.get_json()["error"]
    (run / "image.png").unlink()
    Image.new("RGB", (8, 8), "red").save(run / "image.jpg", "JPEG")
    resp = client.get("/api/image?run=r")                  # the type comes from the content
    assert resp.status_code == 200 and resp.mimetype == "image/jpeg" and resp.data[:3] == b"\xff\xd8\xff"


def test_a_big_post_body_is_refused(hot_client):
    """MAX_CONTENT_LENGTH: a request body larger than the API's small JSON needs is refused (413), unread."""
    body = b'{"word_index": ' + str(answer_pos()).encode() + b', "pad": "' + b"x" * (1 << 20) + b'"}'
    resp = hot_client.post("/api/generate_attention_map", data=body, content_type="application/json")
    assert resp.status_code == 413 and resp.get_json()["success"] is False
    ok(hot_client.post("/api/generate_attention_map", json={"word_index": answer_pos()}))   # a normal one passes


def test_reference_format_needs_allow_pickle(make_run, make_app):
    run = make_run("ref", reference=True, one_hot={answer_pos(): 3})
    with pytest.raises(UserError, match="allow-pickle"):
        make_app(RUN=run)
    client = make_app(RUN=run, ALLOW_PICKLE=True).test_client()
    body = ok(client.get("/api/initialize"))
    assert body["standin"] is False and body["num_layers"] == 2
    assert np.array(ok(client.get(f"/api/attention?index={answer_pos()}"))["grid"])[0, 3] == pytest.approx(1)


def test_layer_cache_stays_bounded_across_many_runs(make_run, make_app, tmp_path):
    for k in range(6):
        make_run(f"img{k}", layers=3, heads=2)
    layer_bytes = Run(tmp_path / "runs" / "img0").layer(0).nbytes
    app = make_app(RUNS=tmp_path / "runs", CACHE_MB=2.5 * layer_bytes / LAYER_SHARE / 1e6)
    client, registry = app.test_client(), app.extensions["runs"]
    for k in range(6):
        ok(client.get(f"/api/attention?run=img{k}&index={answer_pos()}&layers=0-2&heads=0"))
        assert registry.layers.total <= registry.layers.capacity
        assert registry.summaries.total <= registry.summaries.capacity
        assert len(registry.layers) == 2 and len(registry.runs) <= MAX_OPEN_RUNS
    health = ok(client.get("/api/health"))
    assert health["layers"]["entries"] == 2 and health["layers"]["size"] <= health["layers"]["capacity"]
    assert health["layers"]["misses"] == 18 and health["summaries"]["misses"] == 6
    assert health["index"]["entries"] == 6


def test_lru_loads_each_key_once_under_concurrency():
    calls = []

    def load():
        calls.append(1)
        time.sleep(0.05)
        return "value"
    cache = LRU(10)
    threads = [threading.Thread(target=cache.get, args=("k", load)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and cache.get("k", load) == "value"


def cli(*args, cwd=ROOT):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(ROOT / "app.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("args,message", [
    (["--run", "/nonexistent/run"], "not a run directory"),
    (["--runs", "/nonexistent"], "not a directory"),
    (["--cache-mb", "0"], "cache size"),
    (["--port", "70000"], "port"),
])
def test_cli_bad_input_is_one_line(tmp_path, args, message):
    done = cli(*args, cwd=tmp_path)
    assert done.returncode == 2 and message in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_cli_reference_run_needs_allow_pickle(make_run):
    done = cli(cwd=make_run("ref", reference=True))      # no argument: the run in the current directory
    assert done.returncode == 2 and "--allow-pickle" in done.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("host,warns", [("0.0.0.0", True), ("127.0.0.1", False)])
def test_cli_prints_the_address_it_binds_and_warns_off_loopback(make_run, host, warns):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--run", str(make_run()), "--host", host,
                             "--port", str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    watchdog = threading.Timer(60, proc.kill)
    watchdog.start()
    try:
        line = proc.stdout.readline()
    finally:
        proc.terminate()
        err = proc.communicate(timeout=30)[1]
        watchdog.cancel()
    assert f"at http://{host}:{port}/" in line and "localhost" not in line, (line, err)
    assert ("is not a loopback address" in err) == warns, err
