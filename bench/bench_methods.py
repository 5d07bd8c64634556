"""Extraction wall with each explanation method against raw-only, measured in one run (issue 11).

    python bench/bench_methods.py                          # real-shape stand-in, 640x480 COCO photo, 32 tokens
    python bench/bench_methods.py --model-id DIR --image photo.jpg --max-new-tokens 32 --repeats 2

One process, the model loaded once, CPU fp32. Each round extracts raw only, then raw+rollout,
raw+relative and raw+relevancy (--configs picks), so drift hits every side; each ratio is against the
raw extraction of the same round, and the median over rounds is printed with the goals of the issue.
Each line also prints methods_s / generate_s (the methods' own cost over the generation it adds to),
which a machine shared with other jobs disturbs less than the walls.
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from sample_data import IMAGES, PHOTO_4_3  # noqa: E402  (bench/ is on sys.path: the script's folder)
DEFAULT_IMAGE = IMAGES / PHOTO_4_3
CONFIGS = {"raw": ("raw",), "rollout": ("raw", "rollout"), "relative": ("raw", "relative"),
           "relevancy": ("raw", "relevancy")}
GOALS = {"rollout": 1.3, "relative": 1.3, "relevancy": 8.0}


def size(path) -> int:
    path = Path(path)
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-id", default=None, help="default: the real-shape stand-in")
    ap.add_argument("--image", type=Path, default=DEFAULT_IMAGE)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--configs", default=",".join(CONFIGS), help="which of raw,rollout,relative,relevancy "
                    "(raw is always measured: the baseline)")
    args = ap.parse_args()
    configs = {n: m for n, m in CONFIGS.items() if n == "raw" or n in args.configs.split(",")}
    import torch
    torch.set_num_threads(args.threads)
    from smolattn import extract as ex
    from smolattn import model as mdl
    from smolattn import standin, store

    model_id = args.model_id or str(standin.ensure("smolvlm-256m"))
    loaded = mdl.load(model_id, "cpu", "float32")
    tmp = Path(tempfile.mkdtemp(prefix="bench-methods-"))
    image = ex.open_image(args.image)
    walls = {name: [] for name in configs}
    ratios = {name: [] for name in configs if name != "raw"}
    for i in range(args.repeats):
        for name, methods in configs.items():
            t0 = time.perf_counter()
            s = ex.extract(loaded, args.image, tmp / f"{name}{i}", ex.Settings(max_new_tokens=args.max_new_tokens,
                                                                               methods=methods), image=image)
            walls[name].append(time.perf_counter() - t0)
            if name != "raw":
                ratios[name].append(walls[name][-1] / walls["raw"][-1])
            t = s["timings"]
            print(f"round {i} {name:9s} {walls[name][-1]:7.2f} s  {s['new_tokens']} new tokens  timings {t}"
                  + (f"  methods/generate {t['methods_s'] / t['generate_s']:.3f}" if name != "raw" else ""), flush=True)
    run = store.Run(tmp / "raw0")
    print(f"\nmodel {model_id} ({'STAND-IN, random weights' if run.standin else 'real'}), image {args.image.name} "
          f"{run.image_size()[0]}x{run.image_size()[1]} ({run.geometry.rows}x{run.geometry.cols} tiles + global, "
          f"{run.geometry.num_keys} image keys), S = {len(run.tokens)}, {len(run.tokens) - run.prompt_length} answer "
          f"tokens, CPU fp32, {args.threads} threads, {args.repeats} rounds")
    print(f"raw-only extraction: median {statistics.median(walls['raw']):.2f} s")
    for name, r in ratios.items():
        m = store.Run(tmp / f"{name}0").meta["methods"][name]
        print(f"{name:9s} median {statistics.median(walls[name]):7.2f} s  ratio vs raw {statistics.median(r):.2f}x "
              f"(rounds {', '.join(f'{x:.2f}' for x in r)}; goal <= {GOALS[name]}x)  "
              f"methods/{name}.npz {size(tmp / f'{name}0' / m['file']):,} bytes, shape {m['shape']}")
    print(f"run bytes: raw {size(tmp / 'raw0'):,}")


if __name__ == "__main__":
    main()
