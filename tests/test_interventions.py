"""Interventions (issue 18) against independent references on the tiny stand-in, fp32.

* no intervention: the capture path is bit for bit the plain one;
* head ablation == a copy of the model whose o_proj weight columns of that head are zeroed (logits
  within 1e-5); mean ablation == an o_proj pre-hook that writes the slice's mean over positions;
* knockout / block-image-from-L == an eager attention written here that puts -inf at exactly the
  chosen (layer, query, key) triples (logits within 1e-5, captured rows = its probabilities);
* the batched suffix sweep == each window's full forward alone, also for 2 images of different grids;
* the CLI: each command form end to end on a tiny run; bad input: one line, before the model loads.
"""
import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AttentionInterface, AutoModelForImageTextToText
from transformers.integrations.sdpa_attention import repeat_kv
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from smolattn import engine
from smolattn import extract as ex
from smolattn import interventions as iv
from smolattn import model as mdl
from smolattn import standin, store, synthetic
from smolattn.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "Is there a dog in the picture?"
TOL = 1e-5

# ---------------------------------------------------------------------------------- the reference
KNOCK: dict = {}     # layer -> list of (queries, keys) absolute positions (batch of one, no padding)


def knock_eager(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Plain eager attention; scores get -inf at exactly the (query, key) pairs of KNOCK[layer]."""
    k = repeat_kv(key, module.num_key_value_groups)
    v = repeat_kv(value, module.num_key_value_groups)
    scores = torch.matmul(query, k.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask[..., :k.shape[2]]
    for qs, ks in KNOCK.get(module.layer_idx, []):
        scores[:, :, torch.tensor(qs)[:, None], torch.tensor(ks)[None, :]] = float("-inf")
    probs = torch.softmax(scores.float(), dim=-1).to(query.dtype)
    module._probs = probs
    return torch.matmul(probs, v).transpose(1, 2).contiguous(), probs


@pytest.fixture(scope="module")
def reference_model():
    AttentionInterface.register("test_knock", knock_eager)
    AttentionMaskInterface.register("test_knock", eager_mask)
    m = AutoModelForImageTextToText.from_pretrained(
        str(standin.ensure("tiny")), dtype=torch.float32,
        attn_implementation={"text_config": "test_knock", "vision_config": "sdpa", "": "sdpa"})
    return m.eval()


@pytest.fixture(scope="module")
def inputs(tiny):
    _, x = mdl.encode(tiny, synthetic.test_image((640, 480)), PROMPT)
    return x


def logits(model, inputs, ids=None):
    ids = inputs["input_ids"] if ids is None else ids
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=inputs["pixel_values"],
                     pixel_attention_mask=inputs["pixel_attention_mask"]).logits[0]


def geometry(tiny, inputs):
    from smolattn import geometry as geo
    return geo.from_tokens(tiny.processor.tokenizer.convert_ids_to_tokens(inputs["input_ids"][0].tolist()))


def prepared(tiny, size, prompt=PROMPT):
    return engine.prepare(tiny.processor, synthetic.test_image(size), prompt)


# ---------------------------------------------------------------------------------- the tests

def test_no_intervention_is_the_plain_capture_bit_for_bit(tiny):
    preps = [prepared(tiny, (640, 480)), prepared(tiny, (300, 500), "What is it?")]
    plain = engine.run(tiny, preps, 5)
    with iv.applied(iv.Spec()):
        empty = engine.run(tiny, preps, 5)
    assert getattr(mdl._local, "intervention", None) is None
    for a, b in zip(plain, empty):
        assert a.new == b.new
        np.testing.assert_array_equal(a.layers, b.layers)


def test_head_ablation_equals_zeroed_o_proj_columns(tiny, inputs):
    heads = ((1, 3), (2, 0), (2, 1))
    ref = copy.deepcopy(tiny.model)
    D = tiny.model.config.text_config.head_dim
    for layer, h in heads:
        ref.model.text_model.layers[layer].self_attn.o_proj.weight.data[:, h * D:(h + 1) * D] = 0
    want = logits(ref, inputs)
    with iv.applied(iv.Spec(heads=heads)):
        got = logits(tiny.model, inputs)
    plain = logits(tiny.model, inputs)
    assert (plain - want).abs().max() > 1e-3          # the ablation changes something
    torch.testing.assert_close(got, want, atol=TOL, rtol=0)


def test_mean_ablation_equals_a_pre_hook_writing_the_mean(tiny, inputs):
    ref = copy.deepcopy(tiny.model)
    D = tiny.model.config.text_config.head_dim

    def hook(_m, args):
        x = args[0].clone()
        x[..., 3 * D:4 * D] = x[..., 3 * D:4 * D].mean(dim=1, keepdim=True)
        return (x,)
    ref.model.text_model.layers[1].self_attn.o_proj.register_forward_pre_hook(hook)
    with iv.applied(iv.Spec(heads=((1, 3),), ablation="mean")):
        got = logits(tiny.model, inputs)
    torch.testing.assert_close(got, logits(ref, inputs), atol=TOL, rtol=0)


def test_head_ablation_in_batched_generation_with_left_padding(tiny):
    heads = ((0, 1), (3, 2))
    ref = copy.deepcopy(tiny)
    D = tiny.model.config.text_config.head_dim
    for layer, h in heads:
        ref.model.model.text_model.layers[layer].self_attn.o_proj.weight.data[:, h * D:(h + 1) * D] = 0
    preps = [prepared(tiny, (640, 480)), prepared(tiny, (300, 500), "What is it?")]
    want = engine.run(ref, preps, 6)
    with iv.applied(iv.Spec(heads=heads)):
        got = engine.run(tiny, preps, 6)
    for a, b in zip(got, want):
        assert a.new == b.new
        np.testing.assert_allclose(a.layers.astype(np.float32), b.layers.astype(np.float32), atol=1e-3)


def knock_case(tiny, inputs):
    g = geometry(tiny, inputs)
    P = inputs["input_ids"].shape[1]
    image = g.key_positions.tolist()
    return g, P, [iv.Knockout((1, 2), (P - 1,), tuple(image[:200])),
                  iv.Knockout((0,), tuple(range(g.image_block[1] + 1, P)), tuple(image[50:90]))]


def test_knockout_equals_eager_with_inf_at_the_triples(tiny, inputs, reference_model):
    _, P, kos = knock_case(tiny, inputs)
    KNOCK.clear()
    for k in kos:
        for layer in k.layers:
            KNOCK.setdefault(layer, []).append((list(k.queries), list(k.keys)))
    want = logits(reference_model, inputs)
    KNOCK.clear()
    plain = logits(reference_model, inputs)
    with iv.applied(iv.Spec(knockouts=tuple(kos))):
        got = logits(tiny.model, inputs)
    assert (plain[-1] - want[-1]).abs().max() > 1e-4
    torch.testing.assert_close(got, want, atol=TOL, rtol=0)
    torch.testing.assert_close(logits(tiny.model, inputs), plain, atol=TOL, rtol=0)   # nothing left active


def test_knockout_captured_rows_are_the_modified_pattern(tiny, inputs, reference_model):
    g, P, kos = knock_case(tiny, inputs)
    prep = engine.prepare(tiny.processor, synthetic.test_image((640, 480)), PROMPT)
    with iv.applied(iv.Spec(knockouts=tuple(kos))):
        out = engine.run(tiny, [prep], 1)[0]
    KNOCK.clear()
    for k in kos:
        for layer in k.layers:
            KNOCK.setdefault(layer, []).append((list(k.queries), list(k.keys)))
    logits(reference_model, inputs)
    KNOCK.clear()
    row = list(prep.rows).index(P - 1)
    for layer in (1, 2):
        eager = reference_model.model.text_model.layers[layer].self_attn._probs[0, :, P - 1].numpy()
        np.testing.assert_allclose(out.layers[layer][:, row, :P].astype(np.float32), eager, atol=2e-6, rtol=2e-3)
        assert np.all(out.layers[layer][:, row, list(kos[0].keys)] == 0)


def test_block_image_from_layer_equals_eager(tiny, inputs, reference_model):
    g, P, _ = knock_case(tiny, inputs)
    L = tiny.model.config.text_config.num_hidden_layers
    text = tuple(range(g.image_block[1] + 1, P))
    image = tuple(g.key_positions.tolist())
    KNOCK.clear()
    for layer in range(2, L):
        KNOCK[layer] = [(list(text), list(image))]
    want = logits(reference_model, inputs)
    KNOCK.clear()
    with iv.applied(iv.Spec(knockouts=(iv.Knockout(tuple(range(2, L)), text, image),))):
        got = logits(tiny.model, inputs)
    torch.testing.assert_close(got, want, atol=TOL, rtol=0)


def test_knockout_in_a_left_padded_batch_equals_each_alone(tiny):
    preps = [prepared(tiny, (640, 480)), prepared(tiny, (300, 500), "What is it?")]
    spec = [iv.Spec(knockouts=(iv.Knockout((1, 2, 3), (len(p.ids) - 1,), tuple(p.geometry.key_positions[:100])),))
            for p in preps]
    with iv.applied(spec):
        both = engine.run(tiny, preps, 5)
    for p, s, b in zip(preps, spec, both):
        with iv.applied(s):
            alone = engine.run(tiny, [p], 5)[0]
        assert alone.new == b.new
        np.testing.assert_allclose(alone.layers.astype(np.float32), b.layers.astype(np.float32), atol=1e-4)


def sweep_job(tiny, size, prompt, word):
    prep = prepared(tiny, size, prompt)
    P = len(prep.ids)
    t = torch.tensor([prep.ids])
    x = {"input_ids": t, "attention_mask": torch.ones_like(t), "pixel_values": prep.pixel_values[None],
         "pixel_attention_mask": prep.pixel_attention_mask[None]}
    feats = iv.image_features(tiny, x)
    q = iv.question_positions(tiny.processor.tokenizer, prompt, prep.ids, prep.geometry)
    queries = (P - 1,) if word == "last" else tuple(q)
    keys = tuple(prep.geometry.key_positions.tolist())
    L = tiny.model.config.text_config.num_hidden_layers
    specs = [iv.Spec()] + [iv.Spec(knockouts=(iv.Knockout(tuple(range(lo, hi + 1)), queries, keys),))
                           for lo, hi in iv.windows(L, 3)]
    token = int(logits(tiny.model, x)[-1].argmax())
    return x, feats, queries, specs, token


def alone_probs(tiny, x, specs, token):
    out = []
    for s in specs:
        with iv.applied(s):
            out.append(float(torch.softmax(logits(tiny.model, x)[-1], -1)[token]))
    return out


@pytest.mark.parametrize("word", ["last", "question"])
def test_batched_suffix_sweep_equals_each_window_alone(tiny, word):
    x, feats, queries, specs, token = sweep_job(tiny, (640, 480), PROMPT, word)
    assert len(queries) == 1 if word == "last" else len(queries) > 3
    pre = iv.prefix(tiny, x, min(queries), feats)
    kept = [(layer.keys.clone(), layer.values.clone()) for layer in pre.cache.layers]
    got = iv.sweep_probs(tiny, [(pre, x["input_ids"][0, min(queries):].tolist(), specs, token)])[0]
    want = alone_probs(tiny, x, specs, token)
    np.testing.assert_allclose(got, want, atol=TOL, rtol=1e-4)
    assert len(set(np.round(want, 7))) > 2                       # the windows differ
    for (k, v), layer in zip(kept, pre.cache.layers):            # the prefix's own cache is intact
        assert torch.equal(k, layer.keys) and torch.equal(v, layer.values)


def test_sweep_of_two_images_with_different_grids_in_one_batch(tiny):
    jobs, wants = [], []
    for size, prompt in (((640, 480), PROMPT), ((300, 500), "Is it red?")):
        x, feats, queries, specs, token = sweep_job(tiny, size, prompt, "question")
        pre = iv.prefix(tiny, x, min(queries), feats)
        jobs.append((pre, x["input_ids"][0, min(queries):].tolist(), specs, token))
        wants.append(alone_probs(tiny, x, specs, token))
    assert len(jobs[0][0].ids) != len(jobs[1][0].ids)
    got = iv.sweep_probs(tiny, jobs)
    for g, w in zip(got, wants):
        np.testing.assert_allclose(g, w, atol=TOL, rtol=1e-4)


# ---------------------------------------------------------------------------------- words

def test_words(tiny, tmp_path, base_run):
    run = store.Run(base_run)
    m = run.meta
    L, H = m["model"]["num_layers"], m["model"]["num_heads"]
    assert iv.parse_heads("1:3,0:0,1:3", L, H) == ((0, 0), (1, 3))
    assert iv.parse_heads("2:*", L, H) == tuple((2, h) for h in range(H))
    assert iv.parse_layers("0,2-3", L) == (0, 2, 3)
    assert iv.windows(30, 9)[0] == (0, 4) and iv.windows(30, 9)[15] == (11, 19) and iv.windows(30, 9)[29] == (25, 29)
    assert len(iv.windows(30, 9)) == 30
    P = m["prompt_length"]
    q = iv.question_positions(tiny.processor.tokenizer, m["prompt"], m["token_ids"][:P], run.geometry)
    text = tiny.processor.tokenizer.decode([m["token_ids"][i] for i in q])
    assert text.strip() == m["prompt"] and P - 1 not in q and min(q) == run.geometry.image_block[1] + 1
    w = iv.Words(m["token_ids"], P, run.geometry, tuple(m["image"]["size"]), q, m["generation"]["max_new_tokens"], L)
    # the left half of the image: half the tile columns and half the global tile's cells
    left = w.positions("box:0,0,320,480", "--to")
    g = run.geometry
    assert len(left) == g.num_keys // 2
    assert set(left) | set(w.positions("outside:0,0,320,480", "--to")) == set(g.key_positions.tolist())
    assert w.positions("answer", "--from") == tuple(range(P, len(m["token_ids"]) - 1))
    with pytest.raises(UserError, match="covers no image cell centre"):
        w.positions("box:0,0,5,5", "--to")


# ---------------------------------------------------------------------------------- the CLI

@pytest.fixture(scope="module")
def base_run(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("iv")
    synthetic.test_image((640, 480)).save(root / "img.png")
    ex.extract(tiny, root / "img.png", root / "runs" / "photo", ex.Settings(prompt=PROMPT, max_new_tokens=6))
    return root / "runs" / "photo"


@pytest.fixture(scope="module")
def analysis(base_run):
    from smolattn import analysis as an
    from smolattn import head_report

    ds = an.analyse_root(base_run.parent, an.Params(drop_bottom_row=False, threshold=1e-6), None, workers=1, progress=False)
    out = base_run.parent.parent / "analysis"
    head_report.write(out, ds, len(ds))
    return out


def test_ablation_run_end_to_end(base_run, capsys):
    iv.main(["--run", str(base_run), "--ablate-heads", "1:3,2:0"])
    out = base_run.parent / "photo.ablate-1.3-2.0"
    run = store.Run(out)
    m = run.meta["intervention"]
    assert m["kind"] == ["ablate"] and m["spec"]["heads"] == [[1, 3], [2, 0]] and m["base_run"] == "../photo"
    assert m["pixels"] == "source image" and m["command"].startswith("python intervene.py --run")
    e = json.loads((out / "effects.json").read_text())
    base = store.Run(base_run).meta
    assert e["base"]["token_ids"] == base["token_ids"][base["prompt_length"]:]
    assert e["intervened"]["token_ids"] == run.meta["token_ids"][run.meta["prompt_length"]:]
    tf = e["teacher_forced"]
    assert len(tf["base_logprobs"]) == len(tf["intervened_logprobs"]) == len(e["base"]["token_ids"])
    assert tf["base_sum"] == pytest.approx(sum(tf["base_logprobs"])) and tf["base_sum"] != tf["intervened_sum"]
    assert e["standin"] is True and store.owned_run(out)
    assert "STAND-IN" in capsys.readouterr().out
    iv.main(["--run", str(base_run), "--ablate-heads", "1:3,2:0"])         # our run: replaced


def test_base_teacher_forced_logprobs_reproduce_the_run(tiny, base_run):
    e = json.loads((base_run.parent / "photo.ablate-1.3-2.0" / "effects.json").read_text()) \
        if (base_run.parent / "photo.ablate-1.3-2.0").exists() else None
    m = store.Run(base_run).meta
    _, x = mdl.encode(tiny, synthetic.test_image((640, 480)), PROMPT)
    ids = torch.tensor([m["token_ids"]])
    lp = torch.log_softmax(logits(tiny.model, x, ids), -1)
    P = m["prompt_length"]
    want = [float(lp[P - 1 + i, t]) for i, t in enumerate(m["token_ids"][P:])]
    if e is not None:
        np.testing.assert_allclose(e["teacher_forced"]["base_logprobs"], want, atol=1e-4)


@pytest.mark.parametrize("argv, kind", [
    (["--ablate-heads", "top:2"], "ablate"),
    (["--knockout", "--from", "last", "--to", "box:120,40,300,200", "--layers", "1-2"], "knockout"),
    (["--knockout", "--from", "question", "--to", "outside:120,40,300,200", "--layers", "0,2-3"], "knockout"),
    (["--block-image-from", "2"], "block-image"),
    (["--ablate-heads", "0:*", "--ablation", "mean", "--knockout", "--from", "answer", "--to", "image",
      "--layers", "3"], "knockout"),
])
def test_each_command_form(base_run, analysis, argv, kind, tmp_path):
    if "top:2" in argv:
        argv = argv + ["--analysis", str(analysis)]
    iv.main(["--run", str(base_run), "--output-dir", str(tmp_path / "out")] + argv)
    run = store.Run(tmp_path / "out")
    assert kind in run.meta["intervention"]["kind"]
    assert (tmp_path / "out" / "effects.json").is_file()
    if "top:2" in argv:      # the analysis's two most frequent heads
        from smolattn import head_report
        ds, _ = head_report.load(analysis)
        assert run.meta["intervention"]["spec"]["heads"] == sorted([l, h] for l, h, _ in ds.ranked("frequency")[:2])
    if kind == "block-image":
        k = run.meta["intervention"]["spec"]["knockouts"][0]
        assert k["layers"] == [2, 3] and k["from"] == "text" and k["to"] == "image"


def test_sweep_command(base_run, tmp_path):
    for word in ("last", "question"):
        iv.main(["--run", str(base_run), "--sweep", "--from", word, "--to", "image", "--window", "3"])
        out = base_run.parent / f"photo.sweep-{word}-image-w3"
        assert sorted(p.name for p in out.iterdir()) == ["meta.json", "sweep.json", "sweep.png"]
        s = json.loads((out / "sweep.json").read_text())
        assert s["centres"] == [0, 1, 2, 3] and s["layers"] == [[0, 1], [0, 2], [1, 3], [2, 3]]
        assert s["relative_change_pct"][0] == pytest.approx((s["prob"][0] - s["base_prob"]) / s["base_prob"] * 100)
        assert json.loads((out / "meta.json").read_text())["intervention"]["kind"] == ["sweep"]
    iv.main(["--run", str(base_run), "--sweep", "--from", "last", "--to", "image", "--window", "3"])  # replaced
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.md").write_text("mine")
    with pytest.raises(UserError, match="not a sweep folder"):
        iv.main(["--run", str(base_run), "--sweep", "--from", "last", "--to", "image",
                 "--output-dir", str(tmp_path / "mine")])
    assert (tmp_path / "mine" / "notes.md").read_text() == "mine"


@pytest.fixture
def no_model(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the input was checked")
    monkeypatch.setattr(mdl, "load", refuse)


@pytest.mark.parametrize("argv, message", [
    (["--ablate-heads", "1:9"], "head 9 is out of range"),
    (["--ablate-heads", "7:0"], "layer 7 is out of range"),
    (["--ablate-heads", "top:3"], "needs --analysis"),
    (["--knockout", "--from", "last", "--to", "box:0,0,3,3", "--layers", "1"], "covers no image cell centre"),
    (["--knockout", "--from", "last", "--to", "image", "--layers", "2-9"], "layer 9 is out of range"),
    (["--knockout", "--from", "image", "--to", "image", "--layers", "1"], "is a --to word"),
    (["--knockout", "--from", "last", "--to", "box:5,5,1,1", "--layers", "1"], "x0 < x1"),
    (["--knockout", "--from", "last", "--to", "image"], "needs --layers"),
    (["--block-image-from", "4"], "out of range"),
    (["--sweep", "--from", "answer", "--to", "image"], "--sweep --from answer"),
    ([], "say what to do"),
])
def test_bad_input_is_refused_before_the_model_loads(base_run, no_model, argv, message, tmp_path):
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        iv.main(["--run", str(base_run), "--output-dir", str(tmp_path / "x")] + argv)
    assert not (tmp_path / "x").exists()


def test_unreproducible_runs_are_refused(base_run, no_model, tmp_path, make_run):
    ref = make_run("ref", reference=True)
    with pytest.raises(UserError, match="reference-format run"):
        iv.main(["--run", str(ref), "--ablate-heads", "0:0"])
    bad = tmp_path / "bad"
    import shutil
    shutil.copytree(base_run, bad)
    meta = json.loads((bad / "meta.json").read_text())
    del meta["processor"]["longest_edge"], meta["model"]["revision"]
    (bad / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="lacks model.revision, processor.longest_edge"):
        iv.main(["--run", str(bad), "--ablate-heads", "0:0"])
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "notes.md").write_text("mine")
    with pytest.raises(UserError, match="not a run written by smolattn"):
        iv.main(["--run", str(base_run), "--ablate-heads", "0:0", "--output-dir", str(tmp_path / "user")])


def test_cli_prints_one_line_for_bad_input(base_run):
    r = subprocess.run([sys.executable, str(ROOT / "intervene.py"), "--run", str(base_run), "--ablate-heads", "1:9"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "head 9 is out of range" in r.stderr


def test_applied_around_the_cached_prefix_as_pope_uses_it(tiny):
    """POPE's path: prefill each image and answer_cached in one batch, inside applied(); the answers
    equal engine.run of each image alone under the same spec (heads and knockout composed)."""
    cases = [((640, 480), PROMPT), ((300, 500), "Is it red?")]
    specs, jobs, want = [], [], []
    for size, q in cases:
        prep = prepared(tiny, size, q)
        spec = iv.Spec(heads=((1, 3), (2, 0)), knockouts=(
            iv.Knockout((1, 2), (len(prep.ids) - 1,), tuple(prep.geometry.key_positions[:300])),))
        with iv.applied(spec):
            want.append(engine.run(tiny, [prep], 5)[0].new)
            pre, _ = engine.prefill(tiny, synthetic.test_image(size), q)
        specs.append(spec)
        jobs.append((pre, engine.suffix_ids(tiny, pre, q)))
    with iv.applied(specs):
        got = engine.answer_cached(tiny, jobs, 5)
    assert got == want
    ref = copy.deepcopy(tiny)                         # one spec for every row, heads only: == zeroed o_proj columns
    D = tiny.model.config.text_config.head_dim
    for layer, h in ((1, 3), (2, 0)):
        ref.model.model.text_model.layers[layer].self_attn.o_proj.weight.data[:, h * D:(h + 1) * D] = 0
    ref_jobs = []
    for size, q in cases:
        pre, _ = engine.prefill(ref, synthetic.test_image(size), q)
        ref_jobs.append((pre, engine.suffix_ids(ref, pre, q)))
    with iv.applied(iv.Spec(heads=((1, 3), (2, 0)))):
        got = engine.answer_cached(tiny, jobs, 5, rows=[[0, 1], [2]])
    want = engine.answer_cached(ref, ref_jobs, 5, rows=[[0, 1], [2]])
    assert got[0] == want[0]
    for a, b in zip(got[1], want[1]):
        np.testing.assert_allclose(a.astype(np.float32), b.astype(np.float32), atol=1e-3)


def test_intervened_teacher_forcing_from_the_generation_cache_equals_a_full_forward(tiny, base_run):
    run = store.Run(base_run)
    m = run.meta
    ids, P = m["token_ids"], m["prompt_length"]
    rgb, info, _ = iv.pixels(run)
    prep = iv.prepare(tiny, run, rgb, info)
    feats = iv.image_features(tiny, {"pixel_values": prep.pixel_values[None],
                                     "pixel_attention_mask": prep.pixel_attention_mask[None]})
    image = tuple(run.geometry.key_positions[:150].tolist())
    spec = iv.Spec(heads=((1, 3), (3, 0)), knockouts=(iv.Knockout((1, 2), (P - 1, P + 1), image),))
    kept = {}
    with iv.applied(spec):
        engine.run(tiny, [prep], m["generation"]["max_new_tokens"], features=feats, keep=kept)
        full = iv.teacher_forced(tiny, ids, P, feats)
        after = iv.teacher_forced_after(tiny, ids, P, kept)
    assert full.shape == after.shape == (len(ids) - P, tiny.model.config.text_config.vocab_size)
    torch.testing.assert_close(after, full, atol=TOL, rtol=0)
    assert (iv.teacher_forced(tiny, ids, P, feats) - full).abs().max() > 1e-3      # the spec changes them
