"""One run as one HTML file (viewer/export.py + static/js/offline.js): the file opens from a file://
URL with no server, draws the clicked token's map, and its in-browser API answers as the server does
(within the 8-bit embedding's error); the export never overwrites a file of the user's."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from smolattn import synthetic
from smolattn.errors import UserError
from viewer import create_app
from viewer import export as ex

CHROMIUM = Path("/usr/bin/chromium")
SHOTS = Path(__file__).resolve().parent.parent / "artifacts" / "screenshots"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
        "--disable-component-update", "--disable-sync"]
ROWS, COLS = 3, 4
TILE_CELL, GLOBAL_CELL = (5, 27), (2, 6)
TILE_TOKEN, GLOBAL_TOKEN = 1, 4      # answer offsets (as test_viewer_browser.py)


def tile_key(i, j, side=8):
    return ((i // side) * COLS + j // side) * side * side + (i % side) * side + j % side


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(run dir, exported file, Flask client, answer positions) for a run with every derived method."""
    root = tmp_path_factory.mktemp("export")
    _, plen = synthetic.make_tokens(ROWS, COLS)
    one_hot = {plen + TILE_TOKEN: tile_key(*TILE_CELL), plen + GLOBAL_TOKEN: ROWS * COLS * 64 + GLOBAL_CELL[0] * 8 + GLOBAL_CELL[1]}
    run = synthetic.make_run(root / "run", ROWS, COLS, one_hot=one_hot, layers=3, heads=2,
                             methods=("rollout", "relevancy", "relative"))
    out = root / "run.html"
    done = ex.export(run, out, cache_dir=str(root / "cache"))
    assert done["bytes"] == out.stat().st_size
    app = create_app({"RUN": str(run), "TESTING": True, "CACHE_DIR": str(root / "cache")})
    return run, out, app.test_client(), (plen + TILE_TOKEN, plen + GLOBAL_TOKEN)


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


@pytest.fixture
def page(browser, exported):
    """The exported file opened from disk (file://): no server runs. Fails on any console error."""
    context = browser.new_context(viewport={"width": 1400, "height": 950})
    pg = context.new_page()
    pg.set_default_timeout(15_000)
    errors = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.on("console", lambda m: m.type == "error" and errors.append(m.text))
    pg.goto(exported[1].as_uri())
    pg.wait_for_selector("#overlay[data-index]")
    yield pg
    context.close()
    assert not errors, f"console errors: {errors}"


def close(js, py, path="") -> None:
    """The page's answer equals the server's: same keys, same strings and integers, numbers within
    the 8-bit error (|error| <= row max / 510 per value; 1% of the largest value of the field)."""
    if isinstance(py, dict):
        assert set(js) == set(py), (path, set(js) ^ set(py))
        for k in py:
            close(js[k], py[k], f"{path}.{k}")
    elif isinstance(py, list) and py and isinstance(py[0], (list, float, int)) and not isinstance(py[0], bool) \
            and all(isinstance(x, (list, float, int)) for x in py):
        a, b = np.asarray(js, dtype=float), np.asarray(py, dtype=float)
        assert a.shape == b.shape, (path, a.shape, b.shape)
        np.testing.assert_allclose(a, b, rtol=0, atol=0.01 * float(np.abs(b).max()) + 1e-9, err_msg=path)
    elif isinstance(py, list):
        assert len(js) == len(py), path
        for i, (x, y) in enumerate(zip(js, py)):
            close(x, y, f"{path}[{i}]")
    elif isinstance(py, float):
        assert isinstance(js, (int, float)) and abs(js - py) <= 0.01 * abs(py) + 1e-6, (path, js, py)
    else:
        assert js == py, (path, js, py)


def test_offline_api_answers_as_the_server(page, exported):
    _, _, client, (tile_pos, glob_pos) = exported
    urls = [f"/api/initialize"]
    for pos in (tile_pos, glob_pos):
        urls += [f"/api/attention?index={pos}",
                 f"/api/attention?index={pos}&layers=1&heads=0",
                 f"/api/attention?index={pos}&layers=0-2&heads=max&drop_sink=1&norm=shared",
                 f"/api/attention?index={pos}&layers=2&heads=1&norm=shared",
                 f"/api/attention?index={pos}&method=rollout&start_layer=1",
                 f"/api/attention?index={pos}&method=relevancy&start_layer=0&norm=shared&drop_sink=1",
                 f"/api/attention?index={pos}&method=relative&layers=1-2&norm=shared",
                 f"/api/text_attention?index={pos}",
                 f"/api/text_attention?index={pos}&layers=1&heads=1"]
    urls += [f"/api/reverse?cell={TILE_CELL[0]},{TILE_CELL[1]}&view=tiles",
             f"/api/reverse?cell={GLOBAL_CELL[0]},{GLOBAL_CELL[1]}&view=global&layers=2&heads=max",
             "/api/attention?index=99999", f"/api/attention?index=3", f"/api/attention?index={tile_pos}&layers=9",
             f"/api/attention?index={tile_pos}&heads=7", "/api/reverse?cell=x"]
    for url in urls:
        status, js = page.evaluate("(url) => window.smolattnExport.answer(url)", url)
        resp = client.get(url)
        py = resp.get_json()
        assert status == resp.status_code, (url, js, py)
        if not py["success"]:
            assert js["success"] is False and js["error"], url
            continue
        if url.startswith("/api/initialize"):
            assert js["image_url"].startswith("data:image/")
            js["image_url"] = py["image_url"]
        if url.startswith("/api/reverse"):   # the ranking: same leader, same values (ties may swap)
            assert js["tokens"][0]["index"] == py["tokens"][0]["index"] in (tile_pos, glob_pos), url
            js["tokens"].sort(key=lambda t: -t["value"])
            close(sorted(t["value"] for t in js["tokens"]), sorted(t["value"] for t in py["tokens"]), url)
            js["tokens"], py["tokens"] = [], []
        close(js, py, url)


def test_click_token_draws_its_map_with_no_server(page, exported):
    _, _, _, (tile_pos, glob_pos) = exported
    page.click(f'.token[data-index="{glob_pos}"]')
    page.wait_for_selector(f'#overlay[data-index="{glob_pos}"]')
    page.click(f'.token[data-index="{tile_pos}"]')     # its one-hot tile cell: the map has pixels
    page.wait_for_selector(f'#overlay[data-index="{tile_pos}"]')
    drawn = page.evaluate("""() => { const c = document.getElementById('overlay');
      const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
      let n = 0; for (let k = 3; k < d.length; k += 4) n += d[k] > 0; return n; }""")
    assert drawn > 0                                    # the map is painted over the image
    page.select_option("#layer-mode", "single")
    page.select_option("#layer", "1")
    page.select_option("#heads", "1")
    page.wait_for_selector('#overlay[data-layers="1-1"]')
    page.select_option("#method", "rollout")
    page.wait_for_selector('#overlay[data-method="rollout"]')
    page.click("#overview .cell[data-layer='2'][data-head='0']")
    page.select_option("#method", "raw")
    page.wait_for_selector('#overlay[data-method="raw"]')
    page.click("#text-view summary")
    page.wait_for_selector("#text-list li")
    page.click("#stage", position={"x": 50, "y": 50})
    page.wait_for_selector("#reverse-list li")
    assert page.is_hidden("#export-html") and page.is_hidden("a.toplink")   # server-only controls
    assert page.is_hidden("#alert")
    page.screenshot(path=str(SHOTS / "export.png"), full_page=True)


def test_export_never_overwrites_a_users_file(exported, tmp_path):
    run, ours, _, _ = exported
    theirs = tmp_path / "notes.html"
    theirs.write_text("<p>my notes</p>")
    with pytest.raises(UserError, match="not written by smolattn"):
        ex.export(run, theirs)
    assert theirs.read_text() == "<p>my notes</p>"
    with pytest.raises(UserError, match="must end in .html"):
        ex.export(run, tmp_path / "out.png")
    assert not (tmp_path / "out.png").exists()
    again = tmp_path / "again.html"
    ex.export(run, again)
    ex.export(run, again)                               # our own file is replaced
    assert ex.ours(again) and not list(tmp_path.glob(".*tmp*"))


def test_export_button_downloads_the_same_file(exported):
    run, out, client, _ = exported
    page = client.get("/").get_data(as_text=True)
    assert 'id="export-html"' in page and "/export" in page
    resp = client.get(f"/export?run={run.name}")
    assert resp.status_code == 200 and "attachment" in resp.headers["Content-Disposition"]
    html = resp.get_data(as_text=True)
    assert ex.GENERATOR in html and '<script src="/static' not in html and 'href="/static' not in html
    data = json.loads(html.split('id="smolattn-export">', 1)[1].split("</script>", 1)[0])
    assert data["run"] == run.name and data["shape"]["layers"] == 3 and set(data["methods"]) == {
        "rollout", "relevancy", "relative"}
    assert client.get("/export?run=nope").status_code == 404


def test_b85_round_trip():
    data = bytes(range(256)) * 3 + b"\xff\xfe"
    text = ex.b85(data)
    assert "<" not in text and len(text) == (len(data) + 3) // 4 * 5
    value = {c: i for i, c in enumerate(ex.B85)}
    out = bytearray()
    for i in range(0, len(text), 5):
        w = 0
        for c in text[i:i + 5]:
            w = w * 85 + value[c]
        out += w.to_bytes(4, "big")
    assert bytes(out[:len(data)]) == data
