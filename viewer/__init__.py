"""The attention viewer: a Flask application factory with one blueprint per concern."""
from __future__ import annotations

import logging
from pathlib import Path

from flask import Flask, jsonify, request
from werkzeug.exceptions import HTTPException

from smolattn.errors import UserError

from .runs import RUN_MARKER, Registry

ROOT = Path(__file__).resolve().parent.parent
log = logging.getLogger(__name__)
MAX_BODY = 64 * 1024    # bytes; a larger request body is refused (413)


def create_app(config: dict) -> Flask:
    """``config``: RUN (one run directory) or RUNS (a root holding runs), ALLOW_PICKLE, CACHE_MB (layers
    and summaries), CACHE_DIR (summaries computed for runs that have none; default ~/.cache/smolattn or
    $SMOLATTN_CACHE), ANALYSIS (a head analysis folder for the dataset page; default ROOT/analysis when
    it holds one), and any Flask setting. Raises UserError when the run or root cannot be served."""
    app = Flask(__name__, template_folder=str(ROOT / "templates"), static_folder=str(ROOT / "static"))
    app.config.update(ALLOW_PICKLE=False, CACHE_MB=512, CACHE_DIR=None,
                      MAX_CONTENT_LENGTH=MAX_BODY)   # the API's POST bodies are a few small JSON fields
    app.config.update(config)
    app.json.sort_keys = False     # answers keep the order they are built in; sorting a 64-frame run's
    #                                5,000-token table costs a third of its /api/initialize
    if app.config.get("RUN") and app.config.get("RUNS"):
        raise UserError("give either a run directory or a runs root, not both")
    if float(app.config["CACHE_MB"]) <= 0:
        raise UserError("the cache size must be positive")
    root = Path(app.config.get("RUNS") or app.config.get("RUN") or ".")
    single = not app.config.get("RUNS") or (root / RUN_MARKER).is_file()
    if single and not (root / RUN_MARKER).is_file():
        raise UserError(f"{root.resolve()} is not a run directory (no {RUN_MARKER}); "
                        "pass --run DIR or --runs ROOT")
    registry = Registry(root, single, bool(app.config["ALLOW_PICKLE"]), float(app.config["CACHE_MB"]) * 1e6,
                        app.config["CACHE_DIR"])
    if single:
        registry.run(registry.single_name)  # fail now, with one clear line, if the run is unreadable
    app.extensions["runs"] = registry

    from . import api, dataset, export, interventions, pages
    app.extensions["analysis_dir"] = dataset.analysis_dir(app.config, registry.root)
    app.register_blueprint(api.bp)
    app.register_blueprint(pages.bp)
    app.register_blueprint(dataset.bp)
    app.register_blueprint(interventions.bp)
    app.register_blueprint(export.bp)
    if app.config.get("LIVE") is not None:     # live mode (app.py --model-id): viewer/live.py, else no such routes
        from . import live
        app.extensions["live"] = app.config["LIVE"]
        app.register_blueprint(live.bp)

    @app.errorhandler(HTTPException)
    def http_error(e):
        if request.path.startswith("/api/"):
            return jsonify(success=False, error=f"{e.name}: {e.description}"), e.code
        return e

    @app.errorhandler(Exception)
    def internal_error(e):
        log.exception("unexpected error on %s", request.path)
        return jsonify(success=False, error=f"internal error: {type(e).__name__}: {e}"), 500

    @app.after_request
    def security_headers(resp):
        resp.headers.setdefault("Content-Security-Policy", "default-src 'self'; img-src 'self' data: blob:")
        resp.headers.setdefault("X-Content-Type-Options", "nosniff")
        return resp

    return app
