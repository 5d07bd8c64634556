"""Run SmolVLM on one image and store its answer plus the attention of every layer and head.

    python extract_smolvlm_attn.py --image photo.jpg --output-dir runs/photo
    python extract_smolvlm_attn.py --image photo.jpg --model-id models/tiny --store compact8

The run directory format is documented in docs/run-format.md; open it with `python app.py --run DIR`.
"""
import argparse

from smolattn import extract as ex
from smolattn import model as mdl
from smolattn.errors import run_cli
from smolattn.store import STORES


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--image", required=True, help="image file (any format Pillow reads)")
    ap.add_argument("--output-dir", default=".", help="run directory to write (replaced atomically)")
    ap.add_argument("--prompt", default=ex.DEFAULT_PROMPT)
    ap.add_argument("--model-id", default=mdl.DEFAULT_MODEL, help="hub id or local model directory")
    ap.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    ap.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    ap.add_argument("--dtype", choices=mdl.DTYPES, default=None, help="default: float32 on CPU, bfloat16 on GPU")
    ap.add_argument("--max-new-tokens", type=int, default=128, help="greedy decoding, stops at end of utterance")
    ap.add_argument("--longest-edge", type=int, default=2048, help="processor resize of the longest edge")
    ap.add_argument("--store", choices=STORES, default="compact",
                    help="compact: text/answer rows, fp16; compact8: same, 8-bit; full: reference (1,H,S,S) npz")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    settings = ex.Settings(args.prompt, args.max_new_tokens, args.longest_edge, args.store).check()
    image = ex.open_image(args.image)             # bad images fail before the model loads
    ex.check_writable(args.output_dir)
    loaded = mdl.load(args.model_id, args.device, args.dtype, args.revision)
    summary = ex.extract(loaded, args.image, args.output_dir, settings, image=image)
    banner = " [STAND-IN MODEL, random weights]" if loaded.standin else ""
    print(f"answer{banner}: {summary['answer']}")
    print(f"run written to {summary['run']} ({summary['grid'][0]}x{summary['grid'][1]} tiles + global, "
          f"{summary['new_tokens']} new tokens, {summary['timings']['generate_s']:.1f}s)")


if __name__ == "__main__":
    run_cli(main)
