"""One run as one self-contained HTML file: the viewer's own page, its code, the image and the attention
rows, which opens from a file with no server (``smolattn-view --export RUN out.html``; the page's
"Export HTML" button downloads the same file from /export).

The page is the viewer's template and static/js/app.js unchanged; static/js/offline.js answers the
few /api/* requests the page makes (runs, initialize, attention, text_attention, reverse) in the
browser from the embedded data, as viewer/api.py does on the server. Embedded: the kept rows (every
query outside the image block, the rows the viewer serves) over all keys, image and text, for every
layer and head, as 8-bit codes with one scale per row, exactly as the ``compact8`` store
(|error| <= row max / 510; a compact8 run's values are embedded exactly), plus each stored method's
maps at 8 bits over each row's range. The codes are delta-coded along the rows (consecutive queries
attend alike) and deflated: the browser inflates them with DecompressionStream.
"""
from __future__ import annotations

import base64
import io
import json
import re
import zlib
from pathlib import Path

import numpy as np
from flask import Blueprint, Response, current_app, request
from PIL import Image

from smolattn import outputs, store
from smolattn.errors import UserError

from .runs import text_rows

bp = Blueprint("export", __name__)
FORMAT = "smolattn-export"
VERSION = 1
IMAGE_MAX_SIDE = 1024           # as the viewer's PNG renders (api.PNG_MAX_SIDE)
IMAGE_KEEP_BYTES = 1_500_000    # a smaller image file is embedded as it is
MAX_ROW_BYTES = 32_000_000      # several images / a video: the rows' 8-bit codes the page may hold (a 16-frame run: ~12.5 MB)
PRECISION = ("8-bit codes with one scale per row, as the compact8 store: |error| <= row max / 510 "
             "(a compact8 run's values exactly); method maps: 8 bits over each row's min..max")
GENERATOR = f'<meta name="generator" content="{FORMAT}">'
MARKER = outputs.LastLine(f"<!-- {FORMAT} -->")     # the file's last line: ours (replaced), never a user's
MIME = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}   # embedded as they are


class TooLarge(UserError):
    """A run whose rows would make the page too large (availability)."""


class Blob:
    """Arrays packed one after another (4-byte aligned) with a manifest the page reads them by."""

    def __init__(self):
        self.parts, self.size, self.manifest = [], 0, {}

    def _put(self, name: str, a: np.ndarray, **extra) -> None:
        a = np.ascontiguousarray(a)
        pad = -self.size % 4
        if pad:
            self.parts.append(b"\0" * pad)
            self.size += pad
        self.manifest[name] = {"dtype": {"u1": "uint8", "u4": "uint32", "f4": "float32"}[a.dtype.str[1:]],
                               "shape": list(a.shape), "offset": self.size, **extra}
        self.parts.append(a.tobytes())
        self.size += a.nbytes

    def add(self, name: str, a: np.ndarray) -> None:
        self._put(name, a)

    def add_rows(self, name: str, codes: np.ndarray, scale: np.ndarray) -> None:
        """uint8 codes (..., Q, K) whose rows have scales (..., Q): each row is stored as its difference
        (mod 256) from a prediction, the row before rescaled to this row's scale, in integer
        arithmetic the page repeats exactly (``name``_ratio: 16.16 fixed point, capped)."""
        s = scale.astype(np.float64).reshape(-1, scale.shape[-1])                # (A, Q)
        ratio = np.zeros(s.shape, np.int64)
        ratio[:, 1:] = np.where(s[:, 1:] > 0, np.minimum(np.rint(s[:, :-1] / np.where(s[:, 1:] > 0, s[:, 1:], 1)
                                                                 * 65536), RATIO_CAP), 0)
        flat = codes.reshape(-1, *codes.shape[-2:])                                # (A, Q, K)
        out = np.empty(flat.shape, np.uint8)
        for a in range(len(flat)):            # one (layer, head) at a time: small temporaries
            c = flat[a].astype(np.int64)
            pred = np.zeros_like(c)
            pred[1:] = np.minimum(255, (c[:-1] * ratio[a, 1:, None] + 32768) >> 16)
            out[a] = (c - pred) & 255
        self._put(name, out.reshape(codes.shape), predict=f"{name}_ratio")
        ratio = ratio.reshape(scale.shape)
        self._put(f"{name}_ratio", ratio.astype(np.uint32))

    def encoded(self) -> tuple[str, int]:
        """(the deflated arrays in base 85, their length in bytes)."""
        packed = zlib.compress(b"".join(self.parts), 9)
        return b85(packed), len(packed)


RATIO_CAP = 1 << 24       # code x ratio stays below 2**32: exact in the page's float64 arithmetic
# base 85 with printable ASCII but '<', '\\', '"', '\'', '&' and four more: never '</script' inside a script
B85 = "".join(c for c in map(chr, range(0x21, 0x7F)) if c not in "<\\\"'&`^|~")
assert len(B85) == 85


def b85(data: bytes) -> str:
    """4 bytes -> 5 characters (base64 takes 5.33): big-endian, the last group zero-padded; the page
    cuts the padding using the deflated length it is given."""
    pad = -len(data) % 4
    words = np.frombuffer(data + b"\0" * pad, dtype=">u4").astype(np.int64)
    digits = np.empty((len(words), 5), np.uint8)
    for i in range(4, -1, -1):
        words, digits[:, i] = np.divmod(words, 85)
    return np.frombuffer(B85.encode("ascii"), np.uint8)[digits].tobytes().decode("ascii")


def quantize_range(x: np.ndarray):
    """uint8 codes over each row's min..max (method maps need not start at 0): codes, lo, hi."""
    x = np.asarray(x, dtype=np.float32)
    lo, hi = x.min(axis=-1), x.max(axis=-1)
    span = np.where(hi > lo, hi - lo, 1.0)[..., None]
    return np.rint((x - lo[..., None]) / span * 255).astype(np.uint8), lo.astype(np.float32), hi.astype(np.float32)


def row_bytes(run) -> int:
    """What the page would hold for the run's rows: one byte per layer, head, kept row and key
    (every image's keys and the text keys), as embedded (before deflating)."""
    return (run.num_layers * run.num_heads * len(text_rows(run).positions)
            * (run.layout.num_keys + len(run.text_key_positions)))


def availability(run) -> dict:
    """Whether the run can be exported (``ok``), the rows' bytes in the page, and why not (``reason``,
    one line): a run of several images or a video whose rows pass MAX_ROW_BYTES (a long video) is
    refused before any work. A one-image run always exports, as before the limit (a real-shape run
    with 128 answer tokens holds ~38 MB of rows)."""
    n = row_bytes(run)
    if n <= MAX_ROW_BYTES or len(run.layout) == 1:
        return {"ok": True, "bytes": n, "reason": None}
    what = f"{len(run.layout)} frames" if run.layout.is_video else f"{len(run.layout)} image(s)"
    return {"ok": False, "bytes": n, "reason": (
        f"too large to export as one HTML file: its rows ({what}, {run.layout.num_keys} image keys) would take "
        f"{n / 1e6:.1f} MB in the page, over the {MAX_ROW_BYTES / 1e6:.1f} MB limit; open it with the viewer server")}


def image_data_url(run, k: int | None = None) -> str | None:
    """The run's image (image or frame ``k`` of several) as a data: URL, typed by its content (not
    its name); large files are re-encoded at the viewer's display size. None when the run has no
    readable image."""
    path = run.image_path(k)
    if path is None:
        return None
    data = path.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as im:
            mime = MIME.get(im.format)
            w, h = im.size
            if mime is None or len(data) > IMAGE_KEEP_BYTES or max(w, h) > IMAGE_MAX_SIDE:
                scale = min(1.0, IMAGE_MAX_SIDE / max(w, h))
                buf = io.BytesIO()
                im.convert("RGB").resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.LANCZOS) \
                    .save(buf, "JPEG", quality=90)
                data, mime = buf.getvalue(), "image/jpeg"
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def call(app, endpoint: str, path: str, args: dict):
    """A route's JSON as the page would get it (its errors as one UserError line)."""
    with app.test_request_context(path, query_string=args):
        try:
            resp = current_app.make_response(app.view_functions[endpoint]())
        except Exception as e:  # noqa: BLE001 - ApiError, NotFound: the route's own message
            raise UserError(f"cannot export: {e}") from None
    return resp


def payload(app, name: str, start: str | None = None) -> tuple[dict, str]:
    """(the page's data, the encoded blob) for run ``name`` of ``app``'s registry; ``start``: the
    view the page opens at, as the viewer's URL query (token=...&layers=...), when its URL has none."""
    reg = app.extensions["runs"]
    run = reg.run(name)
    allowed = availability(run)
    if not allowed["ok"]:
        raise TooLarge(f"cannot export {name}: {allowed['reason']}")
    info = call(app, "api.initialize", "/api/initialize", {"run": name}).get_json()
    if len(run.layout) > 1:   # every image (frame) inlined; the page's image_url is the first one's (offline.js)
        for k, im in enumerate(info["images"]):
            im["url"] = image_data_url(run, k)
        info["image_url"] = None
    else:
        info["image_url"] = image_data_url(run)
    positions = text_rows(run).positions
    blob = Blob()
    L, H = run.num_layers, run.num_heads
    Q, K = len(positions), run.layout.num_keys
    image_q = np.empty((L, H, Q, K), np.uint8)
    image_s = np.empty((L, H, Q), np.float32)
    text_q = text_s = None
    for i in range(L):
        layer = reg.layer(name, run, i)                   # the kept rows, as the viewer serves them
        (image_q[i], image_s[i]), (tq, ts) = store.quantize(layer.image), store.quantize(layer.text)
        if text_q is None:
            text_q = np.empty((L, *tq.shape), np.uint8)
            text_s = np.empty((L, *ts.shape), np.float32)
        text_q[i], text_s[i] = tq, ts
    blob.add_rows("image_codes", image_q, image_s)
    blob.add("image_scale", image_s)
    blob.add_rows("text_codes", text_q, text_s)
    blob.add("text_scale", text_s)
    methods = {}
    for m in info["methods"]:
        if m["name"] == "raw" or not m["available"]:
            continue
        maps = run.method(m["name"])
        codes, lo, hi = quantize_range(maps.maps)          # (L', P, K)
        blob.add_rows(f"method_{m['name']}_codes", codes, np.ones_like(lo))    # plain differences
        blob.add(f"method_{m['name']}_lo", lo)
        blob.add(f"method_{m['name']}_hi", hi)
        methods[m["name"]] = {"axis": maps.meta.get("axis"), "positions": [int(p) for p in maps.positions],
                              "rows": m.get("rows")}
    g = info["geometry"]
    data = {
        "format": FORMAT, "version": VERSION, "run": name, "precision": PRECISION, "info": info,
        "entry": {"name": name, "answer": info["answer"], "grid": [g["rows"], g["cols"]], "error": None,
                  "image": None},
        "positions": [int(p) for p in positions],
        "text_keys": [int(p) for p in run.text_key_positions[:text_q.shape[-1]]],
        "shape": {"layers": L, "heads": H, "rows": Q, "image_keys": K, "text_keys": int(text_q.shape[-1])},
        "methods": methods, "arrays": blob.manifest, "alphabet": B85, "start": start or "",
    }
    text, data["packed_bytes"] = blob.encoded()
    return data, text


def script_json(data) -> str:
    """JSON safe inside a <script> element (no '</script>', no '<!--')."""
    return json.dumps(data, separators=(",", ":")).replace("<", "\\u003c").replace(">", "\\u003e") \
        .replace("&", "\\u0026")


def page(app) -> str:
    """The viewer's page as its route renders it."""
    with app.test_request_context("/"):
        return str(app.view_functions["pages.index"]())


def inline(app, html: str, data: dict, blob: str) -> str:
    """Every /static/ asset the page links, inlined; the offline API and the data before the first script."""
    static = Path(app.static_folder)
    prefix = app.static_url_path.rstrip("/") + "/"

    def read(url: str) -> str:
        path = (static / url[len(prefix):]).resolve()
        if not path.is_relative_to(static.resolve()) or not path.is_file():
            raise UserError(f"cannot export: the page links {url}, which is not in {static}")
        return path.read_text(encoding="utf-8")

    def style(m):
        return f"<style>\n{read(m.group(1))}\n</style>"

    def icon(m):
        svg = base64.b64encode(read(m.group(2)).encode()).decode("ascii")
        return f'{m.group(1)}"data:image/svg+xml;base64,{svg}"'

    html = re.sub(r'<link rel="stylesheet" href="(' + re.escape(prefix) + r'[^"]+)">', style, html)
    html = re.sub(r'(<link rel="icon"[^>]*href=)"(' + re.escape(prefix) + r'[^"]+)"', icon, html)
    scripts = list(re.finditer(r'<script src="(' + re.escape(prefix) + r'[^"]+)"></script>', html))
    if not scripts:
        raise UserError("cannot export: the page has no script to run")
    head = (f'<script type="application/json" id="{FORMAT}">{script_json(data)}</script>\n'
            f'  <script type="text/plain" id="smolattn-blob">{blob}</script>\n'
            f'  <script>\n{read(prefix + "js/offline.js")}\n</script>\n  ')
    out, last = [], 0
    for i, m in enumerate(scripts):
        out += [html[last:m.start()], head if i == 0 else "", f"<script>\n{read(m.group(1))}\n</script>"]
        last = m.end()
    out.append(html[last:])
    html = "".join(out).replace("<head>", f'<head>\n  {GENERATOR}', 1).rstrip("\n") + f"\n{MARKER.text}\n"
    for s in re.findall(r"<script>\n(.*?)\n</script>", html, flags=re.S):
        if "</script" in s.lower():
            raise UserError("cannot export: a script contains '</script'")
    return html


def render(app, name: str, start: str | None = None) -> str:
    """The whole exported file for run ``name`` of ``app`` (a viewer app)."""
    data, blob = payload(app, name, start)
    return inline(app, page(app), data, blob)


def export(run_dir, out, *, allow_pickle: bool = False, cache_dir=None) -> dict:
    """Write run ``run_dir`` as one HTML file ``out`` (atomically). Returns {"path", "bytes"}."""
    from . import create_app

    out = Path(out)
    if out.is_dir():
        raise UserError(f"{out} is a directory; give the HTML file to write")
    if out.suffix.lower() not in (".html", ".htm"):
        raise UserError(f"{out}: the exported file's name must end in .html")
    if not out.parent.is_dir():
        raise UserError(f"cannot write {out}: {out.parent} is not a directory")
    outputs.check_file(out, MARKER)                # a file of the user's: refused before any work
    app = create_app({"RUN": str(run_dir), "ALLOW_PICKLE": allow_pickle, "CACHE_DIR": cache_dir})
    reg = app.extensions["runs"]
    html = render(app, reg.single_name).encode("utf-8")
    outputs.replace_file(out, html, MARKER)
    return {"path": str(out), "bytes": len(html)}


def ours(path) -> bool:
    """True for a file this module wrote (its last line)."""
    return Path(path).is_file() and MARKER.on(path)


@bp.get("/export")
def download():
    """The open run as one HTML file (the page's "Export HTML" button)."""
    reg = current_app.extensions["runs"]
    name = request.args.get("run") or (reg.single_name if reg.single else None)
    if not isinstance(name, str):
        raise UserError("parameter 'run' is required")
    try:
        html = render(current_app._get_current_object(), name)
    except (UserError, LookupError) as e:
        line = str(e) if str(e).startswith("cannot export") else f"cannot export {name!r}: {e}"
        return Response(f"{line}\n", status=413 if isinstance(e, TooLarge) else 404, mimetype="text/plain")
    safe = re.sub(r"[^\w.-]+", "_", name) or "run"
    return Response(html, mimetype="text/html",
                    headers={"Content-Disposition": f'attachment; filename="{safe}.html"'})
