"""Dataset head analysis (smolattn.analysis, analyze_heads.py) on planted synthetic POPE runs: one head
points at the object's COCO box, one at two corner blobs, the rest are uniform over the image or point at
a sink (BOS). The box head must rank first by SE, pointing game and AUROC; the elbow must pick the two
planted heads; SE must equal hand-computed values."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import analyze_heads
from smolattn import analysis as an
from smolattn import synthetic

ROOT = Path(__file__).resolve().parent.parent
LAYERS, HEADS = 3, 4
BOX_HEAD, CORNER_HEAD = (1, 2), (2, 0)
SIZE = (640, 480)                       # 2x2 tiles -> a 16x16 tiled grid, cells 40 x 30 px
DOG = [320, 240, 160, 120]              # cells rows 8..11, cols 8..11 (centres inside, edges outside)
CAT = [0, 0, 160, 120]                  # cells rows 0..3, cols 0..3
# (image, question object, label, answer): 3 present (2 said yes), 3 absent (1 said yes)
QUESTIONS = [("a.jpg", "dog", "yes", "Yes"), ("b.jpg", "dog", "yes", "Yes"), ("a.jpg", "dog", "yes", "No"),
             ("a.jpg", "zebra", "no", "No"), ("b.jpg", "zebra", "no", "Yes"), ("b.jpg", "zebra", "no", "No")]


def planter(plen, present):
    def plant(layer, a, q, g):
        r = int(np.flatnonzero(q == plen - 1)[0])      # the last prompt token's row
        keys = g.key_positions
        tiles, _ = g.split(keys)                        # (16, 16) key position of every tiled cell
        for h in range(HEADS):
            a[h, r] = 0.0
            if (layer, h) == BOX_HEAD and present:
                a[h, r, tiles[8:12, 8:12].ravel()] = 0.9 / 16
                a[h, r, 0] = 0.1
            elif (layer, h) == BOX_HEAD:                    # absent: nothing to point at, uniform
                a[h, r, keys] = 0.9 / len(keys)
                a[h, r, 0] = 0.1
            elif (layer, h) == CORNER_HEAD:                 # two blobs, neither on an object: SE = ln 2
                a[h, r, tiles[0:2, 14:16].ravel()] = 0.45 / 4
                a[h, r, tiles[14:16, 0:2].ravel()] = 0.45 / 4
                a[h, r, 0] = 0.1
            elif h % 2:                                     # uniform over the image
                a[h, r, keys] = 0.1 / len(keys)
                a[h, r, 0] = 0.9
            else:                                           # a sink: BOS
                a[h, r, keys] = 0.02 / len(keys)
                a[h, r, 0] = 0.98
    return plant


def coco(path):
    images = [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}]
    cats = [{"id": 18, "name": "dog"}, {"id": 17, "name": "cat"}]
    ann = [{"id": i + 1, "image_id": im, "category_id": c, "bbox": box}
           for i, (im, c, box) in enumerate([(1, 18, DOG), (1, 17, CAT), (2, 18, DOG), (2, 17, CAT)])]
    path.write_text(json.dumps({"images": images, "categories": cats, "annotations": ann}))
    return path


@pytest.fixture(scope="module")
def pope_root(tmp_path_factory):
    base = tmp_path_factory.mktemp("heads")
    root = base / "attention"
    for qid, (image, obj, label, answer) in enumerate(QUESTIONS, 1):
        prompt = ["ĠIs", "Ġthere", "Ġa", f"Ġ{obj}", "Ġin", "Ġthe", "Ġimage", "?"]
        tokens, plen = synthetic.make_tokens(2, 2, prompt=prompt, answer=[f"{answer}", "."])
        meta = {"answer": answer + ".", "image": {"source": f"/coco/{image}"},
                "pope": {"split": "random", "question_id": qid, "label": label, "object": obj,
                         "object_positions": [tokens.index(f"Ġ{obj}")]}}
        synthetic.make_run(root / "random" / str(qid), 2, 2, layers=LAYERS, heads=HEADS, image_size=SIZE, seed=qid,
                           prompt=prompt, answer=[answer, "."], plant=planter(plen, label == "yes"), meta_extra=meta)
    return root, coco(base / "coco.json")


@pytest.fixture(scope="module")
def dataset(pope_root):
    root, ann = pope_root
    from smolattn import pope_runner as pr
    return an.analyse_root(root, an.Params(), pr.load_boxes(ann), workers=2, progress=False)


# ------------------------------------------------------------------------------ hand-computed pieces

def test_spatial_entropy_by_hand():
    two = np.zeros((4, 4))
    two[0, 0], two[3, 3] = 0.5, 0.3        # mean 0.05: B = 0.45 and 0.25, two components
    one = np.zeros((4, 4))
    one[0, 0], one[1, 1] = 0.5, 0.3        # diagonal neighbours: ONE 8-connected component
    empty = np.full((4, 4), 1 / 16)        # B = 0 everywhere
    se = an.spatial_entropy(np.stack([two, one, empty]))
    p = np.array([9 / 14, 5 / 14])
    assert se[0] == pytest.approx(-(p * np.log(p)).sum()) and se[0] == pytest.approx(0.651756, abs=1e-6)
    assert se[1] == 0.0 and se[2] == np.inf
    four = np.zeros((5, 5))
    four[0, 0] = four[0, 4] = four[4, 0] = four[4, 4] = 0.25   # equal masses: ln 4
    assert an.spatial_entropy(four) == pytest.approx(np.log(4))


def test_elbow_compares_values_not_indices():
    values = np.array([[0.02, 0.9, 0.1, 0.03], [0.1, 0.05, 0.02, 0.85]])   # flat order != sorted order
    thr = an.elbow(values)
    assert thr == pytest.approx(0.1)
    assert set(zip(*np.nonzero(values > thr))) == {(0, 1), (1, 3)}


def test_auroc_by_hand():
    assert an.auroc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == pytest.approx(0.75)
    assert an.auroc(np.array([1.0, 1.0]), np.array([1, 0])) == pytest.approx(0.5)


# ------------------------------------------------------------------------------ planted dataset

def test_planted_head_ranks_first(dataset):
    assert len(dataset) == len(QUESTIONS) and not dataset.skipped and dataset.shape == (LAYERS, HEADS)
    table = dataset.head_table()
    for score in ("se", "hit", "auroc"):
        assert dataset.ranked(score, table)[0][:2] == BOX_HEAD, score
    assert table["se"][BOX_HEAD] == 0.0 and table["se"][CORNER_HEAD] == pytest.approx(np.log(2), rel=1e-3)
    assert table["hit"][BOX_HEAD] == 1.0 and table["mass"][BOX_HEAD] == pytest.approx(1.0)
    assert table["auroc"][BOX_HEAD] == 1.0 and table["auroc"][0, 1] == pytest.approx(0.5)
    assert np.isinf(table["se"][0, 0])                  # a sink head's image map is flat


def test_elbow_picks_the_planted_heads(dataset):
    above = dataset.scores["above_elbow"]
    expect = np.zeros((LAYERS, HEADS), bool)
    expect[BOX_HEAD] = expect[CORNER_HEAD] = True
    assert (above == expect).all()
    table = dataset.head_table()
    assert table["frequency"][BOX_HEAD] == 1.0 and table["frequency"][CORNER_HEAD] == 1.0
    assert table["frequency"].sum() == 2.0               # nothing else: the other heads' maps are flat


def test_examples_and_lens(dataset):
    ex = dataset.examples(*BOX_HEAD, score="mass", n=2)
    assert all(e["label"] == "yes" and e["value"] == pytest.approx(1.0) for e in ex["best"])
    lens = dataset.lens()["splits"]["random"]
    assert {k: g["n"] for k, g in lens.items()} == {"TP": 2, "FP": 1, "TN": 2, "FN": 1}
    assert lens["TP"]["hit"] is not None and lens["FP"]["hit"] is None     # pointing game needs the object
    assert lens["TP"]["top_heads_mass"] > lens["FP"]["top_heads_mass"]


# ------------------------------------------------------------------------------ the script

def test_cli_writes_named_reports(pope_root, tmp_path):
    root, ann = pope_root
    out = tmp_path / "analysis"
    with pytest.raises(SystemExit) as e:
        analyze_heads.run_cli(analyze_heads.main, ["--runs", str(root), "--annotations", str(ann),
                                                   "--output-dir", str(out), "--workers", "1", "--top-heads", "2"])
    assert e.value.code == 0
    md = (out / "report.md").read_text()
    assert md.startswith("**STAND-IN MODEL") and str(root.resolve()) in md and str(ann) in md
    assert "6 runs found, 6 analysed, 0 skipped" in md and "synthetic (STAND-IN)" in md
    result = json.loads((out / "analysis.json").read_text())
    assert result["inputs"]["standin"] and result["params"]["topk"] == 10
    assert result["top"]["auroc"][0][:2] == list(BOX_HEAD)
    rows = (out / "heads.csv").read_text().splitlines()
    assert rows[0].startswith("rank,layer,head") and len(rows) == 1 + LAYERS * HEADS
    for png in ("grid_se.png", "grid_auroc.png", "grid_frequency.png", "top_heads.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    with np.load(out / "scores.npz") as z:
        assert z["se"].shape == (6, LAYERS, HEADS) and list(z["names"])[0] == "random/1"


def test_cli_refuses_a_folder_it_did_not_make_and_bad_input(pope_root, tmp_path):
    root, _ = pope_root
    keep = tmp_path / "mine"
    keep.mkdir()
    (keep / "notes.txt").write_text("precious")
    for args, msg in ((["--runs", str(root), "--output-dir", str(keep)], "not a head analysis written by smolattn"),
                      (["--runs", str(tmp_path / "nope")], "not a directory"),
                      (["--runs", str(keep)], "no runs under")):
        p = subprocess.run([sys.executable, ROOT / "analyze_heads.py", *args], capture_output=True, text=True,
                           cwd=tmp_path, timeout=120)
        assert p.returncode == 2 and msg in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert (keep / "notes.txt").read_text() == "precious"


def test_rerun_replaces_our_analysis_but_never_a_users_file_in_it(pope_root, tmp_path):
    """ROOT/analysis (the default): our earlier analysis is replaced; once a user saved notes.md in it,
    the rerun is refused in one line naming that file, before any work, and the folder stays byte-identical."""
    import shutil
    root = tmp_path / "attention"
    shutil.copytree(pope_root[0], root)
    out = root / "analysis"

    def cli():
        return subprocess.run([sys.executable, ROOT / "analyze_heads.py", "--runs", str(root), "--workers", "1",
                               "--top-heads", "1"], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    p = cli()
    assert p.returncode == 0 and (out / "analysis.json").is_file(), p.stderr
    first = out.stat().st_ino
    p = cli()                                          # our own earlier analysis: replaced (a new folder)
    assert p.returncode == 0 and out.stat().st_ino != first and (out / "analysis.json").is_file(), p.stderr
    (out / "notes.md").write_text("my reading of the heads\n")
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    p = cli()
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == 2 and len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert str(out / "notes.md") in lines[0] and "left untouched" in lines[0] and "runs under" not in p.stderr
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before
    assert not [f for f in root.iterdir() if f.name.startswith(".analysis.")]


def test_a_present_object_without_a_box_is_not_scored(pope_root):
    root, _ = pope_root                                     # random/1 asks about a dog; give only a cat box
    r = an.analyse_run(root / "random" / "1", an.Params(), {"a.jpg": {"cat": [CAT]}})
    assert np.isnan(r["mass"]).all() and np.isnan(r["hit"]).all() and r["box_fraction"] is None
    assert np.isfinite(r["on_objects"]).all() and r["boxed"]


def test_unreadable_runs_are_skipped_with_a_reason(pope_root, tmp_path):
    root, _ = pope_root
    bad = tmp_path / "bad"
    (bad / "broken").mkdir(parents=True)
    (bad / "broken" / "decoded_tokens.npy").write_bytes(b"not numpy")
    ds = an.analyse_root(bad, an.Params(), None, workers=1, progress=False)
    assert len(ds) == 0 and "broken" in ds.skipped
    ds = an.analyse_root(root, an.Params(query="answer"), None, workers=1, progress=False, names=["random/1"])
    assert len(ds) == 1 and np.isnan(ds.scores["mass"]).all()          # no boxes given: no box scores
    ds = an.analyse_root(root, an.Params(query="object"), None, workers=1, progress=False, names=["random/1"])
    tokens = np.load(root / "random" / "1" / "decoded_tokens.npy")
    assert tokens[ds.runs[0]["position"]] == "Ġdog"                   # the object word's row was read


# ------------------------------------------------------------------------------ the viewer's dataset page

@pytest.fixture(scope="module")
def served(pope_root, dataset):
    from smolattn import head_report
    from smolattn import pope_runner as pr
    from viewer import create_app
    root, ann = pope_root
    head_report.write(root / "analysis", dataset, len(QUESTIONS), ann, pr.load_boxes(ann), top=2)
    return create_app({"RUNS": str(root)})         # finds ROOT/analysis by itself


def test_dataset_api(served):
    client = served.test_client()
    d = client.get("/api/dataset").get_json()
    assert d["success"] and d["shape"] == [LAYERS, HEADS] and d["inputs"]["standin"] and d["same_root"]
    assert d["table"]["auroc"][BOX_HEAD[0]][BOX_HEAD[1]] == 1.0 and d["table"]["se"][0][0] == "inf"
    h = client.get(f"/api/dataset/head?layer={BOX_HEAD[0]}&head={BOX_HEAD[1]}&score=mass&n=2").get_json()
    assert [e["label"] for e in h["best"]] == ["yes", "yes"] and h["values"]["hit"] == 1.0
    assert h["best"][0]["boxes"] == [[0.5, 0.5, 0.25, 0.25]]                 # DOG on 640 x 480
    absent = [e for e in h["worst"] if e["label"] == "no"]                   # scored against every category's boxes
    assert absent and all(e["boxes"] == [[0.5, 0.5, 0.25, 0.25], [0, 0, 0.25, 0.25]] for e in absent)
    ex = h["best"][0]
    tokens = np.load(Path(served.extensions["runs"].root) / ex["run"] / "decoded_tokens.npy")
    assert tokens[ex["position"]] == ":" and tokens[ex["position"] + 1] in ("Yes", "No")  # the last prompt token
    png = client.get(f"/api/overlay.png?run={ex['run']}&index={ex['position']}&layers=1&heads=2")
    assert png.status_code == 200 and png.data[:4] == b"\x89PNG"
    assert client.get("/api/dataset/head?layer=9&head=0").status_code == 404
    assert client.get("/api/dataset/head?layer=0&head=0&score=nope").status_code == 400
    assert client.get("/dataset").status_code == 200


def test_dataset_head_with_a_missing_run_is_404_json(pope_root, served, tmp_path):
    """A run of the analysis that the served root lacks (deleted, or the analysis of another root) is
    a 404 JSON error that names it, not a 500."""
    import shutil
    from viewer import create_app
    root, _ = pope_root
    copy = tmp_path / "attention"
    shutil.copytree(root, copy, ignore=shutil.ignore_patterns("analysis"))
    url = f"/api/dataset/head?layer={BOX_HEAD[0]}&head={BOX_HEAD[1]}&score=mass&n=2"
    best = served.test_client().get(url).get_json()["best"][0]["run"]
    shutil.rmtree(copy / best)
    r = create_app({"RUNS": str(copy), "ANALYSIS": str(root / "analysis"), "CACHE_DIR": str(tmp_path / "c")}
                   ).test_client().get(url)
    assert r.status_code == 404 and r.mimetype == "application/json", r.data[:300]
    body = r.get_json()
    assert body["success"] is False and best in body["error"] and "made for" in body["error"]


def test_dataset_draws_the_scored_boxes_on_batch_runs(pope_root, tmp_path):
    """A batch run names no object: the analysis scores it against every annotated box of its image,
    and the dataset page draws those boxes on its example."""
    from smolattn import head_report, pope
    from viewer import create_app
    _, ann = pope_root
    root = tmp_path / "batch"
    for k, image in enumerate(["a.jpg", "b.jpg"]):
        _, plen = synthetic.make_tokens(2, 2)
        synthetic.make_run(root / f"photo{k}", 2, 2, layers=LAYERS, heads=HEADS, image_size=SIZE, seed=k,
                           plant=planter(plen, True), meta_extra={"image": {"source": f"/photos/{image}"}})
    boxes = pope.load_boxes(ann)
    ds = an.analyse_root(root, an.Params(), boxes, workers=1, progress=False)
    assert all(r["boxed"] and r["label"] is None for r in ds.runs)
    head_report.write(root / "analysis", ds, 2, ann, boxes, top=1)
    client = create_app({"RUNS": str(root), "CACHE_DIR": str(tmp_path / "c")}).test_client()
    h = client.get(f"/api/dataset/head?layer={BOX_HEAD[0]}&head={BOX_HEAD[1]}&score=mass&n=2").get_json()
    assert h["success"] and len(h["best"]) == 2
    for e in h["best"]:                                                      # DOG and CAT on 640 x 480
        assert e["boxes"] == [[0.5, 0.5, 0.25, 0.25], [0, 0, 0.25, 0.25]], e


def test_dataset_page_without_an_analysis(pope_root, tmp_path):
    from smolattn.errors import UserError
    from viewer import create_app
    root, _ = pope_root
    app = create_app({"RUN": str(root / "random" / "1")})
    r = app.test_client().get("/api/dataset")
    assert r.status_code == 404 and "analyze_heads.py" in r.get_json()["error"]
    with pytest.raises(UserError, match="no analysis.json"):
        create_app({"RUNS": str(root), "ANALYSIS": str(tmp_path)})


def test_dataset_page_in_a_browser(served):
    """Grid coloured by a score, click a head -> its examples with overlays, click one -> the run view at
    that layer, head and token. Screenshot: artifacts/screenshots/dataset.png."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (CI installs it)")
    chromium = Path("/usr/bin/chromium")
    if not chromium.is_file():
        pytest.skip("/usr/bin/chromium is missing (CI installs it)")
    import threading
    from werkzeug.serving import make_server
    shots = ROOT / "artifacts" / "screenshots"
    shots.mkdir(parents=True, exist_ok=True)
    srv = make_server("127.0.0.1", 0, served, threaded=True)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_port}"
    errors = []
    try:
        with sync_api.sync_playwright() as p:
            b = p.chromium.launch(executable_path=str(chromium), args=["--headless", "--no-sandbox", "--disable-gpu"])
            page = b.new_page(viewport={"width": 1400, "height": 900})
            page.set_default_timeout(10_000)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(f"{url}/dataset?score=auroc")
            page.wait_for_selector(".ds-grid .cell")
            assert page.locator(".ds-grid .cell").count() == LAYERS * HEADS
            assert page.is_visible("#standin-banner")
            cell = f'.ds-grid .cell[data-layer="{BOX_HEAD[0]}"][data-head="{BOX_HEAD[1]}"]'
            colour = lambda sel: page.eval_on_selector(sel, "e => getComputedStyle(e).backgroundColor")  # noqa: E731
            assert colour(cell) != colour('.ds-grid .cell[data-layer="0"][data-head="1"]')   # 1.0 vs 0.5
            page.click(cell)
            page.wait_for_selector("#best .ds-example img")
            page.wait_for_function("() => [...document.querySelectorAll('#best img')].every(i => i.complete && i.naturalWidth > 0)")
            assert page.locator("#best .ds-box").count() >= 1                   # the object's box drawn
            page.screenshot(path=str(shots / "dataset.png"), full_page=True)
            href = page.get_attribute("#best .ds-example", "href")
            assert f"layers={BOX_HEAD[0]}&heads={BOX_HEAD[1]}" in href
            page.click("#best .ds-example")
            page.wait_for_selector("#overlay[data-index]")
            assert page.input_value("#heads") == str(BOX_HEAD[1]) and page.input_value("#layer-mode") == "single"
            assert page.input_value("#layer") == str(BOX_HEAD[0])
            token = int(href.split("token=")[1].split("&")[0])
            assert page.get_attribute("#overlay", "data-index") == str(token)
            b.close()
    finally:
        srv.shutdown()
    assert not errors, errors
