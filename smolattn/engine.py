"""The one engine behind extraction, the batch runner and POPE.

* :func:`prepare` - image + prompt -> processor inputs, geometry and the query rows to keep; needs
  only the processor, so it runs in worker processes (:class:`Preparer`).
* :func:`run` - several prepared images in ONE greedy ``generate`` call: left padding, every batch
  row with its own image block, kept rows and end of utterance (rows after it are dropped); the
  captured rows of each image come back in one device-to-host copy after generation.
* :func:`pipeline` - bounded queues around :func:`run`: decode + processor in worker processes,
  the model step in this thread, the store write in writer threads, so the accelerator never waits
  on compression and the CPU never waits on the accelerator.
* POPE's shared prefix (:func:`prefill`, :func:`suffix_ids`, :func:`answer_cached`): an image's
  vision features and prompt prefix are computed once (``logits_to_keep=1``), and the questions of
  several images are answered together in one batch on top of their stacked, left-padded caches.
* :func:`config_hash` (smolattn.runmeta's) - the one hash of a configuration (batch manifest, POPE answers).
"""
from __future__ import annotations

import os
import threading
import time
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from . import geometry as geo
from . import model as mdl
from .runmeta import config_hash  # noqa: F401  (engine.config_hash: its old home)


def default_batch_size(device: str) -> int:
    """Images per ``generate`` call: 8 on an accelerator; 1 on CPU, where a batch gains little."""
    return 1 if str(device).startswith("cpu") else 8


def default_workers(device: str) -> int:
    """Decode + processor worker processes: none on CPU (the model already uses every core); on an
    accelerator enough to keep it fed."""
    return 0 if str(device).startswith("cpu") else max(1, min(8, (os.cpu_count() or 2) - 2))


def default_writers(device: str) -> int:
    """Store-write threads (the codec releases the GIL): 2 on CPU, up to 8 next to an accelerator."""
    return 2 if str(device).startswith("cpu") else max(2, min(8, (os.cpu_count() or 4) // 2))


# ============================================================================ one image, prepared

@dataclass
class Prepared:
    """One image + prompt, ready for the model (host tensors; picklable)."""
    text: str                      # the chat text given to the processor
    ids: list[int]                 # prompt token ids
    pixel_values: object           # (tiles, 3, h, w) float32
    pixel_attention_mask: object   # (tiles, h, w) bool, or None
    geometry: geo.Geometry
    rows: np.ndarray               # kept query positions of the prompt
    image: object = None           # the RGB image (PIL), for the run directory
    info: dict = field(default_factory=dict)
    seconds: float = 0.0           # decode + processor time
    # several images or a video (prepare_images, prepare_video): every image (or frame) in order;
    # for one image: images = [image], infos = [info], layout = its one-image Layout
    layout: geo.Layout | None = None
    images: list | None = None
    infos: list | None = None

    def __post_init__(self):
        if self.layout is None:
            self.layout = geo.Layout.single(self.geometry)
        if self.images is None:
            self.images = [self.image]
        if self.infos is None:
            self.infos = [self.info]


def prepare(processor, rgb, prompt: str, longest_edge=None, keep: str = "text", info=None) -> Prepared:
    """Processor inputs for one image. keep: "text" keeps every prompt position outside the image
    block (the compact stores), "all" every position (the full store)."""
    t0 = time.perf_counter()
    text, inputs = mdl.process(processor, rgb, prompt, longest_edge)
    ids = inputs["input_ids"][0].tolist()
    g = geo.from_tokens(processor.tokenizer.convert_ids_to_tokens(ids))
    rows = np.arange(len(ids))
    rows = rows if keep == "all" else rows[g.outside_image(rows)]
    mask = inputs.get("pixel_attention_mask")
    return Prepared(text, ids, inputs["pixel_values"][0], None if mask is None else mask[0], g, rows, rgb,
                    dict(info or {}), time.perf_counter() - t0 + (info or {}).get("decode_s", 0.0))


def prepare_images(processor, images, prompt: str, longest_edge=None, keep: str = "text", infos=None) -> Prepared:
    """Several RGB images in one prompt, in order (each with its own tiles and global tile). keep:
    "text" keeps every prompt position outside every image block, "all" every position."""
    t0 = time.perf_counter()
    images, infos = list(images), list(infos or [{} for _ in images])
    text, inputs = mdl.process(processor, images, prompt, longest_edge)
    ids = inputs["input_ids"][0].tolist()
    layout = geo.layout_from_tokens(processor.tokenizer.convert_ids_to_tokens(ids))
    if len(layout) != len(images):
        raise RuntimeError(f"{len(images)} images but {len(layout)} image blocks in the prompt")
    rows = np.arange(len(ids)) if keep == "all" else layout.outside(np.arange(len(ids)))
    mask = inputs.get("pixel_attention_mask")
    g = layout.images[0] if len(layout) == 1 else layout
    return Prepared(text, ids, inputs["pixel_values"][0], None if mask is None else mask[0], g, rows, images[0],
                    dict(infos[0]), time.perf_counter() - t0 + sum(i.get("decode_s", 0.0) for i in infos),
                    layout=layout, images=images, infos=[dict(i) for i in infos])


def prepare_video(processor, frames, prompt: str, keep: str = "text", keep_frame_rows: bool = False) -> Prepared:
    """The sampled frames of a video (``smolattn.video.read``) + prompt. Kept rows ("text"): every
    position after the last frame (the user's prompt text, the last prompt position; the answer rows
    are always kept); ``keep_frame_rows`` adds every other position outside the frames (the intro and
    each frame's timestamp text); "all": every position."""
    from . import video

    t0 = time.perf_counter()
    chat, _, inputs = video.process(processor, frames, prompt)
    ids = inputs["input_ids"][0].tolist()
    layout = geo.layout_from_tokens(processor.tokenizer.convert_ids_to_tokens(ids), (geo.FRAME,) * len(frames.images),
                                    frames.timestamps)
    if len(layout) != len(frames.images):
        raise RuntimeError(f"{len(frames.images)} frames but {len(layout)} image blocks in the prompt")
    every = np.arange(len(ids))
    if keep == "all":
        rows = every
    elif keep_frame_rows:
        rows = layout.outside(every)
    else:
        rows = every[every > layout.image_block[1]]
    infos = [{"frame": k, "index": i, "timestamp": t, "size": list(im.size), "format": "JPEG"}
             for k, (i, t, im) in enumerate(zip(frames.indices, frames.timestamps, frames.images))]
    info = dict(frames.info, kind="video", frames=len(frames.images), keep_frame_rows=bool(keep_frame_rows))
    return Prepared(chat, ids, inputs["pixel_values"][0], inputs["pixel_attention_mask"][0], layout, rows,
                    frames.images[0], info, time.perf_counter() - t0 + frames.info.get("decode_s", 0.0),
                    layout=layout, images=list(frames.images), infos=infos)


_WORKER: dict = {}


def _init_worker(source: str):
    import torch
    from transformers.utils import logging as hf_logging

    parent = os.getppid()

    def orphaned():   # the parent died without shutting the pool down (a killed Ray actor): leave too
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=orphaned, daemon=True, name="orphan-watch").start()
    torch.set_num_threads(1)
    hf_logging.set_verbosity_error()
    _WORKER["processor"] = mdl.load_processor(source)


def prepare_path(path, prompt, longest_edge, keep, processor=None) -> Prepared:
    """Decode an image file and prepare it (in a worker process: with the worker's processor)."""
    from .images import open_image

    t0 = time.perf_counter()
    rgb, info = open_image(path)
    return prepare(processor or _WORKER["processor"], rgb, prompt, longest_edge, keep,
                   dict(info, decode_s=time.perf_counter() - t0))


class Preparer:
    """Decode + processor for image paths, ahead of the model: in ``workers`` processes (each loads the
    processor once from the model directory), or in one background thread when ``workers`` is 0."""

    def __init__(self, loaded: mdl.Loaded, prompt: str, longest_edge, keep: str, workers: int = 0):
        self.args = (prompt, longest_edge, keep)
        if workers > 0:
            import multiprocessing as mp

            import torch.multiprocessing  # noqa: F401 - tensors travel through shared memory
            self.pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                                            initargs=(loaded.source,))
        else:
            self.pool = ThreadPoolExecutor(1, thread_name_prefix="prepare")
            self.args += (loaded.processor,)

    def submit(self, path):
        return self.pool.submit(prepare_path, str(path), *self.args)

    def close(self):
        self.pool.shutdown(wait=True, cancel_futures=True)


# ============================================================================ the model step

def collate(prepared: list[Prepared], pad_id: int, device) -> tuple[dict, list[int]]:
    """Left-padded batch inputs and each row's padding. Images with fewer tiles are padded with
    all-zero tiles, which Idefics3 drops before the vision encoder (as its own processor does)."""
    import torch

    P = max(len(p.ids) for p in prepared)
    pads = [P - len(p.ids) for p in prepared]
    ids = torch.tensor([[pad_id] * n + p.ids for n, p in zip(pads, prepared)])
    mask = torch.tensor([[0] * n + [1] * len(p.ids) for n, p in zip(pads, prepared)])
    tiles = max(p.pixel_values.shape[0] for p in prepared)
    pv = torch.zeros((len(prepared), tiles, *prepared[0].pixel_values.shape[1:]), dtype=prepared[0].pixel_values.dtype)
    pam = None
    for b, p in enumerate(prepared):
        pv[b, :p.pixel_values.shape[0]] = p.pixel_values
    if prepared[0].pixel_attention_mask is not None:
        pam = torch.zeros((len(prepared), tiles, *prepared[0].pixel_attention_mask.shape[1:]), dtype=torch.bool)
        for b, p in enumerate(prepared):
            pam[b, :p.pixel_attention_mask.shape[0]] = p.pixel_attention_mask
    inputs = {"input_ids": ids, "attention_mask": mask, "pixel_values": pv}
    if pam is not None:
        inputs["pixel_attention_mask"] = pam
    return {k: v.to(device, non_blocking=True) for k, v in inputs.items()}, pads


@dataclass
class Output:
    new: list[int]                 # generated ids, up to and including the end of utterance
    layers: np.ndarray | None      # (layers, heads, rows, seq) float16 on the host: prompt rows, then one per new token
    generate_s: float = 0.0        # the whole batch's generate time
    batch: int = 1
    methods: dict = field(default_factory=dict)   # derived maps (smolattn.methods.compute), filled by the caller
    methods_s: float = 0.0


def run(loaded: mdl.Loaded, prepared: list[Prepared], max_new_tokens: int, capture: bool = True,
        features=None, keep: dict | None = None) -> list[Output]:
    """One ``generate`` call for the whole batch; with ``capture``, each image's rows over its own
    keys (its padding dropped), copied to the host once per image after generation. ``features``:
    the batch's image features (``get_image_features`` output) computed already: no vision pass.
    ``keep``: see model.generate_batch (the generation's cache and first-step logits)."""
    import torch

    t0 = time.perf_counter()
    inputs, pads = collate(prepared, loaded.processor.tokenizer.pad_token_id, loaded.device)
    extra = {}
    if features is not None:
        inputs = {k: inputs[k] for k in ("input_ids", "attention_mask")}
        extra["mm_encoder_outputs"] = {"image": features}
    elif loaded.dtype != "float32":
        inputs["pixel_values"] = inputs["pixel_values"].to(getattr(torch, loaded.dtype))
    recorder = mdl.Recorder([p.rows + n for p, n in zip(prepared, pads)]) if capture else None
    news = mdl.generate_batch(loaded, inputs, max_new_tokens, recorder, keep, **extra)
    P = inputs["input_ids"].shape[1]
    layers = [None] * len(prepared)
    if capture:
        on_device = [recorder.sample(b, len(new), slice(pads[b], P + len(new))) for b, new in enumerate(news)]
        layers = [mdl.to_host(t) for t in on_device]
    dt = time.perf_counter() - t0
    return [Output(new, lay, dt, len(prepared)) for new, lay in zip(news, layers)]


# ============================================================================ the pipeline

def pipeline(items: list, submit, step, finish, on_result, *, batch_size: int = 1, writers: int = 2,
             ahead: int = 2, on_error=None) -> None:
    """Bounded producer/consumer around the model.

    submit(item) -> a future of its prepared input (decode + processor, in worker processes);
    step(list of prepared) -> list of outputs (the model; this thread); finish(item, prepared, output)
    -> result (the store write; in ``writers`` threads). on_result(result) is called in this thread as
    results complete; on_error(item, exception) -> result for an item that failed before or in the
    model step (default: raise it). Results come in item order. At most ``ahead`` batches are being prepared and ``writers`` x 2 outputs wait for a
    writer, so memory stays bounded however long the list."""
    on_error = on_error or _reraise
    queued: deque = deque()
    todo = iter(items)
    writes: deque = deque()
    slots = threading.BoundedSemaphore(max(1, writers) * 2)

    def fill():
        while len(queued) < batch_size * ahead:
            item = next(todo, None)
            if item is None:
                return
            queued.append((item, submit(item)))

    def drain(block: bool):
        while writes and (block or writes[0][1].done()):
            item, fut = writes.popleft()
            try:
                result = fut.result()
            except Exception as e:  # noqa: BLE001 - a failed write is that item's error
                result = on_error(item, e)
            on_result(result)

    def release(_):
        slots.release()

    def failed(item, e):   # in order with the writes, so results come out in item order
        done = Future()
        try:
            done.set_result(on_error(item, e))
        except Exception as err:  # noqa: BLE001 - re-raised by drain, in order
            done.set_exception(err)
        writes.append((item, done))

    with ThreadPoolExecutor(max(1, writers), thread_name_prefix="writer") as pool:
        fill()
        while queued:
            entries = []   # (item, prepared or the exception that stopped it), in item order
            while queued and sum(not isinstance(p, Exception) for _, p in entries) < batch_size:
                item, fut = queued.popleft()
                try:
                    entries.append((item, fut.result()))
                except Exception as e:  # noqa: BLE001 - a bad image is that item's error row
                    entries.append((item, e))
            fill()   # the next batch is decoded while the model works on this one
            batch = [p for _, p in entries if not isinstance(p, Exception)]
            try:
                outputs = iter(step(batch) if batch else [])
            except Exception as e:  # noqa: BLE001 - the whole batch failed: every image's error
                entries = [(item, e) for item, _ in entries]
            for item, prep in entries:
                if isinstance(prep, Exception):
                    failed(item, prep)
                    continue
                slots.acquire()
                fut = pool.submit(finish, item, prep, next(outputs))
                fut.add_done_callback(release)
                writes.append((item, fut))
            drain(block=False)
        drain(block=True)


def _reraise(item, e):
    raise e


# ============================================================================ POPE: the shared prefix

@dataclass
class Prefix:
    """The prompt tokens up to and including the image block's closing marker, and their KV cache."""
    ids: list[int]
    text: str            # those tokens as text: what the processor's expanded prompt starts with
    head: str            # the chat text before the image placeholder
    cache: object
    geometry: geo.Geometry


def split_chat(loaded, prompt: str) -> tuple[str, str, str]:
    """(chat text, text before the image placeholder, text after it)."""
    chat = mdl.chat_text(loaded.processor, prompt)
    head, sep, tail = chat.partition(getattr(loaded.processor, "image_token", "<image>"))
    if not sep:
        raise RuntimeError("the chat template put no image placeholder in the prompt")
    return chat, head, tail


def prefill(loaded, image, prompt: str, longest_edge=None) -> tuple[Prefix, list[int]]:
    """Encode ``image`` with ``prompt`` (any of its questions), run the vision encoder and prefill the
    prefix once (logits of the last position only). Returns the prefix and the full prompt ids."""
    import torch

    _, inputs = mdl.encode(loaded, image, prompt, longest_edge)
    ids = inputs["input_ids"][0].tolist()
    g = geo.from_tokens(loaded.processor.tokenizer.convert_ids_to_tokens(ids))
    end = g.block_end
    with torch.inference_mode():
        out = loaded.model(input_ids=inputs["input_ids"][:, :end], attention_mask=inputs["attention_mask"][:, :end],
                           pixel_values=inputs["pixel_values"], pixel_attention_mask=inputs.get("pixel_attention_mask"),
                           use_cache=True, logits_to_keep=1)
    text = loaded.processor.tokenizer.decode(ids[:end], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    return Prefix(ids[:end], text, split_chat(loaded, prompt)[1], out.cache, g), ids


def suffix_ids(loaded, prefix: Prefix, prompt: str) -> list[int] | None:
    """The tokens after the prefix for ``prompt``, or None when prefix + suffix would not be the full
    tokenisation of this prompt (then the caller takes the naive path)."""
    _, head, tail = split_chat(loaded, prompt)
    full = loaded.processor.tokenizer(prefix.text + tail)["input_ids"]
    n = len(prefix.ids)
    return full[n:] if head == prefix.head and full[:n] == prefix.ids and len(full) > n else None


def stack_caches(prefixes: list[Prefix]):
    """One batched KV cache: every prefix's cache left-padded to the longest (the padding is masked)."""
    import torch
    from transformers import DynamicCache

    P = max(len(p.ids) for p in prefixes)
    data = []
    for layer in range(len(prefixes[0].cache.layers)):
        ks, vs = [], []
        for p in prefixes:
            k, v = p.cache.layers[layer].keys, p.cache.layers[layer].values
            pad = P - k.shape[2]
            ks.append(torch.nn.functional.pad(k, (0, 0, pad, 0)))
            vs.append(torch.nn.functional.pad(v, (0, 0, pad, 0)))
        data.append((torch.cat(ks), torch.cat(vs)))
    return DynamicCache(ddp_cache_data=data)


def answer_cached(loaded, jobs: list[tuple[Prefix, list[int]]], max_new_tokens: int, rows=None):
    """Greedy answers for (prefix, suffix ids) pairs, of any images and lengths, in ONE batch: the
    prefixes' caches stacked and left-padded, each suffix left-padded after its prefix; the attention
    mask hides both paddings and the positions count only real tokens. The prefixes' own caches are
    not touched. Returns the new token ids per job.

    ``rows``: per job, indices into its suffix whose attention rows to capture. Then returns (new ids,
    layers) where each job's layers are (layers, heads, its rows + one per new token, prefix + suffix +
    new keys) float16 on the host, both paddings dropped: what the job alone would record."""
    import torch

    pad_id = loaded.processor.tokenizer.pad_token_id
    P = max(len(p.ids) for p, _ in jobs)
    S = max(len(s) for _, s in jobs)
    ids, mask = [], []
    for p, s in jobs:
        a, b = P - len(p.ids), S - len(s)
        ids.append([pad_id] * a + p.ids + [pad_id] * b + s)
        mask.append([0] * a + [1] * len(p.ids) + [0] * b + [1] * len(s))
    ids = torch.tensor(ids, device=loaded.device)
    mask = torch.tensor(mask, device=loaded.device)
    cache = stack_caches([p for p, _ in jobs])
    recorder = None   # the call's queries are the suffixes, each after its own left padding
    if rows is not None:
        recorder = mdl.Recorder([np.asarray(r, dtype=np.int64) + S - len(s) for r, (_, s) in zip(rows, jobs)])
    news = mdl.generate_batch(loaded, {"input_ids": ids, "attention_mask": mask}, max_new_tokens, recorder,
                              cache=cache)
    if recorder is None:
        return news
    layers = []
    for j, ((p, s), new) in enumerate(zip(jobs, news)):
        keys = torch.cat([torch.arange(P - len(p.ids), P), torch.arange(P + S - len(s), P + S + len(new))])
        layers.append(mdl.to_host(recorder.sample(j, len(new), keys.to(loaded.device))))
    return news, layers
