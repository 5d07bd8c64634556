"""Batch runner images/s vs a loop of single extract() calls, and disk bytes per image per store mode.

    python bench/bench_batch.py                          # real-shape stand-in, the 13 COCO photos, 2048 px, 32 tokens
    python bench/bench_batch.py --limit 4 --rounds 1     # the first 4 photos, one round
    python bench/bench_batch.py --rounds 0 --disk-edges 512,2048   # only the disk table

(a) one process, model loaded once: extract() over every image; (b) the batch runner (batch.run, the
CLI's code path, local engine: discovery, manifest, fingerprint, the engine's pipeline) at each
--batch-sizes value over the same images with the same loaded model into a fresh output root. All
run in this process after a warm-up image, rotating which goes first each round. Images/s of (b)
over (a): goal >= 1.0 at batch 1 and more at batch 4.
The runner's own time (its wall time minus the per-image time the manifest rows record) is printed
too: unlike the ratio it does not drift with the machine's load.
(c) disk bytes per image for each store mode (run directory; manifest bytes per row separately).
"""
import argparse
import contextlib
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from sample_data import IMAGES as DEFAULT_IMAGES  # noqa: E402  (bench/ is on sys.path: the script's folder)

import extract_smolvlm_batch as cli  # noqa: E402
from smolattn import batch, standin, store  # noqa: E402
from smolattn import extract as ex  # noqa: E402
from smolattn import model as mdl  # noqa: E402


def plain(loaded, images, out: Path, settings):
    """(wall s, process CPU s) per image."""
    t0, c0 = time.perf_counter(), time.process_time()
    for img in images:
        ex.extract(loaded, img, out / img.stem, settings)
    return (time.perf_counter() - t0) / len(images), (time.process_time() - c0) / len(images)


def batched(loaded, image_dir, out: Path, flags):
    args = cli.parse_args(["--image-dir", str(image_dir), "--output-root", str(out), *flags])
    t0, c0 = time.perf_counter(), time.process_time()
    with contextlib.redirect_stdout(io.StringIO()):   # keep the tables readable
        batch.run(args, loaded=loaded)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    own = wall - sum(r["timings"]["total_s"] for r in rows)   # time spent outside the per-image work
    return wall / len(rows), cpu / len(rows), own / len(rows)


def dir_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-id", default=None, help="default: the real-shape stand-in (built once)")
    ap.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    ap.add_argument("--longest-edge", type=int, default=None, help="default: the checkpoint's own (2048)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--limit", type=int, default=0, help="the first N images (0: all)")
    ap.add_argument("--batch-sizes", default="1,4", help="batch runner --batch-size values")
    ap.add_argument("--rounds", type=int, default=1, help="0: only the disk table")
    ap.add_argument("--disk-images", type=int, default=2, help="images per store mode for the disk table")
    ap.add_argument("--disk-edges", default="", help="--longest-edge values for the disk table (e.g. 512,2048)")
    args = ap.parse_args()
    model_id = args.model_id or str(standin.ensure("smolvlm-256m"))
    images = sorted(p for p in args.images.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    images = images[:args.limit] if args.limit else images
    loaded = mdl.load(model_id, "cpu")
    import torch
    print(f"model {model_id} ({'stand-in' if loaded.standin else 'real'}), {loaded.dtype}, "
          f"{torch.get_num_threads()} torch threads; {len(images)} images from {args.images}; "
          f"--longest-edge {args.longest_edge} --max-new-tokens {args.max_new_tokens}", flush=True)
    settings = ex.Settings(max_new_tokens=args.max_new_tokens, longest_edge=args.longest_edge)
    flags = ["--max-new-tokens", str(args.max_new_tokens), "--limit", str(len(images))] + \
        (["--longest-edge", str(args.longest_edge)] if args.longest_edge else [])
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="bench-batch-"))
    ex.extract(loaded, images[0], tmp / "warmup", settings)

    names = ["extract() loop"] + [f"batch runner, batch {b}" for b in sizes]
    res = {k: [] for k in names}
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            out = tmp / f"r{r}-{name.split()[-1].strip('()')}"
            s = plain(loaded, images, out, settings) if name.startswith("extract") else \
                batched(loaded, args.images, out, flags + ["--batch-size", name.split()[-1]])
            res[name].append(s)
            print(f"round {r}: {name:15s} {s[0]:.3f} s/image wall, {s[1]:.3f} s/image CPU"
                  + (f", runner's own time {s[2] * 1000:.1f} ms/image" if len(s) > 2 else ""), flush=True)
    if args.rounds:
        print("\n| runner | wall s/image (median) | CPU s/image (median) | wall per round |\n|---|---|---|---|")
        med = {}
        for k, v in res.items():
            med[k] = [statistics.median(x[i] for x in v) for i in (0, 1)]
            print(f"| {k} | {med[k][0]:.3f} | {med[k][1]:.3f} | {', '.join(f'{x[0]:.3f}' for x in v)} |")
        for name in names[1:]:
            ratio = med["extract() loop"][0] / med[name][0]
            print(f"{name}: images/s vs the extract() loop {ratio:.3f} (goal >= 1.0 at batch 1, more at batch 4)")
        print(flush=True)

    print("| store | longest edge | MB per image (run dir) | attention MB | manifest bytes per row |\n|---|---|---|---|---|")
    for edge in [int(e) for e in args.disk_edges.split(",") if e]:
        for mode in store.STORES:
            out = tmp / f"disk-{mode}-{edge}"
            flags = ["--max-new-tokens", str(args.max_new_tokens), "--longest-edge", str(edge), "--store", mode,
                     "--limit", str(args.disk_images)]
            batched(loaded, args.images, out, flags)
            runs = [p.parent for p in out.glob("*/meta.json")]
            total = sum(dir_bytes(p) for p in runs) / len(runs)
            att = sum(dir_bytes(p / d) for p in runs for d in ("attention", "attentions_5") if (p / d).is_dir()) / len(runs)
            row = (out / "manifest.jsonl").stat().st_size / len(runs)
            print(f"| {mode} | {edge} | {total / 1e6:.2f} | {att / 1e6:.2f} | {row:.0f} |", flush=True)
    import shutil
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
