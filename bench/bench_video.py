"""A video run's cost vs plain generate on the same frames, and its size vs the full store. Ratios from one run.

    python bench/bench_video.py                       # real-shape SmolVLM2-256M stand-in, 64 frames, 16 new tokens
    python bench/bench_video.py --shape smolvlm2-tiny --frames 16 --rounds 2

Goals (issue 19): whole-process extraction <= 1.10x plain ``generate`` on the same frames; peak RSS
<= plain + 500 MB; the run <= 1/20 of the bytes the full (1, H, S, S) fp16 store would take
(computed, not written). The clip is made here (PyAV, 2 fps, flat colours + a moving box, 320 x 240)
so that SmolVLM's sampling keeps exactly --frames frames. Each measurement is a fresh process
(imports, model load, decode + sampling, processor, generate or extract + store write), 2 torch
threads; plain and extraction alternate. Peak RSS is the phase peak after the model loaded (VmHWM
reset through /proc/self/clear_refs).
"""
import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def hwm_mib():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024


def make_clip(path, frames: int, fps: int = 2, size=(320, 240)):
    """A clip of ``frames`` seconds at ``fps``: SmolVLM sampling at 1 fps keeps ``frames`` frames."""
    import av

    w, h = size
    n = frames * fps
    with av.open(str(path), "w") as out:
        s = out.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for i in range(n):
            a = np.zeros((h, w, 3), np.uint8)
            a[..., 0], a[..., 1], a[..., 2] = (17 * i) % 256, 90, 160
            x = (i * 7) % (w - 40)
            a[100:140, x:x + 40] = 255
            for p in s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                out.mux(p)
        for p in s.encode():
            out.mux(p)


def child(args):
    import torch
    torch.set_num_threads(args.threads)
    from smolattn import engine, video
    from smolattn import extract as ex
    from smolattn import model as mdl
    loaded = mdl.load(args.model_id, "cpu", "float32")
    Path("/proc/self/clear_refs").write_text("5")
    t0 = time.perf_counter()
    prompt = "What happens in this video?"
    if args.child == "plain":
        frames = video.read(args.video)
        _, _, inputs = video.process(loaded.processor, frames, prompt)
        new = len(mdl.generate(loaded, {k: v.to(loaded.device) for k, v in inputs.items()}, args.max_new_tokens))
        info = {"frames": len(frames.images), "prompt_length": int(inputs["input_ids"].shape[1])}
    else:
        s = ex.extract_video(loaded, args.video, args.out, ex.Settings(prompt=prompt, max_new_tokens=args.max_new_tokens))
        new, info = s["new_tokens"], {"frames": s["images"]}
    print(json.dumps({"mode": args.child, "seconds": time.perf_counter() - t0, "peak_mib": hwm_mib(),
                      "new_tokens": new, **info}))


def measure(args, mode, out):
    cmd = [sys.executable, __file__, "--child", mode, "--model-id", args.model_id, "--video", str(args.video),
           "--max-new-tokens", str(args.max_new_tokens), "--threads", str(args.threads), "--out", str(out)]
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"child {mode} failed:\n{r.stderr[-3000:]}")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    res["wall"] = time.perf_counter() - t
    return res


def dir_bytes(p):
    return sum(f.stat().st_size for f in Path(p).rglob("*") if f.is_file())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--video", default=None, help="a video (default: a clip made here with --frames frames)")
    ap.add_argument("--shape", default="smolvlm2-256m", help="stand-in shape when --model-id is not given")
    ap.add_argument("--model-id", default=None)
    ap.add_argument("--frames", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if args.child:
        return child(args)
    from smolattn import standin, store
    args.model_id = args.model_id or str(standin.ensure(args.shape))
    with tempfile.TemporaryDirectory() as tmp:
        if args.video is None:
            args.video = Path(tmp) / "clip.mp4"
            make_clip(args.video, args.frames)
        res = {"plain": [], "compact": []}
        for r in range(args.rounds):
            for mode in (("plain", "compact") if r % 2 == 0 else ("compact", "plain")):
                res[mode].append(measure(args, mode, Path(tmp) / f"run{r}"))
                print(f"round {r} {mode}: {json.dumps(res[mode][-1])}", flush=True)
        run = store.Run(Path(tmp) / "run0")
        S, L, H = len(run.tokens), run.num_layers, run.num_heads
        full = L * H * S * S * 2
        size = dir_bytes(run.path)
        frames = [f for f in run.path.glob("images/*")]
        frame_bytes = sum(f.stat().st_size for f in frames)
    plain = np.median([m["wall"] for m in res["plain"]])
    ext = np.median([m["wall"] for m in res["compact"]])
    pp, ep = max(m["peak_mib"] for m in res["plain"]), max(m["peak_mib"] for m in res["compact"])
    print(f"\nmodel {args.model_id} ({'stand-in' if 'standin' in args.model_id else 'checkpoint'}), "
          f"{len(frames)} frames, S = {S}, {L} layers x {H} heads, {args.max_new_tokens} new tokens, "
          f"{args.threads} threads, {args.rounds} round(s)")
    print(f"whole process: plain generate {plain:.1f} s, extraction {ext:.1f} s -> {ext / plain:.3f}x (goal <= 1.10x)")
    print(f"peak RSS after load: plain {pp:.0f} MiB, extraction {ep:.0f} MiB -> +{ep - pp:.0f} MiB (goal <= +500)")
    print(f"run {size / 1e6:.1f} MB ({frame_bytes / 1e6:.1f} MB of it the frames) vs full (1,H,S,S) fp16 store "
          f"{full / 1e9:.2f} GB -> 1/{full / size:.0f} (goal <= 1/20)")


if __name__ == "__main__":
    main()
