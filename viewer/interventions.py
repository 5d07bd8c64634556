"""Intervened runs and sweeps (issue 18; docs/viewer-api.md). An intervened run is a normal run whose
meta.json has ``intervention`` (the spec, its slug and the base run) and which holds ``effects.json``; a
sweep is a folder with meta.json (format ``smolattn-sweep``), sweep.json and sweep.png.

What this serves is fixed by the writer's layout, never by a path in a meta file: the base run must be a
run under the served root (or, serving one run, that run's sibling) and is opened through the registry
like any run; a sweep is a folder under the root (or the served run's sibling whose base is that run or
its base); sweep.png is served only from inside its folder and only when its bytes are a PNG.
"""
from __future__ import annotations

import bisect
import io
import json
import math
import os
from functools import lru_cache
from pathlib import Path

from flask import Blueprint, jsonify, render_template, send_file

from smolattn import tokens as tok
from smolattn.errors import UserError

from .api import ApiError, _api_error, _not_found, get_run, params, registry
from .runs import RUN_MARKER, NotFound

bp = Blueprint("interventions", __name__)
bp.register_error_handler(ApiError, _api_error)   # the API's one error shape: {"success": false, "error": ...}
bp.register_error_handler(NotFound, _not_found)

SWEEP_FORMAT, EFFECTS_FORMAT = "smolattn-sweep", "smolattn-effects"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MAX_FILE_BYTES = 32 << 20     # effects.json, sweep.json, sweep.png: the writer's files are far smaller
SWEEP_FIELDS = ("window", "from", "to", "token", "token_id", "base_prob", "centres", "layers", "prob",
                "relative_change_pct", "standin")


# -- reading the writer's files ----------------------------------------------------------------
def clean(x):
    """JSON-safe copy: NaN and infinities become null (a browser's JSON.parse rejects them)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [clean(v) for v in x]
    return x


def own_file(folder: Path, name: str) -> Path | None:
    """``folder/name`` when it is a plain file inside ``folder`` (a symlink out of it is not ours)."""
    path = folder / name
    try:
        if path.is_file() and path.resolve().parent == folder.resolve() and path.stat().st_size <= MAX_FILE_BYTES:
            return path
    except OSError:
        pass
    return None


def read_json(folder: Path, name: str):
    path = own_file(folder, name)
    if path is None:
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def sweep_meta(folder: Path) -> dict | None:
    """The sweep folder's meta.json, or None when the folder is not a sweep."""
    meta = read_json(folder, "meta.json")
    if isinstance(meta, dict) and meta.get("format") == SWEEP_FORMAT and own_file(folder, "sweep.json"):
        return meta
    return None


def sweep_intervention(meta: dict, data) -> dict:
    """The sweep's meta.intervention plus its from/to/window (sweep.json), for the badge."""
    iv = meta.get("intervention") if isinstance(meta.get("intervention"), dict) else {}
    data = data if isinstance(data, dict) else {}
    return {**iv, "sweep": {k: data.get(k) for k in ("from", "to", "window")}}


# -- words -------------------------------------------------------------------------------------
def layer_list(layers) -> str:
    """[8, 9, 10, 12] -> '8-10,12'."""
    xs = sorted({int(x) for x in layers if isinstance(x, int)})
    out, k = [], 0
    while k < len(xs):
        j = k
        while j + 1 < len(xs) and xs[j + 1] == xs[j] + 1:
            j += 1
        out.append(str(xs[k]) if j == k else f"{xs[k]}-{xs[j]}")
        k = j + 1
    return ",".join(out)


def heads_of(iv: dict, num_layers: int | None = None, num_heads: int | None = None) -> list[list[int]]:
    """The ablated (layer, head) pairs of meta.intervention.spec.heads (well-formed, in range), sorted."""
    spec = iv.get("spec") if isinstance(iv.get("spec"), dict) else {}
    out = set()
    for pair in spec.get("heads") or ():
        if isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, int) and x >= 0 for x in pair):
            if (num_layers is None or pair[0] < num_layers) and (num_heads is None or pair[1] < num_heads):
                out.add((pair[0], pair[1]))
    return [list(p) for p in sorted(out)]


def badge(iv: dict, num_heads: int | None = None) -> str:
    """One line naming the intervention: 'ablated 12:3, 14:7', 'knockout last -> box:... layers 8-16',
    'image blocked from layer 15', 'sweep last -> image, window 9'; parts joined by ' + '."""
    kinds = iv.get("kind") if isinstance(iv.get("kind"), list) else []
    spec = iv.get("spec") if isinstance(iv.get("spec"), dict) else {}
    parts = []
    heads = heads_of(iv)
    if heads:
        by_layer: dict[int, list[int]] = {}
        for layer, head in heads:
            by_layer.setdefault(layer, []).append(head)
        words = [f"{layer}:*" if num_heads and len(hs) == num_heads else ", ".join(f"{layer}:{h}" for h in hs)
                 for layer, hs in by_layer.items()]
        text = ", ".join(words) if len(heads) <= 8 else f"{len(heads)} heads in layers {layer_list(by_layer)}"
        parts.append(f"ablated {text}" + (" (mean)" if spec.get("ablation") == "mean" else ""))
    for ko in spec.get("knockouts") or ():
        if not isinstance(ko, dict):
            continue
        layers = [x for x in ko.get("layers") or () if isinstance(x, int)]
        if "block-image" in kinds and (ko.get("from"), ko.get("to")) == ("text", "image"):
            parts.append(f"image blocked from layer {min(layers)}" if layers else "image blocked")
        elif "sweep" in kinds:
            continue
        else:
            parts.append(f"knockout {ko.get('from', '?')} → {ko.get('to', '?')} layers {layer_list(layers)}")
    if "sweep" in kinds:
        first = next((ko for ko in spec.get("knockouts") or () if isinstance(ko, dict)), {})
        s = iv.get("sweep") if isinstance(iv.get("sweep"), dict) else first
        parts.append("sweep" + (f" {s['from']} → {s['to']}" if s.get("from") and s.get("to") else "")
                     + (f", window {s['window']}" if s.get("window") else ""))
    return " + ".join(parts) or " + ".join(map(str, kinds)) or str(iv.get("slug") or "intervention")


def describe(iv: dict, run=None) -> dict:
    """What the page shows of meta.intervention (the badge, the ablated heads for the grid, the spec)."""
    spec = iv.get("spec") if isinstance(iv.get("spec"), dict) else {}
    kos = [{"layers": ko.get("layers"), "from": ko.get("from"), "to": ko.get("to")}
           for ko in spec.get("knockouts") or () if isinstance(ko, dict)]
    return clean({"slug": iv.get("slug"), "kind": iv.get("kind"),
                  "label": badge(iv, run.num_heads if run is not None else None),
                  "heads": heads_of(iv, run.num_layers if run else None, run.num_heads if run else None),
                  "ablation": spec.get("ablation", "zero"), "knockouts": kos, "command": iv.get("command"),
                  "pixels": iv.get("pixels"), "base_run": iv.get("base_run")})


# -- the base run and the sweeps, inside what is served ----------------------------------------------
def base_path(folder: Path, iv) -> Path | None:
    """meta.intervention.base_run, relative to ``folder``, resolved (symlinks followed); None if absent."""
    base = iv.get("base_run") if isinstance(iv, dict) else None
    if not isinstance(base, str) or not base or "\0" in base:
        return None
    return (folder / base).resolve()


def sibling_base(reg) -> Path | None:
    """Serving one intervened run: its base run's directory, when that is a run next to it."""
    try:
        base = base_path(reg.root, reg.run(reg.single_name).meta.get("intervention"))
    except (UserError, NotFound):
        return None
    if base is not None and base.parent == reg.root.parent and base != reg.root \
            and not base.name.startswith(".") and (base / RUN_MARKER).is_file():
        return base
    return None


def related_run(reg, name: str) -> Path | None:
    """Serving one run: the directory of ``name`` when it is that run's base run and its sibling."""
    base = sibling_base(reg)
    return base if base is not None and base.name == name else None


def served_name(reg, path: Path) -> tuple[str | None, str | None]:
    """(the registry's name for the run at ``path``, None) or (None, why it is not served)."""
    if reg.single:
        if path == reg.root:
            return reg.single_name, None
        if path.parent != reg.root.parent or related_run(reg, path.name) != path:
            return None, ("it is not the served run's sibling; serve the folder that holds both "
                          "with --runs to compare")
        return path.name, None
    if not path.is_relative_to(reg.root) or path == reg.root:
        return None, "it is outside the served runs root; serve a root that holds both (--runs)"
    return path.relative_to(reg.root).as_posix(), None


def base_of(reg, folder: Path, iv) -> tuple[str | None, str | None]:
    """(base run name, None) or (None, one line saying why the base run cannot be shown)."""
    recorded = iv.get("base_run") if isinstance(iv, dict) else None
    path = base_path(folder, iv)
    if path is None:
        return None, "meta.intervention names no base run (base_run)"
    what = f"base run {recorded!r} (meta.intervention.base_run)"
    if not path.is_dir():
        return None, f"{what} was not found: no folder there (moved or deleted?)"
    if not (path / RUN_MARKER).is_file():
        return None, f"{what} is not a run (no {RUN_MARKER})"
    name, why = served_name(reg, path)
    if name is None:
        return None, f"{what} is not served: {why}"
    try:
        reg.run(name)
    except NotFound:
        return None, f"{what} is not served (hidden or temporary folder)"
    except UserError as e:
        return None, f"{what} cannot be read: {e}"
    return name, None


def sweep_dir(reg, name) -> Path:
    """The sweep folder ``name`` names; NotFound unless it is a sweep the server may show."""
    if not isinstance(name, str) or not name:
        raise ApiError("parameter 'name' (a sweep folder) is required")
    if reg.single:
        path = None
        if "/" not in name and "\\" not in name and "\0" not in name and not name.startswith("."):
            cand = (reg.root.parent / name).resolve()
            meta = sweep_meta(cand) if cand.parent == reg.root.parent else None
            base = base_path(cand, meta.get("intervention")) if meta is not None else None
            if base is not None and base in (reg.root, sibling_base(reg)):
                path = cand
        if path is None:
            raise NotFound(f"unknown sweep {name!r}; serving one run shows only the sweeps of it and of its base")
        return path
    path = reg.folder(name, "sweep")
    if sweep_meta(path) is None:
        raise NotFound(f"unknown sweep {name!r} (no {SWEEP_FORMAT} meta.json and sweep.json there)")
    return path


@lru_cache(maxsize=64)
def _listing(parent: str, mtime_ns: int) -> tuple[str, ...]:
    with os.scandir(parent) as it:
        return tuple(sorted(e.name for e in it if e.is_dir(follow_symlinks=False)))


def sweeps_of(reg, run) -> list[dict]:
    """The sweeps written next to a run (intervene.py's default output folder ``<run>.<slug>``) whose
    base is that run: [{name, label}]."""
    parent = run.path.parent
    try:
        names = _listing(str(parent), parent.stat().st_mtime_ns)
    except OSError:
        return []
    out, prefix = [], run.path.name + "."
    k = bisect.bisect_left(names, prefix)       # sorted: the names that start with the prefix follow
    while k < len(names) and names[k].startswith(prefix):
        n, k = names[k], k + 1
        meta = sweep_meta(parent / n)
        if meta is None or base_path(parent / n, meta.get("intervention")) != run.path.resolve():
            continue
        name, _ = served_name(reg, parent / n) if not reg.single else (n, None)
        if name is not None:
            out.append({"name": name, "label": badge(sweep_intervention(meta, read_json(parent / n, "sweep.json")))})
    return out


def run_fields(name: str, run) -> dict:
    """What /api/initialize adds: ``intervention`` (null for an ordinary run) and ``sweeps``."""
    reg = registry()
    iv = run.meta.get("intervention")
    info = None
    if isinstance(iv, dict):
        info = describe(iv, run)
        info["base"], info["base_error"] = base_of(reg, run.path, iv)
        info["has_effects"] = own_file(run.path, "effects.json") is not None
    return {"intervention": info, "sweeps": sweeps_of(reg, run)}


# -- effects ------------------------------------------------------------------------------------
def numbers(xs, n: int | None = None) -> list | None:
    if not isinstance(xs, list) or (n is not None and len(xs) != n):
        return None
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs):
        return None
    return [float(x) for x in xs]


def read_effects(run) -> tuple[dict | None, str | None]:
    """(effects for the page, None) or (None, why there are none)."""
    if own_file(run.path, "effects.json") is None:
        return None, "this run has no effects.json (intervene.py writes one next to the run's attention)"
    e = read_json(run.path, "effects.json")
    if not isinstance(e, dict) or e.get("format") != EFFECTS_FORMAT:
        return None, f"effects.json is not a {EFFECTS_FORMAT} file"
    if e.get("version") != 1:
        return None, f"effects.json has version {e.get('version')!r}; this viewer reads version 1"
    tf = e.get("teacher_forced") if isinstance(e.get("teacher_forced"), dict) else {}
    tokens = tf.get("tokens")
    base_lp = numbers(tf.get("base_logprobs"), len(tokens) if isinstance(tokens, list) else None)
    new_lp = numbers(tf.get("intervened_logprobs"), len(tokens) if isinstance(tokens, list) else None)
    if not isinstance(tokens, list) or base_lp is None or new_lp is None:
        return None, "effects.json: teacher_forced needs tokens, base_logprobs and intervened_logprobs of one length"
    side = lambda k: e.get(k) if isinstance(e.get(k), dict) else {}   # noqa: E731
    out = {"answers": {"base": side("base").get("answer"), "intervened": side("intervened").get("answer")},
           "tokens": [tok.piece(str(t)) for t in tokens], "raw_tokens": [str(t) for t in tokens],
           "token_ids": tf.get("token_ids"),
           "base_logprobs": base_lp, "intervened_logprobs": new_lp,
           "delta": [b - a for a, b in zip(base_lp, new_lp)],
           "base_sum": tf.get("base_sum", sum(base_lp)), "intervened_sum": tf.get("intervened_sum", sum(new_lp)),
           "yes_no": e.get("yes_no") if isinstance(e.get("yes_no"), dict) else None,
           "standin": bool(e.get("standin"))}
    if isinstance(out["base_sum"], (int, float)) and isinstance(out["intervened_sum"], (int, float)):
        out["delta_sum"] = out["intervened_sum"] - out["base_sum"]
    return clean(out), None


# -- routes -------------------------------------------------------------------------------------
@bp.get("/api/compare")
def compare():
    """The intervened run against its base: both answers, the teacher-forced log-probabilities of the
    base answer's tokens with and without the intervention, P(yes)/P(no), and the base run's name (the
    page draws both maps from /api/attention)."""
    name, run = get_run(params())
    iv = run.meta.get("intervention")
    if not isinstance(iv, dict):
        raise ApiError(f"run {name!r} is not an intervened run (its meta.json has no intervention)", 404)
    reg = registry()
    base, base_error = base_of(reg, run.path, iv)
    effects, effects_error = read_effects(run)
    answers = dict(effects["answers"]) if effects else {"base": None, "intervened": None}
    answers["intervened"] = answers["intervened"] or run.meta.get("answer")
    base_run = reg.run(base) if base else None
    if base_run is not None:
        answers["base"] = answers["base"] or base_run.meta.get("answer")
    return jsonify(success=True, run=name, intervention=describe(iv, run), base=base, base_error=base_error,
                   base_standin=base_run.standin if base_run is not None else None, answers=answers,
                   effects=effects, effects_error=effects_error, standin=run.standin)


@bp.get("/api/sweep")
def sweep():
    """A sweep folder: its intervention, its numbers (sweep.json) and the URL of its picture."""
    reg = registry()
    name = params().get("name")
    path = sweep_dir(reg, name)
    meta = sweep_meta(path)
    data = read_json(path, "sweep.json")
    if not isinstance(data, dict) or data.get("format") != SWEEP_FORMAT:
        raise ApiError(f"sweep {name!r}: sweep.json is not a {SWEEP_FORMAT} file", 500)
    iv = sweep_intervention(meta, data)
    base, base_error = base_of(reg, path, iv)
    centres = data.get("centres") if isinstance(data.get("centres"), list) else []
    bad = [k for k in ("layers", "prob", "relative_change_pct")
           if not isinstance(data.get(k), list) or len(data[k]) != len(centres)]
    png = own_file(path, "sweep.png")
    return jsonify(success=True, name=name, intervention=describe(iv), base=base, base_error=base_error,
                   sweep=clean({k: data.get(k) for k in SWEEP_FIELDS}),
                   problem=f"sweep.json: {', '.join(bad)} do not match centres in length" if bad else None,
                   standin=bool(meta.get("standin") or data.get("standin")),
                   png_url=f"/api/sweep.png?{_query(name)}" if png else None,
                   png_error=None if png else "no sweep.png in this folder")


def _query(name: str) -> str:
    from urllib.parse import urlencode
    return urlencode({"name": name})


@bp.get("/api/sweep.png")
def sweep_png():
    """sweep.png of a sweep folder, as image/png, only if its bytes are a PNG."""
    path = own_file(sweep_dir(registry(), params().get("name")), "sweep.png")
    data = path.read_bytes() if path is not None else b""
    if not data.startswith(PNG_MAGIC):
        raise NotFound("this sweep has no sweep.png" if path is None else "sweep.png is not a PNG file")
    return send_file(io.BytesIO(data), mimetype="image/png", download_name="sweep.png")


@bp.get("/sweep")
def page():
    return render_template("sweep.html")
