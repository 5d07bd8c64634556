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
