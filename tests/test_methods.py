"""Rollout, gradient relevancy and relative attention (smolattn.methods) against independent reference
code written here (eager ``output_attentions=True`` + numpy, ``retain_grad``), a planted attention
pattern, storage in the run, the reader and the command lines."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForImageTextToText

from smolattn import extract as ex
from smolattn import heatmap as hm
from smolattn import methods as mth
from smolattn import model as mdl
from smolattn import standin, store, synthetic
from smolattn.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
ALL = ["raw", "rollout", "relevancy", "relative"]
EDGE = 1024          # 640 x 480 -> 2 x 2 tiles + global: tiles exercised, short sequence
NEW = 4


@pytest.fixture(scope="module")
def run(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("methods")
    img = root / "img.png"
    synthetic.test_image((640, 480)).save(img)
    ex.extract(tiny, img, root / "run", ex.Settings(max_new_tokens=NEW, longest_edge=EDGE, methods=tuple(ALL)))
    return store.Run(root / "run")


@pytest.fixture(scope="module")
def inputs(tiny, run):
    return mdl.encode(tiny, synthetic.test_image((640, 480)), run.meta["prompt"], EDGE)[1]


@pytest.fixture(scope="module")
def computed(tiny, run, inputs):
    """compute() in fp32 with features from a separate vision pass (the stored maps are fp16)."""
    return mth.compute(tiny, run.meta["token_ids"], run.prompt_length, run.geometry, run.query_positions, ALL,
                       mth.image_features(tiny, inputs))


@pytest.fixture(scope="module")
def eager_model():
    return AutoModelForImageTextToText.from_pretrained(str(standin.ensure("tiny")), dtype=torch.float32,
                                                       attn_implementation="eager").eval()


def eager_attentions(model, ids, inputs, grad=False):
    """(logits, per-layer (H, S, S) attentions) of one eager forward, attentions retaining their grad."""
    ids = torch.tensor([ids])
    with torch.set_grad_enabled(grad):
        o = model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=inputs["pixel_values"],
                  pixel_attention_mask=inputs["pixel_attention_mask"], output_attentions=True)
    if grad:
        for a in o.attentions:
            a.retain_grad()
    return o.logits, list(o.attentions)


def test_rollout_equals_the_explicit_product_of_eager_matrices(run, inputs, eager_model, computed):
    _, att = eager_attentions(eager_model, run.meta["token_ids"], inputs)
    S, keys = len(run.tokens), run.geometry.key_positions
    hats = []
    for a in att:
        hat = 0.5 * a[0].double().numpy().mean(0) + 0.5 * np.eye(S)
        hats.append(hat / hat.sum(-1, keepdims=True))
    r = computed["rollout"]
    assert r["maps"].shape == (len(att), len(run.query_positions), len(keys))
    for start in range(len(att)):
        product = np.eye(S)
        for hat in hats[start:][::-1]:          # Â_{L-1} ... Â_start, written out in full
            product = product @ hat
        np.testing.assert_allclose(r["maps"][start], product[run.query_positions][:, keys], rtol=1e-4, atol=1e-9)


def test_relevancy_equals_the_rule_with_retain_grad(run, inputs, eager_model, computed):
    ids = run.meta["token_ids"]
    logits, att = eager_attentions(eager_model, ids, inputs, grad=True)
    S, P, keys = len(ids), run.prompt_length, run.geometry.key_positions
    rel = computed["relevancy"]
    assert rel["positions"].tolist() == list(range(P, S)) and rel["query_positions"].tolist() == list(range(P - 1, S - 1))
    for i, t in enumerate(range(P, S)):
        for a in att:
            a.grad = None
        logits[0, t - 1, ids[t]].backward(retain_graph=True)
        cams = [np.clip(a.grad[0].double().numpy() * a[0].detach().double().numpy(), 0, None).mean(0) for a in att]
        for start in (0, len(att) // 2, len(att) - 1):
            R = np.eye(S)
            for cam in cams[start:]:
                R = R + cam @ R
            row = R[t - 1] - np.eye(S)[t - 1]                  # residual normalisation of the row
            row = row / row.sum() + np.eye(S)[t - 1]
            np.testing.assert_allclose(rel["maps"][start, i], row[keys], rtol=1e-4, atol=1e-9)


def test_relative_equals_the_ratio_of_two_captured_rows(tiny, run, inputs, eager_model, computed):
    ids, P = run.meta["token_ids"], run.prompt_length
    _, generic_inputs = mdl.encode(tiny, synthetic.test_image((640, 480)), mth.GENERIC_PROMPT, EDGE)
    generic = generic_inputs["input_ids"][0].tolist()
    assert mth.prompt_ids(tiny, ids, run.geometry, mth.GENERIC_PROMPT) == generic   # same image block
    Pg = len(generic)
    _, num = eager_attentions(eager_model, ids, inputs)
    _, den = eager_attentions(eager_model, generic + ids[P:], generic_inputs)
    rel, keys, eps = computed["relative"], run.geometry.key_positions, computed["relative"]["meta"]["params"]["eps"]
    first_text = run.geometry.image_block[1] + 1
    assert rel["positions"].tolist() == [p for p in run.query_positions if p >= first_text]
    for i, p in enumerate(rel["positions"]):
        d = p - P + Pg if p >= P - 1 else Pg - 1            # the documented denominator row
        for layer in range(len(num)):
            expect = num[layer][0, :, p, keys].mean(0) / (den[layer][0, :, d, keys].mean(0) + eps)
            np.testing.assert_allclose(rel["maps"][layer, i], expect.numpy(), rtol=1e-4, atol=1e-6)


def test_a_planted_cell_is_every_methods_maximum(tiny, run, inputs, monkeypatch):
    """Every layer's attention is pushed onto one known cell (only in the question's forward, so the
    generic prompt does not see it); every method's map must peak on that cell."""
    g = run.geometry
    tile, (ci, cj) = 1, (3, 5)                     # tile (row 0, col 1), cell (3, 5) of that tile
    k = tile * g.per_tile + ci * g.side + cj
    key = int(g.key_positions[k])
    ids = run.meta["token_ids"]
    plain = mth.methods_attention

    def planted(module, query, key_, value, mask, **kw):
        if query.shape[2] == len(ids):
            mask = mask.clone()
            mask[..., key] += 30.0
        return plain(module, query, key_, value, mask, **kw)

    monkeypatch.setattr(mth, "methods_attention", planted)
    out = mth.compute(tiny, ids, run.prompt_length, g, run.query_positions, ALL, mth.image_features(tiny, inputs))
    for name, r in out.items():
        after = r["query_positions"] > g.image_block[1]
        maps = r["maps"][:, after]
        assert maps.size and (maps.argmax(-1) == k).all(), name
        tiles, _ = g.split(maps[0, -1])
        assert np.unravel_index(tiles.argmax(), tiles.shape) == (ci, g.side + cj), name


def test_stored_maps_meta_and_reader(run, computed):
    assert run.meta["format_version"] == store.FORMAT_VERSION == 3
    assert run.methods == ["raw", "relative", "relevancy", "rollout"]
    for name in ("rollout", "relevancy", "relative"):
        m, c = run.method(name), computed[name]
        info = run.meta["methods"][name]
        assert (run.path / info["file"]).is_file() and info["params"] == c["meta"]["params"]
        assert info["shape"] == [run.num_layers, len(c["positions"]), run.geometry.num_keys]
        np.testing.assert_array_equal(m.positions, c["positions"])
        tol = 1e-3 if info["dtype"] == "float16" else 1e-5      # stored dtype vs fp32
        np.testing.assert_allclose(m.maps, c["maps"], rtol=tol, atol=1e-7)
    assert run.meta["methods"]["rollout"]["params"] == {"head_fusion": "mean", "residual": 0.5}
    assert run.meta["methods"]["relative"]["params"]["generic_prompt"] == mth.GENERIC_PROMPT


def test_version_1_runs_still_open_without_methods(make_run):
    path = make_run()
    meta = json.loads((path / "meta.json").read_text())
    meta["format_version"] = 1
    meta.pop("methods", None)
    (path / "meta.json").write_text(json.dumps(meta))
    run = store.Run(path)
    assert run.methods == ["raw"]
    with pytest.raises(UserError, match="--methods raw,rollout"):
        run.method("rollout")
    meta["format_version"] = store.FORMAT_VERSION + 1
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError):
        store.Run(path)


def test_method_names_are_checked():
    assert mth.parse("rollout, relative") == ["raw", "rollout", "relative"]
    assert mth.parse("raw") == ["raw"]
    with pytest.raises(UserError, match="unknown method 'rolout'"):
        mth.parse("raw,rolout")


def test_heatmap_cli_reads_each_method(run, tmp_path):
    P = run.prompt_length
    for name, extra in [("rollout", ["--start-layer", "2"]), ("relevancy", []), ("relative", ["--layers", "1-2"])]:
        out = tmp_path / f"{name}.png"
        r = subprocess.run([sys.executable, "compute_token_heatmap.py", "--run", str(run.path), "--index", str(P),
                            "--method", name, "--output", str(out), "--overlay", "", "--json", *extra],
                           cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        data = json.loads(out.with_suffix(".json").read_text())
        expect = hm.method_map(run, name, P, [1, 2], 2 if name == "rollout" else 0)
        tiles, glob = run.geometry.split(expect)
        np.testing.assert_allclose(np.array(data["grid"]), tiles, atol=1e-8)
        np.testing.assert_allclose(np.array(data["global_grid"]), glob, atol=1e-8)
        assert data["method"] == name


def test_heatmap_cli_refuses_a_missing_method_and_a_token_without_a_map(make_run, run, tmp_path):
    old = make_run()
    r = subprocess.run([sys.executable, "compute_token_heatmap.py", "--run", str(old), "--method", "rollout",
                        "--output", str(tmp_path / "x.png")], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "--methods raw,rollout" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = subprocess.run([sys.executable, "compute_token_heatmap.py", "--run", str(run.path), "--method", "relevancy",
                        "--index", "2", "--output", str(tmp_path / "y.png")], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0 and "no relevancy map" in r.stderr and not (tmp_path / "y.png").exists()


def test_extract_cli_refuses_an_unknown_method_before_loading(tmp_path):
    img = tmp_path / "img.png"
    synthetic.test_image((64, 48)).save(img)
    r = subprocess.run([sys.executable, "extract_smolvlm_attn.py", "--image", str(img), "--output-dir",
                        str(tmp_path / "out"), "--model-id", str(tmp_path / "nomodel"), "--methods", "raw,flow"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0 and "unknown method 'flow'" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()


# -- the viewer's API on synthetic runs with stored maps ---------------------------------------------
def planted_run(make_run):
    """3 x 4 tiles; the first answer token's rows put everything on tiled cell (5, 27)."""
    from smolattn.synthetic import make_tokens
    plen = make_tokens(3, 4)[1]
    key = (5 // 8 * 4 + 27 // 8) * 64 + 5 % 8 * 8 + 27 % 8
    return make_run("m", one_hot={plen: key}, layers=3, methods=("rollout", "relevancy", "relative")), plen


def test_viewer_offers_methods_and_the_command_for_missing_ones(make_run, make_app):
    with_maps, _ = planted_run(make_run)
    info = make_app(RUN=with_maps).test_client().get("/api/initialize").get_json()
    assert [(m["name"], m["available"]) for m in info["methods"]] == [
        ("raw", True), ("rollout", True), ("relevancy", True), ("relative", True)]
    info = make_app(RUN=make_run("plain")).test_client().get("/api/initialize").get_json()
    missing = {m["name"]: m for m in info["methods"] if not m["available"]}
    assert set(missing) == {"rollout", "relevancy", "relative"}
    assert missing["relevancy"]["command"].endswith("--methods raw,relevancy")
    assert info["methods_command"].startswith("python extract_smolvlm_attn.py --image synthetic --output-dir ")
    assert info["methods_command"].endswith("--methods raw,rollout,relevancy,relative")


def test_viewer_attention_reads_the_stored_maps(make_run, make_app):
    path, plen = planted_run(make_run)
    run, client = store.Run(path), make_app(RUN=path).test_client()
    for method, extra, layers, expect in [
            ("rollout", "&start_layer=1", [1, 2], lambda m, i: m.maps[1, i]),
            ("relative", "&layers=1-2", [1, 2], lambda m, i: m.maps[1:3, i].mean(0)),
            ("relevancy", "&start_layer=0", [0, 2], lambda m, i: m.maps[0, i])]:
        pos = plen + 1 if method == "relevancy" else plen        # relevancy of token t is read at t - 1
        body = client.get(f"/api/attention?index={pos}&method={method}{extra}").get_json()
        m = run.method(method)
        tiles, glob = run.geometry.split(expect(m, m.index(pos)))
        assert body["method"] == method and body["layers"] == layers and body["heads"] is None
        np.testing.assert_allclose(body["grid"], tiles, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(body["global"], glob, rtol=1e-5, atol=1e-7)
        assert np.unravel_index(np.argmax(body["grid"]), (24, 32)) == (5, 27)
        shared = client.get(f"/api/attention?index={pos}&method={method}{extra}&norm=shared").get_json()
        assert shared["vmax"] == pytest.approx(float(m.maps[:, m.index(pos)].max()), rel=1e-5)
    assert client.get(f"/api/attention?index={plen}&method=rollout&start_layer=2").get_json()["image_mass"] \
        == pytest.approx(float(run.method("rollout").maps[2, run.method("rollout").index(plen)].sum()), rel=1e-5)
    png = client.get(f"/api/overlay.png?index={plen}&method=rollout&start_layer=1")
    assert png.status_code == 200 and png.mimetype == "image/png" and "rollout" in png.headers["Content-Disposition"]


def test_viewer_method_errors(make_run, make_app):
    path, plen = planted_run(make_run)
    client = make_app(RUN=path).test_client()
    for url, status, text in [
            (f"/api/attention?index={plen - 2}&method=relevancy", 404, "no relevancy map"),
            (f"/api/attention?index={plen}&method=rollout&start_layer=3", 404, "start layer 3 out of range"),
            (f"/api/attention?index={plen}&method=rollout&start_layer=x", 400, "start_layer must be an integer"),
            (f"/api/attention?index={plen}&method=flow", 400, "method must be one of")]:
        r = client.get(url)
        assert r.status_code == status and text in r.get_json()["error"], (url, r.get_json())
    r = make_app(RUN=make_run("plain")).test_client().get(f"/api/attention?index={plen}&method=rollout")
    assert r.status_code == 404 and "--methods raw,rollout" in r.get_json()["error"]
