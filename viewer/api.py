"""JSON API: the reference viewer's two routes, the data API the page draws from, the runs list, the
reverse view and PNG renders. Every error is ``{"success": false, "error": ...}`` with 400/404/500."""
from __future__ import annotations

import base64
import io
import re
from functools import lru_cache
from urllib.parse import quote

import numpy as np
from flask import Blueprint, current_app, jsonify, request, send_file
from PIL import Image

from smolattn import heatmap as hm
from smolattn import methods as mth
from smolattn import runmeta
from smolattn import tokens as tok
from smolattn.errors import UserError
from smolattn.store import Run, token_table

from . import export
from .index import SORTS
from .runs import MAX_OPEN_RUNS, NotFound, text_rows

bp = Blueprint("api", __name__, url_prefix="/api")
TEXT_KINDS = ("prompt", "answer", "special")
RAW = mth.RAW              # the stored attention rows (Run.methods names); the others: smolattn.methods' maps
METHODS = (RAW,) + tuple(mth.METHODS)
METHOD_LABELS = {RAW: "Attention", "rollout": "Attention rollout", "relevancy": "Gradient relevancy",
                 "relative": "Relative attention"}
PNG_MAX_SIDE = 1024
REVERSE_TOP = 20


class ApiError(Exception):
    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@bp.errorhandler(ApiError)
def _api_error(e):
    return jsonify(success=False, error=str(e)), e.status


@bp.errorhandler(NotFound)
def _not_found(e):
    return jsonify(success=False, error=str(e)), 404


def registry():
    return current_app.extensions["runs"]


# -- parameters ------------------------------------------------------------------------------
def params() -> dict:
    """Query arguments, plus the JSON body of a POST."""
    args = dict(request.args)
    if request.method == "POST":
        body = request.get_json(silent=True)
        if not isinstance(body, dict):
            raise ApiError("the request body must be a JSON object")
        args.update(body)
    return args


def as_int(value, name: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d{1,9}\s*", value):
        return int(value)
    raise ApiError(f"{name} must be an integer, got {value!r}")


def as_float(value, name: str) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ApiError(f"{name} must be a number, got {value!r}") from None
    if not np.isfinite(x):
        raise ApiError(f"{name} must be finite, got {value!r}")
    return x


def choice(args, name: str, choices: tuple, default: str) -> str:
    value = str(args.get(name, default))
    if value not in choices:
        raise ApiError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


def get_run(args) -> tuple[str, Run]:
    reg = registry()
    name = args.get("run") or (reg.single_name if reg.single else None)
    if not isinstance(name, str):
        raise ApiError("parameter 'run' is required: this server shows several runs (see /api/runs)")
    try:
        return name, reg.run(name)
    except UserError as e:
        raise ApiError(f"run {name!r} cannot be read: {e}", 500) from None


ALL_IMAGES = "all"     # image=all: summed over every image (frame) of the prompt (/api/overview)


def get_image(run: Run, args, default="0", allow_all: bool = False) -> int | None:
    """The image (or video frame) a view is about: ``image`` (0-based; default 0); with ``allow_all``,
    ``image=all`` (None: every image summed)."""
    value = args.get("image", default)
    if allow_all and value == ALL_IMAGES:
        return None
    if not (isinstance(value, int) or (isinstance(value, str) and re.fullmatch(r"\s*-?\d{1,9}\s*", value))):
        raise ApiError(f"image must be an image index 0..{len(run.layout) - 1}"
                       + (f" or '{ALL_IMAGES}' (every image summed)" if allow_all else "") + f", got {value!r}")
    k = as_int(value, "image")
    if not 0 <= k < len(run.layout):
        raise NotFound(f"image {k} out of range: the run has {len(run.layout)} image(s), 0..{len(run.layout) - 1}")
    return k


def images_info(name: str, run: Run) -> list[dict]:
    """Every image (or video frame) of the run: kind, timestamp, tiles, size and its URL."""
    out = []
    for k, (g, kind, ts) in enumerate(zip(run.layout.images, run.layout.kinds, run.layout.timestamps)):
        out.append({"index": k, "kind": kind, "timestamp": ts, "url": f"/api/image?run={quote(name)}&image={k}",
                    "geometry": {"rows": g.rows, "cols": g.cols, "side": g.side, "grid": list(g.grid_shape),
                                 "num_keys": g.num_keys, "image_block": list(g.image_block),
                                 "image_size": list(run.image_size(k))}})
    return out


@lru_cache(maxsize=MAX_OPEN_RUNS)
def table(run: Run) -> list[dict]:
    return token_table(run)


def get_token(run: Run, value, name: str = "index") -> tuple[int, int]:
    """(position, stored row) of a token; 404 for unknown tokens and tokens without a row."""
    if value is None:
        raise ApiError(f"parameter '{name}' is required")
    pos = as_int(value, name)
    if not 0 <= pos < len(run.tokens):
        raise NotFound(f"unknown token {pos}: the run has tokens 0..{len(run.tokens) - 1}")
    row = text_rows(run).row.get(pos)
    if row is None:
        t = table(run)[pos]
        raise NotFound(f"token {pos} ({t['kind']} {t['text']!r}) has no stored attention row: "
                       "only text/answer tokens have rows")
    return pos, row


def get_layers(run: Run, value) -> range:
    """'a-b' or 'i' (default: every layer)."""
    if value in (None, ""):
        return range(run.num_layers)
    m = re.fullmatch(r"(\d{1,4})(?:-(\d{1,4}))?", str(value))
    if not m:
        raise ApiError(f"layers must be 'i' or 'a-b', got {value!r}")
    a, b = int(m.group(1)), int(m.group(2) or m.group(1))
    if a > b:
        raise ApiError(f"layers range {value!r} is reversed")
    if b >= run.num_layers:
        raise NotFound(f"unknown layer {b}: the run has layers 0..{run.num_layers - 1}")
    return range(a, b + 1)


def get_heads(run: Run, value, default="mean"):
    value = default if value in (None, "") else value
    if value in hm.HEAD_REDUCTIONS:
        return value
    h = as_int(value, "head")
    if not 0 <= h < run.num_heads:
        raise ApiError(f"head {h} out of range 0..{run.num_heads - 1} (or mean, max)")
    return h


def image_maps(name: str, run: Run, row: int, layers) -> np.ndarray:
    """(L, H, K): the row's attention over the image keys in each layer."""
    reg = registry()
    return np.stack([reg.layer(name, run, i).image[:, row] for i in layers])


def token_map(name: str, run: Run, row: int, layers, heads, drop: bool) -> np.ndarray:
    """(K,): the row's image attention reduced over heads (renormalised per layer if ``drop``), mean over layers."""
    per_layer = hm.reduce_heads(image_maps(name, run, row, layers), heads)
    return (hm.drop_sink(per_layer) if drop else per_layer).mean(axis=0)


def method_info(run: Run, name: str) -> dict:
    """What the page needs to offer a method: available or not (and then the command that adds it)."""
    if name == RAW:
        return {"name": name, "label": METHOD_LABELS[name], "available": True, "axis": "layer",
                "rows": run.meta.get("attention", {}).get("query_semantics", "row t = token t as the query")}
    m, stored = mth.METHODS[name], run.meta.get("methods") or {}
    info = {"name": name, "label": METHOD_LABELS.get(name, name), "available": name in stored, "axis": m.axis,
            "rows": m.rows}
    if name in stored:
        info["positions"] = stored[name].get("positions", [])
    else:
        info["command"] = runmeta.command(run.meta, run.path, [*stored, name])
    return info


def view_values(name: str, run: Run, pos: int, row: int, args) -> dict:
    """The map (K,) the page asked for, with what describes it. ``every``: the maps the shared colour
    scale spans (None: the raw run's summary has it)."""
    layers = get_layers(run, args.get("layers"))
    drop = choice(args, "drop_sink", ("0", "1"), "0") == "1"
    method = choice(args, "method", METHODS, RAW)
    if method == RAW:
        heads = get_heads(run, args.get("heads"))
        return {"method": method, "layers": layers, "heads": heads, "drop": drop, "every": None,
                "values": token_map(name, run, row, layers, heads, drop)}
    start = as_int(args.get("start_layer", 0), "start_layer")
    try:
        maps = run.method(method)
        values = hm.method_map(run, method, pos, layers, start)
    except UserError as e:
        raise NotFound(str(e)) from None
    every = maps.maps[:, maps.index(pos)].astype(np.float64)           # every (start) layer of the token
    if maps.meta.get("axis") == "start_layer":
        layers = range(start, run.num_layers)
    if drop:
        values, every = hm.drop_sink(values), hm.drop_sink(every)
    return {"method": method, "layers": layers, "heads": None, "drop": drop, "every": every, "values": values,
            "start_layer": start if maps.meta.get("axis") == "start_layer" else None}


def numbers(x: np.ndarray, digits: int = 6) -> list:
    """Nested lists rounded to ``digits`` significant digits of the largest value (the stores keep
    about 3: float16): half the JSON, and half the time to encode it."""
    top = float(np.abs(x).max())
    return np.round(x.astype(np.float64), digits - int(np.floor(np.log10(top))) if top > 0 else 0).tolist()


def png_b64(img) -> str:
    buf = io.BytesIO()
    img.save(buf, "PNG", compress_level=1)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def display_size(run: Run, k: int | None = None) -> tuple[int, int]:
    w, h = run.image_size(k)
    scale = min(1.0, PNG_MAX_SIDE / max(w, h))
    return max(1, round(w * scale)), max(1, round(h * scale))


# -- routes ----------------------------------------------------------------------------------
@bp.get("/runs")
def runs():
    """One page of the run index: search (name, answer or image), sort, paging. ``complete`` is False
    while the runs' answers and grids are still being read (``pending`` of them; a large root without
    manifests): every run is listed and counted by name, searches by answer see what is read so far."""
    args = params()
    limit = as_int(args.get("limit", "200"), "limit")
    if not 1 <= limit <= 1000:
        raise ApiError("limit must be in 1..1000")
    offset = as_int(args.get("offset", "0"), "offset")
    if offset < 0:
        raise ApiError("offset must be >= 0")
    sort = choice(args, "sort", SORTS, "name")
    desc = choice(args, "desc", ("0", "1"), "0") == "1"
    reg = registry()
    total, page = reg.index.query(str(args.get("q", "")), sort, desc, offset, limit)
    return jsonify(success=True, total=total, offset=offset, limit=limit, sort=sort, desc=desc, single=reg.single,
                   complete=reg.index.complete, pending=reg.index.pending, runs=[e.to_json() for e in page])


@bp.get("/health")
def health():
    """Cache sizes (bytes), entries, hits and misses; the run index."""
    return jsonify(success=True, **registry().health())


@bp.get("/initialize")
def initialize():
    from . import interventions   # its blueprint imports this module
    name, run = get_run(params())
    tokens = table(run)
    g = run.layout.images[0]        # several images / a video: the first one (the others in `images`)
    after_image = tokens[run.layout.image_block[1] + 1:run.prompt_length]
    user_turn = "".join(t["text"] for t in after_image[:next(
        (i for i, t in enumerate(after_image) if t["kind"] == "special"), len(after_image))])
    answer = [t for t in tokens if t["kind"] == "answer"]
    return jsonify(
        success=True, run=name, prompt=run.meta.get("prompt") or user_turn.strip(),
        answer=run.meta.get("answer") or "".join(t["text"] for t in answer),
        tokens=[{"text": t["text"], "raw": t["raw"], "index": t["index"], "is_selectable": t["has_row"]}
                for t in answer],
        num_layers=run.num_layers, num_heads=run.num_heads,
        image_url=f"/api/image?run={quote(name)}", standin=run.standin,
        model=run.meta.get("model", {}).get("id"),
        prompt_length=run.prompt_length,
        **interventions.run_fields(name, run),     # intervention (null for an ordinary run), sweeps
        geometry={"rows": g.rows, "cols": g.cols, "side": g.side, "grid": list(g.grid_shape),
                  "num_keys": g.num_keys, "image_block": list(run.layout.image_block), "image_size": list(run.image_size())},
        images=images_info(name, run), video=run.layout.is_video,
        token_table=tokens,   # several images / a video: method maps span every image's keys, as raw
        methods=[method_info(run, m) for m in METHODS],
        export=export.availability(run),
        methods_command=runmeta.command(run.meta, run.path, list(mth.METHODS)),
        query_semantics=run.meta["attention"].get(
            "query_semantics", "row for token t = position t as the query (the reference viewer's convention)"))


IMAGE_TYPES = ((b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"))


@bp.get("/image")
def image():
    """The run's image file (one of the names the writer uses, inside the root), served as PNG or JPEG
    by its content, whatever its name says; anything else is 404. ``image=K``: image (frame) K of a run
    of several."""
    args = params()
    name, run = get_run(args)
    path = run.image_path(get_image(run, args) if len(run.layout) > 1 else None)
    if path is None or not registry().inside(path):
        raise NotFound(f"run {name!r} has no image")
    f = open(path, "rb")      # one open file: what is checked is what is sent
    try:
        head = f.read(8)
        mimetype = next((t for magic, t in IMAGE_TYPES if head.startswith(magic)), None)
        if mimetype is None:
            raise NotFound(f"run {name!r} has no image: {path.name} is not a PNG or JPEG file")
        f.seek(0)
        return send_file(f, mimetype=mimetype, etag=False, max_age=0)
    except BaseException:
        f.close()
        raise


@bp.post("/generate_attention_map")
def generate_attention_map():
    """The reference route: one layer, one head (or mean/max), thresholded, as a transparent PNG."""
    args = params()
    name, run = get_run(args)
    if args.get("word_index") is not None:
        pos, row = get_token(run, args["word_index"], "word_index")
    else:
        word = args.get("word")
        if not isinstance(word, str):
            raise ApiError("word_index (an integer) or word (a token string) is required")
        match = next((t["index"] for t in table(run) if t["has_row"] and word in (t["raw"], t["text"], t["unit_text"])),
                     None)
        if match is None:
            raise NotFound(f"word {word!r} not found among the tokens with attention rows")
        pos, row = get_token(run, match)
    layer = get_layers(run, str(as_int(args.get("layer", 0), "layer")))
    head = get_heads(run, args.get("head"), default=0)
    threshold = as_float(args.get("threshold", 0.0), "threshold")
    values = token_map(name, run, row, layer, head, drop=False)
    grid, glob = run.geometry.split(values)
    grid = glob if grid is None else grid
    stats = {"min": float(grid.min()), "max": float(grid.max())}
    grid = np.where(grid < threshold, 0.0, grid)
    png = Image.fromarray(hm.heat_rgba(hm.normalise(grid), vmax=1.0), "RGBA").resize(display_size(run), Image.NEAREST)
    return jsonify(success=True, run=name, heatmap=png_b64(png), stats=stats, heatmap_width=png.width,
                   heatmap_height=png.height, word=run.tokens[pos], word_index=pos, layer=layer.start,
                   head=head, threshold=threshold)


@bp.get("/attention")
def attention():
    """The token's map as numbers for the page: tiled grid, global grid, image mass, colour range and
    the layer x head image-mass overview. The overview, the shared colour range and the default map
    (every layer, mean over heads) come from the run's summary; other maps read only their layers."""
    args = params()
    name, run = get_run(args)
    pos, row = get_token(run, args.get("index"))
    norm = choice(args, "norm", ("map", "shared"), "map")
    summary = registry().summary(name, run)
    lh_mass = summary.lh_mass(row)                                                 # (L, H)
    if args.get("method", RAW) == RAW and get_layers(run, args.get("layers")) == range(run.num_layers) \
            and get_heads(run, args.get("heads")) == "mean" and args.get("drop_sink", "0") == "0":
        v = {"method": RAW, "layers": range(run.num_layers), "heads": "mean", "drop": False,
             "values": summary.mean_map[row], "every": None}                       # the summary's default map
    else:
        v = view_values(name, run, pos, row, args)
    values, layers, heads = v["values"], v["layers"], v["heads"]
    if norm == "map":
        vmin, vmax = float(values.min()), float(values.max())
    elif v["every"] is None:
        vmin, vmax = summary.scale(row, heads, v["drop"])
    else:
        vmin, vmax = float(v["every"].min()), float(v["every"].max())
    if v["method"] == RAW:
        image_mass = float(hm.reduce_heads(lh_mass, heads)[layers.start:layers.stop].mean())
    else:   # rollout/relevancy: the map's sum is the image's share; relative is a ratio (no share)
        image_mass = float(values.sum()) if v.get("start_layer") is not None and not v["drop"] else None
    k, several = get_image(run, args), len(run.layout) > 1
    masses = None
    if several:   # one image's map; the token's attention mass per image (a video: per frame, its timeline)
        masses = run.layout.mass(values)
        values = values[run.layout.keys_of(k)]
        if norm == "map":
            vmin, vmax = float(values.min()), float(values.max())
    grid, glob = run.layout.images[k].split(values) if several else run.geometry.split(values)
    return jsonify(success=True, run=name, index=pos, text=tok.text_at(run.tokens, pos), method=v["method"],
                   image=k, image_masses=None if masses is None else numbers(masses),
                   layers=[layers.start, layers.stop - 1], heads=heads, drop_sink=v["drop"], norm=norm,
                   start_layer=v.get("start_layer"),
                   grid=None if grid is None else numbers(grid), **{"global": numbers(glob)},
                   image_mass=image_mass, vmin=vmin, vmax=vmax, layer_head_mass=numbers(lh_mass))


def layer_head_mass(name: str, run: Run, row: int, k: int | None) -> np.ndarray:
    """(L, H): the share of the row's attention on image ``k``'s keys, image_k / (image + text) in
    each layer and head; ``k`` None: on every image (the summary's overview, the sum over images)."""
    if k is None or len(run.layout) == 1:
        return registry().summary(name, run).lh_mass(row)
    reg, keys = registry(), run.layout.keys_of(k)
    out = np.zeros((run.num_layers, run.num_heads))
    for i in range(run.num_layers):
        layer = reg.layer(name, run, i)
        image, text = layer.image[:, row].astype(np.float64), layer.text[:, row].astype(np.float64)
        total = image.sum(-1) + text.sum(-1)
        np.divide(image[:, keys].sum(-1), total, out=out[i], where=total > 0)
    return out


@bp.get("/overview")
def overview():
    """The token's layer x head overview: the share of its attention on image (frame) K per layer
    and head (``image=K``), or on every image (``image=all``, the default: /api/attention's
    ``layer_head_mass``; the per-image overviews add up to it)."""
    args = params()
    name, run = get_run(args)
    pos, row = get_token(run, args.get("index"))
    k = get_image(run, args, default=ALL_IMAGES, allow_all=True)
    lh = layer_head_mass(name, run, row, k)
    return jsonify(success=True, run=name, index=pos, image=ALL_IMAGES if k is None else k,
                   images=len(run.layout), layer_head_mass=numbers(lh))


@bp.get("/text_attention")
def text_attention():
    """Text -> text: how much the token attends to each earlier prompt and answer token (the stored
    rows' text keys), layers and heads reduced as in /api/attention, and its share on the image."""
    args = params()
    name, run = get_run(args)
    pos, row = get_token(run, args.get("index"))
    layers = get_layers(run, args.get("layers"))
    heads = get_heads(run, args.get("heads"))
    reg = registry()
    rows = [reg.layer(name, run, i) for i in layers]
    text = hm.reduce_heads(np.stack([layer.text[:, row] for layer in rows]), heads).mean(axis=0)    # (T,)
    image = hm.reduce_heads(np.stack([layer.image[:, row].sum(-1) for layer in rows]), heads).mean()
    keys = run.text_key_positions[:len(text)]
    tokens = table(run)
    out = [{"index": int(p), "text": tokens[p]["text"], "unit_text": tokens[p]["unit_text"],
            "kind": tokens[p]["kind"], "value": float(v)}
           for p, v in zip(keys, text) if p <= pos and tokens[p]["kind"] in TEXT_KINDS]
    return jsonify(success=True, run=name, index=pos, layers=[layers.start, layers.stop - 1], heads=heads,
                   image=float(image), tokens=out)


@bp.get("/reverse")
def reverse():
    """Tokens ranked by their attention to one image cell (layers/heads reduced as in /api/attention)."""
    args = params()
    name, run = get_run(args)
    k = get_image(run, args)
    g = run.layout.images[k]
    view = choice(args, "view", ("tiles", "global"), "tiles")
    if view == "tiles" and g.rows == 0:
        view = "global"  # an unsplit image has only the global tile
    m = re.fullmatch(r"(\d{1,4}),(\d{1,4})", str(args.get("cell", "")))
    if not m:
        raise ApiError("cell must be 'i,j' (row, column of the grid)")
    i, j = int(m.group(1)), int(m.group(2))
    gh, gw = g.grid_shape if view == "tiles" else (g.side, g.side)
    if not (i < gh and j < gw):
        raise ApiError(f"cell {i},{j} is outside the {gh}x{gw} {view} grid")
    s = g.side
    if view == "tiles":
        key = ((i // s) * g.cols + j // s) * s * s + (i % s) * s + j % s
    else:
        key = g.rows * g.cols * s * s + i * s + j
    key += int(run.layout.key_offsets[k])      # image k's keys, after the earlier images'
    layers = get_layers(run, args.get("layers"))
    heads = get_heads(run, args.get("heads"))
    if len(layers) == run.num_layers and heads == "mean":
        values = registry().summary(name, run).mean_map[:, key]                # (Q,), from the summary
    else:
        values = hm.reduce_heads(np.stack([registry().layer(name, run, li).image[:, :, key] for li in layers]),
                                 heads).mean(axis=0)                            # (Q,)
    tokens, positions = table(run), text_rows(run).positions
    rows = [r for r, p in enumerate(positions) if tokens[p]["kind"] in TEXT_KINDS]
    top = sorted(rows, key=lambda r: -values[r])[:REVERSE_TOP]
    return jsonify(success=True, run=name, cell=[i, j], view=view, key=int(key), tokens=[
        {"index": int(positions[r]), "text": tokens[positions[r]]["text"], "kind": tokens[positions[r]]["kind"],
         "value": float(values[r])} for r in top])


@bp.get("/overlay.png")
def overlay_png():
    """The image with the token's map composited on top (same parameters as /api/attention, + smooth)."""
    args = params()
    name, run = get_run(args)
    pos, row = get_token(run, args.get("index"))
    smooth = choice(args, "smooth", ("0", "1"), "0") == "1"
    v = view_values(name, run, pos, row, args)
    k = get_image(run, args)
    several = len(run.layout) > 1
    values = v["values"][run.layout.keys_of(k)] if several else v["values"]
    grid, glob = run.layout.images[k].split(values)
    path = run.image_path(k if several else None)
    if path is None or not registry().inside(path):
        raise NotFound(f"run {name!r} has no image")
    with Image.open(path) as im:
        out = hm.overlay(im.convert("RGB").resize(display_size(run, k)), glob if grid is None else grid, smooth)
    buf = io.BytesIO()
    out.save(buf, "PNG")
    buf.seek(0)
    return send_file(buf, mimetype="image/png", download_name=f"{v['method']}_{pos}.png")
