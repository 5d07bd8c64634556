"""Extraction cost vs plain generate, and store sizes. Prints ratios from one run.

    python bench/bench_extract.py                      # real-shape stand-in, a 3x4-tile COCO photo
    python bench/bench_extract.py --photos 13 --rounds 2   # the 13 COCO photos, each order once: whole-process walls
    python bench/bench_extract.py --model-id DIR --image photo.jpg --max-new-tokens 32

Each measurement runs in a fresh process (same process style for both sides), 2 torch threads;
plain and compact extraction alternate so drift hits both. "Whole process" is the child's wall
from start to exit (imports, model load, image, generate or extract + store write); "section" is
the part after the model is loaded. Peak RSS is the phase peak after the model is loaded (VmHWM
reset through /proc/self/clear_refs). Longest edge: the checkpoint's own (2048 for the 256M shape).
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from sample_data import IMAGES, PHOTO  # noqa: E402  (bench/ is on sys.path: the script's folder)
DEFAULT_IMAGE = IMAGES / PHOTO


def hwm_mib():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024


def child(args):
    import torch
    torch.set_num_threads(args.threads)
    from smolattn import extract as ex
    from smolattn import model as mdl
    loaded = mdl.load(args.model_id, "cpu", "float32")
    Path("/proc/self/clear_refs").write_text("5")
    t0 = time.perf_counter()
    if args.child == "plain":
        rgb, _ = ex.open_image(args.image)
        _, inputs = mdl.encode(loaded, rgb, ex.DEFAULT_PROMPT)   # the processor's own longest edge
        new = mdl.generate(loaded, inputs, args.max_new_tokens)
    else:
        s = ex.extract(loaded, args.image, args.out, ex.Settings(max_new_tokens=args.max_new_tokens, store=args.child))
        new = s["new_tokens"]
    print(json.dumps({"mode": args.child, "seconds": time.perf_counter() - t0, "peak_mib": hwm_mib(),
                      "new_tokens": new if isinstance(new, int) else len(new)}))


def measure(args, mode, out, image=None):
    cmd = [sys.executable, __file__, "--child", mode, "--model-id", args.model_id, "--image", str(image or args.image),
           "--max-new-tokens", str(args.max_new_tokens), "--threads", str(args.threads), "--out", str(out)]
    t, c = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    r = subprocess.run(cmd, capture_output=True, text=True, check=True)
    c2 = resource.getrusage(resource.RUSAGE_CHILDREN)
    return dict(json.loads(r.stdout.strip().splitlines()[-1]), process_s=time.perf_counter() - t,
                process_cpu_s=(c2.ru_utime - c.ru_utime) + (c2.ru_stime - c.ru_stime))


def photos_table(args, tmp):
    """Whole-process wall of extraction vs plain generate over the first N COCO photos, alternating."""
    images = sorted(p for p in args.image.parent.glob("*.jpg"))[:args.photos]
    if not images:
        raise SystemExit(f"no photos next to {args.image}")
    rows = []
    for r, i in ((r, i) for r in range(args.rounds) for i in range(len(images))):
        img, pair = images[i], {}
        for mode in (("plain", "compact") if (i + r) % 2 == 0 else ("compact", "plain")):
            pair[mode] = measure(args, mode, tmp / f"photo{i}-{r}-{mode}", img)
        rows.append(pair)
        p, e = pair["plain"], pair["compact"]
        print(f"round {r + 1}, {img.name}: whole process plain {p['process_s']:.1f}s wall / {p['process_cpu_s']:.1f}s CPU, extraction "
              f"{e['process_s']:.1f}s / {e['process_cpu_s']:.1f}s ({e['process_s'] / p['process_s']:.3f}x wall, "
              f"{e['process_cpu_s'] / p['process_cpu_s']:.3f}x CPU)", flush=True)
    for key, what in (("process_s", "wall"), ("process_cpu_s", "CPU time")):
        total = {m: sum(r[m][key] for r in rows) for m in ("plain", "compact")}
        print(f"{len(images)} photos x {args.rounds} round(s), {args.max_new_tokens} new tokens, fp32, {args.threads} threads: whole-process {what} "
              f"extraction / plain generate = {total['compact'] / total['plain']:.3f} (goal <= 1.05; sum "
              f"{total['compact']:.0f}s vs {total['plain']:.0f}s)")
    print(f"load average at the end {os.getloadavg()[0]:.1f} (a shared machine: wall ratios drift with the load, "
          f"CPU-time ratios much less)")


def dir_bytes(p):
    return sum(f.stat().st_size for f in Path(p).rglob("*") if f.is_file() and "attention" in str(f.relative_to(p)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-id", default=None)
    ap.add_argument("--image", type=Path, default=DEFAULT_IMAGE)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--photos", type=int, default=0,
                    help="N > 0: only the whole-process table over the first N photos of the image's folder")
    ap.add_argument("--rounds", type=int, default=1,
                    help="with --photos: repeat the photos, each round flipping which side runs first (2 balances an odd count)")
    ap.add_argument("--child", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.child:
        return child(args)
    from smolattn import standin, store
    args.model_id = args.model_id or str(standin.ensure("smolvlm-256m"))
    tmp = Path(tempfile.mkdtemp(prefix="bench-extract-"))
    if args.photos:
        return photos_table(args, tmp)
    res = {"plain": [], "compact": []}
    for i in range(args.repeats):
        for mode in ("plain", "compact"):
            res[mode].append(measure(args, mode, tmp / f"{mode}{i}"))
            print(res[mode][-1], flush=True)
    for mode in ("full", "compact8"):
        res[mode] = [measure(args, mode, tmp / mode)]
        print(res[mode][-1], flush=True)
    best = {m: min(r, key=lambda x: x["seconds"]) for m, r in res.items()}
    peak = {m: min(x["peak_mib"] for x in r) for m, r in res.items()}
    sizes = {m: dir_bytes(tmp / (m + "0" if m == "compact" else m)) for m in ("compact", "compact8", "full")}
    full, comp, q8 = store.Run(tmp / "full"), store.Run(tmp / "compact0"), store.Run(tmp / "compact8")
    diff = qerr = 0.0
    for i in range(comp.num_layers):
        a, b, q = comp.layer(i), full.layer(i), q8.layer(i)
        rows = [full.row_of(p) for p in comp.query_positions]
        diff = max(diff, float(np.abs(a.image - b.image[:, rows]).max()))
        qerr = max(qerr, float((np.abs(a.image - q.image) / np.maximum(a.image.max(-1, keepdims=True), 1e-12)).max()))
    print(f"\nmodel {args.model_id}, image {args.image.name} ({comp.geometry.rows}x{comp.geometry.cols} tiles), "
          f"{best['compact']['new_tokens']} new tokens, fp32, {args.threads} threads")
    print(f"wall   plain generate {best['plain']['seconds']:.2f}s | compact extraction {best['compact']['seconds']:.2f}s "
          f"| ratio {best['compact']['seconds'] / best['plain']['seconds']:.3f} (goal <= 1.10)")
    print(f"rss    plain peak {peak['plain']:.0f} MiB | extraction peak {peak['compact']:.0f} MiB "
          f"| +{peak['compact'] - peak['plain']:.0f} MiB (goal <= +150)")
    print(f"bytes  full {sizes['full']:,} | compact {sizes['compact']:,} (1/{sizes['full'] / sizes['compact']:.1f}, goal >= 20)"
          f" | compact8 {sizes['compact8']:,} (1/{sizes['full'] / sizes['compact8']:.1f}, goal >= 40)")
    print(f"maps   compact vs full max |diff| {diff:.2e} (fp16 rounding) | compact8 max error {qerr:.5f} of map max "
          f"(bound 1/510 = {1 / 510:.5f}, goal <= 1/255)")
    print(f"extra  full store extraction {best['full']['seconds']:.2f}s, peak {peak['full']:.0f} MiB")


if __name__ == "__main__":
    main()
