"""Which heads localise, over a whole dataset of runs, and where the model looks on POPE.

    python analyze_heads.py --runs smol_outputs --output-dir heads
    python analyze_heads.py --runs pope_out/attention --annotations samples/coco/subset_instances.json

Reads every run under --runs (a batch output root or a POPE attention root; no model is loaded), scores
every layer x head (image-attention sum, spatial entropy, pointing game and mass in the COCO boxes,
AUROC of present vs absent objects), selects localisation heads (Kang et al. CVPR 2025, value-based
elbow) and writes report.md, analysis.json, heads.csv, scores.npz and PNG plots. Details: docs/heads.md.
"""
import argparse
import os
import sys
from pathlib import Path

from smolattn import analysis as an
from smolattn import head_report
from smolattn import pope
from smolattn.errors import UserError, run_cli


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", required=True, metavar="ROOT", help="batch output root or POPE attention root")
    ap.add_argument("--output-dir", metavar="DIR", help="default: ROOT/analysis")
    ap.add_argument("--annotations", metavar="COCO_JSON", help="COCO instances JSON: pointing game, mass in box, AUROC")
    ap.add_argument("--query", choices=an.QUERIES, default="last",
                    help="the token whose attention is scored: last prompt token (default, Kang et al.), "
                         "the POPE object word, or the first answer token")
    ap.add_argument("--topk", type=int, default=10, help="per-run top-k heads counted for the frequency")
    ap.add_argument("--threshold", type=float, default=0.001, help="spatial entropy: keep ReLU(S - mean S) > this")
    ap.add_argument("--keep-bottom-row", action="store_true",
                    help="keep heads whose mask covers the whole bottom row (Kang et al. drop them as artifacts)")
    ap.add_argument("--top-heads", type=int, default=4, help="heads shown on example images")
    ap.add_argument("--workers", type=int, default=0, help="processes (0: all cores)")
    ap.add_argument("--limit", type=int, default=0, help="only the first N runs in name order (0: all)")
    args = ap.parse_args(argv)
    if args.topk < 1 or args.threshold < 0 or args.workers < 0 or args.limit < 0 or args.top_heads < 1:
        ap.error("--topk and --top-heads must be >= 1; --threshold, --workers and --limit >= 0")
    return args


def main(argv=None):
    args = parse_args(argv)
    root = Path(args.runs)
    if not root.is_dir():
        raise UserError(f"--runs {root}: not a directory")
    out = Path(args.output_dir) if args.output_dir else root / "analysis"
    head_report.check_output(out)
    boxes = pope.load_boxes(args.annotations) if args.annotations else None
    names = an.find_runs(root)
    if not names:
        raise UserError(f"no runs under {root} (a run is a directory with decoded_tokens.npy)")
    found = len(names)
    names = names[:args.limit] if args.limit else names
    params = an.Params(args.query, args.threshold, args.topk, not args.keep_bottom_row)
    workers = args.workers or os.cpu_count() or 1
    print(f"{found} runs under {root}; analysing {len(names)} on {workers} processes", file=sys.stderr)
    ds = an.analyse_root(root, params, boxes, workers, names)
    if not len(ds):
        first = next(iter(ds.skipped.items()))
        raise UserError(f"none of the {len(names)} runs could be analysed (e.g. {first[0]}: {first[1]})")
    result = head_report.write(out, ds, found, args.annotations, boxes, args.top_heads)
    print(result["markdown"])
    print(f"wrote {out}/ (report.md, analysis.json, heads.csv, scores.npz, PNGs)", file=sys.stderr)
    if ds.skipped:
        print(f"{len(ds.skipped)} runs skipped; reasons in {out / 'analysis.json'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_cli(main)
