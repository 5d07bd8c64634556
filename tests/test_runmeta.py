"""smolattn.runmeta: one configuration record for every writer, and the command that rebuilds a run.

The command a run's viewer shows (to add methods) is executed here and must rebuild the same run:
the same token ids and the same stored rows, for a POPE attention run and for a 2.2B-geometry run
made at --longest-edge 2048. POPE's fingerprint covers --attention, --methods and the processor;
--overwrite removes our attention runs of the old configuration and nothing else. The questions
and images are made here (no data outside the repository)."""
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import benchmark
from smolattn import pope_runner as pr
from smolattn import runmeta, standin, store
from smolattn.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
QUESTIONS = [("a.png", "car", "yes"), ("a.png", "dog", "no"), ("b.png", "person", "yes")]


def photo(path: Path, size, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def pope_data(tmp_path_factory):
    """Two photos and a one-split POPE file about them (split from the file name: random)."""
    d = tmp_path_factory.mktemp("pope")
    (d / "images").mkdir()
    photo(d / "images" / "a.png", (200, 120), 0)
    photo(d / "images" / "b.png", (96, 160), 1)
    lines = [json.dumps({"question_id": i + 1, "image": im, "text": f"Is there a {obj} in the image?", "label": lab})
             for i, (im, obj, lab) in enumerate(QUESTIONS)]
    (d / "coco_pope_random.json").write_text("\n".join(lines) + "\n")
    return d


def execute(cmd: str, cwd=ROOT) -> subprocess.CompletedProcess:
    """Run a command line as the viewer shows it (``python script.py ...``) with this interpreter."""
    words = shlex.split(cmd)
    assert words[0] == "python"
    p = subprocess.run([sys.executable, *words[1:]], cwd=cwd, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert p.returncode == 0, f"{cmd}\n{p.stderr[-3000:]}"
    return p


def assert_same_rows(a: store.Run, b: store.Run):
    assert a.meta["token_ids"] == b.meta["token_ids"] and a.tokens == b.tokens
    assert a.prompt_length == b.prompt_length and a.meta["answer"] == b.meta["answer"]
    assert a.geometry.to_json() == b.geometry.to_json()
    assert np.array_equal(a.query_positions, b.query_positions)
    assert a.num_layers == b.num_layers
    for i in range(a.num_layers):
        la, lb = a.layer(i), b.layer(i)
        assert np.array_equal(la.image, lb.image) and np.array_equal(la.text, lb.text)


def test_the_command_of_a_pope_attention_run_rebuilds_it(pope_data, tmp_path, make_app):
    tiny = str(standin.ensure("tiny"))
    out = tmp_path / "out"
    execute(shlex.join(["python", "benchmark.py", "--benchmark-file", str(pope_data / "coco_pope_random.json"),
                        "--image-root", str(pope_data / "images"), "--output-dir", str(out), "--model-id", tiny,
                        "--device", "cpu", "--longest-edge", "1024", "--max-new-tokens", "3",
                        "--prompt-suffix", " Answer in one word.", "--attention"]))
    rows = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    original = store.Run(rows[0]["attention"]["run"])
    assert original.meta["pope"]["question_id"] == 1 and original.methods == ["raw"]
    assert original.geometry.rows * original.geometry.cols > 1          # tiled at 1024 (not the default 2048)

    info = make_app(RUN=original.path).test_client().get("/api/initialize").get_json()
    hint = {m["name"]: m for m in info["methods"]}["rollout"]["command"]     # what the viewer shows
    assert hint == runmeta.command(original.meta, original.path, ["rollout"])
    assert hint.startswith("python benchmark.py ") and f"--output-dir {out} " in hint

    fresh = tmp_path / "fresh"
    cmd = runmeta.command(original.meta, fresh / "attention" / "random" / "1", ["rollout"])
    assert cmd.startswith("python benchmark.py --benchmark-file ") and " --attention " in cmd
    for flag in ("--longest-edge 1024", "--max-new-tokens 3", "--dtype float32", "--methods raw,rollout",
                 "--prompt-suffix ' Answer in one word.'", f"--output-dir {fresh}"):
        assert flag in cmd, (flag, cmd)
    execute(cmd)
    again = [json.loads(line) for line in (fresh / "answers.jsonl").read_text().splitlines()]
    assert [r["raw_answer"] for r in again] == [r["raw_answer"] for r in rows]
    for old, new in zip(rows, again):
        a, b = store.Run(old["attention"]["run"]), store.Run(new["attention"]["run"])
        assert_same_rows(a, b)
        assert b.methods == ["raw", "rollout"] and b.meta["pope"]["object"] == a.meta["pope"]["object"]
        assert b.meta["chat_text"] == a.meta["chat_text"] and b.meta["pope"]["object_positions"]


def test_the_command_of_a_2b_run_made_at_2048_rebuilds_it(tmp_path):
    model = str(standin.ensure("tiny-2.2b-geometry"))          # its own processor: longest edge 1536
    image = photo(tmp_path / "wide.png", (300, 150), 2)
    first = tmp_path / "first"
    execute(shlex.join(["python", "extract_smolvlm_attn.py", "--image", str(image), "--output-dir", str(first),
                        "--model-id", model, "--device", "cpu", "--longest-edge", "2048", "--max-new-tokens", "3",
                        "--prompt", "What is here?", "--store", "compact8"]))
    original = store.Run(first)
    assert original.meta["processor"]["longest_edge"] == 2048 and original.geometry.side == 9
    assert (original.geometry.rows, original.geometry.cols) == (3, 6)     # at 1536 it would be 2 x 4
    fresh = tmp_path / "fresh"
    cmd = runmeta.command(original.meta, fresh, ["rollout"])
    for flag in ("--longest-edge 2048", "--max-new-tokens 3", "--dtype float32", "--store compact8",
                 "--prompt 'What is here?'", f"--model-id {model}", "--methods raw,rollout"):
        assert flag in cmd, (flag, cmd)
    execute(cmd)
    rebuilt = store.Run(fresh)
    assert_same_rows(original, rebuilt)
    assert rebuilt.methods == ["raw", "rollout"] and rebuilt.meta["config"]["longest_edge"] == 2048


def test_the_command_leaves_out_defaults_and_keeps_what_a_run_recorded():
    meta = {"model": {"id": runmeta.DEFAULT_MODEL, "revision": "abc123", "dtype": "bfloat16"},   # an older run:
            "prompt": runmeta.DEFAULT_PROMPT, "image": {"source": "photo.jpg"},               # no meta.config
            "generation": {"max_new_tokens": runmeta.DEFAULT_MAX_NEW_TOKENS}, "processor": {"longest_edge": 2048},
            "attention": {"store": "compact"}}
    cmd = runmeta.command(meta, "r", ["relative"])
    assert cmd.startswith("python extract_smolvlm_attn.py --image photo.jpg --output-dir r ")
    assert "--revision abc123" in cmd and "--dtype bfloat16" in cmd and cmd.endswith("--methods raw,relative")
    assert "--model-id" not in cmd and "--prompt" not in cmd and "--max-new-tokens" not in cmd and "--store" not in cmd
    assert "--longest-edge 2048" in cmd            # whether 2048 was the checkpoint's own is unknown: said explicitly
    meta["config"] = {"longest_edge": None}        # recorded: the checkpoint's own, so no flag
    assert "--longest-edge" not in runmeta.command(meta, "r", [])


def test_runmeta_and_the_methods_module_do_not_import_the_extraction_stack():
    code = ("import sys; import smolattn.runmeta, smolattn.methods; "
            "print(sorted(m for m in ('torch', 'transformers', 'smolattn.extract', 'smolattn.engine') if m in sys.modules))")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.strip() == "[]", p.stderr


def test_pope_fingerprint_covers_attention_methods_and_the_processor():
    info = {"revision": None, "standin": True, "processor": {"longest_edge": 2048, "tile_size": 512}}
    base = pr.Config("m", dtype="float32", info=info)
    keys = {base.key(), pr.Config("m", dtype="float32", info=info, attention_dir="a").key(),
            pr.Config("m", dtype="float32", info=info, attention_dir="a", methods=("raw", "rollout")).key(),
            pr.Config("m", dtype="float32", info=dict(info, processor={"longest_edge": 2048, "tile_size": 384})).key()}
    assert len(keys) == 4
    assert base.key() == pr.Config("m", dtype="float32", info=info, batch_size=8, naive=True).key()   # answers alike


def run_pope(pope_data, out, *extra):
    return benchmark.main(["--benchmark-file", str(pope_data / "coco_pope_random.json"), "--image-root",
                           str(pope_data / "images"), "--output-dir", str(out), "--model-id",
                           str(standin.ensure("tiny")), "--device", "cpu", "--longest-edge", "512",
                           "--max-new-tokens", "2", *map(str, extra)])


def test_attention_newly_on_is_refused_and_overwrite_removes_only_our_old_runs(pope_data, tmp_path):
    out = tmp_path / "out"
    assert run_pope(pope_data, out) == 0                                # answers only
    with pytest.raises(UserError, match="another configuration"):
        run_pope(pope_data, out, "--attention")                         # not mixed into those answers
    assert not (out / "attention").exists()
    assert run_pope(pope_data, out, "--attention", "--overwrite") == 0
    runs = sorted((out / "attention" / "random").iterdir())
    assert [r.name for r in runs] == ["1", "2", "3"]
    (out / "attention" / "notes.md").write_text("mine")                 # a user's file among them:
    with pytest.raises(UserError, match="notes.md is not one of its files"):
        run_pope(pope_data, out, "--attention", "--overwrite")          # the whole folder is refused
    (out / "attention" / "notes.md").unlink()
    with pytest.raises(UserError, match="another configuration"):
        run_pope(pope_data, out, "--attention", "--methods", "raw,rollout")
    assert run_pope(pope_data, out, "--attention", "--limit", 1, "--max-new-tokens", 3, "--overwrite") == 0
    key = json.loads((out / "answers.jsonl").read_text().splitlines()[0])["config"]
    assert json.loads((runs[0] / "meta.json").read_text())["config_key"] == key    # rewritten
    assert not runs[1].exists()                                         # ours, of the old configuration: gone
    assert not runs[2].exists()
    # the remover itself touches only our runs of another configuration, whatever else it finds
    old = out / "attention" / "random" / "9"
    shutil.copytree(runs[0], old)
    meta = json.loads((old / "meta.json").read_text())
    (old / "meta.json").write_text(json.dumps({**meta, "config_key": "another"}))
    (old / "notes.txt").write_text("mine")                              # no longer only ours
    (out / "attention" / "random" / "mine").mkdir()
    (out / "attention" / "random" / "mine" / "keep.txt").write_text("mine")
    assert pr.remove_other_runs(out / "attention", key) == 0
    assert (old / "notes.txt").read_text() == "mine" and (old / "meta.json").is_file()
    assert (out / "attention" / "random" / "mine" / "keep.txt").read_text() == "mine"
    (old / "notes.txt").unlink()
    assert pr.remove_other_runs(out / "attention", key) == 1 and not old.exists()
    assert not [p for p in (out / "attention" / "random").iterdir() if p.name.startswith(".")]
