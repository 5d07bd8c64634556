"""The dataset page: a head analysis (analyze_heads.py) of the served runs root. The layer x head grid is
coloured by a chosen score; a head's best and worst runs are listed with their overlays (drawn by
/api/overlay.png) and link to the run view at that layer, head and query token."""
from __future__ import annotations

import threading
from pathlib import Path

from flask import Blueprint, current_app, jsonify, render_template, request

from smolattn import analysis as an
from smolattn import head_report, pope
from smolattn.errors import UserError

from .api import ApiError, _api_error, as_int
from .runs import NotFound

bp = Blueprint("dataset", __name__)
bp.register_error_handler(ApiError, _api_error)   # the API's one error shape: {"success": false, "error": ...}
_lock = threading.Lock()


def analysis_dir(config: dict, root: Path) -> Path | None:
    """ANALYSIS from the config, else ROOT/analysis when it holds an analysis."""
    if config.get("ANALYSIS"):
        path = Path(config["ANALYSIS"])
        if not (path / "analysis.json").is_file():
            raise UserError(f"--analysis {path}: no analysis.json there (make one with analyze_heads.py)")
        return path
    default = root / "analysis"
    return default if (default / "analysis.json").is_file() else None


def loaded():
    """(Dataset, analysis.json, table) loaded once per app; ApiError 404 when there is none."""
    ext = current_app.extensions
    with _lock:
        if "analysis" not in ext:
            path = ext.get("analysis_dir")
            if path is None:
                raise ApiError("no head analysis for this runs root: run analyze_heads.py --runs ROOT "
                               "(writes ROOT/analysis) or start the viewer with --analysis DIR", 404)
            try:
                ds, result = head_report.load(path)
            except UserError as e:
                raise ApiError(str(e), 404) from None
            ext["analysis"] = (ds, result, ds.head_table(), _boxes(result))
    return ext["analysis"]


def _boxes(result) -> dict | None:
    """The analysis' COCO boxes, if its annotation file is still there (drawn on the examples)."""
    ann = result["inputs"].get("annotations")
    try:
        return pope.load_boxes(ann["path"]) if ann else None
    except UserError:
        return None


def example_boxes(name: str, boxes) -> list:
    """The boxes the analysis scored run ``name`` against (analysis.scored_boxes: a POPE question's
    object, every annotated box of an absent object's or a batch run's image), as fractions
    [x, y, w, h] of the image's width and height. NotFound (404) for a run the served root lacks."""
    try:
        run = current_app.extensions["runs"].run(name)
    except UserError:
        return []
    _, scored = an.scored_boxes(an.run_boxes(run, boxes), run.meta.get("pope"))
    if not scored:
        return []
    w, h = run.image_size()
    return [[x / w, y / h, bw / w, bh / h] for x, y, bw, bh in scored]


@bp.errorhandler(NotFound)
def _not_found(e):
    """A run of the analysis that the served root lacks (deleted since, or another root): 404 JSON."""
    made_for = Path(current_app.extensions["analysis"][1]["inputs"]["root"]).resolve()
    served = current_app.extensions["runs"].root
    hint = "" if made_for == served else f" (the analysis was made for {made_for}; this server shows {served})"
    return jsonify(success=False, error=f"{e}{hint}"), 404


@bp.get("/dataset")
def page():
    return render_template("dataset.html")


@bp.get("/api/dataset")
def summary():
    ds, result, _, _ = loaded()
    served = current_app.extensions["runs"].root
    return jsonify(success=True, inputs=result["inputs"], params=result["params"], shape=list(ds.shape),
                   several=several_skipped(result["inputs"]),
                   scores={k: {"label": label, "higher_is_better": high} for k, (label, high) in an.SCORES.items()},
                   table=result["table"], lens=result.get("lens"),
                   same_root=Path(result["inputs"]["root"]).resolve() == served)


def several_skipped(inputs: dict) -> dict:
    """The runs the analysis skipped for holding several images or a video in one prompt: ``count``
    (all of them; an older analysis.json: those among its first 50 reasons), ``runs`` (the names it
    lists) and the page's ``line``."""
    runs = an.skipped_several(inputs.get("skipped") or {})
    n = inputs.get("runs_skipped_several", len(runs))
    line = (f"{n} run{'s' if n != 1 else ''} skipped: {an.SEVERAL_SKIPPED} (open them one by one)" if n else None)
    return {"count": n, "runs": runs, "line": line}


@bp.get("/api/dataset/head")
def head():
    ds, _, table, boxes = loaded()
    args = request.args
    layer, h = as_int(args.get("layer"), "layer"), as_int(args.get("head"), "head")
    if not (0 <= layer < ds.shape[0] and 0 <= h < ds.shape[1]):
        raise ApiError(f"no head L{layer} H{h}: the analysis has {ds.shape[0]} layers x {ds.shape[1]} heads", 404)
    score = args.get("score", "se")
    if score not in an.SCORES:
        raise ApiError(f"score must be one of {', '.join(an.SCORES)}, got {score!r}")
    n = min(max(as_int(args.get("n", 4), "n"), 1), 24)
    ex = ds.examples(layer, h, score, n)
    for e in ex["best"] + ex["worst"]:
        e["boxes"] = example_boxes(e["run"], boxes)
    values = {k: head_report.number(v[layer, h]) for k, v in table.items()}
    return jsonify(success=True, layer=layer, head=h, values=values, **ex)
