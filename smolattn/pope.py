"""POPE (Li et al., EMNLP 2023) question loading, answer parsing and scoring, the answers file and the report.

Pure Python, no model code. Three answer-parsing conventions are implemented, because
published POPE numbers differ by scorer: the official ``AoiDragon/POPE`` ``evaluate.py``,
lmms-eval (exact match) and VLMEvalKit (``YOrN_Extraction``). "yes" is the positive class.
"""
from __future__ import annotations

import hashlib
import json
import re
import string
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import jsonl, outputs, store
from .errors import UserError

SPLITS = ("random", "popular", "adversarial")

# lmms-eval's POPE prompt suffix. Our default because a 256M model needs the hint to answer
# with a single word; every report must name the suffix it used (VLMEvalKit adds none).
SUFFIX_LMMS_EVAL = "\nAnswer the question using a single word or phrase."
DEFAULT_SUFFIX = SUFFIX_LMMS_EVAL


class PopeInputError(ValueError):
    """Bad POPE input; the message is one line, ``<path>:<line>: <what>`` where it applies."""


@dataclass(frozen=True)
class Question:
    split: str
    question_id: int
    image: str
    text: str
    label: str  # "yes" or "no"

    @property
    def key(self) -> tuple[str, int]:
        """``(split, question_id)``: question ids are unique only within a split."""
        return (self.split, self.question_id)


# ----------------------------------------------------------------------------- loading

_OFFICIAL_NAME = re.compile(r"^coco_pope_(random|popular|adversarial)\.jsonl?$")
_SPLIT_NAME = re.compile(r"_(random|popular|adversarial)\.jsonl?$")


def _split_rank(split: str) -> tuple[int, str]:
    return (SPLITS.index(split), "") if split in SPLITS else (len(SPLITS), split)


def _expand(paths) -> list[Path]:
    """Files to read. A folder contributes ``coco_pope_<split>.json[l]`` if it has any,
    else ``*_<split>.json[l]`` (``<split>`` in random/popular/adversarial), in split order."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            names = sorted(f.name for f in p.iterdir() if f.is_file())
            for pattern in (_OFFICIAL_NAME, _SPLIT_NAME):
                found = [(pattern.search(n).group(1), n) for n in names if pattern.search(n)]
                if found:
                    break
            if not found:
                raise PopeInputError(f"{p}: folder has no POPE file named *_<random|popular|adversarial>.json[l]")
            files += [p / n for _, n in sorted(found, key=lambda sn: (_split_rank(sn[0]), sn[1]))]
        elif p.is_file():
            files.append(p)
        else:
            raise PopeInputError(f"{p}: no such file or folder")
    return files


def _file_split(path: Path) -> str:
    name = path.name.lower()
    return next((s for s in SPLITS if s in name), path.stem)


def _read_file(path: Path) -> list[tuple[int, Question]]:
    """``(line number, Question)`` for each non-blank line of one JSONL file."""
    out, default_split = [], _file_split(path)
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise PopeInputError(f"{where}: invalid JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise PopeInputError(f"{where}: expected a JSON object, got {type(rec).__name__}")
            missing = [k for k in ("question_id", "image", "text", "label") if k not in rec]
            if missing:
                raise PopeInputError(f"{where}: missing field(s) {', '.join(missing)}")
            qid = rec["question_id"]
            if isinstance(qid, bool) or not isinstance(qid, int):
                raise PopeInputError(f"{where}: question_id must be an integer, got {qid!r}")
            if not isinstance(rec["image"], str) or not isinstance(rec["text"], str):
                raise PopeInputError(f"{where}: image and text must be strings")
            label = str(rec["label"]).strip().lower()
            if label not in ("yes", "no"):
                raise PopeInputError(f"{where}: label must be 'yes' or 'no', got {rec['label']!r}")
            split = str(rec.get("category") or default_split)
            out.append((lineno, Question(split, qid, rec["image"], rec["text"], label)))
    return out


def load_questions(paths) -> list[Question]:
    """Load POPE questions from JSONL files and/or folders (see ``_expand``), in file order.

    The split comes from a line's ``category`` field, else the file name, else the file stem.
    Raises PopeInputError on missing files, malformed lines and duplicate (split, question_id).
    """
    questions, seen = [], {}
    for path in _expand(paths):
        for lineno, q in _read_file(path):
            if q.key in seen:
                raise PopeInputError(f"{path}:{lineno}: duplicate question {q.key} (first at {seen[q.key]})")
            seen[q.key] = f"{path}:{lineno}"
            questions.append(q)
    return questions


def file_digest(path) -> str:
    """Full SHA-256 hex digest (64 chars) of the file's bytes, comparable with ``sha256sum``; read in
    1 MiB chunks (COCO annotation files run to hundreds of MB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def describe_sources(paths) -> list[dict]:
    """Provenance of each question file: ``{"path", "sha256", "questions"}`` (folders expanded)."""
    return [{"path": str(f), "sha256": file_digest(f), "questions": len(_read_file(f))}
            for f in _expand(paths)]


_QUESTION = re.compile(r"^\s*is\s+there\s+(?:an?\s+)?(.+?)\s+in\s+the\s+image\s*[?.]?\s*$", re.I)


def object_of(question_text: str) -> str:
    """Object named by ``Is there a/an <object> in the image?`` (multi-word objects kept whole)."""
    m = _QUESTION.match(question_text)
    if m:
        return m.group(1)
    s = re.sub(r"^\s*(is|are)\s+there\s+(an?\s+|any\s+)?", "", question_text, flags=re.I)
    return re.sub(r"\s*(in|on)\s+(the|this)\s+(image|picture|photo)\s*[?.]?\s*$|[?.\s]+$", "", s, flags=re.I)


def load_boxes(path) -> dict:
    """COCO instances JSON -> {image file name: {category name (lower case): [[x, y, w, h], ...]}}: the
    boxes the benchmark and the head analysis score attention against."""
    try:
        coco = json.loads(Path(path).read_text())
        names = {c["id"]: c["name"].lower() for c in coco["categories"]}
        files = {im["id"]: im["file_name"] for im in coco["images"]}
        out: dict = {}
        for a in coco["annotations"]:
            out.setdefault(files[a["image_id"]], {}).setdefault(names[a["category_id"]], []).append(a["bbox"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"--annotations {path}: not a readable COCO instances file ({type(e).__name__}: {e})")
    return out


# ----------------------------------------------------------------------------- parsing

def parse_official(raw_answer: str) -> str:
    """AoiDragon/POPE ``evaluate.py``: text before the first '.', commas removed, split on ' ';
    any token exactly 'No', 'not' or 'no' -> "no", else "yes" (so "NO" and "" -> "yes")."""
    text = raw_answer.split(".")[0] if "." in raw_answer else raw_answer
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def parse_lmms_eval(raw_answer: str) -> str | None:
    """lmms-eval: exact match of ``raw.lower().strip()`` with "yes"/"no", else None."""
    s = raw_answer.lower().strip()
    return s if s in ("yes", "no") else None


_PUNCT = str.maketrans({c: " " for c in string.punctuation})


def parse_vlmevalkit(raw_answer: str) -> str | None:
    """VLMEvalKit ``YOrN_Extraction`` (exact-match mode, no LLM judge): lowercase, punctuation
    to spaces, split into words; "yes" xor "no" present decides, else None (Unknown)."""
    words = raw_answer.lower().translate(_PUNCT).split()
    yes, no = "yes" in words, "no" in words
    return "yes" if yes and not no else "no" if no and not yes else None


PARSERS = {"official": parse_official, "lmms_eval": parse_lmms_eval, "vlmevalkit": parse_vlmevalkit}
METRICS = ("accuracy", "precision", "recall", "f1", "yes_ratio")


# ----------------------------------------------------------------------------- scoring

def _div(a: float, b: float) -> float:
    return float(a / b) if b else 0.0


def score(labels: list[str], preds: list[str | None], convention: str) -> dict:
    """Confusion matrix and metrics for one list of labels and parsed predictions.

    Accuracy = correct / total, a None prediction being wrong. Zero denominators give 0.0.
    None predictions (``unparseable``) in the confusion matrix:
      * lmms_eval: excluded from tp/fp/tn/fn altogether (as lmms-eval does);
      * official / vlmevalkit: treated as predicted "no" for recall/F1 (VLMEvalKit maps Unknown
        to 0), i.e. an FN when the label is yes; with label no they are NOT a TN (that would
        make them correct) and are counted only in ``unparseable``.
    yes_ratio: share of "yes" predictions; for lmms_eval the share of "yes" *labels*, which is
    what lmms-eval computes (a quirk: ~0.5 by construction).
    """
    if convention not in PARSERS:
        raise ValueError(f"unknown convention {convention!r}; expected one of {list(PARSERS)}")
    if len(labels) != len(preds):
        raise ValueError(f"{len(labels)} labels but {len(preds)} predictions")
    tp = fp = tn = fn = unparseable = correct = 0
    for label, pred in zip(labels, preds):
        correct += pred == label
        if pred is None:
            unparseable += 1
            fn += convention != "lmms_eval" and label == "yes"
        elif pred == "yes":
            tp, fp = tp + (label == "yes"), fp + (label != "yes")
        else:
            tn, fn = tn + (label != "yes"), fn + (label == "yes")
    total = len(labels)
    precision, recall = _div(tp, tp + fp), _div(tp, tp + fn)
    yes_source = labels if convention == "lmms_eval" else preds
    return {"tp": tp, "fp": fp, "tn": tn, "fn": fn, "unparseable": unparseable, "total": total,
            "accuracy": _div(correct, total), "precision": precision, "recall": recall,
            "f1": _div(2 * precision * recall, precision + recall),
            "yes_ratio": _div(sum(x == "yes" for x in yes_source), total)}


def score_answers(rows: list[dict]) -> dict:
    """Score rows with ``split``, ``label`` and ``raw_answer`` under every convention.

    Returns ``{"conventions": {conv: {"splits": {split: metrics}, "mean": {metric: mean over
    splits}, "all": metrics over all rows}}}``; splits ordered random, popular, adversarial, others.
    """
    splits = sorted({r["split"] for r in rows}, key=_split_rank)
    labels = [str(r["label"]).strip().lower() for r in rows]
    out = {}
    for conv, parse in PARSERS.items():
        preds = [parse(r["raw_answer"]) for r in rows]
        per = {s: score([l for l, r in zip(labels, rows) if r["split"] == s],
                        [p for p, r in zip(preds, rows) if r["split"] == s], conv) for s in splits}
        mean = {m: _div(sum(v[m] for v in per.values()), len(per)) for m in METRICS}
        out[conv] = {"splits": per, "mean": mean, "all": score(labels, preds, conv)}
    return {"conventions": out}


def markdown_table(results: dict, header_lines=()) -> str:
    """Markdown report of ``score_answers`` output: header lines verbatim (pass Markdown, e.g.
    ``"- prompt suffix: ..."``), then per convention one row per split, a "mean" row (mean of
    the split metrics) and an "all" row (all rows pooled)."""
    cols = ["split", "N", "TP", "FP", "TN", "FN", "unparseable",
            "accuracy", "precision", "recall", "F1", "yes-ratio"]
    lines = [*header_lines, ""] if header_lines else []

    def row(name, m, counts=True):
        c = [m[k] if counts else "" for k in ("total", "tp", "fp", "tn", "fn", "unparseable")]
        return "| " + " | ".join([name, *map(str, c), *(f"{m[k]:.4f}" for k in METRICS)]) + " |"

    for conv, res in results["conventions"].items():
        lines += [f"### Convention: {conv}", "", "| " + " | ".join(cols) + " |",
                  "|" + "---|" * len(cols)]
        lines += [row(s, m) for s, m in res["splits"].items()]
        lines += [row("mean", res["mean"], counts=False), row("all", res["all"]), ""]
        if conv == "lmms_eval":
            lines += ["(lmms_eval yes-ratio is the share of *labels* that are yes, as lmms-eval computes it.)", ""]
    return "\n".join(lines)


# ============================================================================ report

def latest(rows) -> dict:
    """{(split, question_id): last row}: a resumed run's newer row (e.g. a retried error) wins."""
    return {(r["split"], r["question_id"]): r for r in rows}


def localisation_summary(rows) -> dict | None:
    """Per split (and all): questions scored (label yes, category has boxes), pointing-game hit rate,
    mean attention mass inside the boxes and mean box fraction (the uniform-map baseline)."""
    att = [r for r in rows if r.get("status") == "ok" and r.get("attention")]
    if not att:
        return None

    def summary(rs):
        scored = [r["attention"] for r in rs if r["attention"].get("hit") is not None]
        mean = lambda k: float(np.mean([a[k] for a in scored])) if scored else 0.0  # noqa: E731
        return {"scored": len(scored), "hits": sum(a["hit"] for a in scored),
                "yes_without_boxes": sum(r["label"] == "yes" and not r["attention"]["has_boxes"] for r in rs),
                "pointing_game": mean("hit"), "mass_in_boxes": mean("mass"), "box_fraction": mean("box_fraction")}

    splits = sorted({r["split"] for r in att}, key=_split_rank)
    return {"splits": {s: summary([r for r in att if r["split"] == s]) for s in splits}, "all": summary(att)}


PARSER_NAMES = {"official": "AoiDragon/POPE evaluate.py (any word No/no/not -> no, else yes)",
                "lmms_eval": "lmms-eval exact match of the lower-cased answer",
                "vlmevalkit": "VLMEvalKit YOrN_Extraction (yes xor no among the words)"}


def report(rows: list[dict], *, sources, config: dict | None, expected: int | None = None) -> tuple[dict, str]:
    """results.json content and the Markdown report for the latest row per question."""
    rows = list(latest(rows).values())
    ok = [r for r in rows if r.get("status") == "ok"]
    errors = [r for r in rows if r.get("status") != "ok"]
    standin = any(r.get("standin") for r in rows)
    template = next((r["prompt"].replace(r["question"], "{question}", 1) for r in ok if r.get("prompt")), None)
    missing = sorted({r["image"] for r in errors if "not found" in str(r.get("error", ""))})
    counts = {"questions": expected if expected is not None else len(rows), "answered": len(ok),
              "errors": len(errors), "images_missing": len(missing),
              "paths": {p: sum(r.get("path") == p for r in ok) for p in ("cached", "naive")}}
    results = {"sources": sources, "standin": standin, "models": sorted({str(r.get("model")) for r in rows}),
               "config": config, "config_keys": sorted({str(r.get("config")) for r in rows}),
               "prompt": {"template": template, "suffix": config.get("suffix") if config else None},
               "parsers": PARSER_NAMES, "counts": counts, **score_answers(ok)}
    loc = localisation_summary(ok)
    if loc:
        results["localisation"] = loc
    header = ["**STAND-IN MODEL (random weights): these numbers say nothing about SmolVLM.**", ""] if standin else []
    header += ["## POPE results", ""]
    header += [f"- question file: `{s['path']}` (sha256 {s['sha256'][:16]}…, {s['questions']} questions)"
               for s in sources or []] or ["- question files: not given (rows scored as stored)"]
    header += [f"- model: {', '.join(results['models'])}" + (" (STAND-IN)" if standin else "")
               + (f", dtype {config['dtype']}, longest edge {config['longest_edge']}, greedy, "
                  f"max {config['max_new_tokens']} new tokens" if config else ""),
               f"- prompt: `{json.dumps(template)}`", "- parsers: " + "; ".join(f"{k}: {v}" for k, v in PARSER_NAMES.items()),
               f"- answered {len(ok)} of {counts['questions']} questions; {len(errors)} failed"
               + (f" ({len(missing)} images missing)" if missing else "")]
    md = markdown_table(results, header)
    if loc:
        md += "\n### Attention localisation (object word; label yes and the category has COCO boxes)\n\n"
        md += "| split | scored | pointing game | mass in boxes | box fraction (uniform) | yes without boxes |\n|---|---|---|---|---|---|\n"
        for name, s in [*loc["splits"].items(), ("all", loc["all"])]:
            md += (f"| {name} | {s['scored']} | {s['pointing_game']:.4f} | {s['mass_in_boxes']:.4f} | "
                   f"{s['box_fraction']:.4f} | {s['yes_without_boxes']} |\n")
    return results, md


# ============================================================================ the output folder

RESULTS_FORMAT = "smolattn-pope-results"
REPORT_LAST_LINE = "<!-- written by smolattn benchmark.py (smolattn-pope-report) -->"


class _AnswersMarker:
    """answers.jsonl is ours: every row is an answers row (a torn last line is ignored)."""

    def on(self, path) -> bool:
        try:
            jsonl.read(path, _check_answer, quiet=True)
            return True
        except (OSError, UserError):
            return False

    def __repr__(self):
        return "answers rows (split, question_id, label, status)"


# results.json written before the "format" field: our exact parser table and the counts
RESULTS_MARKER = outputs.JsonField(RESULTS_FORMAT, legacy=lambda obj: obj.get("parsers") == PARSER_NAMES
                                   and "counts" in obj)
class _ReportMarker(outputs.LastLine):
    """results.md is ours: its last line is our comment, or (written before it existed) it starts
    with our banner or our heading."""
    FIRST = (b"## POPE results\n", b"**STAND-IN MODEL (random weights): these numbers say nothing about SmolVLM.**\n")

    def carried(self, data: bytes) -> bool:
        return super().carried(data) or data.startswith(self.FIRST)

    def on(self, path) -> bool:
        try:
            with open(path, "rb") as f:
                if f.read(max(map(len, self.FIRST))).startswith(self.FIRST):
                    return True
        except OSError:
            return False
        return super().on(path)


REPORT_MARKER = _ReportMarker(REPORT_LAST_LINE)
class _HeadAnalysis:
    """A sub-folder that must be a head analysis (analyze_heads.py --output-dir pope_out/heads, or the
    default ROOT/analysis); head_report imports this module, so its kind is looked up when used."""

    def foreign(self, path):
        from .head_report import KIND as HEADS
        return HEADS.foreign(path)


class _Arms:
    """OUTPUT_DIR/arms/ of benchmark.py --ablate-heads (smolattn.pope_arms): every sub-folder (base,
    ablated, control-D) a POPE output folder of its own."""

    def foreign(self, path):
        return ARMS_KIND.foreign(path)


# OUTPUT_DIR/attention/SPLIT/QUESTION_ID/ runs (each one checked as a run before it is written) and head
# analyses (attention/analysis/, or any other sub-folder of OUTPUT_DIR)
_SPLIT = outputs.Kind("POPE attention split folder", each=[(r"^[^.]", outputs.DIR)])
ATTENTION_KIND = outputs.Kind("POPE attention folder", folders={"analysis": _HeadAnalysis()},
                              each=[(r"^[^.]", _SPLIT)])
KIND = outputs.Kind("POPE output folder", ("answers.jsonl", "results.json", "results.md"),
                    {"attention": ATTENTION_KIND, "arms": _Arms()}, each=[(r"^[^.]", _HeadAnalysis())],
                    markers={"answers.jsonl": _AnswersMarker(), "results.json": RESULTS_MARKER,
                             "results.md": REPORT_MARKER})
ARMS_KIND = outputs.Kind("POPE arms folder", each=[(r"^(base|ablated|control-\d+)$", KIND)])


def check_output(out_dir, runs=()) -> None:
    """Refuse (UserError, one line naming the file), before any work, an --output-dir that holds
    anything but our answers.jsonl, results.json, results.md, attention/, arms/ (--ablate-heads: each arm
    a POPE output folder of its own) and head analyses, and any
    attention run in ``runs`` that is not ours to replace. Creates nothing."""
    outputs.check_target(out_dir, KIND, "move it away or choose another --output-dir", whole=False)
    for run in runs:
        store.check_target(run)


def write_report(out_dir, results: dict, md: str) -> None:
    """results.json and results.md, each replaced atomically only where nothing or a file of ours is."""
    out_dir = Path(out_dir)
    results = {"format": RESULTS_FORMAT, **results, "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    outputs.replace_file(out_dir / "results.json", json.dumps(results, indent=1).encode(), RESULTS_MARKER)
    outputs.replace_file(out_dir / "results.md", (md.rstrip("\n") + "\n\n" + REPORT_LAST_LINE + "\n").encode(), REPORT_MARKER)


# ============================================================================ answers.jsonl

ANSWER_KEYS = {"split", "question_id", "label", "status"}


def _check_answer(row) -> str | None:
    return None if ANSWER_KEYS <= set(row) else "not an answers row (needs split, question_id, label, status)"


def read_answers(path) -> list[dict]:
    """Rows of an answers file (smolattn.jsonl: a torn last line is dropped with a note; bad lines -> UserError)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"answers file not found: {path}")
    return jsonl.read(path, _check_answer)


class AnswersFile:
    """answers.jsonl: one JSON row per question, appended (fsynced) as answers arrive."""

    def __init__(self, path, key: str, overwrite: bool = False):
        """key: the configuration's hash (pope_runner.Config.key()); rows of another one are refused."""
        self.path = Path(path)
        self.rows = [] if overwrite or not self.path.exists() else read_answers(self.path)
        other = sorted({r.get("config") for r in self.rows} - {key}, key=str)
        if other:
            raise UserError(f"{self.path} holds answers made with another configuration (config {', '.join(map(str, other))}"
                            f"; now {key}: model, revision, dtype, processor settings, prompt suffix, longest edge, max new "
                            "tokens, --attention and --methods must all match to resume); pass --overwrite to start "
                            "afresh, or another --output-dir")
        self.writer = jsonl.Writer(self.path, truncate=overwrite, lock=True, check=_check_answer,
                                   busy=f"{self.path} is in use by another benchmark run")

    def done(self) -> set:
        return {k for k, r in latest(self.rows).items() if r.get("status") == "ok"}

    def append(self, row: dict) -> None:
        self.writer.append(row)
        self.rows.append(row)

    def close(self):
        self.writer.close()
