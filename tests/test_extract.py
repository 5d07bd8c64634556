"""extract_smolvlm_attn.py end to end, image modes, and bad input (one line, non-zero, no partial run)."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from smolattn import extract as ex
from smolattn import model as mdl
from smolattn import standin, store
from smolattn.errors import UserError
from smolattn.images import open_image

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, str(ROOT / "extract_smolvlm_attn.py")]


@pytest.fixture(scope="module")
def tiny_dir():
    return str(standin.ensure("tiny"))


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return mdl.load(tiny_dir, device="cpu")


def cli(*args):
    return subprocess.run(CLI + [str(a) for a in args], capture_output=True, text=True, cwd=ROOT)


def assert_one_line_error(r, *words):
    assert r.returncode != 0, r.stdout
    lines = [line for line in r.stderr.splitlines() if line.strip() and not line.startswith("note:")]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for w in words:
        assert w in lines[0], lines[0]


def test_cli_writes_a_complete_run(tmp_path, tiny_dir):
    img = tmp_path / "photo.jpg"
    Image.new("RGB", (480, 640), (200, 40, 40)).save(img)
    r = cli("--image", img, "--output-dir", tmp_path / "run", "--model-id", tiny_dir, "--max-new-tokens", 3)
    assert r.returncode == 0, r.stderr
    assert "STAND-IN" in r.stdout and "4x3 tiles" in r.stdout
    run = store.Run(tmp_path / "run")
    assert (run.geometry.rows, run.geometry.cols) == (4, 3) and run.standin
    assert run.image_path().name == "image.jpg" and run.image_size() == (480, 640)
    assert sorted(p.name for p in (tmp_path / "run" / "attention").iterdir()) == \
        sorted(f"layer_{i:02d}.{a}.b2" for i in range(run.num_layers) for a in ("image", "text"))
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_exif_orientation_is_applied(tmp_path):
    img = tmp_path / "rot.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6                                   # rotate 90 degrees clockwise on display
    Image.new("RGB", (640, 480)).save(img, exif=exif)
    rgb, info = open_image(img)
    assert rgb.size == (480, 640) and info["exif_orientation"] == 6


@pytest.mark.parametrize("mode,make,expect", [
    ("CMYK", lambda: Image.new("CMYK", (32, 24), (0, 255, 255, 0)), (255, 0, 0)),
    ("I;16", lambda: Image.fromarray(np.full((24, 32), 32768, np.uint16)), (128, 128, 128)),
    ("RGBA", lambda: Image.new("RGBA", (32, 24), (0, 0, 255, 0)), (255, 255, 255)),
    ("P", lambda: Image.new("RGB", (32, 24), (10, 200, 30)).convert("P", palette=Image.ADAPTIVE), (10, 200, 30)),
    ("L", lambda: Image.new("L", (32, 24), 77), (77, 77, 77)),
    ("LA", lambda: Image.new("LA", (32, 24), (0, 0)), (255, 255, 255)),
])
def test_image_modes_convert_to_what_a_person_sees(tmp_path, mode, make, expect):
    path = tmp_path / ("x.tif" if mode in ("CMYK", "I;16") else "x.png")
    make().save(path)
    rgb, info = open_image(path)
    assert rgb.mode == "RGB" and info["mode"] == make().mode
    assert np.abs(np.asarray(rgb)[5, 5].astype(int) - expect).max() <= 2


@pytest.mark.parametrize("size", [(1, 1), (12000, 9000)])
def test_extreme_sizes_extract(tmp_path, tiny, size):
    path = tmp_path / "x.png"
    Image.new("RGB", size, (30, 60, 90)).save(path)
    summary = ex.extract(tiny, path, tmp_path / "run", ex.Settings(max_new_tokens=2))
    run = store.Run(tmp_path / "run")
    assert tuple(summary["grid"]) == (run.geometry.rows, run.geometry.cols) != (0, 0)
    assert run.image_size() == size


def test_cmyk_image_through_the_model(tmp_path, tiny):
    path = tmp_path / "c.jpg"
    Image.new("CMYK", (64, 48), (0, 255, 255, 0)).save(path)
    ex.extract(tiny, path, tmp_path / "run", ex.Settings(max_new_tokens=2))
    assert store.Run(tmp_path / "run").image_size() == (64, 48)


def _truncated(p):
    Image.new("RGB", (300, 200), (1, 2, 3)).save(p, quality=95)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("name,prepare,words", [
    ("missing.png", lambda p: None, ["not found"]),
    ("adir", lambda p: p.mkdir(), ["directory"]),
    ("text.jpg", lambda p: p.write_text("hello, not an image"), ["not an image"]),
    ("empty.png", lambda p: p.write_bytes(b""), ["not an image"]),
    ("trunc.jpg", _truncated, ["corrupt or truncated"]),
])
def test_bad_images_fail_in_one_line(tmp_path, tiny_dir, name, prepare, words):
    path = tmp_path / name
    prepare(path)
    r = cli("--image", path, "--output-dir", tmp_path / "out", "--model-id", tiny_dir)
    assert_one_line_error(r, *words)
    assert not (tmp_path / "out").exists()


def test_bad_arguments_fail_in_one_line(tmp_path, tiny_dir):
    img = tmp_path / "ok.png"
    Image.new("RGB", (64, 48)).save(img)
    assert_one_line_error(cli("--image", img, "--output-dir", tmp_path / "o", "--model-id", tiny_dir,
                              "--prompt", "  "), "prompt is empty")
    assert_one_line_error(cli("--image", img, "--output-dir", tmp_path / "o", "--model-id",
                              tmp_path / "nomodel"), "model directory not found")
    assert_one_line_error(cli("--image", img, "--output-dir", tmp_path / "o", "--model-id", tmp_path),
                          "not a model directory")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    r = cli("--image", img, "--output-dir", locked / "run", "--model-id", tiny_dir)
    locked.chmod(0o700)
    if r.returncode != 0:  # root ignores permissions; the check still must not leave anything
        assert_one_line_error(r, "cannot write")
    assert_one_line_error(cli("--image", img, "--output-dir", "/proc/nope/run", "--model-id", tiny_dir),
                          "cannot write")
    assert not (tmp_path / "o").exists()


def test_unknown_model_offline_says_so_and_points_to_the_standin(tmp_path):
    img = tmp_path / "ok.png"
    Image.new("RGB", (64, 48)).save(img)
    r = subprocess.run(CLI + ["--image", str(img), "--output-dir", str(tmp_path / "o"),
                              "--model-id", "nobody/no-such-model"], capture_output=True, text=True,
                       env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}, timeout=120)
    assert_one_line_error(r, "nobody/no-such-model", "smolattn.standin")
    assert not (tmp_path / "o").exists()


def test_killed_write_leaves_no_partial_run(tmp_path):
    with pytest.raises(RuntimeError):
        with store.atomic_dir(tmp_path / "run") as tmp:
            (tmp / "meta.json").write_text("{}")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_settings_validation():
    with pytest.raises(UserError):
        ex.Settings(store="huge").check()
    with pytest.raises(UserError):
        ex.Settings(max_new_tokens=0).check()
