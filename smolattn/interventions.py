"""Interventions: head ablation and attention knockout, in the one "capture" attention function.

* :class:`Spec` / :class:`Knockout` say what to change; ``with applied(spec): ...`` makes every
  forward inside the block (generation, teacher forcing, a cached prefix and its suffixes) apply it.
  ``applied`` also takes a list of specs, one per batch row (a sweep's windows in one batch).
  With no spec active, :func:`smolattn.model.capture_attention` is exactly the plain path.
* Knockout: in each of its layers, the pre-softmax score from each of its query positions to each
  of its key positions is -inf (added to the mask SDPA and the captured rows both use). Positions
  are absolute sequence positions (0 = the first token), whatever the left padding of a batch or
  the layout of a cached prefix (they are counted over the real, unmasked keys).
* Head ablation: the head's slice of the attention output (the input of ``o_proj``) is zeroed
  ("zero"), or replaced by its mean over the real query positions of the same forward call
  ("mean"; a decode step reuses the mean of its generation's prefill call). Its attention pattern
  is still computed (and captured).
* The words of ``intervene.py`` (docs/interventions.md): heads ``L:H``, ``L:*``, ``top:N``;
  ``--from`` last / question / answer / text; ``--to`` image / image:K / frame:K / box: / outside:
  (``box:x0,y0,x1,y1`` on one image, ``box:K:x0,y0,x1,y1`` on image or frame K) / question;
  layers ``a-b`` or lists; sweeps of windows over the layers. Several images in one prompt and
  video runs: ``image`` is every image's (frame's) ``<image>`` positions, ``image:K`` / ``frame:K``
  one image's (frame's), which :class:`smolattn.geometry.Layout` knows.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import geometry as geo
from . import outputs
from . import model as mdl
from .errors import UserError

FROM_WORDS = ("last", "question", "answer", "text")
TO_WORDS = ("image", "question")            # plus image:K, frame:K, box:[K:]x0,y0,x1,y1, outside:[K:]x0,y0,x1,y1
TO_FORMS = ("image:K", "frame:K", "box:x0,y0,x1,y1", "box:K:x0,y0,x1,y1", "outside:x0,y0,x1,y1",
            "outside:K:x0,y0,x1,y1")
ABLATIONS = ("zero", "mean")
EFFECTS_FILE = "effects.json"
SWEEP_FORMAT = "smolattn-sweep"
SWEEP_NAMES = {"meta.json", "sweep.json", "sweep.png"}
SWEEP = outputs.Kind("sweep folder", SWEEP_NAMES, marker=("meta.json", outputs.JsonField(SWEEP_FORMAT)))


@dataclass(frozen=True)
class Knockout:
    layers: tuple[int, ...]
    queries: tuple[int, ...]        # absolute sequence positions
    keys: tuple[int, ...]           # absolute sequence positions


@dataclass(frozen=True)
class Spec:
    heads: tuple[tuple[int, int], ...] = ()     # (layer, head), 0-based
    ablation: str = "zero"                      # "zero" | "mean"
    knockouts: tuple[Knockout, ...] = ()

    def __post_init__(self):
        if self.ablation not in ABLATIONS:
            raise UserError(f"unknown --ablation {self.ablation!r}; choose one of {', '.join(ABLATIONS)}")

    def __bool__(self) -> bool:
        return bool(self.heads or self.knockouts)


# ================================================================================ in the attention function

class _Active:
    """The specs of one ``applied`` block as the capture function uses them (per layer, per batch row)."""

    def __init__(self, specs: list[Spec]):
        self.specs = specs
        self.knock: dict[int, list] = {}       # layer -> [(batch row or None for all, Knockout)]
        self.heads: dict[int, list] = {}       # layer -> [(batch row or None, head, ablation)]
        self.means: dict[int, object] = {}     # layer -> (B, H, D) mean output of its last multi-query call
        self._tensors: dict = {}
        one = len(specs) == 1
        for r, spec in enumerate(specs):
            for k in spec.knockouts:
                for layer in k.layers:
                    self.knock.setdefault(int(layer), []).append((None if one else r, k))
            for layer, head in spec.heads:
                self.heads.setdefault(int(layer), []).append((None if one else r, int(head), spec.ablation))

    def _rows(self, r, B):
        if r is None:
            return slice(None)
        if B != len(self.specs):
            raise RuntimeError(f"applied() got {len(self.specs)} specs (one per batch row) for a batch of {B}")
        return r

    def _positions(self, values, device):
        import torch

        key = (id(values), str(device))
        if key not in self._tensors:
            self._tensors[key] = (values, torch.as_tensor(np.asarray(values, dtype=np.int64), device=device))
        return self._tensors[key][1]

    @staticmethod
    def allowed(attention_mask, B: int, q_len: int, k_len: int, device):
        """The mask SDPA applies, as a boolean (B, 1, q, k): True = the query may see the key."""
        import torch

        if attention_mask is None:
            if q_len == 1:
                return torch.ones((B, 1, 1, k_len), dtype=torch.bool, device=device)
            q = torch.arange(q_len, device=device)[:, None] + (k_len - q_len)
            return (torch.arange(k_len, device=device)[None, :] <= q).expand(B, 1, q_len, k_len)
        m = attention_mask[..., :k_len]
        if m.dtype != torch.bool:
            m = m == 0
        return m.expand(B, -1, q_len, -1) if m.shape[2] == 1 else m.expand(B, -1, -1, -1)

    @staticmethod
    def real_keys(allowed):
        """(B, k): the keys that are real tokens (not padding): what the last query row may see."""
        return allowed[:, 0, -1, :]

    def mask(self, layer: int, query, key, attention_mask):
        """The attention mask with this layer's knockouts added (unchanged when it has none)."""
        ko = self.knock.get(layer)
        if not ko:
            return attention_mask
        import torch

        B, q_len, k_len, dev = query.shape[0], query.shape[2], key.shape[2], query.device
        allowed = self.allowed(attention_mask, B, q_len, k_len, dev)
        real = self.real_keys(allowed)
        pos = real.long().cumsum(-1) - 1                  # absolute position of every key
        qpos, qreal = pos[:, k_len - q_len:], real[:, k_len - q_len:]
        knock = torch.zeros((B, q_len, k_len), dtype=torch.bool, device=dev)
        for r, k in ko:
            rows = self._rows(r, B)
            qm = torch.isin(qpos[rows], self._positions(k.queries, dev)) & qreal[rows]
            km = torch.isin(pos[rows], self._positions(k.keys, dev)) & real[rows]
            knock[rows] |= qm[..., :, None] & km[..., None, :]
        new = allowed & ~knock[:, None]
        # a query whose every visible key is knocked out keeps them (its softmax would be undefined)
        return torch.where(new.any(-1, keepdim=True), new, allowed)

    def ablate(self, layer: int, out, k_len: int, attention_mask):
        """Remove the ablated heads' output; ``out`` (B, q, H, D) is the input of ``o_proj``."""
        hs = self.heads.get(layer)
        if not hs:
            return out
        B, q_len = out.shape[:2]
        out = out.clone()
        mean = None
        if any(a == "mean" for _, _, a in hs):
            if q_len > 1:
                real = self.real_keys(self.allowed(attention_mask, B, q_len, k_len, out.device))[:, k_len - q_len:]
                w = real.to(out.dtype)[:, :, None, None]
                mean = (out * w).sum(1) / w.sum(1).clamp(min=1)              # (B, H, D)
                self.means[layer] = mean
            else:
                mean = self.means.get(layer, out[:, 0])
        for r, h, a in hs:
            rows = self._rows(r, B)
            if a == "zero":
                out[rows, :, h] = 0
            else:
                out[rows, :, h] = mean[rows, h].unsqueeze(-2) if r is None else mean[rows, h]
        return out


@contextmanager
def applied(spec):
    """Apply ``spec`` (a :class:`Spec`, or a list of them: one per batch row) to every forward of the
    capture attention inside the block, in this thread. Nests: the outer spec comes back after."""
    specs = list(spec) if isinstance(spec, (list, tuple)) else [spec]
    before = getattr(mdl._local, "intervention", None)
    mdl._local.intervention = _Active(specs) if any(specs) else None
    try:
        yield
    finally:
        mdl._local.intervention = before


# ================================================================================ the words

def _int(text: str, what: str) -> int:
    if not re.fullmatch(r"\d+", text.strip()):
        raise UserError(f"{what}: {text!r} is not a non-negative integer")
    return int(text)


def parse_layers(text: str, num_layers: int, flag: str = "--layers") -> tuple[int, ...]:
    """``a-b`` or a list ``0,5,10-12`` (0-based, inclusive), each within 0..num_layers-1."""
    out: list[int] = []
    for part in str(text).split(","):
        a, sep, b = part.partition("-")
        lo = _int(a, flag)
        hi = _int(b, flag) if sep else lo
        if hi < lo:
            raise UserError(f"{flag}: {part!r} runs backwards")
        if hi >= num_layers:
            raise UserError(f"{flag}: layer {hi} is out of range (this model has layers 0-{num_layers - 1})")
        out += [i for i in range(lo, hi + 1) if i not in out]
    return tuple(sorted(out))


def parse_heads(text, num_layers: int, num_heads: int, analysis=None) -> tuple[tuple[int, int], ...]:
    """``12:3,14:7``, ``12:*`` (every head of layer 12) or ``top:N`` (the N most frequent localisation
    heads of the head analysis folder ``analysis``, its default ranking). 0-based."""
    text = str(text).strip()
    if text.startswith("top:"):
        n = _int(text[4:], "--ablate-heads top:N")
        if n < 1:
            raise UserError("--ablate-heads top:N needs N >= 1")
        if analysis is None:
            raise UserError("--ablate-heads top:N needs --analysis (a folder written by analyze_heads.py)")
        from . import head_report

        ds, _ = head_report.load(analysis)
        if tuple(ds.shape) != (num_layers, num_heads):
            raise UserError(f"{analysis}: the analysis is of a {ds.shape[0]} x {ds.shape[1]} layer x head model, "
                            f"the run's model has {num_layers} x {num_heads}")
        ranked = [(l, h) for l, h, f in ds.ranked("frequency") if f > 0]
        if len(ranked) < n:
            raise UserError(f"{analysis}: only {len(ranked)} heads were ever selected as localisation heads; "
                            f"top:{n} asks for {n}")
        return tuple(sorted(ranked[:n]))
    heads: list[tuple[int, int]] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        layer, sep, head = part.partition(":")
        if not sep:
            raise UserError(f"--ablate-heads: {part!r} is not LAYER:HEAD, LAYER:* or top:N")
        L = _int(layer, "--ablate-heads layer")
        if L >= num_layers:
            raise UserError(f"--ablate-heads: layer {L} is out of range (layers 0-{num_layers - 1})")
        hs = range(num_heads) if head.strip() == "*" else [_int(head, "--ablate-heads head")]
        for h in hs:
            if h >= num_heads:
                raise UserError(f"--ablate-heads: head {h} is out of range (heads 0-{num_heads - 1})")
            if (L, h) not in heads:
                heads.append((L, h))
    if not heads:
        raise UserError("--ablate-heads names no head")
    return tuple(sorted(heads))


def parse_box(text: str, flag: str) -> tuple[float, float, float, float]:
    try:
        box = tuple(float(v) for v in text.split(","))
    except ValueError:
        box = ()
    if len(box) != 4 or not box[0] < box[2] or not box[1] < box[3]:
        raise UserError(f"{flag}: {text!r} is not x0,y0,x1,y1 with x0 < x1 and y0 < y1 (pixels of the original image)")
    return box


def question_positions(tokenizer, prompt: str, ids, geometry: geo.Geometry) -> list[int]:
    """The positions of the user's prompt text: what the prompt string tokenises to after the image
    block, before the chat template's end of turn (by character offsets of the text after the image
    block, which tokenises exactly as in the full prompt: it starts after a special token)."""
    last = geometry.image_block[1]
    tail_ids = list(ids[last + 1:])
    text = tokenizer.decode(tail_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    start = text.find(prompt)
    if start < 0:
        return []
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if list(enc["input_ids"]) != tail_ids:
        return []
    end = start + len(prompt)
    return [last + 1 + i for i, (a, b) in enumerate(enc["offset_mapping"]) if a < end and b > start]


@dataclass
class Words:
    """What the position words mean for one run: everything from its meta (no model needed).
    ``geometry``: the run's Geometry or Layout (several images, a video's frames); ``image_size``:
    (W, H) of the one image, or a list of each image's (frame's) original size."""
    ids: list
    prompt_length: int
    geometry: object
    image_size: tuple
    question: list | None          # None: not resolved (needs the tokenizer)
    max_new_tokens: int
    num_layers: int

    @property
    def layout(self) -> geo.Layout:
        g = self.geometry
        return g if isinstance(g, geo.Layout) else geo.Layout.single(g)

    def size_of(self, k: int) -> tuple:
        sizes = self.image_size
        return tuple(sizes[k]) if np.ndim(sizes) == 2 else tuple(sizes)

    def image_index(self, text: str, word: str, flag: str) -> int:
        """Image (or frame) K of ``image:K`` / ``frame:K`` / ``box:K:...``, checked against the run."""
        layout = self.layout
        what = "frame" if layout.is_video else "image"
        k = _int(text, f"{flag} {word}: the {what} index")
        if k >= len(layout):
            raise UserError(f"{flag} {word}: {what} {k} out of range: this run has {len(layout)} "
                            f"{what}{'s' if len(layout) > 1 else ''} (0..{len(layout) - 1})")
        return k

    def image_positions(self, k: int) -> list[int]:
        """The ``<image>`` positions of image (frame) ``k`` (its block's tiles and global tile)."""
        layout = self.layout
        return layout.key_positions[layout.keys_of(k)].tolist()

    def positions(self, word: str, flag: str) -> tuple[int, ...]:
        P, S, layout = self.prompt_length, len(self.ids), self.layout
        last = layout.image_block[1]
        head, _, rest = word.partition(":")
        if word == "last":
            out = [P - 1]
        elif word == "question":
            if self.question is None:
                raise UserError(f"{flag} question: the tokenizer is needed to find the question")
            out = [p for p in self.question if p != P - 1]
        elif word == "answer":
            out = list(range(P, S - 1))
        elif word == "text":      # every position after the (last) image block, generated ones included
            out = list(range(last + 1, max(S, P + self.max_new_tokens)))
        elif word == "image":
            out = layout.key_positions.tolist()
        elif head in ("image", "frame") and rest:
            if (head == "frame") != layout.is_video:
                raise UserError(f"{flag} {word}: frame:K is for video runs, image:K for runs of images; "
                                f"this run is {'a video: use frame:K' if layout.is_video else 'of images: use image:K'}")
            out = self.image_positions(self.image_index(rest, word, flag))
        elif head in ("box", "outside"):
            k, box = self.box(word, flag)
            inside = self.box_positions(box, k)
            out = inside if head == "box" else sorted(set(self.image_positions(k)) - set(inside))
            if not inside and head == "box":
                w, h = self.size_of(k)
                where = f"{'frame' if layout.is_video else 'image'} {k} " if len(layout) > 1 else "image "
                raise UserError(f"{flag} {word}: the box covers no image cell centre ({where}{w}x{h} px)")
        else:
            allowed = FROM_WORDS if flag == "--from" else TO_WORDS + TO_FORMS
            raise UserError(f"{flag}: unknown word {word!r}; use one of {', '.join(allowed)}")
        if flag == "--from" and word not in FROM_WORDS:
            raise UserError(f"--from: {word!r} is a --to word; use one of {', '.join(FROM_WORDS)}")
        if not out:
            raise UserError(f"{flag} {word}: the position set is empty for this run")
        return tuple(int(p) for p in out)

    def box(self, word: str, flag: str) -> tuple[int, tuple]:
        """(image index, (x0, y0, x1, y1)) of ``box:[K:]x0,y0,x1,y1`` / ``outside:[K:]...``: without K
        image 0 of a one-image run; a run of several images (frames) must say which."""
        kind, _, spec = word.partition(":")
        index, sep, coords = spec.rpartition(":")
        layout = self.layout
        if sep:
            k = self.image_index(index, word, flag)
        elif len(layout) > 1:
            what = "frame" if layout.is_video else "image"
            raise UserError(f"{flag} {word}: this run has {len(layout)} {what}s: say which, "
                            f"{kind}:K:x0,y0,x1,y1 (K = 0..{len(layout) - 1})")
        else:
            k = 0
        return k, parse_box(coords, f"{flag} {kind}:")

    def box_positions(self, box, k: int = 0) -> list[int]:
        """The <image> positions of image ``k`` (tiles and global) whose cell centre lies in ``box``
        (x0, y0, x1, y1 in that image's original pixels)."""
        x0, y0, x1, y1 = box
        layout = self.layout
        keys = layout.keys_in_box(k, (x0, y0, x1 - x0, y1 - y0), self.size_of(k))
        return sorted(layout.key_positions[keys].tolist())


def windows(num_layers: int, window: int) -> list[tuple[int, int]]:
    """One window per layer l: layers max(0, l - w//2) .. min(last, l + w//2) (InformationFlow.py)."""
    if window < 1:
        raise UserError("--window must be at least 1")
    return [(max(0, l - window // 2), min(num_layers - 1, l + window // 2)) for l in range(num_layers)]


def slug(args) -> str:
    """The intervention's name in the default output folder ``<run>.<slug>``."""
    clean = lambda s: re.sub(r"[^A-Za-z0-9.+-]+", ".", str(s)).strip(".")  # noqa: E731
    parts = []
    if args.sweep:
        parts.append(f"sweep-{clean(args.from_)}-{clean(args.to)}-w{args.window}")
    if args.ablate_heads:
        parts.append("ablate-" + ("mean-" if args.ablation == "mean" else "") +
                     "-".join(clean(h.replace("*", "all")) for h in args.ablate_heads.split(",")))
    if args.knockout:
        parts.append(f"knockout-{clean(args.from_)}-{clean(args.to)}-L{clean(args.layers)}")
    if args.block_image_from is not None:
        parts.append(f"block-image-from-{args.block_image_from}")
    s = "_".join(parts)
    if len(s) > 80:
        s = s[:64] + "-" + hashlib.sha256(s.encode()).hexdigest()[:8]
    return s


# ================================================================================ the model side

def image_features(loaded, inputs):
    """The vision encoder + connector once (``get_image_features`` output) for all passes of a run."""
    import torch

    pv = inputs["pixel_values"]
    if loaded.dtype != "float32":
        pv = pv.to(getattr(torch, loaded.dtype))
    with torch.inference_mode():
        return loaded.model.model.get_image_features(pv, inputs.get("pixel_attention_mask"), return_dict=True)


def teacher_forced(loaded, ids, prompt_length: int, features):
    """One forward over ``ids`` with the image ``features``: the log-probabilities (float32) of the
    vocabulary at positions P-1 .. S-2, (max(1, S - P), V) (row i predicts token P + i)."""
    import torch

    t = torch.tensor([list(ids)], device=loaded.device)
    with torch.inference_mode():
        out = loaded.model(input_ids=t, attention_mask=torch.ones_like(t), mm_encoder_outputs={"image": features},
                           use_cache=False, logits_to_keep=len(ids) - prompt_length + 1)
    return torch.log_softmax(out.logits[0, :max(1, len(ids) - prompt_length)].float(), dim=-1)


def teacher_forced_after(loaded, ids, prompt_length: int, kept: dict):
    """:func:`teacher_forced` from a generation of the same prompt (``kept`` from engine.run's ``keep``):
    its first step's logits predict token P; the base answer's tokens P..S-2 then run on a fresh copy
    of the generation's prompt cache (positions 0..P-1). Same rows as the full forward, up to float
    rounding, for any intervention whose effect on a position does not depend on later positions
    (zero ablation, knockouts; not mean ablation)."""
    import torch
    from transformers import DynamicCache

    P, first = prompt_length, kept["first_logits"][:1].float()
    rest = list(ids[P:-1])
    if not rest:
        return torch.log_softmax(first, dim=-1)
    cache = DynamicCache(ddp_cache_data=[(layer.keys[:1, :, :P], layer.values[:1, :, :P])
                                         for layer in kept["cache"].layers])
    t = torch.tensor([rest], device=loaded.device)
    with torch.inference_mode():
        out = loaded.model(input_ids=t, attention_mask=torch.ones((1, P + len(rest)), dtype=torch.long,
                                                                  device=loaded.device),
                           position_ids=torch.arange(P, P + len(rest), device=loaded.device)[None],
                           cache=cache, use_cache=True)
    return torch.log_softmax(torch.cat([first, out.logits[0].float()]), dim=-1)


def yes_no_ids(tokenizer) -> tuple[list[int], list[int]]:
    """Every vocabulary id whose text, stripped and lower-cased, is "yes" (resp. "no")."""
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))], skip_special_tokens=False)
    yes = [i for i, t in enumerate(texts) if t.strip().lower() == "yes"]
    no = [i for i, t in enumerate(texts) if t.strip().lower() == "no"]
    return yes, no


def effects(tokenizer, base_lp, int_lp, ids, P: int, new_ids) -> dict:
    """effects.json's comparison of the base and the intervened teacher-forced passes."""
    import torch

    answer = list(ids[P:])
    idx = torch.arange(len(answer))
    target = torch.tensor(answer, dtype=torch.long)
    b = base_lp[idx, target].tolist() if answer else []
    i = int_lp[idx, target].tolist() if answer else []
    yes_no = None
    if answer and tokenizer.decode([answer[0]]).strip().lower() in ("yes", "no"):
        yes, no = yes_no_ids(tokenizer)
        p = lambda lp, s: float(lp[0, s].exp().sum()) if s else 0.0  # noqa: E731
        yes_no = {"base": {"p_yes": p(base_lp, yes), "p_no": p(base_lp, no)},
                  "intervened": {"p_yes": p(int_lp, yes), "p_no": p(int_lp, no)}}
    return {"teacher_forced": {"tokens": tokenizer.convert_ids_to_tokens(answer), "token_ids": answer,
                               "base_logprobs": b, "intervened_logprobs": i,
                               "base_sum": float(sum(b)), "intervened_sum": float(sum(i))},
            "yes_no": yes_no}


def sweep_probs(loaded, jobs) -> list[list[float]]:
    """Probabilities of each job's token at its last position under each of its specs, all in ONE
    batch: ``jobs`` are (prefix, suffix ids, specs, token id) with ``prefix`` an engine.Prefix (its
    ids and KV cache, computed once, not modified); every spec is a batch row over a fresh stacked
    copy of its prefix's cache (left-padded as engine.answer_cached lays out a batch)."""
    import torch

    from . import engine

    rows = [(p, s, spec) for p, s, specs, _ in jobs for spec in specs]
    P = max(len(p.ids) for p, _, _ in rows)
    S = max(len(s) for _, s, _ in rows)
    pad_id = loaded.processor.tokenizer.pad_token_id
    ids, mask = [], []
    for p, s, _ in rows:
        a, b = P - len(p.ids), S - len(s)
        ids.append([pad_id] * b + list(s))
        mask.append([0] * a + [1] * len(p.ids) + [0] * b + [1] * len(s))
    ids = torch.tensor(ids, device=loaded.device)
    mask = torch.tensor(mask, device=loaded.device)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)[:, P:]
    cache = engine.stack_caches([p for p, _, _ in rows])
    with torch.inference_mode(), applied([spec for _, _, spec in rows]):
        logits = loaded.model(input_ids=ids, attention_mask=mask, position_ids=position_ids, cache=cache,
                              use_cache=True, logits_to_keep=1).logits[:, -1].float()
    probs = torch.softmax(logits, dim=-1)
    out, r = [], 0
    for _, _, specs, token in jobs:
        out.append([float(probs[r + j, token]) for j in range(len(specs))])
        r += len(specs)
    return out


def prefix(loaded, inputs, end: int, features):
    """The KV cache of positions 0..end-1 of processor ``inputs`` (an engine.Prefix; no intervention)."""
    import torch

    from . import engine

    ids = inputs["input_ids"][:, :end]
    with torch.inference_mode():
        out = loaded.model(input_ids=ids, attention_mask=inputs["attention_mask"][:, :end],
                           mm_encoder_outputs={"image": features}, use_cache=True, logits_to_keep=1)
    return engine.Prefix(ids[0].tolist(), "", "", out.cache, None)


# ================================================================================ intervene.py

REQUIRED_META = (("model", "id"), ("model", "revision"), ("model", "dtype"), ("processor", "longest_edge"),
                 ("prompt",), ("generation", "max_new_tokens"), ("token_ids",), ("prompt_length",),
                 ("image", "size"), ("model", "num_layers"), ("model", "num_heads"))
VIDEO_META = ("fps", "total_frames", "duration", "size")     # a video run's frames are rebuilt from these


def add_arguments(ap) -> None:
    ap.add_argument("--run", required=True, help="the base run folder (written by extract_smolvlm_attn.py)")
    ap.add_argument("--output-dir", default=None, help="default: a new sibling <run>.<intervention-slug>")
    ap.add_argument("--ablate-heads", default=None, help="12:3,14:7 | 12:* | top:N (with --analysis); 0-based")
    ap.add_argument("--analysis", default=None, help="head analysis folder (analyze_heads.py) for top:N")
    ap.add_argument("--ablation", choices=ABLATIONS, default="zero",
                    help="zero the heads' output, or replace it by its mean over the sequence's positions")
    ap.add_argument("--knockout", action="store_true", help="-inf from the --from to the --to positions in --layers")
    ap.add_argument("--from", dest="from_", default=None, help="query positions: last, question, answer, text")
    ap.add_argument("--to", default=None, help="key positions: image, image:K, frame:K (a video), box:x0,y0,x1,y1, "
                    "outside:x0,y0,x1,y1, question; several images or frames: box:K:x0,y0,x1,y1, outside:K:...")
    ap.add_argument("--layers", default=None, help="a-b or a list 0,5,10-12 (0-based)")
    ap.add_argument("--block-image-from", type=int, default=None,
                    help="L: = --knockout --from text --to image --layers L-(last)")
    ap.add_argument("--sweep", action="store_true", help="knockout --from/--to in a window around every layer")
    ap.add_argument("--window", type=int, default=9, help="--sweep window width in layers (default 9)")
    ap.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")


def _get(meta, path):
    for k in path:
        if not isinstance(meta, dict) or k not in meta:
            return KeyError
        meta = meta[k]
    return meta


def read_base(path):
    """The base run and its meta, refused in one line when it cannot be reproduced."""
    from . import store

    path = Path(path)
    if not (path / "meta.json").is_file() and (path / "decoded_tokens.npy").is_file():
        raise UserError(f"{path} is a reference-format run (no meta.json): it records no model, prompt or "
                        "settings to reproduce; extract it again with extract_smolvlm_attn.py")
    run = store.Run(path)
    missing = [".".join(k) for k in REQUIRED_META if _get(run.meta, k) is KeyError]
    if run.layout.is_video:
        missing += [f"video.{k}" for k in VIDEO_META if _get(run.meta, ("video", k)) is KeyError]
    if run.meta.get("images"):
        missing += [f"images[{k}].{f}" for k, e in enumerate(run.meta["images"])
                    for f in ("size",) + (("index",) if run.layout.is_video else ()) if f not in e]
    if missing:
        raise UserError(f"{path}: the run's meta.json lacks {', '.join(missing)}: it cannot be reproduced")
    return run


@dataclass
class Plan:
    """Everything intervene.py will do, checked before the model loads."""
    run: object
    out: Path
    slug: str
    kinds: list
    spec: Spec
    described: list                  # knockouts with their words, for meta.intervention.spec
    words: Words
    sweep: dict | None = None        # window, from, to, windows, queries, keys
    command: str = ""


def _tokenizer(meta):
    from transformers import AutoTokenizer

    m = meta["model"]
    try:   # the cached or local copy first: no network wait for a model that is here
        return AutoTokenizer.from_pretrained(m["id"], revision=m["revision"], local_files_only=True)
    except (OSError, ValueError):
        pass
    try:
        return AutoTokenizer.from_pretrained(m["id"], revision=m["revision"])
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load the tokenizer of {meta['model']['id']}: {str(e).splitlines()[0]}")


def plan(args, argv=None) -> Plan:
    """Check every input against the base run (no model): one line for any problem."""
    import shlex
    import sys

    run = read_base(args.run)
    meta = run.meta
    L, H = int(meta["model"]["num_layers"]), int(meta["model"]["num_heads"])
    P = int(meta["prompt_length"])
    wanted = [args.ablate_heads is not None, args.knockout, args.block_image_from is not None, args.sweep]
    if not any(wanted):
        raise UserError("say what to do: --ablate-heads, --knockout, --block-image-from or --sweep")
    if args.sweep and sum(wanted) > 1:
        raise UserError("--sweep runs alone (no --ablate-heads, --knockout or --block-image-from with it)")
    if (args.knockout or args.sweep) and (args.from_ is None or args.to is None):
        raise UserError(f"{'--sweep' if args.sweep else '--knockout'} needs --from and --to")
    if args.knockout and args.layers is None:
        raise UserError("--knockout needs --layers")
    if not (args.knockout or args.sweep) and (args.from_ or args.to or args.layers):
        raise UserError("--from, --to and --layers go with --knockout or --sweep")
    if args.analysis and not (args.ablate_heads or "").startswith("top:"):
        raise UserError("--analysis goes with --ablate-heads top:N")
    question = None
    if "question" in (args.from_, args.to):
        question = question_positions(_tokenizer(meta), meta["prompt"], meta["token_ids"][:P], run.geometry)
    sizes = [run.image_size(k) for k in range(len(run.layout))]
    words = Words(list(meta["token_ids"]), P, run.geometry, sizes[0] if len(sizes) == 1 else sizes, question,
                  int(meta["generation"]["max_new_tokens"]), L)
    heads, knockouts, described, kinds, sweep = (), [], [], [], None
    if args.ablate_heads is not None:
        heads = parse_heads(args.ablate_heads, L, H, args.analysis)
        kinds.append("ablate")
    if args.knockout:
        layers = parse_layers(args.layers, L)
        k = Knockout(layers, words.positions(args.from_, "--from"), words.positions(args.to, "--to"))
        knockouts.append(k)
        described.append({"layers": list(layers), "from": args.from_, "to": args.to})
        kinds.append("knockout")
    if args.block_image_from is not None:
        if not 0 <= args.block_image_from < L:
            raise UserError(f"--block-image-from: layer {args.block_image_from} is out of range (layers 0-{L - 1})")
        layers = tuple(range(args.block_image_from, L))
        knockouts.append(Knockout(layers, words.positions("text", "--from"), words.positions("image", "--to")))
        described.append({"layers": list(layers), "from": "text", "to": "image"})
        kinds.append("block-image")
    if args.sweep:
        if args.from_ == "answer":
            raise UserError("--sweep --from answer: the answer positions come after the first answer token, "
                            "which the sweep measures; use last, question or text")
        if len(words.ids) <= P:
            raise UserError(f"{args.run}: the base answer is empty: the sweep has no first answer token to measure")
        queries = tuple(q for q in words.positions(args.from_, "--from") if q < P)
        keys = words.positions(args.to, "--to")
        sweep = {"window": args.window, "from": args.from_, "to": args.to, "windows": windows(L, args.window),
                 "queries": queries, "keys": keys}
        kinds.append("sweep")
    spec = Spec(heads, args.ablation, tuple(knockouts))
    name = slug(args)
    out = Path(args.output_dir) if args.output_dir else run.path.parent / f"{run.path.name}.{name}"
    argv = sys.argv[1:] if argv is None else list(argv)
    command = "python intervene.py " + " ".join(shlex.quote(a) for a in argv)
    return Plan(run, out, name, kinds, spec, described, words, sweep, command)


def _spec_json(pl: Plan) -> dict:
    kn = [dict(d, queries=list(k.queries), keys=list(k.keys)) for d, k in zip(pl.described, pl.spec.knockouts)]
    if pl.sweep:
        kn = [{"layers": list(range(lo, hi + 1)), "from": pl.sweep["from"], "to": pl.sweep["to"],
               "queries": list(pl.sweep["queries"]), "keys": list(pl.sweep["keys"])} for lo, hi in pl.sweep["windows"]]
    return {"heads": [list(h) for h in pl.spec.heads], "ablation": pl.spec.ablation, "knockouts": kn}


def _words_json(pl: Plan) -> dict:
    """The intervention in its words (effects.json): kinds, heads, ablation, each knockout's layers
    and --from / --to words (meta.intervention.spec adds the positions they resolved to)."""
    return {"kind": pl.kinds, "heads": [list(h) for h in pl.spec.heads], "ablation": pl.spec.ablation,
            "knockouts": [dict(d) for d in pl.described]}


def intervention_meta(pl: Plan, pixels: str, out: Path) -> dict:
    return {"slug": pl.slug, "kind": pl.kinds, "spec": _spec_json(pl), "command": pl.command,
            "base_run": os.path.relpath(pl.run.path.absolute(), out.absolute()), "pixels": pixels}


def check_output(pl: Plan) -> None:
    """The output folder may be written (before the model loads)."""
    from . import extract, store

    extract.check_writable(pl.out)
    if pl.out.absolute() == pl.run.path.absolute():
        raise UserError(f"--output-dir {pl.out} is the base run itself; give another folder")
    if pl.sweep is None:
        store.check_target(pl.out)
    else:
        check_sweep_target(pl.out)


def pixels(run, k: int | None = None) -> tuple[object, dict, str]:
    """Image ``k`` of the run (default: its one image): its source file when it is there and matches
    the recorded size, else the copy stored in the run."""
    from .images import open_image

    info = run.meta.get("image", {}) if k is None else run.meta["images"][k]
    what = "image" if k is None else f"image {k}"
    src = info.get("source")
    if src and Path(src).is_file():
        try:
            rgb, got = open_image(src)
            if list(rgb.size) == list(info["size"]):
                return rgb, got, "source image"
        except UserError:
            pass
    stored = run.image_path(k)
    if stored is None or not Path(stored).is_file():
        raise UserError(f"{run.path}: neither the source {what} {src!r} nor a copy stored in the run is there")
    rgb, got = open_image(stored)
    if list(rgb.size) != list(info["size"]):
        raise UserError(f"{run.path}: the stored {what} is {rgb.size[0]}x{rgb.size[1]}, the run recorded "
                        f"{info['size'][0]}x{info['size'][1]}")
    return rgb, dict(got, source=info.get("source")), "image stored in the run"


def frames(run):
    """A video run's frames as the run stored them (images/NN.jpg, never a re-decode of the video),
    with their stream indices and the video's rate, frame count and duration from meta.video, so the
    prompt's timestamps and intro are the base run's."""
    from . import video
    from .images import open_image

    v, entries = run.meta["video"], run.meta["images"]
    images = []
    for k, e in enumerate(entries):
        path = run.image_path(k)
        if path is None:
            raise UserError(f"{run.path}: frame {k} is not stored in the run ({e.get('file')!r})")
        rgb, _ = open_image(path)       # a damaged stored frame: one line naming it
        if list(rgb.size) != list(e["size"]):
            raise UserError(f"{run.path}: stored frame {k} is {rgb.size[0]}x{rgb.size[1]}, the run recorded "
                            f"{e['size'][0]}x{e['size'][1]}")
        images.append(rgb)
    info = {k: v[k] for k in v if k != "decode_s"}
    out = video.Frames(images, [int(e["index"]) for e in entries], float(v["fps"]), int(v["total_frames"]),
                       float(v["duration"]), tuple(v["size"]), info)
    if [round(t, 6) for t in out.timestamps] != [round(float(t), 6) for t in run.layout.timestamps]:
        raise UserError(f"{run.path}: the frames' indices and the video's rate do not give the run's timestamps")
    return out


def base_pixels(run) -> tuple[object, str]:
    """What the base run's model saw, read before the model loads, and its words for
    meta.intervention.pixels: one ``(image, info)`` pair; several images: a list of them; a video:
    its stored frames (:func:`frames`)."""
    layout = run.layout
    if layout.is_video:
        return frames(run), "frames stored in the run"
    if not run.meta.get("images"):
        rgb, info, source = pixels(run)
        return (rgb, info), source
    got = [pixels(run, k) for k in range(len(layout))]
    words = [g[2] for g in got]
    source = (words[0].replace("image", "images", 1) if len(set(words)) == 1 else
              "; ".join(f"image {k}: {w}" for k, w in enumerate(words)))
    return [(rgb, info) for rgb, info, _ in got], source


def load_for(run, device=None):
    m = run.meta["model"]
    return mdl.load(m["id"], device, m["dtype"], m["revision"])


def prepare(loaded, run, rgb, info=None):
    """The base run's processor inputs, checked to tokenise to the run's prompt ids. ``rgb``: its one
    image (with ``info``), a list of (image, info) pairs (several images) or video Frames
    (:func:`base_pixels`)."""
    from . import engine, video

    meta = run.meta
    keep = "all" if run.store == "full" else "text"
    if isinstance(rgb, video.Frames):
        prep = engine.prepare_video(loaded.processor, rgb, meta["prompt"], keep,
                                    bool(meta["video"].get("keep_frame_rows")))
    elif isinstance(rgb, list):
        prep = engine.prepare_images(loaded.processor, [im for im, _ in rgb], meta["prompt"],
                                     meta["processor"]["longest_edge"], keep, [i for _, i in rgb])
    else:
        prep = engine.prepare(loaded.processor, rgb, meta["prompt"], meta["processor"]["longest_edge"], keep, info)
    if prep.ids != list(meta["token_ids"][:meta["prompt_length"]]):
        raise UserError(f"{run.path}: the prompt does not tokenise to the run's recorded ids with this model and "
                        f"{'these frames' if run.layout.is_video else 'image' if len(run.layout) == 1 else 'these images'}"
                        ": the run cannot be reproduced here")
    several = len(run.layout) > 1 or run.layout.is_video      # (one image: as before, the ids say it all)
    if prep.layout != run.layout or several and not np.array_equal(prep.rows, run.query_positions[:len(prep.rows)]):
        raise UserError(f"{run.path}: the re-run's image blocks or kept rows are not the run's: it cannot be "
                        "reproduced here")
    return prep


def intervene(pl: Plan, device=None, loaded=None) -> dict:
    """Base and intervened passes in one process (the image encoded once); writes the intervened run.
    ``loaded``: the run's model, loaded already (benchmarks); default: load it as the run records."""
    from . import engine
    from . import extract as ex
    from . import methods as mth

    t0 = time.perf_counter()
    run, meta = pl.run, pl.run.meta
    seen, source = base_pixels(run)
    t_load = time.perf_counter()
    loaded = loaded or load_for(run, device)
    t0 += time.perf_counter() - t_load
    prep = prepare(loaded, run, *seen) if isinstance(seen, tuple) else prepare(loaded, run, seen)
    prep.seconds = time.perf_counter() - t0
    inputs = {"pixel_values": prep.pixel_values[None].to(loaded.device)}
    if prep.pixel_attention_mask is not None:
        inputs["pixel_attention_mask"] = prep.pixel_attention_mask[None].to(loaded.device)
    features = image_features(loaded, inputs)
    ids, P = list(meta["token_ids"]), int(meta["prompt_length"])
    base_lp = teacher_forced(loaded, ids, P, features)
    kept: dict = {}
    with applied(pl.spec):
        out = engine.run(loaded, [prep], int(meta["generation"]["max_new_tokens"]), features=features, keep=kept)[0]
        if pl.spec.ablation == "mean" and pl.spec.heads:    # the mean is over the call's positions: one call
            int_lp = teacher_forced(loaded, ids, P, features)
        else:     # the generation's prompt cache and first step, then only the base answer's tokens
            int_lp = teacher_forced_after(loaded, ids, P, kept)
    tok = loaded.processor.tokenizer
    new = out.new
    result = {"format": "smolattn-effects", "version": 1,
              "base": {"answer": meta.get("answer", tok.decode(ids[P:], skip_special_tokens=True).strip()),
                       "token_ids": ids[P:], "prompt_length": P},
              "intervened": {"answer": tok.decode(new, skip_special_tokens=True).strip(), "token_ids": new,
                             "prompt_length": P},
              **effects(tok, base_lp, int_lp, ids, P, new), "intervention": _words_json(pl),
              "standin": bool(loaded.standin)}
    settings = ex.Settings(meta["prompt"], int(meta["generation"]["max_new_tokens"]),
                           meta["processor"]["longest_edge"], run.store, (mth.RAW,))
    summary = ex.write(loaded, settings, prep, out, pl.out, intervention=intervention_meta(pl, source, pl.out),
                       extra_files={EFFECTS_FILE: json.dumps(result, indent=1).encode()})
    return {**summary, "effects": result, "pixels": source, "standin": bool(loaded.standin)}


# -------------------------------------------------------------------------------- the sweep folder

def is_sweep(path) -> bool:
    """A sweep folder of ours: exactly meta.json (our format marker), sweep.json, sweep.png."""
    path = Path(path)
    return path.is_dir() and not path.is_symlink() and (path / "meta.json").is_file() and SWEEP.owned(path)


def check_sweep_target(out) -> None:
    outputs.check_target(out, SWEEP, "choose a new output folder")


def write_sweep(out, files: dict) -> None:
    """Write the sweep folder with the one writer (temporary sibling, fsynced, renamed in; an earlier
    sweep folder of ours is set aside and deleted after; a crash leaves the old or the new one)."""
    with outputs.atomic_dir(out, SWEEP, "choose a new output folder") as tmp:
        for name, data in files.items():
            outputs.write_bytes_durably(tmp / name, data)


def sweep_png(sw: dict) -> bytes:
    import io

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401

    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    ax.plot(sw["centres"], sw["relative_change_pct"], marker="o", ms=3)
    ax.axhline(0, color="grey", lw=0.8)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel(f"window centre layer (window {sw['window']})")
    ax.set_ylabel("relative change of p (%)")
    title = f"knockout {sw['from']} -> {sw['to']}: p({sw['token']!r}) base {sw['base_prob']:.3g}"
    ax.set_title(title + ("  [STAND-IN, random weights]" if sw["standin"] else ""), fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def sweep(pl: Plan, device=None, loaded=None) -> dict:
    """The sweep: the prefix (positions before the first --from position) once, then every window's
    suffix in one batch on fresh copies of its cache; one more row without knockout gives p_base."""
    t0 = time.perf_counter()
    run, meta, sw = pl.run, pl.run.meta, pl.sweep
    seen, source = base_pixels(run)
    t_load = time.perf_counter()
    loaded = loaded or load_for(run, device)
    t0 += time.perf_counter() - t_load
    prep = prepare(loaded, run, *seen) if isinstance(seen, tuple) else prepare(loaded, run, seen)
    ids, P = list(meta["token_ids"]), int(meta["prompt_length"])
    inputs = {"pixel_values": prep.pixel_values[None].to(loaded.device)}
    if prep.pixel_attention_mask is not None:
        inputs["pixel_attention_mask"] = prep.pixel_attention_mask[None].to(loaded.device)
    import torch
    t = torch.tensor([ids[:P]], device=loaded.device)
    inputs.update(input_ids=t, attention_mask=torch.ones_like(t))
    features = image_features(loaded, inputs)
    first = min(sw["queries"])
    pre = prefix(loaded, inputs, first, features)
    specs = [Spec()] + [Spec(knockouts=(Knockout(tuple(range(lo, hi + 1)), sw["queries"], sw["keys"]),))
                        for lo, hi in sw["windows"]]
    token = ids[P]
    probs = sweep_probs(loaded, [(pre, ids[first:P], specs, token)])[0]
    base, prob = probs[0], probs[1:]
    tok = loaded.processor.tokenizer
    standin = bool(loaded.standin)
    result = {"format": SWEEP_FORMAT, "version": 1, "window": sw["window"], "from": sw["from"], "to": sw["to"],
              "token": tok.decode([token]), "token_id": int(token), "base_prob": base,
              "centres": list(range(len(sw["windows"]))), "layers": [list(w) for w in sw["windows"]],
              "prob": prob, "relative_change_pct": [(p - base) / base * 100 if base > 0 else None for p in prob],
              "standin": standin, "seconds": round(time.perf_counter() - t0, 3)}
    meta_out = {"format": SWEEP_FORMAT, "version": 1, "intervention": intervention_meta(pl, source, pl.out),
                "standin": standin}
    write_sweep(pl.out, {"meta.json": json.dumps(meta_out, indent=1).encode(),
                         "sweep.json": json.dumps(result, indent=1).encode(), "sweep.png": sweep_png(result)})
    return {"run": str(pl.out), "sweep": result, "pixels": source, "standin": standin}


def main(argv=None) -> None:
    """intervene.py: parse, check everything before the model loads, run, print a short report."""
    import argparse

    ap = argparse.ArgumentParser(prog="intervene.py", description="Ablate heads or knock out attention in a run, "
                                 "and measure what changes in the answer (docs/interventions.md).")
    add_arguments(ap)
    args = ap.parse_args(argv)
    pl = plan(args, argv)
    check_output(pl)
    banner = " [STAND-IN MODEL, random weights]" if pl.run.standin else ""
    if pl.sweep:
        res = sweep(pl, args.device)
        s = res["sweep"]
        worst = min(range(len(s["prob"])), key=lambda i: s["prob"][i])
        print(f"sweep{banner}: p({s['token']!r}) base {s['base_prob']:.4g}; lowest with window {s['layers'][worst]} "
              f"({s['relative_change_pct'][worst]:+.1f}%); pixels: {res['pixels']}")
        print(f"sweep written to {res['run']} (sweep.json, sweep.png)")
        return
    res = intervene(pl, args.device)
    e = res["effects"]
    tf = e["teacher_forced"]
    print(f"base answer{banner}: {e['base']['answer']}")
    print(f"intervened answer{banner}: {e['intervened']['answer']}")
    print(f"teacher-forced log-prob of the base answer: {tf['base_sum']:.4f} -> {tf['intervened_sum']:.4f}"
          + (f"; P(yes) {e['yes_no']['base']['p_yes']:.3f} -> {e['yes_no']['intervened']['p_yes']:.3f}"
             if e["yes_no"] else ""))
    print(f"run written to {res['run']} (pixels: {res['pixels']})")
