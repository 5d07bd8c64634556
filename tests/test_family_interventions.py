"""Interventions on several-image and video runs (issue 19), against the independent references of
test_interventions.py (an eager attention with -inf at exactly the chosen (layer, query, key)
triples; a copy of the model with a head's o_proj columns zeroed), on the tiny SmolVLM2 stand-in and
the tiny Idefics3 one, fp32: the words image:K / frame:K / box:K:... resolve to exactly that image's
(frame's) block, the re-run reproduces the base run from its stored images / frames, and the CLI
writes the words into meta.intervention and effects.json, or refuses bad ones in one line."""
import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AttentionInterface, AutoModelForImageTextToText
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from smolattn import engine
from smolattn import extract as ex
from smolattn import interventions as iv
from smolattn import model as mdl
from smolattn import standin, store, synthetic
from smolattn.errors import UserError
from test_family import encode_mp4
from test_interventions import KNOCK, TOL, knock_eager, logits

av = pytest.importorskip("av")
ROOT = Path(__file__).resolve().parent.parent
PROMPT = "Is there a dog in the second picture?"
EDGE = 1024
NEW = 4
SIZES = [(640, 480), (300, 300)]


@pytest.fixture(scope="module")
def smol():
    return mdl.load(str(standin.ensure("smolvlm2-tiny")), device="cpu")


def reference(source):
    AttentionInterface.register("test_knock", knock_eager)
    AttentionMaskInterface.register("test_knock", eager_mask)
    return AutoModelForImageTextToText.from_pretrained(
        source, dtype=torch.float32,
        attn_implementation={"text_config": "test_knock", "vision_config": "sdpa", "": "sdpa"}).eval()


@pytest.fixture(scope="module")
def runs(tiny, smol, tmp_path_factory):
    """Base runs: two images on each model type (the source files there), a 4-frame video."""
    root = tmp_path_factory.mktemp("iv-family") / "runs"
    root.mkdir()
    paths = []
    for k, s in enumerate(SIZES):
        paths.append(root.parent / f"im{k}.png")
        synthetic.test_image(s).save(paths[-1])
    settings = ex.Settings(prompt=PROMPT, max_new_tokens=NEW, longest_edge=EDGE)
    ex.extract_images(smol, paths, root / "two", settings)
    ex.extract_images(tiny, paths, root / "two-idefics3", settings)
    clip = root.parent / "clip.mp4"
    encode_mp4(clip, 16, 4, mark=(10, (24, 16, 24, 24)))
    ex.extract_video(smol, clip, root / "video", ex.Settings(prompt="What happens?", max_new_tokens=NEW))
    return {name: store.Run(root / name) for name in ("two", "two-idefics3", "video")}


def words_of(run, tokenizer=None):
    m = run.meta
    P = m["prompt_length"]
    q = iv.question_positions(tokenizer, m["prompt"], m["token_ids"][:P], run.geometry) if tokenizer else None
    sizes = [run.image_size(k) for k in range(len(run.layout))]
    return iv.Words(m["token_ids"], P, run.geometry, sizes, q, m["generation"]["max_new_tokens"],
                    m["model"]["num_layers"])


def block_image_tokens(run, k):
    """Independently of Layout: the <image> tokens inside image k's block (markers excluded)."""
    first, last = run.layout.blocks[k]
    return [p for p in range(first, last + 1) if run.tokens[p] == "<image>"]


def base_inputs(loaded, run):
    seen, _ = iv.base_pixels(run)
    prep = iv.prepare(loaded, run, *seen) if isinstance(seen, tuple) else iv.prepare(loaded, run, seen)
    ids = torch.tensor([run.meta["token_ids"]])
    return prep, {"input_ids": ids, "pixel_values": prep.pixel_values[None],
                  "pixel_attention_mask": prep.pixel_attention_mask[None]}


# ---------------------------------------------------------------------------------- the words

def test_image_k_and_frame_k_are_exactly_that_blocks_image_tokens(runs):
    for name, word in (("two", "image"), ("video", "frame")):
        run = runs[name]
        w = words_of(run)
        every = []
        for k in range(len(run.layout)):
            got = w.positions(f"{word}:{k}", "--to")
            assert list(got) == block_image_tokens(run, k)
            assert list(got) == run.layout.key_positions[run.layout.keys_of(k)].tolist()
            first, last = run.layout.blocks[k]
            assert first < min(got) and max(got) < last
            every += got
        assert tuple(every) == w.positions("image", "--to")       # image = every image's (frame's) keys


def test_boxes_take_an_image_index(runs):
    run = runs["two"]
    w = words_of(run)
    (W, H), g = run.image_size(1), run.layout.images[1]
    left = w.positions(f"box:1:0,0,{W / 2},{H}", "--to")
    assert len(left) == g.num_keys // 2 and set(left) <= set(block_image_tokens(run, 1))
    keys = run.layout.keys_in_box(1, (0, 0, W / 2, H), (W, H))
    assert list(left) == sorted(run.layout.key_positions[keys].tolist())
    rest = w.positions(f"outside:1:0,0,{W / 2},{H}", "--to")     # the other cells of THAT image
    assert set(left) | set(rest) == set(block_image_tokens(run, 1)) and not set(left) & set(rest)
    # a frame: the marked box of frame 2 (source frame 10) in the video's own pixels
    vid = runs["video"]
    wv = words_of(vid)
    inside = wv.positions("box:2:24,16,48,40", "--to")
    assert set(inside) <= set(block_image_tokens(vid, 2)) and 0 < len(inside) < 64


@pytest.mark.parametrize("name, word, message", [
    ("two", "frame:0", "frame:K is for video runs"),
    ("video", "image:0", "this run is a video: use frame:K"),
    ("two", "image:2", "image 2 out of range: this run has 2 images (0..1)"),
    ("video", "frame:4", "frame 4 out of range: this run has 4 frames (0..3)"),
    ("two", "image:x", "is not a non-negative integer"),
    ("two", "box:0,0,10,10", "this run has 2 images: say which, box:K:x0,y0,x1,y1"),
    ("video", "outside:0,0,10,10", "this run has 4 frames: say which, outside:K:x0,y0,x1,y1"),
    ("two", "box:5:0,0,10,10", "image 5 out of range"),
    ("two", "box:1:0,0,1,1", "covers no image cell centre (image 1 300x300 px)"),
])
def test_bad_words_are_one_line(runs, name, word, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        words_of(runs[name]).positions(word, "--to")


# ---------------------------------------------------------------------------------- == the references

@pytest.mark.parametrize("name, word, layers", [("two", "image:1", (1, 2)), ("two-idefics3", "image:1", (0, 3)),
                                                 ("video", "frame:2", (1, 2, 3))])
def test_knockout_of_one_image_equals_eager_with_inf_at_exactly_its_keys(tiny, smol, runs, name, word, layers):
    run = runs[name]
    loaded = tiny if name == "two-idefics3" else smol
    ref = reference(loaded.source)
    _, x = base_inputs(loaded, run)
    P = run.prompt_length
    keys = words_of(run).positions(word, "--to")
    queries = tuple(range(run.layout.block_end, len(run.tokens)))     # every text query after the blocks
    KNOCK.clear()
    for layer in layers:
        KNOCK[layer] = [(list(queries), list(keys))]
    want = logits(ref, x)
    KNOCK.clear()
    plain = logits(ref, x)
    with iv.applied(iv.Spec(knockouts=(iv.Knockout(layers, queries, keys),))):
        got = logits(loaded.model, x)
    assert (plain[P - 1:] - want[P - 1:]).abs().max() > 1e-4      # knocking out that image changes the answer logits
    torch.testing.assert_close(got, want, atol=TOL, rtol=0)
    # another image's keys are another knockout
    other = words_of(run).positions(word.split(":")[0] + ":0", "--to")
    with iv.applied(iv.Spec(knockouts=(iv.Knockout(layers, queries, other),))):
        assert (logits(loaded.model, x)[P - 1:] - want[P - 1:]).abs().max() > 1e-4


@pytest.mark.parametrize("name", ["two", "video"])
def test_head_ablation_equals_zeroed_o_proj_columns(smol, runs, name):
    run = runs[name]
    heads = ((1, 3), (2, 0))
    ref = copy.deepcopy(smol.model)
    D = smol.model.config.text_config.head_dim
    for layer, h in heads:
        ref.model.text_model.layers[layer].self_attn.o_proj.weight.data[:, h * D:(h + 1) * D] = 0
    _, x = base_inputs(smol, run)
    want = logits(ref, x)
    with iv.applied(iv.Spec(heads=heads)):
        got = logits(smol.model, x)
    assert (logits(smol.model, x) - want).abs().max() > 1e-3
    torch.testing.assert_close(got, want, atol=TOL, rtol=0)


def test_the_rerun_reproduces_the_base_run(smol, runs):
    """From the source images (two) and from the stored frames and timestamps (video): the same prompt
    ids, image blocks and rows; no intervention gives the base answer and its attention rows."""
    for name in ("two", "video"):
        run = runs[name]
        prep, _ = base_inputs(smol, run)
        assert prep.ids == run.meta["token_ids"][:run.prompt_length] and prep.layout == run.layout
        out = engine.run(smol, [prep], run.meta["generation"]["max_new_tokens"])[0]
        assert out.new == run.meta["token_ids"][run.prompt_length:]
        for i in (0, run.num_layers - 1):
            stored = run.layer(i)
            got = np.concatenate([out.layers[i][..., run.layout.key_positions],
                                  out.layers[i][..., run.text_key_positions]], -1).astype(np.float32)
            want = np.concatenate([stored.image, stored.text], -1)
            if name == "two":     # the source PNGs: the same pixels, the same rows bit for bit
                np.testing.assert_array_equal(got, want)
            else:                 # the frames as stored (JPEG q95), not as decoded: rows max ~4e-3 here
                np.testing.assert_allclose(got, want, atol=2e-4, rtol=0)
    assert iv.base_pixels(runs["two"])[1] == "source images"
    assert iv.base_pixels(runs["video"])[1] == "frames stored in the run"


def test_moved_sources_and_kept_frame_rows(smol, runs, tmp_path):
    """Source images gone: every image from its copy in the run (PNG: the same pixels, the same ids and
    answer); a video run with --keep-frame-rows re-runs with those rows."""
    moved = tmp_path / "two"
    shutil.copytree(runs["two"].path, moved)
    meta = json.loads((moved / "meta.json").read_text())
    for e in meta["images"]:
        e["source"] = str(tmp_path / "gone.png")
    (moved / "meta.json").write_text(json.dumps(meta))
    run = store.Run(moved)
    assert iv.base_pixels(run)[1] == "images stored in the run"
    prep, _ = base_inputs(smol, run)
    assert engine.run(smol, [prep], NEW)[0].new == run.meta["token_ids"][run.prompt_length:]
    clip = tmp_path / "clip.mp4"
    encode_mp4(clip, 16, 4)
    ex.extract_video(smol, clip, tmp_path / "rows", ex.Settings(max_new_tokens=2), keep_frame_rows=True)
    run = store.Run(tmp_path / "rows")
    prep, _ = base_inputs(smol, run)
    assert any(p < run.layout.blocks[-1][0] for p in prep.rows)          # the frames' text rows
    assert prep.rows.tolist() == run.query_positions[:len(prep.rows)].tolist()


def test_a_changed_stored_frame_set_is_refused(runs, tmp_path):
    bad = tmp_path / "video"
    shutil.copytree(runs["video"].path, bad)
    meta = json.loads((bad / "meta.json").read_text())
    meta["video"]["fps"] = 5.0                 # the frames' timestamps would not be the run's
    (bad / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="do not give the run's timestamps"):
        iv.base_pixels(store.Run(bad))


def test_a_damaged_stored_frame_is_one_line_naming_it(runs, tmp_path):
    bad = tmp_path / "video"
    shutil.copytree(runs["video"].path, bad)
    frame = bad / json.loads((bad / "meta.json").read_text())["images"][2]["file"]
    frame.write_bytes(b"not a jpeg")
    with pytest.raises(UserError, match=rf"{frame.name}"):
        iv.base_pixels(store.Run(bad))


# ---------------------------------------------------------------------------------- the CLI

def test_knockout_of_image_1_end_to_end(runs, tmp_path):
    run = runs["two"]
    out = tmp_path / "ko"
    iv.main(["--run", str(run.path), "--output-dir", str(out), "--knockout", "--from", "last", "--to", "image:1",
             "--layers", "1-3"])
    new = store.Run(out)
    m = new.meta["intervention"]
    assert m["pixels"] == "source images" and m["kind"] == ["knockout"]
    ko = m["spec"]["knockouts"][0]
    assert ko["to"] == "image:1" and ko["keys"] == block_image_tokens(run, 1) and ko["layers"] == [1, 2, 3]
    assert ko["queries"] == [run.prompt_length - 1]
    assert new.layout == run.layout and len(new.images) == 2
    for k in range(2):
        assert np.array_equal(np.asarray(Image.open(new.image_path(k))), np.asarray(Image.open(run.image_path(k))))
    e = json.loads((out / "effects.json").read_text())
    assert e["intervention"]["knockouts"] == [{"layers": [1, 2, 3], "from": "last", "to": "image:1"}]
    assert e["base"]["token_ids"] == run.meta["token_ids"][run.prompt_length:]
    tf = e["teacher_forced"]
    assert tf["base_sum"] != tf["intervened_sum"]


def test_video_forms_end_to_end(runs, tmp_path):
    run = runs["video"]
    L = run.num_layers
    for argv, kind in [(["--ablate-heads", "1:3", "--knockout", "--from", "question", "--to", "frame:2",
                         "--layers", "0-3"], "knockout"),
                       (["--knockout", "--from", "text", "--to", "box:2:24,16,48,40", "--layers", "1"], "knockout"),
                       (["--block-image-from", "2"], "block-image")]:
        out = tmp_path / kind / str(len(argv))
        iv.main(["--run", str(run.path), "--output-dir", str(out)] + argv)
        new = store.Run(out)
        m = new.meta["intervention"]
        assert kind in m["kind"] and m["pixels"] == "frames stored in the run"
        assert new.layout == run.layout and new.meta["video"]["fps"] == run.meta["video"]["fps"]
        assert new.meta["token_ids"][:new.prompt_length] == run.meta["token_ids"][:run.prompt_length]
        assert (out / "effects.json").is_file()
        ko = m["spec"]["knockouts"][0]
        if argv[-1] == "0-3":
            assert ko["keys"] == block_image_tokens(run, 2) and m["spec"]["heads"] == [[1, 3]]
        if kind == "block-image":
            assert ko["keys"] == run.layout.key_positions.tolist() and ko["layers"] == list(range(2, L))
            assert min(ko["queries"]) == run.layout.block_end


def test_sweep_over_a_frame(runs, tmp_path):
    out = tmp_path / "sweep"
    iv.main(["--run", str(runs["video"].path), "--output-dir", str(out), "--sweep", "--from", "last", "--to",
             "frame:1", "--window", "3"])
    s = json.loads((out / "sweep.json").read_text())
    assert s["to"] == "frame:1" and len(s["prob"]) == runs["video"].num_layers
    meta = json.loads((out / "meta.json").read_text())
    assert meta["intervention"]["spec"]["knockouts"][0]["keys"] == block_image_tokens(runs["video"], 1)


@pytest.mark.parametrize("name, to, message", [
    ("two", "box:0,0,100,100", "this run has 2 images: say which"),
    ("two", "frame:1", "frame:K is for video runs"),
    ("video", "image:1", "use frame:K"),
    ("video", "frame:9", "frame 9 out of range"),
])
def test_cli_refuses_bad_words_in_one_line_and_writes_nothing(runs, tmp_path, name, to, message):
    out = tmp_path / "x"
    r = subprocess.run([sys.executable, str(ROOT / "intervene.py"), "--run", str(runs[name].path), "--output-dir",
                        str(out), "--knockout", "--from", "last", "--to", to, "--layers", "1"],
                       capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "Traceback" not in r.stderr and not out.exists()


# ---------------------------------------------------------------------------------- the viewer

def test_compare_view_opens_a_several_image_intervened_run(runs, make_app, tmp_path):
    root = tmp_path / "served"
    root.mkdir()
    shutil.copytree(runs["two"].path, root / "two")
    iv.main(["--run", str(root / "two"), "--knockout", "--from", "last", "--to", "image:0", "--layers", "0-3"])
    name = "two.knockout-last-image.0-L0-3"
    assert (root / name / "effects.json").is_file()
    client = make_app(RUNS=str(root)).test_client()
    d = client.get(f"/api/compare?run={name}").get_json()
    assert d["success"] and d["base"] == "two" and d["base_error"] is None and d["effects"] is not None
    assert d["intervention"]["knockouts"] == [{"layers": [0, 1, 2, 3], "from": "last", "to": "image:0"}]
    assert "image:0" in d["intervention"]["label"]


@pytest.fixture(scope="module")
def worker():
    from viewer.jobs import Live

    w = Live({"id": str(standin.ensure("tiny")), "device": "cpu"}, threads=1)
    w.wait_ready(300)
    yield w
    w.close()


def test_live_intervene_takes_an_image_index_on_a_several_image_run(runs, worker, make_app, tmp_path):
    from test_live import HOST, post, wait

    root = tmp_path / "served"
    root.mkdir()
    shutil.copytree(runs["two-idefics3"].path, root / "two")
    client = make_app(RUNS=str(root), LIVE=worker).test_client()
    for extra, words in [({"to": "box", "box": [0, 0, 100, 100]}, "this run has 2 images: say which the box is in"),
                         ({"to": "image", "image": 2}, "image must be between 0 and 1"),
                         ({"to": "question", "image": 0}, "image goes with to image, box or outside"),
                         ({"to": "box", "box": [0, 0, 301, 100], "image": 1}, "not inside the 300x300 image")]:
        r = post(client, "/api/live/intervene", {"run": "two", "knockout": {"from": "last", "layers": [1, 2], **extra}})
        assert r.status_code == 400 and words in r.json["error"], (extra, r.json)
    r = post(client, "/api/live/intervene", {"run": "two", "knockout": {"from": "last", "to": "image", "image": 1,
                                                                       "layers": [1, 2]}})
    assert r.status_code == 200, r.json
    job = wait(worker, r.json["job"])
    assert job.status == "done", job.error
    iv_meta = store.Run(root / r.json["target"]).meta["intervention"]
    assert iv_meta["spec"]["knockouts"][0]["to"] == "image:1"
    assert iv_meta["spec"]["knockouts"][0]["keys"] == block_image_tokens(runs["two-idefics3"], 1)
    cmp = client.get(f"/api/compare?run={r.json['target']}", headers=HOST).get_json()
    assert cmp["success"] and cmp["base"] == "two" and cmp["effects"] is not None
    r = post(client, "/api/live/sweep", {"run": "two", "from": "last", "to": "box", "box": [0, 0, 150, 300],
                                         "image": 1, "window": 3})
    assert r.status_code == 200 and "box:1:0,0,150,300" in r.json["argv"]
    assert wait(worker, r.json["job"]).status == "done"
