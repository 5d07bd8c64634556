"""Live mode in a real browser (Playwright driving Debian's chromium; the setup of test_viewer_browser.py)
on the tiny stand-in: ask about an uploaded image and watch the answer stream in, then its map in the
run view; a bad upload answers one line in the page. Screenshots go to artifacts/screenshots/ and
$H9_SHOTS when set."""
from __future__ import annotations

import io
import os
import threading
from pathlib import Path

import pytest
from PIL import Image

from test_viewer_browser import ARGS, CHROMIUM, SHOTS, browser, page  # noqa: F401

from smolattn import standin, synthetic
from viewer import create_app
from viewer import live as lv
from viewer.jobs import Live

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (CI installs it)")
pytestmark = pytest.mark.skipif(not CHROMIUM.is_file(), reason="/usr/bin/chromium is missing (CI installs it)")

# every streamed answer text the page showed, in order (a MutationObserver on #lv-answer)
WATCH = """() => { window.__seen = []; const a = document.getElementById('lv-answer');
  new MutationObserver(() => window.__seen.push([a.textContent, +a.dataset.tokens || 0]))
    .observe(a, {childList: true, characterData: true, subtree: true, attributes: true}); }"""


def shot(page, name):
    page.screenshot(path=str(SHOTS / name), full_page=True)
    extra = os.environ.get("H9_SHOTS")
    if extra:
        Path(extra).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(extra) / name), full_page=True)


def photo(path: Path, size=(480, 360)) -> Path:
    """A picture with some structure (a sky, a sun, a field)."""
    im = Image.new("RGB", size, (120, 170, 230))
    px = im.load()
    for y in range(size[1] * 2 // 3, size[1]):
        for x in range(size[0]):
            px[x, y] = (60 + x % 40, 140, 50)
    for y in range(40, 110):
        for x in range(300, 370):
            if (x - 335) ** 2 + (y - 75) ** 2 < 35 ** 2:
                px[x, y] = (250, 210, 60)
    im.save(path)
    return path


@pytest.fixture(scope="module")
def worker():
    w = Live({"id": str(standin.ensure("tiny")), "device": "cpu"}, threads=1)
    w.wait_ready(300)
    yield w
    w.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory, worker):
    from werkzeug.serving import make_server
    root = tmp_path_factory.mktemp("live") / "runs"
    synthetic.make_run(root / "photo", 3, 4)
    srv = make_server("127.0.0.1", 0, create_app({"RUNS": str(root), "CACHE_DIR": str(root.parent / "cache"),
                                                   "LIVE": worker}), threaded=True)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_port}", root
    srv.shutdown()


def test_ask_about_an_upload_streams_the_answer_then_opens_its_map(page, server, tmp_path):
    url, root = server
    page.set_default_timeout(120_000)
    page.goto(f"{url}/live")
    page.wait_for_selector("#lv-ask:not([disabled])")
    assert page.locator("#standin-banner").is_visible()
    assert "MiB" in page.inner_text("#lv-limits")
    page.set_input_files("#lv-file", str(photo(tmp_path / "field.png")))
    page.wait_for_selector("#lv-preview:not([hidden])")
    page.fill("#lv-prompt", "What is in the sky?")
    page.fill("#lv-tokens", "24")
    page.uncheck("#lv-open")                 # first watch the stream and the queue, then open the run
    page.evaluate(WATCH)
    page.click("#lv-ask")
    page.wait_for_function("() => +document.getElementById('lv-answer').dataset.tokens >= 3 || "
                           "['done', 'failed'].includes(document.getElementById('lv-answer').dataset.status)")
    shot(page, "live-ask-streaming.png")
    page.wait_for_selector('#lv-answer[data-status="done"]')
    seen = page.evaluate("window.__seen")
    counts = sorted({n for _, n in seen if n})
    assert len(counts) >= 3 and counts[-1] == 24             # the tokens came one by one, not all at the end
    partial = [t for t, n in seen if 0 < n < 24]
    final = page.inner_text("#lv-answer")
    assert partial and all(final.startswith(t.rstrip()) for t in partial if t.strip())
    row = page.locator("#lv-queue tbody tr").first
    assert row.get_attribute("data-status") == "done" and "field.png" in row.inner_text()
    shot(page, "live-ask-done.png")
    page.click("#lv-outcome a")
    page.wait_for_url("**/?run=live%2F*")
    page.wait_for_selector("#overlay[data-index]")          # the run's first answer token's map is drawn
    assert page.locator("#standin-banner").is_visible()
    runs = [p for p in (root / "live").iterdir() if not p.name.startswith(".")]
    assert len(runs) == 1 and runs[0].name.endswith("-field") and (runs[0] / "meta.json").is_file()
    assert page.locator("#lv-asklink").is_visible()
    shot(page, "live-ask-run.png")


def test_a_bad_upload_answers_one_line(page, server, tmp_path, monkeypatch):
    url, root = server
    page.goto(f"{url}/live")
    page.wait_for_selector("#lv-ask:not([disabled])")
    fake = tmp_path / "notes.png"
    fake.write_text("these are my notes, not a picture\n")
    page.set_input_files("#lv-file", str(fake))
    page.click("#lv-ask")
    page.wait_for_selector("#lv-error:not([hidden])")
    text = page.inner_text("#lv-error")
    assert "notes.png is not an image" in text and "\n" not in text
    monkeypatch.setattr(lv, "UPLOAD_MAX_BYTES", 4096)      # the server runs in this process
    big = tmp_path / "big.png"
    Image.effect_noise((200, 200), 80).convert("RGB").save(big)
    page.set_input_files("#lv-file", str(big))
    page.click("#lv-ask")
    page.wait_for_function("() => document.getElementById('lv-error').textContent.includes('larger')")
    text = page.inner_text("#lv-error")
    assert text == "the upload is larger than the limit of 4 KiB"
    shot(page, "live-bad-upload.png")
    assert not page.locator("#lv-current").is_visible()


def test_posts_without_the_token_or_from_another_origin_are_refused(page, server):
    url, _ = server
    page.goto(f"{url}/live")
    page.wait_for_selector("#lv-ask:not([disabled])")
    statuses = page.evaluate("""async () => {
      const form = () => { const f = new FormData(); f.append('prompt', 'hi'); f.append('image_run', 'photo'); return f; };
      const no = await fetch('/api/live/ask', {method: 'POST', body: form()});
      const bad = await fetch('/api/live/ask', {method: 'POST', body: form(), headers: {'X-Live-Token': 'guess'}});
      return [no.status, (await no.json()).error, bad.status];
    }""")
    assert statuses[0] == 403 and "token" in statuses[1] and statuses[2] == 403
    # another site's page cannot start a job: its Origin is refused (and it cannot read the token)
    other = page.context.new_page()
    other.goto("about:blank")
    got = other.evaluate("""async (url) => {
      try { const r = await fetch(url + '/api/live/ask', {method: 'POST', mode: 'no-cors', body: 'prompt=x',
                                                           headers: {'Content-Type': 'application/x-www-form-urlencoded'}});
            return r.type; } catch (e) { return 'error'; } }""", url)
    assert got in ("opaque", "error")
    import urllib.request
    req = urllib.request.Request(f"{url}/api/live/ask", data=b"prompt=x", method="POST",
                                 headers={"Origin": "http://evil.example", "X-Live-Token": "x"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req)
    assert e.value.code == 403
    snap = page.evaluate("fetch('/api/live/status').then(r => r.json())")
    assert not [j for j in snap["jobs"] if j["label"].endswith((": hi", ": x"))]     # none of these became a job


@pytest.fixture(scope="module")
def base_run(server, worker, tmp_path_factory):
    """A run of the live worker (the tiny stand-in), to intervene on: its name."""
    pytest.importorskip("smolattn.interventions", reason="the interventions core is not in this checkout")
    _, root = server
    image = photo(tmp_path_factory.mktemp("base") / "field.png")
    job = worker.submit("ask", "base", {"image": str(image), "prompt": "Is there a sun?", "max_new_tokens": 6,
                                        "methods": ["raw"], "out": str(root / "live" / "base-field"),
                                        "name": "live/base-field"})
    import time
    while not worker.job(job.id).done:
        time.sleep(0.05)
    assert worker.job(job.id).status == "done", worker.job(job.id).error
    return "live/base-field"


def open_base(page, url, name):
    page.set_default_timeout(120_000)
    page.goto(f"{url}/?run={name}")
    page.wait_for_selector("#overlay[data-index]")
    page.wait_for_selector("#lv-iv:not([hidden])")


def test_toggle_two_heads_off_run_and_compare_with_base(page, server, base_run):
    url, _ = server
    open_base(page, url, base_run)
    page.check("#lv-pick-heads")
    for layer, head in ((0, 1), (2, 3)):
        page.click(f'#overview .cell[data-layer="{layer}"][data-head="{head}"]')
    off = page.eval_on_selector_all("#overview .cell.lv-off", "els => els.map(e => [+e.dataset.layer, +e.dataset.head])")
    assert sorted(off) == [[0, 1], [2, 3]]
    assert page.input_value("#layer-mode") == "range"        # picking heads did not change the view
    assert page.inner_text("#lv-heads-count") == "2 heads off: 0:1, 2:3"
    page.click('.token[data-index]:not(.special) >> nth=-1')  # another token: the grid is drawn again ...
    page.wait_for_timeout(300)
    assert page.locator("#overview .cell.lv-off").count() == 2   # ... and keeps the marks
    shot(page, "live-intervene-heads.png")
    page.click("#lv-iv-run")
    page.wait_for_url("**compare_base=1**")
    page.wait_for_selector("#iv-ov-base[data-index]")
    page.wait_for_selector("#iv-ov-run[data-index]")
    assert page.inner_text("#iv-badge") == "ablated 0:1, 2:3"
    assert page.locator("#iv-chart svg rect.bar").count() >= 1
    assert page.inner_text("#iv-answer-base") not in ("", "–")
    shot(page, "live-compare-heads.png")


def test_draw_a_box_and_run_a_knockout(page, server, base_run):
    url, root = server
    open_base(page, url, base_run)
    page.click("#lv-draw")
    box = page.locator("#image").bounding_box()
    x0, y0 = box["x"] + box["width"] * 0.55, box["y"] + box["height"] * 0.05
    x1, y1 = box["x"] + box["width"] * 0.85, box["y"] + box["height"] * 0.40
    page.mouse.move(x0, y0)
    page.mouse.down()
    page.mouse.move(x1, y1, steps=6)
    page.mouse.up()
    assert page.locator("#lv-boxrect").is_visible()
    got = [int(v) for v in page.inner_text("#lv-box").removeprefix("box ").removesuffix(" px").split(", ")]
    assert all(abs(a - b) <= 2 for a, b in zip(got, [264, 18, 408, 144])), got   # 480 x 360 pixels
    assert page.is_checked("#lv-ko-on") and page.inner_text("#reverse-list") == ""   # no reverse-view click
    page.select_option("#lv-ko-from", "last")
    page.select_option("#lv-ko-to", "box")
    page.select_option("#lv-ko-lo", "1")
    page.select_option("#lv-ko-hi", "3")
    shot(page, "live-intervene-box.png")
    page.click("#lv-iv-run")
    page.wait_for_url("**compare_base=1**")
    page.wait_for_selector("#iv-ov-base[data-index]")
    badge = page.inner_text("#iv-badge")
    assert badge.startswith("knockout last → box:") and badge.endswith("layers 1-3"), badge
    page.wait_for_selector("#iv-ov-run[data-boxes]")
    assert page.get_attribute("#iv-ov-run", "data-boxes") == "1"     # the knocked-out box drawn on the map
    shot(page, "live-compare-box.png")
    # the box in a sweep: the curve opens
    open_base(page, url, base_run)
    page.select_option("#lv-ko-to", "image")
    page.fill("#lv-window", "3")
    page.click("#lv-iv-sweep")
    page.wait_for_url("**/sweep?name=**")
    page.wait_for_selector("#sw-picture:not([hidden])")
    shot(page, "live-sweep.png")


def test_a_bad_intervention_answers_one_line(page, server, base_run):
    url, _ = server
    open_base(page, url, base_run)
    page.check("#lv-ko-on")
    page.select_option("#lv-ko-to", "box")          # no box drawn
    page.click("#lv-iv-run")
    page.wait_for_selector("#lv-iv-error:not([hidden])")
    assert page.inner_text("#lv-iv-error") == "draw a box on the photo first (or knock out the whole image)"
    page.select_option("#lv-ko-to", "image")
    page.uncheck("#lv-ko-on")
    page.click("#lv-iv-run")                        # nothing chosen: the server's line
    page.wait_for_function("() => document.getElementById('lv-iv-error').textContent.startsWith('choose')")
    assert "\n" not in page.inner_text("#lv-iv-error")


@pytest.fixture(scope="module")
def two_run(server, tmp_path_factory):
    """A run of two images in one prompt (the tiny stand-in), to intervene on: its name."""
    pytest.importorskip("smolattn.interventions", reason="the interventions core is not in this checkout")
    from smolattn import extract as ex
    from smolattn import model as mdl

    _, root = server
    folder = tmp_path_factory.mktemp("two")
    paths = [photo(folder / "a.png"), synthetic.test_image((300, 400)).save(folder / "b.png") or folder / "b.png"]
    ex.extract_images(mdl.load(str(standin.ensure("tiny")), device="cpu"), paths, root / "two",
                      ex.Settings("Which one has a sun?", 4))
    return "two"


def test_a_box_on_the_second_image_knocks_out_that_image(page, server, two_run):
    """On a run of several images the box is in the pixels of the image shown (its index goes with it:
    box:1:...), switching images drops a box drawn on another, and 'this image' means the one shown."""
    url, _ = server
    open_base(page, url, two_run)
    labels = page.eval_on_selector_all("#lv-ko-to option", "os => os.map(o => [o.value, o.textContent])")
    assert ["image", "this image (0, the one shown)"] in labels and ["every", "every image"] in labels
    page.click('#image-panels .image-panel[data-image="1"]')
    page.wait_for_function('document.getElementById("image").src.endsWith("image=1")')
    page.click("#lv-draw")
    box = page.locator("#image").bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.1, box["y"] + box["height"] * 0.1)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.6, box["y"] + box["height"] * 0.5, steps=6)
    page.mouse.up()
    got = [int(v) for v in page.inner_text("#lv-box").removeprefix("box ").removesuffix(" px").split(", ")]
    assert all(abs(a - b) <= 2 for a, b in zip(got, [30, 40, 180, 200])), got    # image 1 is 300 x 400
    page.click('#image-panels .image-panel[data-image="0"]')                    # another image: the box goes
    page.wait_for_function('document.getElementById("lv-box").textContent === "no box"')
    page.click('#image-panels .image-panel[data-image="1"]')
    page.click("#lv-draw")
    page.mouse.move(box["x"] + box["width"] * 0.1, box["y"] + box["height"] * 0.1)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.6, box["y"] + box["height"] * 0.5, steps=6)
    page.mouse.up()
    page.select_option("#lv-ko-from", "last")
    page.select_option("#lv-ko-to", "box")
    with page.expect_response(lambda r: "/api/live/intervene" in r.url) as resp:
        page.click("#lv-iv-run")
    body = resp.value.json()
    assert body["success"], body
    to = body["argv"][body["argv"].index("--to") + 1]
    assert to.startswith("box:1:"), to
    page.wait_for_url("**compare_base=1**")
    page.wait_for_selector("#iv-ov-base[data-index]")
    assert "box:1:" in page.inner_text("#iv-badge")
    # the intervened run opens on the image its knockout is in, and compares that image in both runs
    page.wait_for_function('document.getElementById("iv-ov-base").dataset.image === "1"')
    assert page.get_attribute("#iv-ov-run", "data-image") == "1" and "image 1" in page.inner_text("#iv-maps-title")
    assert page.get_attribute("#iv-img-base", "src").endswith("image=1")
    assert page.get_attribute("#iv-ov-run", "data-boxes") == "1" == page.get_attribute("#iv-ov-base", "data-boxes")
    assert page.get_attribute("#image", "src").endswith("image=1")
    shot(page, "live-compare-box-image1.png")
    page.click('#image-panels .image-panel[data-image="0"]')          # another image: both maps follow
    page.wait_for_function('document.getElementById("iv-ov-base").dataset.image === "0"')
    assert "image=0" in page.url and page.get_attribute("#iv-ov-run", "data-boxes") == "0"   # the box is in image 1
    page.reload()                                                      # a reload keeps the image shown
    page.wait_for_selector("#iv-ov-base[data-index]")
    assert page.get_attribute("#iv-ov-base", "data-image") == "0" and "image=1" not in page.get_attribute("#image", "src")
    page.goto(page.url.replace("image=0", "image=1"))
    page.wait_for_selector("#iv-ov-base[data-index]")
    assert page.get_attribute("#image", "src").endswith("image=1")
