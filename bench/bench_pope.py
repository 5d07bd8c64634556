"""POPE throughput: the shared-prefix (cached) path vs naive per-question generate, same process.

    python bench/bench_pope.py                          # builds the real-shape stand-in if needed
    python bench/bench_pope.py --model-id /tmp/s256 --longest-edge 2048
    python bench/bench_pope.py --attention --naive-questions 6   # with attention runs; also one at a time
    python bench/bench_pope.py --ablate-heads 12:3,14:7 --repeats 2   # cached path with the heads ablated vs without

One COCO photo and its 18 questions (6 per split) from pope_subset.jsonl. The cached path encodes the
image once and reuses the prefix KV cache; the naive path runs processor + vision encoder + generate
per question. Asserts identical answers, prints questions/s of both, the ratio, and the projected
wall time of the full POPE (3 x 3,000 questions = 500 images x 18) for the cached path on this machine.
With --ablate-heads: the cached path without and with the heads ablated (benchmark.py --ablate-heads'
arms), alternated --repeats times (best of each), and the questions/s ratio ablated / plain (goal >= 0.9).
"""
import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from smolattn import pope, standin  # noqa: E402
from smolattn import pope_runner as pr  # noqa: E402
from smolattn.images import open_image  # noqa: E402

from sample_data import IMAGES, PHOTO, POPE_SUBSET  # noqa: E402  (bench/ is on sys.path: the script's folder)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-id", default=None, help="default: the smolvlm-256m stand-in (built under models/)")
    ap.add_argument("--image", default=PHOTO)
    ap.add_argument("--questions", default=str(POPE_SUBSET))
    ap.add_argument("--image-root", default=str(IMAGES))
    ap.add_argument("--longest-edge", type=int, default=None, help="default: the checkpoint's own (2048)")
    ap.add_argument("--batch-images", type=int, default=1,
                    help="cached path: the questions of this many images (from --image on, in file order) in one batch")
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--naive-questions", type=int, default=0,
                    help="time the naive path on only the first N questions (0: all 18) and compare those")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--no-batch", action="store_true", help="cached path: one question at a time, not batched")
    ap.add_argument("--attention", action="store_true",
                    help="store each question's attention run (as benchmark.py --attention), and also time the "
                         "cached path one question at a time")
    ap.add_argument("--ablate-heads", default=None, metavar="SPEC",
                    help="time the cached path with these heads ablated (12:3,14:7 | 12:*) against without")
    ap.add_argument("--ablation", choices=("zero", "mean"), default="zero")
    ap.add_argument("--repeats", type=int, default=2, help="--ablate-heads: alternated timings of each (best kept)")
    ap.add_argument("--json", default=None, help="also write the numbers here")
    args = ap.parse_args()

    if args.threads:
        __import__("torch").set_num_threads(args.threads)
    model_id = args.model_id or str(standin.ensure("smolvlm-256m"))
    t = time.perf_counter()
    loaded = pr.get_model(pr.Config(model_id, device=args.device))
    load_s = time.perf_counter() - t
    by_image: dict = {}
    for q in pope.load_questions([args.questions]):
        by_image.setdefault(q.image, []).append(q)
    names = list(by_image)
    names = names[names.index(args.image):][:args.batch_images]
    images = [{"image": open_image(Path(args.image_root) / n)[0], "questions": by_image[n]} for n in names]
    qs = [q for im in images for q in im["questions"]]
    print(f"model {model_id} (stand-in: {bool(loaded.standin)}), {loaded.device} {loaded.dtype}, "
          f"torch threads {__import__('torch').get_num_threads()}, load {load_s:.1f}s; {', '.join(names)}: "
          f"{len(qs)} questions, longest edge {args.longest_edge or 'the processor default'}; "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)

    tmp = Path(tempfile.mkdtemp(prefix="bench-pope-"))

    def timed(naive, questions, batch=not args.no_batch, tag="cached", spec=None):
        wanted = {q.key for q in questions}
        subset = [dict(im, questions=[q for q in im["questions"] if q.key in wanted]) for im in images]
        t0 = time.perf_counter()
        rows = pr.answer_images(loaded, [im for im in subset if im["questions"]], pope.DEFAULT_SUFFIX,
                                args.max_new_tokens, args.longest_edge, naive=naive, batch=batch,
                                attention_dir=tmp / tag if args.attention else None, spec=spec)
        return rows, time.perf_counter() - t0

    if args.ablate_heads:
        try:
            return ablate_mode(args, loaded, images, qs, timed)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    try:
        what = " with attention runs" if args.attention else ""
        cached, cached_s = timed(False, qs)
        print(f"cached{what}: {len(qs)} questions in {cached_s:.1f}s = {len(qs) / cached_s:.3f} q/s", flush=True)
        if args.attention and not args.no_batch:
            alone, alone_s = timed(False, qs, batch=False, tag="alone")
            print(f"cached{what}, one question at a time: {len(qs)} questions in {alone_s:.1f}s = "
                  f"{len(qs) / alone_s:.3f} q/s; batched / one at a time {alone_s / cached_s:.2f}x; same answers: "
                  f"{[r['raw_answer'] for r in alone] == [r['raw_answer'] for r in cached]}", flush=True)
        nq = args.naive_questions or len(qs)
        naive, naive_s = timed(True, qs[:nq], tag="naive")
        print(f"naive{what}:  {nq} questions in {naive_s:.1f}s = {nq / naive_s:.3f} q/s", flush=True)

        same = [(r["raw_answer"], r["new_tokens"]) for r in cached[:nq]] == [(r["raw_answer"], r["new_tokens"]) for r in naive]
        ratio = (len(qs) / cached_s) / (nq / naive_s)
        per_image = cached_s * 18 / len(qs)
        full_h = 500 * per_image / 3600
        print(f"identical answers: {same} ({nq} compared); paths: {sorted({r['path'] for r in cached})}")
        print(f"speed-up cached / naive: {ratio:.1f}x")
        print(f"projected full POPE (9,000 questions = 500 images x 18), cached path: {full_h:.1f} h "
              f"({per_image:.1f}s per image); naive path: {9000 * naive_s / nq / 3600:.1f} h")
        print("answers:", [r["raw_answer"] for r in cached][:6], "...")
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps({
                "model": model_id, "standin": bool(loaded.standin), "image": args.image, "questions": len(qs),
                "longest_edge": args.longest_edge, "max_new_tokens": args.max_new_tokens, "batched": not args.no_batch, "attention": args.attention,
                "threads": __import__("torch").get_num_threads(), "cached_s": cached_s,
                "naive_s": naive_s, "naive_questions": nq, "speedup": ratio, "identical": same,
                "projected_full_hours": full_h, "load_average": os.getloadavg()[0]}, indent=1))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not same:
        print("ERROR: the cached path's answers differ from the naive path's", file=sys.stderr)
        return 1
    return 0


def ablate_mode(args, loaded, images, qs, timed):
    """benchmark.py --ablate-heads' ablated arm vs its base arm: the same cached path, same questions."""
    from smolattn import interventions as iv

    text = loaded.model.config.text_config
    spec = iv.Spec(iv.parse_heads(args.ablate_heads, text.num_hidden_layers, text.num_attention_heads), args.ablation)
    timed(False, qs[:1])                                  # warm-up (first-call allocations)
    best = {"plain": float("inf"), "ablated": float("inf")}
    rows = {}
    for r in range(max(1, args.repeats)):
        for name in (("plain", "ablated") if r % 2 == 0 else ("ablated", "plain")):
            rows[name], dt = timed(False, qs, spec=spec if name == "ablated" else None)
            best[name] = min(best[name], dt)
            print(f"{name}: {len(qs)} questions in {dt:.2f}s = {len(qs) / dt:.3f} q/s", flush=True)
    ratio = best["plain"] / best["ablated"]
    changed = sum(a["raw_answer"] != b["raw_answer"] for a, b in zip(rows["plain"], rows["ablated"]))
    tokens = {k: sum(r["new_tokens"] for r in v) for k, v in rows.items()}
    print(f"ablated {len(spec.heads)} heads ({args.ablation}): paths {sorted({r['path'] for r in rows['ablated']})}; "
          f"{changed} of {len(qs)} answers changed; new tokens plain {tokens['plain']}, ablated {tokens['ablated']}")
    # the same forward with and without the spec: the machinery's own cost, whatever the answers' lengths
    import torch
    from smolattn import model as mdl
    _, inputs = mdl.encode(loaded, images[0]["image"], qs[0].text + pope.DEFAULT_SUFFIX, args.longest_edge)
    fwd = {"plain": float("inf"), "ablated": float("inf")}
    for r in range(max(1, args.repeats) * 2):
        for name in (("plain", "ablated") if r % 2 == 0 else ("ablated", "plain")):
            with torch.inference_mode(), iv.applied(spec if name == "ablated" else iv.Spec()):
                t0 = time.perf_counter()
                loaded.model(**inputs, use_cache=False, logits_to_keep=1)
                fwd[name] = min(fwd[name], time.perf_counter() - t0)
    print(f"one prompt forward ({inputs['input_ids'].shape[1]} tokens): plain {fwd['plain']:.3f}s, ablated "
          f"{fwd['ablated']:.3f}s: {fwd['plain'] / fwd['ablated']:.3f}x")
    print(f"questions/s ablated / plain (best of {args.repeats}): {ratio:.3f}x (goal >= 0.9x); "
          f"load average {os.getloadavg()[0]:.1f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({
            "model": args.model_id, "standin": bool(loaded.standin), "questions": len(qs), "heads": args.ablate_heads,
            "ablation": args.ablation, "plain_s": best["plain"], "ablated_s": best["ablated"], "ratio": ratio,
            "repeats": args.repeats, "threads": __import__("torch").get_num_threads(), "new_tokens": tokens,
            "forward_plain_s": fwd["plain"], "forward_ablated_s": fwd["ablated"],
            "load_average": os.getloadavg()[0]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
