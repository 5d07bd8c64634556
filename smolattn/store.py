"""Run store: write and read one extraction ("run") directory. The format is docs/run-format.md.

One reader, :class:`Run`, opens both our runs and runs in the reference project's format
(``decoded_tokens.npy`` + ``attentions_5/attention_fp16_rounded_layer_{i}.npz`` or
``attention_array.npy``, geometry recovered from the ``<row_r_col_c>`` tokens).
"""
from __future__ import annotations

import json
import os
import pickle
import re
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import geometry as geo
from . import outputs, summary
from .errors import UserError
from .outputs import (CRASH_ENV, CRASH_STEPS, HOST as _HOST, crash_point,  # noqa: F401
                      fsync_tree, recover, write_bytes_durably)
from .tokens import SPECIAL, display_token, piece, units  # noqa: F401  (display_token: re-exported)

FORMAT = "smolattn-run"
FORMAT_VERSION = 3      # 2: blosc2 layer files, optional derived-method maps (methods/NAME.npz), the completeness
READ_VERSIONS = (1, 2, 3)  # record (meta.files); v1 runs still open. 3: an image list (several images, video frames)
DEFAULT_RUN_DIR = "smolattn_run"   # the single-image default output directory (README, "Your files are safe")
STORES = ("compact", "compact8", "full")
LAYER_FILE = "attention/layer_{:02d}.{}.b2"            # one blosc2 chunk per array (meta.attention.arrays)
LAYER_FILE_V1 = "attention/layer_{:02d}.npz"           # np.savez_compressed (v1, and v2 runs without arrays)
METHOD_FILE = "methods/{}.npz"
# Byte shuffle + zstd level 1, one thread per call (writer threads run in parallel): on real-shape
# rows ~10x faster to write than np.savez_compressed's zlib, ~12 % smaller (bench/bench_codec.py).
CODEC = {"codec": "ZSTD", "clevel": 1, "filter": "SHUFFLE"}
FULL_FILE = "attentions_5/attention_fp16_rounded_layer_{}.npz"   # the reference project's name
IMAGE_NAMES = ("image.png", "image.jpg", "static/image.png")
IMAGES_FILE = "images/{:02d}.{}"                        # v3: every image / video frame of the prompt, in order


# ---------------------------------------------------------------------------------------------
# Where a run may be written (docs/run-format.md, "Writing a run"): the protocol itself (temporary
# sibling, fsync, rename, recovery) is smolattn.outputs'; this module declares the run kind.
# ---------------------------------------------------------------------------------------------

OUR_NAMES = {"meta.json", "decoded_tokens.npy", "image.jpg", "image.png", "summary.npz", "attention", "attentions_5",
             "methods", "images", "effects.json"}   # effects.json: an intervened run's (smolattn.interventions)
OUR_FOLDERS = {"attention": re.compile(r"^layer_\d+(\.\w+\.b2|\.npz)$"),          # folder -> the only files it may hold
               "attentions_5": re.compile(r"^attention_fp16_rounded_layer_\d+\.npz$"),
               "methods": re.compile(r"^[A-Za-z0-9_-]+\.npz$"),
               "images": re.compile(r"^\d{2,}\.(jpg|png)$")}
REFERENCE_NAMES = {"decoded_tokens.npy", "attention_array.npy", "attentions_5", "image.png"}
REPLACE_REFERENCE_FLAG = "--replace-reference-run"

RUN = outputs.Kind("run", OUR_NAMES - set(OUR_FOLDERS), OUR_FOLDERS,
                   marker=("meta.json", outputs.JsonField(FORMAT)))


class _ReferenceKind(outputs.Kind):
    """The reference project's run folder: decoded_tokens.npy and attentions_5/ or attention_array.npy,
    no other entry, no meta.json. Replaced only on request (``--replace-reference-run``)."""

    def foreign(self, path):
        why = super().foreign(path)
        if why is None and os.listdir(path):
            names = set(os.listdir(path))
            if not ("decoded_tokens.npy" in names and names & {"attentions_5", "attention_array.npy"}):
                return "it has no meta.json of ours"
        return why


REFERENCE_RUN = _ReferenceKind("reference-format run", REFERENCE_NAMES - {"attentions_5"},
                               {"attentions_5": OUR_FOLDERS["attentions_5"]})
RUN_OR_REFERENCE = outputs.AnyOf(RUN, REFERENCE_RUN)


def owned_run(path) -> bool:
    """True when ``path`` is a run this project wrote and nothing else: our meta.json with the format
    marker and no entry but the run's own names. Only such a directory is replaced without asking."""
    path = Path(path)
    return path.is_dir() and not _empty(path) and RUN.owned(path)


def reference_run(path) -> bool:
    """True when ``path`` is a run folder of the reference project and nothing else (replaced only
    with ``--replace-reference-run``)."""
    path = Path(path)
    return path.is_dir() and not _empty(path) and REFERENCE_RUN.owned(path)


def _empty(folder) -> bool:
    with os.scandir(folder) as entries:
        return next(entries, None) is None


def _kind(replace_reference: bool):
    return RUN_OR_REFERENCE if replace_reference else RUN


def check_target(final, replace_reference: bool = False) -> None:
    """Refuse (UserError, one line) any ``final`` that a run may not be written to: it must not exist,
    be an empty directory, or be one of our runs (a reference-format run only with
    ``replace_reference``). Never the current directory or one above it. Creates nothing; call it
    before loading a model."""
    final = Path(final)
    if final.is_dir() and not final.is_symlink() and Path.cwd().resolve().is_relative_to(final.resolve()):
        raise UserError(f"{final} is the current directory (or holds it): a run is written into a directory of "
                        f"its own; give a new one, e.g. --output-dir {DEFAULT_RUN_DIR}")
    if not replace_reference and reference_run(final):
        raise UserError(f"{final} is a reference-format run (the reference project's files, not written by "
                        f"smolattn); it is left untouched: pass {REPLACE_REFERENCE_FLAG} to replace it, "
                        "or choose another output directory")
    outputs.check_target(final, _kind(replace_reference), whole=False)   # (the current directory: above)


def refuse_reference_runs(paths) -> None:
    """One line (UserError) when any of ``paths`` is a reference-format run: a batch asks before it
    replaces the reference project's data (``--replace-reference-run``). Creates nothing."""
    found = [Path(p) for p in paths if reference_run(p)]
    if found:
        more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        raise UserError(f"{found[0]}{more} is a reference-format run (the reference project's files, not written "
                        f"by smolattn); it is left untouched: pass {REPLACE_REFERENCE_FLAG} to replace it, "
                        "or choose another output root")


@contextmanager
def atomic_dir(final, replace_reference: bool = False):
    """outputs.atomic_dir for a run: ``final`` must pass :func:`check_target`."""
    check_target(final, replace_reference)
    with outputs.atomic_dir(final, _kind(replace_reference)) as tmp:
        yield tmp


def remove_run(path) -> None:
    """Delete one of our runs (it must pass :func:`owned_run`) without ever leaving part of it under its
    name: renamed to a temporary name first (a killed delete leaves an entry :func:`recover` removes)."""
    path = Path(path)
    if not owned_run(path):
        raise UserError(f"{path} is not a run written by smolattn; it is left untouched")
    tmp = path.parent / outputs.temp_name(path.name, "tmp")
    os.rename(path, tmp)
    outputs.fsync_path(path.parent, directory=True)
    outputs._remove_old(tmp)


def file_sizes(root) -> dict:
    """{relative POSIX path: size} of every file under ``root``: meta.json's completeness record."""
    root = Path(root)
    return {p.relative_to(root).as_posix(): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}


def incomplete(path) -> str | None:
    """Why the run at ``path`` is not complete, or None. Cheap (one stat per file): meta.json is ours,
    and every file it lists (format version 2) exists with the recorded size."""
    path = Path(path)
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError) as e:
        return f"no readable meta.json ({type(e).__name__})"
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        return "meta.json is not a smolattn run"
    for name, size in (meta.get("files") or {}).items():
        try:
            got = (path / name).stat().st_size
        except OSError:
            return f"{name} is missing"
        if got != size:
            return f"{name} has {got} bytes, meta.json says {size}"
    return None


def quantize(x: np.ndarray):
    """uint8 codes with one fp32 scale per row (max of the row): |error| <= scale / 510."""
    x = np.asarray(x, dtype=np.float32)
    scale = x.max(axis=-1)
    safe = np.where(scale > 0, scale, 1.0)[..., None]
    return np.rint(x / safe * 255).astype(np.uint8), scale.astype(np.float32)


def dequantize(codes: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return codes.astype(np.float32) * (scale[..., None] / 255)


def pack(a: np.ndarray) -> bytes:
    import blosc2

    a = np.ascontiguousarray(a)
    return blosc2.compress2(a, typesize=a.dtype.itemsize, codec=getattr(blosc2.Codec, CODEC["codec"]),
                            clevel=CODEC["clevel"], filters=[getattr(blosc2.Filter, CODEC["filter"])], nthreads=1)


def unpack(blob: bytes, dtype, shape) -> np.ndarray:
    import blosc2

    return np.frombuffer(blosc2.decompress2(blob), dtype=dtype).reshape(shape)


def layer_arrays(a: np.ndarray, store: str, keys, text_keys) -> dict:
    """The arrays stored for one layer's (H, Q, S) rows: image and text keys apart, fp16 or 8-bit."""
    image, text = a[..., keys], a[..., text_keys]
    if store == "compact":
        return {"image": image.astype(np.float16), "text": text.astype(np.float16)}
    if store == "compact8":
        (iq, isc), (tq, tsc) = quantize(image), quantize(text)
        return {"image_q": iq, "image_scale": isc, "text_q": tq, "text_scale": tsc}
    raise ValueError(f"unknown store {store!r}")


def write_layers(root: Path, layers, store: str, query_positions, geometry: geo.Geometry, seq_len: int):
    """Write per-layer attention. ``layers``: per layer (H, Q, seq_len) rows over ALL keys (zeros
    after each query's own position). Returns the text keys and {array name: [dtype, shape]}."""
    keys = geometry.key_positions
    text_keys = np.setdiff1d(np.arange(seq_len), keys)
    arrays = {}
    for i, a in enumerate(layers):
        if store == "full":
            if a.shape[1] != seq_len:
                raise ValueError("the full store needs every query row")
            path = root / FULL_FILE.format(i)
            path.parent.mkdir(exist_ok=True)
            np.savez(path, attention=a[None].astype(np.float16))
            continue
        (root / LAYER_FILE).parent.mkdir(exist_ok=True)
        for name, arr in layer_arrays(a, store, keys, text_keys).items():
            (root / LAYER_FILE.format(i, name)).write_bytes(pack(arr))
            arrays[name] = [arr.dtype.str, list(arr.shape)]
    return text_keys, arrays


def write_methods(root: Path, methods: dict) -> dict:
    """Write each derived method's maps (``smolattn.methods.compute``'s output) to methods/NAME.npz:
    ``maps`` (L, Q, K) over the image keys in the method's dtype, ``positions`` (Q,) the token each
    map belongs to, ``query_positions`` (Q,) the row it was read from. Returns meta.json's section."""
    out = {}
    for name, m in methods.items():
        path = root / METHOD_FILE.format(name)
        path.parent.mkdir(exist_ok=True)
        np.savez_compressed(path, maps=np.asarray(m["maps"]).astype(m["meta"]["dtype"]),
                            positions=np.asarray(m["positions"], np.int64),
                            query_positions=np.asarray(m["query_positions"], np.int64))
        out[name] = {**m["meta"], "file": METHOD_FILE.format(name), "shape": list(np.shape(m["maps"])),
                     "positions": [int(p) for p in m["positions"]]}
    return out


def image_name(info: dict) -> str:
    """The run's image file for a source described by ``images.open_image``'s info: JPEG stays JPEG."""
    return "image.jpg" if info.get("format") == "JPEG" else "image.png"


def write_run(out, *, tokens, layers, query_positions, store: str, geometry: geo.Geometry, meta: dict,
              image=None, image_name: str = "image.png", methods: dict | None = None, images=None,
              replace_reference: bool = False, extra_files: dict | None = None) -> Path:
    """Write a whole run directory atomically (temporary sibling, renamed when complete).

    ``layers``: per layer (H, Q, S) attention rows over all S keys for the Q ``query_positions``.
    ``geometry``: a Geometry (one image) or a geo.Layout (several images, a video's frames).
    ``meta``: everything else for meta.json; the format, geometry and attention sections are added here.
    ``methods``: derived maps from ``smolattn.methods.compute`` (written under methods/).
    ``images``: (v3) every image / frame of the prompt, in order, as (PIL image, "jpg" or "png"):
    written as images/NN.EXT; ``meta["images"][k]["file"]`` names each.
    ``replace_reference``: a reference-format run at ``out`` may be replaced (--replace-reference-run).
    ``extra_files``: name -> bytes of more files of ours (each name in OUR_NAMES: effects.json).
    """
    if store not in STORES:
        raise UserError(f"unknown store {store!r}; choose one of {', '.join(STORES)}")
    S = len(tokens)
    with atomic_dir(out, replace_reference) as tmp:
        np.save(tmp / "decoded_tokens.npy", np.array(tokens, dtype=str))
        crash_point("writing")
        if image is not None:
            image.save(tmp / image_name, quality=95) if image_name.endswith(".jpg") else image.save(tmp / image_name)
        meta = dict(meta)
        if images:
            (tmp / "images").mkdir()
            entries = meta["images"] = [dict(e) for e in meta.get("images") or [{} for _ in images]]
            for k, ((im, ext), entry) in enumerate(zip(images, entries)):
                entry["file"] = IMAGES_FILE.format(k, ext)
                im.save(tmp / entry["file"], quality=95) if ext == "jpg" else im.save(tmp / entry["file"])
        text_keys, arrays = write_layers(tmp, layers, store, query_positions, geometry, S)
        meta.update(format=FORMAT, format_version=FORMAT_VERSION, seq_len=S, geometry=geometry.to_json())
        meta.setdefault("image", {})["file"] = image_name if image is not None else None
        meta["attention"] = {
            "store": store, "num_layers": len(layers), "num_heads": int(layers[0].shape[0]),
            "query_positions": [int(p) for p in query_positions],
            "query_semantics": "row for token t = position t as the query (the step that PRODUCES token t+1)",
            "image_keys": "geometry.key_positions: tiles row-major, each side x side row-major, global tile last",
            "text_keys": "every other position, ascending", "num_text_keys": int(len(text_keys)),
            "files": FULL_FILE if store == "full" else LAYER_FILE.replace("{:02d}", "{layer:02d}").replace(".{}.", ".{array}."),
            "arrays": arrays, "codec": None if store == "full" else dict(CODEC, library="blosc2", typesize="dtype itemsize"),
            "dtype": "uint8 codes x scale/255 (|error| <= row max/510)" if store == "compact8" else "float16",
        }
        meta["methods"] = write_methods(tmp, methods or {})
        for name, data in (extra_files or {}).items():
            if name not in OUR_NAMES:
                raise ValueError(f"{name} is not a run file name of ours")
            write_bytes_durably(tmp / name, data)
        # the viewer's summary, from the layers at the precision they are stored (what readers get)
        positions, keep = summary.kept(query_positions, geometry)
        keep = slice(None) if keep is None else keep
        stored = (Layer(as_stored(a[:, keep][..., geometry.key_positions], store),
                        as_stored(a[:, keep][..., text_keys], store)) for a in layers)
        summary.save(summary.compute(stored, positions), tmp / summary.FILE)
        meta["files"] = file_sizes(tmp)          # meta.json last: the completeness record
        write_bytes_durably(tmp / "meta.json", json.dumps(meta, indent=1).encode())
    return Path(out)


def as_stored(x: np.ndarray, store: str) -> np.ndarray:
    """``x`` as a reader gets it back from a ``store`` file (float32)."""
    if store == "compact8":
        return dequantize(*quantize(x))
    return np.asarray(x).astype(np.float16).astype(np.float32)


class Layer:
    """Attention rows of one layer: ``image`` (H, Q, K) and ``text`` (H, Q, T) as float32."""

    def __init__(self, image: np.ndarray, text: np.ndarray):
        self.image, self.text = image, text

    @property
    def nbytes(self) -> int:
        return self.image.nbytes + self.text.nbytes


@dataclass
class MethodMaps:
    """One derived method's maps in a run: ``maps`` (L, Q, K) float32 over the image keys; axis 0 is
    ``meta['axis']`` (start layer or layer); ``positions[i]`` is the token whose map is ``maps[:, i]``."""
    name: str
    maps: np.ndarray
    positions: np.ndarray
    query_positions: np.ndarray
    meta: dict

    def index(self, position: int) -> int | None:
        hit = np.flatnonzero(self.positions == int(position))
        return int(hit[0]) if len(hit) else None


class Run:
    """One run directory, in our format or the reference format. Layers are read lazily."""

    def __init__(self, path, allow_pickle: bool = False):
        self.path = Path(path)
        if not os.path.lexists(self.path):
            recover(self.path.parent, [self.path.name])   # a writer killed between setting the old run aside and renaming in
        if not self.path.is_dir():
            raise UserError(f"run directory not found: {self.path}")
        try:
            self._open(allow_pickle)
        except UserError:
            raise
        except (OSError, ValueError, KeyError, TypeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile) as e:
            raise UserError(f"{self.path}: unreadable run ({type(e).__name__}: {e})")

    def _open(self, allow_pickle):
        meta_path = self.path / "meta.json"
        self.tokens = self._read_tokens(allow_pickle)
        if meta_path.is_file():
            self.meta = json.loads(meta_path.read_text())
            if self.meta.get("format") != FORMAT or self.meta.get("format_version", 0) not in READ_VERSIONS:
                raise UserError(f"{meta_path}: not a {FORMAT} run of version {' or '.join(map(str, READ_VERSIONS))}")
            self.layout = geo.Layout.from_json(self.meta["geometry"])
            # one image: its Geometry (the single-image API); several: the Layout (say which image)
            self.geometry = self.layout.images[0] if len(self.layout) == 1 else self.layout
        else:
            self.meta = self._reference_meta()
            try:
                self.geometry = geo.from_tokens(self.tokens)
            except ValueError as e:
                raise UserError(f"{self.path}: cannot read the image layout from the tokens: {e}")
        if not hasattr(self, "layout"):
            self.layout = geo.Layout.single(self.geometry)
        att = self.meta["attention"]
        self.store = att["store"]
        self.query_positions = np.asarray(att["query_positions"], dtype=np.int64)
        self.text_key_positions = np.setdiff1d(np.arange(len(self.tokens)), self.geometry.key_positions)
        self._row = {int(p): i for i, p in enumerate(self.query_positions)}
        self.num_layers, self.num_heads = att["num_layers"], att["num_heads"]
        self._methods: dict[str, MethodMaps] = {}

    # -- tokens -------------------------------------------------------------------------------
    def _read_tokens(self, allow_pickle):
        path = self.path / "decoded_tokens.npy"
        if not path.is_file():
            raise UserError(f"{self.path}: no decoded_tokens.npy (not a run directory)")
        try:  # pickles only on the caller's explicit opt-in: unpickling runs code from the file
            arr = np.load(path, allow_pickle=allow_pickle)
        except ValueError:
            raise UserError(f"{path} is a pickled object array; loading it runs code from the file. "
                            "Pass --allow-pickle only if you trust it")
        return [str(t) for t in arr.tolist()]

    # -- reference-format runs ----------------------------------------------------------------
    def _reference_layer_files(self):
        files = sorted(self.path.glob("attentions_5/attention_fp16_rounded_layer_*.npz"),
                       key=lambda p: int(re.findall(r"\d+", p.stem)[-1]))
        return files

    def _reference_meta(self) -> dict:
        files = self._reference_layer_files()
        S = len(self.tokens)
        if files:
            shape, layers = _npz_shape(files[0], "attention"), len(files)
        elif (self.path / "attention_array.npy").is_file():
            arr = np.load(self.path / "attention_array.npy", mmap_mode="r")
            shape, layers = arr.shape[-4:] if arr.ndim == 5 else (1,) + arr.shape[1:], arr.shape[0]
        else:
            raise UserError(f"{self.path}: no attention files (attentions_5/*.npz or attention_array.npy)")
        if shape[-1] != shape[-2] or shape[-1] > S:
            raise UserError(f"{self.path}: attention shape {tuple(shape)} does not fit {S} tokens")
        # the attention may cover fewer positions than tokens (the last token never fed)
        ans = _answer_start(self.tokens)
        return {"format": "reference", "model": {"id": "unknown (reference format)", "standin": False},
                "prompt_length": ans, "seq_len": S,
                "attention": {"store": "reference", "num_layers": layers, "num_heads": int(shape[-3]),
                              "query_positions": list(range(shape[-1])), "positions": int(shape[-1])}}

    # -- public API ---------------------------------------------------------------------------
    @property
    def standin(self) -> bool:
        return bool(self.meta.get("model", {}).get("standin"))

    @property
    def prompt_length(self) -> int:
        return int(self.meta.get("prompt_length", len(self.tokens)))

    @property
    def images(self) -> list[dict]:
        """(v3) One entry per image / video frame of the prompt, in order (meta.images); older runs:
        their one image."""
        return self.meta.get("images") or [dict(self.meta.get("image") or {}, kind=geo.IMAGE)]

    def image_path(self, k: int | None = None) -> Path | None:
        """The file of image (or frame) ``k`` (default: the run's image; the first of several). meta's
        image.file is followed only when it is one of the names we write (IMAGE_NAMES; a meta.json
        naming any other file, x.html say, is not followed), else the first of them there; an entry of
        meta.images only when it is images/NN.jpg|png."""
        if self.meta.get("images"):
            k = 0 if k is None else k
            if not 0 <= k < len(self.meta["images"]):
                raise UserError(f"image {k} out of range 0..{len(self.meta['images']) - 1}")
            name = str(self.meta["images"][k].get("file") or "")
            folder, _, base = name.partition("/")
            if folder != "images" or not OUR_FOLDERS["images"].match(base):
                return None
            p = self.path / name
            return p if p.is_file() and not p.is_symlink() else None
        if k not in (None, 0):
            raise UserError(f"image {k} out of range: this run has one image (0)")
        name = self.meta.get("image", {}).get("file")
        for cand in ([name] if name in IMAGE_NAMES else []) + list(IMAGE_NAMES):
            p = self.path / cand
            if p.is_file():
                return p
        return None

    def image_size(self, k: int | None = None) -> tuple[int, int]:
        """(W, H) of image (or frame) ``k`` as the source had it (default: the run's first image)."""
        if self.meta.get("images"):
            return tuple(int(v) for v in self.meta["images"][k or 0]["size"])
        size = self.meta.get("image", {}).get("size")
        if size:
            return int(size[0]), int(size[1])
        p = self.image_path()
        if p is None:
            return (self.geometry.cols or 1) * 512, (self.geometry.rows or 1) * 512
        from PIL import Image
        with Image.open(p) as im:
            return im.size

    @property
    def methods(self) -> list[str]:
        """The explanation methods this run holds: 'raw' (the attention rows) and every derived one."""
        return ["raw"] + sorted(self.meta.get("methods") or {})

    def method(self, name: str) -> MethodMaps:
        """The stored maps of a derived method (read once, then cached)."""
        info = (self.meta.get("methods") or {}).get(name)
        if info is None:
            raise UserError(f"{self.path}: no {name!r} maps in this run (re-extract with --methods raw,{name})")
        if name not in self._methods:
            try:
                with np.load(self.path / info["file"]) as z:
                    self._methods[name] = MethodMaps(name, z["maps"].astype(np.float32), z["positions"],
                                                     z["query_positions"], info)
            except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
                raise UserError(f"{self.path}: cannot read {info['file']}: {e}")
        return self._methods[name]

    def image_view(self, k: int) -> "ImageView":
        """Image (or frame) ``k`` read as a one-image run (:class:`ImageView`)."""
        return ImageView(self, k)

    def row_of(self, position: int) -> int | None:
        """Index of the stored row for token ``position`` (token t attending), or None."""
        return self._row.get(int(position))

    def layer(self, i: int) -> Layer:
        if not 0 <= i < self.num_layers:
            raise IndexError(f"layer {i} out of range 0..{self.num_layers - 1}")
        keys, text_keys = self.geometry.key_positions, self.text_key_positions
        if self.store in ("compact", "compact8"):
            z = self.layer_arrays(i)
            if self.store == "compact":   # C order: per-token row slices stay fast
                return Layer(z["image"].astype(np.float32, order="C"), z["text"].astype(np.float32, order="C"))
            return Layer(dequantize(z["image_q"], z["image_scale"]), dequantize(z["text_q"], z["text_scale"]))
        full = self._full_layer(i)                        # (H, S', S')
        n = full.shape[-1]
        text_keys = text_keys[text_keys < n]
        return Layer(full[..., keys].astype(np.float32), full[..., text_keys].astype(np.float32))

    def layer_arrays(self, i: int) -> dict:
        """One layer's stored arrays: blosc2 chunks (listed in meta.attention.arrays) or an npz (v1)."""
        if "arrays" in self.meta.get("attention", {}):
            return {name: unpack((self.path / LAYER_FILE.format(i, name)).read_bytes(), dtype, shape)
                    for name, (dtype, shape) in self.meta["attention"]["arrays"].items()}
        with np.load(self.path / LAYER_FILE_V1.format(i)) as z:
            return {name: z[name] for name in z.files}

    def _full_layer(self, i: int) -> np.ndarray:
        path = self.path / FULL_FILE.format(i)
        if path.is_file():
            with np.load(path) as z:
                a = z["attention"]
            return a[0] if a.ndim == 4 else a
        arr = np.load(self.path / "attention_array.npy", mmap_mode="r")
        return np.asarray(arr[i, 0] if arr.ndim == 5 else arr[i])

    def full_row(self, layer: Layer, row: int) -> np.ndarray:
        """The whole key row (H, S) of a stored query row, image and text keys put back in place."""
        out = np.zeros((layer.image.shape[0], len(self.tokens)), dtype=np.float32)
        out[:, self.geometry.key_positions] = layer.image[:, row]
        out[:, self.text_key_positions[: layer.text.shape[-1]]] = layer.text[:, row]
        return out


class ImageView:
    """Image (or frame) ``k`` of a several-image or video run, read as a one-image run: its Geometry;
    its keys are the image keys, every other key (the other images' included) a text key, so a full
    row, its sums and every single-image aggregation stay the whole row's. ``Run.image_view(k)``."""

    def __init__(self, run: "Run", k: int):
        layout = run.layout
        if not 0 <= k < len(layout):
            raise UserError(f"image {k} out of range: this run has {len(layout)} image(s), 0..{len(layout) - 1}")
        self.run, self.k, self.geometry = run, k, layout.images[k]
        self.layout = geo.Layout((self.geometry,), (layout.kinds[k],), (layout.timestamps[k],))
        for name in ("path", "tokens", "meta", "store", "query_positions", "num_layers", "num_heads", "_row"):
            setattr(self, name, getattr(run, name))
        self.text_key_positions = np.setdiff1d(np.arange(len(run.tokens)), self.geometry.key_positions)
        self._keys = layout.keys_of(k)
        self._text_cache = {}

    standin = Run.standin
    prompt_length = Run.prompt_length
    row_of = Run.row_of
    full_row = Run.full_row

    @property
    def methods(self) -> list[str]:
        return self.run.methods

    def method(self, name: str) -> MethodMaps:
        """The run's derived maps over this image's keys only (``Layout.keys_of(k)``)."""
        m = self.run.method(name)
        return MethodMaps(m.name, np.ascontiguousarray(m.maps[..., self._keys]), m.positions, m.query_positions,
                          m.meta)

    def image_path(self, k: int | None = None):
        return self.run.image_path(self.k)

    def image_size(self, k: int | None = None):
        return self.run.image_size(self.k)

    def layer(self, i: int) -> Layer:
        lay = self.run.layer(i)
        T = lay.text.shape[-1]
        order = self._text_cache.get(T)
        if order is None:    # view text keys (ascending) <- where each one is in [image | text] of the run
            pos = np.concatenate([self.run.layout.key_positions, self.run.text_key_positions[:T]])
            mine = np.zeros(len(pos), bool)
            mine[self._keys] = True
            rest = np.flatnonzero(~mine)
            order = self._text_cache[T] = rest[np.argsort(pos[rest], kind="stable")]
        both = np.concatenate([lay.image, lay.text], axis=-1)
        return Layer(np.ascontiguousarray(lay.image[..., self._keys]), np.ascontiguousarray(both[..., order]))


def _npz_shape(path, key) -> tuple:
    """Shape of one array in an npz, read from its header (no decompression of the data)."""
    with zipfile.ZipFile(path) as zf, zf.open(f"{key}.npy") as f:
        major, _ = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        return read(f)[0]


def _answer_start(tokens) -> int:
    """Position after the last ``Ass istant :`` (or ``Assistant :``) of a reference token list."""
    flat = [t.replace("Ġ", "").strip() for t in tokens]
    for i in range(len(flat) - 1, 0, -1):
        if flat[i] == ":" and (flat[i - 1] == "Assistant" or (flat[i - 1] == "istant" and flat[i - 2] == "Ass")):
            return i + 1
    return len(tokens)


def token_table(run: Run) -> list[dict]:
    """Every token with its display text and role: the one place that classifies tokens for UIs.

    kind: "image" (an <image> token), "marker" (tile/global/fake markers), "special" (other special
    tokens), "prompt" or "answer" (text before/after the assistant turn starts).
    text: what the token shows. Tokens that together spell whole characters (byte-level BPE pieces of
    a Korean syllable, an emoji...) share a unit: ``unit`` = [first, last] position and ``unit_text``
    the characters; ``text`` is then the token's own piece (split characters as ``\\xNN``).
    """
    tokens, plen = run.tokens, run.prompt_length
    keys = set(run.geometry.key_positions.tolist())
    outside = run.geometry.outside_image(np.arange(len(tokens))).tolist()
    rows = set(run.query_positions.tolist())
    out = []
    for u in units(tokens):
        for i in range(u.start, u.stop):
            raw = tokens[i]
            if i in keys:
                kind = "image"
            elif not outside[i]:
                kind = "marker"
            elif SPECIAL.match(raw):
                kind = "special"
            else:
                kind = "answer" if i >= plen else "prompt"
            out.append({"index": i, "raw": raw, "text": u.text if u.stop - u.start == 1 else piece(raw),
                        "kind": kind, "has_row": i in rows, "unit": (u.start, u.stop - 1), "unit_text": u.text})
    return out      # (unit a tuple: a dict of atomic values only is not tracked by the garbage collector)
