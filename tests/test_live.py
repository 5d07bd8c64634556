"""Live mode (issue 20) through the Flask test client, with a real worker process on the tiny stand-in:
no live route without a model, same-origin checks (Host, token, Origin), server-side validation of
every input, an ask that streams and writes a normal run under ROOT/live/, and a cancel that kills the
worker in the middle of a job, leaves nothing written and starts the worker again."""
from __future__ import annotations

import argparse
import io
import json
import shutil
import time
from pathlib import Path

import pytest
from PIL import Image

from smolattn import standin, store
from smolattn.errors import UserError
from viewer import live as lv
from viewer.jobs import Live

HOST = {"Host": "localhost"}     # the test client's SERVER_NAME


def png(size=(64, 48), color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def worker():
    w = Live({"id": str(standin.ensure("tiny")), "device": "cpu"}, threads=1)
    w.wait_ready(300)
    yield w
    w.close()


@pytest.fixture
def root(make_run):
    return make_run("photo").parent


@pytest.fixture
def live_app(make_app, root, worker):
    return make_app(RUNS=str(root), LIVE=worker)


@pytest.fixture
def client(live_app):
    return live_app.test_client()


def token(client) -> str:
    html = client.get("/live", headers=HOST).get_data(as_text=True)
    return html.split('name="live-token" content="')[1].split('"')[0]


def ask(client, tok, **form):
    data = {"prompt": "What is in the picture?", "max_new_tokens": "6", **form}
    return client.post("/api/live/ask", data=data, headers={**HOST, lv.TOKEN_HEADER: tok},
                       content_type="multipart/form-data")


def wait(worker, job_id, until=lambda j: j.done, timeout=300):
    t0 = time.time()
    while time.time() - t0 < timeout:
        job = worker.job(job_id)
        if until(job):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} still {worker.job(job_id).status}")


def test_no_live_route_without_a_model(make_app, root):
    c = make_app(RUNS=str(root)).test_client()
    for url in ("/live", "/api/live/status", "/api/live/events", "/api/live/images"):
        assert c.get(url).status_code == 404, url
    assert c.post("/api/live/ask", data={"prompt": "x"}).status_code == 404
    assert c.post("/api/live/cancel", json={"job": "1"}).status_code == 404
    html = c.get("/").get_data(as_text=True)
    assert "live-token" not in html and "/live" not in html


def test_same_origin_only(client):
    tok = token(client)
    assert len(tok) >= 32
    image = (io.BytesIO(png()), "a.png")
    r = client.post("/api/live/ask", data={"prompt": "x", "image": image}, headers=HOST)
    assert r.status_code == 403 and "token" in r.json["error"]
    r = ask(client, "wrong" + tok)
    assert r.status_code == 403 and "token" in r.json["error"]
    r = client.post("/api/live/ask", data={"prompt": "x"}, headers={"Host": "evil.example:80", lv.TOKEN_HEADER: tok})
    assert r.status_code == 403 and "Host" in r.json["error"]
    r = client.post("/api/live/ask", data={"prompt": "x"},
                    headers={**HOST, lv.TOKEN_HEADER: tok, "Origin": "http://evil.example"})
    assert r.status_code == 403 and "origin" in r.json["error"]
    r = client.post("/api/live/cancel", json={"job": "1"}, headers={**HOST, lv.TOKEN_HEADER: tok, "Sec-Fetch-Site": "cross-site"})
    assert r.status_code == 403
    assert client.get("/api/live/status", headers={"Host": "rebound.example"}).status_code == 403
    # a page asked for under another name (DNS rebinding) does not get the token
    html = client.get("/", headers={"Host": "rebound.example"}).get_data(as_text=True)
    assert tok not in html and "live-token" not in html
    assert tok in client.get("/", headers=HOST).get_data(as_text=True)


@pytest.mark.parametrize("environ, host, ok", [
    ({"SERVER_NAME": "127.0.0.1", "SERVER_PORT": "5001"}, "127.0.0.1:5001", True),
    ({"SERVER_NAME": "127.0.0.1", "SERVER_PORT": "5001"}, "localhost:5001", True),
    ({"SERVER_NAME": "127.0.0.1", "SERVER_PORT": "5001"}, "localhost:5002", False),
    ({"SERVER_NAME": "127.0.0.1", "SERVER_PORT": "5001"}, "attacker.example:5001", False),
    ({"SERVER_NAME": "127.0.0.1", "SERVER_PORT": "5001"}, "127.0.0.1.nip.io:5001", False),
    ({"SERVER_NAME": "127.0.0.1", "SERVER_PORT": "5001"}, None, False),
    ({"SERVER_NAME": "0.0.0.0", "SERVER_PORT": "5001"}, "192.168.1.7:5001", True),
    ({"SERVER_NAME": "0.0.0.0", "SERVER_PORT": "5001"}, "[fe80::1]:5001", True),
    ({"SERVER_NAME": "0.0.0.0", "SERVER_PORT": "5001"}, "my.host.example:5001", False),
    ({"SERVER_NAME": "10.0.0.5", "SERVER_PORT": "80"}, "10.0.0.5", True),
])
def test_host_must_be_the_bind_address(environ, host, ok):
    assert lv.host_ok(environ, host) is ok


def test_every_input_is_checked(client, monkeypatch, root):
    tok = token(client)
    img = lambda data=None, name="a.png": (io.BytesIO(png() if data is None else data), name)  # noqa: E731
    cases = [
        ({"prompt": "   ", "image": img()}, 400, "prompt is empty"),
        ({"prompt": "x" * (lv.MAX_PROMPT_CHARS + 1), "image": img()}, 400, "limit is 2000"),
        ({"max_new_tokens": "0", "image": img()}, 400, "between 1 and"),
        ({"max_new_tokens": str(lv.MAX_NEW_TOKENS + 1), "image": img()}, 400, "between 1 and"),
        ({"max_new_tokens": "ten", "image": img()}, 400, "must be an integer"),
        ({"methods": "raw,telepathy", "image": img()}, 400, "unknown method"),
        ({}, 400, "choose an image"),
        ({"image": img(b"%PDF-1.4 not an image", "doc.png")}, 400, "doc.png is not an image"),
        ({"image": img(png()[:60], "cut.png")}, 400, "truncated"),
        ({"image_run": "../etc"}, 404, "unknown run"),
    ]
    ico = io.BytesIO()
    Image.new("RGB", (16, 16)).save(ico, "ICO")
    cases.append(({"image": img(ico.getvalue(), "x.ico")}, 400, "ICO image; formats"))
    big = io.BytesIO()
    Image.new("L", (8000, 6000)).save(big, "PNG")           # 48 megapixels, a small file
    cases.append(({"image": img(big.getvalue(), "huge.png")}, 400, "megapixels; the limit is 40"))
    for form, status, words in cases:
        r = ask(client, tok, **form)
        assert r.status_code == status and words in r.json["error"], (form.keys(), r.json)
        assert "\n" not in r.json["error"]
    noise = io.BytesIO()
    Image.effect_noise((64, 64), 64).save(noise, "PNG")
    monkeypatch.setattr(lv, "UPLOAD_MAX_BYTES", 2048)
    r = ask(client, tok, image=img(noise.getvalue(), "n.png"))
    assert r.status_code == 413 and "larger than the limit of 2 KiB" in r.json["error"]
    monkeypatch.setattr(lv, "REQUEST_MAX_BYTES", 2000)
    r = ask(client, tok, image=img(b"x" * 5000, "n.png"))
    assert r.status_code == 413 and "server's limit" in r.json["error"]
    assert not client.get("/api/live/status", headers=HOST).json["jobs"]     # nothing was queued ...
    assert not [p for p in root.joinpath("live").rglob("*") if p.is_file()]    # ... nor left on disk


def test_ask_streams_and_writes_a_normal_run(client, worker, root):
    tok = token(client)
    seen = []
    before = worker.version
    noisy = io.BytesIO()
    Image.effect_noise((320, 240), 64).convert("RGB").save(noisy, "PNG")
    assert noisy.tell() > 2 * (64 << 10)          # far above the read-only viewer's request limit (64 KiB)
    r = ask(client, tok, image=(io.BytesIO(noisy.getvalue()), "red square.png"), max_new_tokens="8", methods="raw,rollout")
    assert r.status_code == 200, r.json
    name = r.json["run"]
    assert name.startswith("live/") and name.endswith("-red-square")
    job = wait(worker, r.json["job"], lambda j: (seen.append(j.tokens) or True) and j.done)
    assert job.status == "done", job.error
    assert worker.version > before
    run = store.Run(root / name)
    assert run.meta["prompt"] == "What is in the picture?" and run.meta["model"]["standin"]
    assert run.meta["generation"]["new_tokens"] == job.tokens == job.result["new_tokens"]
    assert "rollout" in run.methods
    assert Path(run.meta["image"]["source"]).parent == root / "live" / lv.UPLOAD_DIR
    assert client.get(f"/api/initialize?run={name}", headers=HOST).json["success"]
    assert job.first_token is not None and job.first_token <= job.finished


def test_cancel_kills_the_worker_and_leaves_nothing(client, worker, root):
    tok = token(client)
    pid = worker.info["pid"]
    r = ask(client, tok, image=(io.BytesIO(png((640, 480))), "long.png"), max_new_tokens=str(lv.MAX_NEW_TOKENS))
    job_id, name = r.json["job"], r.json["run"]
    upload = Path(worker.job(job_id).cleanup[0])
    queued = ask(client, tok, image_run="photo", max_new_tokens="3")     # waits behind it
    assert worker.job(queued.json["job"]).status == "queued"
    wait(worker, job_id, lambda j: j.tokens >= 2)
    r = client.post("/api/live/cancel", json={"job": job_id}, headers={**HOST, lv.TOKEN_HEADER: tok})
    assert r.status_code == 200
    job = wait(worker, job_id)
    assert job.status == "cancelled" and "during generating" in job.error and "nothing was written" in job.error
    assert not (root / name).exists() and not upload.exists()
    assert not [p for p in (root / "live").iterdir() if p.name.startswith(".") and p.name != lv.UPLOAD_DIR]
    after = wait(worker, queued.json["job"])                 # the restarted worker runs the next job
    assert after.status == "done", after.error
    assert worker.info["pid"] != pid and worker.restarts >= 1
    assert (root / after.args["name"] / "meta.json").is_file()
    # a queued job is cancelled without touching the worker
    a = ask(client, tok, image_run="photo", max_new_tokens="40")
    b = ask(client, tok, image_run="photo", max_new_tokens="3")
    r = client.post("/api/live/cancel", json={"job": b.json["job"]}, headers={**HOST, lv.TOKEN_HEADER: tok})
    assert r.json["status"] == "cancelled" and "before it started" in worker.job(b.json["job"]).error
    assert wait(worker, a.json["job"]).status == "done"


def test_cancel_during_a_long_prefill(client, worker, root):
    tok = token(client)
    pid = worker.wait_ready(300)["pid"]
    r = ask(client, tok, image=(io.BytesIO(png((2048, 1536))), "big.png"), max_new_tokens="4")
    job_id = r.json["job"]
    wait(worker, job_id, lambda j: j.status == "running")
    assert client.post("/api/live/cancel", json={"job": job_id}, headers={**HOST, lv.TOKEN_HEADER: tok}).status_code == 200
    job = wait(worker, job_id)
    assert job.status == "cancelled" and job.tokens == 0 and "during prefill" in job.error
    assert not (root / r.json["run"]).exists()
    assert worker.wait_ready(300)["pid"] != pid      # started again, the model loaded
    assert client.get("/api/live/status", headers=HOST).json["state"] == "ready"


def test_cli_refuses_bad_combinations_before_loading(tmp_path):
    p = argparse.ArgumentParser()
    p.add_argument("--runs")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5001)
    lv.add_arguments(p)
    with pytest.raises(UserError, match="--allow-remote-model"):
        lv.start(p.parse_args(["--runs", str(tmp_path), "--model-id", "x", "--host", "0.0.0.0"]))
    with pytest.raises(UserError, match="needs --runs"):
        lv.start(p.parse_args(["--model-id", "x"]))
    with pytest.raises(UserError, match="--device goes with --model-id"):
        lv.start(p.parse_args(["--runs", str(tmp_path), "--device", "cuda"]))
    assert lv.start(p.parse_args(["--runs", str(tmp_path)])) is None
    with pytest.raises(UserError, match="model directory not found"):    # the worker's one line, at startup
        lv.start(p.parse_args(["--runs", str(tmp_path), "--model-id", str(tmp_path / "nope")]))


# -- interventions through the worker (the interventions core) --------------------------------------
@pytest.fixture
def asked(client, worker, root):
    """A run asked through the live worker (the tiny stand-in), its name."""
    pytest.importorskip("smolattn.interventions", reason="the interventions core is not in this checkout")
    r = ask(client, token(client), image=(io.BytesIO(png((320, 240))), "box.png"), max_new_tokens="5")
    job = wait(worker, r.json["job"])
    assert job.status == "done", job.error
    return r.json["run"]


def post(client, url, body):
    return client.post(url, json=body, headers={**HOST, lv.TOKEN_HEADER: token(client)})


def test_intervene_checks_every_value_against_the_run(client, asked, root):
    bad = [
        ({"heads": [[4, 0]]}, "layer must be between 0 and 3"),
        ({"heads": [[0, 4]]}, "head must be between 0 and 3"),
        ({"heads": [["a", 0]]}, "must be an integer"),
        ({"heads": [[0]]}, "[layer, head] pairs"),
        ({"top": 4}, "needs a head analysis"),
        ({"heads": [[0, 0]], "ablation": "half"}, "zero or mean"),
        ({"knockout": {"from": "last", "to": "box", "box": [0, 0, 321, 100], "layers": [0, 3]}}, "not inside the 320x240"),
        ({"knockout": {"from": "last", "to": "box", "box": [50, 50, 10, 100], "layers": [0, 3]}}, "not inside"),
        ({"knockout": {"from": "last", "to": "box", "box": [0, 0, float("nan"), 1], "layers": [0, 3]}}, "must be"),
        ({"knockout": {"from": "everything", "to": "image", "layers": [0, 3]}}, "knockout from must be one of"),
        ({"knockout": {"from": "last", "to": "image", "layers": [2, 1]}}, "after the last"),
        ({"knockout": {"from": "last", "to": "image", "layers": [0, 9]}}, "between 0 and 3"),
        ({"block_from": 4}, "block_from must be between 0 and 3"),
        ({}, "choose an intervention"),
    ]
    for extra, words in bad:
        r = post(client, "/api/live/intervene", {"run": asked, **extra})
        assert r.status_code == 400 and words in r.json["error"], (extra, r.json)
    assert post(client, "/api/live/intervene", {"run": "nope", "heads": [[0, 0]]}).status_code == 404
    r = post(client, "/api/live/intervene", {"run": "photo", "heads": [[0, 0]]})      # a synthetic run
    assert r.status_code == 400 and "records no configuration to rerun" in r.json["error"]
    other = root / "other"                                  # the asked run, as if another model made it
    shutil.copytree(root / asked, other)
    meta = json.loads((other / "meta.json").read_text())
    meta["model"]["id"] = "someone/else"
    (other / "meta.json").write_text(json.dumps(meta))
    r = post(client, "/api/live/intervene", {"run": "other", "heads": [[0, 0]]})
    assert r.status_code == 400 and "made with 'someone/else'" in r.json["error"] and "this server has" in r.json["error"]
    r = post(client, "/api/live/sweep", {"run": asked, "from": "answer"})
    assert r.status_code == 400 and "sweep from must be one of" in r.json["error"]
    r = post(client, "/api/live/sweep", {"run": asked, "window": 0})
    assert r.status_code == 400 and "window must be between 1" in r.json["error"]


def test_intervene_and_sweep_run_in_the_worker(client, worker, asked, root):
    r = post(client, "/api/live/intervene", {"run": asked, "heads": [[0, 1], [2, 3]]})
    assert r.status_code == 200, r.json
    assert r.json["target"] == f"{asked}.ablate-0.1-2.3"
    job = wait(worker, r.json["job"])
    assert job.status == "done", job.error
    cmp = client.get(f"/api/compare?run={r.json['target']}", headers=HOST).json
    assert cmp["success"] and cmp["base"] == asked and cmp["effects"] is not None
    assert cmp["intervention"]["heads"] == [[0, 1], [2, 3]]
    # a knockout of a box plus image blocked from layer 2
    r = post(client, "/api/live/intervene", {"run": asked, "knockout": {"from": "last", "to": "box",
                                                                       "box": [0, 0, 160, 120], "layers": [1, 2]},
                                            "block_from": 3})
    job = wait(worker, r.json["job"])
    assert job.status == "done", job.error
    iv = store.Run(root / r.json["target"]).meta["intervention"]
    assert iv["kind"] == ["knockout", "block-image"] and iv["spec"]["knockouts"][0]["to"] == "box:0,0,160,120"
    r = post(client, "/api/live/sweep", {"run": asked, "from": "last", "to": "image", "window": 3})
    job = wait(worker, r.json["job"])
    assert job.status == "done", job.error
    sw = client.get(f"/api/sweep?name={r.json['target']}", headers=HOST).json
    assert sw["success"] and sw["sweep"]["window"] == 3 and len(sw["sweep"]["centres"]) == 4
    # an intervened run is not intervened on again
    r = post(client, "/api/live/intervene", {"run": f"{asked}.ablate-0.1-2.3", "heads": [[0, 0]]})
    assert r.status_code == 400 and "itself an intervened run" in r.json["error"]


def test_a_worker_killed_while_writing_leaves_nothing(make_app, root, monkeypatch):
    monkeypatch.setenv(store.CRASH_ENV, "writing")       # the writer SIGKILLs its own process mid-run
    w = Live({"id": str(standin.ensure("tiny")), "device": "cpu"}, threads=1)
    try:
        w.wait_ready(300)
        c = make_app(RUNS=str(root), LIVE=w).test_client()
        r = ask(c, token(c), image=(io.BytesIO(png()), "a.png"), max_new_tokens="3")
        job = wait(w, r.json["job"])
        assert job.status == "failed" and "the model worker died" in job.error
        live_dir = root / "live"
        assert not (root / r.json["run"]).exists()
        assert [p.name for p in live_dir.iterdir()] == [lv.UPLOAD_DIR]      # no temporary folder left
        assert not list((live_dir / lv.UPLOAD_DIR).iterdir())                # nor the upload
    finally:
        w.close()
