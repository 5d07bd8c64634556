"""Time compute_token_heatmap.py on a real-shape synthetic run: 30 layers x 9 heads, 3x4 tiles
(S ~ 920 tokens), ~40 answer tokens, compact store (what our extractor writes for one image).

    python bench/bench_token_heatmap.py [--repeat 5] [--keep DIR]

Prints the in-process aggregation time (both methods; reading the 30 layer files included) and the
wall time of the whole command (interpreter start, imports, aggregation, PNGs and overlay).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from smolattn import heatmap as hm, synthetic  # noqa: E402
from smolattn.store import Run  # noqa: E402

ANSWER = (synthetic.ANSWER * 4)[:40]


def best(f, repeat):
    """(best wall, median wall, best CPU time of this process) over ``repeat`` calls."""
    times, cpu = [], []
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        f()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return min(times), sorted(times)[len(times) // 2], min(cpu)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--keep", type=Path, help="write the run and outputs here instead of a temp dir")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = args.keep or Path(tmp)
        run_dir = synthetic.make_run(base / "run", 3, 4, layers=30, heads=9, answer=ANSWER, image_size=(640, 427))
        run = Run(run_dir)
        size = sum(f.stat().st_size for f in (run_dir / "attention").iterdir())
        print(f"run: {run.num_layers} layers x {run.num_heads} heads, {run.geometry.rows}x{run.geometry.cols} tiles, "
              f"S={len(run.tokens)}, {len(run.query_positions)} stored query rows, {size / 1e6:.1f} MB ({run.store})")
        print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} (wall times grow with load)")
        pos = hm.find_token(run, "jacket")
        layers, heads = range(30), range(9)
        for name, f in [("image", lambda: hm.aggregate_image(run, pos, layers, heads, 10)),
                        ("reference", lambda: hm.aggregate_reference(run, pos, layers, heads, 10))]:
            lo, med, cpu = best(f, args.repeat)
            print(f"aggregate_{name}: best {lo * 1000:.0f} ms, median {med * 1000:.0f} ms wall, "
                  f"{cpu * 1000:.0f} ms CPU (30 x 9 heads, in process, reading the layers included)")
        for method in ("image", "reference"):
            cmd = [sys.executable, str(ROOT / "compute_token_heatmap.py"), "--run", str(run_dir), "--token", "jacket",
                   "--method", method, "--output", str(base / f"{method}.png"),
                   "--overlay", str(base / f"{method}_overlay.png")]
            lo, med, _ = best(lambda: subprocess.run(cmd, check=True, capture_output=True), args.repeat)
            print(f"CLI --method {method}: best {lo:.3f} s, median {med:.3f} s wall (whole command)")


if __name__ == "__main__":
    main()
