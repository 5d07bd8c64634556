"""The viewer page in a real browser (Playwright driving Debian's chromium, never a downloaded one).

Synthetic runs put a known one-hot on one image cell; the tests click the token and check that the
overlay's hottest pixels sit over that cell, for landscape, portrait and square tile grids.
Screenshots go to artifacts/screenshots/.
"""
from __future__ import annotations

import threading
from pathlib import Path

import pytest

from smolattn import geometry as geo
from smolattn import synthetic
from viewer import create_app

CHROMIUM = Path("/usr/bin/chromium")
SHOTS = Path(__file__).resolve().parent.parent / "artifacts" / "screenshots"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-quic",
        "--no-first-run", "--disable-component-update", "--disable-sync"]
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (CI installs it)")
pytestmark = pytest.mark.skipif(not CHROMIUM.is_file(), reason="/usr/bin/chromium is missing (CI installs it)")

# name -> (rows, cols, image size, hot tiled cell (i, j), hot global cell (i, j))
SHAPES = {
    "landscape": (3, 4, (640, 480), (5, 27), (2, 6)),
    "portrait": (4, 3, (480, 640), (29, 3), (6, 1)),
    "square": (4, 4, (500, 500), (17, 20), (4, 4)),
}
TILE_TOKEN, GLOBAL_TOKEN = 1, 4   # answer offsets of " skier" and " red"
EVIL = ["ĠA", "Ġ<b>bold</b>", "Ġ<img", "Ġsrc=x", "Ġonerror=window.__xss=1>", "Ġ&amp;", "Ġ\"'", "."]


KOREAN, JAPANESE, EMOJI = "이 고양이를 설명해 주세요", "猫がソファの上で寝ています。", " 🐱 café"


def byte_level_bpe():
    """The tiny stand-in's byte-level BPE (the GPT-2 byte alphabet, as SmolLM2's)."""
    from tokenizers import Tokenizer

    from smolattn import standin
    tok = Tokenizer.from_file(str(standin.ensure("tiny") / "tokenizer.json"))
    return lambda text: tok.encode(text, add_special_tokens=False).tokens


def tile_key(rows, cols, i, j, side=8):
    return ((i // side) * cols + j // side) * side * side + (i % side) * side + j % side


def positions(rows, cols):
    _, plen = synthetic.make_tokens(rows, cols)
    return plen + TILE_TOKEN, plen + GLOBAL_TOKEN


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from werkzeug.serving import make_server
    root = tmp_path_factory.mktemp("runs")
    for name, (rows, cols, size, (i, j), (gi, gj)) in SHAPES.items():
        tile_pos, global_pos = positions(rows, cols)
        one_hot = {tile_pos: tile_key(rows, cols, i, j), global_pos: rows * cols * 64 + gi * 8 + gj}
        synthetic.make_run(root / name, rows, cols, image_size=size, one_hot=one_hot, layers=3, heads=2)
        if name == "landscape":   # the same run with every derived method stored (synthetic maps)
            synthetic.make_run(root / "methods", rows, cols, image_size=size, one_hot=one_hot, layers=3, heads=2,
                               methods=("rollout", "relevancy", "relative"))
    synthetic.make_run(root / "reference", 3, 4, reference=True)
    synthetic.make_run(root / "escape", 3, 4, answer=EVIL)
    bpe = byte_level_bpe()
    synthetic.make_run(root / "korean", 3, 4, prompt=bpe(" " + KOREAN), layers=3, heads=2,
                       answer=bpe(" " + JAPANESE) + bpe(EMOJI))
    (root / "broken").mkdir()
    (root / "broken" / "decoded_tokens.npy").write_bytes(b"not a numpy file")
    srv = make_server("127.0.0.1", 0, create_app({"RUNS": str(root), "ALLOW_PICKLE": True}), threaded=True)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_port}"
    srv.shutdown()


@pytest.fixture(scope="module")
def browser():
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1400, "height": 950}, accept_downloads=True)
    pg = context.new_page()
    pg.set_default_timeout(10_000)
    errors = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.on("response", lambda r: r.status == 404 and not r.url.count("/api/") and errors.append(f"404 {r.url}"))
    yield pg
    context.close()
    assert not errors, f"JavaScript errors or missing files: {errors}"


def open_run(page, server, name):
    page.goto(f"{server}/?run={name}")
    page.wait_for_selector("#overlay[data-index]")   # the first answer token is drawn on load


def click_token(page, index):
    page.click(f'.token[data-index="{index}"]')
    page.wait_for_selector(f'#overlay[data-index="{index}"]')


HOT_CENTRE = """([selector, byBrightness]) => {
  const c = document.querySelector(selector);
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  const score = (k) => byBrightness ? d[k] + d[k + 1] + d[k + 2] : d[k + 3];
  let max = 0;
  for (let k = 0; k < d.length; k += 4) max = Math.max(max, score(k));
  let sx = 0, sy = 0, n = 0;
  for (let y = 0; y < c.height; y++) for (let x = 0; x < c.width; x++) {
    if (score((y * c.width + x) * 4) >= 0.97 * max) { sx += x + 0.5; sy += y + 0.5; n++; }
  }
  return {x: sx / n / c.width, y: sy / n / c.height, max, n};
}"""


def assert_inside(centre, box, size):
    x, y = centre["x"] * size[0], centre["y"] * size[1]
    assert box[0] <= x < box[2] and box[1] <= y < box[3], (centre, box)


@pytest.mark.parametrize("name", list(SHAPES))
def test_overlay_hottest_pixels_over_the_one_hot_cell(page, server, name):
    rows, cols, size, (i, j), (gi, gj) = SHAPES[name]
    tokens, _ = synthetic.make_tokens(rows, cols)
    g = geo.from_tokens(tokens)
    tile_pos, global_pos = positions(rows, cols)
    open_run(page, server, name)
    click_token(page, tile_pos)

    img = page.locator("#image").bounding_box()
    canvas = page.locator("#overlay").bounding_box()
    assert all(abs(img[k] - canvas[k]) < 1 for k in ("x", "y", "width", "height"))
    assert abs(img["width"] / img["height"] - size[0] / size[1]) < 0.02
    hot = page.evaluate(HOT_CENTRE, ["#overlay", False])
    assert hot["max"] > 150
    assert_inside(hot, g.cell_box(i, j, size), size)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)

    page.locator("input[name=upsample][value=smooth]").check()   # smooth keeps the centre in the cell
    page.wait_for_selector(f'#overlay[data-index="{tile_pos}"]')
    assert_inside(page.evaluate(HOT_CENTRE, ["#overlay", False]), g.cell_box(i, j, size), size)

    page.eval_on_selector("#opacity", "e => { e.value = 1; e.dispatchEvent(new Event('input')); }")
    # the global panel has the image under the map: at full opacity the hottest pixels are the whitest
    click_token(page, global_pos)
    hot = page.evaluate(HOT_CENTRE, ["#global", True])
    assert_inside(hot, g.cell_box(gi, gj, (1, 1), view="global"), (1, 1))


def test_reverse_view_ranks_the_one_hot_token_first(page, server):
    rows, cols, size, (i, j), _ = SHAPES["landscape"]
    tile_pos, _ = positions(rows, cols)
    open_run(page, server, "landscape")
    box = page.locator("#image").bounding_box()
    gh, gw = rows * 8, cols * 8
    page.mouse.click(box["x"] + (j + 0.5) * box["width"] / gw, box["y"] + (i + 0.5) * box["height"] / gh)
    first = page.locator("#reverse-list li").first
    first.wait_for()
    assert first.get_attribute("data-index") == str(tile_pos)
    assert page.locator("#cell-marker").is_visible()
    page.screenshot(path=str(SHOTS / "reverse.png"), full_page=True)
    first.click()                                           # jumping to that token draws it
    page.wait_for_selector(f'#overlay[data-index="{tile_pos}"]')


def test_keyboard_overview_and_download(page, server, tmp_path):
    rows, cols, size, _, _ = SHAPES["landscape"]
    tile_pos, _ = positions(rows, cols)
    open_run(page, server, "landscape")
    click_token(page, tile_pos)
    page.keyboard.press("ArrowRight")
    page.wait_for_selector(f'#overlay[data-index="{tile_pos + 1}"]')
    page.keyboard.press("ArrowLeft")
    page.wait_for_selector(f'#overlay[data-index="{tile_pos}"]')
    assert page.locator(".token.selected").get_attribute("data-index") == str(tile_pos)

    assert page.locator("#overview .cell").count() == 3 * 2
    page.click('#overview .cell[data-layer="1"][data-head="1"]')
    page.wait_for_selector('#overview .cell.current[data-layer="1"][data-head="1"]')
    assert page.locator("#layer-mode").input_value() == "single"
    assert page.locator("#layer").input_value() == "1" and page.locator("#heads").input_value() == "1"

    with page.expect_download() as info:
        page.click("#download")
    path = tmp_path / "view.png"
    info.value.save_as(path)
    from PIL import Image
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == size


def test_errors_show_in_the_alert_and_keep_the_ui(page, server):
    page.goto(f"{server}/?run=broken")
    alert = page.locator("#alert")
    alert.wait_for()
    assert "cannot be read" in alert.inner_text()
    assert page.locator("#controls").is_visible() and page.locator("#picker").is_visible()
    page.screenshot(path=str(SHOTS / "error.png"), full_page=True)

    page.goto(f"{server}/?run=..%2F..%2Fetc")
    page.locator("#alert").wait_for()
    assert "unknown run" in page.locator("#alert-text").inner_text()

    open_run(page, server, "landscape")                      # a failing data request keeps the page
    page.route("**/api/attention?*", lambda route: route.fulfill(
        status=404, content_type="application/json", body='{"success": false, "error": "unknown layer 99"}'))
    page.click(f'.token[data-index="{positions(3, 4)[0]}"]')
    page.locator("#alert").wait_for()
    assert page.locator("#alert-text").inner_text() == "unknown layer 99"
    assert page.locator("#image").is_visible() and page.locator("#answer-tokens").is_visible()


def test_token_text_is_escaped(page, server):
    _, plen = synthetic.make_tokens(3, 4)
    open_run(page, server, "escape")
    texts = page.eval_on_selector_all("#answer-tokens .token", "els => els.map(e => e.textContent)")
    for raw in EVIL:
        assert raw.replace("Ġ", " ") in texts
    assert page.locator("#answer-tokens b, #answer-tokens img").count() == 0
    assert page.evaluate("window.__xss") is None
    assert page.locator(f'.token[data-index="{plen + 6}"]').text_content() == " \"'"
    page.screenshot(path=str(SHOTS / "escape.png"), full_page=True)


def test_standin_banner(page, server):
    open_run(page, server, "landscape")
    banner = page.locator("#standin-banner")
    assert banner.is_visible() and "NOT SmolVLM's" in banner.inner_text()
    open_run(page, server, "reference")                     # reference-format run: real model, no banner
    assert not banner.is_visible()
    assert page.locator("#prompt-tokens .image-chip").inner_text() == "[image: 3×4 tiles + global, 832 tokens]"
    page.screenshot(path=str(SHOTS / "reference.png"), full_page=True)


def test_korean_japanese_and_emoji_tokens(page, server):
    open_run(page, server, "korean")
    prompt, answer = page.inner_text("#prompt-tokens"), page.inner_text("#answer-tokens")
    assert KOREAN in prompt and JAPANESE in answer and "🐱" in answer and "café" in answer
    assert "�" not in prompt + answer
    chip = page.locator("#prompt-tokens .token.unit", has_text="고").first
    first, last = map(int, chip.get_attribute("data-unit").split("-"))
    chip.click()                                             # the unit: its last token's row
    page.wait_for_selector(f'#overlay[data-index="{last}"]')
    assert page.locator("#pieces").is_visible() and page.locator("#pieces-list .token").count() == last - first + 1
    assert "selected" in chip.get_attribute("class")
    page.click(f'#pieces-list .token[data-index="{first}"]')  # each underlying token is selectable
    page.wait_for_selector(f'#overlay[data-index="{first}"]')
    page.keyboard.press("ArrowRight")                        # and reachable by keyboard
    page.wait_for_selector(f'#overlay[data-index="{first + 1}"]')
    assert page.locator("#pieces-list .token.selected").get_attribute("data-index") == str(first + 1)
    assert "고" in page.inner_text("#sel-token") and "korean" in page.title()
    page.screenshot(path=str(SHOTS / "korean.png"), full_page=True)


def test_url_keeps_the_view_title_names_the_run(page, server):
    rows, cols, size, _, _ = SHAPES["landscape"]
    tile_pos, _ = positions(rows, cols)
    open_run(page, server, "landscape")
    assert page.title().startswith("landscape") or "landscape" in page.title()
    click_token(page, tile_pos)
    page.select_option("#layer-mode", "single")
    page.select_option("#layer", "1")
    page.select_option("#heads", "1")
    page.wait_for_selector('#overlay[data-layers="1-1"]')
    url = page.url
    for part in ("run=landscape", f"token={tile_pos}", "layers=1", "heads=1", "method=raw"):
        assert part in url, url
    page.goto(url)                                            # a shared link opens the same view
    page.wait_for_selector(f'#overlay[data-index="{tile_pos}"][data-layers="1-1"]')
    assert page.locator("#layer-mode").input_value() == "single" and page.locator("#heads").input_value() == "1"
    assert page.locator(".token.selected").get_attribute("data-index") == str(tile_pos)
    assert page.request.get(f"{server}/favicon.ico").ok


def test_compare_mode_text_view_and_numbers(page, server, tmp_path):
    rows, cols, size, (i, j), _ = SHAPES["landscape"]
    tile_pos, _ = positions(rows, cols)
    open_run(page, server, "landscape")
    click_token(page, tile_pos)
    page.check("#compare")
    page.select_option("#b-layer-from", "0")
    page.select_option("#b-layer-to", "0")
    page.select_option("#b-heads", "0")
    page.wait_for_selector(f'#overlay-b[data-index="{tile_pos}"][data-layers="0-0"]')
    assert page.locator("#overlay").get_attribute("data-layers") == "0-2"
    assert "compare=1" in page.url and "layers_b=0" in page.url and "heads_b=0" in page.url
    assert "B: layer 0 · head 0" in page.inner_text("#view-b")
    page.screenshot(path=str(SHOTS / "compare.png"), full_page=True)

    page.click("#text-view summary")                          # text -> text: earlier tokens, ranked
    page.locator("#text-list li").first.wait_for()
    assert all(int(x) <= tile_pos for x in page.eval_on_selector_all("#text-list li", "els => els.map(e => e.dataset.index)"))

    with page.expect_download() as info:
        page.click("#download-numbers")
    path = tmp_path / "numbers.json"
    info.value.save_as(path)
    import json
    numbers = json.loads(path.read_text())
    assert numbers["index"] == tile_pos and len(numbers["grid"]) == rows * 8 and len(numbers["grid"][0]) == cols * 8
    assert max(max(r) for r in numbers["grid"]) == numbers["grid"][i][j]


def test_method_selector_start_layer_caption_and_download(page, server, tmp_path):
    rows, cols, size, (i, j), _ = SHAPES["landscape"]
    g = geo.from_tokens(synthetic.make_tokens(rows, cols)[0])
    tile_pos, _ = positions(rows, cols)
    open_run(page, server, "methods")
    click_token(page, tile_pos)
    assert page.locator("#method-note").is_hidden() and page.locator("#start-layer-row").is_hidden()
    page.select_option("#method", "rollout")
    page.wait_for_selector(f'#overlay[data-index="{tile_pos}"][data-method="rollout"]')
    assert page.locator("#start-layer-row").is_visible() and page.locator("#heads").is_disabled()
    assert_inside(page.evaluate(HOT_CENTRE, ["#overlay", False]), g.cell_box(i, j, size), size)
    page.select_option("#start-layer", "2")
    page.wait_for_selector('#overlay[data-method="rollout"][data-layers="2-2"]')
    caption = page.locator("#colorbar-label").inner_text()
    assert "Attention rollout" in caption and "from layer 2" in caption
    assert "method=rollout" in page.url and "start_layer=2" in page.url
    with page.expect_download() as info:
        page.click("#download")
    assert info.value.suggested_filename == f"methods_rollout_token{tile_pos}_start2.png"
    info.value.save_as(tmp_path / "rollout.png")

    page.select_option("#method", "relevancy")          # token t's relevancy is read at t - 1: the planted row
    click_token(page, tile_pos + 1)
    page.wait_for_selector(f'#overlay[data-index="{tile_pos + 1}"][data-method="relevancy"]')
    assert_inside(page.evaluate(HOT_CENTRE, ["#overlay", False]), g.cell_box(i, j, size), size)
    assert "Gradient relevancy" in page.locator("#colorbar-label").inner_text()
    page.select_option("#method", "relative")
    page.wait_for_selector(f'#overlay[data-method="relative"]')
    assert page.locator("#start-layer-row").is_hidden() and not page.locator("#layer-from").is_disabled()
    page.select_option("#method", "rollout")
    click_token(page, tile_pos)
    page.wait_for_selector(f'#overlay[data-index="{tile_pos}"][data-method="rollout"]')
    page.screenshot(path=str(SHOTS / "methods.png"), full_page=True)


def test_methods_missing_from_a_run_are_greyed_out_with_the_command(page, server):
    open_run(page, server, "landscape")
    for name in ("rollout", "relevancy", "relative"):
        option = page.locator(f'#method option[value="{name}"]')
        assert option.is_disabled() and "not in this run" in option.inner_text()
        assert "--methods raw," in option.get_attribute("title")
    note = page.locator("#method-note")
    assert note.is_visible() and "--methods raw,rollout,relevancy,relative" in note.inner_text()
    assert not page.locator('#method option[value="raw"]').is_disabled()
    page.screenshot(path=str(SHOTS / "methods-missing.png"), full_page=True)
