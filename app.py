"""Attention viewer: serve one run (default: ./smolattn_run or the current directory) or every run under a root.

    python app.py                      # what extract_smolvlm_attn.py wrote here (./smolattn_run), or the
                                       # run in the current directory (the reference's behaviour)
    python app.py --run runs/cat       # one run
    python app.py --runs runs/         # every run under runs/, with a searchable picker
    python app.py --runs runs/ --model-id models/tiny   # live: ask new questions, intervene (runs/live/)
"""
from __future__ import annotations

import argparse
import ipaddress
import socket
import sys
from pathlib import Path

from smolattn.errors import UserError, run_cli
from smolattn.store import DEFAULT_RUN_DIR
from viewer import RUN_MARKER, create_app
from viewer import live


def default_run() -> str:
    """The current directory when it is a run (the reference layout), else the single-image
    extractor's default output directory when it holds one."""
    here = Path(".")
    return DEFAULT_RUN_DIR if not (here / RUN_MARKER).is_file() and (here / DEFAULT_RUN_DIR / RUN_MARKER).is_file() else "."


def loopback(host: str) -> bool:
    """Whether ``host`` reaches this machine only (127.0.0.0/8, ::1, or a name that resolves only there)."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        addrs = {ai[4][0] for ai in socket.getaddrinfo(host, None)}
    except OSError:
        return False
    return bool(addrs) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addrs)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = p.add_mutually_exclusive_group()
    where.add_argument("--run", metavar="DIR", help=f"serve this run directory (default: ./{DEFAULT_RUN_DIR} or the current directory)")
    where.add_argument("--runs", metavar="ROOT", help="serve every run under this batch output root")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=5001)
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow pickled decoded_tokens.npy (the reference format); only for files you trust")
    p.add_argument("--cache-mb", type=float, default=512, help="memory for cached attention layers and summaries (MB)")
    p.add_argument("--cache-dir", help="where summaries of runs that have none (reference format, older runs) are "
                   "cached (default: $SMOLATTN_CACHE or ~/.cache/smolattn)")
    p.add_argument("--analysis", metavar="DIR", help="head analysis (analyze_heads.py) for the dataset page at "
                   "/dataset (default: ROOT/analysis when it holds one)")
    live.add_arguments(p)
    args = p.parse_args(argv)
    if not 0 <= args.port <= 65535:
        raise UserError(f"port {args.port} out of range 0..65535")
    worker = live.start(args)      # None without --model-id: the read-only viewer, no live route
    app = create_app({"RUN": args.run or (None if args.runs else default_run()), "RUNS": args.runs,
                      "ALLOW_PICKLE": args.allow_pickle, "CACHE_MB": args.cache_mb,
                      "CACHE_DIR": args.cache_dir, "ANALYSIS": args.analysis, "LIVE": worker})
    registry = app.extensions["runs"]
    count = len(registry.index)
    if count == 0 and worker is None:     # live mode may start empty: ask the first question
        raise UserError(f"no runs under {registry.root} (a run is a directory with decoded_tokens.npy)")
    shown = f"[{args.host}]" if ":" in args.host else args.host    # the address bound, as a URL host
    if not loopback(args.host):
        print(f"warning: --host {args.host} is not a loopback address: anyone who can reach this machine on port "
              f"{args.port} can read every run served (the viewer has no login); --host 127.0.0.1 serves this "
              "machine only", file=sys.stderr)
    print(f"Serving {count} run(s) from {registry.root} at http://{shown}:{args.port}/")
    if app.extensions["analysis_dir"]:
        print(f"Dataset page (head analysis {app.extensions['analysis_dir']}): http://{shown}:{args.port}/dataset")
    if worker is not None:
        print(f"Ask a new question: http://{shown}:{args.port}/live")
    app.run(host=args.host, port=args.port, debug=False, threaded=True)
    return 0


if __name__ == "__main__":
    run_cli(main)
