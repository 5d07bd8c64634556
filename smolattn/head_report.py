"""Outputs of the dataset head analysis (analyze_heads.py): what a person looks at, and what the viewer's
dataset page reads.

    OUT/analysis.json   inputs (root, counts, skipped runs, annotations, model, stand-in flag, parameters),
                        the per-head table, the top heads per score and the POPE lens
    OUT/report.md       the same for people: STAND-IN warning, inputs, ranked table, lens table, pictures
    OUT/heads.csv       every (layer, head) with every score, ranked by localisation-head frequency
    OUT/scores.npz      per-run (runs, layers, heads) arrays + run names (the viewer's dataset page)
    OUT/runs.json       per-run labels (split, question, label, prediction, object, answer)
    OUT/grid_<score>.png   layer x head heatmaps         OUT/top_heads.png   top heads on example images

The folder is written under a temporary name and renamed when complete (smolattn.outputs); an existing
folder is replaced only if it is an earlier analysis and holds nothing else: its analysis.json says so
and every entry is one of the names above.
"""
from __future__ import annotations

import csv
import io
import json
import re
import time
from pathlib import Path

import numpy as np

from . import analysis as an
from . import heatmap, outputs, pope, store
from .errors import UserError

FORMAT = "smolattn-head-analysis"
CSV_COLUMNS = ("frequency", "above_elbow", "image_sum", "se", "se_global", "hit", "mass", "on_objects", "auroc")
TOP_ROWS = 20


# The exact names an analysis writes (grid_<score>.png per score); an existing folder is replaced only
# if it holds nothing else and its analysis.json is ours (smolattn.outputs).
KIND = outputs.Kind("head analysis", ("analysis.json", "report.md", "heads.csv", "scores.npz", "runs.json",
                                      "top_heads.png"),
                    each=[(re.compile(r"^grid_(%s)\.png$" % "|".join(map(re.escape, an.SCORES))), None)],
                    marker=("analysis.json", outputs.JsonField(FORMAT)))


def is_analysis(out: Path) -> bool:
    """An earlier head analysis and nothing else (the only folder ``write`` may replace)."""
    out = Path(out)
    return out.is_dir() and any(out.iterdir()) and KIND.owned(out)


def check_output(out: Path) -> None:
    """Refuse, in one line naming the first file that is not ours, to replace a folder that is not an
    earlier analysis and nothing else (never delete what we did not make). Creates nothing."""
    outputs.check_target(out, KIND, "move it away or choose another --output-dir")


def number(x):
    """A score for JSON: None for NaN, "inf" for an infinite SE, else rounded to 6 decimals."""
    x = float(x)
    return None if np.isnan(x) else ("inf" if np.isinf(x) else round(x, 6))


def inputs(ds: an.Dataset, found: int, annotations=None, boxes=None) -> dict:
    return {"root": str(Path(ds.root).resolve()), "runs_found": found, "runs_analysed": len(ds),
            "runs_skipped": len(ds.skipped), "skipped": dict(list(ds.skipped.items())[:50]),
            "runs_skipped_several": len(an.skipped_several(ds.skipped)),   # several images or a video
            "pope_runs": int(ds.pope_mask().sum()) if len(ds) else 0,
            "runs_with_boxes": int(sum(r["boxed"] for r in ds.runs)),
            "annotations": None if not annotations else {"path": str(annotations), "sha256": pope.file_digest(annotations),
                                                         "images": len(boxes or {})},
            "models": ds.models, "standin": ds.standin, "layers_x_heads": list(ds.shape)}


def header(info: dict, params: an.Params) -> list[str]:
    lines = ["**STAND-IN MODEL (random weights): these maps and scores say nothing about SmolVLM.**", ""] \
        if info["standin"] else []
    ann = info["annotations"]
    lines += ["## Localisation heads and hallucination lens", "",
              f"- runs root: `{info['root']}`: {info['runs_found']} runs found, {info['runs_analysed']} analysed, "
              f"{info['runs_skipped']} skipped" + (" (reasons in analysis.json)" if info["runs_skipped"] else "")
              + (f"; {info['runs_skipped_several']} of them: {an.SEVERAL_SKIPPED} (single-image runs only)"
                 if info.get("runs_skipped_several") else ""),
              f"- POPE runs: {info['pope_runs']}; runs scored against COCO boxes: {info['runs_with_boxes']}",
              "- COCO boxes: " + (f"`{ann['path']}` (sha256 {ann['sha256'][:16]}…, {ann['images']} images)" if ann else "none"),
              f"- model: {', '.join(info['models']) or 'none'}" + (" (STAND-IN)" if info["standin"] else "")
              + f"; {info['layers_x_heads'][0]} layers x {info['layers_x_heads'][1]} heads",
              f"- query: {params.query} ({ {'last': 'the last prompt token, which produces the first answer token', 'object': 'the object word (mean of its tokens)', 'answer': 'the first answer token'}[params.query]}); "
              f"SE threshold {params.threshold}; per-run top-k {params.topk}; bottom-row heads dropped: {params.drop_bottom_row}",
              "- SE on the stitched tile grid (global tile apart: se_global); elbow compares values; "
              "absent objects: mass = mean over the image's annotated categories", ""]
    return lines


def ranked_markdown(ds: an.Dataset, table: dict) -> str:
    rows = ds.ranked("frequency", table)[:TOP_ROWS]
    md = "| rank | layer | head | frequency | above elbow | image sum | SE (median) | SE global | pointing game | mass in box | AUROC |\n"
    md += "|---|---|---|---|---|---|---|---|---|---|---|\n"
    f = lambda x: "n/a" if np.isnan(x) else ("inf" if np.isinf(x) else f"{x:.3f}")  # noqa: E731
    for k, (l, h, _) in enumerate(rows, 1):
        md += (f"| {k} | {l} | {h} | " + " | ".join(f(table[c][l, h]) for c in
               ("frequency", "above_elbow", "image_sum", "se", "se_global", "hit", "mass", "auroc")) + " |\n")
    return md


def lens_markdown(lens: dict) -> str:
    top = ", ".join(f"L{l}H{h}" for l, h in lens["top_heads"])
    md = ("\n### POPE hallucination lens (outcome by the official parser)\n\n"
          "Mass: share of the all-heads mean map in the object's boxes (TP/FN), or the mean over the image's "
          "annotated categories (FP/TN); pointing game on the object (present only); 'on objects': share in "
          f"any annotated box. Top-heads mass: the same per head, averaged over {top}.\n\n"
          "| split | outcome | n | mass in box | pointing game | on objects | hottest cell on an object | box fraction (uniform) | top-heads mass |\n"
          "|---|---|---|---|---|---|---|---|---|\n")
    f = lambda x: "n/a" if x is None else f"{x:.3f}"  # noqa: E731
    for split, groups in lens["splits"].items():
        for outcome, g in groups.items():
            md += (f"| {split} | {outcome} | {g['n']} | {f(g['mass'])} | {f(g['hit'])} | {f(g['on_objects'])} | "
                   f"{f(g['hit_any'])} | {f(g['box_fraction'])} | {f(g['top_heads_mass'])} |\n")
    return md


def load(out) -> tuple[an.Dataset, dict]:
    """An analysis folder back as (Dataset, analysis.json content), without re-reading any run."""
    out = Path(out)
    try:
        result = json.loads((out / "analysis.json").read_text())
        if result.get("format") != FORMAT:
            raise ValueError("not a head analysis")
        runs = json.loads((out / "runs.json").read_text())
        with np.load(out / "scores.npz") as z:
            names = [str(n) for n in z["names"]]
            scores = {k: z[k] for k in an.PER_RUN}
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{out}: not a readable head analysis ({type(e).__name__}: {e}); run analyze_heads.py")
    by_name = {r["run"]: r for r in runs}
    results = {n: {**by_name[n], **{k: scores[k][i] for k in an.PER_RUN}} for i, n in enumerate(names)}
    return an.Dataset(result["inputs"]["root"], an.Params(**result["params"]), results, {}), result


# ================================================================================ pictures

def grid_png(path, values: np.ndarray, title: str, better_high: bool) -> None:
    """A layer x head heatmap with a colour bar (NaN/inf cells grey)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    v = np.where(np.isfinite(values), values, np.nan)
    L, H = v.shape
    fig, ax = plt.subplots(figsize=(max(5.5, 2.2 + 0.38 * H), max(3.0, 1.4 + 0.22 * L)), dpi=100)
    cmap = plt.get_cmap("viridis" if better_high else "viridis_r").with_extremes(bad="#bbbbbb")
    im = ax.imshow(np.ma.masked_invalid(v), aspect="auto", cmap=cmap, interpolation="nearest")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(H))
    ax.set_yticks(range(0, L, max(1, L // 15)))
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.05)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def head_map(run: store.Run, rows, layer: int, head: int) -> np.ndarray:
    """One head's map of the query rows on the main view (tiles, or the global tile when unsplit)."""
    lay = run.layer(layer)
    tiles, glob = run.geometry.split(lay.image[head, rows].mean(axis=0))
    return tiles if tiles is not None else glob


def top_heads_png(path, ds: an.Dataset, heads, title: str, per_head: int = 3, boxes=None) -> bool:
    """For each head, its best examples (lowest SE) as overlays on the photos, with the question's
    object boxes (cyan) when ``boxes`` has them. False when no head has an example."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.patches
    import matplotlib.pyplot as plt
    from PIL import Image

    heads = [(l, h) for l, h in heads if ds.examples(l, h, "se", 1)["best"]]
    if not heads:
        return False
    fig, axes = plt.subplots(len(heads), per_head, figsize=(3.2 * per_head, 2.6 * len(heads)), dpi=100, squeeze=False)
    for r, (l, h) in enumerate(heads):
        ex = ds.examples(l, h, "se", per_head)["best"]
        for c in range(per_head):
            ax = axes[r][c]
            ax.axis("off")
            if c >= len(ex):
                continue
            run = store.Run(Path(ds.root) / ex[c]["run"])
            p = run.image_path()
            base = Image.open(p).convert("RGB") if p else Image.new("RGB", run.image_size(), "grey")
            base.thumbnail((480, 480))
            grid = head_map(run, an.query_rows(run, ds.params.query), l, h)
            ax.imshow(heatmap.overlay(base, grid))
            sx, sy = base.width / run.image_size()[0], base.height / run.image_size()[1]
            for bx, by, bw, bh in (an.run_boxes(run, boxes) or {}).get((ex[c]["object"] or "").lower(), []):
                ax.add_patch(matplotlib.patches.Rectangle((bx * sx, by * sy), bw * sx, bh * sy, fill=False,
                                                          edgecolor="cyan", linewidth=1.2))
            label = f" {ex[c]['object']} ({ex[c]['label']})" if ex[c]["object"] else ""
            ax.set_title(f"L{l} H{h}  SE {ex[c]['value']:.2f}{label}\n{ex[c]['run']}", fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


# ================================================================================ everything

def write(out, ds: an.Dataset, found: int, annotations=None, boxes=None, top: int = 4) -> dict:
    """Write every output atomically into ``out``; returns the analysis.json content."""
    out = Path(out)
    check_output(out)
    info = inputs(ds, found, annotations, boxes)
    table = ds.head_table() if len(ds) else None
    lens = ds.lens() if len(ds) else None
    tag = " (STAND-IN, random weights)" if ds.standin else ""
    result = {"format": FORMAT, "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "inputs": info,
              "params": ds.params.to_json(), "scores": {k: v[0] for k, v in an.SCORES.items()},
              "table": {k: [[number(x) for x in row] for row in v] for k, v in (table or {}).items()},
              "top": {k: [[l, h, number(v)] for l, h, v in ds.ranked(k, table)[:TOP_ROWS]] for k in an.SCORES} if table else {},
              "lens": lens}
    md = "\n".join(header(info, ds.params))
    with outputs.atomic_dir(out, KIND, "move it away or choose another --output-dir") as tmp:
        if table is not None:
            md += "\n### Heads ranked by localisation-head frequency\n\n" + ranked_markdown(ds, table)
            if lens:
                md += lens_markdown(lens)
            md += "\n### Pictures\n\n"
            for k, (label, high) in an.SCORES.items():
                if np.all(~np.isfinite(table[k])):
                    continue
                grid_png(tmp / f"grid_{k}.png", table[k], f"{label}{tag}\n{len(ds)} runs, query {ds.params.query}", high)
                md += f"- `grid_{k}.png`: {label}\n"
            best = [(l, h) for l, h, f in ds.ranked("frequency", table)[:top] if f > 0]
            if top_heads_png(tmp / "top_heads.png", ds, best, f"top localisation heads, lowest-SE examples{tag}", boxes=boxes):
                md += "- `top_heads.png`: the top heads' maps on their lowest-SE examples\n"
            buf = io.StringIO()
            w = csv.writer(buf)
            w.writerow(("rank", "layer", "head") + CSV_COLUMNS)
            for k, (l, h, _) in enumerate(ds.ranked("frequency", table), 1):
                w.writerow((k, l, h) + tuple(number(table[c][l, h]) for c in CSV_COLUMNS))
            (tmp / "heads.csv").write_text(buf.getvalue())
            np.savez_compressed(tmp / "scores.npz", names=np.array(ds.names, dtype=str),
                                **{k: v for k, v in ds.scores.items()})
        else:
            md += "\nNo run could be analysed.\n"
        (tmp / "runs.json").write_text(json.dumps([dict(r, run=n) for n, r in zip(ds.names, ds.runs)], default=number))
        (tmp / "report.md").write_text(md)
        (tmp / "analysis.json").write_text(json.dumps(result, indent=1))
    return result | {"markdown": md}
