"""benchmark.py --ablate-heads (issue 18, deliverable 4) on the tiny stand-in, fp32, with POPE questions
and images made here: every arm's answers equal a naive per-question run of the same ablation (for a
zero ablation: a copy of the model whose o_proj columns of those heads are zeroed, no intervention at
all); the arms resume separately; the control draws are seeded, recorded and as many as the ablated
heads; the report puts the arms side by side; a bad SPEC is one line before the model loads."""
import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import benchmark
from smolattn import interventions as iv
from smolattn import model as mdl
from smolattn import pope, pope_arms, runmeta, standin
from smolattn import pope_runner as pr
from smolattn.images import open_image

ROOT = Path(__file__).resolve().parent.parent
HEADS = ((1, 0), (1, 2), (2, 1), (3, 3))
SPEC = "1:0,1:2,2:1,3:3"
EDGE = 1024
OBJECTS = ["dog", "hot dog", "chair", "red car", "person"]


@pytest.fixture(scope="module")
def tiny_dir():
    return str(standin.ensure("tiny"))


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return pr.get_model(pr.Config(tiny_dir, device="cpu", dtype="float32"))   # the CLI's worker reuses it


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Three noise images of different sizes (different tile grids) and two POPE split files."""
    root = tmp_path_factory.mktemp("pope")
    rng = np.random.default_rng(0)
    names = []
    for i, size in enumerate([(640, 480), (300, 500), (900, 400)]):
        name = f"img{i}.jpg"
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(root / name, quality=90)
        names.append(name)
    qid = 0
    for split in ("random", "popular"):
        lines = []
        for n, name in enumerate(names):
            for k in range(1 + (split == "random")):
                qid += 1
                lines.append(json.dumps({"question_id": qid, "image": name, "label": "yes" if (n + k) % 2 else "no",
                                         "text": f"Is there a {OBJECTS[(n + 2 * k + len(split)) % 5]} in the image?"}))
        (root / f"made_{split}.json").write_text("\n".join(lines) + "\n")
    return root


def common(data, out, tiny_dir, *extra):
    return ["--benchmark-file", str(data), "--image-root", str(data), "--output-dir", str(out),
            "--model-id", tiny_dir, "--device", "cpu", "--longest-edge", str(EDGE), "--batch-size", "2", *extra]


def read(path):
    return [json.loads(l) for l in Path(path).read_text().splitlines() if l.strip()]


def answers(rows):
    return sorted((r["split"], r["question_id"], r["raw_answer"], r["new_tokens"]) for r in rows)


def by_image(data):
    out = {}
    for q in pope.load_questions([data]):
        out.setdefault(q.image, []).append(q)
    return out


NAIVE: dict = {}


def naive_answers(loaded, data, spec=None, heads=()):
    """The independent reference: one question at a time, processor + vision + generate, no shared prefix
    (``heads``: those o_proj columns zeroed in a copy of the model). Memoised."""
    key = (str(data), spec, tuple(heads))
    if key not in NAIVE:
        NAIVE[key] = _naive(zeroed(loaded, heads) if heads else loaded, data, spec)
    return NAIVE[key]


def _naive(loaded, data, spec):
    out = []
    for name, qs in by_image(data).items():
        img, _ = open_image(data / name)
        for q in qs:
            _, inputs = mdl.encode(loaded, img, q.text + pope.DEFAULT_SUFFIX, EDGE)
            with iv.applied(spec or iv.Spec()):
                new = mdl.generate(loaded, inputs, runmeta.POPE_MAX_NEW_TOKENS)
            raw = loaded.processor.tokenizer.decode(new, skip_special_tokens=True).strip()
            out.append((q.split, q.question_id, raw, len(new)))
    return sorted(out)


def zeroed(loaded, heads):
    ref = copy.deepcopy(loaded)
    D = loaded.model.config.text_config.head_dim
    for layer, h in heads:
        ref.model.model.text_model.layers[layer].self_attn.o_proj.weight.data[:, h * D:(h + 1) * D] = 0
    return ref


@pytest.fixture(scope="module")
def arms_run(tiny, tiny_dir, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("arms") / "out"
    code = benchmark.main(common(data, out, tiny_dir, "--ablate-heads", SPEC, "--control", "random",
                                 "--control-draws", "2", "--control-seed", "7"))
    assert code == 0
    return out


# ------------------------------------------------------------------------------ answers per arm

def test_cached_arm_equals_naive_with_zeroed_o_proj_columns(tiny, data):
    """The cached path (one ablated prefill per image, cross-image batches) == the naive path of a
    model copy whose o_proj columns are zeroed (no intervention code involved); and it changes answers."""
    images = [{"image": open_image(data / n)[0], "questions": qs} for n, qs in by_image(data).items()]
    rows = pr.answer_images(tiny, images, pope.DEFAULT_SUFFIX, runmeta.POPE_MAX_NEW_TOKENS, EDGE,
                            spec=iv.Spec(HEADS))
    assert {r["path"] for r in rows} == {"cached"}
    want = naive_answers(tiny, data, heads=HEADS)
    assert answers(rows) == want
    assert want != naive_answers(tiny, data)          # the ablation does change answers here


def test_mean_ablation_takes_the_naive_path_and_equals_it(tiny, data):
    images = [{"image": open_image(data / n)[0], "questions": qs} for n, qs in by_image(data).items()]
    spec = iv.Spec(HEADS, "mean")
    rows = pr.answer_images(tiny, images, pope.DEFAULT_SUFFIX, runmeta.POPE_MAX_NEW_TOKENS, EDGE, spec=spec)
    assert {r["path"] for r in rows} == {"naive"}
    assert answers(rows) == naive_answers(tiny, data, spec)
    assert answers(rows) != naive_answers(tiny, data, heads=HEADS)


def test_every_arm_of_the_cli_equals_its_naive_reference(arms_run, tiny, data):
    res = json.loads((arms_run / "results.json").read_text())
    assert list(res["arms"]) == ["base", "ablated", "control-0", "control-1"]
    keys = set()
    for name, arm in res["arms"].items():
        rows = read(arms_run / "arms" / name / "answers.jsonl")
        assert answers(rows) == naive_answers(tiny, data, heads=tuple(map(tuple, arm["heads"]))), name
        assert {r["config"] for r in rows} == {arm["config_key"]}
        assert (arms_run / "arms" / name / "results.json").is_file() and (arms_run / "arms" / name / "results.md").is_file()
        keys.add(arm["config_key"])
    assert len(keys) == 4                              # heads enter every arm's fingerprint
    ablated = json.loads((arms_run / "arms" / "ablated" / "results.json").read_text())["config"]
    assert ablated["intervention"] == {"heads": [list(h) for h in HEADS], "ablation": "zero"}


# ------------------------------------------------------------------------------ control draws

def test_control_draws_are_seeded_recorded_and_as_many_as_the_ablated(arms_run):
    arms = pope_arms.plan(SPEC, 4, 4, control="random", draws=2, seed=7)
    assert [a.name for a in arms] == ["base", "ablated", "control-0", "control-1"]
    draws = [a.heads for a in arms if a.kind == "control"]
    assert draws == [a.heads for a in pope_arms.plan(SPEC, 4, 4, control="random", draws=2, seed=7)
                     if a.kind == "control"]
    assert draws == [a.heads for a in pope_arms.plan(SPEC, 4, 4, control="random", draws=5, seed=7)
                     if a.kind == "control"][:2]                    # draw d does not depend on the number of draws
    assert draws != [a.heads for a in pope_arms.plan(SPEC, 4, 4, control="random", draws=2, seed=8)
                     if a.kind == "control"]
    assert draws[0] != draws[1]
    for hs in draws:
        assert len(hs) == len(HEADS) == len(set(hs)) and not set(hs) & set(HEADS)
    res = json.loads((arms_run / "results.json").read_text())
    assert res["control"]["heads"] == [[list(h) for h in hs] for hs in draws]
    assert res["control"]["seed"] == 7 and res["control"]["draws"] == 2
    for d, hs in enumerate(draws):
        cfg = json.loads((arms_run / "arms" / f"control-{d}" / "results.json").read_text())["config"]
        assert cfg["intervention"]["heads"] == [list(h) for h in hs]


# ------------------------------------------------------------------------------ the report

def test_report_puts_the_arms_side_by_side(arms_run):
    res = json.loads((arms_run / "results.json").read_text())
    md = (arms_run / "results.md").read_text()
    assert res["standin"] is True and md.startswith("**STAND-IN MODEL")
    assert "| split | base acc | ablated acc | control acc | base F1 | ablated F1 | control F1 | base yes |" in md
    per_arm = {n: json.loads((arms_run / "arms" / n / "results.json").read_text()) for n in res["arms"]}
    for conv in pope.PARSERS:
        for split in ("random", "popular"):
            for metric in ("accuracy", "f1", "yes_ratio"):
                vals = [per_arm[f"control-{d}"]["conventions"][conv]["splits"][split][metric] for d in range(2)]
                s = res["control"]["summary"][conv][split][metric]
                assert s["values"] == vals and s["mean"] == pytest.approx(np.mean(vals))
                assert s["sd"] == pytest.approx(np.std(vals, ddof=1))
                for name in ("base", "ablated"):
                    want = per_arm[name]["conventions"][conv]["splits"][split][metric]
                    assert res["arms"][name]["scores"][conv][split][metric] == want
        base = res["arms"]["base"]["scores"][conv]["random"]
        row = next(l for l in md.split(f"### Convention: {conv}")[1].splitlines() if l.startswith("| random |"))
        assert row.startswith(f"| random | {base['accuracy']:.4f} |")
    assert "control-0: " + pope_arms.fmt_heads(map(tuple, res["control"]["heads"][0])) in md


# ------------------------------------------------------------------------------ resuming

def test_arms_resume_separately_after_a_kill_and_a_torn_file(arms_run, tiny, tiny_dir, data, tmp_path, monkeypatch,
                                                             capsys):
    out = tmp_path / "out"
    shutil.copytree(arms_run, out)
    base_bytes = (out / "arms" / "base" / "answers.jsonl").read_bytes()
    full = {n: answers(read(arms_run / "arms" / n / "answers.jsonl")) for n in ("ablated", "control-0", "control-1")}
    (out / "arms" / "ablated" / "answers.jsonl").unlink()
    lines = (out / "arms" / "control-0" / "answers.jsonl").read_text().splitlines()
    (out / "arms" / "control-0" / "answers.jsonl").write_text("\n".join(lines[:3]) + "\n" + lines[3][:20])   # torn
    shutil.rmtree(out / "arms" / "control-1")
    argv = common(data, out, tiny_dir, "--ablate-heads", SPEC, "--control", "random", "--control-draws", "2",
                  "--control-seed", "7")
    real, calls = pr.answer_images, []

    def dying(*a, **k):          # the process dies on the ablated arm's second group of images
        calls.append(k.get("spec"))
        if k.get("spec") and len([c for c in calls if c]) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(pr, "answer_images", dying)
    with pytest.raises(KeyboardInterrupt):
        benchmark.main(argv)
    partial = read(out / "arms" / "ablated" / "answers.jsonl")
    assert 0 < len(partial) < len(full["ablated"])
    monkeypatch.setattr(pr, "answer_images", real)
    capsys.readouterr()
    assert benchmark.main(argv) == 0
    err = capsys.readouterr().err
    n = len(full["ablated"])
    assert f"{n} questions ({n} already answered)" in err                       # base
    assert f"{n} questions ({len(partial)} already answered)" in err           # ablated
    assert f"{n} questions (3 already answered)" in err                        # control-0, torn line dropped
    assert f"{n} questions (0 already answered)" in err                        # control-1
    assert (out / "arms" / "base" / "answers.jsonl").read_bytes() == base_bytes
    for name, want in full.items():
        assert answers(pope.latest(read(out / "arms" / name / "answers.jsonl")).values()) == want, name


# ------------------------------------------------------------------------------ plain runs, bad input

def test_plain_benchmark_keeps_its_layout_and_fingerprint(arms_run, tiny_dir, data, tmp_path):
    out = tmp_path / "plain"
    assert benchmark.main(common(data, out, tiny_dir)) == 0
    assert sorted(p.name for p in out.iterdir()) == ["answers.jsonl", "results.json", "results.md"]
    cfg = json.loads((out / "results.json").read_text())["config"]
    assert set(cfg) == {"model", "revision", "standin", "dtype", "processor", "suffix", "longest_edge",
                        "max_new_tokens", "attention", "greedy", "key", "device", "naive", "image_root", "limit"}
    base = json.loads((arms_run / "results.json").read_text())["arms"]["base"]
    assert cfg["key"] == base["config_key"]             # the base arm is exactly a plain run
    assert answers(read(out / "answers.jsonl")) == answers(read(arms_run / "arms" / "base" / "answers.jsonl"))


@pytest.mark.parametrize("extra,message", [
    (["--ablate-heads", "4:0"], "layer 4 is out of range"),
    (["--ablate-heads", "1:4"], "head 4 is out of range"),
    (["--ablate-heads", "1-2"], "is not LAYER:HEAD"),
    (["--ablate-heads", "top:2"], "needs --analysis"),
    (["--ablate-heads", "1:*,2:*,3:*", "--control", "random"], "only 4 others are left"),
    (["--control", "random"], "go with --ablate-heads"),
    (["--ablate-heads", "1:0", "--control-draws", "2"], "go with --control random"),
    (["--ablate-heads", "1:0", "--attention"], "not with --attention"),
    (["--ablate-heads", "1:0", "--control", "random", "--control-seed", "-1"], "--control-seed at least 0"),
])
def test_bad_spec_is_one_line_before_the_model_loads(tiny_dir, data, tmp_path, extra, message):
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(ROOT / "benchmark.py"), *common(data, out, tiny_dir, *extra)],
                       capture_output=True, text=True, cwd=ROOT, env={"SMOLATTN_MODELS": str(Path(tiny_dir).parent),
                                                                      "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert r.returncode != 0 and message in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 or r.stderr.startswith("usage:"), r.stderr
    assert not out.exists()


def test_bad_spec_is_refused_before_any_model_loads(tiny_dir, data, tmp_path, monkeypatch):
    from smolattn.errors import UserError

    def no_model(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(pr, "get_model", no_model)
    monkeypatch.setattr(mdl, "load", no_model)
    for spec in ("4:0", "top:1", "x"):
        with pytest.raises(UserError):
            benchmark.main(common(data, tmp_path / "out", tiny_dir, "--ablate-heads", spec))
    assert not (tmp_path / "out").exists()


def test_a_changed_spec_is_refused_and_overwrite_redoes_only_the_arms_it_changes(arms_run, tiny_dir, data, tmp_path,
                                                                                 capsys):
    from smolattn.errors import UserError

    out = tmp_path / "out"
    shutil.copytree(arms_run, out)
    before = {n: (out / "arms" / n / "answers.jsonl").read_bytes() for n in ("base", "control-0", "control-1")}
    argv = common(data, out, tiny_dir, "--ablate-heads", "0:1", "--control", "random", "--control-draws", "1",
                  "--control-seed", "7")
    with pytest.raises(UserError, match="another configuration"):
        benchmark.main(argv)
    assert (out / "arms" / "base" / "answers.jsonl").read_bytes() == before["base"]
    capsys.readouterr()
    assert benchmark.main(argv + ["--overwrite"]) == 0
    err = capsys.readouterr().err
    n = len(read(out / "arms" / "base" / "answers.jsonl"))
    assert err.count(f"{n} questions ({n} already answered)") == 1                          # base: not run again
    assert err.count(f"{n} questions (0 already answered)") == 2                            # ablated, control-0
    assert (out / "arms" / "base" / "answers.jsonl").read_bytes() == before["base"]          # same configuration: kept
    assert (out / "arms" / "control-1" / "answers.jsonl").read_bytes() == before["control-1"]  # not an arm now: left
    rows = read(out / "arms" / "ablated" / "answers.jsonl")
    res = json.loads((out / "results.json").read_text())
    assert list(res["arms"]) == ["base", "ablated", "control-0"] and res["arms"]["ablated"]["heads"] == [[0, 1]]
    assert {r["config"] for r in rows} == {res["arms"]["ablated"]["config_key"]}
    assert len(res["control"]["heads"][0]) == 1


def test_a_file_of_the_users_under_arms_refuses_the_folder_untouched(arms_run, tiny_dir, data, tmp_path):
    from smolattn.errors import UserError

    out = tmp_path / "out"
    shutil.copytree(arms_run, out)
    (out / "arms" / "mine").mkdir()
    (out / "arms" / "mine" / "notes.txt").write_text("mine")
    before = (out / "results.json").read_bytes()
    with pytest.raises(UserError, match="notes.txt|mine"):
        benchmark.main(common(data, out, tiny_dir, "--ablate-heads", SPEC, "--control", "random",
                              "--control-draws", "2", "--control-seed", "7"))
    assert (out / "results.json").read_bytes() == before and (out / "arms" / "mine" / "notes.txt").read_text() == "mine"
