"""The viewer on a video run and a two-image run in a real browser: a thumbnail per image (frame), the
selected token's attention mass per image as a timeline, and a click that shows that image's map.
Screenshots go to artifacts/screenshots/ (family_video.png, family_two.png)."""
from __future__ import annotations

import threading

import pytest

from smolattn import standin, synthetic
from smolattn import extract as ex
from smolattn import model as mdl
from viewer import create_app

from test_viewer_browser import ARGS, CHROMIUM, SHOTS

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (CI installs it)")
pytestmark = pytest.mark.skipif(not CHROMIUM.is_file(), reason="/usr/bin/chromium is missing (CI installs it)")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from werkzeug.serving import make_server
    from test_family import encode_mp4

    root = tmp_path_factory.mktemp("family_runs")
    smol = mdl.load(str(standin.ensure("smolvlm2-tiny")), device="cpu")
    clip = root / "clip.mp4"
    encode_mp4(clip, 16, 4, mark=(15, (24, 16, 24, 24)))
    settings = ex.Settings(max_new_tokens=3)
    ex.extract_video(smol, clip, root / "runs" / "video", settings)
    ex.extract_video(smol, clip, root / "runs" / "frames", settings, keep_frame_rows=True)
    paths = []
    for k, size in enumerate([(640, 480), (300, 400)]):
        paths.append(root / f"im{k}.png")
        synthetic.test_image(size).save(paths[-1])
    ex.extract_images(smol, paths, root / "runs" / "two", settings)
    srv = make_server("127.0.0.1", 0, create_app({"RUNS": str(root / "runs"), "CACHE_DIR": str(root / "cache")}),
                      threaded=True)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_port}"
    srv.shutdown()


@pytest.mark.parametrize("name,count", [("video", 4), ("two", 2)])
def test_strip_timeline_and_click_to_an_image(server, name, count):
    SHOTS.mkdir(parents=True, exist_ok=True)
    errors = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(15_000)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(f"{server}/?run={name}")
        page.wait_for_selector("#overlay[data-index]")
        page.wait_for_selector("#timeline[data-masses]")
        assert page.is_visible("#images-panel")
        item = "#image-strip .thumb" if name == "video" else "#image-panels .image-panel"   # images: a panel each
        assert page.locator(item).count() == count
        masses = [float(x) for x in page.eval_on_selector("#timeline", "e => e.dataset.masses").split(",")]
        assert len(masses) == count and all(m > 0 for m in masses)
        if name == "video":
            with page.expect_response(lambda r: "/api/attention" in r.url and f"image={count - 1}" in r.url):
                page.click(f'{item}[data-image="{count - 1}"]')
        else:   # every image's map is on the page already (its panel's)
            page.click(f'{item}[data-image="{count - 1}"]')
        page.wait_for_function(f'document.getElementById("image").src.endsWith("image={count - 1}")')
        assert page.locator(f"{item}.selected").get_attribute("data-image") == str(count - 1)
        page.screenshot(path=str(SHOTS / f"family_{name}.png"), full_page=True)
        browser.close()
    assert not errors, errors


def test_kept_rows_between_frames_are_clickable(server):
    """A run made with --keep-frame-rows: one chip per frame, and each frame's timestamp text between
    them is a token the page can select (its map is drawn); without the flag one chip covers all."""
    errors = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(15_000)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(f"{server}/?run=frames")
        page.wait_for_selector("#overlay[data-index]")
        chips = page.locator("#prompt-tokens .image-chip")
        assert chips.count() == 4 and chips.nth(3).inner_text() == "[frame 3: 64 tokens]"
        info = page.request.get(f"{server}/api/initialize?run=frames").json()
        first, last = info["images"][0]["geometry"]["image_block"][1], info["images"][1]["geometry"]["image_block"][0]
        between = [t["index"] for t in info["token_table"] if first < t["index"] < last and t["has_row"]]
        assert between, "the run kept no row between frames"
        with page.expect_response(lambda r: "/api/attention" in r.url and f"index={between[-1]}" in r.url):
            page.click(f'#prompt-tokens [data-index="{between[-1]}"]')
        page.wait_for_function(f'document.getElementById("overlay").dataset.index === "{between[-1]}"')
        page.screenshot(path=str(SHOTS / "family_frame_rows.png"), full_page=True)
        page.goto(f"{server}/?run=video")
        page.wait_for_selector("#overlay[data-index]")
        assert page.locator("#prompt-tokens .image-chip").count() == 1
        browser.close()
    assert not errors, errors
