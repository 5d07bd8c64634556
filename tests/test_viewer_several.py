"""The viewer on runs of several images in one prompt and on video runs, made by
synthetic.make_layout_run (no model): one panel per image, the layer x head overview per image or
summed (/api/overview), derived method maps split per image like raw, the dataset page's line about
the runs the head analysis skips, and the HTML export of such runs (or its refusal, over its size
limit, with the page's button disabled). Every expected number is computed here from the stored
arrays (store.Run), not from the viewer's code. Screenshots: /work/shots/ when it exists (the
project's artifacts/screenshots/ otherwise)."""
from __future__ import annotations

import re
import threading
from pathlib import Path

import numpy as np
import pytest

from smolattn import analysis as an
from smolattn import head_report, store, synthetic
from smolattn.errors import UserError
from viewer import create_app
from viewer import export as ex

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
        "--disable-component-update", "--disable-sync"]
SHOTS = Path(__file__).resolve().parent.parent / "artifacts" / "screenshots"
THREE = ([(3, 4), (0, 0), (2, 1)], [(640, 480), (200, 200), (300, 600)])   # three tile grids, three sizes
TWO = ([(3, 4), (2, 2)], [(640, 480), (500, 500)])
FRAMES = 8
MARK = 2          # answer offset of the token whose every layer and head looks at one key of the last image
METHODS = ("rollout", "relevancy", "relative")


def marked_key(grids):
    """Cell (3, 5) of the last image's first tile (its global tile if it has no tiles), on the stored
    key axis: the map the page draws for that image (tiles, else the global tile) has it."""
    n = [(r * c + 1) * 64 for r, c in grids]
    return sum(n[:-1]) + 3 * 8 + 5


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    base = tmp_path_factory.mktemp("several")
    root = base / "runs"
    for name, (grids, sizes) in (("three", THREE), ("two", TWO)):
        synthetic.make_layout_run(root / name, grids, sizes=sizes, methods=METHODS)
    synthetic.make_layout_run(root / "video", [(0, 0)] * FRAMES, video=True, methods=("rollout",))
    for name in ("single", "single2"):
        synthetic.make_run(root / name, 2, 2, seed=len(name))
    # the marked runs, written again: one answer token puts all its mass on one key of the last image
    for name, (grids, sizes) in (("three", THREE), ("two", TWO)):
        run = store.Run(root / name)
        pos = run.prompt_length + MARK
        store.remove_run(root / name)
        synthetic.make_layout_run(root / name, grids, sizes=sizes, methods=METHODS,
                                  one_hot={pos: marked_key(grids)})
    return root


@pytest.fixture(scope="module")
def app(root, tmp_path_factory):
    return create_app({"RUNS": str(root), "TESTING": True, "CACHE_DIR": str(tmp_path_factory.mktemp("cache"))})


@pytest.fixture(scope="module")
def client(app):
    return app.test_client()


def answer_positions(run):
    return [p for p in run.query_positions if p >= run.prompt_length and run.row_of(p) is not None]


def stored(run, pos):
    """(L, H, K) image and (L, H, T) text attention of token ``pos``, as stored."""
    row = run.row_of(pos)
    layers = [run.layer(i) for i in range(run.num_layers)]
    return (np.stack([lay.image[:, row] for lay in layers]).astype(np.float64),
            np.stack([lay.text[:, row] for lay in layers]).astype(np.float64))


def expected_overview(run, pos, k):
    """image k's share (k None: every image's) of the token's attention per layer and head."""
    image, text = stored(run, pos)
    total = image.sum(-1) + text.sum(-1)
    keys = slice(None) if k is None else run.layout.keys_of(k)
    return image[..., keys].sum(-1) / total


# ------------------------------------------------------------------------------- 1. one panel per image

def test_each_image_map_has_its_own_grid_and_the_mark_is_in_the_last_image(client, root):
    run = store.Run(root / "three")
    assert [g.grid_shape if g.rows else None for g in run.layout.images] == [(24, 32), None, (16, 8)]
    info = client.get("/api/initialize?run=three").get_json()
    assert [im["geometry"]["image_size"] for im in info["images"]] == [[640, 480], [200, 200], [300, 600]]
    for pos in answer_positions(run)[:3]:
        image, _ = stored(run, pos)
        mean = image.mean(1).mean(0)                                     # every layer, mean over heads
        for k, g in enumerate(run.layout.images):
            d = client.get(f"/api/attention?run=three&index={pos}&image={k}").get_json()
            tiles, glob = g.split(mean[run.layout.keys_of(k)])
            np.testing.assert_allclose(d["global"], glob, rtol=1e-4, atol=1e-7)
            assert (d["grid"] is None) == (tiles is None)
            if tiles is not None:
                np.testing.assert_allclose(d["grid"], tiles, rtol=1e-4, atol=1e-7)
            np.testing.assert_allclose(d["image_masses"], [mean[run.layout.keys_of(j)].sum() for j in range(3)],
                                       rtol=1e-4, atol=1e-7)
            png = client.get(f"/api/overlay.png?run=three&index={pos}&image={k}")
            assert png.status_code == 200 and png.mimetype == "image/png"
    pos = run.prompt_length + MARK                                       # the marked token
    d = client.get(f"/api/attention?run=three&index={pos}&image=2").get_json()
    grid = np.asarray(d["grid"])
    assert np.unravel_index(np.argmax(grid), grid.shape) == (3, 5) and d["image_masses"] == [0, 0, 1]
    assert client.get(f"/api/attention?run=three&index={pos}&image=3").status_code == 404


# ------------------------------------------------------------------------------- 2. overview per image

@pytest.mark.parametrize("name", ["three", "video"])
def test_overview_per_image_and_summed(client, root, name):
    run = store.Run(root / name)
    for pos in answer_positions(run)[:2]:
        att = client.get(f"/api/attention?run={name}&index={pos}").get_json()
        total = client.get(f"/api/overview?run={name}&index={pos}&image=all").get_json()
        assert total["image"] == "all" and total["images"] == len(run.layout)
        np.testing.assert_allclose(total["layer_head_mass"], expected_overview(run, pos, None), rtol=1e-3)
        np.testing.assert_allclose(total["layer_head_mass"], att["layer_head_mass"], rtol=1e-5)
        assert client.get(f"/api/overview?run={name}&index={pos}").get_json() == total     # default: all
        per = []
        for k in range(len(run.layout)):
            d = client.get(f"/api/overview?run={name}&index={pos}&image={k}").get_json()
            assert d["success"] and d["image"] == k
            np.testing.assert_allclose(d["layer_head_mass"], expected_overview(run, pos, k), rtol=1e-3, atol=1e-7)
            per.append(d["layer_head_mass"])
        np.testing.assert_allclose(np.sum(per, axis=0), total["layer_head_mass"], rtol=1e-3)
        assert not np.allclose(per[0], per[1])                    # the selector shows another grid
    pos = answer_positions(run)[0]
    for bad, status in (("x", 400), ("-1", 404), (str(len(run.layout)), 404), ("1.5", 400), ("", 400)):
        r = client.get(f"/api/overview?run={name}&index={pos}&image={bad}")
        err = r.get_json()["error"]
        assert r.status_code == status and "\n" not in err and "image" in err, (bad, err)
    r = client.get(f"/api/overview?run={name}&index={pos}&image=x")
    assert "'all'" in r.get_json()["error"]                        # the word for the sum is named
    assert client.get(f"/api/attention?run={name}&index={pos}&image=all").status_code == 400


def test_overview_of_a_single_image_run(client, root):
    run = store.Run(root / "single")
    pos = answer_positions(run)[0]
    d = client.get(f"/api/overview?run=single&index={pos}&image=0").get_json()
    att = client.get(f"/api/attention?run=single&index={pos}").get_json()
    np.testing.assert_allclose(d["layer_head_mass"], att["layer_head_mass"], rtol=1e-6)
    assert client.get(f"/api/overview?run=single&index={pos}&image=1").status_code == 404


# ------------------------------------------------------------------------------- 3. derived methods

def test_method_maps_of_image_k_split_like_raw(client, root):
    run = store.Run(root / "three")
    info = client.get("/api/initialize?run=three").get_json()
    assert {m["name"]: m["available"] for m in info["methods"]} == {"raw": True, **{m: True for m in METHODS}}
    for name in METHODS:
        maps = run.method(name)
        pos = int(maps.positions[-1])
        i = maps.index(pos)
        start = 1 if maps.meta.get("axis") == "start_layer" else None
        q = f"&start_layer={start}" if start is not None else "&layers=0-1"
        vec = maps.maps[start, i] if start is not None else maps.maps[:, i].mean(0)
        for k, g in enumerate(run.layout.images):
            d = client.get(f"/api/attention?run=three&index={pos}&image={k}&method={name}{q}").get_json()
            assert d["success"] and d["method"] == name and d["image"] == k, d
            tiles, glob = g.split(vec[run.layout.keys_of(k)])
            np.testing.assert_allclose(d["global"], glob, rtol=1e-4, atol=1e-6)
            if tiles is not None:
                np.testing.assert_allclose(d["grid"], tiles, rtol=1e-4, atol=1e-6)
            np.testing.assert_allclose(d["image_masses"], run.layout.mass(vec), rtol=1e-4, atol=1e-6)
            assert client.get(f"/api/overlay.png?run=three&index={pos}&image={k}&method={name}{q}").status_code == 200
    pos = run.prompt_length + MARK                  # synthetic rollout = the row's head mean: peaks on the mark
    d = client.get(f"/api/attention?run=three&index={pos}&image=2&method=rollout&start_layer=0").get_json()
    grid = np.asarray(d["grid"])
    assert np.unravel_index(np.argmax(grid), grid.shape) == (3, 5)


# ------------------------------------------------------------------------------- 4. dataset page

def test_dataset_page_says_which_runs_it_skips(root, tmp_path):
    ds = an.analyse_root(root, an.Params(), None, workers=1, progress=False)
    assert sorted(ds.skipped) == ["three", "two", "video"] and len(ds) == 2
    out = root / "analysis"
    try:
        head_report.write(out, ds, 5)
        assert "3 of them: several images or a video in one prompt" in (out / "report.md").read_text()
        client = create_app({"RUNS": str(root), "TESTING": True, "CACHE_DIR": str(tmp_path / "c")}).test_client()
        d = client.get("/api/dataset").get_json()
        assert d["success"] and d["inputs"]["runs_analysed"] == 2
        assert d["several"]["count"] == 3 and sorted(d["several"]["runs"]) == ["three", "two", "video"]
        assert d["several"]["line"] == "3 runs skipped: several images or a video in one prompt (open them one by one)"
        h = client.get("/api/dataset/head?layer=0&head=1&score=image_sum&n=4").get_json()
        assert h["success"] and {e["run"] for e in h["best"] + h["worst"]} <= {"single", "single2"}
        for e in h["best"]:
            assert client.get(f"/api/overlay.png?run={e['run']}&index={e['position']}&layers=0&heads=1").status_code == 200
        page = client.get("/dataset").get_data(as_text=True)
        assert 'id="skipped-several"' in page
    finally:
        if out.exists():
            import shutil
            shutil.rmtree(out)       # ours (head_report.write), made in this test's root


# ------------------------------------------------------------------------------- 5. export

def test_export_of_several_images_and_of_a_video(client, root, tmp_path):
    for name in ("three", "video"):
        run = store.Run(root / name)
        info = client.get(f"/api/initialize?run={name}").get_json()
        assert info["export"]["ok"] and info["export"]["reason"] is None
        assert info["export"]["bytes"] == ex.row_bytes(run)
        r = client.get(f"/export?run={name}")
        assert r.status_code == 200, r.data[:200]
        html = r.get_data(as_text=True)
        assert len(re.findall(r'"url":"data:image/png;base64,', html)) == len(run.layout)    # every image inlined
    done = ex.export(root / "three", tmp_path / "three.html", cache_dir=str(tmp_path / "c"))
    assert done["bytes"] > 0


def test_export_over_the_size_limit_is_refused_in_one_line(client, root, tmp_path, monkeypatch):
    run = store.Run(root / "video")
    monkeypatch.setattr(ex, "MAX_ROW_BYTES", ex.row_bytes(run) - 1)
    info = client.get("/api/initialize?run=video").get_json()
    assert info["export"]["ok"] is False and "too large" in info["export"]["reason"]
    assert f"{FRAMES} frames" in info["export"]["reason"] and "MB" in info["export"]["reason"]
    r = client.get("/export?run=video")
    line = r.get_data(as_text=True)
    assert r.status_code == 413 and line.count("\n") == 1 and line.startswith("cannot export video: too large to export")
    out = tmp_path / "video.html"
    with pytest.raises(UserError, match="too large to export"):
        ex.export(root / "video", out, cache_dir=str(tmp_path / "c"))
    assert not out.exists()                                        # nothing half-written
    smaller = [n for n in ("three", "two", "single") if ex.row_bytes(store.Run(root / n)) < ex.MAX_ROW_BYTES]
    assert smaller and all(client.get(f"/api/initialize?run={n}").get_json()["export"]["ok"] for n in smaller)
    # a one-image run has no limit (a real-shape run with 128 answer tokens holds ~38 MB of rows)
    monkeypatch.setattr(ex, "MAX_ROW_BYTES", 1)
    assert client.get("/api/initialize?run=single").get_json()["export"]["ok"] is True
    assert client.get("/api/initialize?run=two").get_json()["export"]["ok"] is False
    assert ex.export(root / "single", tmp_path / "single.html", cache_dir=str(tmp_path / "c"))["bytes"] > 0


# ------------------------------------------------------------------------------- in a browser

@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (CI installs it)")
    if not CHROMIUM.is_file():
        pytest.skip("/usr/bin/chromium is missing (CI installs it)")
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def server(app):
    from werkzeug.serving import make_server
    srv = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_port}"
    srv.shutdown()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    pg = context.new_page()
    pg.set_default_timeout(15_000)
    errors = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.on("console", lambda m: m.type == "error" and errors.append(m.text))
    yield pg
    context.close()
    assert not errors, f"console errors: {errors}"


PAINTED = """(c) => { const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let n = 0; for (let k = 3; k < d.length; k += 4) n += d[k] > 0; return n; }"""


def overview_values(page):
    return page.eval_on_selector_all("#overview .cell", "cs => cs.map(c => Number(c.dataset.value))")


@pytest.mark.parametrize("name", ["two", "three"])
def test_one_panel_per_image_each_with_its_overlay(page, server, root, name, client):
    run = store.Run(root / name)
    pos = run.prompt_length + MARK
    page.goto(f"{server}/?run={name}&token={pos}")
    n = len(run.layout)
    page.wait_for_function(f"() => document.querySelectorAll('#image-panels .panel-overlay[data-index=\"{pos}\"]').length === {n}")
    assert page.is_visible("#image-panels") and not page.is_visible("#image-strip")
    assert page.locator("#image-panels .image-panel").count() == n
    titles = page.locator("#image-panels .panel-title").all_text_contents()
    for k, (t, g) in enumerate(zip(titles, run.layout.images)):
        w, h = run.image_size(k)
        assert t.startswith(f"image {k} · {w}×{h} px")
        assert (f"{g.rows}×{g.cols} tiles" in t) if g.rows else ("global tile only" in t)
    canvases = page.locator("#image-panels .panel-overlay")
    grids = [canvases.nth(k).get_attribute("data-grid") for k in range(n)]
    assert grids == [f"{g.rows * 8}x{g.cols * 8}" if g.rows else "8x8" for g in run.layout.images]
    assert [canvases.nth(k).get_attribute("data-image") for k in range(n)] == [str(k) for k in range(n)]
    painted = [canvases.nth(k).evaluate(PAINTED) for k in range(n)]
    assert painted[-1] > 0                                  # the marked token: its key is in the last image
    masses = page.locator("#image-panels .panel-mass").all_text_contents()
    assert masses[-1].startswith("100.0%") and all(m.startswith("0.0%") for m in masses[:-1])
    other = answer_positions(run)[0]                        # a token with random rows: every panel painted
    page.click(f'.token[data-index="{other}"]')
    page.wait_for_function(f"() => document.querySelectorAll('#image-panels .panel-overlay[data-index=\"{other}\"]').length === {n}")
    assert all(canvases.nth(k).evaluate(PAINTED) > 0 for k in range(n))
    page.click('#image-panels .image-panel[data-image="1"]')   # a panel shows its image in the main view
    page.wait_for_function('() => document.getElementById("image").src.endsWith("image=1")')
    page.wait_for_selector('#image-panels .image-panel.selected[data-image="1"]')
    page.screenshot(path=str(SHOTS / f"viewer_{name}_images.png"), full_page=True)


def test_video_timeline_frame_click_and_overview_selector(page, server, root, client):
    run = store.Run(root / "video")
    pos = answer_positions(run)[1]
    page.goto(f"{server}/?run=video&token={pos}")
    page.wait_for_selector(f'#overlay[data-index="{pos}"]')
    page.wait_for_selector("#timeline[data-masses]")
    assert page.locator("#image-strip .thumb").count() == FRAMES and not page.is_visible("#image-panels")
    image, _ = stored(run, pos)
    mean = image.mean(1).mean(0)
    masses = [float(x) for x in page.eval_on_selector("#timeline", "e => e.dataset.masses").split(",")]
    np.testing.assert_allclose(masses, run.layout.mass(mean), rtol=1e-3)
    # the overview: all frames summed, then frame 5 alone, then all again
    assert page.is_visible("#overview-image")
    np.testing.assert_allclose(overview_values(page), expected_overview(run, pos, None).ravel(), rtol=1e-3)
    page.select_option("#overview-image", "5")
    page.wait_for_selector('#overview[data-image="5"]')
    five = overview_values(page)
    np.testing.assert_allclose(five, expected_overview(run, pos, 5).ravel(), rtol=1e-3, atol=1e-7)
    assert "on frame 5" in page.text_content("#overview-caption")
    with page.expect_response(lambda r: "/api/attention" in r.url and "image=5" in r.url):
        page.click('#image-strip .thumb[data-image="5"]')
    page.wait_for_function('() => document.getElementById("image").src.endsWith("image=5")')
    page.wait_for_selector('#image-strip .thumb.selected[data-image="5"]')
    page.wait_for_selector(f'#overlay[data-index="{pos}"]')
    page.screenshot(path=str(SHOTS / "viewer_video_timeline.png"), full_page=True)
    page.select_option("#overview-image", "all")
    page.wait_for_selector('#overview[data-image="all"]')
    np.testing.assert_allclose(overview_values(page), expected_overview(run, pos, None).ravel(), rtol=1e-3)


def test_export_button_is_disabled_with_the_reason_where_the_server_refuses(page, server, root, monkeypatch):
    page.goto(f"{server}/?run=video")
    page.wait_for_selector("#overlay[data-index]")
    assert page.get_attribute("#export-html", "href") == "/export?run=video"
    monkeypatch.setattr(ex, "MAX_ROW_BYTES", 1000)
    page.goto(f"{server}/?run=video")
    page.wait_for_selector("#overlay[data-index]")
    link = page.locator("#export-html")
    assert link.get_attribute("href") is None and link.get_attribute("aria-disabled") == "true"
    assert "too large to export" in link.get_attribute("title") and "disabled" in link.get_attribute("class")


def test_dataset_page_shows_the_skipped_line(page, server, root):
    ds = an.analyse_root(root, an.Params(), None, workers=1, progress=False)
    out = root / "analysis"
    head_report.write(out, ds, 5)
    try:
        app = create_app({"RUNS": str(root), "TESTING": True})
        from werkzeug.serving import make_server
        srv = make_server("127.0.0.1", 0, app, threaded=True)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        try:
            page.goto(f"http://127.0.0.1:{srv.server_port}/dataset")
            page.wait_for_selector(".ds-grid .cell")
            page.wait_for_selector("#skipped-several:not([hidden])")
            text = page.text_content("#skipped-several")
            assert text.startswith("3 runs skipped: several images or a video in one prompt (open them one by one)")
            assert page.locator("#skipped-several a").count() == 3
            assert page.get_attribute("#skipped-several a >> nth=0", "href").startswith("/?run=")
            page.screenshot(path=str(SHOTS / "dataset_skipped.png"), full_page=True)
        finally:
            srv.shutdown()
    finally:
        import shutil
        shutil.rmtree(out)


def test_exported_several_image_and_video_files_answer_as_the_server(page, root, client, tmp_path):
    """The exported file (file://, no server): its in-browser API answers image=K, the overview and
    the reverse view of image K as the server does (within the 8-bit embedding's error), its panels
    and timeline are drawn."""
    from test_export import close
    for name in ("three", "video"):
        run = store.Run(root / name)
        out = tmp_path / f"{name}.html"
        ex.export(root / name, out, cache_dir=str(tmp_path / "c"))
        page.goto(out.as_uri())
        page.wait_for_selector("#overlay[data-index]")
        pos = answer_positions(run)[1]
        n = len(run.layout)
        urls = ["/api/initialize"]
        for k in (0, n - 1):
            urls += [f"/api/attention?index={pos}&image={k}", f"/api/attention?index={pos}&image={k}&layers=1&heads=0",
                     f"/api/attention?index={pos}&image={k}&norm=shared&drop_sink=1",
                     f"/api/attention?index={pos}&image={k}&method=rollout&start_layer=1",
                     f"/api/overview?index={pos}&image={k}", f"/api/reverse?cell=1,2&view=global&image={k}"]
        if name == "three":   # the marked cell: its token leads
            urls.append(f"/api/reverse?cell=3,5&view=tiles&image=2")
        urls += [f"/api/overview?index={pos}&image=all", f"/api/overview?index={pos}&image=x",
                 f"/api/overview?index={pos}&image={n}", f"/api/attention?index={pos}&image={n}"]
        for url in urls:
            status, js = page.evaluate("(url) => window.smolattnExport.answer(url)", url)
            resp = client.get(url + f"&run={name}" if "?" in url else url + f"?run={name}")
            py = resp.get_json()
            assert status == resp.status_code, (url, js, py)
            if not py["success"]:
                assert js["success"] is False and js["error"] == py["error"], (url, js, py)
                continue
            if url.startswith("/api/initialize"):
                assert all(im["url"].startswith("data:image/") for im in js["images"]) and js["image_url"] == js["images"][0]["url"]
                for a, b in zip(js["images"], py["images"]):
                    a["url"] = b["url"]
                js["image_url"] = py["image_url"]
                js["run"] = py["run"]
            if url.startswith("/api/reverse"):   # the top values (sorted) within the 8-bit error of any row
                assert js["key"] == py["key"], url
                if "cell=3,5" in url:
                    assert js["tokens"][0]["index"] == py["tokens"][0]["index"] == run.prompt_length + MARK
                bound = max(float(run.layer(i).image.max()) for i in range(run.num_layers)) / 510 + 1e-9
                np.testing.assert_allclose(sorted(t["value"] for t in js["tokens"]),
                                           sorted(t["value"] for t in py["tokens"]), rtol=0, atol=bound, err_msg=url)
                js["tokens"], py["tokens"] = [], []
            if "vmin" in py:    # the min of a map: within the 8-bit error of its rows (their max / 510)
                for key in ("vmin", "vmax"):
                    assert abs(js[key] - py[key]) <= 0.01 * abs(py["vmax"]) + 1e-6, (url, key, js[key], py[key])
                    js[key] = py[key]
            js["run"] = py["run"]
            close(js, py, url)
        if name == "three":
            page.wait_for_function("() => document.querySelectorAll('#image-panels .panel-overlay[data-index]').length === 3")
        else:
            page.wait_for_selector("#timeline[data-masses]")
            assert page.locator("#image-strip .thumb").count() == FRAMES
