"""Heatmap math: pick a token's attention over the image keys, reduce it over layers and heads,
and render it (colour map, overlay, colour bar). Shared by the viewer, compute_token_heatmap.py and
the POPE benchmark.

All maps here are vectors over the image keys in stored order (see geometry.Geometry.key_positions);
``Geometry.split`` turns them into the tiled grid and the global grid.
"""
from __future__ import annotations

import difflib
import zipfile
from dataclasses import dataclass, field

import numpy as np

from . import outputs
from .errors import UserError
from . import tokens as tok
from .store import Layer, Run

HEAD_REDUCTIONS = ("mean", "max")

# compute_token_heatmap.py's files carry this marker (a PNG tEXt chunk, a JSON field), and an existing
# file is replaced only if it carries it (smolattn.outputs): never a picture or a JSON of the user's.
FORMAT = "smolattn-heatmap"
PNG_MARKER = outputs.PngText(FORMAT)
JSON_MARKER = outputs.JsonField(FORMAT)


def png_bytes(image) -> bytes:
    """A PIL image as PNG bytes carrying our marker (a tEXt chunk ``smolattn`` = ``smolattn-heatmap``)."""
    import io

    from PIL.PngImagePlugin import PngInfo
    info = PngInfo()
    info.add_text(PNG_MARKER.key, PNG_MARKER.value)
    buf = io.BytesIO()
    image.save(buf, "PNG", pnginfo=info)
    return buf.getvalue()


def token_rows(run: Run, layers, position: int, cache=None) -> np.ndarray:
    """(len(layers), H, K) image attention of token ``position`` (token t attending) in the given layers.

    ``cache``: optional callable ``(run, layer_index) -> Layer`` (the viewer's LRU); default reads from disk.
    """
    row = run.row_of(position)
    if row is None:
        raise KeyError(f"token {position} has no stored attention row")
    get = cache or (lambda r, i: r.layer(i))
    return np.stack([get(run, i).image[:, row] for i in layers])


def reduce_heads(maps: np.ndarray, heads="mean") -> np.ndarray:
    """(L, H, ...) -> (L, ...): mean or max over heads, or one head (an index)."""
    if heads == "mean":
        return maps.mean(axis=1)
    if heads == "max":
        return maps.max(axis=1)
    return maps[:, int(heads)]


def reduce(maps: np.ndarray, heads="mean") -> np.ndarray:
    """(L, H, K) -> (K,): mean over layers of the head reduction ("mean", "max" or a head index)."""
    return reduce_heads(maps, heads).mean(axis=0)


def drop_sink(values: np.ndarray) -> np.ndarray:
    """Renormalise over the image keys only (so the map sums to 1 whatever went to text/sink tokens)."""
    total = values.sum(axis=-1, keepdims=True)
    return np.divide(values, total, out=np.zeros_like(values, dtype=np.float64), where=total > 0)


# -- colour --------------------------------------------------------------------------------------
def hot(x: np.ndarray) -> np.ndarray:
    """Matplotlib's 'hot' colour map (black-red-yellow-white) for x in [0, 1] -> uint8 RGB."""
    x = np.clip(np.asarray(x, dtype=np.float64), 0, 1)
    r = np.clip(x / 0.365079, 0, 1)
    g = np.clip((x - 0.365079) / (0.746032 - 0.365079), 0, 1)
    b = np.clip((x - 0.746032) / (1 - 0.746032), 0, 1)
    return (np.stack([r, g, b], -1) * 255 + 0.5).astype(np.uint8)


def normalise(grid: np.ndarray, vmin: float | None = None, vmax: float | None = None) -> np.ndarray:
    lo = float(np.min(grid)) if vmin is None else vmin
    hi = float(np.max(grid)) if vmax is None else vmax
    return np.zeros_like(grid, dtype=np.float64) if hi <= lo else (grid - lo) / (hi - lo)


def heat_rgba(grid: np.ndarray, vmax: float | None = None, max_alpha: float = 0.75) -> np.ndarray:
    """Grid -> RGBA uint8 where the alpha follows the value: cold cells stay transparent."""
    n = normalise(grid, 0.0, vmax)
    rgba = np.empty(grid.shape + (4,), np.uint8)
    rgba[..., :3] = hot(n)
    rgba[..., 3] = (np.sqrt(n) * max_alpha * 255 + 0.5).astype(np.uint8)
    return rgba


def overlay(image, grid: np.ndarray, smooth: bool = False, vmax: float | None = None, max_alpha: float = 0.75):
    """The heat grid stretched over the whole image (tiles cover all of it), composited on top."""
    from PIL import Image
    base = image.convert("RGBA")
    heat = Image.fromarray(heat_rgba(grid, vmax, max_alpha), "RGBA")
    heat = heat.resize(base.size, Image.BILINEAR if smooth else Image.NEAREST)
    return Image.alpha_composite(base, heat).convert("RGB")


def figure(grid: np.ndarray, title: str, label: str, cell: int = 16):
    """A standalone heatmap picture: title, the grid in 'hot', and a colour bar with real values."""
    from PIL import Image, ImageDraw
    gh, gw = grid.shape
    cell = max(4, min(cell, 640 // max(gw, 1)))
    heat = Image.fromarray(hot(normalise(grid, 0.0))).resize((gw * cell, gh * cell), Image.NEAREST)
    pad, bar_w, top = 12, 18, 34
    W, H = heat.width + pad * 3 + bar_w + 80, heat.height + top + pad
    img = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(img)
    draw.text((pad, 10), title, fill="black")
    img.paste(heat, (pad, top))
    x0 = pad * 2 + heat.width
    ramp = np.linspace(1, 0, heat.height)[:, None].repeat(bar_w, 1)
    img.paste(Image.fromarray(hot(ramp)), (x0, top))
    vmax = float(grid.max())
    for frac in (0.0, 0.25, 0.5, 0.75, 1.0):
        y = top + int((1 - frac) * (heat.height - 1))
        draw.line([(x0 + bar_w, y), (x0 + bar_w + 4, y)], fill="black")
        draw.text((x0 + bar_w + 7, y - 6), f"{frac * vmax:.3g}", fill="black")
    draw.text((x0, top + heat.height + 1), label[:24], fill="black")
    return img


# ================================================================================================
# Token aggregation (compute_token_heatmap.py): one token's attention over the image, aggregated
# over layers and heads with the user's top-k + entropy weighting ("reference") or the same idea
# restricted to the image keys ("image"). Docs: docs/token-heatmap.md.
# ================================================================================================
METHODS = ("image", "reference")
GLOBAL_MODES = ("panel", "blend", "drop")
EPS = 1e-12  # inside the entropy's log, as in the user's script


@dataclass
class Aggregate:
    """One token's aggregated map. ``grid``: the tiled view (R*side, C*side) or None for an unsplit
    image; ``global_grid``: the global tile (side, side) or None (``--global drop``); ``weights``:
    (layer, head) -> weight of every head that counted; ``details``: per-head numbers for --json."""
    grid: np.ndarray | None
    global_grid: np.ndarray | None
    weights: dict
    total_weight: float
    method: str
    details: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        lists = lambda g: None if g is None else np.round(g, 9).tolist()  # noqa: E731
        per_head = self.details.get("per_head", {})
        return {"method": self.method, "grid": lists(self.grid), "global_grid": lists(self.global_grid),
                "total_weight": self.total_weight,
                "per_head": [{"layer": l, "head": h, "weight": self.weights.get((l, h), 0.0), **info}
                             for (l, h), info in per_head.items()],
                **{k: v for k, v in self.details.items() if k != "per_head"}}


def find_span(run: Run, token: str, index: int | None = None, occurrence: int | None = None) -> tuple[int, int]:
    """(first, last) positions of the token (or run of tokens) to aggregate; its row is the last one's.

    ``index`` (a position in the sequence) wins over ``token``. Otherwise ``token`` is matched on the
    decoded text (``smolattn.tokens``: byte-level pieces joined into whole characters), stripped and
    case-insensitive: first units whose text equals it (a token, or the tokens that together spell one
    or more characters), else occurrences inside the text (``고양이`` inside ``고양이를``). Answer
    matches come first, then the prompt, each in order; ``occurrence`` (1-based, default 1) picks one.
    A match over several tokens uses the last one's row: the step that has read the whole word.
    """
    n = len(run.tokens)
    if index is not None:
        if not 0 <= index < n:
            raise UserError(f"--index {index} is out of range 0..{n - 1}")
        return index, index
    units = tok.units(run.tokens)
    plen = min(run.prompt_length, n)
    matches = []
    for exact in (True, False):
        matches = [m for part in (range(plen, n), range(plen))
                   for m in tok.search(units, token, positions=part, exact=exact)]
        if matches:
            break
    if not matches:
        image = set(run.geometry.key_positions.tolist())
        words = sorted({u.text.strip().lower() for u in units if u.text.strip() and u.start not in image
                        and run.row_of(u.stop - 1) is not None})
        close = difflib.get_close_matches(token.strip().lower(), words, n=5, cutoff=0.0)
        raise UserError(f"token {token!r} not found; closest: {', '.join(map(repr, close)) or 'none'}")
    k = 1 if occurrence is None else occurrence
    if not 1 <= k <= len(matches):
        raise UserError(f"token {token!r} occurs {len(matches)} time(s) (positions "
                        f"{', '.join(f'{a}-{b}' if b > a else str(a) for a, b in matches)}); "
                        f"--occurrence must be 1..{len(matches)}")
    return matches[k - 1]


def find_token(run: Run, token: str, index: int | None = None, occurrence: int | None = None) -> int:
    """The position whose row :func:`find_span` picks."""
    return find_span(run, token, index, occurrence)[1]


def parse_layers(spec, num_layers: int, what: str = "layer") -> list[int]:
    """'all', 'a-b' (inclusive), 'a-' (to the end), 'a', or a comma list of those -> sorted indices."""
    if spec is None or str(spec).strip().lower() == "all":
        return list(range(num_layers))
    out = set()
    for part in str(spec).split(","):
        lo, dash, hi = part.strip().partition("-")
        try:
            a = int(lo)
            b = (int(hi) if hi.strip() else num_layers - 1) if dash else a
        except ValueError:
            raise UserError(f"malformed --{what}s {spec!r}: use 'a-b', 'a-' or a comma list like '0,3,5-7'")
        if a > b:
            raise UserError(f"malformed --{what}s {spec!r}: range {a}-{b} is empty")
        if a < 0 or b >= num_layers:
            raise UserError(f"{what} {b if b >= num_layers else a} out of range: this run has {what}s "
                            f"0..{num_layers - 1}")
        out.update(range(a, b + 1))
    return sorted(out)


def token_layers(run: Run, position: int, layers, heads) -> list[tuple[int, Layer]]:
    """The token's attention row in each layer, selected heads only: [(layer index, Layer with
    image (h, 1, K) and text (h, 1, T))]. Read once, shared by every view."""
    row = run.row_of(position)
    if row is None:
        raise UserError(f"token {tok.text_at(run.tokens, position).strip()!r} at position {position} "
                        "has no stored attention row (pick a text or answer token)")
    heads, out = list(heads), []
    for i in layers:
        try:
            layer = run.layer(i)
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
            raise UserError(f"{run.path}: cannot read layer {i}: {e}")
        out.append((i, Layer(layer.image[heads, row][:, None], layer.text[heads, row][:, None])))
    return out


def _topk(p: np.ndarray, k: int) -> np.ndarray:
    """Per row: keep the k largest entries (argpartition; ties arbitrary), renormalise to sum 1.
    Rows with nothing left become all zeros. k <= 0 or k >= length: unchanged."""
    if not 0 < k < p.shape[-1]:
        return p
    keep = np.argpartition(p, -k, axis=-1)[..., -k:]
    q = np.zeros_like(p)
    np.put_along_axis(q, keep, np.take_along_axis(p, keep, -1), -1)
    s = q.sum(-1, keepdims=True)
    return np.divide(q, s, out=np.zeros_like(q), where=s > 0)


def _entropy(p: np.ndarray) -> np.ndarray:
    """H = -sum (p + 1e-12) ln(p + 1e-12) over the last axis (every entry, zeros included)."""
    return -np.sum((p + EPS) * np.log(p + EPS), axis=-1)


def _focus(p: np.ndarray, scale: np.ndarray, topk: int):
    """The shared step: p (h, n) distributions -> (top-k p, weight = scale * max(0, 1 - H / ln n), info)."""
    p = _topk(p, topk)
    H = _entropy(p)
    ent_w = np.maximum(0.0, 1.0 - H / np.log(p.shape[-1]))
    w = np.where((scale > 0) & (p.sum(-1) > 0), scale * ent_w, 0.0)
    return p, w, {"entropy": H, "ent_weight": ent_w}


def _weighted_mean(rows, heads, per_layer, required=True):
    """Weighted mean over (layer, head) of what ``per_layer(Layer)`` returns for each layer's rows:
    (P (h, n), weights (h,), {name: (h,) numbers}). Heads with weight <= 0 are skipped.
    -> (mean (n,), weights {(l, h): w}, total, per-head info {(l, h): {name: x}})."""
    acc, total, weights, per_head = None, 0.0, {}, {}
    for li, layer in rows:
        P, w, info = per_layer(layer)
        acc = np.zeros(P.shape[-1]) if acc is None else acc
        for j, h in enumerate(heads):
            per_head[(li, h)] = {k: float(v[j]) for k, v in info.items()}
            if w[j] > 0:
                acc += w[j] * P[j]
                total += float(w[j])
                weights[(li, h)] = float(w[j])
    if total <= 0 and required:
        raise UserError("every selected (layer, head) has zero weight for this token (no attention to "
                        "aggregate); try other --layers/--heads or --topk 0")
    return (acc / total if total > 0 else acc), weights, total, per_head


def _details(run, position, layers, heads, topk, num_keys, per_head, **extra) -> dict:
    return {"position": position, "token": tok.text_at(run.tokens, position).strip(),
            "raw_token": run.tokens[position], "layers": list(layers), "heads": list(heads),
            "topk": topk, "num_keys": num_keys, "per_head": per_head, **extra}


def aggregate_reference(run: Run, position: int, layers, heads, topk: int = 10) -> Aggregate:
    """The user's compute_token_heatmap.py, exactly. Per (layer l, head h), with x the token's full
    attention row over all S keys (BOS, text, tile and global image tokens):

        attn_sum = sum(x);  p = topk_renorm(x / attn_sum, k)          (top-k over ALL S keys)
        H = -sum_S (p + 1e-12) ln(p + 1e-12);  weight = attn_sum * max(0, 1 - H / ln S)
        grid = sum_lh weight * p[tile keys] / sum_lh weight             (weighted mean)

    Heads with attn_sum <= 0 or weight <= 0 are skipped. The map is drawn from the tile entries only
    (global and text entries are discarded, as upstream); ``global_grid`` is returned for information.
    S is the number of keys stored (the reference files may cover one position fewer than the tokens).
    """
    g, heads = run.geometry, list(heads)
    if g.rows == 0:
        raise UserError("--method reference draws only tiles and this image was not split; use --method image")
    rows = token_layers(run, position, layers, heads)
    S = rows[0][1].image.shape[-1] + rows[0][1].text.shape[-1]

    def per_layer(layer):
        x = run.full_row(layer, 0)[:, :S].astype(np.float64)
        attn_sum = x.sum(-1)
        p, w, info = _focus(x / np.where(attn_sum > 0, attn_sum, 1)[:, None], attn_sum, topk)
        return p[:, g.key_positions], w, dict(info, attn_sum=attn_sum)

    vec, weights, total, per_head = _weighted_mean(rows, heads, per_layer)
    grid, glob = g.split(vec)
    return Aggregate(grid, glob, weights, total, "reference",
                     _details(run, position, layers, heads, topk, S, per_head))


def aggregate_image(run: Run, position: int, layers, heads, topk: int = 10, global_mode: str = "panel") -> Aggregate:
    """The same idea over the image keys only, for each view of the image separately (the tiled view:
    the R*C*side^2 tile keys; the global view: the side^2 global-tile keys). Per (layer, head), with x
    the token's row over all keys and v its part over the K keys of the view:

        image_mass = sum(v) / sum(x);  p = topk_renorm(v / sum(v), k)  (top-k over the view's K keys)
        H = -sum_K (p + 1e-12) ln(p + 1e-12);  weight = image_mass * max(0, 1 - H / ln K)
        map = sum_lh weight * p / sum_lh weight                        (sums to 1 over the view)

    So a head counts in proportion to how much of its attention goes to that view of the image and
    how focused it is there. ``global_mode``: 'panel' returns both views (``grid`` and
    ``global_grid``); 'blend' makes ``grid`` the equal-weight average of the two views (see
    :func:`blend_global`); 'drop' skips the global view. An unsplit image has only the global view,
    which is then the map (``grid`` None). ``weights`` are the main view's; the global view's are in
    ``details['global']``.
    """
    if global_mode not in GLOBAL_MODES:
        raise UserError(f"unknown global mode {global_mode!r}; choose one of {', '.join(GLOBAL_MODES)}")
    g, heads = run.geometry, list(heads)
    rows = token_layers(run, position, layers, heads)
    tiles = g.num_keys - g.per_tile

    def view(keys, required):
        def per_layer(layer):
            image = layer.image[:, 0].astype(np.float64)
            v = image[:, keys]
            m, row_sum = v.sum(-1), image.sum(-1) + layer.text[:, 0].sum(-1)
            mass = np.divide(m, row_sum, out=np.zeros_like(m), where=row_sum > 0)
            p, w, info = _focus(v / np.where(m > 0, m, 1)[:, None], mass, topk)
            return p, w, dict(info, image_mass=mass)
        return _weighted_mean(rows, heads, per_layer, required)

    glob_keys = slice(tiles, g.num_keys)
    if tiles == 0:                                                   # unsplit: the global view is the map
        vec, weights, total, per_head = view(glob_keys, True)
        return Aggregate(None, vec.reshape(g.side, g.side), weights, total, "image",
                         _details(run, position, layers, heads, topk, g.per_tile, per_head, view="global"))
    vec, weights, total, per_head = view(slice(0, tiles), global_mode == "drop")
    grid = g.split(np.concatenate([vec, np.zeros(g.per_tile)]))[0]
    details = _details(run, position, layers, heads, topk, tiles, per_head, view="tiles", global_mode=global_mode)
    glob = None
    if global_mode != "drop":                                   # one empty view is fine, both is an error
        gvec, gw, gtotal, gper_head = view(glob_keys, total <= 0)
        glob = gvec.reshape(g.side, g.side)
        details["global"] = {"total_weight": gtotal, "num_keys": g.per_tile,
                             "per_head": [{"layer": l, "head": h, "weight": gw.get((l, h), 0.0), **info}
                                          for (l, h), info in gper_head.items()]}
        if global_mode == "blend":
            grid = blend_global(grid, glob, g.rows, g.cols)
    return Aggregate(grid, glob, weights, total, "image", details)


def method_map(run: Run, name: str, position: int, layers=None, start_layer: int = 0) -> np.ndarray:
    """A derived method's stored map (K,) of token ``position`` (smolattn.methods): the start layer's map
    for rollout/relevancy, the mean over ``layers`` (default all) for per-layer methods (relative)."""
    m = run.method(name)
    i = m.index(position)
    if i is None:
        raise UserError(f"token {tok.text_at(run.tokens, position).strip()!r} at position {position} has no "
                        f"{name} map ({name} covers {m.meta.get('rows', 'other tokens')})")
    n = m.maps.shape[0]
    if m.meta.get("axis") == "start_layer":
        if not 0 <= start_layer < n:
            raise UserError(f"start layer {start_layer} out of range: this run has layers 0..{n - 1}")
        return m.maps[start_layer, i].astype(np.float64)
    return m.maps[list(range(n)) if layers is None else list(layers), i].mean(0).astype(np.float64)


def aggregate_method(run: Run, position: int, name: str, layers=None, start_layer: int = 0) -> Aggregate:
    """:func:`method_map` as an :class:`Aggregate` (tiled grid + global grid; no head weights)."""
    vec = method_map(run, name, position, layers, start_layer)
    grid, glob = run.geometry.split(vec)
    m = run.method(name)
    axis = {"start_layer": {"start_layer": start_layer}, "layer": {"layers": list(layers or range(m.maps.shape[0]))}}
    details = {"position": position, "token": tok.text_at(run.tokens, position).strip(),
               "raw_token": run.tokens[position], "num_keys": len(vec), "row": m.meta.get("rows"),
               "params": m.meta.get("params", {}), **axis.get(m.meta.get("axis"), {})}
    return Aggregate(grid, glob, {}, float(vec.sum()), name, details)


def blend_global(grid: np.ndarray, glob: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Equal-weight average of the tiled view and the global view over the tiled grid, each view
    renormalised to sum 1 (a view with no mass is left out). Both views cover the whole original image
    uniformly, so global cell (i, j) covers tiled cells [i*R:(i+1)*R, j*C:(j+1)*C] exactly: it is
    repeated there (nearest) and divided by R*C, which keeps the upsampled view summing to 1."""
    up = np.repeat(np.repeat(glob, rows, 0), cols, 1) / (rows * cols)
    views = [v / v.sum() for v in (grid, up) if v.sum() > 0]
    return sum(views) / len(views)


def side_by_side(*images):
    """Paste pictures left to right on white, top-aligned (the tiled and global panels)."""
    from PIL import Image
    out = Image.new("RGB", (sum(im.width for im in images), max(im.height for im in images)), "white")
    x = 0
    for im in images:
        out.paste(im, (x, 0))
        x += im.width
    return out


def aggregate_figures(agg: Aggregate, title: str, panel_global: bool):
    """(main figure, global figure or None). The main figure shows the tiled view (the global view
    for an unsplit image) with a colour bar; with ``panel_global`` the global tile becomes its own
    panel beside it and is also returned alone. The global panel is drawn over the same image area
    as the tiled one: each global cell covers R x C tiled cells (values unchanged), so both panels have
    the image's shape and line up."""
    label = {"reference": "share of top-k attn", "rollout": "rollout", "relevancy": "relevancy",
             "relative": "attn / generic attn"}.get(agg.method, "share of top-k img attn")
    if agg.details.get("global_mode") == "blend" and agg.grid is not None:
        label = "share of image (blend)"
    main = agg.grid if agg.grid is not None else agg.global_grid
    fig = figure(main, title if agg.grid is not None else f"{title} (global tile)", label)
    if not panel_global or agg.grid is None or agg.global_grid is None:
        return fig, None
    r, c = agg.grid.shape[0] // agg.global_grid.shape[0], agg.grid.shape[1] // agg.global_grid.shape[1]
    glob = figure(np.repeat(np.repeat(agg.global_grid, r, 0), c, 1), "global tile (whole image, 8x8)", label)
    return side_by_side(fig, glob), glob
