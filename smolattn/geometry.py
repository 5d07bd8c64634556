"""Image-token geometry: where each ``<image>`` token of an Idefics3 prompt sits on the image.

The Idefics3 processor resizes the longest edge to ``size.longest_edge`` (2048 for SmolVLM), stretches
each side up to a multiple of the tile size (512), and cuts R x C tiles in row-major order; a global
tile (the whole image squashed to one tile) comes last. If the resized image fits in one tile there is
no split (R = C = 0) and only the global tile is present. Each tile becomes ``side x side`` tokens in
row-major order (8 x 8 for SmolVLM: 512 px / patch 16 / pixel-shuffle 4).

Because every resize stretches the whole image, the R*side x C*side token cells of the tiles form a
uniform grid over the ORIGINAL image, and the global tile's side x side cells form another one. The
geometry is always read from the token stream (the ``<row_r_col_c>`` and ``<global-img>`` markers and the
runs of ``<image>`` tokens), never assumed.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

import numpy as np

IMAGE_TOKEN = "<image>"
FAKE_TOKEN = "<fake_token_around_image>"
GLOBAL_TOKEN = "<global-img>"
ROW_COL = re.compile(r"^<row_(\d+)_col_(\d+)>$")


@dataclass(frozen=True)
class Geometry:
    rows: int               # tile rows R (0 when the image was not split)
    cols: int               # tile cols C
    side: int               # tokens per tile side (8 for SmolVLM)
    tile_starts: tuple      # position of the first <image> token of each tile, row-major
    global_start: int       # position of the first <image> token of the global tile
    image_block: tuple      # (first, last) position of the whole image block, markers included

    @property
    def per_tile(self) -> int:
        return self.side * self.side

    @property
    def key_positions(self) -> np.ndarray:
        """All image-token positions: the tiles row-major, then the global tile (the stored key order)."""
        starts = list(self.tile_starts) + [self.global_start]
        return np.concatenate([np.arange(s, s + self.per_tile) for s in starts])

    @property
    def block_end(self) -> int:
        """The first position after the image block (where the question's text starts)."""
        return self.image_block[1] + 1

    def outside_image(self, positions) -> np.ndarray:
        """Boolean mask over ``positions``: True where a position lies outside the image block (its
        ``<image>`` tokens and markers): the text before it, the question after it, the chat template,
        the answer. These are the query rows the compact stores keep and the viewer shows; the one
        definition of them."""
        first, last = self.image_block
        q = np.asarray(positions)
        return (q < first) | (q > last)

    @property
    def num_keys(self) -> int:
        return (self.rows * self.cols + 1) * self.per_tile

    @property
    def grid_shape(self) -> tuple[int, int]:
        """Cells of the tiled view over the original image (rows, cols); the global view if not split."""
        if self.rows == 0:
            return self.side, self.side
        return self.rows * self.side, self.cols * self.side

    def split(self, values: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
        """Values over the key positions (last axis, length num_keys) -> (tiled grid or None, global grid).

        Shapes: (..., R*side, C*side) and (..., side, side). The tiled grid is None when there are no tiles.
        """
        values = np.asarray(values)
        if values.shape[-1] != self.num_keys:
            raise ValueError(f"expected {self.num_keys} image keys, got {values.shape[-1]}")
        lead, s = values.shape[:-1], self.side
        glob = values[..., -self.per_tile:].reshape(*lead, s, s)
        if self.rows == 0:
            return None, glob
        tiles = values[..., :-self.per_tile].reshape(*lead, self.rows, self.cols, s, s)
        tiles = np.moveaxis(tiles, -2, -3).reshape(*lead, self.rows * s, self.cols * s)
        return tiles, glob

    def cell_box(self, i: int, j: int, image_size: tuple[int, int], view: str = "tiles") -> tuple:
        """Pixel box (x0, y0, x1, y1) of the ORIGINAL image covered by cell (i, j) of a view."""
        gh, gw = self.grid_shape if view == "tiles" else (self.side, self.side)
        w, h = image_size
        return (j * w / gw, i * h / gh, (j + 1) * w / gw, (i + 1) * h / gh)

    def to_json(self) -> dict:
        d = asdict(self)
        d["tile_starts"] = list(self.tile_starts)
        d["image_block"] = list(self.image_block)
        return d

    @classmethod
    def from_json(cls, d: dict) -> "Geometry":
        return cls(d["rows"], d["cols"], d["side"], tuple(d["tile_starts"]), d["global_start"],
                   tuple(d["image_block"]))


def cells_in_boxes(grid_shape, image_size, boxes) -> np.ndarray:
    """Boolean (gh, gw) mask of the cells of a view whose centre lies in one of ``boxes`` (COCO
    [x, y, w, h] in pixels of the ORIGINAL image, edges included). Every view covers the whole image
    uniformly, so cell (i, j) of a gh x gw view has its centre at ((j + .5) W / gw, (i + .5) H / gh)."""
    gh, gw = grid_shape
    w, h = image_size
    cy, cx = (np.arange(gh)[:, None] + 0.5) * h / gh, (np.arange(gw)[None, :] + 0.5) * w / gw
    inside = np.zeros((gh, gw), bool)
    for x, y, bw, bh in boxes:
        inside |= (cx >= x) & (cx <= x + bw) & (cy >= y) & (cy <= y + bh)
    return inside


def from_tokens(tokens) -> Geometry:
    """Recover the geometry of the (single) image from its token strings.

    Raises ValueError when the stream holds no well-formed image block.
    """
    tokens = list(tokens)
    runs, i = [], 0  # (start, length) of every run of <image> tokens
    while i < len(tokens):
        if tokens[i] == IMAGE_TOKEN:
            j = i
            while j < len(tokens) and tokens[j] == IMAGE_TOKEN:
                j += 1
            runs.append((i, j - i))
            i = j
        else:
            i += 1
    if not runs:
        raise ValueError("no <image> tokens in the sequence")
    per_tile = runs[0][1]
    side = math.isqrt(per_tile)
    if side * side != per_tile or any(n != per_tile for _, n in runs):
        raise ValueError(f"image token runs are not square tiles of equal size: {[n for _, n in runs]}")
    tiles, global_start = {}, None
    for start, _ in runs:
        marker = tokens[start - 1] if start > 0 else ""
        m = ROW_COL.match(marker)
        if m:
            tiles[(int(m.group(1)), int(m.group(2)))] = start
        elif marker == GLOBAL_TOKEN:
            if global_start is not None:
                raise ValueError("more than one image in the sequence (only one is supported)")
            global_start = start
        else:
            raise ValueError(f"<image> run at position {start} has no tile marker before it")
    if global_start is None:
        raise ValueError("no <global-img> tile in the sequence")
    rows = max((r for r, _ in tiles), default=0)
    cols = max((c for _, c in tiles), default=0)
    if set(tiles) != {(r, c) for r in range(1, rows + 1) for c in range(1, cols + 1)}:
        raise ValueError(f"tile markers do not form a full {rows}x{cols} grid")
    starts = tuple(tiles[(r, c)] for r in range(1, rows + 1) for c in range(1, cols + 1))
    first = (min(starts) if starts else global_start) - 2
    last = global_start + per_tile
    if tokens[first] != FAKE_TOKEN or last >= len(tokens) or tokens[last] != FAKE_TOKEN:
        raise ValueError("image block is not enclosed by <fake_token_around_image> markers")
    return Geometry(rows, cols, side, starts, global_start, (first, last))


def expected_grid(width: int, height: int, longest_edge: int = 2048, tile: int = 512) -> tuple[int, int]:
    """The tile grid (rows, cols) the Idefics3 processor will produce for an image, (0, 0) if unsplit.

    Mirrors the processor's resize arithmetic; tests check it against the processor itself.
    """
    aspect = width / height
    if width >= height:
        w, h = longest_edge, int(longest_edge / aspect)
        h += h % 2
    else:
        h, w = longest_edge, int(longest_edge * aspect)
        w += w % 2
    h, w = max(h, 1), max(w, 1)
    if w >= h:
        W = math.ceil(w / tile) * tile
        H = math.ceil(int(W / (w / h)) / tile) * tile
    else:
        H = math.ceil(h / tile) * tile
        W = math.ceil(int(H * (w / h)) / tile) * tile
    if H > tile or W > tile:
        return H // tile, W // tile
    return 0, 0
