"""Captured attention equals eager attention; capture never changes the answer; stores agree."""
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText

from smolattn import extract as ex
from smolattn import model as mdl
from smolattn import standin, store, synthetic


@pytest.fixture(scope="module")
def runs(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    img = root / "img.png"
    synthetic.test_image((640, 480)).save(img)
    out = {}
    for mode in store.STORES:
        ex.extract(tiny, img, root / mode, ex.Settings(max_new_tokens=6, store=mode))
        out[mode] = store.Run(root / mode)
    return out


@pytest.fixture(scope="module")
def eager(tiny, runs):
    """Eager attention of one forward pass over prompt + answer (output_attentions=True)."""
    run = runs["compact"]
    model = AutoModelForImageTextToText.from_pretrained(str(standin.ensure("tiny")), dtype=torch.float32,
                                                        attn_implementation="eager")
    _, inputs = mdl.encode(tiny, Image.open(run.image_path()).convert("RGB"), run.meta["prompt"])
    ids = torch.tensor([run.meta["token_ids"]])
    with torch.no_grad():
        o = model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=inputs["pixel_values"],
                  pixel_attention_mask=inputs["pixel_attention_mask"], output_attentions=True)
    assert o.attentions and o.attentions[0] is not None
    return [a[0].numpy() for a in o.attentions]          # per layer (H, S, S)


def test_compact_rows_equal_eager_within_fp16(runs, eager):
    run = runs["compact"]
    assert len(eager) == run.num_layers
    for i in range(run.num_layers):
        layer = run.layer(i)
        for row, pos in enumerate(run.query_positions):
            np.testing.assert_allclose(run.full_row(layer, row), eager[i][:, pos], atol=2e-6, rtol=2e-3)


def test_every_text_and_answer_token_has_a_row_including_the_last(runs):
    run = runs["compact"]
    first, last = run.geometry.image_block
    expected = [i for i in range(len(run.tokens)) if not first <= i <= last]
    assert run.query_positions.tolist() == expected
    assert run.query_positions[-1] == len(run.tokens) - 1


def test_full_store_is_the_reference_layout_and_matches_eager(runs, eager):
    run = runs["full"]
    S = len(run.tokens)
    with np.load(run.path / "attentions_5" / "attention_fp16_rounded_layer_0.npz") as z:
        assert z["attention"].shape == (1, run.num_heads, S, S) and z["attention"].dtype == np.float16
    for i in range(run.num_layers):
        np.testing.assert_allclose(run._full_layer(i).astype(np.float32), eager[i], atol=2e-6, rtol=2e-3)


def test_compact_heatmaps_equal_full_store(runs):
    compact, full = runs["compact"], runs["full"]
    for i in range(compact.num_layers):
        a, b = compact.layer(i), full.layer(i)
        for row, pos in enumerate(compact.query_positions):
            np.testing.assert_array_equal(a.image[:, row], b.image[:, full.row_of(pos)])


def test_quantised_store_error_bound(runs):
    exact, q = runs["compact"], runs["compact8"]
    for i in range(exact.num_layers):
        a, b = exact.layer(i).image, q.layer(i).image
        bound = a.max(axis=-1, keepdims=True) / 510 + 1e-7
        assert np.all(np.abs(a - b) <= bound)


def test_capture_does_not_change_the_answer(tiny, runs):
    run = runs["compact"]
    _, inputs = mdl.encode(tiny, Image.open(run.image_path()).convert("RGB"), run.meta["prompt"])
    plain = mdl.generate(tiny, inputs, 6)
    assert plain == run.meta["token_ids"][run.prompt_length:]


def test_meta_records_what_a_reader_needs(runs):
    m = runs["compact"].meta
    assert m["model"]["standin"] is True and m["generation"]["greedy"] is True
    assert m["generation"]["new_tokens"] == 6 and m["prompt"] == ex.DEFAULT_PROMPT
    assert m["tiles"] == {"rows": 3, "cols": 4, "global_last": True, "resized_size": [2048, 1536],
                          "tokens_per_tile_side": 8}
    assert m["image"]["size"] == [640, 480] and m["processor"]["longest_edge"] == 2048
    assert set(m["versions"]) >= {"torch", "transformers"} and "generate_s" in m["timings"]
    assert m["attention"]["query_semantics"].startswith("row for token t")
    tokens = np.load(runs["compact"].path / "decoded_tokens.npy", allow_pickle=False)
    assert tokens.dtype.kind == "U" and len(tokens) == len(m["token_ids"])


class _Attention(torch.nn.Module):
    layer_idx, num_key_value_groups, is_causal = 0, 3, True


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_capture_is_the_fp32_softmax_of_its_own_queries_and_keys(dtype):
    """Issue 17.6: bf16/fp16 capture against the fp32 softmax of the SAME bf16/fp16 queries and keys,
    upcast (so only the capture is tested, not the model's dtype drift). Tolerance: the fp16 storage
    rounding of each probability, |error| <= p * 2^-10 + 1e-7 (half an fp16 ulp is p * 2^-11; the
    rest is fp32 summation order). Scores in the model dtype (the old capture) miss this by ~10x."""
    torch.manual_seed(0)
    H, KV, S, D = 9, 3, 900, 64                     # the 256M model's heads and head size, a 900-token prompt
    q, k, v = (torch.randn(1, n, S, D).mul(2).to(dtype) for n in (H, KV, KV))
    rows = np.array([0, 7, 450, S - 2, S - 1])
    rec = mdl.Recorder(rows)
    rec.allocate(1, H, 0, S)
    with rec:
        mdl.capture_attention(_Attention(), q, k, v, None, scaling=D ** -0.5)
    got = rec.buffer[0, 0, :, :len(rows), :S].float()
    kk = k.float().repeat_interleave(H // KV, dim=1)[0]
    scores = q.float()[0][:, rows] @ kk.transpose(1, 2) * D ** -0.5
    scores = scores.masked_fill(torch.arange(S)[None, None, :] > torch.as_tensor(rows)[None, :, None], float("-inf"))
    want = torch.softmax(scores, dim=-1)
    assert torch.all((got - want).abs() <= want * 2 ** -10 + 1e-7)
