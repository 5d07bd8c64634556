"""Synthetic runs with known attention, for tests and benchmarks (no model needed).

The token stream is laid out exactly as the Idefics3 processor lays it out for an R x C grid.
"""
from __future__ import annotations

import numpy as np

from . import geometry as geo
from . import store
from .tokens import units

PROMPT = ["ĠCan", "Ġyou", "Ġdescribe", "Ġthis", "Ġimage", "?"]
ANSWER = ["ĠA", "Ġskier", "Ġin", "Ġa", "Ġred", "Ġjacket", "Ġ&", "Ġ\"", "<", "Ġdog", "'s", "Ġjacket", "."]


def make_tokens(rows: int, cols: int, side: int = 8, prompt=PROMPT, answer=ANSWER):
    """(tokens, prompt_length) for one image with an R x C grid (0 x 0 = global tile only)."""
    t = ["<|im_start|>", "User", ":"] + image_block(rows, cols, side)
    t += list(prompt) + ["<end_of_utterance>", "Ċ", "Ass", "istant", ":"]
    return t + list(answer) + ["<end_of_utterance>"], len(t)


def test_image(size=(640, 480)):
    """A smooth colour gradient with a grid, so overlays are easy to read in screenshots."""
    from PIL import Image
    w, h = size
    x, y = np.meshgrid(np.linspace(0, 1, w), np.linspace(0, 1, h))
    rgb = np.stack([80 + 120 * x, 90 + 100 * y, 160 - 60 * x], -1)
    rgb[(np.arange(h) % 64 == 0)[:, None] | (np.arange(w) % 64 == 0)[None, :]] = 60
    return Image.fromarray(rgb.astype(np.uint8))


def random_rows(rng, layers: int, heads: int, q, S: int, keys, one_hot: dict | None = None, plant=None, g=None):
    """Per layer (H, len(q), S) fp16 causal softmax rows of random logits; ``one_hot`` {position: key
    index} puts all of that row's mass on one image key; ``plant(layer, a, q, g)`` edits them."""
    arrays = []
    for _ in range(layers):
        logits = rng.normal(0, 1, (heads, len(q), S))
        logits[..., np.arange(S)[None, :] > q[:, None]] = -np.inf  # causal
        a = np.exp(logits - logits.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        for pos, key in (one_hot or {}).items():
            row = int(np.flatnonzero(q == pos)[0])
            a[:, row] = 0
            a[:, row, keys[key]] = 1.0
        if plant is not None:
            plant(len(arrays), a, q, g)
        arrays.append(a.astype(np.float16))
    return arrays


def make_run(out, rows: int = 3, cols: int = 4, *, layers: int = 2, heads: int = 2, side: int = 8,
             image_size=(640, 480), store_mode: str = "compact", one_hot: dict | None = None,
             seed: int = 0, all_rows: bool = False, answer=ANSWER, prompt=PROMPT, reference: bool = False,
             plant=None, meta_extra: dict | None = None, methods=()):
    """Write a synthetic run. ``one_hot`` maps a query position to an image key index: every layer
    and head of that row then puts all its mass on that key. Other rows get random softmax rows.
    ``plant(layer, a, q, g)``: then edits layer ``layer``'s rows ``a`` (H, len(q), S) in place
    (q: the stored query positions, g: the geometry). ``meta_extra``: merged into meta.json (one level
    deep). ``reference=True`` writes the reference project's layout instead (tokens + attentions_5 only).
    ``methods``: names from smolattn.methods.METHODS to store too, with maps made from the rows'
    head-mean image attention (:func:`method_maps`), so a ``one_hot`` row's maps peak on its key.
    """
    tokens, plen = make_tokens(rows, cols, side, prompt=prompt, answer=answer)
    g = geo.from_tokens(tokens)
    S = len(tokens)
    q = np.arange(S)
    q = q if (all_rows or store_mode == "full" or reference) else q[g.outside_image(q)]
    arrays = random_rows(np.random.default_rng(seed), layers, heads, q, S, g.key_positions, one_hot, plant, g)
    if reference:
        with store.atomic_dir(out) as tmp:
            np.save(tmp / "decoded_tokens.npy", np.array(tokens, dtype=object))  # pickled, as the reference
            (tmp / "attentions_5").mkdir()
            for i, a in enumerate(arrays):
                np.savez_compressed(tmp / store.FULL_FILE.format(i), attention=a[None])
            test_image(image_size).save(tmp / "image.png")
        return out
    meta = {"model": {"id": "synthetic", "standin": True, "dtype": "float16"},
            "prompt": "".join(u.text for u in units(prompt)).strip(),
            "answer": "".join(u.text for u in units(tokens[plen:])), "prompt_length": plen,
            "image": {"size": list(image_size), "source": "synthetic"}}
    for k, v in (meta_extra or {}).items():
        meta[k] = {**meta[k], **v} if isinstance(meta.get(k), dict) and isinstance(v, dict) else v
    return store.write_run(out, tokens=tokens, layers=arrays, query_positions=q, store=store_mode,
                           geometry=g, meta=meta, image=test_image(image_size),
                           methods=method_maps(arrays, q, g, plen, methods))


def image_block(rows: int, cols: int, side: int = 8) -> list:
    """One image's tokens as the Idefics3 processor writes them: R x C tiles (rows ended by a newline),
    then the global tile; 0 x 0 (or a video frame): the global tile only."""
    n, t = side * side, []
    for r in range(1, rows + 1):
        for c in range(1, cols + 1):
            t += ["<fake_token_around_image>", f"<row_{r}_col_{c}>"] + ["<image>"] * n
        t.append("Ċ")
    if rows:
        t[-1] = "ĊĊ"
    return t + ["<fake_token_around_image>", "<global-img>"] + ["<image>"] * n + ["<fake_token_around_image>"]


def make_layout_run(out, grids=((3, 4), (0, 0)), *, video: bool = False, sizes=None, layers: int = 2,
                    heads: int = 2, side: int = 8, seed: int = 0, methods=(), answer=ANSWER, prompt=PROMPT,
                    one_hot: dict | None = None):
    """Write a synthetic run of several images in one prompt (``grids``: the (R, C) tiles of each, in
    order; ``sizes``: their (W, H)) or, with ``video``, of ``len(grids)`` frames (each one global tile;
    one second apart), with random causal softmax rows for every position outside the image blocks
    (a video: outside the span of its frames, as extraction's default rows).
    ``one_hot`` maps a query position to a key index on the stored key axis (all images' keys in
    order): every layer and head of that row then puts all its mass there. ``methods``: as make_run."""
    if video:
        grids = [(0, 0)] * len(grids)
    sizes = list(sizes or [(640, 480) if not video else (320, 240)] * len(grids))
    t = ["<|im_start|>", "User", ":"]
    if video:
        t += ["ĠYou", "Ġare", "Ġprovided", "Ġframes", ".", "Ċ"]
    for k, (r, c) in enumerate(grids):
        if video:
            t += ["Ċ", "Frame", "Ġfrom", f"Ġ00:{k:02d}", ":"]
        t += image_block(r, c, side)
    t += list(prompt) + ["<end_of_utterance>", "Ċ", "Ass", "istant", ":"]
    plen = len(t)
    tokens = t + list(answer) + ["<end_of_utterance>"]
    kinds = (geo.FRAME if video else geo.IMAGE,) * len(grids)
    stamps = tuple(float(k) for k in range(len(grids))) if video else ()
    layout = geo.layout_from_tokens(tokens, kinds, stamps)
    S = len(tokens)
    q = np.arange(S)[layout.outside_image(np.arange(S), between=not video)]   # a video: not the frames' stamps
    arrays = random_rows(np.random.default_rng(seed), layers, heads, q, S, layout.key_positions, one_hot)
    images = [test_image(s) for s in sizes]
    entries = [{"kind": kind, "timestamp": ts, "size": list(s), "source": "synthetic",
                "tiles": {"rows": g.rows, "cols": g.cols}}
               for kind, ts, s, g in zip(layout.kinds, layout.timestamps, sizes, layout.images)]
    meta = {"model": {"id": "synthetic", "standin": True, "dtype": "float16"},
            "prompt": "".join(u.text for u in units(prompt)).strip(),
            "answer": "".join(u.text for u in units(tokens[plen:])), "prompt_length": plen,
            "image": ({"source": "synthetic.mp4", "size": list(sizes[0]), "kind": "video"} if video
                      else {"size": list(sizes[0]), "source": "synthetic"}),
            "images": entries}
    if video:
        meta["video"] = {"source": "synthetic.mp4", "format": "synthetic", "fps": 1.0, "total_frames": len(grids)}
    return store.write_run(out, tokens=tokens, layers=arrays, query_positions=q, store="compact", geometry=layout,
                           meta=meta, images=[(im, "png") for im in images],
                           methods=method_maps(arrays, q, layout, plen, methods))


def method_maps(layers, q, g: geo.Geometry, prompt_length: int, names) -> dict:
    """Synthetic stand-ins for smolattn.methods.compute's output (same rows and layout; NOT the
    methods' math): every map is its row's head-mean attention over the image keys in that layer
    (times the number of keys for 'relative', a ratio around 1). Relevancy maps of token t come
    from row t-1, as the real method's."""
    from . import methods as mth
    image = np.stack([a[..., g.key_positions].astype(np.float32).mean(0) for a in layers])   # (L, Q, K)
    S, out = int(q.max()) + 1, {}
    for name in names:
        m = mth.METHODS[name]
        if name == "relevancy":
            positions = np.arange(prompt_length, S)
            rows = positions - 1
        else:
            positions = rows = q[q >= g.block_end] if name == "relative" else q
        maps = image[:, [int(np.flatnonzero(q == r)[0]) for r in rows]] * (g.num_keys if name == "relative" else 1)
        out[name] = {"positions": positions, "query_positions": rows, "maps": maps,
                     "meta": {"axis": m.axis, "dtype": m.dtype, "params": {**m.params, "synthetic": True},
                              "rows": m.rows}}
    return out


def encode_mp4(path, frames: int, fps: int, size=(96, 64), mark=None):
    """An H.264 MP4: frame i is a flat colour of its own; ``mark`` = (frame, (x, y, w, h)) paints a
    white box into one frame. Returns the source frames (uint8 H x W x 3)."""
    import av

    w, h = size
    src = []
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for i in range(frames):
            a = np.zeros((h, w, 3), np.uint8)
            a[..., 0], a[..., 1], a[..., 2] = (40 + 13 * i) % 200, 90, 60
            if mark and mark[0] == i:
                x, y, bw, bh = mark[1]
                a[y:y + bh, x:x + bw] = 255
            src.append(a)
            for p in stream.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                out.mux(p)
        for p in stream.encode():
            out.mux(p)
    return src
