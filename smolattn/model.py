"""Model loading and attention capture.

Capture is a custom attention function registered with transformers' ``AttentionInterface`` under
the name ``"capture"``: it returns SDPA's output (same speed, same answer) and, while a
:class:`Recorder` is active, also computes softmax(q k^T) for just the query rows we keep and writes
them, in fp16, into one buffer preallocated on the model's device. Nothing is copied to the host and
nothing waits for the device while generating: the rows of each image come back in one
device-to-host copy (:func:`to_host`) after generation. No layer's full seq x seq matrix is ever
materialised. Batches are left-padded; every batch row keeps its own query rows.
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

from .runmeta import DEFAULT_MODEL, DEFAULT_VIDEO_MODEL  # noqa: E402 - defined once, in the light module
ALIASES = {"HuggingFaceTB/SmolVLM-Instruct-256M": DEFAULT_MODEL, "SmolVLM-Instruct-256M": DEFAULT_MODEL,
           "SmolVLM-256M-Instruct": DEFAULT_MODEL}
DTYPES = ("float32", "bfloat16", "float16")
# Tokens the model must never emit inside an answer (they would read as a second image).
IMAGE_SPECIALS = ["<image>", "<fake_token_around_image>", "<global-img>"] + [
    f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]

_local = threading.local()


class Recorder:
    """Collects attention rows per layer, on the model's device, while active (one call at a time per thread).

    rows: the query positions kept from the first call that has several queries (the prefill),
    indices into that call's (left-padded) queries; one array for a batch of one, or one array per
    batch row. Every later single-query call (a decode step) adds one row per batch row.
    :meth:`allocate` sizes one buffer up front on the device: (layers, batch, heads, prefill rows +
    decode rows, keys) float16; the row index goes to the device once. Recording is pure device work.
    """

    def __init__(self, rows):
        rows = [rows] if np.ndim(rows[0] if len(rows) else 0) == 0 else rows
        self.rows = [np.asarray(r, dtype=np.int64) for r in rows]
        self.buffer = None
        self.filled: list[int] = []

    @property
    def prefill_rows(self) -> int:
        return max(len(r) for r in self.rows)

    def allocate(self, layers: int, heads: int, decode_rows: int, max_keys: int, device="cpu") -> None:
        import torch

        width = self.prefill_rows
        index = np.stack([np.pad(r, (0, width - len(r)), mode="edge") if len(r) else np.zeros(width, np.int64)
                          for r in self.rows])
        self.index = torch.as_tensor(index).to(device)                     # (B, R): once per generation
        self.batch_index = torch.arange(len(self.rows), device=device)[:, None]
        self.key_index = torch.arange(max_keys, device=device)
        self.buffer = torch.zeros((layers, len(self.rows), heads, width + decode_rows, max_keys),
                                  dtype=torch.float16, device=device)
        self.filled = [0] * layers

    def add(self, layer: int, probs) -> None:
        """probs: (batch, heads, rows, keys) of one call, on the device."""
        if self.buffer is None:
            raise RuntimeError("Recorder.allocate() must be called before recording (generate() does it)")
        start, n = self.filled[layer], probs.shape[2]
        self.buffer[layer, :, :, start:start + n, :probs.shape[3]] = probs
        self.filled[layer] = start + n

    def __enter__(self):
        _local.recorder = self
        return self

    def __exit__(self, *exc):
        _local.recorder = None

    def sample(self, b: int, new_rows: int, keys):
        """Batch row ``b``'s rows on the device: its prefill rows, then its first ``new_rows`` decode
        rows, over ``keys`` (a slice, or a tensor of key positions on the device); (layers, heads, rows,
        keys). One gather on the device, no copy to the host."""
        import torch

        if not any(self.filled):
            raise RuntimeError("attention capture recorded nothing (is the model using the 'capture' attention?)")
        width, dev = self.prefill_rows, self.buffer.device
        idx = torch.cat([torch.arange(len(self.rows[b]), device=dev), torch.arange(width, width + new_rows, device=dev)])
        rows = self.buffer[:, b].index_select(2, idx)
        return rows[..., keys] if isinstance(keys, slice) else rows.index_select(3, keys)

    def stacked(self, key_len: int) -> list[np.ndarray]:
        """Batch of one: per layer, (H, Q, key_len) float16 rows on the host (one copy)."""
        n = self.filled[0] - self.prefill_rows
        return list(to_host(self.sample(0, n, slice(0, key_len))))


def to_host(tensor) -> np.ndarray:
    """The one device-to-host copy of captured rows (pinned memory, asynchronous, then one wait)."""
    import torch

    if tensor.device.type == "cpu":
        return tensor.contiguous().numpy()
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    torch.cuda.current_stream(tensor.device).synchronize()
    return host.numpy()


def capture_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """SDPA's output; with an active recorder also the kept softmax rows (device work only: no host
    copy, no ``.item()``, no index built on the host). The kept rows' scores q k^T are computed in
    fp32 from the upcast queries and keys (as SDPA accumulates), whatever the model's dtype.

    With an intervention active (:func:`smolattn.interventions.applied`): a knockout in this layer
    adds -inf at its (query, key) pairs to the mask that both SDPA and the captured rows use; an
    ablated head's output slice (the input of ``o_proj``) is zeroed or replaced by its mean. With no
    intervention (or none in this layer) this is exactly the plain path."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    act = getattr(_local, "intervention", None)
    if act is not None:
        attention_mask = act.mask(module.layer_idx, query, key, attention_mask)
    out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                    dropout=dropout, **kwargs)
    if act is not None:
        out = act.ablate(module.layer_idx, out, key.shape[2], attention_mask)
    rec = getattr(_local, "recorder", None)
    if rec is None:
        return out, None
    import torch

    B, H, q_len, D = query.shape
    k_len, kv_heads = key.shape[2], key.shape[1]
    if q_len == 1:
        q, rows = query, None
    else:   # the kept rows of each batch row: (B, R) positions
        rows = rec.index
        q = query.transpose(1, 2)[rec.batch_index, rows].transpose(1, 2)            # (B, H, R, D)
    n = q.shape[2]
    scale = scaling if scaling is not None else D ** -0.5
    # grouped query heads against their shared key head, without repeating the keys; fp32 (issue 17.6)
    scores = torch.matmul(q.reshape(B, kv_heads, H // kv_heads * n, D).float(), key.float().transpose(2, 3))
    scores = scores.reshape(B, H, n, k_len) * scale
    if attention_mask is not None and attention_mask.dim() == 4:
        m = attention_mask.expand(B, -1, -1, -1)
        if m.shape[2] == q_len and rows is not None:
            m = m[:, 0][rec.batch_index, rows].unsqueeze(1)
        m = m[..., :k_len]
        scores = scores.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else scores + m.float()
    elif rows is not None:   # SDPA relied on is_causal: query i sits at k_len - q_len + i
        qpos = k_len - q_len + rows
        scores = scores.masked_fill(rec.key_index[:k_len][None, None, None, :] > qpos[:, None, :, None],
                                    float("-inf"))
    rec.add(module.layer_idx, torch.softmax(scores, dim=-1))
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
    source: str | None = None       # the local directory loaded from (worker processes load the processor from it)

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


def default_dtype(device: str) -> str:
    """float32 on CPU, bfloat16 on an accelerator (the one place this default lives)."""
    return "float32" if str(device).startswith("cpu") else "bfloat16"


def add_model_arguments(ap) -> None:
    """The model flags of every script that loads the model."""
    ap.add_argument("--model-id", default=DEFAULT_MODEL, help=f"hub id or local model directory (default "
                    f"{DEFAULT_MODEL}; with --video / --video-dir {DEFAULT_VIDEO_MODEL})")
    ap.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    ap.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    ap.add_argument("--dtype", choices=DTYPES, default=None, help="default: float32 on CPU, bfloat16 on GPU")


def video_model(args) -> None:
    """--video / --video-dir left at the default model: SmolVLM2's (SmolVLM v1 has no video support)."""
    if args.model_id == DEFAULT_MODEL:
        args.model_id = DEFAULT_VIDEO_MODEL
        print(f"note: a video: using {DEFAULT_VIDEO_MODEL} (SmolVLM v1 reads no video; --model-id picks another)",
              file=sys.stderr)


def load(model_id: str = DEFAULT_MODEL, device: str | None = None, dtype: str | None = None,
         revision: str | None = None) -> Loaded:
    """Load model + processor from a local directory or the hub, with the capture attention."""
    import time

    import torch
    from transformers import AutoModelForImageTextToText

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    _register()
    t0 = time.perf_counter()
    model_id = resolve_model_id(model_id)
    device = device or default_device()
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device} requested but no CUDA device is available")
    dtype = dtype or default_dtype(device)
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
                shape = "smolvlm2-tiny" if "smolvlm2" in model_id.lower() else "tiny"
                raise UserError(
                    f"cannot reach the Hugging Face hub and {model_id!r} is not cached; for an offline stand-in run "
                    f"`python -m smolattn.standin --shape {shape} models/{shape}` and pass --model-id models/{shape}")
            try:
                source = snapshot_download(model_id, revision=revision)
            except Exception as e:  # noqa: BLE001
                raise UserError(f"could not download model {model_id!r}: {type(e).__name__}: {str(e).splitlines()[0]}")
    try:
        processor = load_processor(source)
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
    return Loaded(model, processor, model_id, rev, device, dtype, standin, time.perf_counter() - t0, str(source))


def model_type(source) -> str | None:
    """``model_type`` of a local model directory's config.json (idefics3: SmolVLM v1; smolvlm: SmolVLM2)."""
    import json

    try:
        return json.loads((Path(source) / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def load_processor(source):
    """The checkpoint's own processor (AutoProcessor). A SmolVLM2 checkpoint's ``SmolVLMProcessor``
    cannot be built where torchvision is missing or broken (its video processor needs it; the PyPI
    wheels fail with a CPU torch): then the Idefics3-style processor is built from the checkpoint's
    own files around ``SmolVLMImageProcessorPil`` and the tokenizer, which tokenises images exactly as
    SmolVLM2 does; videos are handled by :mod:`smolattn.video` (``video_sampling`` kept on it)."""
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(source)
    except Exception:   # noqa: BLE001 - ImportError (torchvision), or a broken torchvision's RuntimeError
        if model_type(source) != "smolvlm":
            raise
    return fallback_processor(source)


def fallback_processor(source):
    """The Idefics3-style processor :func:`load_processor` builds for a SmolVLM2 checkpoint where its
    own ``SmolVLMProcessor`` cannot be built (also called directly, to compare the two)."""
    import json

    from transformers import AutoTokenizer, Idefics3Processor
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

    folder = Path(source)
    cfg = {}
    for name in ("processor_config.json", "preprocessor_config.json"):
        if (folder / name).is_file():
            d = json.loads((folder / name).read_text())
            cfg.update(d.pop("image_processor", {}) if name == "processor_config.json" else {}, **d)
    video = cfg.get("video_sampling")
    allowed = set(SmolVLMImageProcessorPil.valid_kwargs.__annotations__)
    image_processor = SmolVLMImageProcessorPil(**{k: v for k, v in cfg.items() if k in allowed})
    tokenizer = AutoTokenizer.from_pretrained(source)
    template = tokenizer.chat_template
    for name in ("chat_template.jinja", "chat_template.json"):
        if template is None and (folder / name).is_file():
            text = (folder / name).read_text()
            template = json.loads(text)["chat_template"] if name.endswith(".json") else text
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer,
                                  image_seq_len=int(cfg.get("image_seq_len", 64)), chat_template=template)
    processor.video_sampling = dict(video) if video else None
    processor.smolvlm_fallback = True
    return processor


def chat_text(processor, prompt: str, images: int = 1) -> str:
    """The chat text of ``images`` images (placeholders, in order) then the prompt."""
    messages = [{"role": "user", "content": [{"type": "image"}] * images + [{"type": "text", "text": prompt}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


def process(processor, image, prompt: str, longest_edge: int | None = None):
    """(chat text, processor inputs on the host) for one image (or a list of images, in order) +
    prompt. ``longest_edge`` None: the checkpoint's own processor setting."""
    images = list(image) if isinstance(image, (list, tuple)) else [image]
    text = chat_text(processor, prompt, len(images))
    kw = {"size": {"longest_edge": longest_edge}} if longest_edge else {}
    return text, processor(text=text, images=[images], return_tensors="pt", **kw)


def encode(loaded: Loaded, image, prompt: str, longest_edge: int | None = None):
    """Processor inputs (on the model's device) for one image + prompt."""
    text, inputs = process(loaded.processor, image, prompt, longest_edge)
    return text, inputs.to(loaded.device)


def generation_kwargs(loaded: Loaded, max_new_tokens: int) -> dict:
    """Greedy decoding, stopping at end of utterance, never emitting image markers."""
    tok = loaded.processor.tokenizer
    eos = sorted({i for i in loaded.token_ids(["<end_of_utterance>", "<|im_end|>"]) if i is not None
                  and i != tok.unk_token_id})
    bad = [i for i in loaded.token_ids(IMAGE_SPECIALS) if i is not None and i != tok.unk_token_id]
    return dict(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
                pad_token_id=tok.pad_token_id, suppress_tokens=bad)


def until_eos(ids: list[int], eos) -> list[int]:
    """A batch row runs on (padded) after its end of utterance: keep up to and including the first eos."""
    return next((ids[:i + 1] for i, t in enumerate(ids) if t in eos), ids)


def generate_batch(loaded: Loaded, inputs, max_new_tokens: int, recorder: Recorder | None = None,
                   keep: dict | None = None, **extra) -> list[list[int]]:
    """Greedy generation for a (left-padded) batch; the new token ids of every batch row, each cut
    after its own end of utterance. With a recorder, the last generated tokens are fed once more, so
    that every generated token has its own attention row; the recorder's buffer is allocated here,
    on the model's device. ``extra``: more ``generate`` arguments (a prefix ``cache``). ``keep`` (with
    a recorder): receives the generation's ``cache`` and raw ``first_logits`` (B, V) of its first step."""
    import torch

    kwargs = generation_kwargs(loaded, max_new_tokens)
    if getattr(_local, "streamer", None) is not None:     # the live viewer's worker: tokens as they come
        kwargs["streamer"] = _local.streamer
    eos = set(kwargs["eos_token_id"])
    ids = inputs["input_ids"]
    with torch.inference_mode():
        if recorder is None:
            out = loaded.model.generate(**inputs, **kwargs, **extra)
            return [until_eos(row, eos) for row in out[:, ids.shape[1]:].tolist()]
        cfg = loaded.model.config.text_config
        recorder.allocate(cfg.num_hidden_layers, cfg.num_attention_heads, max_new_tokens,
                          ids.shape[1] + max_new_tokens, loaded.device)
        with recorder:
            out = loaded.model.generate(**inputs, **kwargs, **extra, return_dict_in_generate=True,
                                        output_logits=keep is not None)
            seq = out.sequences
            mask = torch.cat([inputs["attention_mask"], torch.ones_like(seq[:, ids.shape[1]:])], dim=1)
            loaded.model(input_ids=seq[:, -1:], cache=out.past_key_values, attention_mask=mask,
                         position_ids=mask.sum(-1, keepdim=True) - 1, use_cache=True, logits_to_keep=1)
    if keep is not None:
        keep.update(cache=out.past_key_values, first_logits=out.logits[0])
    return [until_eos(row, eos) for row in seq[:, ids.shape[1]:].tolist()]


def generate(loaded: Loaded, inputs, max_new_tokens: int, recorder: Recorder | None = None, **extra) -> list[int]:
    """Greedy generation of one prompt (batch of one); the new token ids."""
    return generate_batch(loaded, inputs, max_new_tokens, recorder, **extra)[0]


class streaming:
    """``with streaming(streamer):`` every generate in this thread gets ``streamer`` (a transformers
    BaseStreamer: put() with the prompt ids, then with each new token; end()), as the live viewer streams."""

    def __init__(self, streamer):
        self.streamer = streamer

    def __enter__(self):
        _local.streamer = self.streamer
        return self.streamer

    def __exit__(self, *exc):
        _local.streamer = None
