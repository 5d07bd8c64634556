"""Interventions cost vs their baselines (issue 18), measured in one process, alternating. Prints ratios.

    python bench/bench_interventions.py                  # real-shape stand-in, 640x480, 32 answer tokens
    python bench/bench_interventions.py --rounds 5 --threads 2

1. intervene.py's work (--ablate-heads: both teacher-forced passes, the intervened generation with
   capture, the run write; the image encoded once) vs one ordinary extraction of that run
   (extract.extract: same image, prompt, 32 tokens, store). Goal <= 1.25x.
2. A sweep over all 30 layers, window 9 (--sweep --to image), --from last and --from question, vs one
   plain full forward of that question (vision encoder + the whole prompt, logits of the last
   position). The sweep includes its prefix forward and its sweep.json/sweep.png write. Goal <= 1.5x.

The model is loaded once; its load is in neither side; the base run's extraction warms it up.
Each round runs every side once, in alternating order; the median over rounds is reported. Stand-in weights: timing only.
"""
import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROMPT = "Is there a dog in the picture?"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="smolvlm-256m", help="stand-in shape (smolattn.standin)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=0, help="untimed rounds first")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    args = ap.parse_args()

    import torch
    torch.set_num_threads(args.threads)
    from smolattn import extract as ex
    from smolattn import interventions as iv
    from smolattn import model as mdl
    from smolattn import standin, synthetic

    loaded = mdl.load(str(standin.ensure(args.shape)), "cpu", "float32")
    tmp = Path(tempfile.mkdtemp(prefix="bench-iv-"))
    try:
        img = tmp / "photo.png"
        synthetic.test_image((640, 480)).save(img)
        settings = ex.Settings(prompt=PROMPT, max_new_tokens=args.max_new_tokens)
        base = tmp / "runs" / "photo"
        s = ex.extract(loaded, img, base, settings)
        print(f"base run: {s['new_tokens']} answer tokens, grid {s['grid']}, {args.shape} stand-in, "
              f"{args.threads} threads", flush=True)
        L = loaded.model.config.text_config.num_hidden_layers

        def plan(*argv):
            ns = argparse.ArgumentParser()
            iv.add_arguments(ns)
            a = ns.parse_args(["--run", str(base)] + list(argv))
            return iv.plan(a, ["--run", str(base)] + list(argv))

        H = loaded.model.config.text_config.num_attention_heads
        p_ablate = plan("--ablate-heads", f"{L // 2}:{H // 3},{L - 2}:{H - 2}")
        p_sweeps = {w: plan("--sweep", "--from", w, "--to", "image", "--window", "9") for w in ("last", "question")}
        rgb, _ = ex.open_image(img)

        def extraction():
            ex.extract(loaded, img, tmp / "extract-again", settings)

        def intervention():
            iv.intervene(p_ablate, loaded=loaded)

        def plain_forward():
            _, inputs = mdl.encode(loaded, rgb, PROMPT)
            with torch.inference_mode():
                loaded.model(**inputs, use_cache=False, logits_to_keep=1)

        sides = {"extraction": extraction, "intervene": intervention, "plain forward": plain_forward,
                 **{f"sweep --from {w}": (lambda p=p: iv.sweep(p, loaded=loaded)) for w, p in p_sweeps.items()}}
        times = {k: [] for k in sides}
        import matplotlib.pyplot  # noqa: F401 - its first import is not the sweep's cost
        for _ in range(args.warmup):   # optional warm-up rounds (the base run's extraction warmed the model)
            for f in sides.values():
                f()
        for r in range(args.rounds):
            order = list(sides) if r % 2 == 0 else list(sides)[::-1]
            for k in order:
                t0 = time.perf_counter()
                sides[k]()
                times[k].append(time.perf_counter() - t0)
            print(f"round {r + 1}: " + ", ".join(f"{k} {times[k][-1]:.2f}s" for k in sides), flush=True)
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"\nmedian of {args.rounds} rounds:")
        print(f"  intervene.py (ablate 2 heads: both teacher-forced passes + intervened generation + write) "
              f"{med['intervene']:.2f}s vs one extraction {med['extraction']:.2f}s: "
              f"{med['intervene'] / med['extraction']:.3f}x (goal <= 1.25x)")
        for w in p_sweeps:
            k = f"sweep --from {w}"
            n = len(p_sweeps[w].sweep["queries"])
            print(f"  sweep of {L} windows (w 9) --from {w} ({n} query position{'s' * (n > 1)}) {med[k]:.2f}s vs one plain "
                  f"full forward {med['plain forward']:.2f}s: {med[k] / med['plain forward']:.3f}x (goal <= 1.5x)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("SMOLATTN_MODELS", str(ROOT / "models"))
    main()
