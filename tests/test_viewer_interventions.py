"""The viewer on intervened runs and sweeps (issue 18), written by hand exactly per
docs/interventions.md and docs/run-format.md on synthetic runs: the badge and ablated heads in the run info, the
compare endpoint (both answers, the teacher-forced log-probability deltas, P(yes)/P(no)), a base run that
cannot be shown, the sweep page's numbers and picture, and that nothing outside what is served is read."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from smolattn import synthetic
from viewer import interventions as ivs

PROMPT = ["ĠIs", "Ġthere", "Ġa", "Ġdog", "Ġin", "Ġthis", "Ġimage", "?"]
BASE_ANSWER = ["ĠYes", ",", "Ġthere", "Ġis", "Ġa", "Ġdog", "."]
NEW_ANSWER = ["ĠNo", ",", "Ġthere", "Ġis", "Ġno", "Ġdog", "."]
ROWS, COLS, LAYERS, HEADS = 3, 4, 16, 8
ABLATED = [[12, 3], [14, 7]]
HOT_BASE, HOT_NEW = (5, 27), (18, 6)          # tiled cells the last prompt token looks at, base / intervened
TF_RAW = ["Yes", ",", "Ġthere", "Ġis", "Ġa", "Ġdog", ".", "<end_of_utterance>"]   # as convert_ids_to_tokens
TF_TOKENS = ["Yes", ",", " there", " is", " a", " dog", ".", "<end_of_utterance>"]
BASE_LP = [-0.21, -0.9, -0.35, -0.1, -1.2, -0.4, -0.3, -0.05]
NEW_LP = [-2.75, -1.1, -0.3, -0.2, -2.9, -0.5, -0.45, -0.07]
YES_NO = {"base": {"p_yes": 0.81, "p_no": 0.11}, "intervened": {"p_yes": 0.064, "p_no": 0.72}}
SWEEP = "photo.sweep-last-image-w9"


def tile_key(i, j, side=8):
    return ((i // side) * COLS + j // side) * side * side + (i % side) * side + j % side


def prompt_length():
    return synthetic.make_tokens(ROWS, COLS, prompt=PROMPT, answer=BASE_ANSWER)[1]


def spec_meta(slug, kind, heads=(), knockouts=(), base="../photo", command=None):
    return {"slug": slug, "kind": list(kind),
            "spec": {"heads": [list(h) for h in heads], "ablation": "zero", "knockouts": list(knockouts)},
            "command": command or f"python intervene.py --run runs/photo  # {slug}",
            "base_run": base, "pixels": "source image"}


def effects(base_answer="Yes, there is a dog.", new_answer="No, there is no dog.", yes_no=YES_NO):
    plen = prompt_length()
    return {"format": "smolattn-effects", "version": 1,
            "base": {"answer": base_answer, "token_ids": list(range(100, 108)), "prompt_length": plen},
            "intervened": {"answer": new_answer, "token_ids": list(range(200, 208)), "prompt_length": plen},
            "teacher_forced": {"tokens": TF_RAW, "token_ids": list(range(100, 108)),
                               "base_logprobs": BASE_LP, "intervened_logprobs": NEW_LP,
                               "base_sum": sum(BASE_LP), "intervened_sum": sum(NEW_LP)},
            "yes_no": yes_no, "standin": True}


def sweep_png(path: Path, change) -> None:
    """A curve like intervene.py's sweep.png (matplotlib, Agg)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 3.2), dpi=100)
    ax.plot(range(len(change)), change, marker="o", color="#c2410c")
    ax.axhline(0, color="#888", lw=0.8)
    ax.set_xlabel("window centre (layer)")
    ax.set_ylabel("relative change of P('Yes') (%)")
    ax.set_title("knockout last -> image, window 9 (stand-in)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def build(root: Path, picture: bool = True) -> Path:
    """Under ``root``: the base run ``photo``, an ablated run, a knockout run, a block-image run, a run
    whose base is gone, a run whose base lies outside the root, and a sweep of ``photo``."""
    plen = prompt_length()
    common = dict(rows=ROWS, cols=COLS, layers=LAYERS, heads=HEADS, prompt=PROMPT)
    synthetic.make_run(root / "photo", answer=BASE_ANSWER, seed=1,
                       one_hot={plen - 1: tile_key(*HOT_BASE), plen: tile_key(*HOT_BASE)}, **common)

    def intervened(name, iv, answer=NEW_ANSWER, fx=None):
        synthetic.make_run(root / name, answer=answer, seed=2, meta_extra={"intervention": iv},
                           one_hot={plen - 1: tile_key(*HOT_NEW), plen: tile_key(*HOT_NEW)}, **common)
        (root / name / "effects.json").write_text(json.dumps(effects() if fx is None else fx))

    intervened("photo.ablate-12.3-14.7", spec_meta("ablate-12.3-14.7", ["ablate"], heads=ABLATED,
                                                   command="python intervene.py --run runs/photo --ablate-heads 12:3,14:7"))
    intervened("photo.knockout-last-box", spec_meta("knockout-last-box", ["knockout"], knockouts=[
        {"layers": list(range(8, 16)), "from": "last", "to": "box:120,40,300,200",
         "queries": [plen - 1], "keys": [5, 6, 7]}]))
    intervened("photo.block-image-from-10", spec_meta("block-image-from-10", ["block-image"], knockouts=[
        {"layers": list(range(10, LAYERS)), "from": "text", "to": "image", "queries": list(range(840, plen)),
         "keys": [1, 2]}]), answer=BASE_ANSWER, fx=effects(new_answer="Yes, there is a dog.", yes_no=None))
    intervened("lost.ablate-1.0", spec_meta("ablate-1.0", ["ablate"], heads=[[1, 0]], base="../gone"))
    synthetic.make_run(root.parent / "outside", answer=BASE_ANSWER, **common)
    intervened("stray.ablate-1.0", spec_meta("ablate-1.0", ["ablate"], heads=[[1, 0]], base="../../outside"))

    sweep = root / SWEEP
    sweep.mkdir()
    centres = list(range(LAYERS))
    layers = [[max(0, c - 4), min(LAYERS - 1, c + 4)] for c in centres]
    change = [round(-60 * np.exp(-((c - 9) / 3) ** 2) + 2 * np.sin(c), 2) for c in centres]
    iv = spec_meta("sweep-last-image-w9", ["sweep"], knockouts=[{"layers": [], "from": "last", "to": "image",
                                                                  "queries": [plen - 1], "keys": [1]}])
    (sweep / "meta.json").write_text(json.dumps({"format": "smolattn-sweep", "version": 1, "intervention": iv,
                                                 "standin": True}))
    (sweep / "sweep.json").write_text(json.dumps({
        "format": "smolattn-sweep", "version": 1, "window": 9, "from": "last", "to": "image", "token": "Yes",
        "token_id": 100, "base_prob": 0.81, "centres": centres, "layers": layers,
        "prob": [0.81 * (1 + c / 100) for c in change], "relative_change_pct": change, "standin": True}))
    if picture:
        sweep_png(sweep / "sweep.png", change)
    return root


@pytest.fixture
def root(tmp_path):
    return build(tmp_path / "runs")


@pytest.fixture
def client(make_app, root):
    return make_app(RUNS=root).test_client()


def ok(resp):
    assert resp.status_code == 200, resp.get_json()
    body = resp.get_json()
    assert body["success"] is True
    return body


def fails(resp, status, *words):
    assert resp.status_code == status, (resp.status_code, resp.get_data(as_text=True)[:300])
    body = resp.get_json()
    assert body["success"] is False
    for w in words:
        assert w in body["error"], body["error"]
    return body["error"]


# -- the run info ------------------------------------------------------------------------------
def test_run_info_has_the_badge_and_the_ablated_heads(client):
    info = ok(client.get("/api/initialize?run=photo.ablate-12.3-14.7"))["intervention"]
    assert info["label"] == "ablated 12:3, 14:7" and info["slug"] == "ablate-12.3-14.7"
    assert info["kind"] == ["ablate"] and info["heads"] == ABLATED and info["ablation"] == "zero"
    assert info["base"] == "photo" and info["base_error"] is None and info["has_effects"] is True
    assert info["command"].endswith("--ablate-heads 12:3,14:7") and info["pixels"] == "source image"

    plain = ok(client.get("/api/initialize?run=photo"))
    assert plain["intervention"] is None
    assert plain["sweeps"] == [{"name": SWEEP, "label": "sweep last → image, window 9"}]
    assert ok(client.get("/api/initialize?run=photo.ablate-12.3-14.7"))["sweeps"] == []


def test_no_add_methods_command_for_an_intervened_run(client):
    """The "add methods" hint would rebuild the run without its intervention (and replace it): an
    intervened run offers none; its base run still gets the extraction command."""
    info = ok(client.get("/api/initialize?run=photo.ablate-12.3-14.7"))
    assert info["methods_command"] is None
    assert all(m.get("command") is None for m in info["methods"] if not m["available"])
    assert "extract_smolvlm_attn.py" in ok(client.get("/api/initialize?run=photo"))["methods_command"]


def test_badges_of_knockout_and_block_image(client):
    ko = ok(client.get("/api/initialize?run=photo.knockout-last-box"))["intervention"]
    assert ko["label"] == "knockout last → box:120,40,300,200 layers 8-15" and ko["heads"] == []
    assert ko["knockouts"] == [{"layers": list(range(8, 16)), "from": "last", "to": "box:120,40,300,200"}]
    assert "queries" not in ko["knockouts"][0]       # positions stay in meta.json; the page needs none
    block = ok(client.get("/api/initialize?run=photo.block-image-from-10"))["intervention"]
    assert block["label"] == "image blocked from layer 10"


def test_badge_words():
    assert ivs.badge({"kind": ["ablate"], "spec": {"heads": [[12, h] for h in range(8)]}}, num_heads=8) == "ablated 12:*"
    assert ivs.badge({"kind": ["ablate"], "spec": {"heads": [[3, 1]], "ablation": "mean"}}) == "ablated 3:1 (mean)"
    many = ivs.badge({"kind": ["ablate"], "spec": {"heads": [[layer, 0] for layer in (1, 2, 3, 7, 8, 9, 10, 11, 20)]}})
    assert many == "ablated 9 heads in layers 1-3,7-11,20"
    both = {"kind": ["ablate", "knockout"], "spec": {"heads": [[2, 1]], "knockouts": [
        {"layers": [0, 5, 10, 11, 12], "from": "question", "to": "outside:1,2,3,4"}]}}
    assert ivs.badge(both) == "ablated 2:1 + knockout question → outside:1,2,3,4 layers 0,5,10-12"
    combined = {"kind": ["knockout", "block-image"], "spec": {"knockouts": [
        {"layers": [3, 4], "from": "last", "to": "image"}, {"layers": [20, 21, 22], "from": "text", "to": "image"}]}}
    assert ivs.badge(combined) == "knockout last → image layers 3-4 + image blocked from layer 20"
    # out-of-range or malformed heads are not marked
    assert ivs.heads_of({"spec": {"heads": [[1, 1], [99, 0], [1, 42], ["x", 1], [2]]}}, 16, 8) == [[1, 1]]


# -- compare with base -------------------------------------------------------------------------------
def test_compare_returns_both_answers_and_the_logprob_deltas(client):
    body = ok(client.get("/api/compare?run=photo.ablate-12.3-14.7"))
    assert body["base"] == "photo" and body["base_error"] is None and body["effects_error"] is None
    assert body["answers"] == {"base": "Yes, there is a dog.", "intervened": "No, there is no dog."}
    e = body["effects"]
    assert e["tokens"] == TF_TOKENS and e["raw_tokens"] == TF_RAW and e["base_logprobs"] == BASE_LP and e["intervened_logprobs"] == NEW_LP
    assert e["delta"] == pytest.approx([b - a for a, b in zip(BASE_LP, NEW_LP)], abs=1e-12)
    assert e["delta"][0] < -2.5                       # "Yes" lost most of its probability
    assert e["delta_sum"] == pytest.approx(sum(NEW_LP) - sum(BASE_LP))
    assert e["yes_no"] == YES_NO and e["standin"] is True and body["standin"] is True
    # the page then draws the base map of the same token through the ordinary route
    plen = prompt_length()
    a = ok(client.get(f"/api/attention?run=photo.ablate-12.3-14.7&index={plen - 1}"))
    b = ok(client.get(f"/api/attention?run={body['base']}&index={plen - 1}"))
    assert np.unravel_index(np.argmax(a["grid"]), (24, 32)) == HOT_NEW
    assert np.unravel_index(np.argmax(b["grid"]), (24, 32)) == HOT_BASE


def test_compare_without_yes_no_and_of_an_ordinary_run(client):
    body = ok(client.get("/api/compare?run=photo.block-image-from-10"))
    assert body["effects"]["yes_no"] is None and body["answers"]["intervened"] == "Yes, there is a dog."
    fails(client.get("/api/compare?run=photo"), 404, "not an intervened run")


def test_base_run_missing_or_outside_says_so(client, root):
    for name, words in (("lost.ablate-1.0", ("'../gone'", "was not found")),
                        ("stray.ablate-1.0", ("'../../outside'", "outside the served runs root"))):
        info = ok(client.get(f"/api/initialize?run={name}"))["intervention"]
        assert info["base"] is None and all(w in info["base_error"] for w in words), info["base_error"]
        body = ok(client.get(f"/api/compare?run={name}"))     # the effects still show
        assert body["base"] is None and body["base_error"] == info["base_error"]
        assert body["answers"]["base"] == "Yes, there is a dog." and len(body["effects"]["delta"]) == len(TF_TOKENS)
    (root / "photo.ablate-12.3-14.7" / "meta.json").write_text(json.dumps({
        **json.loads((root / "photo.ablate-12.3-14.7" / "meta.json").read_text()),
        "intervention": spec_meta("ablate-12.3-14.7", ["ablate"], heads=ABLATED, base="../a-folder")}))
    (root / "a-folder").mkdir()
    info = ok(client.get("/api/initialize?run=photo.ablate-12.3-14.7"))["intervention"]
    assert info["base"] is None and "is not a run" in info["base_error"]
    fails(client.get("/api/initialize?run=..%2Foutside"), 404, "unknown run")


def test_effects_file_problems_are_one_line(client, root):
    fx = root / "photo.ablate-12.3-14.7" / "effects.json"
    bad = effects()
    bad["teacher_forced"]["intervened_logprobs"] = NEW_LP[:-1]
    fx.write_text(json.dumps(bad))
    body = ok(client.get("/api/compare?run=photo.ablate-12.3-14.7"))
    assert body["effects"] is None and "of one length" in body["effects_error"]
    meta = lambda name: json.loads((root / name / "meta.json").read_text())["answer"]   # noqa: E731
    assert body["answers"] == {"base": meta("photo"), "intervened": meta("photo.ablate-12.3-14.7")}   # from the runs
    assert "Yes, there" in body["answers"]["base"] and "No, there" in body["answers"]["intervened"]
    fx.write_text(json.dumps({**effects(), "format": "something-else"}))
    assert "not a smolattn-effects file" in ok(client.get("/api/compare?run=photo.ablate-12.3-14.7"))["effects_error"]
    nan = effects()
    nan["teacher_forced"]["intervened_logprobs"] = [float("-inf")] + NEW_LP[1:]
    fx.write_text(json.dumps(nan))                    # Python's json writes -Infinity; browsers reject it
    resp = client.get("/api/compare?run=photo.ablate-12.3-14.7")
    assert b"Infinity" not in resp.data and b"NaN" not in resp.data
    assert ok(resp)["effects"]["intervened_logprobs"][0] is None
    fx.unlink()
    body = ok(client.get("/api/compare?run=photo.ablate-12.3-14.7"))
    assert body["effects"] is None and "no effects.json" in body["effects_error"]
    assert ok(client.get("/api/initialize?run=photo.ablate-12.3-14.7"))["intervention"]["has_effects"] is False


# -- serving one intervened run: its base is its sibling -------------------------------------------------
def test_single_run_opens_its_sibling_base_and_nothing_else(make_app, root):
    c = make_app(RUN=root / "photo.ablate-12.3-14.7").test_client()
    info = ok(c.get("/api/initialize"))["intervention"]
    assert info["base"] == "photo" and info["base_error"] is None
    body = ok(c.get("/api/compare"))
    assert body["base"] == "photo" and body["answers"]["base"] == "Yes, there is a dog."
    plen = prompt_length()
    b = ok(c.get(f"/api/attention?run=photo&index={plen - 1}"))
    assert np.unravel_index(np.argmax(b["grid"]), (24, 32)) == HOT_BASE
    img = c.get("/api/image?run=photo")
    assert img.status_code == 200 and img.mimetype == "image/png"
    assert ok(c.get("/api/initialize?run=photo"))["sweeps"] == [{"name": SWEEP, "label": "sweep last → image, window 9"}]
    for other in ("photo.knockout-last-box", "lost.ablate-1.0", "../outside", "photo/..", ".", "outside"):
        fails(c.get(f"/api/initialize?run={other}"), 404, "unknown run")
    assert ok(c.get(f"/api/sweep?name={SWEEP}"))["base"] == "photo"    # the sweep of its base
    fails(c.get("/api/sweep?name=photo.knockout-last-box"), 404, "unknown sweep")

    lone = make_app(RUN=root / "lost.ablate-1.0").test_client()
    assert "was not found" in ok(lone.get("/api/compare"))["base_error"]
    fails(lone.get("/api/initialize?run=photo"), 404, "unknown run")   # a sibling, but not its base
    fails(lone.get(f"/api/sweep?name={SWEEP}"), 404, "unknown sweep")


# -- sweeps -------------------------------------------------------------------------------------------
def test_sweep_numbers_and_picture(client, root):
    body = ok(client.get(f"/api/sweep?name={SWEEP}"))
    s = json.loads((root / SWEEP / "sweep.json").read_text())
    assert body["sweep"]["relative_change_pct"] == s["relative_change_pct"] and body["sweep"]["centres"] == s["centres"]
    assert body["sweep"]["window"] == 9 and body["sweep"]["token"] == "Yes" and body["problem"] is None
    assert body["intervention"]["label"] == "sweep last → image, window 9" and body["base"] == "photo"
    assert body["standin"] is True and body["png_url"] == f"/api/sweep.png?name={SWEEP}"
    png = client.get(body["png_url"])
    assert png.status_code == 200 and png.mimetype == "image/png"
    assert png.data == (root / SWEEP / "sweep.png").read_bytes()
    page = client.get(f"/sweep?name={SWEEP}")
    assert page.status_code == 200 and b"sweep.js" in page.data


def test_sweep_png_is_served_only_from_its_content_and_folder(client, root, tmp_path):
    png = root / SWEEP / "sweep.png"
    png.write_bytes(b"<svg onload=alert(1)>")             # not a PNG: refused, never sent as an image
    fails(client.get(f"/api/sweep.png?name={SWEEP}"), 404, "not a PNG")
    secret = tmp_path / "secret.png"
    secret.write_bytes(png.read_bytes().replace(b"<svg", b"\x89PNG\r\n\x1a\n<svg"))
    png.unlink()
    os.symlink(secret, png)                               # a link out of the folder is not the writer's file
    fails(client.get(f"/api/sweep.png?name={SWEEP}"), 404, "no sweep.png")
    assert ok(client.get(f"/api/sweep?name={SWEEP}"))["png_url"] is None
    for name in ("../outside", "photo", "photo.ablate-12.3-14.7", ".", "/etc", "a/../../x", ""):
        resp = client.get(f"/api/sweep?name={name}")
        assert resp.status_code in (400, 404) and resp.get_json()["success"] is False, name
        assert client.get(f"/api/sweep.png?name={name}").status_code in (400, 404), name


def test_sweep_json_with_nan_is_valid_json(client, root):
    path = root / SWEEP / "sweep.json"
    s = json.loads(path.read_text())
    s["relative_change_pct"][3] = float("nan")
    s["prob"] = s["prob"][:-1]
    path.write_text(json.dumps(s))
    resp = client.get(f"/api/sweep?name={SWEEP}")
    assert b"NaN" not in resp.data
    body = ok(resp)
    assert body["sweep"]["relative_change_pct"][3] is None and "prob" in body["problem"]
