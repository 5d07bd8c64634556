"""Run SmolVLM on one image (or several, or a video) and store its answer plus the attention of every layer and head.

Console command: ``smolattn-extract`` (``python extract_smolvlm_attn.py`` in a checkout is the same).

    python extract_smolvlm_attn.py --image photo.jpg --output-dir runs/photo
    python extract_smolvlm_attn.py --image photo.jpg --model-id models/tiny --store compact8
    python extract_smolvlm_attn.py --image a.jpg --image b.jpg --prompt "What differs?"   # one prompt, in order
    python extract_smolvlm_attn.py --video clip.mp4 --fps 1 --max-frames 64               # SmolVLM2 checkpoints

The run directory format is documented in docs/run-format.md; open it with `python app.py --run DIR`.
"""
import argparse

from smolattn import extract as ex
from smolattn import model as mdl
from smolattn import store
from smolattn.errors import UserError, run_cli


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--image", action="append", help="image file (any format Pillow reads); repeat it for several "
                     "images in one prompt, in order")
    src.add_argument("--video", help="video file (decoded with PyAV); needs a SmolVLM2 checkpoint")
    ap.add_argument("--fps", type=float, default=None, help="video: frames sampled per second (default: the "
                    "checkpoint's video_sampling, 1)")
    ap.add_argument("--max-frames", type=int, default=None, help="video: at most this many frames (default: the "
                    "checkpoint's, 64)")
    ap.add_argument("--keep-frame-rows", action="store_true", help="video: also keep the rows of the intro and of "
                    "each frame's timestamp text (default: the prompt after the frames and the answer)")
    ap.add_argument("--output-dir", default=store.DEFAULT_RUN_DIR,
                    help="run directory to write: a new or empty directory, or a run to replace atomically "
                         f"(default: {store.DEFAULT_RUN_DIR}; `python app.py` serves it)")
    ex.add_arguments(ap)
    args = ap.parse_args(argv)
    settings = ex.settings_from_args(args)
    if not args.video and (args.fps is not None or args.max_frames is not None or args.keep_frame_rows):
        raise UserError("--fps, --max-frames and --keep-frame-rows are for --video")
    images = [ex.open_image(p) for p in args.image or []]   # bad images fail before the model loads
    if args.video:
        from smolattn import video
        video.probe(args.video, args.fps, args.max_frames)   # a bad video fails before the model loads
        mdl.video_model(args)
    ex.check_writable(args.output_dir)
    store.check_target(args.output_dir, args.replace_reference_run)   # never a folder of the user's, nor the current one
    ex.check_longest_edge(settings.longest_edge, ex.checkpoint_tile_size(args.model_id, args.revision))
    loaded = mdl.load(args.model_id, args.device, args.dtype, args.revision)
    if args.video:
        summary = ex.extract_video(loaded, args.video, args.output_dir, settings, args.fps, args.max_frames,
                                   args.keep_frame_rows, replace_reference=args.replace_reference_run)
    elif len(images) == 1:
        summary = ex.extract(loaded, args.image[0], args.output_dir, settings, image=images[0],
                             replace_reference=args.replace_reference_run)
    else:
        summary = ex.extract_images(loaded, args.image, args.output_dir, settings, images=images,
                                    replace_reference=args.replace_reference_run)
    banner = " [STAND-IN MODEL, random weights]" if loaded.standin else ""
    print(f"answer{banner}: {summary['answer']}")
    rows, cols = summary["grid"]
    if summary["video"]:
        layout = f"{summary['images']} frames"
    elif summary["images"] > 1:
        layout = f"{summary['images']} images"
    else:
        layout = f"{rows}x{cols} tiles + global" if rows else "global tile only: the image fits one tile"
    print(f"run written to {summary['run']} ({layout}, "
          f"{summary['new_tokens']} new tokens, {summary['timings']['generate_s']:.1f}s)")


def cli() -> None:
    """The console command smolattn-extract."""
    run_cli(main)


if __name__ == "__main__":
    cli()
