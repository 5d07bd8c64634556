"""Heatmap math: pick a token's attention over the image keys, reduce it over layers and heads,
and render it (colour map, overlay, colour bar). Shared by the viewer, compute_token_heatmap.py and
the POPE benchmark.

All maps here are vectors over the image keys in stored order (see geometry.Geometry.key_positions);
``Geometry.split`` turns them into the tiled grid and the global grid.
"""
from __future__ import annotations

import numpy as np

from .store import Layer, Run

HEAD_REDUCTIONS = ("mean", "max")


def token_rows(run: Run, layers, position: int, cache=None) -> np.ndarray:
    """(len(layers), H, K) image attention of token ``position`` (token t attending) in the given layers.

    ``cache``: optional callable ``(run, layer_index) -> Layer`` (the viewer's LRU); default reads from disk.
    """
    row = run.row_of(position)
    if row is None:
        raise KeyError(f"token {position} has no stored attention row")
    get = cache or (lambda r, i: r.layer(i))
    return np.stack([get(run, i).image[:, row] for i in layers])


def reduce(maps: np.ndarray, heads="mean") -> np.ndarray:
    """(L, H, K) -> (K,): mean over layers of the head reduction ("mean", "max" or a head index)."""
    if heads == "mean":
        per_layer = maps.mean(axis=1)
    elif heads == "max":
        per_layer = maps.max(axis=1)
    else:
        per_layer = maps[:, int(heads)]
    return per_layer.mean(axis=0)


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
