"""Cost of the crash-safe write protocol: write_run with fsync (files, folders, parent) and the replace
of an existing run, against the same writes with fsync turned off, interleaved in one process.

    python bench/bench_safe_write.py [--reps 5] [--layers 30 --heads 9 --rows 3 --cols 4]

Prints the median seconds per run written and the ratios. Synthetic attention (smolattn.synthetic),
real-model shapes by default (30 layers x 9 heads, 3 x 4 tiles + global).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from smolattn import store, synthetic  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--rows", type=int, default=3)
    ap.add_argument("--cols", type=int, default=4)
    args = ap.parse_args()
    real_fsync = os.fsync
    times = {(sync, kind): [] for sync in (True, False) for kind in ("new", "replace")}
    with tempfile.TemporaryDirectory(dir=".") as d:
        for rep in range(args.reps):
            for sync in (True, False):              # interleaved: both see the same machine load
                os.fsync = real_fsync if sync else (lambda fd: None)
                out = Path(d) / f"run-{rep}-{sync}"
                for kind in ("new", "replace"):
                    t = time.perf_counter()
                    synthetic.make_run(out, args.rows, args.cols, layers=args.layers, heads=args.heads, seed=rep)
                    times[sync, kind].append(time.perf_counter() - t)
        os.fsync = real_fsync
        size = sum(store.file_sizes(out).values())
    print(f"run: {args.layers} layers x {args.heads} heads, {args.rows}x{args.cols} tiles, {size / 1e6:.1f} MB; "
          f"median of {args.reps}")
    for kind in ("new", "replace"):
        on, off = (statistics.median(times[s, kind]) for s in (True, False))
        print(f"{kind:8s} with fsync {on:.3f} s, without {off:.3f} s: x{on / off:.2f}")


if __name__ == "__main__":
    main()
