"""The viewer at dataset scale and in any language: per-run summaries, the run index, bounded caches,
and tokens that spell whole characters (Korean, Japanese, emoji through a byte-level BPE)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from smolattn import standin, summary, synthetic, tokens
from smolattn.store import Run
from viewer.index import Index

ROOT = Path(__file__).resolve().parent.parent
KOREAN = "이 고양이를 설명해 주세요"
JAPANESE = "猫がソファの上で寝ています。"
EMOJI = " 🐱 café"


def ok(resp):
    assert resp.status_code == 200, resp.get_json()
    body = resp.get_json()
    assert body["success"] is True
    return body


def answer_pos(offset=1):
    return synthetic.make_tokens(3, 4)[1] + offset


@pytest.fixture(scope="module")
def bpe():
    """The tiny stand-in's byte-level BPE (GPT-2 byte alphabet, as SmolLM2's), without transformers."""
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(standin.ensure("tiny") / "tokenizer.json"))
    return lambda text: tok.encode(text, add_special_tokens=False).tokens


# -- tokens ------------------------------------------------------------------------------------------
def test_units_join_split_characters_and_keep_the_rest():
    toks = ["ìĿ´", "Ġê", "³", "ł", "ì", "ĸ", "ĳ", "<end_of_utterance>", "ĠðŁ", "Ĳ", "±", "ĠcafÃ©", "Ã", "<image>", "©",
            "Ċ", "Ġ statue"]
    us = tokens.units(toks)
    assert [(u.start, u.stop, u.text) for u in us] == [
        (0, 1, "이"), (1, 4, " 고"), (4, 7, "양"), (7, 8, "<end_of_utterance>"), (8, 11, " 🐱"), (11, 12, " café"),
        (12, 13, "�"), (13, 14, "<image>"), (14, 15, "�"), (15, 16, "\n"), (16, 17, "  statue")]
    assert tokens.piece("Ġê") == " \\xea" and tokens.piece("ìĿ´") == "이"
    assert tokens.search(us, "고양") == [] and tokens.search(us, "고양", exact=False) == [(1, 6)]
    assert tokens.search(us, "🐱") == [(8, 10)] and tokens.search(us, "CAFÉ") == [(11, 11)]
    assert tokens.text_at(toks, 2) == " 고" and tokens.text_at(toks, 1, 6) == " 고양"


@pytest.fixture(scope="module")
def korean_run(tmp_path_factory, bpe):
    prompt, answer = bpe(" " + KOREAN), bpe(" " + JAPANESE) + bpe(EMOJI) + ["<end_of_utterance>"]
    assert max(map(len, (tokens.display_token(t) for t in prompt))) == 1 and "�" in tokens.display_token(prompt[1])
    path = tmp_path_factory.mktemp("korean") / "korean"
    synthetic.make_run(path, prompt=prompt, answer=answer, layers=2, heads=2)
    return path


def test_token_table_shows_korean_japanese_and_emoji(korean_run, make_app):
    body = ok(make_app(RUN=korean_run).test_client().get("/api/initialize"))
    table = body["token_table"]
    first_unit = {}
    for t in table:
        first_unit.setdefault(tuple(t["unit"]), t)
    def spelt(kind):
        return "".join(t["unit_text"] for t in first_unit.values() if t["kind"] == kind)
    assert KOREAN in spelt("prompt") and body["prompt"] == KOREAN
    assert spelt("answer").startswith(" " + JAPANESE + EMOJI) and "�" not in spelt("answer") + spelt("prompt")
    split = [t for t in table if t["unit"][1] > t["unit"][0]]
    assert len(split) > 20 and all(t["has_row"] for t in split)          # every piece keeps its own row
    cat = next(t for t in table if t["unit_text"] == "🐱" or t["unit_text"] == " 🐱")
    pieces = [t for t in table if t["unit"] == cat["unit"]]
    assert len(pieces) >= 2 and len({t["index"] for t in pieces}) == len(pieces)


def test_cli_token_finds_a_korean_word(korean_run, tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "compute_token_heatmap.py"), "--run", str(korean_run),
                           "--token", "고양이", "--overlay", "", "--output", str(tmp_path / "h.png")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "token '고양이' at positions" in done.stdout and (tmp_path / "h.png").is_file()
    done = subprocess.run([sys.executable, str(ROOT / "compute_token_heatmap.py"), "--run", str(korean_run),
                           "--token", "개", "--overlay", "", "--output", str(tmp_path / "x.png")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "not found; closest:" in done.stderr and "�" not in done.stderr


# -- summaries ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("store", ["compact", "compact8", "full"])
def test_write_run_summary_matches_the_layers_as_stored(make_run, store):
    run_dir = make_run(layers=3, heads=2, store_mode=store)
    run = Run(run_dir)
    stored, fresh = summary.load(run_dir / summary.FILE, run), summary.from_run(run)
    first, last = run.geometry.image_block
    assert stored.positions.tolist() == [p for p in range(len(run.tokens)) if not first <= p <= last]
    for name in summary.ARRAYS:
        assert np.allclose(getattr(stored, name), getattr(fresh, name), rtol=1e-5, atol=1e-7), name


def test_write_run_writes_the_summary_the_viewer_opens(make_run, make_app):
    run_dir = make_run(layers=3, heads=2)
    run = Run(run_dir)
    stored = summary.load(run_dir / summary.FILE, run)
    row = run.row_of(answer_pos(2))
    image = np.stack([run.layer(i).image[:, row] for i in range(3)])               # (L, H, K)
    assert np.allclose(stored.mean_map[list(stored.positions).index(answer_pos(2))], image.mean((0, 1)), atol=1e-6)

    app = make_app(RUN=run_dir)
    client, reg = app.test_client(), app.extensions["runs"]
    body = ok(client.get(f"/api/attention?index={answer_pos(2)}&norm=shared"))    # the default view
    assert reg.layers.stats()["misses"] == 0                                      # no layer read
    tiles, glob = run.geometry.split(image.mean((0, 1)))
    assert np.allclose(body["grid"], tiles, atol=1e-6) and np.allclose(body["global"], glob, atol=1e-6)
    per_layer = image.mean(1)
    assert body["vmax"] == pytest.approx(per_layer.max(), rel=1e-5)
    ok(client.get(f"/api/attention?index={answer_pos(2)}&layers=1&heads=max&drop_sink=1"))
    assert reg.layers.stats()["misses"] == 1                                      # only the layer asked for


def test_reference_run_summary_is_cached_outside_the_run(make_run, make_app, tmp_path):
    run_dir = make_run("ref", reference=True, one_hot={answer_pos(): 5})
    before = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*"))
    cache = tmp_path / "cache"
    body = ok(make_app(RUN=run_dir, ALLOW_PICKLE=True, CACHE_DIR=str(cache)).test_client()
              .get(f"/api/attention?index={answer_pos()}"))
    assert np.array(body["grid"])[0, 5] == pytest.approx(1)
    assert sorted(p.relative_to(run_dir) for p in run_dir.rglob("*")) == before   # nothing written into it
    assert len(list((cache / "summaries").glob("*.npz"))) == 1
    app = make_app(RUN=run_dir, ALLOW_PICKLE=True, CACHE_DIR=str(cache))           # a restart: read from the cache
    ok(app.test_client().get(f"/api/attention?index={answer_pos()}"))
    assert app.extensions["runs"].layers.stats()["misses"] == 0


def test_text_to_text_view(make_run, make_app):
    run_dir = make_run(layers=2, heads=2)
    run, pos = Run(run_dir), answer_pos(4)
    body = ok(make_app(RUN=run_dir).test_client().get(f"/api/text_attention?index={pos}&layers=1&heads=1"))
    text = run.layer(1).text[1, run.row_of(pos)]
    expect = {int(p): float(v) for p, v in zip(run.text_key_positions, text)}
    got = {t["index"]: t["value"] for t in body["tokens"]}
    assert got and max(got) == pos and all(got[p] == pytest.approx(expect[p], rel=1e-5) for p in got)
    assert body["image"] + sum(expect.values()) == pytest.approx(1, rel=1e-3)


# -- the run index -----------------------------------------------------------------------------------
def write_manifest(path, rows):
    """Rows (dicts) as JSON lines; a str is written as is (e.g. a torn last line, no newline)."""
    with open(path, "a") as f:
        for r in rows:
            f.write(r if isinstance(r, str) else json.dumps(r) + "\n")


@pytest.fixture
def batch_root(make_run, tmp_path):
    root = tmp_path / "runs"
    make_run("cat_1", rows=1, cols=2)
    make_run("dog_2", rows=2, cols=2)
    make_run("zebra", rows=0, cols=0)
    make_run("not_in_manifest")
    write_manifest(root / "manifest.jsonl", [
        {"image": "cat_1.jpg", "run": "cat_1", "status": "ok", "answer": "A cat on a sofa.", "grid": [1, 2],
         "finished_at": "1"},
        {"image": "dog_2.jpg", "run": "dog_2", "status": "ok", "answer": "Two dogs.", "grid": [2, 2], "finished_at": "1"},
        {"image": "bad.jpg", "run": "bad", "status": "error", "error": "corrupt or truncated image", "finished_at": "1"},
    ])
    write_manifest(root / "manifest.shard-1-of-2.jsonl", [
        {"image": "zebra.jpg", "run": "zebra", "status": "ok", "answer": "A zebra.", "grid": [0, 0], "finished_at": "1"},
        '{"image": "torn', ])
    return root


def names(body):
    return [r["name"] for r in body["runs"]]


def test_index_from_manifests_search_sort_and_pages(batch_root, make_app):
    client = make_app(RUNS=batch_root).test_client()
    body = ok(client.get("/api/runs"))
    assert names(body) == ["bad", "cat_1", "dog_2", "zebra"] and body["total"] == 4   # the manifests' runs
    assert body["runs"][0]["error"] == "corrupt or truncated image" and body["runs"][1]["answer"] == "A cat on a sofa."
    assert names(ok(client.get("/api/runs?q=SOFA"))) == ["cat_1"]                  # answers are searched
    assert names(ok(client.get("/api/runs?q=bad.jpg"))) == ["bad"]                 # and source images
    assert names(ok(client.get("/api/runs?sort=grid"))) == ["zebra", "cat_1", "dog_2", "bad"]
    assert names(ok(client.get("/api/runs?sort=error"))) == ["bad", "cat_1", "dog_2", "zebra"]
    assert names(ok(client.get("/api/runs?sort=answer&desc=1"))) == ["bad", "dog_2", "zebra", "cat_1"]
    page = ok(client.get("/api/runs?offset=1&limit=2"))
    assert names(page) == ["cat_1", "dog_2"] and page["total"] == 4
    assert ok(client.get("/api/initialize?run=cat_1"))["geometry"]["cols"] == 2
    resp = client.get("/api/runs?sort=size")
    assert resp.status_code == 400 and "sort must be one of" in resp.get_json()["error"]


def test_index_is_refreshed_when_a_manifest_changes(batch_root, make_run):
    index = Index(batch_root, check_every=0)
    assert len(index) == 4 and index.builds == 1
    assert len(index) == 4 and index.builds == 1                                   # unchanged: no rebuild
    make_run("new")
    write_manifest(batch_root / "manifest.jsonl", [
        {"image": "new.jpg", "run": "new", "status": "ok", "answer": "New.", "grid": [3, 4], "finished_at": "2"}])
    assert "new" in index.names() and index.builds == 2


def test_index_scan_finds_nested_batches_and_plain_runs(batch_root, make_run, tmp_path):
    top = tmp_path / "top"
    top.mkdir()
    os.rename(batch_root, top / "coco")
    synthetic.make_run(top / "single" / "photo")
    entries = {e.name: e for e in Index(top).query(limit=100)[1]}
    assert set(entries) == {"coco/bad", "coco/cat_1", "coco/dog_2", "coco/zebra", "single/photo"}
    assert entries["single/photo"].grid == (3, 4) and "skier" in entries["single/photo"].answer


def test_index_restart_reads_the_cached_index(batch_root, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    assert len(Index(batch_root, cache_dir=cache)) == 4
    import viewer.index

    def boom(path):
        raise AssertionError("a restart with unchanged manifests must not read them")
    monkeypatch.setattr(viewer.index, "read_manifests", boom)
    assert Index(batch_root, cache_dir=cache).names() == ["bad", "cat_1", "dog_2", "zebra"]
    write_manifest(batch_root / "manifest.jsonl", [{"image": "x.jpg", "run": "x", "status": "ok", "finished_at": "3"}])
    with pytest.raises(AssertionError, match="must not read"):   # changed: read again
        Index(batch_root, cache_dir=cache).names()


def test_index_lists_run_directories_when_a_manifest_is_unreadable(batch_root, monkeypatch):
    import viewer.index

    def damaged(path):
        raise viewer.index.UserError(f"{path}/manifest.jsonl:2: invalid JSON")
    monkeypatch.setattr(viewer.index, "read_manifests", damaged)
    assert Index(batch_root).names() == ["cat_1", "dog_2", "not_in_manifest", "zebra"]


@pytest.fixture
def plain_root(make_run, tmp_path):
    """Runs without any manifest: a few at the top, one nested."""
    for k in range(6):
        make_run(f"r{k}", rows=1, cols=2)
    make_run("group/deep")
    return tmp_path / "runs"


def test_index_without_manifests_lists_names_first_then_reads_the_details(plain_root, make_run, make_app, tmp_path,
                                                                            monkeypatch):
    """Beyond inline_details runs the first answer lists every run by name (complete: false, pending:
    the runs whose meta.json is still to read), the details are filled in the background, then saved:
    a restart reads the cached index by stat only (no scan, no meta.json)."""
    import threading
    import time
    import viewer.index

    gate, real = threading.Event(), viewer.index.run_entry
    monkeypatch.setattr(viewer.index, "run_entry", lambda path, name: gate.wait(10) and real(path, name))
    monkeypatch.setattr(viewer.index, "INLINE_DETAILS", 2)
    monkeypatch.setattr(viewer.index, "FILL_CHUNK", 3)
    cache = tmp_path / "cache"
    app = make_app(RUNS=plain_root, CACHE_DIR=str(cache))
    client = app.test_client()
    body = ok(client.get("/api/runs"))
    every = ["group/deep"] + [f"r{k}" for k in range(6)]
    assert names(body) == every and body["total"] == 7 and body["complete"] is False and body["pending"] == 7
    assert all(r["answer"] is None for r in body["runs"])
    assert names(ok(client.get("/api/runs?q=deep"))) == ["group/deep"]          # names are searchable already
    assert not list(cache.glob("index/*.json"))                                  # nothing saved half-read
    gate.set()
    for _ in range(300):
        if app.extensions["runs"].index.complete:
            break
        time.sleep(0.02)
    body = ok(client.get("/api/runs"))
    assert body["complete"] is True and body["pending"] == 0 and names(body) == every
    assert all("skier" in r["answer"] for r in body["runs"]) and body["runs"][1]["grid"] == [1, 2]
    assert names(ok(client.get("/api/runs?q=skier&limit=3"))) == every[:3]
    assert len(list(cache.glob("index/*.json"))) == 1

    def boom(*args):
        raise AssertionError("a restart of an unchanged root must not scan it or read any meta.json")
    monkeypatch.setattr(viewer.index, "run_entry", boom)
    monkeypatch.setattr(viewer.index.Index, "_scan", boom)
    again = ok(make_app(RUNS=plain_root, CACHE_DIR=str(cache)).test_client().get("/api/runs"))
    assert again["runs"] == body["runs"] and again["complete"] is True
    make_run("r9", rows=1, cols=2)                                               # the root changed: scanned again
    with pytest.raises(AssertionError, match="must not scan"):
        Index(plain_root, cache_dir=cache).names()


def test_listing_runs_and_reading_boxes_imports_no_extraction_stack(batch_root, tmp_path):
    """The viewer lists runs (/api/runs, the manifest reader) and reads COCO boxes (pope.load_boxes)
    without importing torch, transformers, tqdm or the extraction modules."""
    coco = tmp_path / "coco.json"
    coco.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}], "categories": [{"id": 1, "name": "Cat"}],
                                "annotations": [{"image_id": 1, "category_id": 1, "bbox": [1, 2, 3, 4]}]}))
    code = f"""
import json, sys
from viewer import create_app
from smolattn import pope
client = create_app({{"RUNS": {str(batch_root)!r}, "CACHE_DIR": {str(tmp_path / 'cache')!r}}}).test_client()
assert client.get("/api/runs").get_json()["total"] == 4
assert pope.load_boxes({str(coco)!r}) == {{"a.jpg": {{"cat": [[1, 2, 3, 4]]}}}}
heavy = ("torch", "transformers", "tqdm", "smolattn.engine", "smolattn.model", "smolattn.extract",
         "smolattn.batch", "smolattn.pope_runner")
print(json.dumps(sorted(m for m in heavy if m in sys.modules)))
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []
