"""Any SmolVLM checkpoint: a stand-in with SmolVLM-Instruct (2.2B) image geometry (384 px tiles,
patch 14, pixel shuffle 3 -> 9 x 9 tokens per tile, longest edge 1536) goes through extraction, the
viewer's maps and the heatmap CLI with the checkpoint's own processor settings."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from smolattn import geometry as geo
from smolattn import model as mdl
from smolattn import standin, store
from smolattn import extract as ex

ROOT = Path(__file__).resolve().parent.parent
PHOTO = ROOT / "samples" / "coco_val2014" / "COCO_val2014_000000429109.jpg"   # 640 x 427, CC BY-SA


@pytest.fixture(scope="module")
def model22():
    return mdl.load(str(standin.ensure("tiny-2.2b-geometry")), device="cpu")


@pytest.fixture(scope="module")
def run22(model22, tmp_path_factory):
    out = tmp_path_factory.mktemp("r22") / "run"
    ex.extract(model22, PHOTO, out, ex.Settings(max_new_tokens=4))
    return store.Run(out)


def test_the_checkpoints_own_processor_settings_are_the_default(model22, run22):
    proc = model22.processor
    assert (proc.image_seq_len, proc.image_processor.max_image_size["longest_edge"]) == (81, 384)
    cfg = model22.model.config
    assert (cfg.vision_config.image_size, cfg.vision_config.patch_size, cfg.scale_factor) == (384, 14, 3)
    g = run22.geometry
    assert tuple(run22.image_size()) == (640, 427)
    assert (g.rows, g.cols, g.side) == (3, 4, 9) == (*geo.expected_grid(640, 427, 1536, 384), 9)
    assert run22.meta["processor"]["longest_edge"] == 1536 and run22.meta["tiles"]["resized_size"] == [1536, 1152]
    # the old fixed default (2048) would have cut the same photo into 4 x 6 tiles
    assert geo.expected_grid(640, 427, 2048, 384) == (4, 6)
    full = run22.full_row(run22.layer(0), run22.row_of(len(run22.tokens) - 1))
    assert np.allclose(full.sum(-1), 1, atol=2e-3)


def test_an_explicit_longest_edge_still_overrides(model22, tmp_path):
    ex.extract(model22, PHOTO, tmp_path / "run", ex.Settings(max_new_tokens=1, longest_edge=768))
    g = store.Run(tmp_path / "run").geometry
    assert (g.rows, g.cols) == geo.expected_grid(640, 427, 768, 384) == (2, 2)


def test_viewer_maps_have_the_2b_grid(run22, make_app):
    client = make_app(RUN=run22.path).test_client()
    pos = len(run22.tokens) - 1
    body = client.get(f"/api/attention?index={pos}").get_json()
    assert np.array(body["grid"]).shape == (27, 36) and np.array(body["global"]).shape == (9, 9)
    layer = run22.layer(0)
    assert 0 < body["image_mass"] <= 1 + 1e-6 and layer.image.shape[-1] == (12 + 1) * 81


def test_heatmap_cli_on_the_2b_run(run22, tmp_path):
    pos = len(run22.tokens) - 1
    r = subprocess.run([sys.executable, str(ROOT / "compute_token_heatmap.py"), "--run", str(run22.path),
                        "--index", str(pos), "--output", str(tmp_path / "h.png"), "--overlay", str(tmp_path / "o.png"),
                        "--json"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    doc = json.loads((tmp_path / "h.json").read_text())
    assert np.array(doc["grid"]).shape == (27, 36) and doc["position"] == pos
    assert (tmp_path / "o.png").is_file()
