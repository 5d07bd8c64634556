"""The notebook API (smolattn.run_image / open_run, docs/python-api.md): its maps are the viewer's, its
inline view opens at the asked token with no server, and examples/quickstart.ipynb runs top to bottom
in a Jupyter kernel on the tiny stand-in (built or found the way a user's notebook does)."""
from __future__ import annotations

import html
import shutil
from pathlib import Path

import numpy as np
import pytest

import smolattn
from smolattn import notebook as nb
from smolattn.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture
def methods_run(make_run):
    return make_run(layers=3, heads=2, methods=("rollout", "relevancy", "relative"))


def test_map_is_the_viewers_map(methods_run, make_app):
    run = smolattn.open_run(methods_run)
    client = make_app(RUN=methods_run).test_client()
    token = run.answer_tokens[1]
    assert run.answer and token.kind == "answer" and token.has_row and str(token) == token.text
    cases = [({}, ""), ({"layers": 1, "heads": 0}, "&layers=1&heads=0"),
             ({"layers": "0-2", "heads": "max", "drop_sink": True}, "&layers=0-2&heads=max&drop_sink=1"),
             ({"layers": [1, 2], "heads": 1}, "&layers=1-2&heads=1"),
             ({"method": "rollout", "start_layer": 1}, "&method=rollout&start_layer=1"),
             ({"method": "relative", "layers": "1-2"}, "&method=relative&layers=1-2")]
    for kwargs, query in cases:
        served = client.get(f"/api/attention?index={token.index}{query}").get_json()
        for view, key in (("tiles", "grid"), ("global", "global")):
            got = run.map(token, view=view, **kwargs)
            np.testing.assert_allclose(got, served[key], rtol=1e-5, atol=1e-7, err_msg=str(kwargs))
    assert run.map(token.index).shape == run.grid_shape
    assert (run.map(token.text.strip()) == run.map(token)).all()      # by text: the answer's first match


def test_bad_arguments_are_one_line_errors(methods_run, make_run):
    run = smolattn.open_run(methods_run)
    token = run.answer_tokens[0]
    with pytest.raises(UserError, match="not found"):
        run.map("zebra-unicorn")
    with pytest.raises(UserError, match="heads must be"):
        run.map(token, heads=5)
    with pytest.raises(UserError, match="out of range"):
        run.map(token, layers=[7])
    with pytest.raises(UserError, match="one image"):
        run.map(token, image=1)
    plain = smolattn.open_run(make_run("plain"))
    with pytest.raises(UserError, match="--methods raw,rollout"):
        plain.map(plain.answer_tokens[0], method="rollout")


def test_show_outside_a_notebook_is_a_static_picture(methods_run):
    run = smolattn.open_run(methods_run)
    pic = run.show(run.answer_tokens[1], layers="0-1")
    w, h = run.run.image_size()
    assert pic.size[0] == min(w, 1024) and pic.size[1] > 22         # the image, with a caption above
    bundle = nb.View(run, run.answer_tokens[1].index, None, "max", "raw")._repr_mimebundle_()
    assert {"text/html", "image/png", "text/plain"} <= set(bundle)
    assert bundle["text/html"].startswith("<iframe srcdoc=") and html.escape("smolattn-export") in bundle["text/html"]


def test_new_runs_never_reuse_a_folder(tmp_path):
    (tmp_path / "photo").mkdir()
    (tmp_path / "photo-2").mkdir()
    assert nb._new_dir(tmp_path, "photo") == tmp_path / "photo-3"
    assert nb._new_dir(tmp_path, "my photo!") == tmp_path / "my_photo_"


def test_inline_view_opens_at_the_asked_token(methods_run):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (CI installs it)")
    if not CHROMIUM.is_file():
        pytest.skip("/usr/bin/chromium is missing (CI installs it)")
    run = smolattn.open_run(methods_run)
    token = run.answer_tokens[3]
    page_html = nb.View(run, token.index, "1-2", "max", "raw").html()
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--headless", "--no-sandbox", "--disable-gpu"])
        page = browser.new_page()
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("console", lambda m: m.type == "error" and errors.append(m.text))
        page.set_content(page_html)                        # about:blank, as an iframe's srcdoc: no URL, no server
        page.wait_for_selector(f'#overlay[data-index="{token.index}"][data-layers="1-2"]', timeout=15_000)
        assert page.input_value("#heads") == "max"
        browser.close()
    assert not errors, errors


def test_example_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat", reason="nbformat is not installed (requirements.txt)")
    nbclient = pytest.importorskip("nbclient", reason="nbclient is not installed (requirements.txt)")
    (tmp_path / "examples").mkdir()
    (tmp_path / "samples").mkdir()
    shutil.copy(ROOT / "examples" / "quickstart.ipynb", tmp_path / "examples")
    shutil.copy(ROOT / "samples" / "chelsea.png", tmp_path / "samples")
    monkeypatch.setenv("PYTHONPATH", str(ROOT))      # the checkout's smolattn (an installed one needs nothing)
    book = nbformat.read(tmp_path / "examples" / "quickstart.ipynb", as_version=4)
    nbclient.NotebookClient(book, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path / "examples")}}).execute()
    outputs = {i: c.outputs for i, c in enumerate(book.cells) if c.cell_type == "code"}
    text = "\n".join(o.get("text", "") + o.get("data", {}).get("text/plain", "") for out in outputs.values() for o in out)
    assert "STAND-IN" in text and "(24, 32) (24, 32)" in text          # the stand-in's 3x4-tile grid
    shown = [o for out in outputs.values() for o in out if "text/html" in o.get("data", {})]
    assert len(shown) == 1 and shown[0]["data"]["text/html"].startswith("<iframe srcdoc=")
    assert "image/png" in shown[0]["data"]
    exported = tmp_path / "examples" / "chelsea.html"
    assert exported.is_file() and '<meta name="generator" content="smolattn-export">' in exported.read_text()[:500]
    assert (tmp_path / "examples" / "smolattn_runs" / "chelsea" / "meta.json").is_file()
