"""compute_token_heatmap.py and smolattn.heatmap's token aggregation.

The tiny run: a 1x2 tile grid with side 2 (tiled view 2x4, global view 2x2, 12 image keys, 48 tokens),
written by hand so every expected number below can be checked with pen and paper.
"""
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from smolattn import geometry as geo
from smolattn import heatmap as hm
from smolattn import store, synthetic
from smolattn.errors import UserError
from smolattn.store import Run

ROOT = Path(__file__).resolve().parents[1]
CLI = ROOT / "compute_token_heatmap.py"
TOKENS, PLEN = synthetic.make_tokens(1, 2, side=2)   # "Ġjacket" at 39 and 45; prompt ends at 34
GEO = geo.from_tokens(TOKENS)
S = len(TOKENS)                                         # 48
JACKET = 39
# image keys: tile 1 at positions 5-8, tile 2 at 11-14, global at 18-21 (each 2x2, row-major)
# row of "jacket" per (layer, head): {position: attention}
ROWS = {
    (0, 0): {0: 0.5, 5: 0.25, 13: 0.125, 38: 0.0625, 19: 0.0625},    # sum 1
    (0, 1): {6: 0.375, 20: 0.25, 30: 0.125},                         # sum 0.75 (a "rounded" row)
    (1, 0): {8: 1.0},                                                # one-hot on tile 1 cell (1, 1)
    (1, 1): {},                                                      # no attention at all: skipped
}


def ent(ps, n):
    """The user's entropy with the 1e-12 inside the log, over n entries of which ps are the non-zero."""
    e = 1e-12
    return -sum((p + e) * math.log(p + e) for p in ps) - (n - len(ps)) * e * math.log(e)


def full_layers(rows=ROWS, q=JACKET):
    a = np.zeros((2, 2, S, S), np.float16)              # (layer, head, query, key)
    for (l, h), row in rows.items():
        for k, v in row.items():
            a[l, h, q, k] = v
    return a


@pytest.fixture
def tiny(tmp_path):
    first, last = GEO.image_block
    q = np.array([i for i in range(S) if not first <= i <= last])
    a = full_layers()
    store.write_run(tmp_path / "tiny", tokens=TOKENS, layers=[x[:, q] for x in a], query_positions=q,
                    store="compact", geometry=GEO, meta={"prompt_length": PLEN}, image=synthetic.test_image((64, 32)))
    return Run(tmp_path / "tiny")


def write_reference(out, n):
    """The reference layout over the first ``n`` positions (upstream never fed the last token)."""
    (out / "attentions_5").mkdir(parents=True)
    np.save(out / "decoded_tokens.npy", np.array(TOKENS))
    for i, x in enumerate(full_layers()):
        np.savez(out / store.FULL_FILE.format(i), attention=x[None, :, :n, :n])
    return Run(out)


@pytest.fixture
def tiny_reference(tmp_path):
    return write_reference(tmp_path / "tiny_ref", S)


@pytest.fixture
def tiny_reference_short(tmp_path):
    """Like upstream: the attention covers one position fewer than the tokens (last token never fed)."""
    return write_reference(tmp_path / "tiny_short", S - 1)


# -- the reference method, by hand ---------------------------------------------------------------
def reference_expected(topk=2):
    assert topk == 2
    w00 = 1.0 * (1 - ent([2 / 3, 1 / 3], S) / math.log(S))      # top-2 of L0H0: BOS .5, key0 .25
    w01 = 0.75 * (1 - ent([0.6, 0.4], S) / math.log(S))         # p = .5,.333,.167 -> top-2 .6/.4
    w10 = 1.0 * (1 - ent([1.0], S) / math.log(S))               # one-hot: entropy ~0
    W = w00 + w01 + w10
    grid = np.zeros((2, 4))
    grid[0, 0] = w00 / 3 / W          # key 0 = tile 1 cell (0, 0)
    grid[0, 1] = 0.6 * w01 / W        # key 1 = tile 1 cell (0, 1)
    grid[1, 1] = w10 / W              # key 3 = tile 1 cell (1, 1)
    glob = np.zeros((2, 2))
    glob[1, 0] = 0.4 * w01 / W        # global key 2 (position 20)
    return grid, glob, {(0, 0): w00, (0, 1): w01, (1, 0): w10}, W


@pytest.mark.parametrize("fixture", ["tiny", "tiny_reference"])
def test_reference_method_hand_computed(fixture, request):
    run = request.getfixturevalue(fixture)
    agg = hm.aggregate_reference(run, JACKET, [0, 1], [0, 1], topk=2)
    grid, glob, weights, W = reference_expected()
    np.testing.assert_allclose(agg.grid, grid, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(agg.global_grid, glob, rtol=1e-12, atol=1e-15)
    assert agg.weights.keys() == weights.keys()            # (1, 1) skipped: attn_sum 0
    for k, w in weights.items():
        assert agg.weights[k] == pytest.approx(w, rel=1e-12)
    assert agg.total_weight == pytest.approx(W, rel=1e-12)
    assert agg.details["num_keys"] == S and agg.method == "reference"


def test_reference_method_uses_the_stored_length(tiny_reference_short):
    agg = hm.aggregate_reference(tiny_reference_short, JACKET, [0], [0], topk=2)
    n = S - 1                                              # entropy over 47 entries, normalised by ln 47
    assert agg.details["num_keys"] == n
    assert agg.weights[(0, 0)] == pytest.approx(1 - ent([2 / 3, 1 / 3], n) / math.log(n), rel=1e-12)


def test_reference_topk_zero_keeps_every_key(tiny):
    agg = hm.aggregate_reference(tiny, JACKET, [0], [0], topk=0)
    w = 1 - ent([0.5, 0.25, 0.125, 0.0625, 0.0625], S) / math.log(S)
    assert agg.weights[(0, 0)] == pytest.approx(w, rel=1e-12)
    assert agg.grid[0, 0] == pytest.approx(0.25) and agg.grid[1, 2] == pytest.approx(0.125)  # key 6 -> (1, 2)
    assert agg.grid.sum() == pytest.approx(0.375)         # the rest went to BOS, text and the global tile


def test_reference_zero_weight_is_an_error(tiny):
    with pytest.raises(UserError, match="zero weight"):
        hm.aggregate_reference(tiny, JACKET, [1], [1], topk=2)


# -- the image method, by hand -------------------------------------------------------------------
def test_image_method_hand_computed(tiny):
    agg = hm.aggregate_image(tiny, JACKET, [0, 1], [0, 1], topk=2, global_mode="panel")
    # tiled view, K = 8: L0H0 mass .375/1, p 2/3 (key 0), 1/3 (key 6); L0H1 mass .375/.75, one-hot key 1;
    # L1H0 mass 1, one-hot key 3; L1H1 skipped
    w00 = 0.375 * (1 - ent([2 / 3, 1 / 3], 8) / math.log(8))
    w01 = 0.5 * (1 - ent([1.0], 8) / math.log(8))
    w10 = 1.0 * (1 - ent([1.0], 8) / math.log(8))
    W = w00 + w01 + w10
    grid = np.zeros((2, 4))
    grid[0, 0], grid[1, 2] = 2 / 3 * w00 / W, 1 / 3 * w00 / W
    grid[0, 1], grid[1, 1] = w01 / W, w10 / W
    np.testing.assert_allclose(agg.grid, grid, rtol=1e-12, atol=1e-15)
    assert agg.total_weight == pytest.approx(W, rel=1e-12)
    assert agg.grid.sum() == pytest.approx(1.0)
    # global view, K = 4: L0H0 mass .0625, one-hot key 1 -> (0, 1); L0H1 mass .25/.75, one-hot key 2 -> (1, 0)
    g1, g2 = 0.0625 * (1 - ent([1.0], 4) / math.log(4)), 1 / 3 * (1 - ent([1.0], 4) / math.log(4))
    np.testing.assert_allclose(agg.global_grid, [[0, g1 / (g1 + g2)], [g2 / (g1 + g2), 0]], rtol=1e-12)
    assert agg.details["global"]["total_weight"] == pytest.approx(g1 + g2, rel=1e-12)


def test_image_method_blend_and_drop(tiny):
    panel = hm.aggregate_image(tiny, JACKET, [0, 1], [0, 1], topk=2, global_mode="panel")
    blend = hm.aggregate_image(tiny, JACKET, [0, 1], [0, 1], topk=2, global_mode="blend")
    # global cell (i, j) covers tiled cells (i, 2j) and (i, 2j+1) (R=1, C=2): value / 2 in each
    up = np.repeat(panel.global_grid, 2, axis=1) / 2
    np.testing.assert_allclose(blend.grid, 0.5 * panel.grid + 0.5 * up, rtol=1e-12)
    assert blend.grid.sum() == pytest.approx(1.0)
    drop = hm.aggregate_image(tiny, JACKET, [0, 1], [0, 1], topk=2, global_mode="drop")
    np.testing.assert_allclose(drop.grid, panel.grid)
    assert drop.global_grid is None


def test_image_method_topk_within_image_keys(tiny):
    # top-1 keeps only key 0 of L0H0's tile part (the user's top-k would have kept BOS)
    agg = hm.aggregate_image(tiny, JACKET, [0], [0], topk=1, global_mode="drop")
    assert agg.grid[0, 0] == 1.0 and agg.grid.sum() == 1.0
    assert agg.weights[(0, 0)] == pytest.approx(0.375 * (1 - ent([1.0], 8) / math.log(8)), rel=1e-12)


def test_global_only_attention_still_draws(tmp_path):
    pos = synthetic.make_tokens(3, 4)[1] + 5
    run = Run(synthetic.make_run(tmp_path / "r", 3, 4, one_hot={pos: 12 * 64 + 9}))   # global cell (1, 1)
    agg = hm.aggregate_image(run, pos, [0, 1], [0, 1], topk=10)
    assert agg.total_weight == 0 and agg.grid.sum() == 0
    assert np.unravel_index(agg.global_grid.argmax(), (8, 8)) == (1, 1)
    with pytest.raises(UserError, match="zero weight"):
        hm.aggregate_image(run, pos, [0, 1], [0, 1], topk=10, global_mode="drop")


# -- grids of every shape: the hottest cell is where the one-hot row points ------------------------
@pytest.mark.parametrize("rows,cols,size", [(3, 4, (640, 427)), (4, 3, (427, 640)), (4, 4, (512, 512))])
@pytest.mark.parametrize("method", ["image", "reference"])
def test_hottest_cell(tmp_path, rows, cols, size, method):
    tile, i, j = rows * cols - 2, 3, 5                     # a tile near the end, cell (3, 5) inside it
    key = tile * 64 + i * 8 + j
    pos = synthetic.make_tokens(rows, cols)[1] + 5          # the first "jacket"
    run = Run(synthetic.make_run(tmp_path / "r", rows, cols, image_size=size, one_hot={pos: key}))
    agg = (hm.aggregate_reference(run, pos, [0, 1], [0, 1], 10) if method == "reference"
           else hm.aggregate_image(run, pos, [0, 1], [0, 1], 10))
    assert agg.grid.shape == (rows * 8, cols * 8)
    r, c = divmod(tile, cols)
    assert np.unravel_index(agg.grid.argmax(), agg.grid.shape) == (r * 8 + i, c * 8 + j)
    assert agg.grid.max() == pytest.approx(1.0, abs=1e-6)


def test_unsplit_image_uses_the_global_view(tmp_path):
    pos = synthetic.make_tokens(0, 0)[1] + 5
    run = Run(synthetic.make_run(tmp_path / "r", 0, 0, one_hot={pos: 10}))
    agg = hm.aggregate_image(run, pos, [0, 1], [0, 1], 10)
    assert agg.grid is None and np.unravel_index(agg.global_grid.argmax(), (8, 8)) == (1, 2)
    with pytest.raises(UserError, match="not split"):
        hm.aggregate_reference(run, pos, [0, 1], [0, 1], 10)


def test_reference_format_matches_our_format(tmp_path):
    ours = Run(synthetic.make_run(tmp_path / "ours", 4, 3, all_rows=True, seed=3))
    ref = Run(synthetic.make_run(tmp_path / "ref", 4, 3, reference=True, seed=3), allow_pickle=True)
    pos = hm.find_token(ours, "jacket")
    assert hm.find_token(ref, "jacket") == pos
    for f in (lambda r: hm.aggregate_reference(r, pos, [0, 1], [0, 1], 10),
              lambda r: hm.aggregate_image(r, pos, [0, 1], [0, 1], 10)):
        a, b = f(ours), f(ref)
        np.testing.assert_array_equal(a.grid, b.grid)
        assert a.weights == b.weights


# -- token lookup and --layers ------------------------------------------------------------------
def test_find_token(tiny):
    assert hm.find_token(tiny, "jacket") == 39
    assert hm.find_token(tiny, " JACKET ") == 39
    assert hm.find_token(tiny, "jacket", occurrence=2) == 45
    assert hm.find_token(tiny, "image") == 27                          # only in the prompt
    assert hm.find_token(tiny, "whatever", index=38) == 38
    with pytest.raises(UserError, match="'jacket'"):                    # the closest tokens are listed
        hm.find_token(tiny, "jackett")
    with pytest.raises(UserError, match="occurs 2 time"):
        hm.find_token(tiny, "jacket", occurrence=3)
    with pytest.raises(UserError, match="out of range"):
        hm.find_token(tiny, "jacket", index=48)


def test_answer_occurrences_come_first(tmp_path):
    tokens, plen = synthetic.make_tokens(0, 0, side=2, prompt=["Ġjacket", "?"], answer=["ĠA", "Ġjacket"])
    g = geo.from_tokens(tokens)
    q = np.arange(len(tokens))
    layers = [np.zeros((1, len(q), len(tokens)), np.float16)]
    run = Run(store.write_run(tmp_path / "r", tokens=tokens, layers=layers, query_positions=q, store="compact",
                              geometry=g, meta={"prompt_length": plen}))
    prompt_pos, answer_pos = tokens.index("Ġjacket"), len(tokens) - 2
    assert hm.find_token(run, "jacket") == answer_pos
    assert hm.find_token(run, "jacket", occurrence=2) == prompt_pos


@pytest.mark.parametrize("spec,expected", [("all", list(range(30))), ("0-29", list(range(30))), ("7", [7]),
                                           ("1,3-4", [1, 3, 4]), ("27-", [27, 28, 29]), ("4,2,4", [2, 4])])
def test_parse_layers(spec, expected):
    assert hm.parse_layers(spec, 30) == expected


@pytest.mark.parametrize("spec,msg", [("3-1", "empty"), ("a", "malformed"), ("1-b", "malformed"), ("", "malformed"),
                                      ("-1", "malformed"), ("1,,2", "malformed"), ("0-30", "out of range"),
                                      ("30", "out of range")])
def test_parse_layers_errors(spec, msg):
    with pytest.raises(UserError, match=msg):
        hm.parse_layers(spec, 30)


# -- the command line ---------------------------------------------------------------------------
def cli(*args, cwd=None):
    return subprocess.run([sys.executable, str(CLI), *map(str, args)], capture_output=True, text=True, cwd=cwd)


def test_cli_our_run_portrait(tmp_path):
    run = synthetic.make_run(tmp_path / "run", 4, 3, image_size=(427, 640))
    out = tmp_path / "out"
    r = cli("--run", run, "--token", "jacket", "--occurrence", "2", "--output", out / "h.png",
            "--overlay", out / "o.png", "--json")
    assert r.returncode == 0, r.stderr
    assert "position" in r.stdout
    for name in ("h.png", "h_global.png", "o.png", "h.json"):
        assert (out / name).is_file()
    with Image.open(out / "o.png") as im:
        assert im.size == (427, 640)
    import json
    doc = json.loads((out / "h.json").read_text())
    assert np.array(doc["grid"]).shape == (32, 24) and doc["position"] == synthetic.make_tokens(4, 3)[1] + 11
    assert len(doc["per_head"]) == 4 and doc["method"] == "image"


def test_cli_replaces_only_its_own_files(tmp_path):
    """A user's file at the --json path (<output>.json) or at the PNG path is refused in one line naming
    it, and left byte-identical; a rerun replaces our own PNGs and JSON (they carry our marker)."""
    import json
    run = synthetic.make_run(tmp_path / "run", 2, 2)
    out = tmp_path / "out"
    out.mkdir()
    args = ["--run", run, "--token", "jacket", "--output", out / "h.png", "--overlay", out / "o.png", "--json"]
    mine = b'{"my": "own notes, not a heatmap"}\n'
    (out / "h.json").write_bytes(mine)
    for extra in ((), ("--overlay", "")):
        r = cli(*args, *extra)
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        assert r.returncode == 2 and len(lines) == 1 and str(out / "h.json") in lines[0], r.stderr
        assert "not written by smolattn" in lines[0] and "Saved" not in r.stdout
        assert sorted(p.name for p in out.iterdir()) == ["h.json"] and (out / "h.json").read_bytes() == mine
    (out / "h.json").unlink()
    Image.new("RGB", (8, 8)).save(out / "h.png")                     # a picture of the user's at --output
    before = (out / "h.png").read_bytes()
    r = cli(*args)
    assert r.returncode == 2 and str(out / "h.png") in r.stderr and "Traceback" not in r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["h.png"] and (out / "h.png").read_bytes() == before
    (out / "h.png").unlink()
    assert cli(*args).returncode == 0
    assert json.loads((out / "h.json").read_text())["format"] == hm.FORMAT
    for name in ("h.png", "o.png", "h_global.png"):
        with Image.open(out / name) as im:
            assert im.text.get("smolattn") == hm.FORMAT
    stamp = {n: (out / n).stat().st_ino for n in ("h.png", "o.png", "h.json")}
    r = cli(*args)                                                   # our own earlier files: replaced
    assert r.returncode == 0, r.stderr
    assert all((out / n).stat().st_ino != i for n, i in stamp.items())


def test_cli_reference_layout(tmp_path):
    run = synthetic.make_run(tmp_path / "ref", 3, 4, image_size=(640, 427), reference=True)
    r = cli("--allow-pickle", "--method", "reference", "--layers", "0-1", "--topk", "10",
            "--output", tmp_path / "token_heatmap.png", "--overlay", tmp_path / "ov.png", cwd=run)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "token_heatmap.png").is_file() and not (tmp_path / "token_heatmap_global.png").exists()
    with Image.open(tmp_path / "ov.png") as im:
        assert im.size == (640, 427)
    # the same run named explicitly, overlay skipped
    r = cli("--decoded-tokens", run / "decoded_tokens.npy", "--attn-dir", run / "attentions_5", "--allow-pickle",
            "--overlay", "", "--smooth", "--global", "blend", "--output", tmp_path / "b.png", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "b.png").is_file() and not (tmp_path / "token_heatmap_overlay.png").exists()


@pytest.mark.parametrize("args,msg", [
    (["--token", "jackett"], "closest: 'jacket'"),
    (["--layers", "0-5"], "out of range"),
    (["--layers", "1-x"], "malformed --layers"),
    (["--heads", "9"], "head 9 out of range"),
    (["--token", "jacket", "--occurrence", "5"], "--occurrence"),
    (["--topk", "ten"], "invalid int"),
    (["--index", "10"], "no stored attention row"),           # an <image> token
    (["--overlay-alpha", "2"], "overlay-alpha"),
])
def test_cli_bad_input(tmp_path, args, msg):
    run = synthetic.make_run(tmp_path / "run", 1, 2)
    r = cli("--run", run, "--output", tmp_path / "h.png", "--overlay", tmp_path / "o.png", *args)
    assert r.returncode != 0
    assert msg in r.stderr and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert not (tmp_path / "h.png").exists() and not (tmp_path / "o.png").exists()


def test_cli_missing_files(tmp_path):
    def check(r, msg):
        assert r.returncode != 0 and msg in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
        assert not list(tmp_path.glob("*.png"))
    check(cli("--run", tmp_path / "nope", "--output", tmp_path / "h.png"), "not found")
    check(cli("--output", tmp_path / "h.png", cwd=tmp_path), "token file not found")
    run = synthetic.make_run(tmp_path / "run", 1, 2)
    (run / "attention" / "layer_01.image.b2").unlink()
    check(cli("--run", run, "--output", tmp_path / "h.png", "--overlay", tmp_path / "o.png"), "cannot read layer 1")
    check(cli("--run", run, "--layers", "0", "--output", tmp_path / "h.png", "--decoded-tokens", "x.npy"), "--run")
    ref = synthetic.make_run(tmp_path / "ref", 1, 2, reference=True)
    check(cli("--run", ref, "--output", tmp_path / "h.png"), "--allow-pickle")
    check(cli("--decoded-tokens", ref / "decoded_tokens.npy", "--attn-dir", tmp_path, "--allow-pickle",
              "--output", tmp_path / "h.png"), "--attn-dir")
    (ref / "image.png").unlink()
    check(cli("--run", ref, "--allow-pickle", "--output", tmp_path / "h.png", "--overlay", tmp_path / "o.png"),
          "no image")
