"""The engine: batched generation equals one image at a time (answers and stored rows, mixed tile
grids, per-sample end of utterance); no host copy while generating; the pipeline with worker processes."""
import json

import numpy as np
import pytest
import torch
from transformers import AttentionInterface

from smolattn import engine, store, synthetic
from smolattn import extract as ex
from smolattn import model as mdl

SIZES = {(3, 4): (640, 480), (4, 3): (480, 640), (4, 4): (640, 640), (1, 4): (800, 200)}
NEW = 6


@pytest.fixture(scope="module")
def preps(tiny):
    out = [engine.prepare(tiny.processor, synthetic.test_image(size), ex.DEFAULT_PROMPT) for size in SIZES.values()]
    assert [(p.geometry.rows, p.geometry.cols) for p in out] == list(SIZES)
    return out


@pytest.fixture(scope="module")
def single(tiny, preps):
    return [engine.run(tiny, [p], NEW)[0] for p in preps]


def assert_same(a, b):
    assert a.new == b.new
    assert a.layers.shape == b.layers.shape
    np.testing.assert_allclose(a.layers.astype(np.float32), b.layers.astype(np.float32), atol=1e-5, rtol=1e-3)


def test_mixed_grids_in_one_batch_equal_single_images(tiny, preps, single):
    batched = engine.run(tiny, preps, NEW)
    for p, a, b in zip(preps, single, batched):
        assert_same(a, b)
        # every kept prompt row and one row per generated token, over the image's own keys only
        assert b.layers.shape[2:] == (len(p.rows) + len(b.new), len(p.ids) + len(b.new))
        assert b.layers.shape[:2] == (tiny.model.config.text_config.num_hidden_layers,
                                      tiny.model.config.text_config.num_attention_heads)
    assert b.batch == len(preps)


def test_each_sample_stops_at_its_own_end_of_utterance(tiny, preps, single, monkeypatch):
    stop = single[0].new[2]                               # make sample 0's third token an end of utterance
    assert stop not in single[-1].new
    plain = mdl.generation_kwargs
    monkeypatch.setattr(mdl, "generation_kwargs",
                        lambda *a, **k: dict(plain(*a, **k), eos_token_id=plain(*a, **k)["eos_token_id"] + [stop]))
    alone = [engine.run(tiny, [p], NEW)[0] for p in preps]
    batched = engine.run(tiny, preps, NEW)
    assert len(batched[0].new) == 3 and batched[0].new[-1] == stop and len(batched[-1].new) == NEW
    for a, b in zip(alone, batched):
        assert_same(a, b)


def test_no_host_copy_while_generating(tiny, preps, monkeypatch):
    """Inside the capture attention: no .cpu()/.numpy()/.item()/.tolist()/__array__; the rows come to
    the host through mdl.to_host, once per image, after generate returned."""
    state = {"capture": False, "generate": False}
    seen = {"capture_calls": 0, "host_in_capture": [], "to_host": []}

    def counting(name, fn):
        def wrapper(*a, **k):
            if state["capture"]:
                seen["host_in_capture"].append(name)
            return fn(*a, **k)
        return wrapper

    for name in ("cpu", "numpy", "item", "tolist", "__array__"):
        monkeypatch.setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))

    def capture(*a, **k):
        seen["capture_calls"] += 1
        state["capture"] = True
        try:
            return mdl.capture_attention(*a, **k)
        finally:
            state["capture"] = False

    generate, to_host = tiny.model.generate, mdl.to_host

    def generating(*a, **k):
        state["generate"] = True
        try:
            return generate(*a, **k)
        finally:
            state["generate"] = False

    def host(t):
        seen["to_host"].append(state["generate"])
        return to_host(t)

    monkeypatch.setattr(tiny.model, "generate", generating)
    monkeypatch.setattr(mdl, "to_host", host)
    AttentionInterface.register("capture", capture)
    try:
        out = engine.run(tiny, preps[:2], NEW)
    finally:
        AttentionInterface.register("capture", mdl.capture_attention)
    layers = tiny.model.config.text_config.num_hidden_layers
    assert seen["capture_calls"] >= layers * (NEW + 1)       # prefill + decode steps + the extra step, every layer
    assert seen["host_in_capture"] == []
    assert seen["to_host"] == [False, False] and all(o.layers is not None for o in out)


def test_pipeline_with_worker_processes(tiny, tmp_path):
    """Decode + processor in a worker process, batches of 2, writer threads: results in item order,
    a bad file becomes its own error, the runs equal single extractions."""
    paths = []
    for name, size in [("a", (640, 480)), ("b", (800, 200)), ("c", (480, 640))]:
        paths.append(tmp_path / f"{name}.png")
        synthetic.test_image(size).save(paths[-1])
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    settings = ex.Settings(max_new_tokens=4)
    got = []
    jobs = [(p, tmp_path / "out" / p.stem, p.stem) for p in [paths[0], bad, *paths[1:]]]
    ex.extract_many(tiny, jobs, settings, lambda tag, s: got.append((tag, s)), batch_size=2, workers=1,
                    on_error=lambda tag, e: {"error": str(e)})
    assert [t for t, _ in got] == ["a", "bad", "b", "c"]
    assert "not an image" in got[1][1]["error"]
    for p in paths:
        ex.extract(tiny, p, tmp_path / "single" / p.stem, settings)
        a, b = store.Run(tmp_path / "out" / p.stem), store.Run(tmp_path / "single" / p.stem)
        assert a.meta["token_ids"] == b.meta["token_ids"] and a.meta["format_version"] == store.FORMAT_VERSION
        for i in range(a.num_layers):
            np.testing.assert_allclose(a.layer(i).image, b.layer(i).image, atol=1e-3)
    assert json.loads((tmp_path / "out" / "b" / "meta.json").read_text())["generation"]["batch_size"] == 2


def test_derived_methods_in_a_batch_equal_single_images(tiny, tmp_path):
    """--methods in a batch: each image's maps come from its own slice of the batch's image features
    (13 and 5 tiles here), so they equal the single-image extraction's."""
    paths = []
    for name, size in [("a", (640, 480)), ("b", (800, 200))]:
        paths.append(tmp_path / f"{name}.png")
        synthetic.test_image(size).save(paths[-1])
    settings = ex.Settings(max_new_tokens=3, methods=("raw", "rollout"))
    ex.extract_many(tiny, [(p, tmp_path / "batch" / p.stem, p.stem) for p in paths], settings,
                    lambda tag, s: None, batch_size=2, workers=0)
    for p in paths:
        ex.extract(tiny, p, tmp_path / "single" / p.stem, settings)
        a, b = store.Run(tmp_path / "batch" / p.stem), store.Run(tmp_path / "single" / p.stem)
        assert a.meta["generation"]["batch_size"] == 2 and a.methods == b.methods == ["raw", "rollout"]
        np.testing.assert_allclose(a.method("rollout").maps, b.method("rollout").maps, atol=1e-4, rtol=1e-3)


ORPHAN_SCRIPT = """
import sys, time
sys.path.insert(0, {root!r})
if __name__ == "__main__":
    from smolattn import engine, model as mdl, synthetic
    loaded = mdl.load({model!r}, "cpu")
    prep = engine.Preparer(loaded, "hi", 512, "text", workers=1)
    synthetic.test_image((64, 48)).save({image!r})
    prep.submit({image!r}).result()
    print("ready", flush=True)
    time.sleep(120)
"""


def test_decode_workers_leave_when_their_parent_is_killed(tiny, tmp_path):
    """A killed Ray actor never shuts its decode pool down: the worker processes must not live on."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    script = tmp_path / "parent.py"
    script.write_text(ORPHAN_SCRIPT.format(root=str(Path(__file__).resolve().parent.parent), model=tiny.source,
                                           image=str(tmp_path / "a.png")))
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout.readline().strip() == "ready"
        children = [int(p) for p in subprocess.run(["pgrep", "-P", str(parent.pid)], capture_output=True,
                                                    text=True).stdout.split()]
        workers = [c for c in children if "spawn_main" in Path(f"/proc/{c}/cmdline").read_text()]
        assert workers
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        def running(pid):   # a zombie (exited, not yet reaped by init) counts as gone
            try:
                return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
            except OSError:
                return False

        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(map(running, workers)):
            time.sleep(0.2)
        alive = [c for c in workers if running(c)]
        for c in alive:
            os.kill(c, signal.SIGKILL)
        assert not alive, "decode worker outlived its killed parent"
    finally:
        if parent.poll() is None:
            parent.kill()
