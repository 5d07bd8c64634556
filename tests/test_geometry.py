"""Geometry read from the token stream agrees with the Idefics3 processor itself."""
import numpy as np
import pytest
from PIL import Image

from smolattn import geometry as geo
from smolattn import model as mdl
from smolattn import standin, synthetic

SIZES = {  # (width, height): expected (rows, cols) for SmolVLM's settings
    (640, 480): (3, 4), (480, 640): (4, 3), (300, 300): (4, 4), (500, 500): (4, 4),
    (2048, 512): (1, 4), (4000, 300): (1, 4), (64, 64): (4, 4), (1, 1): (4, 4), (12000, 9000): (3, 4),
    (640, 427): (3, 4), (369, 520): (4, 3),
}


@pytest.fixture(scope="module")
def processor():
    return mdl.load(str(standin.ensure("tiny")), device="cpu").processor


def process(processor, image, longest_edge=None):
    text = mdl.chat_text(processor, "Describe.")
    kw = {"size": {"longest_edge": longest_edge}} if longest_edge else {}
    out = processor(text=text, images=[image], return_tensors="np", **kw)
    rc = processor.image_processor(images=[image], return_row_col_info=True, **kw)
    tokens = processor.tokenizer.convert_ids_to_tokens(out["input_ids"][0].tolist())
    return tokens, out["pixel_values"][0], (rc["rows"][0][0], rc["cols"][0][0])


@pytest.mark.parametrize("size", list(SIZES))
def test_grid_from_tokens_matches_processor(processor, size):
    tokens, pixels, rows_cols = process(processor, Image.new("RGB", size, (90, 120, 30)))
    g = geo.from_tokens(tokens)
    assert (g.rows, g.cols) == rows_cols == SIZES[size] == geo.expected_grid(*size)
    assert g.side == 8 and g.num_keys == (g.rows * g.cols + 1) * 64 == tokens.count("<image>")
    assert pixels.shape[0] == g.rows * g.cols + 1
    assert tokens[g.global_start - 1] == "<global-img>" and g.global_start > max(g.tile_starts)


def test_unsplit_image_has_only_the_global_tile(processor):
    tokens, pixels, rows_cols = process(processor, Image.new("RGB", (640, 480)), longest_edge=512)
    g = geo.from_tokens(tokens)
    assert rows_cols == (0, 0) == (g.rows, g.cols) == geo.expected_grid(640, 480, 512)
    assert g.num_keys == 64 and pixels.shape[0] == 1 and g.grid_shape == (8, 8)


@pytest.mark.parametrize("size", [(640, 480), (480, 640), (500, 500), (2048, 512), (369, 520)])
def test_token_cells_cover_the_right_pixels_of_the_original_image(processor, size):
    """Paint one cell's box of the ORIGINAL image white, find where it lands in the processor's tiles."""
    w, h = size
    tokens, pixels, _ = process(processor, Image.new("RGB", size), None)
    g = geo.from_tokens(tokens)
    gh, gw = g.grid_shape
    for (i, j) in [(0, 0), (gh - 1, gw - 1), (gh // 2, gw // 3)]:
        x0, y0, x1, y1 = g.cell_box(i, j, size)
        a = np.zeros((h, w, 3), np.uint8)
        a[int(np.ceil(y0)):int(y1), int(np.ceil(x0)):int(x1)] = 255
        _, px, _ = process(processor, Image.fromarray(a))
        # brightness of every 64x64 block of every tile, in key order (tiles row-major, then global)
        blocks = px.mean(axis=1).reshape(len(px), 8, 64, 8, 64).mean(axis=(2, 4)).reshape(-1)
        tiles, _ = g.split(blocks)
        assert np.unravel_index(np.argmax(tiles), tiles.shape) == (i, j)
        _, glob = g.split(blocks)
        gi, gj = np.unravel_index(np.argmax(glob), glob.shape)
        gx0, gy0, gx1, gy1 = g.cell_box(gi, gj, size, view="global")
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        assert gx0 - w / 8 <= cx <= gx1 + w / 8 and gy0 - h / 8 <= cy <= gy1 + h / 8


@pytest.mark.parametrize("rows,cols", [(3, 4), (4, 3), (4, 4), (1, 4), (0, 0)])
def test_split_puts_each_key_in_its_cell(rows, cols):
    tokens, _ = synthetic.make_tokens(rows, cols)
    g = geo.from_tokens(tokens)
    for key in sorted({k for k in (0, 7, 8, 63, 64, g.num_keys - 65, g.num_keys - 1) if 0 <= k < g.num_keys}):
        v = np.zeros(g.num_keys)
        v[key] = 1
        tiles, glob = g.split(v)
        if key >= g.num_keys - 64:
            assert glob.reshape(-1)[key - (g.num_keys - 64)] == 1 and (tiles is None or tiles.sum() == 0)
        else:
            t, k = divmod(key, 64)
            r, c = divmod(t, cols)
            assert tiles[r * 8 + k // 8, c * 8 + k % 8] == 1 and tiles.sum() == 1


@pytest.mark.parametrize("bad", [
    ["a", "b"],                                                    # no image
    ["<fake_token_around_image>", "<row_1_col_1>"] + ["<image>"] * 4 + ["<fake_token_around_image>"],  # no global
    ["<fake_token_around_image>", "<global-img>"] + ["<image>"] * 5 + ["<fake_token_around_image>"],   # not square
])
def test_malformed_token_streams_are_rejected(bad):
    with pytest.raises(ValueError):
        geo.from_tokens(bad)


def test_substring_lookalikes_are_not_markers():
    tokens, _ = synthetic.make_tokens(3, 4, answer=["Ġbrown", "Ġthrow", "Ġglobal", "Ġrow_1_col_1", "Ġnarrow"])
    g = geo.from_tokens(tokens)
    assert (g.rows, g.cols) == (3, 4)


@pytest.mark.parametrize("rows_cols", [(0, 0), (2, 3)])
def test_rows_outside_the_image_block(rows_cols):
    """geometry.outside_image is the one definition of the query rows outside the image block: the
    text before and after it; inside are only <image> tokens, the block's markers and its row breaks."""
    tokens, _ = synthetic.make_tokens(*rows_cols, side=2)
    g = geo.from_tokens(tokens)
    first, last = g.image_block
    outside = g.outside_image(np.arange(len(tokens)))
    block = {"<image>", "<fake_token_around_image>", "<global-img>", "\u010a", "\u010a\u010a"}
    assert all(t in block or geo.ROW_COL.match(t) for t, o in zip(tokens, outside) if not o)
    assert not any(t in block - {"\u010a", "\u010a\u010a"} or geo.ROW_COL.match(t) for t, o in zip(tokens, outside) if o)
    assert outside[:3].all() and outside[-3:].all() and outside.sum() == len(tokens) - (last - first + 1)
    assert tokens[g.block_end - 1] == "<fake_token_around_image>" and g.block_end == last + 1
    assert g.outside_image([first - 1, first, last, last + 1]).tolist() == [True, False, False, True]
