"""Data safety (issue 9): never touch a user's files, crash-safe replace, durable writes, one JSONL
reader/writer, locked manifests, --longest-edge limit, viewer caches keyed by the run on disk."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import app as app_script
import extract_smolvlm_batch as batch_cli
from smolattn import batch, jsonl, pope, standin, store, synthetic
from smolattn import extract as ex
from smolattn.errors import DeviceError, UserError, run_cli
from viewer.runs import NotFound, Registry

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


@pytest.fixture(scope="module")
def tiny_dir():
    return str(standin.ensure("tiny"))


def snapshot(folder: Path, skip=()) -> dict:
    """sha256 of every file and the list of every folder under ``folder`` (except ``skip`` names)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if rel.parts[0] in skip:
            continue
        out[rel.as_posix()] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


def user_folder(d: Path) -> Path:
    """A folder as a user has it: the input photo, notes, sub-folders, even a file named image.png."""
    (d / "sub" / "deeper").mkdir(parents=True)
    Image.new("RGB", (64, 48), (200, 30, 30)).save(d / "cat.jpg")
    Image.new("RGB", (8, 8), (0, 0, 255)).save(d / "image.png")
    (d / "notes.txt").write_text("my notes\n")
    (d / "sub" / "data.bin").write_bytes(os.urandom(256))
    (d / "sub" / "deeper" / "meta.json").write_text('{"mine": true}\n')
    return d


def one_line_error(r, *words):
    lines = [line for line in r.stderr.splitlines() if line.strip() and not line.startswith("note:")]
    assert r.returncode != 0 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for w in words:
        assert w in lines[0], lines[0]


def extract_cli(cwd, *args, env=None):
    return subprocess.run([PY, str(ROOT / "extract_smolvlm_attn.py"), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, env=env, timeout=600)


def no_temporaries(folder: Path):
    assert not [p for p in folder.rglob(".*") if ".tmp-" in p.name or ".old-" in p.name]


# ------------------------------------------------------------------------- user files stay untouched

def test_default_output_dir_leaves_every_user_file_identical(tmp_path, tiny_dir, monkeypatch):
    d = user_folder(tmp_path / "photos")
    before = snapshot(d)
    common = ["--image", "cat.jpg", "--model-id", tiny_dir, "--longest-edge", 512, "--max-new-tokens", 2]
    r = extract_cli(d, *common)                              # the reference project's usage, default output dir
    assert r.returncode == 0, r.stderr
    run = d / store.DEFAULT_RUN_DIR
    assert store.incomplete(run) is None and store.Run(run).standin
    assert snapshot(d, skip={store.DEFAULT_RUN_DIR}) == before
    monkeypatch.chdir(d)                                     # `python app.py` in that folder serves it
    assert app_script.default_run() == store.DEFAULT_RUN_DIR
    r = extract_cli(d, *common, "--output-dir", ".")         # the folder itself: refused, nothing touched
    one_line_error(r, "current directory")
    assert snapshot(d, skip={store.DEFAULT_RUN_DIR}) == before
    no_temporaries(d)


def test_existing_non_run_output_dir_is_refused_untouched(tmp_path, tiny_dir):
    mine = user_folder(tmp_path / "mine")
    before = snapshot(mine)
    r = extract_cli(tmp_path, "--image", mine / "cat.jpg", "--output-dir", mine, "--model-id", tiny_dir)
    one_line_error(r, str(mine), "not a run written by smolattn")
    assert snapshot(mine) == before
    # our meta.json with a user's file next to it is no longer only ours: refused by the store too
    run = synthetic.make_run(tmp_path / "r", 1, 1)
    (run / "my_notes.txt").write_text("keep me\n")
    before = snapshot(run)
    with pytest.raises(UserError, match="not a run written by smolattn"):
        synthetic.make_run(run, 1, 1, seed=1)
    assert snapshot(run) == before
    for bad in ("attention/extra.txt", "attentions_5/x.npz", "notes.md"):   # anything that is not ours
        assert not store.owned_run(_with(tmp_path / bad.replace("/", "_"), bad))
    (tmp_path / "empty").mkdir()                                         # an empty directory may be used
    synthetic.make_run(tmp_path / "empty", 1, 1)
    assert store.incomplete(tmp_path / "empty") is None
    no_temporaries(tmp_path)


def _with(path: Path, extra: str) -> Path:
    synthetic.make_run(path, 1, 1)
    target = path / extra
    if target.exists():
        target.unlink()
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("user data\n")
    return path


def test_reference_run_is_replaced_only_on_request(tmp_path):
    ref = synthetic.make_run(tmp_path / "ref", 1, 1, reference=True)
    assert store.reference_run(ref) and not store.owned_run(ref)
    before = snapshot(ref)
    with pytest.raises(UserError, match="reference-format run.*--replace-reference-run"):
        synthetic.make_run(ref, 1, 1)                 # the reference project's data: not without asking
    assert snapshot(ref) == before
    with store.atomic_dir(ref, replace_reference=True) as tmp:    # asked for: replaced
        (tmp / "meta.json").write_text(json.dumps({"format": store.FORMAT}))
    assert sorted(p.name for p in ref.iterdir()) == ["meta.json"]
    ref2 = synthetic.make_run(tmp_path / "ref2", 1, 1, reference=True)
    (ref2 / "cat.jpg").write_bytes(b"user photo")
    assert not store.reference_run(ref2) and not store.owned_run(ref2)
    with pytest.raises(UserError, match="not a run written by smolattn.*cat.jpg"):
        store.check_target(ref2, replace_reference=True)       # a reference run with a user's file: never
    no_temporaries(tmp_path)


def test_cli_replaces_a_reference_run_only_with_the_flag(tmp_path, tiny_dir):
    img = tmp_path / "cat.jpg"
    Image.new("RGB", (64, 48), (1, 2, 3)).save(img)
    ref = synthetic.make_run(tmp_path / "ref", 1, 1, reference=True)
    before = snapshot(ref)
    args = ["--image", img, "--output-dir", ref, "--model-id", tiny_dir, "--longest-edge", 512, "--max-new-tokens", 2]
    one_line_error(extract_cli(tmp_path, *args), str(ref), "reference-format run", "--replace-reference-run")
    assert snapshot(ref) == before
    r = extract_cli(tmp_path, *args, "--replace-reference-run")
    assert r.returncode == 0, r.stderr
    assert store.incomplete(ref) is None and store.owned_run(ref)
    r = extract_cli(tmp_path, *args)                              # now ours: replaced as before, no flag
    assert r.returncode == 0, r.stderr
    # batch: a reference run inside the output root, refused before the model loads, replaced with the flag
    (tmp_path / "b").mkdir()
    d, root = one_image_and_a_root(tmp_path / "b")
    ref = synthetic.make_run(root / "a", 1, 1, reference=True)
    before = snapshot(root)
    r = subprocess.run([PY, str(ROOT / "extract_smolvlm_batch.py"), *batch_args(d, root, tiny_dir)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    one_line_error(r, str(ref), "reference-format run", "--replace-reference-run")
    assert snapshot(root) == before
    assert run_batch(batch_args(d, root, tiny_dir, "--replace-reference-run")) == 0
    assert store.incomplete(ref) is None and store.owned_run(ref)
    no_temporaries(tmp_path)


def run_batch(argv) -> int:
    with pytest.raises(SystemExit) as e:
        run_cli(batch_cli.main, argv)
    return e.value.code


def batch_args(image_dir, root, tiny_dir, *extra):
    return ["--image-dir", str(image_dir), "--output-root", str(root), "--model-id", tiny_dir, "--device", "cpu",
            "--longest-edge", "512", "--max-new-tokens", "2", *extra]


def test_batch_into_its_image_dir_spares_a_same_named_user_folder(tmp_path, tiny_dir, capsys):
    d = tmp_path / "photos"
    d.mkdir()
    for name in ("cat.jpg", "dog.jpg"):
        Image.new("RGB", (64, 48), (10, 200, 10)).save(d / name)
    (d / "cat").mkdir()                                     # the user's own folder named like a run
    (d / "cat" / "notes.txt").write_text("mine\n")
    (d / "cat" / "kitten.png").write_bytes(b"not even an image")
    before = snapshot(d)
    assert run_batch(batch_args(d, d, tiny_dir)) == 1
    rows = {r["image"]: r for r in jsonl.read(d / "manifest.jsonl")}
    assert rows["dog.jpg"]["status"] == "ok" and store.incomplete(d / "dog") is None
    assert rows["cat.jpg"]["status"] == "error" and "not a run written by smolattn" in rows["cat.jpg"]["error"]
    after = snapshot(d)
    assert {k: v for k, v in after.items() if k in before} == before
    # recursive: our run dirs are not taken for image folders (dog/image.jpg is no input)
    args = batch_cli.parse_args(batch_args(d, d, tiny_dir, "--recursive"))
    assert [it["image"] for it in batch.plan(args)] == ["cat.jpg", "cat/kitten.png", "dog.jpg"]
    no_temporaries(d)


# ------------------------------------------------------------------------- crash at each step

OLD, NEW = 0, 1


def layer0(run: Path) -> np.ndarray:
    return store.Run(run).layer(0).image


WRITER = "import sys; from smolattn import synthetic; synthetic.make_run(sys.argv[1], 1, 2, seed=int(sys.argv[2]))"


@pytest.mark.parametrize("step", store.CRASH_STEPS)
def test_sigkill_at_each_step_of_a_replace_leaves_old_or_new_complete(tmp_path, step):
    run = synthetic.make_run(tmp_path / "run", 1, 2, seed=OLD)
    expect = {s: layer0(synthetic.make_run(tmp_path / f"seed{s}", 1, 2, seed=s)) for s in (OLD, NEW)}
    env = {**os.environ, store.CRASH_ENV: step}
    p = subprocess.run([PY, "-c", WRITER, str(run), str(NEW)], cwd=ROOT, env=env, capture_output=True, timeout=120)
    assert p.returncode == -9, p.stderr                                    # killed at that step
    got = store.Run(run)                  # a reader finds a complete run (it restores a run set aside)
    assert store.incomplete(run) is None
    which = [s for s, a in expect.items() if np.array_equal(layer0(run), a)]
    assert which == ([OLD] if step in ("writing", "written", "aside") else [NEW]), step
    assert got.num_layers == 2
    synthetic.make_run(run, 1, 2, seed=NEW)            # the next write cleans up what the crash left
    assert np.array_equal(layer0(run), expect[NEW])
    no_temporaries(tmp_path)


def test_sigkill_during_a_real_extraction_replace(tmp_path, tiny_dir):
    img = tmp_path / "cat.jpg"
    Image.new("RGB", (64, 48), (1, 2, 3)).save(img)
    args = ["--image", img, "--output-dir", tmp_path / "run", "--model-id", tiny_dir, "--longest-edge", 512,
            "--max-new-tokens", 2]
    assert extract_cli(tmp_path, *args, "--prompt", "old").returncode == 0
    r = extract_cli(tmp_path, *args, "--prompt", "new", env={**os.environ, store.CRASH_ENV: "aside"})
    assert r.returncode == -9
    assert not (tmp_path / "run").exists()                    # between the two renames ...
    assert store.Run(tmp_path / "run").meta["prompt"] == "old"  # ... the old run is complete and put back
    assert extract_cli(tmp_path, *args, "--prompt", "new").returncode == 0
    assert store.Run(tmp_path / "run").meta["prompt"] == "new"
    no_temporaries(tmp_path)


def test_files_and_directory_are_fsynced_before_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_rename = os.fsync, os.rename
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd))[1])
    monkeypatch.setattr(os, "rename", lambda a, b: (events.append(("rename", str(a), str(b))), real_rename(a, b))[1])
    run = synthetic.make_run(tmp_path / "run", 1, 1)
    renames = [i for i, e in enumerate(events) if e[0] == "rename"]
    assert len(renames) == 1
    tmp = events[renames[0]][1]
    synced = {e[1] for e in events[:renames[0]] if e[0] == "fsync"}
    assert {str(Path(tmp) / f) for f in store.file_sizes(run)} | {str(Path(tmp) / "meta.json"), tmp} <= synced
    assert ("fsync", str(tmp_path)) in events[renames[0]:]              # the parent, after the rename
    meta = json.loads((run / "meta.json").read_text())
    assert meta["format_version"] == store.FORMAT_VERSION and meta["files"] == {k: v for k, v in store.file_sizes(run).items() if k != "meta.json"}


def test_incomplete_run_is_recomputed_on_resume(tmp_path, tiny_dir):
    d = tmp_path / "img"
    d.mkdir()
    Image.new("RGB", (64, 48), (5, 5, 5)).save(d / "a.jpg")
    root = tmp_path / "out"
    assert run_batch(batch_args(d, root, tiny_dir)) == 0
    layer = sorted((root / "a" / "attention").iterdir())[0]
    layer.write_bytes(layer.read_bytes()[:10])                      # e.g. a power cut without fsync
    assert "has 10 bytes" in store.incomplete(root / "a")
    assert run_batch(batch_args(d, root, tiny_dir)) == 0
    assert store.incomplete(root / "a") is None
    assert [r["status"] for r in jsonl.read(root / "manifest.jsonl")] == ["ok", "ok"]   # recomputed, not skipped


# ------------------------------------------------------------------------- stale clean-up and concurrency

def dead_pid() -> int:
    p = subprocess.Popen([PY, "-c", "pass"])
    p.wait()
    return p.pid


def test_recover_touches_only_dead_writers_entries(tmp_path):
    host = store._HOST
    live = tmp_path / f".a.tmp-0000000a-{host}-{os.getpid()}"
    dead = tmp_path / f".a.tmp-0000000b-{host}-{dead_pid()}"
    other_host = tmp_path / f".a.tmp-0000000c-elsewhere-{dead_pid()}"
    other_name = tmp_path / f".b.tmp-0000000d-{host}-{dead_pid()}"
    for p in (live, dead, other_host, other_name):
        p.mkdir()
    aside = synthetic.make_run(tmp_path / "x", 1, 1)
    aside.rename(tmp_path / f".a.old-0000000e-{host}-{dead_pid()}")    # killed between aside and swap
    assert batch.remove_stale(tmp_path, ["a"]) == 2
    assert live.is_dir() and other_host.is_dir() and other_name.is_dir() and not dead.exists()
    assert store.incomplete(tmp_path / "a") is None                      # the old run is back


def one_image_and_a_root(tmp_path):
    """An image folder with one photo, and an empty output root."""
    d = tmp_path / "img"
    d.mkdir()
    Image.new("RGB", (64, 48)).save(d / "a.jpg")
    root = tmp_path / "out"
    root.mkdir()
    return d, root


def test_second_batch_on_a_locked_root_says_so_in_one_line(tmp_path, tiny_dir):
    d, root = one_image_and_a_root(tmp_path)
    with batch.open_manifest(root / "manifest.jsonl"):               # another batch holds this root
        r = subprocess.run([PY, str(ROOT / "extract_smolvlm_batch.py"), *batch_args(d, root, tiny_dir)],
                           cwd=ROOT, capture_output=True, text=True, timeout=600)
    one_line_error(r, "in use by another batch")
    assert r.returncode == 2


def test_two_concurrent_batches_then_a_rerun_complete_everything(tmp_path, tiny_dir):
    d = tmp_path / "img"
    d.mkdir()
    rng = np.random.default_rng(1)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(d / f"i{i}.png")
    root = tmp_path / "out"
    cmd = [PY, str(ROOT / "extract_smolvlm_batch.py"), *batch_args(d, root, tiny_dir)]
    procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    for code, err in results:
        assert "Traceback" not in err and code in (0, 2), err
        if code == 2:
            assert "in use by another batch" in err
    assert 0 in [c for c, _ in results]
    assert run_batch(batch_args(d, root, tiny_dir)) == 0            # the rerun finds everything done
    rows = batch.read_manifests(root)
    assert sorted(rows) == [f"i{i}.png" for i in range(4)] and all(r["status"] == "ok" for r in rows.values())
    assert all(store.incomplete(root / f"i{i}") is None for i in range(4))
    no_temporaries(root)


def test_a_users_manifest_in_the_output_root_is_never_appended_to_or_truncated(tmp_path, tiny_dir):
    d, root = one_image_and_a_root(tmp_path)
    mine = b'{"id": 1, "note": "my own records"}\n{"id": 2, "note": "torn'          # not a batch manifest
    (root / "manifest.jsonl").write_bytes(mine)
    for extra in ((), ("--overwrite",)):
        r = subprocess.run([PY, str(ROOT / "extract_smolvlm_batch.py"), *batch_args(d, root, tiny_dir, *extra)],
                           cwd=ROOT, capture_output=True, text=True, timeout=600)
        one_line_error(r, "manifest.jsonl", "not written by smolattn", "left untouched")
        assert r.returncode == 2 and (root / "manifest.jsonl").read_bytes() == mine
    assert sorted(p.name for p in root.iterdir()) == ["manifest.jsonl"]


# ------------------------------------------------------------------------- one JSONL reader/writer

@pytest.mark.parametrize("name", ["manifest.jsonl", "answers.jsonl"])
def test_a_users_one_line_file_without_newline_is_not_a_torn_row(tmp_path, name):
    """A file of one line and no newline that is not JSON (a user's note) is not the torn tail of rows
    of ours: the writer refuses it, byte-identical (it used to cut it to zero bytes)."""
    path = tmp_path / name
    path.write_bytes(b"my notes, not JSON")
    with pytest.raises(UserError, match=f"{name}:1: invalid JSON"):
        jsonl.Writer(path, check=lambda row: None)
    assert path.read_bytes() == b"my notes, not JSON"
    path.write_bytes(b'{"a": 1}\n{"a": 2')                          # a torn append after a row stays torn
    with jsonl.Writer(path) as w:
        w.append({"a": 3})
    assert path.read_bytes() == b'{"a": 1}\n{"a": 3}\n'


def test_jsonl_torn_last_line_only(tmp_path, capsys):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'{"a": 1}\n\n{"a": 2}\n{"a": 3')
    assert jsonl.read(path) == [{"a": 1}, {"a": 2}]
    assert f"{path}: ignored a torn last line" in capsys.readouterr().err
    path.write_bytes(b'{"a": 1}\n{"a": 2}')                         # whole row, only the newline missing
    assert jsonl.read(path) == [{"a": 1}, {"a": 2}]
    with jsonl.Writer(path) as w:
        w.append({"a": 3})
    assert path.read_bytes() == b'{"a": 1}\n{"a": 2}\n{"a": 3}\n'
    path.write_bytes(b'{"a": 1}\n{"a": \n{"a": 3}\n')
    with pytest.raises(UserError, match=f"{path}:2: invalid JSON"):
        jsonl.read(path)
    path.write_bytes(b'{"a": 1}\n[1, 2]\n')
    with pytest.raises(UserError, match=f"{path}:2: not a JSON object"):
        jsonl.read(path)
    path.write_bytes(b'{"a": 1}\n{"b": 1}\n')
    with pytest.raises(UserError, match=f"{path}:2: no a"):
        jsonl.read(path, lambda r: None if "a" in r else "no a")
    with jsonl.Writer(path, lock=True, busy="busy!"):
        with pytest.raises(UserError, match="busy!"):
            jsonl.Writer(path, lock=True, busy="busy!")


def test_pope_answers_use_the_one_reader(tmp_path):
    from smolattn import pope_runner as pr
    path = tmp_path / "answers.jsonl"
    row = {"split": "random", "question_id": 1, "label": "yes", "status": "ok", "config": pr.Config().key()}
    path.write_text(json.dumps(row) + '\n{"split": "ra')
    answers = pope.AnswersFile(path, pr.Config().key())
    assert answers.done() == {("random", 1)}
    answers.append({**row, "question_id": 2})
    with pytest.raises(UserError, match="in use by another benchmark"):
        pope.AnswersFile(path, pr.Config().key())
    answers.close()
    assert [r["question_id"] for r in pope.read_answers(path)] == [1, 2]
    item = {"questions": [pope.Question("random", 3, "a.jpg", "Is there a cat?", "yes")]}
    with jsonl.Writer(path) as w:                        # a group of images Ray gave up on
        for r in pr.failed_rows(pr.Config(), [item], "the worker process died on this item 3 times"):
            w.append(r)
    resumed = pope.AnswersFile(path, pr.Config().key())          # same configuration: resumes, the error is retried
    assert resumed.done() == {("random", 1), ("random", 2)}
    resumed.close()
    path.write_text(json.dumps(row) + '\n{"split": "random"}\n')
    with pytest.raises(UserError, match=f"{path}:2: not an answers row"):
        pope.read_answers(path)


# ------------------------------------------------------------------------- bad settings, device errors

def test_longest_edge_above_six_tiles_fails_before_the_model_loads(tmp_path, tiny_dir):
    no_weights = tmp_path / "model"                      # the configs without weights: loading it would fail
    no_weights.mkdir()
    for f in ("config.json", "processor_config.json"):
        (no_weights / f).write_bytes((Path(tiny_dir) / f).read_bytes())
    assert ex.checkpoint_tile_size(str(no_weights)) == 512
    img = tmp_path / "a.png"
    Image.new("RGB", (64, 48)).save(img)
    r = extract_cli(tmp_path, "--image", img, "--output-dir", tmp_path / "o", "--model-id", no_weights,
                    "--longest-edge", 3073)
    one_line_error(r, "--longest-edge 3073", "limit of 3072")
    d = tmp_path / "imgs"
    d.mkdir()
    Image.new("RGB", (64, 48)).save(d / "a.png")
    r = subprocess.run([PY, str(ROOT / "extract_smolvlm_batch.py"), "--image-dir", d, "--output-root", tmp_path / "b",
                        "--model-id", no_weights, "--longest-edge", "4000"], capture_output=True, text=True, timeout=600)
    one_line_error(r, "limit of 3072")
    assert not (tmp_path / "o").exists() and not (tmp_path / "b").exists()
    ex.check_longest_edge(3072, 512)
    assert ex.checkpoint_tile_size("nobody/not-cached-anywhere") is None


def test_cuda_error_stops_the_local_worker_in_one_line(tmp_path, tiny_dir, monkeypatch, capsys):
    d = tmp_path / "img"
    d.mkdir()
    for name in ("a.png", "b.png", "c.png"):
        Image.new("RGB", (64, 48)).save(d / name)
    real, calls = ex.step, []

    def step(loaded, settings, batch):       # the model step of the second image hits a CUDA error
        calls.append(len(batch))
        if len(calls) == 2:
            raise RuntimeError("CUDA error: device-side assert triggered\nCompile with TORCH_USE_CUDA_DSA")
        return real(loaded, settings, batch)

    monkeypatch.setattr(ex, "step", step)
    root = tmp_path / "out"
    assert run_batch(batch_args(d, root, tiny_dir, "--batch-size", "1", "--workers", "0")) == 3
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and "b.png: RuntimeError: CUDA error: device-side assert" in err[0] and "stopped" in err[0]
    assert [r["image"] for r in jsonl.read(root / "manifest.jsonl")] == ["a.png"]   # b and c: left for the rerun
    monkeypatch.setattr(ex, "step", real)
    assert run_batch(batch_args(d, root, tiny_dir)) == 0


# ------------------------------------------------------------------------- viewer

def test_viewer_reloads_a_run_rewritten_on_disk(tmp_path):
    root = tmp_path / "runs"
    synthetic.make_run(root / "r", 1, 2, seed=0)
    reg = Registry(root, single=False)
    old = reg.run("r")
    old_layer = reg.layer("r", old, 0).image.copy()
    assert reg.run("r") is old                                    # unchanged on disk: cached
    old_summary = reg.summary("r", old)
    synthetic.make_run(root / "r", 2, 2, seed=1)                  # rewritten while the viewer is open
    new = reg.run("r")
    assert new is not old and (new.geometry.rows, new.geometry.cols) == (2, 2)
    new_layer = reg.layer("r", new, 0).image
    assert new_layer.shape != old_layer.shape
    assert np.array_equal(new_layer, store.Run(root / "r").layer(0).image[:, _text_rows(new)])
    assert reg.summary("r", new).mean_map.shape[-1] == new.geometry.num_keys != old_summary.mean_map.shape[-1]
    with pytest.raises(NotFound, match="changed on disk"):       # an old handle never reads new files
        reg.layer("r", old, 1)


def _text_rows(run):
    from viewer.runs import text_rows
    keep = text_rows(run).keep
    return slice(None) if keep is None else keep


def test_other_outputs_replace_only_their_own_kind(tmp_path):
    """outputs.atomic_dir(final, kind): a head analysis replaces an earlier analysis holding only its
    own names, never another folder, and never one with a user's file in it."""
    from smolattn import head_report, outputs
    earlier = tmp_path / "analysis"
    earlier.mkdir()
    (earlier / "analysis.json").write_text(json.dumps({"format": head_report.FORMAT}))
    (earlier / "grid_se.png").write_bytes(b"png")
    with outputs.atomic_dir(earlier, head_report.KIND) as tmp:
        (tmp / "analysis.json").write_text(json.dumps({"format": head_report.FORMAT, "new": True}))
    assert json.loads((earlier / "analysis.json").read_text())["new"]
    (earlier / "notes.md").write_text("mine\n")
    mine = user_folder(tmp_path / "mine")
    for folder, name in ((earlier, "notes.md"), (mine, "")):
        before = snapshot(folder)
        with pytest.raises(UserError, match=f"not a head analysis written by smolattn.*{folder / name}"):
            with outputs.atomic_dir(folder, head_report.KIND):
                pass
        assert snapshot(folder) == before
    for folder in (earlier, mine):     # nor as a run
        with pytest.raises(UserError, match="not a run written by smolattn"):
            store.check_target(folder)
    no_temporaries(tmp_path)


def test_single_file_markers(tmp_path):
    from smolattn import heatmap, outputs
    png, js = tmp_path / "h.png", tmp_path / "h.json"
    outputs.replace_files({png: (heatmap.png_bytes(Image.new("RGB", (4, 4))), heatmap.PNG_MARKER),
                           js: (json.dumps({"format": heatmap.FORMAT}).encode(), heatmap.JSON_MARKER)})
    assert heatmap.PNG_MARKER.on(png) and heatmap.JSON_MARKER.on(js)
    outputs.replace_file(js, json.dumps({"format": heatmap.FORMAT, "n": 2}).encode(), heatmap.JSON_MARKER)
    Image.new("RGB", (4, 4)).save(png)                    # a PNG without our chunk is a user's picture
    with pytest.raises(UserError, match=f"{png} exists and was not written by smolattn"):
        outputs.replace_file(png, heatmap.png_bytes(Image.new("RGB", (4, 4))), heatmap.PNG_MARKER)
    with pytest.raises(ValueError):                       # what we write always carries the marker
        outputs.replace_file(tmp_path / "x.json", b"{}", heatmap.JSON_MARKER)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h.json", "h.png"]


# ------------------------------------------------------------------------- POPE output folders

def answers_file(path: Path) -> Path:
    from smolattn import pope_runner as pr
    rows = [{"split": "random", "question_id": i, "image": "a.jpg", "question": "Is there a cat in the image?",
             "label": "yes" if i % 2 else "no", "raw_answer": "Yes", "status": "ok", "config": pr.Config().key(),
             "parsed": {c: f("Yes") for c, f in pope.PARSERS.items()}, "standin": True} for i in (1, 2)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def benchmark_cli(cwd, *args):
    return subprocess.run([PY, str(ROOT / "benchmark.py"), *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def test_a_users_results_json_in_the_benchmark_output_dir_survives(tmp_path):
    answers = answers_file(tmp_path / "saved" / "answers.jsonl")
    mine = tmp_path / "mine"                             # the case: `--output-dir .` in a user's folder
    mine.mkdir()
    (mine / "results.json").write_text('{"my": "results"}\n')
    (mine / "answers.jsonl").write_bytes(answers.read_bytes())
    for d, cwd in ((".", mine), (mine, tmp_path)):
        before = snapshot(mine)
        r = benchmark_cli(cwd, "--answers", mine / "answers.jsonl", "--output-dir", d)
        one_line_error(r, "results.json", "left untouched")
        assert snapshot(mine) == before
    (mine / "results.json").unlink()
    (mine / "notes.md").write_text("mine\n")                  # any file that is not ours: refused too
    before = snapshot(mine)
    one_line_error(benchmark_cli(mine, "--answers", "answers.jsonl", "--output-dir", "."), "notes.md", "POPE output folder")
    assert snapshot(mine) == before
    # a full benchmark: refused before the model loads (this model id does not exist)
    (mine / "notes.md").unlink()
    (mine / "results.md").write_text("# my report\n")
    q = tmp_path / "q_random.json"
    q.write_text(json.dumps({"question_id": 1, "image": "a.jpg", "text": "Is there a cat in the image?",
                             "label": "yes"}) + "\n")
    before = snapshot(mine)
    r = benchmark_cli(tmp_path, "--benchmark-file", q, "--output-dir", mine, "--model-id", tmp_path / "no-model")
    one_line_error(r, str(mine / "results.md"), "left untouched")
    assert snapshot(mine) == before
    (mine / "results.md").unlink()
    (mine / "attention" / "random" / "1").mkdir(parents=True)       # a user's folder where a run would go
    (mine / "attention" / "random" / "1" / "keep.txt").write_text("mine\n")
    before = snapshot(mine)
    r = benchmark_cli(tmp_path, "--benchmark-file", q, "--output-dir", mine, "--model-id", tmp_path / "no-model",
                      "--attention")
    one_line_error(r, "keep.txt", "not a run written by smolattn")
    assert snapshot(mine) == before
    # our own results: written, then replaced
    out = tmp_path / "out"
    r = benchmark_cli(tmp_path, "--answers", answers, "--output-dir", out)
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "results.json").read_text())["format"] == pope.RESULTS_FORMAT
    assert pope.REPORT_MARKER.on(out / "results.md")
    stamp = (out / "results.json").stat().st_ino
    r = benchmark_cli(tmp_path, "--answers", answers, "--output-dir", out)
    assert r.returncode == 0 and (out / "results.json").stat().st_ino != stamp, r.stderr
