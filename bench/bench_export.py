"""Size of one run exported as one HTML file (smolattn-view --export), for a real-shape run: the
SmolVLM-256M stand-in (30 layers x 9 heads, random weights) on a 640x480 image (3x4 tiles + global,
832 image keys) with 32 answer tokens. Goal: <= 10 MB.

Baselines, measured in the same run: the run directory (compact: fp16, blosc2) and the same rows
embedded the plain way (fp16, base64). Also: the time to export, and (with Debian's chromium) the time
from opening the file:// URL to the first map drawn.

    python bench/bench_export.py [--run DIR]     # default: make the run in a temporary directory
"""
from __future__ import annotations

import argparse
import base64
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from smolattn import extract as ex  # noqa: E402
from smolattn import model as mdl  # noqa: E402
from smolattn import standin  # noqa: E402
from smolattn.store import Run  # noqa: E402
from viewer import export  # noqa: E402
from viewer.runs import text_rows  # noqa: E402

GOAL = 10e6


def make_run(out: Path) -> Path:
    image = out.parent / "photo.jpg"
    with Image.open(ROOT / "samples" / "chelsea.png") as im:
        im.convert("RGB").resize((640, 480), Image.LANCZOS).save(image, quality=90)
    loaded = mdl.load(str(standin.ensure("smolvlm-256m")), device="cpu")
    ex.extract(loaded, image, out, ex.Settings(max_new_tokens=32))
    return out


def first_map_seconds(path: Path) -> float | None:
    if not Path("/usr/bin/chromium").is_file():
        return None
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--headless", "--no-sandbox", "--disable-gpu"])
        page = b.new_page()
        t = time.perf_counter()
        page.goto(path.as_uri())
        page.wait_for_selector("#overlay[data-index]", timeout=120_000)
        seconds = time.perf_counter() - t
        b.close()
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", help="an existing run to export (default: make the real-shape stand-in run)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(args.run) if args.run else make_run(Path(tmp) / "run")
        run = Run(run_dir)
        lay = run.layout
        answer = sum(1 for p in run.query_positions if p >= run.prompt_length)
        what = f"{lay.rows}x{lay.cols} tiles + global" if len(lay) == 1 else \
            f"{len(lay)} {'frames' if lay.is_video else 'images'}"
        print(f"run: {run.num_layers} layers x {run.num_heads} heads, {what} "
              f"({lay.num_keys} image keys), {len(text_rows(run).positions)} kept rows ({answer} answer), "
              f"{'stand-in' if run.standin else 'real'} model")
        allowed = export.availability(run)
        print(f"rows in the page: {allowed['bytes'] / 1e6:.1f} MB (limit {export.MAX_ROW_BYTES / 1e6:.0f} MB)")
        if not allowed["ok"]:
            print(f"refused: {allowed['reason']}")
            return
        out = Path(tmp) / "run.html"
        t = time.perf_counter()
        size = export.export(run_dir, out)["bytes"]
        seconds = time.perf_counter() - t
        on_disk = sum(f.stat().st_size for f in run_dir.rglob("*") if f.is_file())
        keep = text_rows(run).keep
        rows = sum(run.layer(i).image[:, keep if keep is not None else slice(None)].size
                   + run.layer(i).text[:, keep if keep is not None else slice(None)].size for i in range(run.num_layers))
        plain = len(base64.b64encode(np.zeros(rows, np.float16).tobytes()))
        print(f"exported file: {size / 1e6:.2f} MB ({size / GOAL:.2f} x the 10 MB goal), written in {seconds:.1f} s")
        print(f"baselines: run directory {on_disk / 1e6:.2f} MB ({size / on_disk:.2f} x); "
              f"the rows as fp16 base64 {plain / 1e6:.2f} MB ({size / plain:.2f} x)")
        opened = first_map_seconds(out)
        if opened is not None:
            print(f"chromium, file:// URL to the first map drawn: {opened:.2f} s")


if __name__ == "__main__":
    os.environ.setdefault("SMOLATTN_MODELS", str(ROOT / "models"))
    main()
