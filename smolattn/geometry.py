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

A prompt may hold several images (each its own block with its own tiles and global tile, in order) or
the frames of a video (SmolVLM2: each frame one block with the global tile only, the frame squashed to
a square). :class:`Geometry` is one image; :class:`Layout` is every image of a prompt, with the offsets
of each image's keys on the stored key axis, and maps any ``<image>`` token back to its image (or
frame) and its pixels in that original image (:meth:`Layout.locate`, :meth:`Layout.pixel_box`).
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


def _image_runs(tokens) -> list[tuple[int, int]]:
    """(start, length) of every run of <image> tokens."""
    runs, i = [], 0
    while i < len(tokens):
        if tokens[i] == IMAGE_TOKEN:
            j = i
            while j < len(tokens) and tokens[j] == IMAGE_TOKEN:
                j += 1
            runs.append((i, j - i))
            i = j
        else:
            i += 1
    return runs


def _geometries(tokens) -> list[Geometry]:
    """Every image block of a token stream, in order: an image's tiles (``<row_r_col_c>`` runs) are
    closed by its ``<global-img>`` run; a video frame is a block with the global tile only."""
    tokens = list(tokens)
    runs = _image_runs(tokens)
    if not runs:
        raise ValueError("no <image> tokens in the sequence")
    per_tile = runs[0][1]
    side = math.isqrt(per_tile)
    if side * side != per_tile or any(n != per_tile for _, n in runs):
        raise ValueError(f"image token runs are not square tiles of equal size: {[n for _, n in runs]}")
    out, tiles = [], {}
    for start, _ in runs:
        marker = tokens[start - 1] if start > 0 else ""
        m = ROW_COL.match(marker)
        if m:
            if (int(m.group(1)), int(m.group(2))) in tiles:
                raise ValueError(f"tile marker {marker} twice in one image (no <global-img> tile between)")
            tiles[(int(m.group(1)), int(m.group(2)))] = start
            continue
        if marker != GLOBAL_TOKEN:
            raise ValueError(f"<image> run at position {start} has no tile marker before it")
        rows = max((r for r, _ in tiles), default=0)
        cols = max((c for _, c in tiles), default=0)
        if set(tiles) != {(r, c) for r in range(1, rows + 1) for c in range(1, cols + 1)}:
            raise ValueError(f"tile markers do not form a full {rows}x{cols} grid")
        starts = tuple(tiles[(r, c)] for r in range(1, rows + 1) for c in range(1, cols + 1))
        first = (min(starts) if starts else start) - 2
        last = start + per_tile
        if first < 0 or tokens[first] != FAKE_TOKEN or last >= len(tokens) or tokens[last] != FAKE_TOKEN:
            raise ValueError("image block is not enclosed by <fake_token_around_image> markers")
        out.append(Geometry(rows, cols, side, starts, start, (first, last)))
        tiles = {}
    if tiles:
        raise ValueError("no <global-img> tile in the sequence" if not out else
                         "tiles after the last <global-img> tile (an image without its global tile)")
    return out


def from_tokens(tokens) -> Geometry:
    """Recover the geometry of the (single) image from its token strings (:func:`layout_from_tokens`
    for several images or a video).

    Raises ValueError when the stream holds no well-formed image block, or more than one.
    """
    found = _geometries(tokens)
    if len(found) > 1:
        raise ValueError(f"more than one image in the sequence ({len(found)} image blocks; only one is supported here)")
    return found[0]


IMAGE, FRAME = "image", "frame"


@dataclass(frozen=True)
class Layout:
    """Every image of one prompt, in order: several images (each with its own tiles and global tile)
    or the frames of a video (each one square global tile, with its timestamp in seconds).

    The stored key axis is the images' :attr:`Geometry.key_positions` one after the other;
    :attr:`key_offsets` says where each image's keys start. With one image a Layout answers every
    single-image question (``rows``, ``split``, ...) as its :class:`Geometry` does, so callers
    written for one image keep working; with several they must say which image (``split(v, k)``).
    """
    images: tuple                  # Geometry per image, in prompt order
    kinds: tuple = ()              # "image" or "frame" per image (default: all images)
    timestamps: tuple = ()         # seconds per frame (None for images)

    def __post_init__(self):
        n = len(self.images)
        if not n:
            raise ValueError("a layout needs at least one image")
        if not self.kinds:
            object.__setattr__(self, "kinds", (IMAGE,) * n)
        if not self.timestamps:
            object.__setattr__(self, "timestamps", (None,) * n)
        if len(self.kinds) != n or len(self.timestamps) != n:
            raise ValueError(f"{n} images but {len(self.kinds)} kinds and {len(self.timestamps)} timestamps")
        if any(k not in (IMAGE, FRAME) for k in self.kinds):
            raise ValueError(f"unknown image kinds {set(self.kinds) - {IMAGE, FRAME}}")
        if any(k == FRAME and (g.rows or g.cols) for k, g in zip(self.kinds, self.images)):
            raise ValueError("a video frame is one square global tile (no tiles)")

    @classmethod
    def single(cls, geometry: Geometry) -> "Layout":
        return cls((geometry,))

    def __len__(self) -> int:
        return len(self.images)

    @property
    def is_video(self) -> bool:
        return FRAME in self.kinds

    @property
    def key_offsets(self) -> np.ndarray:
        """(n + 1,) start of each image's keys on the stored key axis, then the total."""
        return np.concatenate([[0], np.cumsum([g.num_keys for g in self.images])]).astype(np.int64)

    @property
    def key_positions(self) -> np.ndarray:
        """All image-token positions, image by image, each in its Geometry's stored order."""
        return np.concatenate([g.key_positions for g in self.images])

    @property
    def num_keys(self) -> int:
        return int(self.key_offsets[-1])

    @property
    def blocks(self) -> list[tuple[int, int]]:
        """(first, last) position of each image block, markers included."""
        return [tuple(g.image_block) for g in self.images]

    @property
    def image_block(self) -> tuple[int, int]:
        """(first, last) position spanning every image block (one image: its block)."""
        return self.images[0].image_block[0], self.images[-1].image_block[1]

    def keys_of(self, k: int) -> slice:
        """Image ``k``'s slice of the stored key axis."""
        self._check(k)
        off = self.key_offsets
        return slice(int(off[k]), int(off[k + 1]))

    def _check(self, k: int) -> None:
        if not 0 <= k < len(self.images):
            raise IndexError(f"image {k} out of range 0..{len(self.images) - 1}")

    @property
    def block_end(self) -> int:
        """The first position after the last image block."""
        return self.image_block[1] + 1

    def outside_image(self, positions, between: bool = True) -> np.ndarray:
        """:meth:`Geometry.outside_image` for every image: True where a position lies outside every
        image block (the text between two images or two frames included); ``between`` False: outside
        the whole span from the first block to the last."""
        q = np.asarray(positions)
        inside = np.zeros(q.shape, bool)
        for first, last in (self.blocks if between else [self.image_block]):
            inside |= (q >= first) & (q <= last)
        return ~inside

    def outside(self, positions, between: bool = True) -> np.ndarray:
        """The positions among ``positions`` that :meth:`outside_image` keeps."""
        q = np.asarray(positions)
        return q[self.outside_image(q, between)]

    def image_of_position(self, position: int) -> int | None:
        """The image whose block holds token ``position`` (markers included), or None."""
        for k, (first, last) in enumerate(self.blocks):
            if first <= position <= last:
                return k
        return None

    def locate(self, position: int) -> tuple[int, str, int, int] | None:
        """Where an ``<image>`` token sits: (image k, view "tiles" or "global", cell row, cell col) in
        that view's grid over the ORIGINAL image; None for any other position."""
        for k, g in enumerate(self.images):
            per = g.per_tile
            if g.global_start <= position < g.global_start + per:
                return (k, "global", *divmod(position - g.global_start, g.side))
            for t, start in enumerate(g.tile_starts):
                if start <= position < start + per:
                    r, c = divmod(t, g.cols)
                    i, j = divmod(position - start, g.side)
                    return k, "tiles", r * g.side + i, c * g.side + j
        return None

    def pixel_box(self, position: int, image_size) -> tuple | None:
        """Pixel box (x0, y0, x1, y1) in image k's ORIGINAL pixels (``image_size``: (W, H) of that
        image, or a list of sizes per image) that ``<image>`` token ``position`` covers. Every resize
        of the processor stretches the whole image (tiles; a frame's square squash), so undoing it is
        one scale per axis."""
        where = self.locate(position)
        if where is None:
            return None
        k, view, i, j = where
        size = image_size[k] if np.ndim(image_size) == 2 else image_size
        return self.images[k].cell_box(i, j, tuple(size), view)

    def keys_in_box(self, k: int, box, image_size, view: str | None = None) -> np.ndarray:
        """Indices on the stored key axis of image ``k``'s cells whose centre lies in ``box`` (COCO
        [x, y, w, h] in that image's original pixels); ``view``: "tiles", "global" or None for both."""
        self._check(k)
        g, base = self.images[k], int(self.key_offsets[k])
        out = []
        per = g.per_tile
        if view in (None, "global"):
            inside = cells_in_boxes((g.side, g.side), image_size, [box]).ravel()
            out.append(base + g.rows * g.cols * per + np.flatnonzero(inside))
        if view in (None, "tiles") and g.rows:
            inside = cells_in_boxes(g.grid_shape, image_size, [box])
            tiles = inside.reshape(g.rows, g.side, g.cols, g.side).transpose(0, 2, 1, 3).ravel()
            out.append(base + np.flatnonzero(tiles))
        return np.sort(np.concatenate(out)) if out else np.zeros(0, np.int64)

    def split(self, values: np.ndarray, k: int | None = None):
        """Image ``k``'s (tiled grid or None, global grid) from values over ALL stored keys (last axis);
        ``k`` may be left out only when there is one image."""
        values = np.asarray(values)
        if values.shape[-1] != self.num_keys:
            raise ValueError(f"expected {self.num_keys} image keys, got {values.shape[-1]}")
        if k is None:
            if len(self.images) > 1:
                raise ValueError(f"{len(self.images)} images in this prompt: say which one (image index 0.."
                                 f"{len(self.images) - 1})")
            k = 0
        return self.images[k].split(values[..., self.keys_of(k)])

    def mass(self, values: np.ndarray) -> np.ndarray:
        """Values over all stored keys (last axis) summed per image: (..., n) (a video's per-frame timeline)."""
        values = np.asarray(values)
        return np.add.reduceat(values, self.key_offsets[:-1], axis=-1)

    def __getattr__(self, name):
        # one image: the single-image API (rows, cols, side, tile_starts, global_start, grid_shape, cell_box)
        if name.startswith("_") or name in ("images", "kinds", "timestamps"):
            raise AttributeError(name)
        if len(self.images) == 1 and hasattr(self.images[0], name):
            return getattr(self.images[0], name)
        raise AttributeError(f"Layout.{name}: {len(self.images)} images in this prompt; ask one of layout.images")

    def to_json(self) -> dict:
        return {"images": [dict(g.to_json(), kind=kind, timestamp=ts)
                           for g, kind, ts in zip(self.images, self.kinds, self.timestamps)]}

    @classmethod
    def from_json(cls, d: dict) -> "Layout":
        if "images" not in d:     # a single-image geometry (format 1, 2)
            return cls.single(Geometry.from_json(d))
        return cls(tuple(Geometry.from_json(e) for e in d["images"]), tuple(e.get("kind", IMAGE) for e in d["images"]),
                   tuple(e.get("timestamp") for e in d["images"]))


def layout_from_tokens(tokens, kinds=None, timestamps=None) -> Layout:
    """Every image (or video frame) of a token stream, in order. The token stream cannot tell a
    video frame from an unsplit image: ``kinds`` / ``timestamps`` say it (default: images)."""
    found = _geometries(tokens)
    return Layout(tuple(found), tuple(kinds or ()), tuple(timestamps or ()))


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
