"""Record what transformers' own SmolVLMProcessor gives for a fixed set of images and videos, so that
tests without torchvision can check our fallback path against it (tests/test_family.py).

    python scripts/record_smolvlm_processor.py                 # where torchvision imports (a GPU machine)

    # with this project's CPU torch 2.13 (how the committed record was made):
    pip install --no-deps --target /tmp/tvlib torchvision==0.28.0
    PYTHONPATH=/tmp/tvlib python scripts/record_smolvlm_processor.py --define-torchvision-ops

The real processor needs torchvision (its video processor class). Where the PyPI torchvision wheel is
CUDA-built and the installed torch is CPU-only, torchvision's compiled ops cannot load and its import
stops at registering fake kernels for ``torchvision::nms`` / ``qnms``. ``--define-torchvision-ops``
defines those two op schemas first (no kernels), so torchvision's pure-torch Python code imports; the
processors never call those ops (resizing and normalising are torch operations). Videos are decoded
with transformers' own ``load_video(..., backend="pyav")`` and sampled by the real video processor
(``do_sample_frames``): transformers' default decoder, torchcodec, is not needed.

Writes tests/data/smolvlm2_processor.json: per stand-in (the tiny SmolVLM2 stand-ins of both
geometries, built here from ``smolattn.standin``) and per case, the real processor's ``input_ids``, the
shape of its ``pixel_values`` and each image tile / frame pooled to 3 x 4 x 4 (the mean of each
block; ids as [id, count] runs), with the tokenizer's vocabulary fingerprint. It also prints how far our fallback processor
(``smolattn.model.fallback_processor``) is from it.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

OUT = ROOT / "tests" / "data" / "smolvlm2_processor.json"
FORMAT = "smolattn-processor-record"
SHAPES = ("smolvlm2-tiny", "smolvlm2-tiny-2.2b-geometry")
IMAGE_PROMPT, VIDEO_PROMPT = "Compare these.", "What happens in the video?"
IMAGE_CASES = {                # name -> image sizes (W, H), in prompt order
    "one": [(640, 480)],
    "two": [(640, 480), (300, 300)],
    "three": [(200, 300), (1024, 768), (64, 64)],
    "extreme": [(1600, 400), (400, 1600)],
}
VIDEO_CASES = {                # name -> (source frames, fps, size): SmolVLM's 1 fps sampling keeps 4, 16, 4
    "four": (16, 4, (96, 64)),
    "sixteen": (32, 2, (96, 64)),
    "wide": (12, 3, (320, 176)),
}


def define_torchvision_ops() -> None:
    import torch

    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    define_torchvision_ops.lib = lib          # keep the registration alive


def pooled(pixel_values, blocks: int = 4) -> np.ndarray:
    """(N, 3, H, W) tiles or frames -> (N, 3, blocks, blocks) block means."""
    a = np.asarray(pixel_values, np.float32)
    n, c, h, w = a.shape
    return a.reshape(n, c, blocks, h // blocks, blocks, w // blocks).mean((3, 5))


def run_lengths(ids) -> list:
    """[[id, count], ...]: an image block is thousands of one id."""
    out = []
    for i in ids:
        if out and out[-1][0] == i:
            out[-1][1] += 1
        else:
            out.append([int(i), 1])
    return out


def expand(pairs) -> list:
    return [i for i, n in pairs for _ in range(n)]


def vocab_fingerprint(tokenizer) -> str:
    items = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]


def images_for(sizes):
    from smolattn import synthetic

    return [synthetic.test_image(tuple(s)) for s in sizes]


def clip(folder: Path, name: str) -> Path:
    from smolattn import synthetic

    frames, fps, size = VIDEO_CASES[name]
    path = folder / f"{name}.mp4"
    if not path.exists():
        synthetic.encode_mp4(path, frames, fps, size)
    return path


def ours_images(processor, sizes):
    from smolattn import engine

    p = engine.prepare_images(processor, images_for(sizes), IMAGE_PROMPT)
    return p.ids, p.pixel_values.numpy()


def ours_video(processor, path):
    from smolattn import engine, video

    cfg = video.settings(processor)
    p = engine.prepare_video(processor, video.read(path, cfg["fps"], cfg["max_frames"]), VIDEO_PROMPT)
    return p.ids, p.pixel_values.numpy()


def real_images(real, sizes):
    from smolattn import model as mdl

    out = real(text=mdl.chat_text(real, IMAGE_PROMPT, len(sizes)), images=[images_for(sizes)], return_tensors="pt")
    return out["input_ids"][0].tolist(), out["pixel_values"][0].numpy()


def real_video(real, path):
    from transformers.video_utils import load_video

    msgs = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": VIDEO_PROMPT}]}]
    text = real.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    frames, md = load_video(str(path), backend="pyav")
    out = real(text=text, videos=[frames], video_metadata=[md], do_sample_frames=True, return_tensors="pt")
    return out["input_ids"][0].tolist(), out["pixel_values"][0].numpy()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--define-torchvision-ops", action="store_true",
                    help="define torchvision's two op schemas first (a CUDA torchvision wheel with a CPU torch)")
    ap.add_argument("--output", type=Path, default=OUT)
    args = ap.parse_args(argv)
    if args.define_torchvision_ops:
        define_torchvision_ops()
    import torchvision
    import transformers
    from transformers import AutoProcessor

    from smolattn import model as mdl
    from smolattn import outputs, standin

    record = {"format": FORMAT, "transformers": transformers.__version__, "torchvision": torchvision.__version__,
              "image_prompt": IMAGE_PROMPT, "video_prompt": VIDEO_PROMPT, "image_cases": IMAGE_CASES,
              "video_cases": {k: list(v) for k, v in VIDEO_CASES.items()}, "shapes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for shape in SHAPES:
            src = standin.ensure(shape)
            real = AutoProcessor.from_pretrained(src)
            if type(real).__name__ != "SmolVLMProcessor":
                print(f"error: {shape}: AutoProcessor gave {type(real).__name__}, not SmolVLMProcessor", file=sys.stderr)
                return 1
            ours = mdl.fallback_processor(src)
            entry = record["shapes"][shape] = {"vocab": vocab_fingerprint(real.tokenizer), "cases": {}}
            todo = [(n, "images", s) for n, s in IMAGE_CASES.items()] + [(n, "video", n) for n in VIDEO_CASES]
            for name, kind, what in todo:
                if kind == "images":
                    (ids, px), (mine, mpx) = real_images(real, what), ours_images(ours, what)
                else:
                    path = clip(Path(tmp), what)
                    (ids, px), (mine, mpx) = real_video(real, path), ours_video(ours, path)
                got = pooled(px)
                entry["cases"][f"{kind}:{name}"] = {"input_ids": run_lengths(ids), "pixel_shape": list(px.shape),
                                                    "pooled": np.round(got, 4).tolist()}
                same = mine == ids and mpx.shape == px.shape
                diff = float(np.abs(pooled(mpx) - got).max()) if mpx.shape == px.shape else float("nan")
                print(f"{shape:30s} {kind}:{name:8s} {len(ids):6d} ids, pixel_values {tuple(px.shape)}; ours: "
                      f"{'same ids' if same else 'DIFFERENT'}, pooled pixels max |diff| {diff:.5f}")
    outputs.replace_file(args.output, (json.dumps(record) + "\n").encode(), outputs.JsonField(FORMAT))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
