"""The SmolVLM family: SmolVLM2 stand-ins (model_type smolvlm), several images in one prompt, video.

Token ids, image / frame blocks, frame sampling and the video text are checked against transformers'
own code: ``SmolVLMProcessor``'s prompt functions and ``replace_video_token``, the video module's
``sample_frames`` and ``read_video_pyav`` (imported from their files: the video processor class needs
torchvision, which is missing here), and ``SmolVLMImageProcessorPil``. The real ``SmolVLMProcessor`` is
compared against its record (tests/data/smolvlm2_processor.json, made by
scripts/record_smolvlm_processor.py where it builds), and live where torchvision imports. MP4s are
encoded here with PyAV.
"""
import importlib.util
import json
import os
import subprocess
import sys
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from smolattn import engine, standin, store, synthetic, video
from smolattn.synthetic import encode_mp4
from smolattn import extract as ex
from smolattn import geometry as geo
from smolattn import model as mdl

av = pytest.importorskip("av")
ROOT = Path(__file__).resolve().parent.parent
NEW = 4


# ------------------------------------------------------------------------------- helpers

def real_video_module():
    """transformers' video_processing_smolvlm, loaded from its file: the package's lazy module hands
    out a dummy class without torchvision, but sample_frames and the constants need none."""
    import transformers.models.smolvlm as pkg

    name = "transformers.models.smolvlm._video_processing_smolvlm_for_tests"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, os.path.join(os.path.dirname(pkg.__file__),
                                                                         "video_processing_smolvlm.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def image_prompt(processor, images, prompt):
    """The text SmolVLMProcessor tokenises for images + prompt: each <image> replaced, in order, by
    transformers' get_image_prompt_string with the rows/cols SmolVLM's image processor reports."""
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil
    from transformers.models.smolvlm.processing_smolvlm import get_image_prompt_string

    ip = SmolVLMImageProcessorPil(**processor.image_processor.to_dict())
    out = ip(images=[images], return_row_col_info=True, return_tensors="pt")
    text = mdl.chat_text(processor, prompt, len(images))
    parts = text.split("<image>")
    assert len(parts) == len(images) + 1
    expanded = parts[0]
    for k, part in enumerate(parts[1:]):
        expanded += get_image_prompt_string(out["rows"][0][k], out["cols"][0][k], processor.image_seq_len,
                                            "<fake_token_around_image>", "<image>", "<global-img>") + part
    return expanded, out


def real_video_text(processor, frames: video.Frames):
    """SmolVLMProcessor.replace_video_token's text for these frames (its own method and metadata)."""
    from transformers.models.smolvlm import processing_smolvlm
    from transformers.video_utils import VideoMetadata

    if processing_smolvlm.num2words is None:
        pytest.skip("num2words is not installed (requirements.txt): transformers' video text needs it")
    md = VideoMetadata(total_num_frames=frames.total_frames, fps=frames.fps, duration=frames.duration,
                       frames_indices=list(frames.indices))
    me = SimpleNamespace(image_seq_len=processor.image_seq_len, image_token="<image>",
                         fake_image_token="<fake_token_around_image>", global_image_token="<global-img>")
    inputs = {"pixel_values": torch.zeros(1, len(frames.indices), 1, 1, 1), "video_metadata": [md]}
    return processing_smolvlm.SmolVLMProcessor.replace_video_token(me, inputs, 0)


@pytest.fixture(scope="module")
def smol():
    return mdl.load(str(standin.ensure("smolvlm2-tiny")), device="cpu")


@pytest.fixture(scope="module")
def smol22():
    return mdl.load(str(standin.ensure("smolvlm2-tiny-2.2b-geometry")), device="cpu")


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("clips")
    out = {}
    # 4 s at 4 fps -> 4 frames at fps 1 (source frames 0, 5, 10, 15); frame 3 (source 15) carries a box
    out[4] = (root / "four.mp4", encode_mp4(root / "four.mp4", 16, 4, mark=(15, (24, 16, 24, 24))))
    # 16 s at 2 fps -> 16 frames
    out[16] = (root / "sixteen.mp4", encode_mp4(root / "sixteen.mp4", 32, 2))
    return out


# ------------------------------------------------------------------------------- stand-ins and loading

def test_smolvlm2_standin_loads_through_the_fallback_processor(smol):
    from transformers import AutoProcessor

    src = Path(smol.source)
    assert json.loads((src / "config.json").read_text())["model_type"] == "smolvlm"
    assert type(smol.model).__name__ == "SmolVLMForConditionalGeneration"
    assert json.loads((src / "processor_config.json").read_text())["processor_class"] == "SmolVLMProcessor"
    if importlib.util.find_spec("torchvision") is None:
        with pytest.raises(Exception):        # what a real SmolVLM2 checkpoint does here
            AutoProcessor.from_pretrained(src)
        assert type(smol.processor).__name__ == "Idefics3Processor"
    assert type(smol.processor.image_processor).__name__.startswith("SmolVLMImageProcessor")
    assert smol.processor.image_seq_len == 64
    assert video.settings(smol.processor) == {"fps": 1, "max_frames": 64, "longest_edge": 2048, "side": 512,
                                              "resample": 1}
    assert smol.standin["standin"] is True and smol.standin["model_type"] == "smolvlm"


def test_smolvlm2_real_shapes_and_geometry():
    from transformers import SmolVLMForConditionalGeneration

    facts = {"smolvlm2-256m": (30, 9, 576, 3), "smolvlm2-500m": (32, 15, 960, 5)}
    for shape, (layers, heads, width, kv) in facts.items():
        cfg = standin.build_config(shape, standin.REAL_BASE_VOCAB + len(standin.VLM_SPECIALS), 49190)
        t, v = cfg.text_config, cfg.vision_config
        assert cfg.model_type == "smolvlm" and (t.num_hidden_layers, t.num_attention_heads, t.hidden_size,
                                                 t.num_key_value_heads) == (layers, heads, width, kv)
        assert (v.hidden_size, v.num_hidden_layers, v.num_attention_heads, v.image_size, v.patch_size) == \
            (768, 12, 12, 512, 16)
        assert cfg.scale_factor == 4 and (v.image_size // v.patch_size) ** 2 // cfg.scale_factor ** 2 == 64
        assert t.vocab_size == 49280 and not cfg.tie_word_embeddings
    with torch.device("meta"):
        n = sum(p.numel() for p in SmolVLMForConditionalGeneration(
            standin.build_config("smolvlm2-256m", 49280, 49190)).parameters())
    assert n == 256_484_928      # SmolVLM(2)-256M: the same tower and text model as v1's checked count
    tiny22 = standin.build_config("smolvlm2-tiny-2.2b-geometry", 700, 611)
    assert (tiny22.vision_config.image_size // tiny22.vision_config.patch_size) ** 2 // tiny22.scale_factor ** 2 == 81


def test_video_needs_a_smolvlm2_model(tiny, tmp_path):
    clip = tmp_path / "c.mp4"
    encode_mp4(clip, 4, 4)
    with pytest.raises(ex.UserError, match="no video support"):
        ex.extract_video(tiny, clip, tmp_path / "run", ex.Settings(max_new_tokens=2))
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------- several images

CASES = [[(640, 480)], [(300, 300), (2048, 512)], [(640, 480), (480, 640), (120, 90)], [(100, 700), (1024, 768)]]


@pytest.mark.parametrize("sizes", CASES, ids=lambda s: "+".join(f"{w}x{h}" for w, h in s))
def test_image_tokens_and_blocks_equal_transformers(smol, sizes):
    images = [synthetic.test_image(s) for s in sizes]
    prep = engine.prepare_images(smol.processor, images, "Compare these.")
    expanded, ref = image_prompt(smol.processor, images, "Compare these.")
    assert prep.ids == smol.processor.tokenizer(expanded)["input_ids"]
    np.testing.assert_array_equal(prep.pixel_values.numpy(), ref["pixel_values"][0].numpy())
    layout = prep.layout
    assert len(layout) == len(sizes) and layout.kinds == ("image",) * len(sizes)
    tokens = smol.processor.tokenizer.convert_ids_to_tokens(prep.ids)
    for k, g in enumerate(layout.images):
        assert (g.rows, g.cols) == (ref["rows"][0][k], ref["cols"][0][k]) == geo.expected_grid(*sizes[k])
        first, last = g.image_block
        assert tokens[first] == tokens[last] == "<fake_token_around_image>"
        assert all(tokens[p] == "<image>" for p in g.key_positions)
        assert layout.image_of_position(g.global_start) == k
    assert layout.num_keys == tokens.count("<image>")
    assert sorted(layout.key_positions.tolist()) == [i for i, t in enumerate(tokens) if t == "<image>"]
    # rows outside every image block, and only those
    blocks = layout.blocks
    assert prep.rows.tolist() == [i for i in range(len(tokens)) if not any(a <= i <= b for a, b in blocks)]


def test_image_tokens_2b_geometry(smol22):
    sizes = [(640, 480), (300, 300)]
    images = [synthetic.test_image(s) for s in sizes]
    prep = engine.prepare_images(smol22.processor, images, "Two.")
    expanded, ref = image_prompt(smol22.processor, images, "Two.")
    assert prep.ids == smol22.processor.tokenizer(expanded)["input_ids"]
    assert [g.side for g in prep.layout.images] == [9, 9]
    assert [(g.rows, g.cols) for g in prep.layout.images] == [geo.expected_grid(*s, 1536, 384) for s in sizes]


def test_marked_region_in_image_2_maps_to_its_cells(smol):
    """Image 2 (index 1) of three has a white box on black; the model's input pixels of exactly the
    cells keys_in_box names are white, in the tiles and in the global tile."""
    size, box = (1024, 768), (128, 96, 256, 192)      # on both grids: tiles 32 px, global 128 x 96 px cells
    marked = np.zeros((size[1], size[0], 3), np.uint8)
    marked[box[1]:box[1] + box[3], box[0]:box[0] + box[2]] = 255
    images = [synthetic.test_image((640, 480)), Image.fromarray(marked), synthetic.test_image((300, 300))]
    prep = engine.prepare_images(smol.processor, images, "Where is the box?")
    layout, pv = prep.layout, prep.pixel_values.numpy()
    tiles_before = sum(g.rows * g.cols + 1 for g in layout.images[:1])
    g = layout.images[1]
    side, cell = g.side, pv.shape[-1] // g.side
    # brightness of every key of image 2, in the stored key order (tiles row-major, then global)
    bright = []
    for t in range(g.rows * g.cols + 1):
        tile = pv[tiles_before + t].mean(axis=0)                    # normalised: -1 black .. 1 white
        bright += [tile[i * cell:(i + 1) * cell, j * cell:(j + 1) * cell].mean() for i in range(side)
                   for j in range(side)]
    white = np.flatnonzero(np.asarray(bright) > 0) + layout.key_offsets[1]
    expected = layout.keys_in_box(1, box, size)
    assert len(expected) == (256 // 32) * (192 // 32) + 2 * 2       # tile cells + global cells
    np.testing.assert_array_equal(white, expected)
    # and back: every such key's pixel box lies inside the marked box, in image 2's own pixels
    for key in expected:
        x0, y0, x1, y1 = layout.pixel_box(int(layout.key_positions[key]), [im.size for im in images])
        assert box[0] <= x0 < x1 <= box[0] + box[2] and box[1] <= y0 < y1 <= box[1] + box[3]
        assert layout.locate(int(layout.key_positions[key]))[0] == 1


# ------------------------------------------------------------------------------- video

def test_number_words_match_num2words():
    num2words = pytest.importorskip("num2words").num2words
    for n in list(range(0, 1000)) + [1000, 1001, 1100, 2345, 64_000]:
        assert video.number_words(n) == num2words(n)


def test_sampling_rule_equals_sample_frames():
    from transformers.video_utils import VideoMetadata

    real = real_video_module().SmolVLMVideoProcessor.sample_frames
    me = SimpleNamespace(num_frames=64, fps=1)
    for total, rate in [(16, 4.0), (32, 2.0), (7, 30.0), (300, 30.0), (3000, 29.97), (9000, 25.0), (1, 1.0),
                        (250, 24.0), (4000, 60.0)]:
        for fps, max_frames in [(1, 64), (2, 16), (0.5, 8), (4, 100)]:
            md = VideoMetadata(total_num_frames=total, fps=rate, duration=total / rate)
            want = real(me, md, num_frames=max_frames, fps=fps)
            np.testing.assert_array_equal(video.sample_indices(total, rate, total / rate, fps, max_frames), want)


@pytest.mark.parametrize("n", [4, 16])
def test_video_frames_text_and_ids_equal_transformers(smol, clips, n):
    from transformers.video_utils import read_video_pyav

    path, src = clips[n]
    frames = video.read(path)
    assert len(frames.images) == n
    # decoding and sampling: transformers' own PyAV reader with its own sample_frames
    me = SimpleNamespace(num_frames=64, fps=1)
    ref, md = read_video_pyav(str(path), partial(real_video_module().SmolVLMVideoProcessor.sample_frames, me,
                                                 num_frames=64, fps=1))
    assert list(md.frames_indices) == frames.indices and md.timestamps == frames.timestamps
    assert md.duration == frames.duration and md.total_num_frames == frames.total_frames
    np.testing.assert_array_equal(np.stack([np.asarray(im) for im in frames.images]), ref)
    # the frames the model saw are the frames encoded, within the codec's error (stated: mean <= 3 levels)
    for im, i in zip(frames.images, frames.indices):
        assert np.abs(np.asarray(im, np.int16) - src[i].astype(np.int16)).mean() <= 3
    # the text: SmolVLMProcessor.replace_video_token, inside its own video chat template
    prep = engine.prepare_video(smol.processor, frames, "What happens?")
    text = video.chat_text(smol.processor, "What happens?").replace("<video>", real_video_text(smol.processor, frames))
    assert prep.ids == smol.processor.tokenizer(text)["input_ids"]
    assert text.startswith(f"<|im_start|>User: You are provided the following series of "
                           f"{['four', 'sixteen'][n == 16]} frames from a 0:00:{4 if n == 4 else 16:02d} [H:MM:SS] video.\n")
    layout = prep.layout
    assert len(layout) == n and layout.is_video and layout.timestamps == tuple(frames.timestamps)
    tokens = smol.processor.tokenizer.convert_ids_to_tokens(prep.ids)
    for g in layout.images:
        assert (g.rows, g.cols, g.side) == (0, 0, 8)
        assert tokens[g.image_block[0] + 1] == "<global-img>"
    assert layout.num_keys == 64 * n
    # pixels: (frames, 3, 512, 512); each frame squashed to the square (an independent antialiased
    # bicubic resize of the decoded frame agrees within 0.03 mean, normalised units)
    assert tuple(prep.pixel_values.shape) == (n, 3, 512, 512)
    a = torch.from_numpy(np.stack([np.asarray(im) for im in frames.images])).permute(0, 3, 1, 2).float() / 255
    other = torch.nn.functional.interpolate(a, size=(512, 512), mode="bicubic", antialias=True) * 2 - 1
    assert (prep.pixel_values - other).abs().mean() < 0.03
    # default rows: after the last frame only (the prompt, the last prompt position); none of a frame's text
    assert prep.rows.tolist() == list(range(layout.image_block[1] + 1, len(prep.ids)))
    with_frames = engine.prepare_video(smol.processor, frames, "What happens?", keep_frame_rows=True)
    between = set(with_frames.rows.tolist()) - set(prep.rows.tolist())
    assert len(between) > 11 * (n - 1) and not between & set(layout.key_positions.tolist())


def test_marked_region_in_frame_3_maps_to_its_cells(smol, clips):
    path, _ = clips[4]
    frames = video.read(path)
    assert frames.indices == [0, 5, 10, 15]     # the marked source frame 15 is frame 3
    prep = engine.prepare_video(smol.processor, frames, "Where?")
    layout, pv = prep.layout, prep.pixel_values.numpy()
    box, size = (24, 16, 24, 24), frames.size      # 96 x 64 frame: 12 x 8 px cells (8 x 8 global grid)
    expected = layout.keys_in_box(3, box, size)
    cell = 512 // 8
    frame = pv[3].mean(axis=0)
    bright = np.array([frame[i * cell:(i + 1) * cell, j * cell:(j + 1) * cell].mean() for i in range(8)
                       for j in range(8)])
    np.testing.assert_array_equal(np.flatnonzero(bright > 0.3) + layout.key_offsets[3], expected)
    assert len(expected) == 2 * 3
    for k in (0, 1, 2):       # the other frames have no box
        assert layout.keys_in_box(k, box, size).size and pv[k].mean(axis=0).max() < 0.3


# ------------------------------------------------------------------------------- capture == eager, batch == single

@pytest.fixture(scope="module")
def family_runs(smol, clips, tmp_path_factory):
    root = tmp_path_factory.mktemp("family")
    paths = []
    for k, s in enumerate([(640, 480), (300, 300)]):
        paths.append(root / f"im{k}.png")
        synthetic.test_image(s).save(paths[-1])
    settings = ex.Settings(max_new_tokens=NEW)
    ex.extract_images(smol, paths, root / "two", settings)
    ex.extract_video(smol, clips[4][0], root / "video", settings)
    return {"two": store.Run(root / "two"), "video": store.Run(root / "video"), "paths": paths}


def eager_rows(smol, run, pixel_values, mask):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(smol.source, dtype=torch.float32, attn_implementation="eager")
    ids = torch.tensor([run.meta["token_ids"]])
    with torch.no_grad():
        o = model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixel_values[None],
                  pixel_attention_mask=mask[None], output_attentions=True)
    assert o.attentions and o.attentions[0] is not None
    return [a[0].numpy() for a in o.attentions]


def assert_rows_equal_eager(run, eager):
    assert len(eager) == run.num_layers
    for i in range(run.num_layers):
        layer = run.layer(i)
        for row, pos in enumerate(run.query_positions):
            np.testing.assert_allclose(run.full_row(layer, row), eager[i][:, pos], atol=2e-6, rtol=2e-3)


def test_capture_equals_eager_on_two_images(smol, family_runs):
    run = family_runs["two"]
    images = [Image.open(run.image_path(k)).convert("RGB") for k in range(2)]
    prep = engine.prepare_images(smol.processor, images, run.meta["prompt"])
    assert prep.ids == run.meta["token_ids"][:run.prompt_length]
    assert_rows_equal_eager(run, eager_rows(smol, run, prep.pixel_values, prep.pixel_attention_mask))


def test_capture_equals_eager_on_a_video(smol, clips, family_runs):
    run = family_runs["video"]
    prep = engine.prepare_video(smol.processor, video.read(clips[4][0]), run.meta["prompt"])
    assert prep.ids == run.meta["token_ids"][:run.prompt_length]
    assert_rows_equal_eager(run, eager_rows(smol, run, prep.pixel_values, prep.pixel_attention_mask))


def test_batched_video_and_images_equal_single(smol, clips):
    preps = [engine.prepare_video(smol.processor, video.read(clips[4][0]), "What happens?"),
             engine.prepare_images(smol.processor, [synthetic.test_image((640, 480)), synthetic.test_image((120, 90))],
                                   "Compare."),
             engine.prepare(smol.processor, synthetic.test_image((800, 200)), "One.")]
    alone = [engine.run(smol, [p], NEW)[0] for p in preps]
    batched = engine.run(smol, preps, NEW)
    for p, a, b in zip(preps, alone, batched):
        assert a.new == b.new and a.layers.shape == b.layers.shape
        assert b.layers.shape[2:] == (len(p.rows) + len(b.new), len(p.ids) + len(b.new))
        np.testing.assert_allclose(a.layers.astype(np.float32), b.layers.astype(np.float32), atol=1e-5, rtol=1e-3)


# ------------------------------------------------------------------------------- the run format

def test_multi_image_and_video_runs_store_their_images(family_runs):
    two, vid = family_runs["two"], family_runs["video"]
    assert two.meta["format_version"] == store.FORMAT_VERSION == 3
    assert [e["kind"] for e in two.images] == ["image", "image"] and len(two.layout) == 2
    assert [tuple(e["tiles"][k] for k in ("rows", "cols")) for e in two.images] == [(3, 4), (4, 4)]
    for k, p in enumerate(family_runs["paths"]):
        np.testing.assert_array_equal(np.asarray(Image.open(two.image_path(k))), np.asarray(Image.open(p)))
        assert two.image_size(k) == Image.open(p).size
    assert vid.layout.is_video and len(vid.images) == 4
    assert [e["timestamp"] for e in vid.images] == [0.0, 1.25, 2.5, 3.75] == list(vid.layout.timestamps)
    assert vid.meta["video"]["fps"] == 4.0 and vid.meta["video"]["total_frames"] == 16
    with Image.open(vid.image_path(3)) as im:
        assert im.format == "JPEG" and im.size == (96, 64)
    # the default rows of a video: the prompt after the frames and every answer token, last included
    last = vid.layout.image_block[1]
    assert vid.query_positions.tolist() == list(range(last + 1, len(vid.tokens)))
    # per-frame attention mass of a row, and the geometry round trip
    layer = vid.layer(0)
    mass = vid.layout.mass(layer.image[:, -1])
    assert mass.shape == (vid.num_heads, 4) and np.allclose(mass.sum(-1), layer.image[:, -1].sum(-1))
    assert geo.Layout.from_json(vid.layout.to_json()) == vid.layout
    assert store.incomplete(vid.path) is None and store.owned_run(vid.path)
    with pytest.raises(ValueError, match="say which one"):
        two.geometry.split(np.zeros(two.layout.num_keys))
    tiles, glob = two.layout.split(np.arange(two.layout.num_keys), 1)
    assert tiles.shape == (32, 32) and glob.min() == two.layout.key_offsets[1] + 16 * 64


def test_older_runs_still_open(make_run, tmp_path):
    run = make_run("v2")
    meta = json.loads((run / "meta.json").read_text())
    for version in (1, 2):
        meta["format_version"] = version
        (run / "meta.json").write_text(json.dumps(meta))
        r = store.Run(run)
        assert len(r.layout) == 1 and r.layout.images[0] == r.geometry and r.geometry.rows == 3
        assert r.images[0]["kind"] == "image" and r.image_path(0) == r.image_path() and r.image_size(0) == (640, 480)
        assert r.layout.num_keys == r.geometry.num_keys and r.layout.split(np.zeros(r.geometry.num_keys))[0].shape == (24, 32)
    ref = make_run("ref", reference=True)
    r = store.Run(ref, allow_pickle=True)
    assert len(r.layout) == 1 and r.layout.images[0] == r.geometry


# ------------------------------------------------------------------------------- the script

def _script(*args):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, str(ROOT / "extract_smolvlm_attn.py"), *map(str, args)],
                          capture_output=True, text=True, env=env, cwd=ROOT)


def test_script_two_images_and_a_video(smol, clips, tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "b.jpg"
    synthetic.test_image((640, 480)).save(a)
    synthetic.test_image((200, 300)).save(b, quality=95)
    r = _script("--image", a, "--image", b, "--model-id", smol.source, "--output-dir", tmp_path / "two",
                "--max-new-tokens", 2)
    assert r.returncode == 0, r.stderr
    assert "2 images" in r.stdout and "STAND-IN" in r.stdout
    run = store.Run(tmp_path / "two")
    assert [Path(e["file"]).suffix for e in run.images] == [".png", ".jpg"]
    r = _script("--video", clips[16][0], "--max-frames", 5, "--fps", 2, "--model-id", smol.source,
                "--output-dir", tmp_path / "vid", "--max-new-tokens", 2, "--keep-frame-rows")
    assert r.returncode == 0, r.stderr
    run = store.Run(tmp_path / "vid")
    assert len(run.layout) == 5 and "5 frames" in r.stdout and run.meta["video"]["max_frames"] == 5
    assert run.query_positions[0] < run.layout.images[0].image_block[0]      # --keep-frame-rows: the intro too


@pytest.mark.parametrize("args,message", [
    (["--video", "missing.mp4"], "video not found"),
    (["--video", "NOTVIDEO"], "not a video PyAV can read"),
    (["--image", "IMG", "--fps", "2"], "--fps, --max-frames and --keep-frame-rows are for --video"),
    (["--video", "CLIP", "--fps", "0"], "--fps must be positive"),
])
def test_script_refuses_bad_video_input_in_one_line(clips, tmp_path, args, message):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video at all")
    img = tmp_path / "i.png"
    synthetic.test_image((64, 64)).save(img)
    subst = {"NOTVIDEO": bad, "IMG": img, "CLIP": clips[4][0], "missing.mp4": tmp_path / "missing.mp4"}
    r = _script(*[subst.get(a, a) for a in args], "--output-dir", tmp_path / "out")
    assert r.returncode != 0 and message in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def recorder():
    """scripts/record_smolvlm_processor.py as a module: the cases and the code both sides run."""
    name = "record_smolvlm_processor"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
        sys.modules[name] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return sys.modules[name]


IMAGE_TOL, FRAME_TOL = 0.005, 0.03   # max |diff| of 3x4x4 block means (normalised pixels, range -1..1)


@pytest.mark.parametrize("shape", ["smolvlm2-tiny", "smolvlm2-tiny-2.2b-geometry"])
def test_fallback_processor_equals_the_recorded_smolvlm_processor(shape, tmp_path):
    """What transformers' own SmolVLMProcessor gave (recorded by scripts/record_smolvlm_processor.py
    where it builds) for 1-3 images of several sizes and videos of 4 and 16 frames: our fallback path
    gives the same input_ids, the same pixel_values shape, and its tiles / frames within a stated
    tolerance (frames: PyAV's decoding may differ by a few levels between its versions)."""
    rec = recorder()
    record = json.loads((ROOT / "tests" / "data" / "smolvlm2_processor.json").read_text())
    assert record["format"] == rec.FORMAT and record["image_cases"] == json.loads(json.dumps(rec.IMAGE_CASES))
    entry = record["shapes"][shape]
    ours = mdl.fallback_processor(standin.ensure(shape))
    assert type(ours).__name__ == "Idefics3Processor"
    assert rec.vocab_fingerprint(ours.tokenizer) == entry["vocab"], \
        "the stand-in's tokenizer is not the one recorded: run scripts/record_smolvlm_processor.py again"
    assert sorted(entry["cases"]) == sorted([f"images:{n}" for n in rec.IMAGE_CASES] + [f"video:{n}" for n in rec.VIDEO_CASES])
    for case, want in entry["cases"].items():
        kind, name = case.split(":")
        if kind == "images":
            ids, px = rec.ours_images(ours, rec.IMAGE_CASES[name])
        else:
            ids, px = rec.ours_video(ours, rec.clip(tmp_path, name))
        assert ids == rec.expand(want["input_ids"]), case
        assert list(px.shape) == want["pixel_shape"], case
        diff = np.abs(rec.pooled(px) - np.array(want["pooled"])).max()
        assert diff <= (IMAGE_TOL if kind == "images" else FRAME_TOL), (case, diff)
    assert "video:sixteen" in entry["cases"] and entry["cases"]["video:sixteen"]["pixel_shape"][0] == 16


def _real_processor_builds() -> bool:
    try:
        from transformers import AutoProcessor
        return type(AutoProcessor.from_pretrained(standin.ensure("smolvlm2-tiny"))).__name__ == "SmolVLMProcessor"
    except Exception:   # noqa: BLE001 - torchvision missing, or a broken torchvision
        return False


def test_real_smolvlm_processor_gives_the_same_ids(tmp_path):
    """Where transformers' own SmolVLMProcessor builds (torchvision imports: a GPU machine), it and
    our fallback give the same ids, live, for every recorded case."""
    if not _real_processor_builds():
        pytest.skip("the real SmolVLMProcessor needs a working torchvision (compared above against its record)")
    from transformers import AutoProcessor

    rec = recorder()
    for shape in rec.SHAPES:
        src = standin.ensure(shape)
        real, ours = AutoProcessor.from_pretrained(src), mdl.fallback_processor(src)
        for name, sizes in rec.IMAGE_CASES.items():
            assert rec.real_images(real, sizes)[0] == rec.ours_images(ours, sizes)[0], name
        for name in rec.VIDEO_CASES:
            path = rec.clip(tmp_path, name)
            assert rec.real_video(real, path)[0] == rec.ours_video(ours, path)[0], name


# ------------------------------------------------------------------------------- one image of several

def test_image_view_reads_one_image_as_a_one_image_run(family_runs):
    for name in ("two", "video"):
        run = family_runs[name]
        for k in range(len(run.layout)):
            view = run.image_view(k)
            assert view.geometry == run.layout.images[k] and view.image_path() == run.image_path(k)
            for i in range(run.num_layers):
                a, b = run.layer(i), view.layer(i)
                np.testing.assert_array_equal(b.image, a.image[..., run.layout.keys_of(k)])
                assert b.image.shape[-1] + b.text.shape[-1] == a.image.shape[-1] + a.text.shape[-1]
                for row in (0, len(run.query_positions) - 1):
                    np.testing.assert_array_equal(view.full_row(b, row), run.full_row(a, row))
    with pytest.raises(ex.UserError, match="out of range"):
        family_runs["two"].image_view(2)


def _heatmap(*args):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, str(ROOT / "compute_token_heatmap.py"), *map(str, args)],
                          capture_output=True, text=True, env=env, cwd=ROOT)


def test_heatmap_cli_takes_an_image_index_or_a_frame(family_runs, tmp_path):
    vid, two = family_runs["video"], family_runs["two"]
    last = len(vid.tokens) - 1
    out = tmp_path / "hm.png"
    r = _heatmap("--run", vid.path, "--frame", 3, "--index", last, "--output", out, "--overlay", tmp_path / "ov.png",
                 "--json")
    assert r.returncode == 0, r.stderr
    agg = json.loads(out.with_suffix(".json").read_text())
    assert agg["num_keys"] == 64 and agg["grid"] is None and np.asarray(agg["global_grid"]).shape == (8, 8)
    with Image.open(tmp_path / "ov.png") as im:
        assert im.size == (96, 64)                      # over frame 3 at the video's own size
    r = _heatmap("--run", two.path, "--image-index", 1, "--index", len(two.tokens) - 1, "--output", out,
                 "--overlay", "")
    assert r.returncode == 0, r.stderr
    for args, message in [(["--run", vid.path, "--index", last], "this run has 4 frames: pass --frame K (0..3)"),
                          (["--run", two.path, "--frame", 0, "--index", 3], "--frame is for video runs"),
                          (["--run", two.path, "--image-index", 2, "--index", 3], "image 2 out of range")]:
        r = _heatmap(*args, "--output", out, "--overlay", "")
        assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1


# ------------------------------------------------------------------------------- the batch over videos

def test_batch_video_dir_resumes_and_records_bad_videos(smol, tmp_path, capsys):
    import extract_smolvlm_batch as cli
    from smolattn.errors import run_cli

    clips = tmp_path / "clips"
    clips.mkdir()
    encode_mp4(clips / "a.mp4", 8, 4)
    encode_mp4(clips / "b.mp4", 12, 4)
    (clips / "broken.mp4").write_bytes(b"no video here")
    (clips / "photo.jpg").write_bytes(b"not a video extension: ignored")
    root = tmp_path / "out"
    argv = ["--video-dir", clips, "--output-root", root, "--model-id", smol.source, "--device", "cpu",
            "--max-new-tokens", 2, "--max-frames", 2]

    def batch_status(extra=()):
        with pytest.raises(SystemExit) as e:
            run_cli(cli.main, [str(a) for a in argv + list(extra)])
        return e.value.code

    assert batch_status() == 1                                      # broken.mp4 failed
    rows = [json.loads(line) for line in (root / "manifest.jsonl").read_text().splitlines()]
    status = {r["image"]: r["status"] for r in rows}
    assert status == {"a.mp4": "ok", "b.mp4": "ok", "broken.mp4": "error"}
    assert "not a video PyAV can read" in next(r["error"] for r in rows if r["image"] == "broken.mp4")
    for name, frames in (("a", 2), ("b", 2)):
        run = store.Run(root / name)
        assert run.layout.is_video and len(run.layout) == frames and run.meta["video"]["max_frames"] == 2
    assert batch_status() == 1                                      # resumed: nothing redone
    assert len((root / "manifest.jsonl").read_text().splitlines()) == len(rows)
    # other frame settings are another configuration: refused without --overwrite
    argv[-1] = 3
    capsys.readouterr()
    assert batch_status() == 2
    assert "configuration" in capsys.readouterr().err


# ------------------------------------------------------------------------------- the viewer (API)

def test_viewer_api_serves_each_image_and_the_per_frame_timeline(family_runs, make_app, tmp_path):
    import shutil

    root = tmp_path / "served"
    root.mkdir()
    for name in ("two", "video"):
        shutil.copytree(family_runs[name].path, root / name)
    client = make_app(RUNS=str(root)).test_client()
    for name in ("two", "video"):
        run = store.Run(root / name)
        info = client.get(f"/api/initialize?run={name}").get_json()
        assert info["success"] and info["video"] == run.layout.is_video and len(info["images"]) == len(run.layout)
        assert [m["name"] for m in info["methods"] if m["available"]] == ["raw"]     # none stored in these runs
        pos = run.query_positions[-1]
        row = run.row_of(pos)
        values = np.mean([run.layer(i).image[:, row].mean(0) for i in range(run.num_layers)], axis=0)
        for k in range(len(run.layout)):
            d = client.get(f"/api/attention?run={name}&index={pos}&image={k}").get_json()
            assert d["success"] and d["image"] == k
            tiles, glob = run.layout.split(values, k)
            np.testing.assert_allclose(d["global"], glob, rtol=1e-4, atol=1e-7)
            assert (d["grid"] is None) == (tiles is None)
            np.testing.assert_allclose(d["image_masses"], run.layout.mass(values), rtol=1e-4, atol=1e-7)
            assert client.get(f"/api/image?run={name}&image={k}").data == run.image_path(k).read_bytes()
            cell = "0,0"
            r = client.get(f"/api/reverse?run={name}&cell={cell}&view=global&image={k}").get_json()
            assert r["success"] and r["key"] == run.layout.key_offsets[k] + run.layout.images[k].rows * \
                run.layout.images[k].cols * 64
        assert client.get(f"/api/attention?run={name}&index={pos}&image=9").status_code == 404


def test_image_list_names_outside_images_folder_are_not_followed(family_runs, tmp_path, make_app):
    import shutil

    run_dir = tmp_path / "served" / "two"
    shutil.copytree(family_runs["two"].path, run_dir)
    (run_dir / "x.html").write_text("<script>alert(1)</script>")
    meta = json.loads((run_dir / "meta.json").read_text())
    meta["images"][1]["file"] = "x.html"
    (run_dir / "meta.json").write_text(json.dumps(meta))
    run = store.Run(run_dir)
    assert run.image_path(0) is not None and run.image_path(1) is None
    client = make_app(RUNS=str(run_dir.parent)).test_client()
    assert client.get("/api/image?run=two&image=0").status_code == 200
    assert client.get("/api/image?run=two&image=1").status_code == 404


def test_head_analysis_skips_several_image_and_video_runs_and_says_so(family_runs, make_run, tmp_path):
    import shutil

    from smolattn import analysis

    root = tmp_path / "root"
    root.mkdir()
    for name in ("two", "video"):
        shutil.copytree(family_runs[name].path, root / name)
    shutil.copytree(make_run("single"), root / "single")
    ds = analysis.analyse_root(root, analysis.Params(), workers=1, progress=False)
    assert len(ds) == 1 and set(ds.skipped) == {"two", "video"}
    assert "several images in one prompt" in ds.skipped["two"] and "a video" in ds.skipped["video"]


def test_derived_methods_run_on_a_smolvlm2_single_image(smol, tmp_path):
    """methods' teacher-forced pass merges the image features exactly as SmolVLM2's forward does (it
    has no inputs_merger), and an extraction with every method writes them."""
    from smolattn import methods as mth

    prep = engine.prepare(smol.processor, synthetic.test_image((640, 480)), "Hi")
    ids = torch.tensor([prep.ids])
    seen = {}
    hook = smol.model.model.text_model.register_forward_pre_hook(
        lambda m, a, kw: seen.update(emb=kw["inputs_embeds"].detach().clone()), with_kwargs=True)
    try:
        with torch.no_grad(), mth.keep_image_features(smol) as kept:
            smol.model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=prep.pixel_values[None],
                       pixel_attention_mask=prep.pixel_attention_mask[None])
    finally:
        hook.remove()
    with torch.no_grad():
        merged = mth.merge_image_features(smol.model.model, ids, smol.model.get_input_embeddings()(ids), kept.features)
    assert torch.equal(merged, seen["emb"])
    img = tmp_path / "a.png"
    synthetic.test_image((640, 480)).save(img)
    ex.extract(smol, img, tmp_path / "run", ex.Settings(max_new_tokens=2, methods=tuple(mth.parse("raw,rollout,relevancy,relative"))))
    assert store.Run(tmp_path / "run").methods == ["raw", "relative", "relevancy", "rollout"]


def test_intervene_asks_for_the_image_index_on_several_image_and_video_runs_in_one_line(family_runs):
    """(tests/test_family_interventions.py has the rest: image:K / frame:K / box:K:..., == references)"""
    for name, to, what in (("two", "box:0,0,10,10", "2 images: say which"), ("video", "image:0", "use frame:K")):
        r = subprocess.run([sys.executable, str(ROOT / "intervene.py"), "--run", str(family_runs[name].path),
                            "--knockout", "--from", "last", "--to", to, "--layers", "0"], capture_output=True,
                           text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
        assert r.returncode == 2 and what in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


# ------------------------------------------------------------------------------- the notebook API

def test_notebook_maps_each_image_and_the_per_frame_masses(family_runs):
    import smolattn

    for name in ("two", "video"):
        store_run = family_runs[name]
        run = smolattn.open_run(store_run.path)
        lay = store_run.layout
        assert len(run.images) == len(lay) and [i["kind"] for i in run.images] == list(lay.kinds)
        assert ("a video, 4 frames" if name == "video" else "2 images") in repr(run) and "STAND-IN" in repr(run)
        pos = run.answer_tokens[0].index
        row = store_run.row_of(pos)
        # independently: every layer's head-mean row over the stored keys, image by image
        full = np.stack([store_run.full_row(store_run.layer(i), row).mean(0) for i in range(store_run.num_layers)])
        over_keys = full[:, lay.key_positions].mean(0)
        np.testing.assert_allclose(run.masses(pos), [over_keys[lay.keys_of(k)].sum() for k in range(len(lay))],
                                   rtol=1e-4, atol=1e-6)
        for k in range(len(lay)):
            g = lay.images[k]
            want = over_keys[lay.keys_of(k)][g.rows * g.cols * g.per_tile:].reshape(g.side, g.side)
            np.testing.assert_allclose(run.map(pos, image=k, view="global"), want, rtol=1e-4, atol=1e-7)
            assert run.map(pos, image=k).shape == tuple(np.multiply(run.images[k]["grid"], 1))
        pic = run.picture(pos, image=len(lay) - 1)
        assert pic.width == min(run.images[-1]["size"][0], round(run.images[-1]["size"][0]
                                                                 * min(1.0, 1024 / max(run.images[-1]["size"]))))
        with pytest.raises(ex.UserError, match="out of range"):
            run.map(pos, image=len(lay))
    assert smolattn.open_run(family_runs["video"].path).images[3]["timestamp"] == family_runs["video"].layout.timestamps[3]


def test_notebook_runs_several_images_and_a_video(smol, clips, tmp_path):
    import smolattn

    a, b = tmp_path / "a.png", tmp_path / "b.png"
    synthetic.test_image((640, 480)).save(a)
    synthetic.test_image((300, 200)).save(b)
    two = smolattn.run_images([a, b], "Compare.", model_id=smol.source, output_dir=tmp_path / "two", max_new_tokens=2)
    assert len(two.images) == 2 and two.images[1]["size"] == (300, 200) and two.prompt == "Compare."
    vid = smolattn.run_video(clips[4][0], "What happens?", model_id=smol.source, output_dir=tmp_path / "vid",
                             max_new_tokens=2)
    assert [i["kind"] for i in vid.images] == ["frame"] * 4 and len(vid.masses(vid.answer_tokens[0])) == 4
    with pytest.raises(ex.UserError, match="video not found"):
        smolattn.run_video(tmp_path / "missing.mp4", model_id=smol.source, output_dir=tmp_path / "nothing")
    assert not (tmp_path / "nothing").exists()


def test_the_methods_command_of_a_several_image_and_a_video_run_rebuilds_it(family_runs, tmp_path):
    """The command the viewer shows to add methods names every image (in order) or the video with
    its sampling, and run as shown it rebuilds the same run (same ids and rows) with the methods."""
    from test_runmeta import assert_same_rows, execute

    from smolattn import runmeta

    for name in ("two", "video"):
        run = family_runs[name]
        cmd = runmeta.command(run.meta, tmp_path / name, ["rollout"])
        if name == "two":
            assert cmd.count("--image ") == 2 and cmd.index(str(family_runs["paths"][0])) < cmd.index(
                str(family_runs["paths"][1]))
        else:
            assert "--video " in cmd and "--image" not in cmd and "--fps 1 " in cmd and "--max-frames 64" in cmd
        execute(cmd)
        again = store.Run(tmp_path / name)
        assert again.meta["token_ids"] == run.meta["token_ids"] and again.methods == ["raw", "rollout"]
        assert again.layout.to_json() == run.layout.to_json()
        assert_same_rows(run, again)


def test_a_video_without_a_model_id_uses_smolvlm2(clips, tmp_path):
    """--video with the default model: SmolVLM v1 reads no video, so SmolVLM2-256M-Video-Instruct is used
    (said in a note); offline and not cached, the one error line points to the SmolVLM2 stand-in."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    r = subprocess.run([sys.executable, str(ROOT / "extract_smolvlm_attn.py"), "--video", str(clips[4][0]),
                        "--output-dir", str(tmp_path / "out")], capture_output=True, text=True, env=env, cwd=ROOT)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(lines) == 2, r.stderr
    assert lines[0].startswith("note: a video: using HuggingFaceTB/SmolVLM2-256M-Video-Instruct")
    assert "'HuggingFaceTB/SmolVLM2-256M-Video-Instruct' is not cached" in lines[1] and "--shape smolvlm2-tiny" in lines[1]
    assert not (tmp_path / "out").exists()
