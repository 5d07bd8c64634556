"""What a run is made of, recorded once: the configuration fingerprint (everything that changes the
rows), the run's meta.json sections around it, and the command that rebuilds a run.

Used by every writer (extract, the batch, POPE's attention runs) and by the viewer, so it stays light:
no torch or transformers import here (``versions`` imports them only when called, from a writer).

* :func:`fingerprint` - the one configuration record: model id, resolved revision, stand-in or not,
  dtype, processor settings, what the script was asked (prompt or POPE suffix, max new tokens,
  ``--longest-edge`` as given, store, methods, attention on/off), greedy, format version. The batch
  manifest and POPE's answers.jsonl refuse to mix its hashes (:func:`config_hash`); every run records
  it as ``meta.config`` (hash: ``meta.config_key``).
* :func:`run_meta` - the meta.json of a run (the format, geometry, attention and methods sections are
  added by ``store.write_run``).
* :func:`command` - the command that rebuilds exactly a run, with other methods (the viewer's hint).
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import shlex
from pathlib import Path

from .methods import RAW, parse

DEFAULT_MODEL = "HuggingFaceTB/SmolVLM-256M-Instruct"   # the scripts' --model-id default (model.py uses this one)
DEFAULT_VIDEO_MODEL = "HuggingFaceTB/SmolVLM2-256M-Video-Instruct"   # --video / --video-dir's (v1 has no video)
from .pope import DEFAULT_SUFFIX
from .store import FORMAT_VERSION

# The scripts' defaults (their parsers use these; command() leaves out a flag at its default).
DEFAULT_PROMPT = "Can you describe this image?"
DEFAULT_MAX_NEW_TOKENS = 128            # extract_smolvlm_attn.py / extract_smolvlm_batch.py
DEFAULT_STORE = "compact"
POPE_MAX_NEW_TOKENS = 8                 # benchmark.py
POPE_STORE = "compact"                  # POPE's attention runs


def config_hash(config: dict) -> str:
    """12 hex digits of the sha256 of a configuration's canonical JSON."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]


def processor_settings(loaded, longest_edge: int | None) -> dict:
    """The image processor settings a run is made with (``longest_edge`` None: the checkpoint's own)."""
    ip = loaded.processor.image_processor
    return {"longest_edge": longest_edge or ip.size["longest_edge"], "tile_size": ip.max_image_size["longest_edge"],
            "image_seq_len": loaded.processor.image_seq_len, "do_image_splitting": ip.do_image_splitting,
            "resample": int(ip.resample), "image_processor": type(ip).__name__}


def model_info(loaded, longest_edge: int | None) -> dict:
    """What only the loaded model knows of a configuration: the resolved revision, stand-in or not, the
    processor settings. POPE's driver passes it to its workers, which check they load the same."""
    return {"revision": loaded.revision, "standin": bool(loaded.standin),
            "processor": processor_settings(loaded, longest_edge)}


def fingerprint(model_id: str, dtype: str, info: dict | None, settings: dict, runs: bool = True) -> dict:
    """Everything that changes a run's rows (or POPE's answers). ``info``: :func:`model_info`;
    ``settings``: what the script was asked (:func:`extract_settings`, :func:`pope_settings`);
    ``runs``: attention runs are written (then their format version counts too)."""
    info = info or {}
    out = {"model": model_id, "revision": info.get("revision"), "standin": bool(info.get("standin")),
           "dtype": dtype, "processor": info.get("processor"), **settings, "greedy": True}
    if runs:
        out["format_version"] = FORMAT_VERSION
    return out


def extract_settings(prompt: str, max_new_tokens: int, longest_edge: int | None, store: str, methods) -> dict:
    """The extraction settings as the fingerprint records them (the fields of ``extract.Settings``)."""
    return {"prompt": prompt, "max_new_tokens": max_new_tokens, "longest_edge": longest_edge, "store": store,
            "methods": tuple(methods)}


def pope_settings(suffix: str, longest_edge: int | None, max_new_tokens: int, attention: bool, methods=(RAW,),
                  heads=(), ablation: str = "zero") -> dict:
    """POPE's settings as the fingerprint records them: with attention, its runs' store and methods too;
    with ablated ``heads`` (an arm of ``benchmark.py --ablate-heads``) the heads and the ablation (a
    run without any records neither: its fingerprint is unchanged)."""
    out = {"suffix": suffix, "longest_edge": longest_edge, "max_new_tokens": max_new_tokens,
           "attention": bool(attention)}
    if attention:
        out.update(store=POPE_STORE, methods=list(methods))
    if heads:
        out["intervention"] = {"heads": [[int(l), int(h)] for l, h in heads], "ablation": ablation}
    return out


def versions() -> dict:
    import numpy as np
    import PIL
    import torch
    import transformers
    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "numpy": np.__version__, "pillow": PIL.__version__}


def _local_path(loaded) -> str | None:
    """The absolute model directory when the model was loaded from a local one (not the hub cache)."""
    source = getattr(loaded, "source", None)
    if source and Path(source) == Path(loaded.model_id).expanduser() and Path(source).is_dir():
        return os.path.abspath(source)
    return None


def run_meta(loaded, config: dict, *, prompt: str, chat_text: str, answer: str, token_ids, prompt_length: int,
             layers, generation: dict, image: dict, processor: dict, **sections) -> dict:
    """A run's meta.json (before ``store.write_run`` adds format, geometry, attention, methods, files):
    ``config`` (:func:`fingerprint`) recorded whole as ``config``, with its hash ``config_key``;
    ``generation``: new_tokens and what else the writer knows; ``sections``: tiles, pope, timings ..."""
    model = {"id": loaded.model_id, "revision": loaded.revision, "standin": bool(loaded.standin),
             "standin_info": loaded.standin, "dtype": loaded.dtype, "device": loaded.device,
             "num_layers": len(layers), "num_heads": int(layers[0].shape[0])}
    if _local_path(loaded):
        model["path"] = _local_path(loaded)
    image = {k: v for k, v in image.items() if k != "decode_s"}
    if image.get("source"):
        image["source_path"] = os.path.abspath(image["source"])
    meta = {"model": model, "prompt": prompt, "chat_text": chat_text, "answer": answer,
            "token_ids": list(token_ids), "prompt_length": int(prompt_length),
            "generation": {"greedy": True, "max_new_tokens": config.get("max_new_tokens"), **generation},
            "image": image, "processor": processor}
    meta.update(sections)
    meta.update(versions=versions(), config=config, config_key=config_hash(config))
    return meta


# ---------------------------------------------------------------------------------------------
# The command that rebuilds a run
# ---------------------------------------------------------------------------------------------
def command(meta: dict, run_dir, names) -> str | None:
    """The command that rebuilds exactly the run ``meta`` describes (at ``run_dir``) with the derived
    methods ``names`` (raw always included): every setting that changes the rows, from what the run
    recorded. For a POPE attention run (a ``pope`` section) it is the benchmark.py command that
    rebuilds its output folder (every question's run) with those methods. None for a run written by
    intervene.py (it stores raw attention only; no command adds methods to it without losing the
    intervention)."""
    if meta.get("intervention"):   # an extraction command would replace it with a run without the intervention
        return None
    methods = ",".join(parse(",".join(names)))
    words = _pope_command(meta, Path(run_dir)) if meta.get("pope") else _extract_command(meta, Path(run_dir))
    return " ".join(shlex.quote(str(w)) for w in words + ["--methods", methods] + (
        ["--overwrite"] if meta.get("pope") else []))


def _flags(pairs) -> list:
    """``--flag value`` for every (flag, value, default) whose value is known and not the default."""
    out = []
    for flag, value, default in pairs:
        if value is not None and value != default:
            out += [flag, str(value)]
    return out


def _model_flags(meta: dict) -> list:
    """--model-id, --revision (the resolved one: a hub snapshot), --dtype (always: the default depends
    on the machine)."""
    model = meta.get("model", {})
    return _flags([("--model-id", model.get("path") or model.get("id"), DEFAULT_MODEL),
                   ("--revision", model.get("revision"), None), ("--dtype", model.get("dtype"), None)])


def _longest_edge(meta: dict):
    """--longest-edge as the run was made: as given when the run records its configuration (None: the
    checkpoint's own), else the processor's value (always right, also at the checkpoint's default)."""
    if "config" in meta:
        return meta["config"].get("longest_edge")
    return meta.get("processor", {}).get("longest_edge")


def _source(entry: dict, placeholder: str) -> str:
    return entry.get("source_path") or entry.get("source") or placeholder


def _inputs(meta: dict) -> list:
    """--image (one per image, in order) or --video with the sampling the run used."""
    video, images = meta.get("video"), meta.get("images")
    if video:
        return ["--video", _source(meta.get("image", {}), "VIDEO"), "--fps", video.get("sample_fps", "FPS"),
                "--max-frames", video.get("max_frames", "MAX_FRAMES")] + (
            ["--keep-frame-rows"] if video.get("keep_frame_rows") else [])
    if images:
        return [w for k, e in enumerate(images) for w in ("--image", _source(e, f"IMAGE{k}"))]
    return ["--image", _source(meta.get("image", {}), "IMAGE")]


def _extract_command(meta: dict, run_dir: Path) -> list:
    gen = meta.get("generation", {})
    return ["python", "extract_smolvlm_attn.py", *_inputs(meta),
            "--output-dir", run_dir, *_model_flags(meta),
            *_flags([("--prompt", meta.get("prompt"), DEFAULT_PROMPT),
                     ("--max-new-tokens", gen.get("max_new_tokens"), DEFAULT_MAX_NEW_TOKENS),
                     ("--longest-edge", _longest_edge(meta), None),
                     ("--store", meta.get("attention", {}).get("store"), DEFAULT_STORE)])]


def _pope_command(meta: dict, run_dir: Path) -> list:
    """benchmark.py ... --attention: the run lives at OUTPUT_DIR/attention/SPLIT/QUESTION_ID. Runs
    from before ``pope.benchmark`` was recorded get placeholders for what they do not say."""
    p, cfg = meta["pope"], meta.get("config", {})
    bench = p.get("benchmark") or {}
    source = meta.get("image", {}).get("source_path") or meta.get("image", {}).get("source")
    root = bench.get("image_root") or (os.path.dirname(source) if source else "IMAGE_ROOT")
    words = ["python", "benchmark.py", "--benchmark-file", *(bench.get("benchmark_file") or ["POPE_FILE"]),
             "--image-root", root, "--output-dir", run_dir.parent.parent.parent, *_model_flags(meta),
             *_flags([("--limit", bench.get("limit"), 0),
                      ("--longest-edge", _longest_edge(meta), None),
                      ("--batch-size", bench.get("batch_size"), None),
                      ("--prompt-suffix", cfg.get("suffix"), DEFAULT_SUFFIX),
                      ("--max-new-tokens", cfg.get("max_new_tokens"), POPE_MAX_NEW_TOKENS)])]
    if bench.get("naive"):
        words.append("--naive")
    words.append("--attention")
    if bench.get("annotations"):
        words += ["--annotations", bench["annotations"]]
    return words
