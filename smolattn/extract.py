"""Image + prompt -> one run directory (answer, tokens, attention). Used by every script that extracts."""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from . import geometry as geo
from . import methods as mth
from . import model as mdl
from . import store
from .errors import UserError
from .images import open_image

DEFAULT_PROMPT = "Can you describe this image?"


@dataclass(frozen=True)
class Settings:
    prompt: str = DEFAULT_PROMPT
    max_new_tokens: int = 128
    longest_edge: int | None = 2048
    store: str = "compact"
    methods: tuple = (mth.RAW,)     # raw attention, plus any of smolattn.methods.METHODS

    def check(self):
        if not self.prompt.strip():
            raise UserError("the prompt is empty")
        if self.max_new_tokens < 1:
            raise UserError("--max-new-tokens must be at least 1")
        if self.longest_edge is not None and self.longest_edge < 1:
            raise UserError("--longest-edge must be positive")
        if self.store not in store.STORES:
            raise UserError(f"unknown --store {self.store!r}; choose one of {', '.join(store.STORES)}")
        mth.parse(",".join(self.methods))
        return self


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The extraction flags shared by every script that runs the model on images."""
    ap.add_argument("--prompt", default=DEFAULT_PROMPT)
    ap.add_argument("--model-id", default=mdl.DEFAULT_MODEL, help="hub id or local model directory")
    ap.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    ap.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    ap.add_argument("--dtype", choices=mdl.DTYPES, default=None, help="default: float32 on CPU, bfloat16 on GPU")
    ap.add_argument("--max-new-tokens", type=int, default=128, help="greedy decoding, stops at end of utterance")
    ap.add_argument("--longest-edge", type=int, default=2048, help="processor resize of the longest edge")
    ap.add_argument("--store", choices=store.STORES, default="compact",
                    help="compact: text/answer rows, fp16; compact8: same, 8-bit; full: reference (1,H,S,S) npz")
    ap.add_argument("--methods", default=mth.RAW, help=f"comma list of {', '.join(mth.names())} (default raw; "
                    "the others are stored next to it, see docs/run-format.md)")


def settings_from_args(args) -> Settings:
    return Settings(args.prompt, args.max_new_tokens, args.longest_edge, args.store,
                    tuple(mth.parse(args.methods))).check()


def check_writable(directory) -> None:
    """Fail early (before loading a model) if ``directory`` cannot be created; creates nothing."""
    d = Path(directory).absolute()
    parent = d
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"cannot write to {d}: {parent} is not a directory")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".write-test-", dir=parent))
    except OSError as e:
        raise UserError(f"cannot write to {d}: {e.strerror or e}")


MAX_TILES_PER_SIDE = 6    # the processor has <row_r_col_c> markers for at most 6 x 6 tiles


def check_longest_edge(longest_edge: int | None, tile_size: int | None) -> None:
    """--longest-edge above 6 tiles per side cannot work: refuse it in one line."""
    if longest_edge and tile_size and longest_edge > MAX_TILES_PER_SIDE * tile_size:
        raise UserError(f"--longest-edge {longest_edge} is above this model's limit of {MAX_TILES_PER_SIDE * tile_size} "
                        f"({MAX_TILES_PER_SIDE} tiles of {tile_size} px per side)")


def checkpoint_tile_size(model_id: str, revision: str | None = None) -> int | None:
    """The image processor's tile size from the checkpoint's config files, without loading the model
    (None when they are not on this machine: then the check runs after loading)."""
    model_id = mdl.ALIASES.get(model_id, model_id)
    names = ("preprocessor_config.json", "processor_config.json")
    local = Path(model_id).expanduser()
    paths = [local / n for n in names] if local.is_dir() else []
    if not paths and model_id.count("/") == 1:
        try:
            from huggingface_hub import try_to_load_from_cache
            paths = [Path(p) for n in names if isinstance(p := try_to_load_from_cache(model_id, n, revision=revision), str)]
        except Exception:  # noqa: BLE001 - no cache, odd id: the check after loading still runs
            paths = []
    for path in paths:
        try:
            cfg = json.loads(path.read_text())
            size = cfg.get("image_processor", cfg).get("max_image_size", {}).get("longest_edge")
        except (OSError, ValueError, AttributeError):
            continue
        if size:
            return int(size)
    return None


def versions() -> dict:
    import PIL
    import torch
    import transformers
    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "numpy": np.__version__, "pillow": PIL.__version__}


def processor_settings(loaded: mdl.Loaded, longest_edge: int | None) -> dict:
    ip = loaded.processor.image_processor
    return {"longest_edge": longest_edge or ip.size["longest_edge"], "tile_size": ip.max_image_size["longest_edge"],
            "image_seq_len": loaded.processor.image_seq_len, "do_image_splitting": ip.do_image_splitting,
            "resample": int(ip.resample), "image_processor": type(ip).__name__}


def fingerprint_config(loaded: mdl.Loaded, settings: Settings) -> dict:
    """Everything that changes a run's content (the batch manifest refuses to mix these)."""
    return {"model": loaded.model_id, "revision": loaded.revision, "standin": bool(loaded.standin),
            "dtype": loaded.dtype, "processor": processor_settings(loaded, settings.longest_edge),
            **asdict(settings), "greedy": True, "format_version": store.FORMAT_VERSION}


def extract(loaded: mdl.Loaded, image_path, out_dir, settings: Settings, image=None) -> dict:
    """Run the model on one image and write the run to ``out_dir`` atomically. Returns a summary.

    ``image``: an already opened ``(rgb, info)`` pair (the batch engine decodes ahead).
    """
    settings.check()
    check_longest_edge(settings.longest_edge, processor_settings(loaded, None)["tile_size"])
    store.check_target(out_dir)     # before the model works: never a folder of the user's
    t0 = time.perf_counter()
    rgb, info = image or open_image(image_path)
    text, inputs = mdl.encode(loaded, rgb, settings.prompt, settings.longest_edge)
    prompt_ids = inputs["input_ids"][0].tolist()
    tok = loaded.processor.tokenizer
    g = geo.from_tokens(tok.convert_ids_to_tokens(prompt_ids))
    P = len(prompt_ids)
    first, last = g.image_block
    rows = np.arange(P) if settings.store == "full" else \
        np.array([i for i in range(P) if not first <= i <= last])
    t1 = time.perf_counter()
    recorder = mdl.Recorder(rows)
    with mth.keep_image_features(loaded) as kept:
        new = mdl.generate(loaded, inputs, settings.max_new_tokens, recorder)
    t2 = time.perf_counter()
    ids = prompt_ids + new
    tokens = tok.convert_ids_to_tokens(ids)
    S = len(ids)
    layers = recorder.stacked(key_len=S)
    query_positions = np.concatenate([rows, np.arange(P, S)])
    extra = mth.compute(loaded, ids, P, g, query_positions, settings.methods, kept.features)
    t3 = time.perf_counter()
    eos = set(mdl.generation_kwargs(loaded, 1)["eos_token_id"])
    tile = processor_settings(loaded, settings.longest_edge)["tile_size"]
    meta = {
        "model": {"id": loaded.model_id, "revision": loaded.revision, "standin": bool(loaded.standin),
                  "standin_info": loaded.standin, "dtype": loaded.dtype, "device": loaded.device,
                  "num_layers": len(layers), "num_heads": int(layers[0].shape[0])},
        "prompt": settings.prompt, "chat_text": text,
        "answer": tok.decode(new, skip_special_tokens=True).strip(),
        "token_ids": ids, "prompt_length": P,
        "generation": {"greedy": True, "max_new_tokens": settings.max_new_tokens, "new_tokens": len(new),
                       "stopped_at_eos": bool(new) and new[-1] in eos},
        "image": info,
        "processor": processor_settings(loaded, settings.longest_edge),
        "tiles": {"rows": g.rows, "cols": g.cols, "global_last": True,
                  "resized_size": [max(g.cols, 1) * tile, max(g.rows, 1) * tile],
                  "tokens_per_tile_side": g.side},
        "versions": versions(),
    }
    image_name = store.image_name(info)
    timings = {"preprocess_s": round(t1 - t0, 4), "generate_s": round(t2 - t1, 4), "methods_s": round(t3 - t2, 4)}
    meta["timings"] = timings
    store.write_run(out_dir, tokens=tokens, layers=layers, query_positions=query_positions,
                    store=settings.store, geometry=g, meta=meta, image=rgb, image_name=image_name, methods=extra)
    timings["write_s"] = round(time.perf_counter() - t3, 4)
    return {"run": str(out_dir), "answer": meta["answer"], "new_tokens": len(new), "grid": [g.rows, g.cols],
            "timings": timings}
