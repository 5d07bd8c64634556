"""Intervened runs and sweeps in a real browser (Playwright driving Debian's chromium; the setup of
test_viewer_browser.py): the badge and the ablated heads, "compare with base" (both answers, the
log-probability chart, the two maps), a missing base run, and the sweep page. Screenshots go to
artifacts/screenshots/ (and $H6_SHOTS when set)."""
from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from test_viewer_browser import ARGS, CHROMIUM, HOT_CENTRE, SHOTS, assert_inside, browser, page  # noqa: F401
from test_viewer_interventions import (ABLATED, BASE_LP, COLS, HOT_BASE, HOT_NEW, LAYERS, NEW_LP, ROWS, SWEEP,
                                       TF_TOKENS, build, prompt_length)

from smolattn import geometry as geo
from smolattn import synthetic
from viewer import create_app

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (CI installs it)")
pytestmark = pytest.mark.skipif(not CHROMIUM.is_file(), reason="/usr/bin/chromium is missing (CI installs it)")
RUN = "photo.ablate-12.3-14.7"
SIZE = (640, 480)


def shot(page, name):
    page.screenshot(path=str(SHOTS / name), full_page=True)
    extra = os.environ.get("H6_SHOTS")
    if extra:
        Path(extra).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(extra) / name), full_page=True)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from werkzeug.serving import make_server
    root = build(tmp_path_factory.mktemp("interventions") / "runs")
    srv = make_server("127.0.0.1", 0, create_app({"RUNS": str(root), "CACHE_DIR": str(root.parent / "cache")}),
                      threaded=True)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_port}"
    srv.shutdown()


def open_run(page, server, name, extra=""):
    page.goto(f"{server}/?run={name}{extra}")
    page.wait_for_selector("#overlay[data-index]")


def test_badge_ablated_heads_and_compare_with_base(page, server):
    g = geo.from_tokens(synthetic.make_tokens(ROWS, COLS)[0])
    last = prompt_length() - 1                 # the last prompt token: the query that produces the answer
    open_run(page, server, RUN)
    badge = page.locator("#iv-badge")
    assert badge.is_visible() and badge.inner_text() == "ablated 12:3, 14:7"
    assert "--ablate-heads 12:3,14:7" in badge.get_attribute("title")
    assert page.locator("#overview .cell").count() == LAYERS * 8
    marked = page.eval_on_selector_all("#overview .cell.ablated", "els => els.map(e => [+e.dataset.layer, +e.dataset.head])")
    assert sorted(marked) == ABLATED
    assert "ablated" in page.locator('#overview .cell[data-layer="12"][data-head="3"]').get_attribute("title")
    assert "2 ablated heads" in page.inner_text("#overview-caption")
    assert page.locator("#standin-banner").is_visible()

    page.click(f'.token[data-index="{last}"]')
    page.wait_for_selector(f'#overlay[data-index="{last}"]')
    page.click("#iv-compare")
    page.wait_for_selector(f'#iv-ov-base[data-index="{last}"]')
    page.wait_for_selector(f'#iv-ov-run[data-index="{last}"]')
    assert page.locator("#figure").is_hidden() and "compare_base=1" in page.url
    assert page.inner_text("#iv-answer-base") == "Yes, there is a dog."
    assert page.inner_text("#iv-answer-run").startswith("No, there is no dog.")
    assert "changed" in page.locator("#iv-answer-run").get_attribute("class")
    bars = page.locator("#iv-chart svg rect.bar")
    assert bars.count() == len(TF_TOKENS)
    heights = [float(bars.nth(k).get_attribute("height")) for k in range(len(TF_TOKENS))]
    deltas = [b - a for a, b in zip(BASE_LP, NEW_LP)]
    biggest = max(range(len(deltas)), key=lambda k: abs(deltas[k]))
    assert max(range(len(heights)), key=heights.__getitem__) == biggest            # the tallest bar is "Yes"
    assert "down" in bars.nth(biggest).get_attribute("class")
    assert page.locator("#iv-chart svg text.label").first.text_content() == "Yes"
    assert "P(yes)" in page.inner_text("#iv-yesno") and "0.810" in page.inner_text("#iv-yesno")
    # the two maps: each run's own hot cell, on one colour scale
    for side, cell in (("run", HOT_NEW), ("base", HOT_BASE)):
        img = page.locator(f"#iv-img-{side}").bounding_box()
        assert abs(img["width"] / img["height"] - SIZE[0] / SIZE[1]) < 0.02
        assert_inside(page.evaluate(HOT_CENTRE, [f"#iv-ov-{side}", False]), g.cell_box(*cell, SIZE), SIZE)
    assert "One colour scale" in page.inner_text("#iv-scale")
    shot(page, "compare-with-base.png")

    page.select_option("#layer-mode", "single")                # the maps follow the main controls
    page.select_option("#layer", "13")
    page.wait_for_function("() => document.querySelector('#iv-maps-title').textContent.includes('layer 13')")
    page.wait_for_selector(f'#iv-ov-base[data-index="{last}"]')
    page.reload()                                              # the URL reopens the comparison
    page.wait_for_selector(f'#iv-ov-base[data-index="{last}"]')
    page.click("#iv-close")
    assert page.locator("#figure").is_visible() and page.locator("#iv-panel").is_hidden()
    assert "compare_base" not in page.url


def test_missing_base_is_said_and_an_ordinary_run_has_no_badge(page, server):
    open_run(page, server, "lost.ablate-1.0")
    page.click("#iv-compare")
    note = page.locator("#iv-note")
    note.wait_for()
    assert "'../gone'" in note.inner_text() and "was not found" in note.inner_text()
    page.wait_for_selector("#iv-chart svg")                    # its effects still show
    assert page.locator("#iv-img-base").is_hidden() and page.locator("#iv-base-missing").is_visible()
    page.wait_for_selector("#iv-ov-run[data-index]")
    shot(page, "compare-base-missing.png")
    open_run(page, server, "photo")
    assert page.locator("#iv-badge").is_hidden() and page.locator("#iv-compare").is_hidden()
    assert page.locator("#overview .cell.ablated").count() == 0
    link = page.locator("#iv-sweeps a")
    assert link.inner_text() == "sweep last → image, window 9"
    link.click()
    page.wait_for_selector("#sw-table tr:nth-child(2)")
    assert SWEEP in page.url


def test_sweep_page_shows_the_picture_and_its_numbers(page, server):
    page.goto(f"{server}/sweep?name={SWEEP}")
    page.wait_for_selector("#sw-table tr:nth-child(2)")
    page.wait_for_function("() => document.querySelector('#sw-picture').naturalWidth > 0")
    assert page.locator("#sw-table tr").count() == LAYERS + 1
    assert page.locator("#standin-banner").is_visible()
    assert page.inner_text("#sw-badge") == "sweep last → image, window 9"
    peak = page.locator("#sw-table tr.peak td").first.inner_text()
    assert peak == "9" and "centre 9" in page.inner_text("#sw-caption")
    assert page.locator("#sw-base").get_attribute("href") == "/?run=photo"
    shot(page, "sweep.png")
    page.goto(f"{server}/sweep?name=..%2Foutside")
    page.locator("#alert").wait_for()
    assert "unknown sweep" in page.inner_text("#alert-text")
