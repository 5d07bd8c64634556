"""POPE with heads ablated (issue 18): the arms and their side-by-side report.

``benchmark.py ... --ablate-heads SPEC [--control random --control-draws 3 --control-seed 0]`` scores
POPE once per arm, each arm a normal POPE output folder of its own under ``OUTPUT_DIR/arms/``:

* ``base``: no intervention (its configuration, and so its answers, are exactly a plain run's);
* ``ablated``: the heads of SPEC (``smolattn.interventions.parse_heads``: ``12:3,14:7``, ``12:*``,
  ``top:N`` with ``--analysis``) ablated with ``--ablation zero|mean``;
* ``control-D`` (D = 0 .. draws-1, with ``--control random``): as many heads as the ablated set, drawn
  uniformly without replacement from the heads NOT in the ablated set, by
  ``numpy.random.default_rng([seed, D])`` (so draw D is the same whatever the number of draws), ablated
  the same way.

Every arm's heads and ablation enter its configuration fingerprint (``runmeta.pope_settings``), so each
arm's answers.jsonl resumes on its own and refuses another arm's answers. This module is pure Python
(no model): the plan of the arms and the report (:func:`report`) that puts them side by side.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import pope
from .errors import UserError

ARMS_DIR = "arms"
CONTROLS = ("random",)
SHOWN = (("accuracy", "acc"), ("f1", "F1"), ("yes_ratio", "yes"))


@dataclass(frozen=True)
class Arm:
    name: str                       # "base", "ablated", "control-0", ...
    kind: str                       # "base" | "ablated" | "control"
    heads: tuple = ()               # ((layer, head), ...), 0-based, sorted
    ablation: str = "zero"
    draw: int | None = None         # the control draw's index

    def record(self) -> dict:
        return {"kind": self.kind, "heads": [list(h) for h in self.heads], "ablation": self.ablation,
                "draw": self.draw, "dir": f"{ARMS_DIR}/{self.name}"}


def model_shape(model_id: str, revision: str | None = None) -> tuple[int, int] | None:
    """(text layers, attention heads) from the checkpoint's config.json without loading the model; None
    when it is not on this machine (then the heads are checked after loading)."""
    from . import model as mdl

    model_id = mdl.ALIASES.get(model_id, model_id)
    local = Path(model_id).expanduser()
    path = local / "config.json" if local.is_dir() else None
    if path is None and model_id.count("/") == 1:
        try:
            from huggingface_hub import try_to_load_from_cache
            got = try_to_load_from_cache(model_id, "config.json", revision=revision)
            path = Path(got) if isinstance(got, str) else None
        except Exception:  # noqa: BLE001 - no cache, odd id: checked after loading
            path = None
    try:
        text = json.loads(path.read_text())["text_config"]
        return int(text["num_hidden_layers"]), int(text["num_attention_heads"])
    except (AttributeError, OSError, ValueError, KeyError, TypeError):
        return None


def draw_controls(heads, num_layers: int, num_heads: int, draws: int, seed: int) -> list[tuple]:
    """``draws`` random head sets, each as many heads as ``heads``, none of them in ``heads``."""
    chosen = set(map(tuple, heads))
    pool = [(l, h) for l in range(num_layers) for h in range(num_heads) if (l, h) not in chosen]
    if len(pool) < len(chosen):
        raise UserError(f"--control random: {len(chosen)} heads are ablated, only {len(pool)} others are left to "
                        "draw as many random heads from")
    out = []
    for d in range(draws):
        idx = np.random.default_rng([int(seed), d]).choice(len(pool), size=len(chosen), replace=False)
        out.append(tuple(sorted(pool[int(i)] for i in idx)))
    return out


def plan(spec: str, num_layers: int, num_heads: int, *, ablation: str = "zero", analysis=None,
         control: str | None = None, draws: int = 3, seed: int = 0) -> list[Arm]:
    """The arms in the order they run: base, ablated, then each control draw. UserError (one line) for a
    bad SPEC, a bad --ablation or too few heads for the control."""
    from . import interventions as iv

    iv.Spec(ablation=ablation)          # checks the word
    heads = iv.parse_heads(spec, num_layers, num_heads, analysis)
    arms = [Arm("base", "base"), Arm("ablated", "ablated", heads, ablation)]
    if control is not None:
        if control not in CONTROLS:
            raise UserError(f"unknown --control {control!r}; choose one of {', '.join(CONTROLS)}")
        if draws < 1:
            raise UserError("--control-draws must be at least 1")
        arms += [Arm(f"control-{d}", "control", hs, ablation, d)
                 for d, hs in enumerate(draw_controls(heads, num_layers, num_heads, draws, seed))]
    return arms


def holds_other(answers_path, key: str) -> bool:
    """The arm's answers file holds rows of another configuration than ``key`` (--overwrite discards
    those arms only)."""
    path = Path(answers_path)
    return path.is_file() and any(r.get("config") != key for r in pope.read_answers(path))


# ============================================================================ the report

def _spread(values: list[float]) -> dict:
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "sd": float(a.std(ddof=1)) if len(a) > 1 else 0.0,
            "min": float(a.min()), "max": float(a.max()), "values": [float(v) for v in a]}


def _scores(results: dict) -> dict:
    """{convention: {split | "mean" | "all": metrics}} of one arm's pope.report results."""
    return {conv: {**res["splits"], "mean": res["mean"], "all": res["all"]}
            for conv, res in results.get("conventions", {}).items()}


def report(arms: list[tuple[Arm, dict]], *, sources, config: dict | None, control: dict | None = None
           ) -> tuple[dict, str]:
    """results.json content and Markdown for the arms side by side. ``arms``: (arm, its pope.report
    results) in order; ``control``: {"kind", "draws", "seed"} when there is a control."""
    standin = any(r.get("standin") for _, r in arms)
    scores = {a.name: _scores(r) for a, r in arms}
    ctrl = [a for a, _ in arms if a.kind == "control"]
    out = {"kind": "pope-arms", "standin": standin, "sources": sources, "config": config,
           "arms": {a.name: {**a.record(), "config_key": (r.get("config") or {}).get("key"),
                             "counts": r.get("counts"), "scores": scores[a.name]} for a, r in arms}}
    if ctrl:
        summary: dict = {}
        for conv in scores[ctrl[0].name]:
            for part in scores[ctrl[0].name][conv]:
                vals = [scores[a.name].get(conv, {}).get(part) for a in ctrl]
                if all(v is not None for v in vals):
                    summary.setdefault(conv, {})[part] = {m: _spread([v[m] for v in vals]) for m in pope.METRICS}
        out["control"] = {**(control or {}), "excludes_ablated": True, "heads": [[list(h) for h in a.heads] for a in ctrl],
                          "summary": summary}
    return out, markdown(out)


def fmt_heads(heads) -> str:
    return ",".join(f"{l}:{h}" for l, h in heads) or "(none)"


def markdown(res: dict) -> str:
    arms = res["arms"]
    names = [n for n, a in arms.items() if a["kind"] != "control"]
    ctrl = res.get("control")
    abl = next((a for a in arms.values() if a["kind"] == "ablated"), None)
    lines = ["**STAND-IN MODEL (random weights): these numbers say nothing about SmolVLM.**", ""] if res["standin"] else []
    lines += ["## POPE with heads ablated", ""]
    lines += [f"- question file: `{s['path']}` (sha256 {s['sha256'][:16]}…, {s['questions']} questions)"
              for s in res.get("sources") or []]
    cfg = res.get("config") or {}
    if cfg:
        lines.append(f"- model: {cfg.get('model')}" + (" (STAND-IN)" if res["standin"] else "") +
                     f", dtype {cfg.get('dtype')}, longest edge {cfg.get('longest_edge')}, greedy, "
                     f"max {cfg.get('max_new_tokens')} new tokens, suffix `{json.dumps(cfg.get('suffix'))}`")
    if abl:
        lines.append(f"- ablated ({abl['ablation']}): {len(abl['heads'])} heads {fmt_heads(abl['heads'])}")
    if ctrl:
        lines.append(f"- control: {ctrl.get('kind')}, {ctrl.get('draws')} draws (seed {ctrl.get('seed')}) of as many "
                     "heads, drawn from the heads not ablated; shown as mean ± sd over the draws")
        lines += [f"  - control-{d}: {fmt_heads(hs)}" for d, hs in enumerate(ctrl["heads"])]
    for name, a in arms.items():
        c = a.get("counts") or {}
        lines.append(f"- arm `{name}` ({a['dir']}, config {a.get('config_key')}): answered {c.get('answered')} of "
                     f"{c.get('questions')}, {c.get('errors')} failed")
    lines.append("")
    cols = names + (["control"] if ctrl else [])
    first = arms[names[0]]["scores"]
    for conv, parts in first.items():
        lines += [f"### Convention: {conv}", "",
                  "| split | " + " | ".join(f"{c} {short}" for _, short in SHOWN for c in cols) + " |",
                  "|" + "---|" * (1 + len(cols) * len(SHOWN))]
        for part in parts:
            cells = []
            for metric, _ in SHOWN:
                for n in names:
                    m = arms[n]["scores"].get(conv, {}).get(part)
                    cells.append(f"{m[metric]:.4f}" if m else "")
                if ctrl:
                    s = ctrl["summary"].get(conv, {}).get(part)
                    cells.append(f"{s[metric]['mean']:.4f} ± {s[metric]['sd']:.4f}" if s else "")
            lines.append(f"| {part} | " + " | ".join(cells) + " |")
        lines.append("")
        if conv == "lmms_eval":
            lines += ["(lmms_eval yes-ratio is the share of *labels* that are yes, as lmms-eval computes it.)", ""]
    lines.append("Each arm's full report: `arms/<arm>/results.md`.")
    return "\n".join(lines)
