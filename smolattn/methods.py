"""Explanation methods beyond raw attention, computed at extraction time for the rows a run keeps.

Every method here is one function registered in :data:`METHODS` (``@register``); adding a method is
adding a function. Each returns, for the token positions it covers, one map over the IMAGE keys
(``geometry.key_positions`` order) per layer: an array (L, Q, K), where axis 0 is the start layer
(rollout, relevancy: layers start..L-1 are used) or the layer (relative).

All methods share ONE teacher-forced forward over prompt + answer (the ids the run stores), with the
image features captured during generation reused (no second vision pass), and an eager attention
whose softmax is computed in fp32 (:func:`methods_attention`), so ratios and products are not fp16
noise. Only the kept rows are ever multiplied out: for a row vector v, v·Â_{L-1}, then ·Â_{L-2}, ...
gives the map of that row for every start layer in one top-down pass of vector x matrix products.

- ``rollout`` (Abnar & Zuidema 2020): Â_l = 0.5·fuse_h(A_l) + 0.5·I, rows renormalised; the map of
  token t from start layer s is row t of Â_{L-1} ... Â_s. Row t = token t as the query (as raw).
- ``relevancy`` (Chefer et al. 2021): for answer token t, y = raw logit of token t at position t-1
  (the position that predicts it); Ā_l = mean_h((∂y/∂A_l ⊙ A_l)^+) (clamp before the head mean);
  R = I, R <- R + Ā_l R for l = s..L-1; then (R - I) rows to sum 1, + I. The map of token t is row
  t-1 of R (stored under position t). One backward per answer token (``retain_graph``).
- ``relative`` (Zhang et al. 2025): head-mean attention of a row divided by the head-mean attention
  of the matching row under the generic prompt :data:`GENERIC_PROMPT` (same image features, same
  tiling, the same answer teacher-forced), plus ``eps``. Matching row: for the last prompt token and
  every answer token, the same offset from the end of the prompt (the rows that produce the same
  answer token); for the prompt's own text, the generic prompt's last token (the paper's row).
  Rows before the image block see no image and are not stored (several images or a video: rows
  before the end of the LAST block). Everything up to the end of the (last) image block is the same
  in both sequences (every image block, every frame and its timestamp text are copied), so the generic forward runs only the text after it, over the
  keys and values the question's forward computed for that prefix (the same numbers, a fraction of
  the cost).
"""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import numpy as np

from . import geometry as geo
from .errors import UserError

ATTENTION = "smolattn_methods"      # the name our eager fp32 attention is registered under
GENERIC_PROMPT = "Write a general description of the image."
FUSIONS = ("mean", "max", "min")
RAW = "raw"

_local = threading.local()


# -- registry ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Method:
    name: str
    fn: Callable                 # (Context) -> (positions, query_positions, maps (L, Q, K) float32)
    axis: str                    # what axis 0 of the maps is: "start_layer" or "layer"
    dtype: str                   # stored dtype
    params: dict                 # defaults, recorded in meta.json
    rows: str                    # which row each token's map is read from (docs, meta.json)
    grad: bool = False           # needs the attention probabilities in the autograd graph
    fused: bool = False          # needs every layer's head-fused square matrix
    mean_rows: bool = False      # needs the head-mean rows of the question forward


METHODS: dict[str, Method] = {}


def register(name: str, **kw):
    def deco(fn):
        METHODS[name] = Method(name, fn, **kw)
        return fn
    return deco


def names() -> tuple[str, ...]:
    """Every name --methods accepts, raw first."""
    return (RAW,) + tuple(METHODS)


def parse(spec) -> list[str]:
    """'raw,rollout' -> ['raw', 'rollout'] (raw is always included: it is the run itself)."""
    asked = [s.strip() for s in (spec or RAW).split(",") if s.strip()]
    bad = [s for s in asked if s not in names()]
    if bad:
        raise UserError(f"unknown method {bad[0]!r} in --methods; choose from {', '.join(names())}")
    return [RAW] + [n for n in METHODS if n in asked]


# -- the forward ---------------------------------------------------------------------------------
class Tape:
    """What the eager attention keeps from one forward, per layer (probabilities are (H, S, S) fp32).

    ``keep_kv``: also keep the first ``keep_kv`` positions' keys and values (``kv``), so that a later
    forward over a sequence with the same prefix (the generic prompt: same image block) can run on its
    suffix only; that forward's tape gets them as ``prefix``.
    """

    def __init__(self, probs: bool = False, fusion: str | None = None, rows=None, keep_kv: int = 0, prefix=None):
        self.keep_probs, self.fusion = probs, fusion
        self.rows = None if rows is None else list(rows)
        self.probs, self.fused, self.mean_rows = {}, {}, {}
        self.keep_kv, self.kv, self.prefix = keep_kv, {}, prefix

    def add(self, layer: int, probs) -> None:
        if self.keep_probs:
            self.probs[layer] = probs
        p = probs.detach()
        if self.fusion:
            self.fused[layer] = {"mean": p.mean, "max": p.amax, "min": p.amin}[self.fusion](0)
        if self.rows is not None:
            self.mean_rows[layer] = p[:, self.rows].mean(0)

    def layers(self, what: dict) -> list:
        return [what[i] for i in sorted(what)]


def methods_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Eager attention with the softmax in fp32; hands the probabilities to the active :class:`Tape`.
    The output is computed from those same probabilities, so gradients reach them."""
    import torch
    from transformers.integrations.sdpa_attention import repeat_kv

    tape = getattr(_local, "tape", None)
    if tape is not None and tape.keep_kv:
        tape.kv[module.layer_idx] = (key[:, :, :tape.keep_kv].detach(), value[:, :, :tape.keep_kv].detach())
    if tape is not None and tape.prefix is not None:        # a suffix after a shared prefix: causal with offset
        pk, pv = tape.prefix[module.layer_idx]
        key, value, attention_mask = torch.cat([pk, key], 2), torch.cat([pv, value], 2), None
    k = repeat_kv(key, module.num_key_value_groups)
    v = repeat_kv(value, module.num_key_value_groups)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query.float(), k.float().transpose(2, 3)) * scale
    q_len, k_len = scores.shape[-2:]
    if attention_mask is None:
        causal = torch.ones(q_len, k_len, dtype=torch.bool, device=scores.device).triu(k_len - q_len + 1)
        scores = scores.masked_fill(causal, float("-inf"))
    elif attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask[..., :k_len], float("-inf"))
    else:
        scores = scores + attention_mask[..., :k_len].float()
    probs = torch.softmax(scores[0], dim=-1)            # (H, S, S): batch of one
    if tape is not None:
        tape.add(module.layer_idx, probs)
    out = torch.matmul(probs.to(v.dtype), v[0])[None]
    return out.transpose(1, 2).contiguous(), None


def _register_attention():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(ATTENTION, methods_attention)
    AttentionMaskInterface.register(ATTENTION, eager_mask)


@contextmanager
def _taping(loaded, tape: Tape):
    """Switch the text model to :func:`methods_attention` and record into ``tape`` for one block."""
    _register_attention()
    cfg = loaded.model.model.text_model.config
    old = cfg._attn_implementation
    cfg._attn_implementation = ATTENTION
    _local.tape = tape
    try:
        yield tape
    finally:
        _local.tape = None
        cfg._attn_implementation = old


def merge_image_features(base, ids, embeds, features):
    """The image features in place of the ``<image>`` embeddings, as the model's own forward does it:
    Idefics3's ``inputs_merger``, or SmolVLM2's placeholder mask + ``masked_scatter``."""
    if hasattr(base, "inputs_merger"):
        return base.inputs_merger(input_ids=ids, inputs_embeds=embeds, image_hidden_states=features)
    features = features.to(embeds.device, embeds.dtype)
    mask = base.get_placeholder_mask(ids, inputs_embeds=embeds, image_features=features)
    return embeds.masked_scatter(mask, features)


def forward(loaded, ids, features, tape: Tape, grad: bool = False, start: int = 0):
    """Teacher-forced forward of the text model over ``ids`` with the image ``features`` merged in at
    the ``<image>`` positions. Returns the last hidden states (S - start, D) (before the LM head).

    ``start`` > 0: only positions start.. are run, over the keys and values of the first ``start``
    positions that ``tape.prefix`` holds (from an earlier forward over the same prefix)."""
    import torch

    model = loaded.model
    t = torch.tensor([list(ids)], device=model.device)
    with torch.set_grad_enabled(grad), _taping(loaded, tape):
        if start:
            out = model.model.text_model(inputs_embeds=model.get_input_embeddings()(t[:, start:]), use_cache=False,
                                         position_ids=torch.arange(start, t.shape[1], device=t.device)[None])
            return out.last_hidden_state[0]
        emb = model.get_input_embeddings()(t)
        emb = merge_image_features(model.model, t, emb, features)
        out = model.model.text_model(inputs_embeds=emb, attention_mask=torch.ones_like(t), use_cache=False)
    return out.last_hidden_state[0]


@contextmanager
def keep_image_features(loaded):
    """Capture the image features (the connector's output) of the calls made inside the block, e.g.
    of ``generate``: ``with keep_image_features(loaded) as kept: ...; kept.features``."""
    kept = _Kept()

    def hook(_module, _inputs, output):
        kept.features = output
    handle = loaded.model.model.connector.register_forward_hook(hook)
    try:
        yield kept
    finally:
        handle.remove()


@dataclass
class _Kept:
    features: object = None


def image_features(loaded, inputs):
    """The image features of processor ``inputs`` (one vision pass), for callers without a capture."""
    import torch

    with torch.no_grad():
        out = loaded.model.model.get_image_features(inputs["pixel_values"], inputs.get("pixel_attention_mask"),
                                                    return_dict=True)
    return torch.cat(list(out.pooler_output), 0)


def prompt_ids(loaded, ids, geometry, prompt: str) -> list[int]:
    """The ids of ``prompt`` in the same chat template around the SAME image blocks as ``ids``: every
    image block (several images, a video's frames and the text between them) is copied, only the text
    after the last block is tokenized (it starts after a special token, so it tokenizes exactly as in
    the processor's full string). ``geometry``: the run's Geometry or Layout."""
    from . import model as mdl

    layout = geometry if isinstance(geometry, geo.Layout) else geo.Layout.single(geometry)
    if layout.is_video:
        from . import video
        tail = video.text_after_frames(loaded.processor, prompt)
    else:
        tail = mdl.chat_text(loaded.processor, prompt, len(layout)).rsplit("<image>", 1)[1]
    return list(ids[:layout.block_end]) + loaded.processor.tokenizer(tail, add_special_tokens=False)["input_ids"]


# -- the methods ---------------------------------------------------------------------------------
@dataclass
class Context:
    """What a method function sees: the run's ids, geometry and kept rows, and the shared forward."""
    loaded: object
    ids: list
    prompt_length: int
    geometry: geo.Geometry
    rows: np.ndarray                 # the run's kept query positions
    features: object                 # image features (reused by every forward)
    params: dict
    tape: Tape | None = None
    hidden: object = None            # (S, D) last hidden states of the question forward

    @property
    def keys(self) -> np.ndarray:
        return self.geometry.key_positions

    def after_image(self) -> np.ndarray:
        return self.rows[self.rows >= self.geometry.block_end]


@register("rollout", axis="start_layer", dtype="float16", params={"head_fusion": "mean", "residual": 0.5},
          rows="row t (token t as the query, as raw attention)", fused=True)
def rollout(ctx: Context):
    import torch

    fused = ctx.tape.layers(ctx.tape.fused)
    S, a = fused[0].shape[-1], float(ctx.params["rollout"]["residual"])
    eye = torch.eye(S, device=fused[0].device)
    rows = torch.as_tensor(ctx.rows, device=eye.device)
    v = eye[rows]                                           # (Q, S) one-hot rows
    maps = np.zeros((len(fused), len(ctx.rows), len(ctx.keys)), np.float32)
    for layer in reversed(range(len(fused))):
        hat = (1 - a) * fused[layer] + a * eye
        hat = hat / hat.sum(-1, keepdim=True)
        v = v @ hat
        maps[layer] = v[:, ctx.keys].cpu().numpy()
    return ctx.rows, ctx.rows, maps


@register("relevancy", axis="start_layer", dtype="float16", params={"target": "raw logit", "clamp": "before head mean",
          "normalisation": "(R - I) rows to sum 1, + I"},
          rows="token t: row t-1 of R (the position that predicts t), gradient of token t's raw logit", grad=True)
def relevancy(ctx: Context):
    import torch

    probs = ctx.tape.layers(ctx.tape.probs)
    head = ctx.loaded.model.get_output_embeddings()
    targets = np.arange(ctx.prompt_length, len(ctx.ids))
    maps = np.zeros((len(probs), len(targets), len(ctx.keys)), np.float32)
    keys = torch.as_tensor(ctx.keys, device=ctx.hidden.device)
    for i, t in enumerate(targets):
        q = int(t) - 1                                       # the position that predicts token t
        with torch.enable_grad():
            y = head(ctx.hidden[q])[ctx.ids[t]]
            grads = torch.autograd.grad(y, probs, retain_graph=True)
        with torch.no_grad():
            v = torch.zeros(q + 1, device=keys.device)
            v[q] = 1.0
            for layer in reversed(range(len(probs))):
                cam = (grads[layer][:, :q + 1, :q + 1] * probs[layer][:, :q + 1, :q + 1]).clamp(min=0).mean(0)
                v = v + v @ cam
                r = v.clone()
                r[q] -= 1.0
                total = r.sum()
                r = r / total if total > 0 else r
                maps[layer, i] = r[keys].cpu().numpy()
    return targets, targets - 1, maps


@register("relative", axis="layer", dtype="float32", params={"generic_prompt": GENERIC_PROMPT, "eps": 1e-6,
          "head_fusion": "mean"},
          rows="row t over the generic prompt's matching row: same offset from the prompt end for the last "
               "prompt token and answer tokens, the generic prompt's last token for prompt text", mean_rows=True)
def relative(ctx: Context):
    p = ctx.params["relative"]
    rows, P = ctx.after_image(), ctx.prompt_length
    generic = prompt_ids(ctx.loaded, ctx.ids, ctx.geometry, p["generic_prompt"])
    Pg, start = len(generic), ctx.geometry.block_end    # the same up to the image block's end
    den_rows = np.where(rows >= P - 1, rows - P + Pg, Pg - 1)
    tape = Tape(rows=den_rows - start, prefix=ctx.tape.kv)
    forward(ctx.loaded, generic + list(ctx.ids[P:]), None, tape, start=start)
    num, den = ctx.tape.layers(ctx.tape.mean_rows), tape.layers(tape.mean_rows)
    maps = np.stack([(n[:, ctx.keys] / (d[:, ctx.keys] + p["eps"])).cpu().numpy() for n, d in zip(num, den)])
    return rows, rows, maps.astype(np.float32)


# -- memory ----------------------------------------------------------------------------------------
def needed_bytes(methods, seq_len: int, layers: int, heads: int) -> int:
    """What the derived ``methods`` hold at once for a sequence of ``seq_len`` tokens, beyond the model:
    relevancy every layer's (H, S, S) fp32 probabilities in the autograd graph plus their gradients;
    rollout every layer's head-fused (S, S) fp32 matrix."""
    s2, need = seq_len * seq_len * 4, 0
    if any(METHODS[m].grad for m in methods if m != RAW):
        need += 2 * layers * heads * s2
    if any(METHODS[m].fused for m in methods if m != RAW):
        need += layers * s2
    return need


def free_bytes(device) -> int | None:
    """Memory free for ``device`` now: the GPU's (CUDA), else the host's MemAvailable; None if unknown."""
    import torch

    if str(device).startswith("cuda"):   # free on the card + what torch holds in its cache but does not use
        dev = torch.device(device)
        return int(torch.cuda.mem_get_info(dev)[0] + torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev))
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


CHECK_ABOVE = 2**30     # bytes: smaller needs are not checked (no /proc read for everyday runs)


def check_memory(loaded, methods, seq_len: int) -> None:
    """Refuse in one line, before generation, derived methods that would not fit in memory (relevancy
    on a long video needs S^2 per layer and head twice)."""
    cfg = loaded.model.config.text_config
    need = needed_bytes(methods, seq_len, cfg.num_hidden_layers, cfg.num_attention_heads)
    free = free_bytes(loaded.device) if need > CHECK_ABOVE else None
    if free is not None and need > free:
        names = ", ".join(m for m in methods if m != RAW and (METHODS[m].grad or METHODS[m].fused))
        raise UserError(f"--methods {names} on this prompt ({seq_len:,} tokens, {cfg.num_hidden_layers} layers x "
                        f"{cfg.num_attention_heads} heads) needs about {_size(need)} and {_size(free)} "
                        f"are free: use fewer frames (--max-frames) or images, a smaller --longest-edge, or leave "
                        f"them out of --methods")


# -- entry point ---------------------------------------------------------------------------------
def compute(loaded, ids, prompt_length: int, geometry: geo.Geometry, rows, methods, features,
            params: dict | None = None) -> dict:
    """Compute the derived ``methods`` (names from :func:`parse`; raw is skipped) for a run.

    ``ids``: prompt + answer; ``rows``: the run's kept query positions; ``features``: the image
    features of the run's image (:func:`keep_image_features` during generation, or
    :func:`image_features`). Returns {name: {positions, query_positions, maps (L, Q, K) float32,
    meta}} for :func:`smolattn.store.write_run`.
    """
    todo = [METHODS[n] for n in methods if n != RAW]
    if not todo:
        return {}
    import torch

    params = {m.name: {**m.params, **(params or {}).get(m.name, {})} for m in todo}
    fusion = params.get("rollout", {}).get("head_fusion")
    if fusion is not None and fusion not in FUSIONS:
        raise UserError(f"unknown rollout head fusion {fusion!r}; choose one of {', '.join(FUSIONS)}")
    rows = np.asarray(rows, dtype=np.int64)
    with torch.inference_mode(False):
        features = features.clone()                        # captured under inference_mode: make it autograd-able
        ctx = Context(loaded, list(ids), int(prompt_length), geometry, rows, features, params)
        grad = any(m.grad for m in todo)
        rel = any(m.mean_rows for m in todo)
        ctx.tape = Tape(probs=grad, fusion=fusion if any(m.fused for m in todo) else None,
                        rows=ctx.after_image() if rel else None, keep_kv=geometry.block_end if rel else 0)
        t0 = time.perf_counter()
        ctx.hidden = forward(loaded, ids, features, ctx.tape, grad)
        shared = time.perf_counter() - t0
        out = {}
        for m in todo:
            t0 = time.perf_counter()
            positions, query_positions, maps = m.fn(ctx)
            out[m.name] = {"positions": np.asarray(positions, np.int64),
                           "query_positions": np.asarray(query_positions, np.int64), "maps": maps,
                           "meta": {"axis": m.axis, "dtype": m.dtype, "params": params[m.name], "rows": m.rows,
                                    "seconds": round(time.perf_counter() - t0, 4)}}
    for name in out:
        out[name]["meta"]["shared_forward_seconds"] = round(shared, 4)
    return out
