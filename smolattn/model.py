"""Model loading and attention capture.

Capture is a custom attention function registered with transformers' ``AttentionInterface`` under
the name ``"capture"``: it returns SDPA's output (same speed, same answer) and, while a
:class:`Recorder` is active, also computes softmax(q k^T) for just the query rows we keep and stores
them in fp16. No layer's full seq x seq matrix is ever materialised.
"""
from __future__ import annotations

import os
import socket
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import UserError

DEFAULT_MODEL = "HuggingFaceTB/SmolVLM-256M-Instruct"
ALIASES = {"HuggingFaceTB/SmolVLM-Instruct-256M": DEFAULT_MODEL, "SmolVLM-Instruct-256M": DEFAULT_MODEL,
           "SmolVLM-256M-Instruct": DEFAULT_MODEL}
DTYPES = ("float32", "bfloat16", "float16")
# Tokens the model must never emit inside an answer (they would read as a second image).
IMAGE_SPECIALS = ["<image>", "<fake_token_around_image>", "<global-img>"] + [
    f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]

_local = threading.local()


class Recorder:
    """Collects attention rows per layer while active (one forward or generate at a time per thread).

    rows: positions (indices into the current call's queries) whose rows are kept when a call has
    several queries (the prefill); a decode step's single row is always kept. Rows are over all keys.
    :meth:`allocate` sizes one buffer up front: nothing grows or fragments the heap during generation.
    """

    def __init__(self, rows):
        self.rows = np.asarray(rows, dtype=np.int64)
        self.buffer = None          # (layers, heads, max rows, max keys) float16
        self.filled: dict[int, int] = {}

    def allocate(self, layers: int, heads: int, max_rows: int, max_keys: int) -> None:
        self.buffer = np.zeros((layers, heads, max_rows, max_keys), np.float16)

    def add(self, layer: int, probs: np.ndarray) -> None:
        """probs: (heads, rows, keys) of one call."""
        if self.buffer is None:
            raise RuntimeError("Recorder.allocate() must be called before recording (generate() does it)")
        start = self.filled.get(layer, 0)
        self.buffer[layer, :, start:start + probs.shape[1], :probs.shape[2]] = probs
        self.filled[layer] = start + probs.shape[1]

    def __enter__(self):
        _local.recorder = self
        return self

    def __exit__(self, *exc):
        _local.recorder = None

    def stacked(self, key_len: int) -> list[np.ndarray]:
        """Per recorded layer, (H, Q, key_len) float16 views (zeros after each row's own position)."""
        return [self.buffer[i, :, :self.filled[i], :key_len] for i in sorted(self.filled)]


def capture_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                    dropout=dropout, **kwargs)
    rec = getattr(_local, "recorder", None)
    if rec is None:
        return out, None
    import torch

    q_len, k_len = query.shape[2], key.shape[2]
    rows = torch.arange(q_len) if q_len == 1 else torch.as_tensor(rec.rows)
    k = repeat_kv(key, module.num_key_value_groups)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query[:, :, rows.to(query.device)].float(), k.float().transpose(2, 3)) * scale
    if attention_mask is not None and attention_mask.dim() == 4:
        m = attention_mask[:, :, rows.to(attention_mask.device)] if attention_mask.shape[2] == q_len else attention_mask
        scores = scores.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else scores + m.float()
    else:  # SDPA relied on is_causal: apply causality by hand (query i sits at k_len - q_len + i)
        qpos = (k_len - q_len + rows).to(scores.device)
        scores = scores.masked_fill(torch.arange(k_len, device=scores.device)[None, :] > qpos[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    rec.add(module.layer_idx, probs[0].to(torch.float16).cpu().numpy())
    return out, None


def _register():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register("capture", capture_attention)
    AttentionMaskInterface.register("capture", sdpa_mask)


@dataclass
class Loaded:
    model: object
    processor: object
    model_id: str
    revision: str | None
    device: str
    dtype: str
    standin: dict | None = None     # contents of standin.json for offline stand-ins
    load_seconds: float = 0.0

    def token_ids(self, names) -> list[int]:
        return self.processor.tokenizer.convert_tokens_to_ids(list(names))


def resolve_model_id(model_id: str) -> str:
    if model_id in ALIASES:
        print(f"note: model id {model_id!r} is a misspelling; using {ALIASES[model_id]!r}", file=sys.stderr)
        return ALIASES[model_id]
    return model_id


def _hub_reachable(timeout=3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True"):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def default_device() -> str:
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def load(model_id: str = DEFAULT_MODEL, device: str | None = None, dtype: str | None = None,
         revision: str | None = None) -> Loaded:
    """Load model + processor from a local directory or the hub, with the capture attention."""
    import time

    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    _register()
    t0 = time.perf_counter()
    model_id = resolve_model_id(model_id)
    device = device or default_device()
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device} requested but no CUDA device is available")
    dtype = dtype or ("float32" if device == "cpu" else "bfloat16")
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    local = Path(model_id).expanduser()
    looks_local = model_id.startswith(("/", ".", "~")) or model_id.count("/") != 1
    if looks_local and not local.exists():
        raise UserError(f"model directory not found: {model_id}")
    if local.exists():
        if not (local / "config.json").is_file():
            raise UserError(f"{model_id} is not a model directory (no config.json)")
        source = str(local)
    else:
        source = model_id
        try:  # cached copies work offline; only then ask the network
            from huggingface_hub import snapshot_download
            source = snapshot_download(model_id, revision=revision, local_files_only=True)
        except Exception:  # noqa: BLE001 - not cached
            if not _hub_reachable():
                raise UserError(
                    f"cannot reach the Hugging Face hub and {model_id!r} is not cached; for an offline stand-in run "
                    f"`python -m smolattn.standin --shape tiny models/tiny` and pass --model-id models/tiny")
            try:
                source = snapshot_download(model_id, revision=revision)
            except Exception as e:  # noqa: BLE001
                raise UserError(f"could not download model {model_id!r}: {type(e).__name__}: {str(e).splitlines()[0]}")
    try:
        processor = AutoProcessor.from_pretrained(source)
        model = AutoModelForImageTextToText.from_pretrained(
            source, dtype=getattr(torch, dtype),
            attn_implementation={"text_config": "capture", "vision_config": "sdpa", "": "sdpa"})
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"could not load model from {source}: {str(e).splitlines()[0]}")
    model.to(device).eval()
    standin = None
    marker = Path(source) / "standin.json"
    if marker.is_file():
        import json
        standin = json.loads(marker.read_text())
        print(f"note: {model_id} is an offline STAND-IN model with random weights; results are not SmolVLM's",
              file=sys.stderr)
    rev = revision or (Path(source).name if "snapshots" in str(source) else None)
    return Loaded(model, processor, model_id, rev, device, dtype, standin, time.perf_counter() - t0)


def chat_text(processor, prompt: str) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


def encode(loaded: Loaded, image, prompt: str, longest_edge: int | None = None):
    """Processor inputs (on the model's device) for one image + prompt."""
    text = chat_text(loaded.processor, prompt)
    kw = {"size": {"longest_edge": longest_edge}} if longest_edge else {}
    inputs = loaded.processor(text=text, images=[image], return_tensors="pt", **kw)
    return text, inputs.to(loaded.device)


def generation_kwargs(loaded: Loaded, max_new_tokens: int) -> dict:
    """Greedy decoding, stopping at end of utterance, never emitting image markers."""
    tok = loaded.processor.tokenizer
    eos = sorted({i for i in loaded.token_ids(["<end_of_utterance>", "<|im_end|>"]) if i is not None
                  and i != tok.unk_token_id})
    bad = [i for i in loaded.token_ids(IMAGE_SPECIALS) if i is not None and i != tok.unk_token_id]
    return dict(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
                pad_token_id=tok.pad_token_id, suppress_tokens=bad)


def generate(loaded: Loaded, inputs, max_new_tokens: int, recorder: Recorder | None = None):
    """Greedy generation. With a recorder, also feed the last generated token once more, so that
    every generated token has its own attention row. Returns the new token ids (list of int)."""
    import torch

    with torch.inference_mode():
        if recorder is None:
            out = loaded.model.generate(**inputs, **generation_kwargs(loaded, max_new_tokens))
            return out[0, inputs["input_ids"].shape[1]:].tolist()
        cfg = loaded.model.config.text_config
        prompt_len = inputs["input_ids"].shape[1]
        recorder.allocate(cfg.num_hidden_layers, cfg.num_attention_heads,
                          len(recorder.rows) + max_new_tokens, prompt_len + max_new_tokens)
        with recorder:
            out = loaded.model.generate(**inputs, **generation_kwargs(loaded, max_new_tokens),
                                        return_dict_in_generate=True)
            seq = out.sequences
            new = seq[0, inputs["input_ids"].shape[1]:].tolist()
            if new:
                loaded.model(input_ids=seq[:, -1:], cache=out.past_key_values,
                             attention_mask=torch.ones_like(seq), use_cache=True)
    if not recorder.filled:
        raise RuntimeError("attention capture recorded nothing (is the model using the 'capture' attention?)")
    return new
