"""Where does the model look when it reads or writes one token? Aggregate that token's attention
over layers and heads into one map over the image, and draw it (heatmap + overlay on the photo).

Console command: ``smolattn-heatmap`` (``python compute_token_heatmap.py`` in a checkout is the same).

Methods (formulas in docs/token-heatmap.md, smolattn/heatmap.py and smolattn/methods.py):
  image      (default) top-k and entropy over the image keys only, heads weighted by their image mass
  reference  the user's original compute_token_heatmap.py, exactly (top-k and entropy over ALL keys)
  rollout, relevancy, relative   maps stored by `extract_smolvlm_attn.py --methods ...` (--start-layer
             picks rollout's and relevancy's first layer; --layers averages relative's layers)

Examples:
  python compute_token_heatmap.py --run runs/skier --token jacket
  python compute_token_heatmap.py --decoded-tokens data/decoded_tokens.npy --allow-pickle --method reference
"""
from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

from smolattn import heatmap as hm
from smolattn import methods as mth
from smolattn import outputs
from smolattn.errors import UserError, run_cli
from smolattn.images import open_image
from smolattn import tokens as tok
from smolattn.store import Run


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, like every other error
        raise UserError(message)


def parse_args(argv):
    p = Parser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    src = p.add_argument_group("run (where the attention is)")
    src.add_argument("--run", type=Path, help="run directory (ours or the reference layout)")
    src.add_argument("--decoded-tokens", type=Path, help="reference layout without --run: the token file "
                     "(default decoded_tokens.npy); its directory is the run")
    src.add_argument("--attn-dir", type=Path, help="reference layout: the run's attention folder "
                     "(default attentions_5 next to the token file)")
    src.add_argument("--allow-pickle", action="store_true", help="load object-dtype token files (runs code "
                     "from the file: only for files you trust)")
    pick = src.add_mutually_exclusive_group()
    pick.add_argument("--image-index", type=int, help="a run of several images: which one, 0-based")
    pick.add_argument("--frame", type=int, help="a video run: which frame, 0-based")
    tok = p.add_argument_group("token")
    tok.add_argument("--token", default="jacket", help="token text, matched stripped and case-insensitively "
                     "(default: jacket)")
    tok.add_argument("--occurrence", type=int, help="which match, 1-based: answer tokens first, then the prompt "
                     "(default 1)")
    tok.add_argument("--index", type=int, help="the token's position in the sequence (overrides --token)")
    agg = p.add_argument_group("aggregation")
    agg.add_argument("--method", choices=hm.METHODS + tuple(mth.METHODS), default="image")
    agg.add_argument("--start-layer", type=int, default=0, help="rollout/relevancy: first layer used (default 0)")
    agg.add_argument("--layers", default="all", help="'a-b', 'a-', or a list like '0,5,10-12' "
                     "(default all: 0-29 on SmolVLM-256M)")
    agg.add_argument("--heads", default="all", help="same syntax as --layers (default all)")
    agg.add_argument("--topk", type=int, default=10, help="keep the k largest keys per head, 0 = all (default 10)")
    agg.add_argument("--global", dest="global_mode", choices=hm.GLOBAL_MODES, default="panel",
                     help="image method: global tile as its own panel (default), blended into the tiled "
                     "map, or dropped")
    out = p.add_argument_group("output")
    out.add_argument("--output", type=Path, default=Path("token_heatmap.png"), help="heatmap PNG")
    out.add_argument("--overlay", default=None, help="overlay PNG at the image's size "
                     "(default token_heatmap_overlay.png; '' to skip)")
    out.add_argument("--overlay-alpha", type=float, default=0.5, help="opacity of the hottest cells (default 0.5)")
    out.add_argument("--smooth", action="store_true", help="bilinear overlay instead of nearest cells")
    out.add_argument("--json", nargs="?", const="", default=None, metavar="PATH",
                     help="also write the grids and per-head weights (default PATH: <output>.json)")
    return p.parse_args(argv)


def open_run(args) -> Run:
    if args.run is not None:
        if args.decoded_tokens or args.attn_dir:
            raise UserError("--run replaces --decoded-tokens/--attn-dir; give one or the other")
        return Run(args.run, allow_pickle=args.allow_pickle)
    tokens = args.decoded_tokens or Path("decoded_tokens.npy")
    if not tokens.is_file():
        raise UserError(f"token file not found: {tokens} (give --run DIR or --decoded-tokens PATH)")
    if tokens.name != "decoded_tokens.npy":
        raise UserError(f"{tokens}: the reference layout names the token file decoded_tokens.npy")
    if args.attn_dir is not None and args.attn_dir.resolve() != (tokens.parent / "attentions_5").resolve():
        raise UserError(f"--attn-dir must be the attentions_5 folder next to {tokens} (the reference layout)")
    return Run(tokens.parent, allow_pickle=args.allow_pickle)


def pick_image(run: Run, image_index: int | None, frame: int | None):
    """The one image the map is drawn over: ``run`` itself, or image / frame K of a several-image run."""
    layout, k = run.layout, frame if frame is not None else image_index
    what = "frame" if layout.is_video else "image"
    if k is None:
        if len(layout) > 1:
            flag = "--frame" if layout.is_video else "--image-index"
            raise UserError(f"this run has {len(layout)} {what}s: pass {flag} K (0..{len(layout) - 1})")
        return run
    if (frame is not None) != layout.is_video:
        raise UserError("--frame is for video runs, --image-index for runs of images")
    if not 0 <= k < len(layout):
        raise UserError(f"{what} {k} out of range: this run has {what}s 0..{len(layout) - 1}")
    return run.image_view(k) if len(layout) > 1 else run


def load_image(run: Run):
    path = run.image_path()
    if path is None:
        raise UserError(f"{run.path}: no image in the run for the overlay (pass --overlay '' to skip it)")
    return open_image(path)[0]


def save_all(files: dict) -> None:
    """Write every output (PIL image -> PNG with our marker, str -> JSON with our "format" field) under
    a temporary name, then rename them all into place; each path is first checked to be new or a file
    of ours (smolattn.outputs): a file that is not ours is refused, untouched, and nothing is written."""
    items = {Path(path): (hm.png_bytes(thing), hm.PNG_MARKER) if hasattr(thing, "save")
             else (thing.encode(), hm.JSON_MARKER) for path, thing in files.items()}
    try:
        outputs.replace_files(items)
    except OSError as e:
        raise UserError(f"cannot write {e.filename or next(iter(items))}: {e.strerror or e}")
    for path in items:
        print(f"Saved {path}")


def check_outputs(args) -> None:
    """Before any work: every file this command will write is new or one of ours (one line, else)."""
    paths = {args.output: hm.PNG_MARKER}     # <output>_global.png, when drawn, is checked before anything is written
    if args.overlay != "":
        paths[Path(args.overlay or "token_heatmap_overlay.png")] = hm.PNG_MARKER
    if args.json is not None:
        paths[json_path(args)] = hm.JSON_MARKER
    for path, marker in paths.items():
        outputs.check_file(path, marker)


def json_path(args) -> Path:
    return Path(args.json) if args.json else args.output.with_suffix(".json")


def spans(indices) -> str:
    """[0, 1, 2, 5] -> '0-2,5'."""
    out, start = [], indices[0]
    for a, b in zip(indices, indices[1:] + [None]):
        if b != a + 1:
            out.append(f"{start}-{a}" if a > start else str(a))
            start = b
    return ",".join(out)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not 0 <= args.overlay_alpha <= 1:
        raise UserError("--overlay-alpha must be between 0 and 1")
    check_outputs(args)
    run = pick_image(open_run(args), args.image_index, args.frame)
    layers = hm.parse_layers(args.layers, run.num_layers)
    heads = hm.parse_layers(args.heads, run.num_heads, "head")
    first, pos = hm.find_span(run, args.token, args.index, args.occurrence)
    word = tok.text_at(run.tokens, first, pos).strip()
    role = "answer" if pos >= run.prompt_length else "prompt"

    t0 = time.perf_counter()
    derived = args.method in mth.METHODS
    if args.method == "reference":
        agg = hm.aggregate_reference(run, pos, layers, heads, args.topk)
    elif derived:
        agg = hm.aggregate_method(run, pos, args.method, layers, args.start_layer)
    else:
        agg = hm.aggregate_image(run, pos, layers, heads, args.topk, args.global_mode)
    where = f"positions {first}-{pos} (the row of {pos}, the last)" if pos > first else f"position {pos}"
    if derived:
        print(f"token {word!r} at {where} ({role}); {args.method} map ({agg.details['row']}), "
              f"image total {agg.total_weight:.4g}; read in {time.perf_counter() - t0:.3f} s")
    else:
        print(f"token {word!r} at {where} ({role}); {len(agg.weights)} of {len(layers) * len(heads)} "
              f"(layer, head) pairs weighted, total weight {agg.total_weight:.4g}; "
              f"aggregated in {time.perf_counter() - t0:.3f} s")

    if derived and "start_layer" in agg.details:
        title = f"'{word}' #{pos} | {args.method} | layers {args.start_layer}-{run.num_layers - 1}"
    else:
        title = f"'{word}' #{pos} | {args.method} | layers {spans(layers)}"
        title += f" | heads {spans(heads)}" if len(heads) < run.num_heads and not derived else ""
        title += f" | top-{args.topk}" if args.topk > 0 and not derived else ""
    if getattr(run, "k", None) is not None:      # one image of several
        ts = run.layout.timestamps[0]
        title += f" | frame {run.k} ({int(ts // 60):02d}:{ts % 60:04.1f})" if ts is not None else f" | image {run.k}"
    panel = (args.method == "image" or derived) and args.global_mode == "panel"
    fig, glob = hm.aggregate_figures(agg, title, panel)
    files = {args.output: fig}
    if glob is not None:
        files[args.output.with_name(f"{args.output.stem}_global.png")] = glob
    overlay = "token_heatmap_overlay.png" if args.overlay is None else args.overlay
    if overlay and not (args.overlay is None and run.image_path() is None):
        main_grid = agg.grid if agg.grid is not None else agg.global_grid
        files[Path(overlay)] = hm.overlay(load_image(run), main_grid, args.smooth, max_alpha=args.overlay_alpha)
    elif overlay:
        print(f"no image in {run.path}: overlay skipped")
    if args.json is not None:
        text = json.dumps({"format": hm.FORMAT, "run": str(run.path), **agg.to_json()}, indent=1)
        text = re.sub(r"\[\s+([-+0-9.e,\s]+?)\s+\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text)
        files[json_path(args)] = text
    save_all(files)
    return 0


def cli() -> None:
    """The console command smolattn-heatmap."""
    run_cli(main)


if __name__ == "__main__":
    cli()
