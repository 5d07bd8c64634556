"""Rollout, relevancy and relative (smolattn.methods) on several-image and video runs, against the
independent references of test_methods.py (eager ``output_attentions=True`` + numpy, ``retain_grad``),
with the generic prompt of relative built by the processor path itself (every image block, every frame
and its timestamp text identical); the stored maps read back per image, and the heatmap CLI draws a
method map of image / frame K. Tiny stand-ins of both model types (idefics3, smolvlm), fp32."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText

from smolattn import engine, standin, store, synthetic, video
from smolattn import extract as ex
from smolattn import geometry as geo
from smolattn import heatmap as hm
from smolattn import methods as mth
from smolattn import model as mdl
from test_family import encode_mp4
from test_methods import eager_attentions

av = pytest.importorskip("av")
ROOT = Path(__file__).resolve().parent.parent
ALL = ["raw", "rollout", "relevancy", "relative"]
EDGE = 1024          # 640 x 480 and 300 x 300 -> 2 x 2 tiles + global each: short sequences
NEW = 3
SIZES = [(640, 480), (300, 300)]


@pytest.fixture(scope="module")
def smol():
    return mdl.load(str(standin.ensure("smolvlm2-tiny")), device="cpu")


def _eager(source):
    return AutoModelForImageTextToText.from_pretrained(source, dtype=torch.float32, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def cases(tiny, smol, tmp_path_factory):
    """name -> (loaded, run, prep of the same inputs, generic prep, eager model): two images on each
    model type, a 4-frame video (frame rows kept too) on the SmolVLM2 stand-in."""
    root = tmp_path_factory.mktemp("family-methods")
    paths = []
    for k, s in enumerate(SIZES):
        paths.append(root / f"im{k}.png")
        synthetic.test_image(s).save(paths[-1])
    clip = root / "clip.mp4"
    encode_mp4(clip, 16, 4)
    settings = ex.Settings(max_new_tokens=NEW, longest_edge=EDGE, methods=tuple(ALL))
    out = {}
    for name, loaded in (("two-idefics3", tiny), ("two-smolvlm", smol)):
        ex.extract_images(loaded, paths, root / name, settings)
        run = store.Run(root / name)
        images = [synthetic.test_image(s) for s in SIZES]
        prep = engine.prepare_images(loaded.processor, images, run.meta["prompt"], EDGE, "all")
        generic = engine.prepare_images(loaded.processor, images, mth.GENERIC_PROMPT, EDGE, "all")
        out[name] = (loaded, run, prep, generic, _eager(loaded.source))
    ex.extract_video(smol, clip, root / "video", ex.Settings(max_new_tokens=NEW, methods=tuple(ALL)),
                     keep_frame_rows=True)
    run = store.Run(root / "video")
    frames = video.read(clip)
    prep = engine.prepare_video(smol.processor, frames, run.meta["prompt"], "all")
    generic = engine.prepare_video(smol.processor, frames, mth.GENERIC_PROMPT, "all")
    out["video"] = (smol, run, prep, generic, out["two-smolvlm"][4])
    return out


NAMES = ["two-idefics3", "two-smolvlm", "video"]


def _inputs(prep):
    return {"pixel_values": prep.pixel_values[None], "pixel_attention_mask": prep.pixel_attention_mask[None]}


@pytest.fixture(scope="module")
def computed(cases):
    """compute() in fp32 with features from a separate vision pass (the stored maps are fp16)."""
    out = {}
    for name, (loaded, run, prep, _, _) in cases.items():
        assert prep.ids == run.meta["token_ids"][:run.prompt_length]
        out[name] = mth.compute(loaded, run.meta["token_ids"], run.prompt_length, run.geometry, run.query_positions,
                                ALL, mth.image_features(loaded, _inputs(prep)))
    return out


def test_the_runs_hold_several_images_or_frames_and_every_method(cases):
    for name, (_, run, *_rest) in cases.items():
        assert len(run.layout) == (4 if name == "video" else 2) and run.layout.is_video == (name == "video")
        assert run.methods == ["raw", "relative", "relevancy", "rollout"]
        for m in ("rollout", "relevancy", "relative"):
            assert run.meta["methods"][m]["shape"][-1] == run.layout.num_keys


@pytest.mark.parametrize("name", NAMES)
def test_rollout_equals_the_explicit_product_of_eager_matrices(cases, computed, name):
    loaded, run, prep, _, eager = cases[name]
    _, att = eager_attentions(eager, run.meta["token_ids"], _inputs(prep))
    S, keys = len(run.tokens), run.layout.key_positions
    hats = []
    for a in att:
        hat = 0.5 * a[0].double().numpy().mean(0) + 0.5 * np.eye(S)
        hats.append(hat / hat.sum(-1, keepdims=True))
    r = computed[name]["rollout"]
    assert r["maps"].shape == (len(att), len(run.query_positions), run.layout.num_keys)
    for start in range(len(att)):
        product = np.eye(S)
        for hat in hats[start:][::-1]:
            product = product @ hat
        np.testing.assert_allclose(r["maps"][start], product[run.query_positions][:, keys], rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("name", NAMES)
def test_relevancy_equals_the_rule_with_retain_grad(cases, computed, name):
    loaded, run, prep, _, eager = cases[name]
    ids = run.meta["token_ids"]
    logits, att = eager_attentions(eager, ids, _inputs(prep), grad=True)
    S, P, keys = len(ids), run.prompt_length, run.layout.key_positions
    rel = computed[name]["relevancy"]
    assert rel["positions"].tolist() == list(range(P, S))
    for i, t in enumerate(range(P, S)):
        for a in att:
            a.grad = None
        logits[0, t - 1, ids[t]].backward(retain_graph=True)
        cams = [np.clip(a.grad[0].double().numpy() * a[0].detach().double().numpy(), 0, None).mean(0) for a in att]
        for start in (0, len(att) - 1):
            R = np.eye(S)
            for cam in cams[start:]:
                R = R + cam @ R
            row = R[t - 1] - np.eye(S)[t - 1]
            row = row / row.sum() + np.eye(S)[t - 1]
            np.testing.assert_allclose(rel["maps"][start, i], row[keys], rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("name", NAMES)
def test_relative_keeps_every_image_block_and_equals_the_ratio_of_two_eager_rows(cases, computed, name):
    loaded, run, prep, generic_prep, eager = cases[name]
    ids, P, layout = run.meta["token_ids"], run.prompt_length, run.layout
    generic = generic_prep.ids
    # the processor's own generic prompt: same image blocks (and, for a video, the same frame text)
    assert mth.prompt_ids(loaded, ids, run.geometry, mth.GENERIC_PROMPT) == generic
    assert generic_prep.layout == layout
    for first, last in layout.blocks:
        assert generic[first:last + 1] == ids[first:last + 1]
    assert generic[:layout.block_end] == ids[:layout.block_end] and generic[layout.block_end:] != ids[layout.block_end:P]
    Pg = len(generic)
    _, num = eager_attentions(eager, ids, _inputs(prep))
    _, den = eager_attentions(eager, generic + ids[P:], _inputs(generic_prep))
    rel, keys = computed[name]["relative"], layout.key_positions
    eps = rel["meta"]["params"]["eps"]
    assert rel["positions"].tolist() == [p for p in run.query_positions if p > layout.blocks[-1][1]]
    if name == "video":      # the frames' own text rows are kept in this run, but precede the last frame
        assert any(p < layout.blocks[-1][0] for p in run.query_positions)
    for i, p in enumerate(rel["positions"]):
        d = p - P + Pg if p >= P - 1 else Pg - 1
        for layer in range(len(num)):
            expect = num[layer][0, :, p, keys].mean(0) / (den[layer][0, :, d, keys].mean(0) + eps)
            np.testing.assert_allclose(rel["maps"][layer, i], expect.numpy(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_stored_maps_read_back_whole_and_per_image(cases, computed, name):
    _, run, *_ = cases[name]
    for m in ("rollout", "relevancy", "relative"):
        stored, c = run.method(m), computed[name][m]
        tol = 1e-3 if run.meta["methods"][m]["dtype"] == "float16" else 1e-5
        np.testing.assert_array_equal(stored.positions, c["positions"])
        np.testing.assert_allclose(stored.maps, c["maps"], rtol=tol, atol=1e-6)
        for k in range(len(run.layout)):
            view = run.image_view(k)
            assert view.methods == run.methods
            np.testing.assert_array_equal(view.method(m).maps, stored.maps[..., run.layout.keys_of(k)])
            assert view.method(m).maps.shape[-1] == run.layout.images[k].num_keys


def _heatmap(*args):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, str(ROOT / "compute_token_heatmap.py"), *map(str, args)],
                          capture_output=True, text=True, env=env, cwd=ROOT)


def test_heatmap_cli_draws_a_method_map_of_image_or_frame_k(cases, tmp_path):
    for name, flag, k in (("two-smolvlm", "--image-index", 1), ("video", "--frame", 2)):
        run = cases[name][1]
        pos = len(run.tokens) - 1
        for method in ("rollout", "relevancy", "relative"):
            out = tmp_path / f"{name}-{method}.png"
            r = _heatmap("--run", run.path, flag, k, "--index", pos, "--method", method, "--output", out,
                         "--overlay", tmp_path / f"{name}-{method}-ov.png", "--json")
            assert r.returncode == 0, r.stderr
            data = json.loads(out.with_suffix(".json").read_text())
            m = run.method(method)
            i = m.index(pos)
            own = m.maps[..., run.layout.keys_of(k)]       # image k's keys of the whole run's maps
            expect = own[:, i].mean(0) if method == "relative" else own[0, i]    # all layers / start layer 0
            np.testing.assert_allclose(hm.method_map(run.image_view(k), method, pos), expect, rtol=1e-6)
            tiles, glob = run.layout.images[k].split(expect)
            np.testing.assert_allclose(np.array(data["global_grid"]), glob, rtol=1e-5, atol=1e-8)
            assert data["method"] == method and (data["grid"] is None) == (tiles is None)
            if tiles is not None:
                np.testing.assert_allclose(np.array(data["grid"]), tiles, rtol=1e-5, atol=1e-8)
            with Image.open(tmp_path / f"{name}-{method}-ov.png") as im:
                assert im.size == run.image_size(k)


def test_a_batch_mixing_a_video_two_images_and_one_image_gives_each_its_own_maps(smol, tmp_path):
    """extract.step on one batch: each prompt's methods on its own slice of the batch's image features
    equal that prompt alone."""
    clip = tmp_path / "clip.mp4"
    encode_mp4(clip, 8, 4)
    preps = [engine.prepare_video(smol.processor, video.read(clip), "What happens?"),
             engine.prepare_images(smol.processor, [synthetic.test_image(s) for s in SIZES], "Compare.", EDGE),
             engine.prepare(smol.processor, synthetic.test_image((800, 200)), "One.", EDGE)]
    settings = ex.Settings(max_new_tokens=2, methods=tuple(ALL))
    batched = ex.step(smol, settings, preps)
    for p, b in zip(preps, batched):
        a = ex.step(smol, settings, [p])[0]
        assert a.new == b.new and set(b.methods) == {"rollout", "relevancy", "relative"}
        for m in b.methods:
            assert b.methods[m]["maps"].shape[-1] == p.layout.num_keys
            np.testing.assert_array_equal(a.methods[m]["positions"], b.methods[m]["positions"])
            np.testing.assert_allclose(a.methods[m]["maps"], b.methods[m]["maps"], rtol=2e-3, atol=1e-6)


def test_batch_video_dir_with_methods(smol, tmp_path):
    import extract_smolvlm_batch as cli
    from smolattn.errors import run_cli

    clips = tmp_path / "clips"
    clips.mkdir()
    encode_mp4(clips / "a.mp4", 16, 4)         # 4 s: 4 frames at fps 1, at most 3
    with pytest.raises(SystemExit) as e:
        run_cli(cli.main, ["--video-dir", str(clips), "--output-root", str(tmp_path / "out"), "--model-id",
                           smol.source, "--device", "cpu", "--max-new-tokens", "2", "--max-frames", "3",
                           "--methods", "raw,rollout,relative"])
    assert e.value.code == 0
    run = store.Run(tmp_path / "out" / "a")
    assert run.layout.is_video and len(run.layout) == 3 and run.methods == ["raw", "relative", "rollout"]
    assert run.method("rollout").maps.shape == (run.num_layers, len(run.query_positions), run.layout.num_keys)



def test_methods_that_cannot_fit_in_memory_are_refused_before_generation(smol, tmp_path, monkeypatch):
    """Relevancy holds every layer's (H, S, S) probabilities and their gradients: on a long video that is
    tens of GB. Where it would not fit, the extraction says so in one line before it generates, and
    writes nothing."""
    clip = tmp_path / "clip.mp4"
    encode_mp4(clip, 8, 2)
    cfg = smol.model.config.text_config
    monkeypatch.setattr(mth, "CHECK_ABOVE", 0)
    monkeypatch.setattr(mth, "free_bytes", lambda device: 2 * cfg.num_hidden_layers * cfg.num_attention_heads * 100)
    generated = []
    monkeypatch.setattr(engine, "run", lambda *a, **k: generated.append(1) or (_ for _ in ()).throw(AssertionError))
    with pytest.raises(ex.UserError, match=r"--methods relevancy on this prompt \(.* tokens, 4 layers x 4 heads\) "
                                           r"needs about [0-9.]+ MiB and 0.0 MiB are free: use fewer frames \(--max-frames\)"):
        ex.extract_video(smol, clip, tmp_path / "out", ex.Settings(max_new_tokens=2, methods=("raw", "relevancy")))
    assert not generated and not (tmp_path / "out").exists()
    S = 1000
    assert mth.needed_bytes(["raw", "relevancy"], S, 30, 9) == 2 * 30 * 9 * S * S * 4
    assert mth.needed_bytes(["raw", "rollout"], S, 30, 9) == 30 * S * S * 4
    assert mth.needed_bytes(["raw", "relative"], S, 30, 9) == 0


def test_in_a_batch_only_the_image_that_cannot_fit_is_refused(smol, tmp_path, monkeypatch):
    """The memory check is per image: in a batch of a small and a large image, the large one gets the
    one-line error and the small one its run with the methods."""
    small, large = tmp_path / "small.png", tmp_path / "large.png"
    synthetic.test_image((1024, 256)).save(small)      # at 2048 px: 4 x 1 tiles (~390 tokens)
    synthetic.test_image((64, 64)).save(large)         # at 2048 px: 4 x 4 tiles (~1,150 tokens)
    cfg = smol.model.config.text_config
    per = 2 * cfg.num_hidden_layers * cfg.num_attention_heads * 4          # relevancy: bytes per S^2
    monkeypatch.setattr(mth, "CHECK_ABOVE", 0)
    monkeypatch.setattr(mth, "free_bytes", lambda device: per * 600 ** 2)  # the small prompt fits, the large not
    done, errors = {}, {}
    ex.extract_many(smol, [(small, tmp_path / "a", "a"), (large, tmp_path / "b", "b")],
                    ex.Settings(max_new_tokens=2, methods=("raw", "relevancy")), lambda tag, s: done.update({tag: s}),
                    batch_size=2, workers=0, on_error=lambda tag, e: errors.update({tag: str(e)}) or {})
    assert sorted(done) == ["a", "b"] and list(errors) == ["b"], errors
    assert errors["b"].startswith("--methods relevancy on this prompt (") and "\n" not in errors["b"]
    assert store.Run(tmp_path / "a").methods == ["raw", "relevancy"] and not (tmp_path / "b").exists()
