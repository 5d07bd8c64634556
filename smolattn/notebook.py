"""The Python API for notebooks (docs/python-api.md): run the model on an image, or open a run, and get
numbers and views back.

    import smolattn
    run = smolattn.run_image("photo.jpg", "Is there a dog?", model_id="HuggingFaceTB/SmolVLM-256M-Instruct")
    run = smolattn.open_run("runs/photo")
    run = smolattn.run_images(["a.jpg", "b.jpg"], "What differs?")     # several images in one prompt
    run = smolattn.run_video("clip.mp4", "What happens?", model_id="HuggingFaceTB/SmolVLM2-256M-Video-Instruct")
    run.map("dog", image=1); run.masses("dog")  # image 1's grid; the token's attention mass per image / frame
    run.answer, run.tokens                       # the answer; the text tokens (index, text, kind)
    grid = run.map("dog", layers="20-29", heads="mean")   # numpy (rows*side, cols*side): the tiled image grid
    run.show("dog")                              # Jupyter: the viewer inline (click tokens, layers, heads), no server

Everything here reads through smolattn.store / smolattn.heatmap (the viewer's own functions); the
inline view is the viewer's exported page (viewer/export.py) in an iframe.
"""
from __future__ import annotations

import html
from pathlib import Path
from typing import NamedTuple
from urllib.parse import urlencode

import numpy as np

from . import heatmap as hm
from . import methods as mth
from . import runmeta
from . import store
from . import tokens as tok
from .errors import UserError

DEFAULT_ROOT = "smolattn_runs"      # run_image's runs, one new folder each: <root>/<image stem>[-n]
VIEW_HEIGHT = 1000                  # px of the inline view
_models: dict = {}                  # (model id, device, dtype, revision) -> Loaded: loaded once per kernel


class Token(NamedTuple):
    index: int          # position in the sequence (the viewer's token index)
    text: str           # whole characters (byte-level pieces joined)
    kind: str           # prompt, answer or special
    has_row: bool       # attention stored for it (a map can be drawn)

    def __str__(self) -> str:
        return self.text


def run_image(image, prompt: str = "Can you describe this image?", *, model_id: str | None = None,
              output_dir=None, max_new_tokens: int = 128, store: str = "compact", methods=("raw",),
              longest_edge: int | None = None, device: str | None = None, dtype: str | None = None,
              revision: str | None = None) -> "AttentionRun":
    """Run SmolVLM on ``image`` (a path) with ``prompt`` and store its answer and attention, as
    smolattn-extract does. ``output_dir``: the run directory to write (default: a new folder
    smolattn_runs/<image stem>[-n], never an existing one). The model stays loaded for the next call."""
    from . import extract as ex

    settings = _settings(prompt, max_new_tokens, longest_edge, store, methods)
    opened = ex.open_image(image)                       # a bad image fails before the model loads
    out = _target(output_dir, Path(image).stem)
    ex.extract(_load(model_id, device, dtype, revision), image, out, settings, image=opened)
    return open_run(out)


def _load(model_id, device, dtype, revision):
    from . import model as mdl

    key = (model_id or mdl.DEFAULT_MODEL, device, dtype, revision)
    if key not in _models:
        _models[key] = mdl.load(*key)
    return _models[key]


def _settings(prompt, max_new_tokens, longest_edge, store_mode, methods):
    from . import extract as ex

    return ex.Settings(prompt, max_new_tokens, longest_edge, store_mode,
                       tuple(mth.parse(methods if isinstance(methods, str) else ",".join(methods)))).check()


def _target(output_dir, stem: str) -> Path:
    from . import extract as ex

    out = Path(output_dir) if output_dir is not None else _new_dir(Path(DEFAULT_ROOT), stem)
    ex.check_writable(out)
    store.check_target(out)
    return out


def run_images(images, prompt: str = "Can you describe these images?", *, model_id: str | None = None,
               output_dir=None, max_new_tokens: int = 128, store: str = "compact", methods=("raw",),
               longest_edge: int | None = None, device: str | None = None, dtype: str | None = None,
               revision: str | None = None) -> "AttentionRun":
    """Several images (paths) in ONE prompt, in order, each with its own tiles (smolattn-extract
    --image a --image b). ``map(token, image=K)`` then draws image K."""
    from . import extract as ex

    paths = [images] if isinstance(images, (str, Path)) else list(images)
    if not paths:
        raise UserError("run_images needs at least one image")
    settings = _settings(prompt, max_new_tokens, longest_edge, store, methods)
    opened = [ex.open_image(p) for p in paths]          # bad images fail before the model loads
    out = _target(output_dir, Path(paths[0]).stem + (f"-and-{len(paths) - 1}" if len(paths) > 1 else ""))
    ex.extract_images(_load(model_id, device, dtype, revision), paths, out, settings, images=opened)
    return open_run(out)


def run_video(video, prompt: str = "Describe this video.", *, model_id: str | None = None, fps: float | None = None,
              max_frames: int | None = None, keep_frame_rows: bool = False, output_dir=None,
              max_new_tokens: int = 128, store: str = "compact", methods=("raw",), device: str | None = None,
              dtype: str | None = None, revision: str | None = None) -> "AttentionRun":
    """A video's sampled frames + prompt (a SmolVLM2 checkpoint, default SmolVLM2-256M-Video-Instruct;
    smolattn-extract --video).
    ``fps`` / ``max_frames`` None: the checkpoint's own sampling. ``masses(token)`` is the token's
    attention mass per frame (which moment it looks at); ``map(token, image=K)`` frame K's grid."""
    from . import extract as ex
    from . import video as vid

    settings = _settings(prompt, max_new_tokens, None, store, methods)
    vid.probe(video, fps, max_frames)                   # a bad video fails before the model loads
    out = _target(output_dir, Path(video).stem)
    ex.extract_video(_load(model_id or runmeta.DEFAULT_VIDEO_MODEL, device, dtype, revision), video, out, settings,
                     fps, max_frames, keep_frame_rows)
    return open_run(out)


def _new_dir(root: Path, stem: str) -> Path:
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in stem) or "run"
    for n in range(1, 10_000):
        path = root / (stem if n == 1 else f"{stem}-{n}")
        if not path.exists():
            return path
    raise UserError(f"{root} holds too many runs named {stem}; pass output_dir=")


def open_run(path, allow_pickle: bool = False) -> "AttentionRun":
    """Open a run directory (smolattn-extract's, smolattn-batch's, or the reference format)."""
    return AttentionRun(store.Run(path, allow_pickle=allow_pickle), allow_pickle)


class AttentionRun:
    """One run: its answer, tokens and attention maps (``map``), and views of them (``show``)."""

    def __init__(self, run: store.Run, allow_pickle: bool = False):
        self.run, self.allow_pickle = run, allow_pickle
        self._table = store.token_table(run)

    # -- what the run holds ---------------------------------------------------------------------
    @property
    def path(self) -> Path:
        return self.run.path

    @property
    def meta(self) -> dict:
        return self.run.meta

    @property
    def standin(self) -> bool:
        """True for a stand-in model (random weights): its maps are NOT SmolVLM's."""
        return self.run.standin

    @property
    def tokens(self) -> list[Token]:
        """The text tokens (prompt, chat template, answer), not the image's tokens."""
        return [Token(t["index"], t["text"], t["kind"], t["has_row"]) for t in self._table
                if t["kind"] in ("prompt", "answer", "special")]

    @property
    def answer_tokens(self) -> list[Token]:
        return [t for t in self.tokens if t.kind == "answer"]

    @property
    def answer(self) -> str:
        return self.meta.get("answer") or "".join(t.text for t in self.answer_tokens)

    @property
    def prompt(self) -> str | None:
        return self.meta.get("prompt")

    @property
    def num_layers(self) -> int:
        return self.run.num_layers

    @property
    def num_heads(self) -> int:
        return self.run.num_heads

    @property
    def grid_shape(self) -> tuple[int, int]:
        """(rows, cols) of cells of ``map(..., view="tiles")`` of image 0 (the global tile's when
        unsplit); ``images[k]["grid"]`` for image k."""
        return self.images[0]["grid"]

    @property
    def images(self) -> list[dict]:
        """Every image (or video frame) of the prompt, in order: index, kind ("image" or "frame"),
        timestamp (seconds, frames only), size (W, H) of the original and grid (rows, cols) of its
        ``map(..., view="tiles")``."""
        layout = self.run.layout
        return [{"index": k, "kind": kind, "timestamp": ts, "size": tuple(self.run.image_size(k if len(layout) > 1 else None)),
                 "grid": tuple(g.grid_shape) if g.rows else (g.side, g.side)}
                for k, (g, kind, ts) in enumerate(zip(layout.images, layout.kinds, layout.timestamps))]

    @property
    def methods(self) -> list[str]:
        return self.run.methods

    def __repr__(self) -> str:
        lay = self.run.layout
        if lay.is_video:
            layout = f"a video, {len(lay)} frames"
        elif len(lay) > 1:
            layout = f"{len(lay)} images"
        else:
            g = lay.images[0]
            layout = f"{g.rows}x{g.cols} tiles" if g.rows else "global tile only"
        banner = ", STAND-IN model (random weights)" if self.standin else ""
        return (f"<AttentionRun {str(self.path)!r}: {self.answer[:60]!r}, {layout}, "
                f"{self.num_layers} layers x {self.num_heads} heads{banner}>")

    # -- numbers --------------------------------------------------------------------------------
    def position(self, token) -> int:
        """A token's position: an int (``Token.index``), a Token, or text (the answer's first match,
        then the prompt's, as smolattn-heatmap --token)."""
        if isinstance(token, Token):
            return token.index
        if isinstance(token, (int, np.integer)):
            if not 0 <= int(token) < len(self.run.tokens):
                raise UserError(f"token {token} out of range 0..{len(self.run.tokens) - 1}")
            return int(token)
        if isinstance(token, str):
            return hm.find_token(self.run, token)
        raise UserError(f"token must be a position, a Token or text, got {type(token).__name__}")

    def _layers(self, layers) -> list[int]:
        if layers is None or isinstance(layers, str):
            return hm.parse_layers(layers, self.num_layers)
        picked = [int(layers)] if isinstance(layers, (int, np.integer)) else [int(i) for i in layers]
        bad = [i for i in picked if not 0 <= i < self.num_layers]
        if bad or not picked:
            raise UserError(f"layers {picked} out of range 0..{self.num_layers - 1}")
        return picked

    def values(self, token, layers=None, heads="mean", method: str = "raw", drop_sink: bool = False,
               start_layer: int = 0) -> np.ndarray:
        """(K,) the token's map over every image key (tiles row-major, global tile last; several images
        or frames: image after image, ``images``' order)."""
        pos = self.position(token)
        if method not in self.methods:
            if method in mth.METHODS:
                raise UserError(f"this run has no {method!r} maps; add them with: "
                                f"{runmeta.command(self.meta, self.path, [*self.methods[1:], method])}")
            raise UserError(f"unknown method {method!r}; this run has {', '.join(self.methods)}")
        if method == mth.RAW:
            if heads not in hm.HEAD_REDUCTIONS and not (isinstance(heads, (int, np.integer))
                                                        and 0 <= int(heads) < self.num_heads):
                raise UserError(f"heads must be 'mean', 'max' or a head 0..{self.num_heads - 1}, got {heads!r}")
            if self.run.row_of(pos) is None:
                raise UserError(f"token {pos} ({tok.text_at(self.run.tokens, pos)!r}) has no stored attention row")
            per_layer = hm.reduce_heads(hm.token_rows(self.run, self._layers(layers), pos), heads)
            return (hm.drop_sink(per_layer) if drop_sink else per_layer).mean(axis=0)
        values = hm.method_map(self.run, method, pos, None if layers is None else self._layers(layers), start_layer)
        return hm.drop_sink(values) if drop_sink else values

    def map(self, token, layers=None, heads="mean", method: str = "raw", image: int = 0, view: str = "tiles",
            drop_sink: bool = False, start_layer: int = 0) -> np.ndarray:
        """The token's attention over image ``image`` as a numpy grid: ``view="tiles"`` the tiled view
        (rows*side, cols*side; the global tile when the image was not split), ``"global"`` the global
        tile (side, side). ``layers``: None (all), an int, a list, or 'a-b'; ``heads``: 'mean', 'max'
        or a head index; ``method``: 'raw' or a derived method the run stores (``methods``)."""
        k = self._image(image)
        if view not in ("tiles", "global"):
            raise UserError(f"view must be 'tiles' or 'global', got {view!r}")
        grid, glob = self.run.layout.split(self.values(token, layers, heads, method, drop_sink, start_layer), k)
        return glob if view == "global" or grid is None else grid

    def masses(self, token, layers=None, heads="mean", method: str = "raw", drop_sink: bool = False,
               start_layer: int = 0) -> np.ndarray:
        """(n,) the token's map summed over each image (a video: each frame, its timeline)."""
        return self.run.layout.mass(self.values(token, layers, heads, method, drop_sink, start_layer))

    def _image(self, image) -> int:
        n = len(self.run.layout)
        if not isinstance(image, (int, np.integer)) or not 0 <= int(image) < n:
            what = "frame" if self.run.layout.is_video else "image"
            have = "one image (0)" if n == 1 else f"{n} {what}s (0..{n - 1})"
            raise UserError(f"image {image!r} out of range: this run has {have}")
        return int(image)

    # -- views ----------------------------------------------------------------------------------
    def picture(self, token, layers=None, heads="mean", method: str = "raw", drop_sink: bool = False,
                start_layer: int = 0, smooth: bool = False, image: int = 0):
        """A PIL image: the run's image (``image``: which one of several, or which frame) with the
        token's map on top and a caption (the static view)."""
        from PIL import Image, ImageDraw

        pos = self.position(token)
        grid = self.map(pos, layers, heads, method, image, "tiles", drop_sink, start_layer)
        k = int(image) if len(self.run.layout) > 1 else None
        path = self.run.image_path(k)
        if path is None:
            base = Image.new("RGB", self.run.image_size(k), "black")
        else:
            with Image.open(path) as im:
                base = im.convert("RGB")
        scale = min(1.0, 1024 / max(base.size))
        base = base.resize((max(1, round(base.width * scale)), max(1, round(base.height * scale))))
        pic = hm.overlay(base, hm.normalise(grid), smooth, vmax=1.0)     # per-map scale, as the viewer
        caption = (f"{tok.text_at(self.run.tokens, pos).strip()!r} (#{pos}) - {method}, layers "
                   f"{layers if layers is not None else 'all'}, heads {heads}")
        if k is not None:
            ts = self.run.layout.timestamps[k]
            caption += f" - frame {k} ({ts:.1f} s)" if ts is not None else f" - image {k}"
        if self.standin:
            caption += " - STAND-IN MODEL, random weights"
        out = Image.new("RGB", (pic.width, pic.height + 22), "white")
        out.paste(pic, (0, 22))
        ImageDraw.Draw(out).text((6, 5), caption, fill="black")
        return out

    def export(self, out) -> Path:
        """This run as one HTML file that opens in a browser with no server (smolattn-view --export)."""
        import importlib

        from .cli import viewer
        done = importlib.import_module(f"{viewer().__name__}.export").export(self.path, out,
                                                                            allow_pickle=self.allow_pickle)
        return Path(done["path"])

    def show(self, token=None, layers=None, heads="mean", method: str = "raw"):
        """The viewer for this run, inline: in Jupyter an interactive view (click tokens, change layers,
        heads and methods, as in smolattn-view) that needs no server; elsewhere a static picture (a PIL
        image of the map of ``token``, default the first answer token)."""
        if token is None:
            rows = [t for t in self.answer_tokens if t.has_row] or [t for t in self.tokens if t.has_row]
            if not rows:
                raise UserError("this run has no token with an attention row")
            token = rows[0]
        view = View(self, self.position(token), layers, heads, method)
        return view if _in_notebook() else view.picture()


class View:
    """What ``AttentionRun.show`` returns in a notebook: renders as the interactive page (text/html) and,
    for renderers without JavaScript, as the static picture (image/png)."""

    def __init__(self, run: AttentionRun, position: int, layers, heads, method: str):
        self.run, self.position, self.layers, self.heads, self.method = run, position, layers, heads, method

    def picture(self):
        return self.run.picture(self.position, self.layers, self.heads, self.method)

    def start(self) -> str:
        """The page's starting view, as the viewer's URL query."""
        q = {"token": self.position, "heads": self.heads, "method": self.method}
        if self.layers is not None:
            picked = self.run._layers(self.layers)
            q["layers"] = f"{picked[0]}-{picked[-1]}" if len(picked) > 1 else str(picked[0])
        return urlencode(q)

    def html(self) -> str:
        """The exported page (viewer/export.py) starting at this view."""
        import importlib

        from .cli import viewer
        vw = viewer()
        app = vw.create_app({"RUN": str(self.run.path), "ALLOW_PICKLE": self.run.allow_pickle})
        return importlib.import_module(f"{vw.__name__}.export").render(app, app.extensions["runs"].single_name,
                                                                        start=self.start())

    def _repr_mimebundle_(self, include=None, exclude=None):
        import base64
        import io

        buf = io.BytesIO()
        self.picture().save(buf, "PNG")
        frame = (f'<iframe srcdoc="{html.escape(self.html(), quote=True)}" style="width:100%;height:{VIEW_HEIGHT}px;'
                 f'border:1px solid #ddd" title="smolattn view of {html.escape(str(self.run.path))}"></iframe>')
        return {"text/html": frame, "image/png": base64.b64encode(buf.getvalue()).decode("ascii"),
                "text/plain": f"<smolattn view of {self.run.path}, token {self.position}>"}


def _in_notebook() -> bool:
    """True inside a Jupyter kernel (an IPython shell with a kernel), where HTML output is shown."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None
