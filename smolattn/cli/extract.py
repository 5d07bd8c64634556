"""Run SmolVLM on one image and store its answer plus the attention of every layer and head.

Console command: ``smolattn-extract`` (``python extract_smolvlm_attn.py`` in a checkout is the same).

    python extract_smolvlm_attn.py --image photo.jpg --output-dir runs/photo
    python extract_smolvlm_attn.py --image photo.jpg --model-id models/tiny --store compact8

The run directory format is documented in docs/run-format.md; open it with `python app.py --run DIR`.
"""
import argparse

from smolattn import extract as ex
from smolattn import model as mdl
from smolattn import store
from smolattn.errors import run_cli


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--image", required=True, help="image file (any format Pillow reads)")
    ap.add_argument("--output-dir", default=store.DEFAULT_RUN_DIR,
                    help="run directory to write: a new or empty directory, or a run to replace atomically "
                         f"(default: {store.DEFAULT_RUN_DIR}; `python app.py` serves it)")
    ex.add_arguments(ap)
    args = ap.parse_args(argv)
    settings = ex.settings_from_args(args)
    image = ex.open_image(args.image)             # bad images fail before the model loads
    ex.check_writable(args.output_dir)
    store.check_target(args.output_dir, args.replace_reference_run)   # never a folder of the user's, nor the current one
    ex.check_longest_edge(settings.longest_edge, ex.checkpoint_tile_size(args.model_id, args.revision))
    loaded = mdl.load(args.model_id, args.device, args.dtype, args.revision)
    summary = ex.extract(loaded, args.image, args.output_dir, settings, image=image,
                         replace_reference=args.replace_reference_run)
    banner = " [STAND-IN MODEL, random weights]" if loaded.standin else ""
    print(f"answer{banner}: {summary['answer']}")
    rows, cols = summary["grid"]
    layout = f"{rows}x{cols} tiles + global" if rows else "global tile only: the image fits one tile"
    print(f"run written to {summary['run']} ({layout}, "
          f"{summary['new_tokens']} new tokens, {summary['timings']['generate_s']:.1f}s)")


def cli() -> None:
    """The console command smolattn-extract."""
    run_cli(main)


if __name__ == "__main__":
    cli()
