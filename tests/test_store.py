"""The one reader opens our runs and the reference project's runs; tokens are classified exactly."""
import json
import shutil

import numpy as np
import pytest

from smolattn import store, synthetic
from smolattn.errors import UserError


def test_reference_format_needs_explicit_pickle_opt_in(tmp_path):
    tokens, _ = synthetic.make_tokens(3, 4)
    hot = len(tokens) - 3
    synthetic.make_run(tmp_path / "ref", 3, 4, reference=True, one_hot={hot: 100})
    with pytest.raises(UserError, match="allow-pickle"):
        store.Run(tmp_path / "ref")
    run = store.Run(tmp_path / "ref", allow_pickle=True)
    assert (run.geometry.rows, run.geometry.cols) == (3, 4) and run.store == "reference"
    assert run.layer(1).image[0, run.row_of(hot)].argmax() == 100
    assert run.tokens[run.prompt_length - 3:run.prompt_length] == ["Ass", "istant", ":"]
    assert run.image_size() == (640, 480)


@pytest.mark.parametrize("five_d", [False, True])
def test_reference_attention_array_npy(tmp_path, five_d):
    tokens, plen = synthetic.make_tokens(4, 3)
    S = len(tokens)
    a = np.random.default_rng(0).random((2, 3, S, S)).astype(np.float16)
    tmp_path.joinpath("run").mkdir()
    np.save(tmp_path / "run" / "decoded_tokens.npy", np.array(tokens))
    np.save(tmp_path / "run" / "attention_array.npy", a[:, None] if five_d else a)
    run = store.Run(tmp_path / "run")
    assert (run.num_layers, run.num_heads) == (2, 3) and (run.geometry.rows, run.geometry.cols) == (4, 3)
    np.testing.assert_array_equal(run.layer(1).image, a[1][..., run.geometry.key_positions].astype(np.float32))
    np.testing.assert_array_equal(run.full_row(run.layer(1), 5), a[1][:, 5].astype(np.float32))


def test_not_a_run_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        store.Run(tmp_path / "nope")
    with pytest.raises(UserError, match="decoded_tokens"):
        store.Run(tmp_path)
    np.save(tmp_path / "decoded_tokens.npy", np.array(["a", "b"]))
    with pytest.raises(UserError, match="attention files"):
        store.Run(tmp_path)


def test_token_table_classifies_exactly_not_by_substring(tmp_path):
    answer = ["Ġbrown", "Ġthrow", "Ġglobal", "Ġ<row", "<image>x", "Ċ", "Ġ&", "<end_of_utterance>"]
    synthetic.make_run(tmp_path / "r", 3, 4, answer=answer)
    run = store.Run(tmp_path / "r")
    table = store.token_table(run)
    ans = table[run.prompt_length:]
    assert [t["kind"] for t in ans] == ["answer"] * 7 + ["special"] + ["special"]
    assert [t["text"] for t in ans[:7]] == [" brown", " throw", " global", " <row", "<image>x", "\n", " &"]
    kinds = [t["kind"] for t in table]
    assert kinds.count("image") == 13 * 64
    assert table[run.geometry.tile_starts[0] - 1]["kind"] == "marker"
    assert all(t["has_row"] for t in ans)


def test_display_token_decodes_byte_level_bpe():
    assert store.display_token("ĠcafÃ©") == " café"
    assert store.display_token("ĊĊ") == "\n\n"
    assert store.display_token("<row_1_col_2>") == "<row_1_col_2>"
    assert store.display_token(" statue") == " statue"          # upstream's readable token files


def test_quantisation_error_bound():
    x = np.random.default_rng(1).random((3, 5, 700)).astype(np.float32) ** 4
    q, s = store.quantize(x)
    err = np.abs(store.dequantize(q, s) - x)
    assert q.dtype == np.uint8 and np.all(err <= x.max(-1, keepdims=True) / 510 + 1e-7)
    z, zs = store.quantize(np.zeros((2, 4)))
    assert np.all(store.dequantize(z, zs) == 0)


def test_future_format_version_is_refused(tmp_path):
    run = synthetic.make_run(tmp_path / "r", 1, 4)
    meta = (run / "meta.json").read_text()
    assert f'"format_version": {store.FORMAT_VERSION}' in meta
    (run / "meta.json").write_text(meta.replace(f'"format_version": {store.FORMAT_VERSION}', '"format_version": 99'))
    with pytest.raises(UserError, match="version 1 or 2"):
        store.Run(run)


@pytest.mark.parametrize("mode", ["compact", "compact8"])
def test_format_v1_runs_read_as_before(tmp_path, mode):
    """A v1 run (one np.savez_compressed file per layer) reads the same maps as the v2 run it was made from."""
    v2 = synthetic.make_run(tmp_path / "v2", 3, 4, store_mode=mode)
    v1 = tmp_path / "v1"
    shutil.copytree(v2, v1)
    meta = json.loads((v1 / "meta.json").read_text())
    for i in range(meta["attention"]["num_layers"]):
        arrays = store.Run(v2).layer_arrays(i)
        np.savez_compressed(v1 / store.LAYER_FILE_V1.format(i), **arrays)
    for f in (v1 / "attention").glob("*.b2"):
        f.unlink()
    meta["format_version"] = 1
    del meta["attention"]["arrays"], meta["attention"]["codec"]
    (v1 / "meta.json").write_text(json.dumps(meta))
    a, b = store.Run(v1), store.Run(v2)
    assert list((v1 / "attention").iterdir()) and not list((v1 / "attention").glob("*.b2"))
    for i in range(a.num_layers):
        np.testing.assert_array_equal(a.layer(i).image, b.layer(i).image)
        np.testing.assert_array_equal(a.layer(i).text, b.layer(i).text)
