"""Batch extraction: bad files, SIGKILL + resume, fingerprint refusal, shards, Ray = local."""
from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import extract_smolvlm_batch as cli
from smolattn import batch, scheduler, standin, store
from smolattn.errors import DeviceError, UserError, run_cli

ROOT = Path(__file__).resolve().parent.parent
GOOD = ["a.jpg", "a.png", "sub/a.jpg", "sub/deeper/b.jpeg"] + [f"img{i:02d}.jpg" for i in range(4)]
BAD = {"corrupt.jpg": "corrupt or truncated", "notimage.jpg": "not an image", "empty.png": "not an image"}


@pytest.fixture(scope="module")
def model_dir():
    return str(standin.ensure("tiny"))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for name in GOOD:
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(d / name)
    (d / "corrupt.jpg").write_bytes((d / "img00.jpg").read_bytes()[:400])       # truncated JPEG
    (d / "notimage.jpg").write_text("this is a text file\n")
    (d / "empty.png").write_bytes(b"")
    (d / "notes.txt").write_text("not an image extension: ignored\n")
    (d / ".hidden.jpg").write_text("hidden files are ignored\n")
    return d


@pytest.fixture(scope="module")
def common(folder, model_dir):
    return ["--image-dir", str(folder), "--recursive", "--model-id", model_dir, "--device", "cpu",
            "--longest-edge", "512", "--max-new-tokens", "4"]


def run_batch(argv) -> int:
    """The CLI in this process; returns its exit status."""
    with pytest.raises(SystemExit) as e:
        run_cli(cli.main, argv)
    return e.value.code


def rows(root: Path) -> list[dict]:
    return [json.loads(line) for p in sorted(root.glob("manifest*.jsonl")) for line in p.read_text().splitlines()]


def run_dirs(root: Path) -> set[str]:
    return {p.name for p in root.iterdir() if p.is_dir()}


def assert_same_runs(a: Path, b: Path, names=None):
    names = names or run_dirs(a)
    assert names <= run_dirs(b)
    for name in names:
        ma, mb = (json.loads((r / name / "meta.json").read_text()) for r in (a, b))
        assert (ma["answer"], ma["token_ids"]) == (mb["answer"], mb["token_ids"]), name
        np.testing.assert_array_equal(np.load(a / name / "decoded_tokens.npy"), np.load(b / name / "decoded_tokens.npy"))
        ra, rb = store.Run(a / name), store.Run(b / name)
        assert ra.num_layers == rb.num_layers > 0
        for i in range(ra.num_layers):
            za, zb = ra.layer_arrays(i), rb.layer_arrays(i)
            assert set(za) == set(zb)
            for k in za:
                assert np.array_equal(za[k], zb[k]), (name, i, k)


def no_partial_dirs(root: Path):
    assert not [p for p in root.rglob("*") if ".tmp-" in p.name]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, common):
    """An uninterrupted run over the whole folder."""
    root = tmp_path_factory.mktemp("reference")
    assert run_batch(common + ["--output-root", str(root)]) == 1   # 1: some images failed
    return root


def test_reference_run_outputs_and_error_rows(reference, common):
    by_image = {r["image"]: r for r in rows(reference)}
    assert len(rows(reference)) == len(by_image) == len(GOOD) + len(BAD)     # one row per image
    for name, message in BAD.items():
        assert by_image[name]["status"] == "error" and message in by_image[name]["error"]
    assert all(by_image[g]["status"] == "ok" and by_image[g]["new_tokens"] >= 1 for g in GOOD)
    # stems clash between a.jpg, a.png and sub/a.jpg: those keep their extension / path
    assert {by_image[g]["run"] for g in ("a.jpg", "a.png", "sub/a.jpg", "sub/deeper/b.jpeg")} == \
        {"a.jpg", "a.png", "sub__a.jpg", "b"}
    assert run_dirs(reference) == {by_image[g]["run"] for g in GOOD}
    cfg = json.loads((reference / "batch_config.json").read_text())
    assert {r["fingerprint"] for r in by_image.values()} == {cfg["fingerprint"]}
    assert cfg["config"]["max_new_tokens"] == 4 and cfg["config"]["store"] == "compact"
    # a rerun resumes: nothing is recomputed, failures are not retried by default, status stays 1
    before = (reference / "manifest.jsonl").read_bytes()
    assert run_batch(common + ["--output-root", str(reference)]) == 1
    assert (reference / "manifest.jsonl").read_bytes() == before


def test_sigkill_then_resume_equals_uninterrupted(tmp_path, common, reference):
    root = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(ROOT / "extract_smolvlm_batch.py"), *common, "--output-root", str(root)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if any(r["status"] == "ok" for r in (rows(root) if root.is_dir() else [])):
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the batch ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(rows(root))
    assert 1 <= done < len(GOOD) + len(BAD)
    assert all((root / d / "meta.json").is_file() for d in run_dirs(root) if not d.startswith("."))

    assert run_batch(common + ["--output-root", str(root)]) == 1
    no_partial_dirs(root)
    assert run_dirs(root) == run_dirs(reference)
    assert sorted(r["image"] for r in rows(root)) == sorted(r["image"] for r in rows(reference))  # once each
    assert_same_runs(reference, root)


def test_changed_fingerprint_refused_unless_overwrite(tmp_path, common, capsys):
    root = str(tmp_path / "out")
    assert run_batch(common + ["--output-root", root, "--limit", "2"]) == 0
    capsys.readouterr()
    assert run_batch(common + ["--output-root", root, "--limit", "2", "--prompt", "What is this?"]) == 2
    err = capsys.readouterr().err
    assert "another configuration" in err and "prompt" in err and "--overwrite" in err
    assert run_batch(common + ["--output-root", root, "--limit", "2", "--prompt", "What is this?", "--overwrite"]) == 0
    got = rows(Path(root))
    cfg = json.loads((Path(root) / "batch_config.json").read_text())
    assert len(got) == 2 and {r["fingerprint"] for r in got} == {cfg["fingerprint"]}
    assert all(json.loads((Path(root) / r["run"] / "meta.json").read_text())["prompt"] == "What is this?" for r in got)


def test_shards_cover_the_folder_exactly_once(tmp_path, common, reference):
    root = str(tmp_path / "out")      # two "machines" sharing one output root, run side by side on a fresh root
    other = subprocess.Popen([sys.executable, str(ROOT / "extract_smolvlm_batch.py"), *common, "--output-root", root,
                              "--shards", "2", "--shard-index", "1"], cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    codes = [run_batch(common + ["--output-root", root, "--shards", "2", "--shard-index", "0"]),
             other.wait(timeout=300)]
    assert 1 in codes and set(codes) <= {0, 1}, other.stderr.read()
    assert json.loads((Path(root) / "batch_config.json").read_text())["shards"] == 2
    files = sorted(p.name for p in Path(root).glob("manifest*.jsonl"))
    assert files == ["manifest.shard-0-of-2.jsonl", "manifest.shard-1-of-2.jsonl"]
    images = [r["image"] for r in rows(Path(root))]
    assert sorted(images) == sorted(GOOD + list(BAD))
    assert all((Path(root) / f).read_text() for f in files)
    assert_same_runs(reference, Path(root))


def snapshot(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


def test_another_shard_layout_is_refused_unless_overwrite(tmp_path, common, capsys):
    root = tmp_path / "out"
    assert run_batch(common + ["--output-root", str(root), "--limit", "2"]) == 0       # --shards 1
    before = snapshot(root)
    capsys.readouterr()
    for i in (0, 1):   # would write the same runs as the --shards 1 batch: refused, one line, nothing written
        assert run_batch(common + ["--output-root", str(root), "--limit", "2", "--shards", "2", "--shard-index", str(i)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "--shards 1" in err and "--overwrite" in err, err
        assert snapshot(root) == before
    assert json.loads((root / "batch_config.json").read_text())["shards"] == 1
    # a root of an older version (no layout recorded): its manifests' names say the layout
    cfg = json.loads((root / "batch_config.json").read_text())
    del cfg["shards"]
    (root / "batch_config.json").write_text(json.dumps(cfg))
    assert run_batch(common + ["--output-root", str(root), "--limit", "2", "--shards", "2"]) == 2
    assert "--shards 1" in capsys.readouterr().err
    # --overwrite starts it over with the new layout, but not while a batch of the old one holds its manifest
    with batch.open_manifest(root / "manifest.jsonl"):
        assert run_batch(common + ["--output-root", str(root), "--limit", "2", "--shards", "2", "--overwrite"]) == 2
        assert "in use by another batch" in capsys.readouterr().err
    assert (root / "manifest.jsonl").is_file()
    assert run_batch(common + ["--output-root", str(root), "--limit", "2", "--shards", "2", "--overwrite"]) == 0
    assert sorted(p.name for p in root.glob("manifest*")) == ["manifest.shard-0-of-2.jsonl"]
    assert json.loads((root / "batch_config.json").read_text())["shards"] == 2
    assert run_batch(common + ["--output-root", str(root), "--limit", "2", "--shards", "2", "--shard-index", "1"]) == 0
    assert run_batch(common + ["--output-root", str(root), "--limit", "2"]) == 2         # now --shards 1 is refused


def test_layout_record_is_race_safe(tmp_path):
    """Shards of one layout starting at once all pass; of two layouts starting at once, one layout."""
    import threading

    def start(root, shards, results):
        barrier.wait()
        try:
            batch.check_config(root, {"prompt": "p"}, False, shards)
            results.append(shards)
        except UserError:
            results.append(None)

    for trial in range(20):
        for layouts in ([3, 3, 3, 3], [1, 2, 1, 2]):
            root, results = tmp_path / f"{trial}-{len(set(layouts))}", []
            root.mkdir()
            barrier = threading.Barrier(len(layouts))
            threads = [threading.Thread(target=start, args=(root, n, results)) for n in layouts]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            recorded = json.loads((root / "batch_config.json").read_text())["shards"]
            assert sorted(r for r in results if r is not None) == [n for n in sorted(layouts) if n == recorded]
            assert [p.name for p in root.iterdir()] == ["batch_config.json"]      # no temporary file left


def test_retry_failed_and_bad_arguments(tmp_path, common, capsys):
    root = str(tmp_path / "out")
    assert run_batch(common + ["--output-root", root, "--shard-index", "1"]) == 2
    assert "--shard-index" in capsys.readouterr().err
    assert run_batch(common[:1] + [str(tmp_path / "missing")] + common[2:] + ["--output-root", root]) == 2
    args = cli.parse_args(common + ["--output-root", root, "--extensions", ".png"])
    assert [it["image"] for it in batch.plan(args)] == ["a.png", "empty.png"]
    assert run_batch(common + ["--output-root", root, "--extensions", "png"]) == 1
    assert run_batch(common + ["--output-root", root, "--extensions", "png", "--retry-failed"]) == 1
    got = rows(Path(root))
    assert [r["image"] for r in got] == ["a.png", "empty.png", "empty.png"]


def test_names_and_discovery(tmp_path):
    names = batch.run_names(["A.jpg", "a.png", "sub/a.jpg", "sub__a.jpg", "x.jpg", "manifest.jsonl.png", "q/r.png"])
    assert names["x.jpg"] == "x" and names["q/r.png"] == "r" and names["manifest.jsonl.png"] == "manifest.jsonl.png"
    assert len({n.casefold() for n in names.values()}) == len(names)          # collision-free
    (tmp_path / "out").mkdir()
    for p in ["b.JPG", "a.png", "out/a.jpg", ".h.jpg", ".git/x.jpg", "s/c.jpg", "t.txt"]:
        (tmp_path / p).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / p).write_bytes(b"")
    exts = batch.parse_extensions("jpg,.PNG")
    assert batch.discover(tmp_path, exts, recursive=True, exclude=tmp_path / "out") == ["a.png", "b.JPG", "s/c.jpg"]
    assert batch.discover(tmp_path, exts) == ["a.png", "b.JPG"]


def test_torn_manifest_line_is_ignored_and_repaired(tmp_path, capsys):
    path = tmp_path / "manifest.jsonl"
    path.write_text('{"image": "a.jpg", "status": "ok", "finished_at": "1"}\n{"image": "b.j')
    assert sorted(batch.read_manifests(tmp_path)) == ["a.jpg"]
    assert "torn last line" in capsys.readouterr().err
    with batch.open_manifest(path) as m:        # cuts the torn line off before appending
        m.append({"image": "c.jpg", "status": "ok", "finished_at": "2"})
    assert sorted(batch.read_manifests(tmp_path)) == ["a.jpg", "c.jpg"]
    assert path.read_text().count("\n") == 2 and "b.j" not in path.read_text()
    path.write_text(path.read_text() + "garbage\n" + '{"image": "d.jpg"}\n')    # not the last line: refused
    with pytest.raises(UserError, match=f"{path}:3: invalid JSON"):
        batch.read_manifests(tmp_path)


def test_engine_prefetch_errors_reach_the_worker():
    seen = []

    def prefetch(item):
        if item == 2:
            raise ValueError("bad item")
        return item * 10

    scheduler.run_engine([1, 2, 3], lambda: (lambda item, pre: {"item": item, "pre": repr(pre)}),
                     prefetch=prefetch, on_result=seen.append)
    assert seen == [{"item": 1, "pre": "10"}, {"item": 2, "pre": "ValueError('bad item')"}, {"item": 3, "pre": "30"}]


def make_toy_worker(tag):
    return lambda item, pre: {"item": item, "pre": pre if not isinstance(pre, Exception) else repr(pre), "tag": tag}


def toy_prefetch(item):
    if item == 3:
        raise ValueError("bad item")
    return item * 10


def failing_worker():
    raise UserError("cannot load the model here")


def make_fragile_worker(marker):
    """Item 3 kills the worker process every time; item 4 hits a CUDA error on the first actor only."""
    def work(item, pre):
        if item == 3:
            os._exit(1)
        if item == 4 and not os.path.exists(marker):
            open(marker, "w").close()
            raise DeviceError("4: RuntimeError: CUDA error: device-side assert triggered; the worker stopped")
        return {"item": item}
    return work


def make_fragile_chunk_worker():
    """Chunks of items; item 3 kills the worker process every time."""
    def work(chunk, pre):
        if 3 in chunk:
            os._exit(1)
        return [{"item": item} for item in chunk]
    return work


def test_ray_engine_equals_local(tmp_path, common, reference, capsys):
    ray = pytest.importorskip("ray", reason="Ray is optional: pip install -r requirements-ray.txt")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        # the generic engine: an actor pool of 2, prefetch errors reach the worker, rows come back
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
        got = []
        scheduler.run_engine(list(range(6)), functools.partial(make_toy_worker, "t"), engine="ray", num_workers=2,
                         prefetch=toy_prefetch, on_result=got.append)
        assert sorted(got, key=lambda r: r["item"]) == [
            {"item": i, "pre": "ValueError('bad item')" if i == 3 else i * 10, "tag": "t"} for i in range(6)]
        with pytest.raises(UserError, match="cannot load the model here"):
            scheduler.run_engine([1], failing_worker, engine="ray")
        # a process that dies on an item: Ray restarts it, the item is retried alone, then becomes an error
        # row; a CUDA error stops one actor (one line), the other actor does the rest
        got = []
        scheduler.run_engine(list(range(8)), functools.partial(make_fragile_worker, str(tmp_path / "cuda")), engine="ray",
                         num_workers=2, on_result=got.append, retries=2,
                         on_failure=lambda item, message: {"item": item, "error": message})
        assert sorted(r["item"] for r in got) == list(range(8))
        errors = [r for r in got if "error" in r]
        assert [r["item"] for r in errors] == [3] and "died on this item 3 times (retries exhausted)" in errors[0]["error"]
        assert len([line for line in capsys.readouterr().err.splitlines() if "stopped" in line]) == 1
        # chunks (the batch's Ray items): a process that dies on a chunk -> its items are retried one by
        # one, so only the item that kills it fails; the others come back (as lists of rows)
        got = []
        scheduler.run_engine([[0, 1], [2, 3], [4, 5]], make_fragile_chunk_worker, engine="ray", num_workers=2,
                         on_result=got.extend, retries=1, size=len, split=scheduler.split_chunk,
                         on_failure=lambda chunk, message: [{"item": i, "error": message} for i in chunk])
        assert sorted(r["item"] for r in got) == list(range(6))
        assert [r["item"] for r in got if "error" in r] == [3]
        # the batch: one actor with the same thread count as this process gives identical outputs
        root = tmp_path / "out"
        threads = str(torch.get_num_threads())
        assert run_batch(common + ["--output-root", str(root), "--engine", "ray", "--cpus-per-worker", threads]) == 1
        # batched inside the actors (chunks of 4 batches of 2), decoded in a process pool inside the actor:
        # the same answers, rows within fp16 rounding
        batched = tmp_path / "batched"
        assert run_batch(common + ["--output-root", str(batched), "--engine", "ray", "--cpus-per-worker", threads,
                                   "--batch-size", "2", "--workers", "1"]) == 1
    finally:
        ray.shutdown()
    assert {r["image"]: r["answer"] for r in rows(batched)} == {r["image"]: r["answer"] for r in rows(reference)}
    assert {r["image"]: r["timings"].get("batch") for r in rows(batched) if r["status"] == "ok"} == \
        {g: 2 for g in GOOD}
    for name in run_dirs(reference):
        ra, rb = store.Run(reference / name), store.Run(batched / name)
        assert json.loads((reference / name / "meta.json").read_text())["token_ids"] == \
            json.loads((batched / name / "meta.json").read_text())["token_ids"]
        for i in range(ra.num_layers):
            np.testing.assert_allclose(ra.layer(i).image, rb.layer(i).image, atol=2e-3)
    strip = lambda rs: sorted(({k: v for k, v in r.items() if k not in ("timings", "finished_at")} for r in rs),
                              key=lambda r: r["image"])  # noqa: E731
    assert strip(rows(root)) == strip(rows(reference))
    assert run_dirs(root) == run_dirs(reference)
    assert_same_runs(reference, root)
