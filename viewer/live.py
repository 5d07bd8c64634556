"""Live mode (issue 20): ``python app.py --runs ROOT --model-id ID`` loads the model once in one worker
process (viewer/jobs.py) and lets the page ask new questions and rerun a run under an intervention.

Registered only with a model: without ``--model-id`` none of these routes exist (404). Every input is
checked here, whatever the page sent. Live routes take same-origin requests only: the Host header must
name the address the server is bound to (no DNS rebinding), a POST must carry the per-server token that
the pages embed (X-Live-Token) and, when the browser sends one, an Origin of this server.
"""
from __future__ import annotations

import hmac
import io
import ipaddress
import json
import os
import re
import time
from pathlib import Path
from urllib.parse import urlencode

from flask import Blueprint, Response, current_app, jsonify, render_template, request, stream_with_context
from werkzeug.exceptions import RequestEntityTooLarge

from smolattn import methods as mth
from smolattn.errors import UserError

from .api import ApiError, _api_error, _not_found, registry
from .runs import NotFound

bp = Blueprint("live", __name__)
bp.register_error_handler(ApiError, _api_error)
bp.register_error_handler(NotFound, _not_found)

LIVE_DIR = "live"                     # ROOT/live/<time>-<image>: the runs asked in the browser
UPLOAD_DIR = ".uploads"               # ROOT/live/.uploads: uploaded images (a dot folder: never served)
UPLOAD_MAX_BYTES = 20 << 20           # 20 MiB per upload ...
REQUEST_MAX_BYTES = UPLOAD_MAX_BYTES + (256 << 10)   # ... and the request limit just above it
UPLOAD_MAX_PIXELS = 40_000_000        # 40 megapixels
UPLOAD_FORMATS = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "BMP": ".bmp", "TIFF": ".tif", "GIF": ".gif"}
MAX_PROMPT_CHARS = 2000
MAX_NEW_TOKENS = 512
DEFAULT_NEW_TOKENS = 64
MAX_TOP_HEADS = 64
MAX_WINDOW = 64
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
KNOCKOUT_FROM = ("last", "question", "answer", "text")
KNOCKOUT_TO = ("image", "box", "outside", "question")
SWEEP_FROM = ("last", "question", "text")
TOKEN_HEADER = "X-Live-Token"


def live():
    return current_app.extensions["live"]


# -- app.py ---------------------------------------------------------------------------------------
def add_arguments(p) -> None:
    from smolattn.model import DTYPES
    g = p.add_argument_group("live mode (ask new questions and intervene in the browser)")
    g.add_argument("--model-id", default=None, help="load this model (hub id or local directory, as the scripts) "
                   "once, in a worker process, and turn the viewer live (needs --runs ROOT; runs go to ROOT/live/)")
    g.add_argument("--revision", default=None, help="hub revision of --model-id")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    g.add_argument("--dtype", choices=DTYPES, default=None, help="default: float32 on CPU, bfloat16 on GPU")
    g.add_argument("--allow-remote-model", action="store_true",
                   help="allow live mode on a --host other than this machine: anyone who reaches the port can run "
                        "the model")


def start(args):
    """The live worker for app.py's arguments (None without --model-id), the model loaded; one-line
    errors for a bad combination, before anything loads."""
    if not args.model_id:
        for flag in ("revision", "device", "dtype"):
            if getattr(args, flag):
                raise UserError(f"--{flag} goes with --model-id (live mode)")
        return None
    if not args.runs:
        raise UserError("live mode (--model-id) needs --runs ROOT: asked runs are written under ROOT/live/")
    if args.host not in LOOPBACK and not args.allow_remote_model:
        raise UserError(f"--model-id with --host {args.host}: anyone who reaches that port could run the model; "
                        "add --allow-remote-model if that is what you want, or bind 127.0.0.1")
    root = Path(args.runs)
    if (root / "decoded_tokens.npy").is_file():
        raise UserError(f"{root} is itself a run; live mode needs a runs root (a folder that holds runs)")
    from smolattn.extract import check_writable
    check_writable(root / LIVE_DIR)
    from .jobs import Live
    worker = Live({"id": args.model_id, "revision": args.revision, "device": args.device, "dtype": args.dtype})
    if args.host not in LOOPBACK:
        print(f"WARNING: live mode on {args.host}: anyone who can reach port {args.port} can run the model "
              "and write runs under the root")
    print(f"Loading {args.model_id} in the live worker ({worker.threads} torch threads)…", flush=True)
    try:
        info = worker.wait_ready()
    except BaseException:
        worker.close()
        raise
    print(f"Live: {info['model']} on {info['device']} ({info['dtype']})"
          + (" [STAND-IN MODEL, random weights]" if info["standin"] else "") + f", loaded in {info['load_s']}s")
    return worker


# -- same origin ------------------------------------------------------------------------------------
def _split_host(host: str) -> tuple[str, str | None]:
    host = host.strip().lower()
    m = re.fullmatch(r"\[([0-9a-f:.]+)\](?::(\d+))?|([^:\[\]]+)(?::(\d+))?", host)
    if not m:
        return host, None
    return (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))


def host_ok(environ, host_header: str | None) -> bool:
    """The Host header names the address the server is bound to (SERVER_NAME / SERVER_PORT): for a
    loopback bind any loopback name, for a wildcard bind (0.0.0.0, ::) an IP literal; never a DNS name
    of someone else's (DNS rebinding)."""
    if not host_header:
        return False
    name, port = _split_host(host_header)
    bound, bound_port = str(environ.get("SERVER_NAME", "")).strip("[]").lower(), str(environ.get("SERVER_PORT", ""))
    default = "443" if environ.get("wsgi.url_scheme") == "https" else "80"
    if (port or default) != bound_port:
        return False
    if bound in LOOPBACK:
        return name in LOOPBACK
    if bound in ("0.0.0.0", "::", ""):
        if name in LOOPBACK:
            return True
        try:
            ipaddress.ip_address(name)
            return True
        except ValueError:
            return False
    return name == bound


@bp.before_request
def same_origin():
    if not host_ok(request.environ, request.headers.get("Host")):
        raise ApiError(f"refused: the Host header {request.headers.get('Host')!r} is not this server's address "
                       "(live routes answer same-origin requests only)", 403)
    if request.method == "POST":
        origin = request.headers.get("Origin")
        if origin is not None and origin.lower() != f"{request.scheme}://{request.host}".lower():
            raise ApiError(f"refused: a request from another origin ({origin})", 403)
        if request.headers.get("Sec-Fetch-Site") in ("cross-site", "same-site"):
            raise ApiError("refused: a cross-site request", 403)
        sent = request.headers.get(TOKEN_HEADER, "")
        if not hmac.compare_digest(sent.encode(), live().token.encode()):
            raise ApiError(f"refused: this request does not carry the page's token ({TOKEN_HEADER}); reload the page", 403)
        request.max_content_length = REQUEST_MAX_BYTES


@bp.app_context_processor
def page_token():
    """Every page gets the live flag and, for a same-origin Host only, the POST token."""
    ok = host_ok(request.environ, request.headers.get("Host"))
    return {"live": True, "live_token": live().token if ok else ""}


@bp.errorhandler(RequestEntityTooLarge)
def too_large(e):
    return jsonify(success=False, error=f"the request is larger than the server's limit of {size_words(REQUEST_MAX_BYTES)} "
                   f"(uploads: {size_words(UPLOAD_MAX_BYTES)})"), 413


# -- checking what the page sent --------------------------------------------------------------------
def as_int(value, name: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, str) and re.fullmatch(r"\s*-?\d{1,9}\s*", value))):
        raise ApiError(f"{name} must be an integer, got {value!r}")
    x = int(value)
    if not lo <= x <= hi:
        raise ApiError(f"{name} must be between {lo} and {hi}, got {x}")
    return x


def as_number(value, name: str) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ApiError(f"{name} must be a number, got {value!r}") from None
    if x != x or x in (float("inf"), float("-inf")):
        raise ApiError(f"{name} must be finite")
    return x


def check_prompt(value) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ApiError("the prompt is empty")
    if len(value) > MAX_PROMPT_CHARS:
        raise ApiError(f"the prompt is {len(value)} characters; the limit is {MAX_PROMPT_CHARS}")
    if "\0" in value or "<image>" in value:
        raise ApiError("the prompt may not contain NUL or the <image> placeholder")
    return value


def check_methods(value) -> list[str]:
    names = value if isinstance(value, list) else str(value or mth.RAW).split(",")
    try:
        return mth.parse(",".join(str(n) for n in names))
    except UserError as e:
        raise ApiError(str(e)) from None


def safe_stem(name: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9_-]+", "-", Path(name or "image").stem).strip("-_")[:40]
    return stem or "image"


def new_run_dir(root: Path, stem: str) -> Path:
    """ROOT/live/<UTC time>-<image stem>, a name no run or queued job has."""
    base = f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{stem}"
    taken = live().reserved()
    for k in range(1, 1000):
        out = root / LIVE_DIR / (base if k == 1 else f"{base}-{k}")
        if not os.path.lexists(out) and str(out) not in taken:
            return out
    raise ApiError("too many runs asked this second; try again")


def size_words(n: int) -> str:
    return f"{n / (1 << 20):g} MiB" if n >= 1 << 20 else f"{n / 1024:g} KiB"


def read_upload(storage) -> tuple[bytes, str]:
    """(bytes, extension) of an uploaded image: size, format and pixel count checked (header only)."""
    from PIL import Image, UnidentifiedImageError

    data = storage.stream.read(UPLOAD_MAX_BYTES + 1)
    if len(data) > UPLOAD_MAX_BYTES:
        raise ApiError(f"the upload is larger than the limit of {size_words(UPLOAD_MAX_BYTES)}", 413)
    if not data:
        raise ApiError("the upload is empty")
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt, (w, h) = im.format, im.size
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        raise ApiError(f"{storage.filename or 'the upload'} is not an image (formats: "
                       f"{', '.join(sorted(UPLOAD_FORMATS))})") from None
    if fmt not in UPLOAD_FORMATS:
        raise ApiError(f"{storage.filename or 'the upload'} is a {fmt} image; formats: {', '.join(sorted(UPLOAD_FORMATS))}")
    if w * h > UPLOAD_MAX_PIXELS:
        raise ApiError(f"the image is {w}x{h} = {w * h / 1e6:.1f} megapixels; the limit is {UPLOAD_MAX_PIXELS / 1e6:.0f}")
    return data, UPLOAD_FORMATS[fmt]


def save_upload(root: Path, data: bytes, stem: str, ext: str) -> Path:
    """Write the upload under ROOT/live/.uploads atomically (temporary name, fsync, rename), then
    decode it fully as the scripts do (a truncated file is refused here, and removed)."""
    from smolattn.images import open_image

    folder = root / LIVE_DIR / UPLOAD_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{os.urandom(3).hex()}-{stem}{ext}"
    tmp = folder / f".{path.name}.tmp-{os.getpid()}"
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, path)
        open_image(path)
    except UserError as e:
        path.unlink(missing_ok=True)
        raise ApiError(str(e).replace(str(path), "the upload")) from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


def run_name(path) -> str:
    return Path(path).resolve().relative_to(registry().root).as_posix()


def model_matches(meta: dict) -> bool:
    info = live().info or {}
    want = str((meta.get("model") or {}).get("id", ""))
    if not want:
        return False
    if want == info.get("model"):
        return True
    try:
        return Path(want).expanduser().resolve() == Path(info.get("source") or "").resolve()
    except (OSError, ValueError):
        return False


# -- routes -----------------------------------------------------------------------------------------
@bp.get("/live")
def page():
    return render_template("live.html")


@bp.get("/api/live/status")
def status():
    snap = live().snapshot()
    return jsonify(success=True, **snap, limits={
        "upload_bytes": UPLOAD_MAX_BYTES, "request_bytes": REQUEST_MAX_BYTES, "upload_pixels": UPLOAD_MAX_PIXELS,
        "formats": sorted(UPLOAD_FORMATS), "prompt_chars": MAX_PROMPT_CHARS, "max_new_tokens": MAX_NEW_TOKENS,
        "default_new_tokens": DEFAULT_NEW_TOKENS}, methods=list(mth.names()),
        analysis=bool(current_app.extensions.get("analysis_dir")))


@bp.get("/api/live/images")
def images():
    """Runs under the root (by name, at most 200; ``q`` filters), to ask about their stored image again."""
    reg = registry()
    q = str(request.args.get("q", "")).lower()
    out = []
    for name in reg.names():
        if q and q not in name.lower():
            continue
        out.append(name)
        if len(out) >= 200:
            break
    return jsonify(success=True, images=[{"run": n, "url": f"/api/image?{urlencode({'run': n})}"} for n in out])


@bp.get("/api/live/events")
def events():
    """Server-sent events: the whole queue (state, jobs with progress) on every change."""
    w = live()
    since = request.args.get("since", "-1")
    version = int(since) if re.fullmatch(r"-?\d{1,12}", since) else -1

    @stream_with_context
    def stream():
        v = version
        while True:
            snap = w.wait_change(v, 15.0)
            if snap["closed"]:
                return
            if snap["version"] == v:
                yield ": keep-alive\n\n"
                continue
            v = snap["version"]
            yield f"data: {json.dumps(snap)}\n\n"

    return Response(stream(), mimetype="text/event-stream", headers={"Cache-Control": "no-store",
                                                                     "X-Accel-Buffering": "no"})


@bp.post("/api/live/ask")
def ask():
    reg = registry()
    form = request.form
    prompt = check_prompt(form.get("prompt"))
    new_tokens = as_int(form.get("max_new_tokens", DEFAULT_NEW_TOKENS), "max_new_tokens", 1, MAX_NEW_TOKENS)
    methods = check_methods(form.get("methods", mth.RAW))
    upload = request.files.get("image")
    cleanup = []
    if upload is not None and upload.filename:
        data, ext = read_upload(upload)
        stem = safe_stem(upload.filename)
        image = save_upload(reg.root, data, stem, ext)
        cleanup.append(str(image))
        label = upload.filename
    elif form.get("image_run"):
        name = form.get("image_run")
        run = reg.run(name)           # NotFound (404) for a name outside the root
        path = run.image_path()
        if path is None or not reg.inside(path):
            raise ApiError(f"run {name!r} holds no image")
        image, label = path, f"{name} (its image)"
        stem = safe_stem(Path(name).name)
    else:
        raise ApiError("choose an image: upload one or pick a run's image")
    try:
        out = new_run_dir(reg.root, stem)
        job = live().submit("ask", f"{label}: {prompt[:80]}", {
            "image": str(image), "prompt": prompt, "max_new_tokens": new_tokens, "methods": methods,
            "store": "compact", "out": str(out), "name": run_name(out)}, cleanup=cleanup)
    except (UserError, ApiError) as e:   # not queued: the upload we saved goes, the page gets one line
        for f in cleanup:
            Path(f).unlink(missing_ok=True)
        raise e if isinstance(e, ApiError) else ApiError(str(e), 503)
    return jsonify(success=True, job=job.id, run=run_name(out))


@bp.post("/api/live/cancel")
def cancel():
    body = request.get_json(silent=True)
    job_id = body.get("job") if isinstance(body, dict) else None
    if not isinstance(job_id, str):
        raise ApiError("parameter 'job' is required")
    try:
        job = live().cancel(job_id)
    except KeyError:
        raise NotFound(f"unknown job {job_id!r}") from None
    return jsonify(success=True, job=job.id, status=job.status)


# -- interventions (issue 18's core, run in the worker) ----------------------------------------------
def intervention_base(body: dict):
    """(name, run) of the run to rerun under an intervention: a run of ours, made with the loaded model."""
    if not isinstance(body, dict):
        raise ApiError("the request body must be a JSON object")
    name = body.get("run")
    if not isinstance(name, str) or not name:
        raise ApiError("parameter 'run' is required")
    run = registry().run(name)                     # NotFound (404) outside the root
    meta = run.meta
    if not meta or "token_ids" not in meta:
        raise ApiError(f"run {name!r} records no configuration to rerun (a reference-format run?)")
    if isinstance(meta.get("intervention"), dict):
        raise ApiError(f"run {name!r} is itself an intervened run; intervene on its base run")
    if not model_matches(meta):
        raise ApiError(f"run {name!r} was made with {(meta.get('model') or {}).get('id')!r}; this server has "
                       f"{(live().info or {}).get('model')!r} loaded")
    return name, run


def layer_span(value, name: str, num_layers: int) -> tuple[int, int]:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise ApiError(f"{name} must be [first, last]")
    lo, hi = (as_int(v, name, 0, num_layers - 1) for v in value)
    if lo > hi:
        raise ApiError(f"{name}: the first layer {lo} is after the last {hi}")
    return lo, hi


def box_words(value, size) -> str:
    """box [x0, y0, x1, y1] in the original image's pixels, inside the image, non-empty -> 'x0,y0,x1,y1'."""
    if not isinstance(value, (list, tuple)) or len(value) != 4:
        raise ApiError("box must be [x0, y0, x1, y1] (pixels of the original image)")
    x0, y0, x1, y1 = (as_number(v, "box") for v in value)
    w, h = size
    if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
        raise ApiError(f"the box {[round(v, 1) for v in (x0, y0, x1, y1)]} is not inside the {w}x{h} image "
                       "(x0 < x1, y0 < y1)")
    return ",".join(f"{v:g}" for v in (round(x0), round(y0), round(x1), round(y1)))


def target_words(kind, box, run, image=None) -> str:
    """intervene.py's --to word. ``image``: which image (or frame) of a several-image or video run
    (``image:K`` / ``frame:K``, ``box:K:...``); required for a box there, refused on a one-image run."""
    if kind not in KNOCKOUT_TO:
        raise ApiError(f"to must be one of {', '.join(KNOCKOUT_TO)}, got {kind!r}")
    n, video = len(run.layout), run.layout.is_video
    if image is None:
        if n > 1 and kind in ("box", "outside"):
            raise ApiError(f"this run has {n} {'frames' if video else 'images'}: say which the box is in (image, "
                           f"0..{n - 1})")
        return f"{kind}:{box_words(box, run.image_size())}" if kind in ("box", "outside") else kind
    if n == 1:
        raise ApiError("image goes with runs of several images or a video")
    k = as_int(image, "image", 0, n - 1)
    if kind in ("box", "outside"):
        return f"{kind}:{k}:{box_words(box, run.image_size(k))}"
    if kind == "image":
        return f"{'frame' if video else 'image'}:{k}"
    raise ApiError(f"image goes with to image, box or outside, not {kind!r}")


def submit_intervention(kind: str, name: str, run, argv: list[str], label: str):
    """Queue the core's intervene/sweep for ``argv`` (intervene.py's words) into <run>.<slug>."""
    import argparse

    try:
        from smolattn import interventions as iv
    except ImportError:
        raise ApiError("this checkout has no interventions core (smolattn/interventions.py)", 501) from None
    ap = argparse.ArgumentParser(add_help=False)
    iv.add_arguments(ap)
    out = run.path.parent / f"{run.path.name}.{iv.slug(ap.parse_args(['--run', str(run.path)] + argv))}"
    if str(out) in live().reserved():
        raise ApiError("this intervention of this run is queued already")
    argv = ["--run", str(run.path), "--output-dir", str(out)] + argv
    job = live().submit(kind, f"{name}: {label}", {"argv": argv, "out": str(out), "name": run_name(out)})
    return jsonify(success=True, job=job.id, target=run_name(out), argv=argv)


@bp.post("/api/live/intervene")
def intervene():
    """Rerun a run's configuration under heads ablated, a knockout and/or image blocked from a layer;
    the result is <run>.<slug> with effects.json, opened with "compare with base"."""
    body = request.get_json(silent=True)
    name, run = intervention_base(body)
    L, H = run.num_layers, run.num_heads
    argv, words = [], []
    heads, top = body.get("heads"), body.get("top")
    if heads and top:
        raise ApiError("give heads or top, not both")
    if heads:
        if not isinstance(heads, list) or len(heads) > L * H:
            raise ApiError("heads must be a list of [layer, head] pairs")
        if not all(isinstance(p, (list, tuple)) and len(p) == 2 for p in heads):
            raise ApiError("heads must be a list of [layer, head] pairs")
        pairs = sorted({(as_int(a, "layer", 0, L - 1), as_int(b, "head", 0, H - 1)) for a, b in heads})
        argv += ["--ablate-heads", ",".join(f"{a}:{b}" for a, b in pairs)]
        words.append(f"{len(pairs)} head(s) off")
    elif top:
        analysis = current_app.extensions.get("analysis_dir")
        if not analysis:
            raise ApiError("top N needs a head analysis (start the viewer with --analysis DIR)")
        n = as_int(top, "top", 1, min(MAX_TOP_HEADS, L * H))
        argv += ["--ablate-heads", f"top:{n}", "--analysis", str(analysis)]
        words.append(f"top {n} localisation heads off")
    if argv:
        ablation = body.get("ablation", "zero")
        if ablation not in ("zero", "mean"):
            raise ApiError(f"ablation must be zero or mean, got {ablation!r}")
        argv += ["--ablation", ablation]
    ko = body.get("knockout")
    if ko:
        if not isinstance(ko, dict):
            raise ApiError("knockout must be an object {from, to, box, image, layers}")
        frm = ko.get("from")
        if frm not in KNOCKOUT_FROM:
            raise ApiError(f"knockout from must be one of {', '.join(KNOCKOUT_FROM)}, got {frm!r}")
        to = target_words(ko.get("to"), ko.get("box"), run, ko.get("image"))
        lo, hi = layer_span(ko.get("layers"), "knockout layers", L)
        argv += ["--knockout", "--from", frm, "--to", to, "--layers", f"{lo}-{hi}"]
        words.append(f"knockout {frm} → {to} layers {lo}-{hi}")
    if body.get("block_from") is not None:
        b = as_int(body["block_from"], "block_from", 0, L - 1)
        argv += ["--block-image-from", str(b)]
        words.append(f"image blocked from layer {b}")
    if not words:
        raise ApiError("choose an intervention: heads to switch off, a box to knock out, or a layer to block the image from")
    return submit_intervention("intervene", name, run, argv, " + ".join(words))


@bp.post("/api/live/sweep")
def sweep():
    """The layer-window knockout sweep of a run (for its first answer token): a sweep folder."""
    body = request.get_json(silent=True)
    name, run = intervention_base(body)
    frm = body.get("from", "last")
    if frm not in SWEEP_FROM:
        raise ApiError(f"sweep from must be one of {', '.join(SWEEP_FROM)}, got {frm!r}")
    to = target_words(body.get("to", "image"), body.get("box"), run, body.get("image"))
    window = as_int(body.get("window", 9), "window", 1, min(MAX_WINDOW, run.num_layers))
    argv = ["--sweep", "--from", frm, "--to", to, "--window", str(window)]
    return submit_intervention("sweep", name, run, argv, f"sweep {frm} → {to}, window {window}")
