"""benchmark.py / smolattn.pope_runner on the tiny stand-in, real COCO photos and the POPE subset (samples/):
the shared-prefix path answers exactly as the naive per-question path; the CLI writes, resumes,
re-scores, reports bad input; attention runs and localisation numbers are sane."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import benchmark
from smolattn import engine, heatmap, pope, standin, store
from smolattn import model as mdl
from smolattn import pope_runner as pr
from smolattn.images import open_image

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "samples"                     # 3 COCO photos, their POPE questions and COCO boxes
POPE = DATA / "pope"
IMAGES = DATA / "coco_val2014"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return str(standin.build("tiny", tmp_path_factory.mktemp("models") / "tiny"))


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    # the same object the CLI's worker gets (pope_runner memoises per process)
    return pr.get_model(pr.Config(tiny_dir, device="cpu", dtype="float32"))


def questions_by_image(files=("pope_subset_random.json", "pope_subset_popular.json", "pope_subset_adversarial.json")):
    out = {}
    for q in pope.load_questions([POPE / f for f in files]):
        out.setdefault(q.image, []).append(q)
    return out


def answers(rows):
    return [(r["split"], r["question_id"], r["raw_answer"], r["new_tokens"]) for r in rows]


# ------------------------------------------------------------------------------ cached == naive

def test_prefix_plus_suffix_is_the_full_prompt_and_gives_the_same_logits(tiny):
    qs = questions_by_image()["COCO_val2014_000000429109.jpg"]
    image, _ = open_image(IMAGES / qs[0].image)
    prefix, first_ids = engine.prefill(tiny, image, qs[0].text + pope.DEFAULT_SUFFIX, 2048)
    assert prefix.geometry.rows * prefix.geometry.cols == 12          # 640x427 -> 3x4 tiles + global
    assert tiny.processor.tokenizer.convert_ids_to_tokens(prefix.ids[-1:]) == ["<fake_token_around_image>"]
    for q in qs[:2] + qs[-1:]:
        prompt = q.text + pope.DEFAULT_SUFFIX
        suffix = engine.suffix_ids(tiny, prefix, prompt)
        _, inputs = mdl.encode(tiny, image, prompt, 2048)
        assert prefix.ids + suffix == inputs["input_ids"][0].tolist()
        with torch.inference_mode():
            naive = tiny.model(**inputs).logits[0, -1]
            ids = torch.tensor([prefix.ids + suffix])
            cached = tiny.model(input_ids=ids[:, len(prefix.ids):], attention_mask=torch.ones_like(ids),
                                cache=prefix.cache).logits[0, -1]
        prefix.cache.crop(-len(suffix))
        assert torch.allclose(naive, cached, atol=1e-4, rtol=1e-4)
        assert int(naive.argmax()) == int(cached.argmax())


def test_cross_image_batches_answer_as_naive_and_leave_prefix_caches_intact(tiny):
    """Questions of two images with different prefix lengths (2x3 and 3x3 tiles at 1536 px) and
    different suffix lengths in ONE batch on their stacked caches: the naive answers, caches untouched."""
    by_image = questions_by_image()
    names = ["COCO_val2014_000000429109.jpg", "COCO_val2014_000000569839.jpg"]
    jobs, naive, prefixes = [], [], []
    for name in names:
        img, _ = open_image(IMAGES / name)
        qs = [q for q in by_image[name] if q.split == "random"][:3]
        prefix, _ = engine.prefill(tiny, img, qs[0].text + pope.DEFAULT_SUFFIX, 1536)
        prefixes.append((prefix, [layer.keys.clone() for layer in prefix.cache.layers]))
        for q in qs:
            jobs.append((prefix, engine.suffix_ids(tiny, prefix, q.text + pope.DEFAULT_SUFFIX)))
            _, inputs = mdl.encode(tiny, img, q.text + pope.DEFAULT_SUFFIX, 1536)
            naive.append(mdl.generate(tiny, inputs, 8))
    assert len({len(p.ids) for p, _ in jobs}) == 2 and len({len(s) for _, s in jobs}) > 1
    assert engine.answer_cached(tiny, jobs, 8) == naive
    for prefix, keys in prefixes:
        assert all(torch.equal(a, layer.keys) for a, layer in zip(keys, prefix.cache.layers))


def test_pope_groups_of_images_answer_as_naive(tiny):
    by_image = questions_by_image()
    images = []
    for name in ["COCO_val2014_000000297078.jpg", "COCO_val2014_000000569839.jpg"]:
        img, info = open_image(IMAGES / name)
        images.append({"image": img, "info": info, "questions": [q for q in by_image[name] if q.split == "popular"]})
    cached = pr.answer_images(tiny, images, pope.DEFAULT_SUFFIX, 8, 512)
    chunks = pr.answer_images(tiny, images, pope.DEFAULT_SUFFIX, 8, 512, batch=4)
    naive = pr.answer_images(tiny, images, pope.DEFAULT_SUFFIX, 8, 512, naive=True)
    assert {r["path"] for r in cached} == {"cached"} and answers(cached) == answers(chunks) == answers(naive)
    assert [r["question_id"] for r in cached] == [q.question_id for im in images for q in im["questions"]]


@pytest.mark.parametrize("image,longest_edge,splits", [
    ("COCO_val2014_000000429109.jpg", 2048, ("random",)),                      # 12 tiles + global
    ("COCO_val2014_000000569839.jpg", 512, ("random", "popular", "adversarial")),  # portrait, global only, two-word object "hot dog"
    ("COCO_val2014_000000297078.jpg", 512, ("random", "popular")),             # landscape, global only
])
def test_cached_path_answers_exactly_as_the_naive_path(tiny, image, longest_edge, splits):
    qs = [q for q in questions_by_image()[image] if q.split in splits]
    img, _ = open_image(IMAGES / image)
    cached = pr.answer_image(tiny, img, qs, pope.DEFAULT_SUFFIX, 8, longest_edge)
    naive = pr.answer_image(tiny, img, qs, pope.DEFAULT_SUFFIX, 8, longest_edge, naive=True)
    assert {r["path"] for r in cached} == {"cached"} and {r["path"] for r in naive} == {"naive"}
    assert answers(cached) == answers(naive)
    assert [r["question_id"] for r in cached] == [q.question_id for q in qs]
    if longest_edge == 512:   # one question at a time on the prefix cache: the same again
        one_by_one = pr.answer_image(tiny, img, qs, pope.DEFAULT_SUFFIX, 8, longest_edge, batch=False)
        assert answers(one_by_one) == answers(naive)


# ------------------------------------------------------------------------------ the CLI

def run_cli(*argv):
    """benchmark.main in this process (the model stays loaded between calls)."""
    return benchmark.main([str(a) for a in argv])


@pytest.fixture(scope="module")
def e2e(tiny, tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    common = ["--benchmark-file", POPE / "pope_subset.jsonl", "--image-root", IMAGES, "--output-dir", out,
              "--model-id", tiny_dir, "--device", "cpu", "--longest-edge", 512]
    assert run_cli(*common, "--limit", 6) == 0
    first = (out / "answers.jsonl").read_text().splitlines()
    assert run_cli(*common, "--limit", 12) == 0
    return out, common, first


def test_cli_writes_answers_results_and_flags_the_standin(e2e):
    out, _, _ = e2e
    rows = [json.loads(l) for l in (out / "answers.jsonl").read_text().splitlines()]
    assert len(rows) == 12
    for r in rows:
        assert {"split", "question_id", "image", "question", "label", "raw_answer", "parsed", "status", "config",
                "standin", "prompt"} <= set(r)
        assert set(r["parsed"]) == set(pope.PARSERS) and r["status"] == "ok" and r["standin"] is True
    results = json.loads((out / "results.json").read_text())
    assert results["standin"] is True and results["counts"]["answered"] == 12
    assert results["sources"][0]["sha256"] == pope.file_digest(POPE / "pope_subset.jsonl")
    assert "{question}" in results["prompt"]["template"] and results["config"]["suffix"] == pope.DEFAULT_SUFFIX
    for conv in pope.PARSERS:
        assert set(results["conventions"][conv]["mean"]) == set(pope.METRICS)
    md = (out / "results.md").read_text()
    assert md.startswith("**STAND-IN MODEL") and "sha256" in md and "### Convention: vlmevalkit" in md


def test_cli_resumes_without_redoing_answers(e2e):
    out, _, first = e2e
    lines = (out / "answers.jsonl").read_text().splitlines()
    assert len(first) == 6 and lines[:6] == first      # the second run appended exactly 6 new rows
    assert len({(json.loads(l)["split"], json.loads(l)["question_id"]) for l in lines}) == 12


def test_cli_refuses_to_mix_configurations(e2e):
    out, common, _ = e2e
    from smolattn.errors import UserError
    with pytest.raises(UserError, match="another configuration"):
        run_cli(*common, "--limit", 12, "--max-new-tokens", 3)


def test_answers_rescoring_needs_no_model_and_agrees(e2e, tmp_path):
    out, _, _ = e2e
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, ROOT / "benchmark.py", "--answers", out / "answers.jsonl",
                        "--output-dir", tmp_path], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert p.returncode == 0, p.stderr
    again, before = (json.loads((d / "results.json").read_text()) for d in (tmp_path, out))
    assert again["conventions"] == before["conventions"] and again["standin"] is True
    assert "### Convention: official" in p.stdout


def test_missing_image_gives_error_rows_and_exit_1(tiny, tiny_dir, tmp_path, capsys):
    root = tmp_path / "images"
    root.mkdir()
    qs = pope.load_questions([POPE / "pope_subset.jsonl"])[:12]
    (root / qs[0].image).symlink_to(IMAGES / qs[0].image)           # the second image is missing
    code = run_cli("--benchmark-file", POPE / "pope_subset.jsonl", "--image-root", root, "--output-dir",
                   tmp_path / "out", "--model-id", tiny_dir, "--device", "cpu", "--longest-edge", 512, "--limit", 12)
    assert code == 1
    rows = [json.loads(l) for l in (tmp_path / "out" / "answers.jsonl").read_text().splitlines()]
    assert [r["status"] for r in rows] == ["ok"] * 6 + ["error"] * 6
    assert "image not found" in rows[-1]["error"]
    assert "6 questions failed (1 images missing)" in capsys.readouterr().err
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["counts"]["errors"] == 6 and results["conventions"]["official"]["all"]["total"] == 6


def test_malformed_line_exits_2_with_the_line_number(tmp_path):
    bad = tmp_path / "bad_random.json"
    lines = (POPE / "pope_subset_random.json").read_text().splitlines()[:4]
    lines[2] = lines[2].replace('"label": "yes"', '"label": "maybe"').replace('"label": "no"', '"label": "maybe"')
    bad.write_text("\n".join(lines) + "\n")
    p = subprocess.run([sys.executable, ROOT / "benchmark.py", "--benchmark-file", bad, "--output-dir", tmp_path / "o"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert p.returncode == 2
    assert f"{bad}:3:" in p.stderr and "Traceback" not in p.stderr


# ------------------------------------------------------------------------------ attention

def test_attention_runs_and_localisation(tiny, tiny_dir, tmp_path):
    out = tmp_path / "att"
    assert run_cli("--benchmark-file", POPE / "pope_subset.jsonl", "--image-root", IMAGES, "--output-dir", out,
                   "--model-id", tiny_dir, "--device", "cpu", "--longest-edge", 512, "--limit", 6,
                   "--attention", "--annotations", DATA / "coco" / "subset_instances.json") == 0
    rows = [json.loads(l) for l in (out / "answers.jsonl").read_text().splitlines()]
    for r in rows:
        run = store.Run(r["attention"]["run"])
        assert run.meta["pope"]["question_id"] == r["question_id"] and run.standin
        assert run.image_path() is not None      # the overlay has its photo (the viewer opens every example)
        assert run.row_of(run.prompt_length - 1) is not None   # the step that produces the answer's first token
        positions = run.meta["pope"]["object_positions"]
        words = "".join(store.display_token(run.tokens[p]) for p in positions).strip()
        assert words == pope.object_of(r["question"])
        maps = heatmap.token_rows(run, range(run.num_layers), positions[0])
        assert maps.shape[-1] == run.geometry.num_keys and np.all(maps >= 0)
        a = r["attention"]
        if r["label"] == "yes":      # all yes objects of the 3 photos have COCO boxes
            assert a["has_boxes"] and 0 <= a["mass"] <= 1 and 0 <= a["box_fraction"] <= 1 and a["hit"] in (True, False)
        else:
            assert a["hit"] is None
    loc = json.loads((out / "results.json").read_text())["localisation"]
    assert loc["all"]["scored"] == 3 and 0 <= loc["all"]["pointing_game"] <= 1
    assert 0 <= loc["splits"]["random"]["mass_in_boxes"] <= 1
    assert "Attention localisation" in (out / "results.md").read_text()


def test_attention_batched_across_images_equals_each_question_alone_and_naive(tiny, tmp_path):
    """--attention on the cached path: questions of two images (different prefix and suffix lengths)
    in one batch store the same runs (answers, positions, rows) as each question alone on its prefix
    cache and as the naive per-question path."""
    by_image = questions_by_image()
    images = []
    for name in ["COCO_val2014_000000429109.jpg", "COCO_val2014_000000569839.jpg"]:   # 2x3 and 3x3 tiles
        img, info = open_image(IMAGES / name)
        images.append({"image": img, "info": info, "questions": [q for q in by_image[name] if q.split == "random"][:3]})
    got = {how: pr.answer_images(tiny, images, pope.DEFAULT_SUFFIX, 8, 1536, attention_dir=tmp_path / how, **kw)
           for how, kw in (("together", {}), ("alone", {"batch": False}), ("naive", {"naive": True}))}
    assert answers(got["together"]) == answers(got["alone"]) == answers(got["naive"])
    assert {r["path"] for r in got["together"]} == {"cached"}
    for rows in zip(*got.values()):
        runs = [store.Run(r["attention"]["run"]) for r in rows]
        assert len({tuple(r.tokens) for r in runs}) == 1
        assert all(np.array_equal(runs[0].query_positions, r.query_positions) for r in runs)
        assert len(runs[0].query_positions) > rows[0]["new_tokens"]          # the object word's rows too
        for other in runs[1:]:
            for i in range(runs[0].num_layers):
                a, b = runs[0].layer(i), other.layer(i)
                np.testing.assert_allclose(a.image, b.image, atol=1e-3)
                np.testing.assert_allclose(a.text, b.text, atol=1e-3)


def test_localise_by_hand():
    grid = np.zeros((4, 4))
    grid[0, 0], grid[3, 3] = 3.0, 1.0          # 400x200 image: cells 100x50, centres at 50, 150, ...
    got = pr.localise(grid, (400, 200), [[0, 0, 100, 60]])   # covers cell (0, 0) only
    assert got == {"hit": True, "mass": 0.75, "box_fraction": 1 / 16}
    got = pr.localise(grid, (400, 200), [[300, 150, 100, 50], [0, 100, 10, 10]])
    assert got["hit"] is False and got["mass"] == 0.25 and got["box_fraction"] == 1 / 16


def test_load_boxes_maps_file_names_to_category_boxes():
    boxes = pr.load_boxes(DATA / "coco" / "subset_instances.json")
    assert set(boxes) == {"COCO_val2014_000000429109.jpg", "COCO_val2014_000000569839.jpg", "COCO_val2014_000000297078.jpg"}
    assert {"person", "bicycle", "car"} <= set(boxes["COCO_val2014_000000429109.jpg"]) and "hot dog" in boxes["COCO_val2014_000000569839.jpg"]
    assert all(len(b) == 4 for b in boxes["COCO_val2014_000000429109.jpg"]["car"])
