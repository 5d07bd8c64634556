"""Speed of the dataset head analysis (smolattn.analysis.analyse_root) in runs/s, on real-shape synthetic
runs: 30 layers x 9 heads, 3x4 tiles + global (S ~ 900), compact store, a POPE section and COCO boxes.

    python bench/bench_heads.py [--runs 24] [--rounds 2] [--keep DIR]

Baseline, measured in the same rounds (interleaved): reading every run's 30 layer files and taking the
query row (what any analysis must do, no scoring) on one process. Printed: runs/s of the baseline, of the
analysis on 1 and on 2 processes, and the ratios (analysis cost over the read floor; 2-process speed-up).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from smolattn import analysis as an, store, synthetic  # noqa: E402

SIZE = (640, 427)
BOXES = {"bench.jpg": {"dog": [[320, 200, 200, 150]], "cat": [[0, 0, 160, 120]]}}


def make(root: Path, n: int):
    for i in range(n):
        label = "yes" if i % 2 == 0 else "no"
        meta = {"image": {"source": "/coco/bench.jpg"}, "answer": "Yes.",
                "pope": {"split": "random", "question_id": i, "label": label, "object": "dog" if label == "yes" else "zebra",
                         "object_positions": [10]}}
        synthetic.make_run(root / str(i), 3, 4, layers=30, heads=9, image_size=SIZE, seed=i, meta_extra=meta,
                           answer=["Yes", "."])


def read_only(root: Path, names):
    for n in names:
        run = store.Run(root / n)
        rows = an.query_rows(run, "last")
        an.query_maps(run, rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--keep", type=Path)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = (args.keep or Path(tmp)) / "runs"
        make(root, args.runs)
        names = an.find_runs(root)
        mb = sum(f.stat().st_size for f in root.glob("*/attention/*") if f.is_file()) / 1e6
        fmt = store.Run(root / names[0]).meta.get("format_version")
        print(f"{len(names)} runs, 30 layers x 9 heads, 3x4 tiles, {mb / len(names):.1f} MB of attention each "
              f"(compact store, run format v{fmt})")
        print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} (shared machines: wall times grow with load)")
        cases = {"read only (baseline), 1 process": lambda: read_only(root, names),
                 "analysis, 1 process": lambda: an.analyse_root(root, an.Params(), BOXES, 1, names, progress=False),
                 "analysis, 2 processes": lambda: an.analyse_root(root, an.Params(), BOXES, 2, names, progress=False)}
        best = {k: float("inf") for k in cases}
        for _ in range(args.rounds):
            for k, f in cases.items():
                t0 = time.perf_counter()
                f()
                best[k] = min(best[k], time.perf_counter() - t0)
        for k, t in best.items():
            print(f"{k}: {len(names) / t:.1f} runs/s (best of {args.rounds}, {t:.2f} s)")
        base, one, two = best.values()
        print(f"ratio analysis(1 process) / read-only: {one / base:.2f}x the time")
        print(f"speed-up 2 processes vs 1: {one / two:.2f}x")


if __name__ == "__main__":
    main()
