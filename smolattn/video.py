"""Video for SmolVLM2 without torchvision: decode with PyAV, sample and squash frames as transformers'
``SmolVLMVideoProcessor`` does, and write the prompt text its ``SmolVLMProcessor`` writes.

transformers' video processor needs torchvision (whose PyPI wheels break with a CPU torch), so where
it cannot be built the frames are prepared here, by its rules (``models/smolvlm``):

* sampling (``SmolVLMVideoProcessor.sample_frames``): ``round(fps x duration)`` frames, at most
  ``max_frames``, spread uniformly (``np.linspace`` over the frame indices); when the video is longer
  than ``max_frames / fps`` + 2 s, one second is skipped at either end. Duration = frame count / the
  stream's average rate (``read_video_pyav``); a frame's timestamp = its index / that rate.
* pixels: each frame resized to the longest edge (aspect kept, even sides), then squashed to one
  ``max_image_size`` square (no tiling), LANCZOS both times, rescaled and normalised as images are.
* text (``SmolVLMProcessor.replace_video_token``, from its module constants): "You are provided the
  following series of {n in words} frames from a {H:MM:SS} [H:MM:SS] video.\\n", then per frame
  "\\nFrame from MM:SS:" + ``<fake_token_around_image><global-img><image>*N<fake_token_around_image>``,
  then "\\n\\n"; with a video in the message the processor uses its own chat template.

tests/test_family.py checks all three against transformers' own functions.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import numpy as np

from .errors import UserError

EXTENSIONS = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v", ".gif")
DEFAULT_FPS = 1.0          # SmolVLM2's video_sampling
DEFAULT_MAX_FRAMES = 64
MAX_IMAGE_SIDE = 4096      # video_processing_smolvlm.MAX_IMAGE_SIZE
SKIP_SECS = 1

_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
         "sixteen seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_words(n: int) -> str:
    """English words for 0 <= n < 1,000,000 as ``num2words(n)`` writes them ("sixty-four",
    "one hundred and one"); SmolVLM's processor writes the frame count this way."""
    n = int(n)
    if not 0 <= n < 1_000_000:
        raise ValueError(f"number_words: {n} out of range")
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else "-" + _ONES[n % 10])
    if n < 1000:
        rest = n % 100
        return _ONES[n // 100] + " hundred" + ("" if rest == 0 else " and " + number_words(rest))
    rest = n % 1000
    head = number_words(n // 1000) + " thousand"
    if rest == 0:
        return head
    return head + (" and " if rest < 100 else ", ") + number_words(rest)


@dataclass
class Frames:
    """The sampled frames of one video, as decoded (RGB PIL images at the video's own size)."""
    images: list
    indices: list[int]             # frame index of each sampled frame in the stream
    fps: float                     # the stream's average rate
    total_frames: int
    duration: float                # total_frames / fps (seconds), as transformers computes it
    size: tuple[int, int]          # (W, H)
    info: dict = field(default_factory=dict)

    @property
    def timestamps(self) -> list[float]:
        """Seconds of each sampled frame (index / fps): ``VideoMetadata.timestamps``."""
        return [i / self.fps for i in self.indices]


def sample_indices(total_frames: int, video_fps: float, duration: float, fps: float = DEFAULT_FPS,
                   max_frames: int = DEFAULT_MAX_FRAMES, skip_secs: float = SKIP_SECS) -> np.ndarray:
    """The frame indices SmolVLM samples (``SmolVLMVideoProcessor.sample_frames``' rule)."""
    desired = max(1, min(int(round(fps * duration)), max_frames))
    start, end = 0, total_frames - 1
    if skip_secs > 0 and (duration - 2 * skip_secs) > (max_frames * fps):
        start, end = int(skip_secs * video_fps), int(total_frames - skip_secs * video_fps)
    start, end = max(0, start), min(end, total_frames - 1)
    if start >= end:
        start, end = 0, total_frames - 1
    return np.unique(np.linspace(start, end, desired, dtype=int))


def _av():
    try:
        import av
    except ImportError:
        raise UserError("video needs PyAV: pip install av (see requirements.txt)")
    return av


def _check(path, fps, max_frames) -> Path:
    path = Path(path)
    if not path.exists():
        raise UserError(f"video not found: {path}")
    if path.is_dir():
        raise UserError(f"{path} is a directory, not a video")
    if fps is not None and fps <= 0:
        raise UserError("--fps must be positive")
    if max_frames is not None and max_frames < 1:
        raise UserError("--max-frames must be at least 1")
    return path


def _stream(container, path) -> tuple:
    """(stream, frame count, average rate) of the first video stream."""
    if not container.streams.video:
        raise UserError(f"{path}: no video stream")
    stream = container.streams.video[0]
    rate = float(stream.average_rate or 0)
    total = int(stream.frames or 0)
    if total <= 0:      # the container does not say: count the packets (no decoding)
        total = sum(1 for p in container.demux(stream) if p.size)
        container.seek(0)
    if total <= 0 or rate <= 0:
        raise UserError(f"{path}: the video has no frames or no frame rate")
    return stream, total, rate


def _unreadable(path, e) -> UserError:
    return UserError(f"{path}: not a video PyAV can read ({type(e).__name__}"
                     f"{': ' + str(e).splitlines()[0] if str(e) else ''})")


def probe(path, fps: float | None = None, max_frames: int | None = None) -> tuple[int, float]:
    """Check (cheaply, before a model loads) that ``path`` is a readable video: (frames, fps)."""
    path = _check(path, fps, max_frames)
    av = _av()
    try:
        with av.open(str(path)) as container:
            return _stream(container, path)[1:]
    except UserError:
        raise
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise _unreadable(path, e)


def read(path, fps: float = DEFAULT_FPS, max_frames: int = DEFAULT_MAX_FRAMES) -> Frames:
    """Decode a video and keep the frames SmolVLM would sample (PyAV; FFmpeg is inside its wheel)."""
    import time

    t0 = time.perf_counter()
    path = _check(path, fps, max_frames)
    av = _av()
    try:
        with av.open(str(path)) as container:
            stream, total, rate = _stream(container, path)
            duration = total / rate
            indices = sample_indices(total, rate, duration, fps, max_frames)
            wanted, frames = set(int(i) for i in indices), {}
            for i, frame in enumerate(container.decode(stream)):
                if i > indices[-1]:
                    break
                if i in wanted:
                    frames[i] = frame.to_image().convert("RGB")
            fmt = container.format.name
    except UserError:
        raise
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise _unreadable(path, e)
    kept = [int(i) for i in indices if int(i) in frames]
    if not kept:
        raise UserError(f"{path}: no frame could be decoded")
    images = [frames[i] for i in kept]
    size = images[0].size
    info = {"source": str(path), "format": fmt, "fps": rate, "total_frames": total, "duration": duration,
            "size": list(size), "sample_fps": fps, "max_frames": max_frames,
            "decode_s": round(time.perf_counter() - t0, 4)}
    return Frames(images, kept, rate, total, duration, size, info)


def settings(processor) -> dict:
    """The video settings of a processor: sampling fps, max_frames, the first resize's longest edge and
    the square side (SmolVLM's video processor where there is one, else the checkpoint's
    ``video_sampling`` kept by ``model.load_processor``)."""
    ip = processor.image_processor
    vp = getattr(processor, "video_processor", None)
    if vp is not None:
        return {"fps": vp.fps, "max_frames": vp.num_frames, "longest_edge": vp.size["longest_edge"],
                "side": vp.max_image_size["longest_edge"], "resample": int(vp.resample)}
    sampling = getattr(processor, "video_sampling", None)
    if not sampling:
        raise UserError("this model has no video support (a SmolVLM2 checkpoint, model_type smolvlm, has)")
    # SmolVLMVideoProcessor.__init__: a `size` in the config replaces video_sampling's video_size
    longest = (ip.size or {}).get("longest_edge") or sampling["video_size"]["longest_edge"]
    return {"fps": sampling["fps"], "max_frames": sampling["max_frames"], "longest_edge": longest,
            "side": ip.max_image_size["longest_edge"], "resample": int(ip.resample)}


def resized_size(width: int, height: int, longest_edge: int) -> tuple[int, int]:
    """(W, H) after the first resize (``get_resize_output_image_size`` of the video processor)."""
    side = min(MAX_IMAGE_SIDE, longest_edge)
    if width >= height:
        w, h = side, int(side / (width / height))
        h += h % 2
    else:
        h, w = side, int(side * (width / height))
        w += w % 2
    return max(w, 1), max(h, 1)


def squash(image, longest_edge: int, side: int, resample: int = 1):
    """One frame as the model sees it: resized to the longest edge, then squashed to side x side."""
    first = image.resize(resized_size(*image.size, longest_edge), resample=resample)
    return first.resize((side, side), resample=resample)


def pixel_values(images, processor, cfg: dict | None = None):
    """(frames, 3, side, side) float32 pixel values and the all-true (frames, side, side) mask."""
    import torch

    cfg = cfg or settings(processor)
    ip = processor.image_processor
    mean = np.asarray(ip.image_mean, np.float32)[:, None, None]
    std = np.asarray(ip.image_std, np.float32)[:, None, None]
    out = np.empty((len(images), 3, cfg["side"], cfg["side"]), np.float32)
    for i, im in enumerate(images):
        a = np.asarray(squash(im, cfg["longest_edge"], cfg["side"], cfg["resample"]), np.float32).transpose(2, 0, 1)
        out[i] = (a * np.float32(ip.rescale_factor) - mean) / std
    pv = torch.from_numpy(out)
    return pv, torch.ones((len(images), cfg["side"], cfg["side"]), dtype=torch.bool)


def prompt_text(processor, frames: Frames) -> str:
    """The text that replaces ``<video>``: intro, one timestamped single-tile block per frame, outtro."""
    from transformers.models.smolvlm.processing_smolvlm import (DEFAULT_MEDIA_OUTTRO, DEFAULT_VIDEO_INTRO,
                                                                FRAME_TIMESTAMP_MESSAGE, _prompt_single_image)

    tok = processor.tokenizer
    block = _prompt_single_image(processor.image_seq_len,
                                 fake_token_around_image=getattr(tok, "fake_image_token", "<fake_token_around_image>"),
                                 image_token=getattr(tok, "image_token", "<image>"),
                                 global_image_token=getattr(tok, "global_image_token", "<global-img>"))
    text = DEFAULT_VIDEO_INTRO.format(frame_count=number_words(len(frames.images)),
                                      video_duration=str(timedelta(seconds=int(frames.duration))))
    for t in frames.timestamps:
        text += FRAME_TIMESTAMP_MESSAGE.format(timestamp=f"{int(t // 60):02d}:{int(t % 60):02d}") + block
    return text + DEFAULT_MEDIA_OUTTRO


def chat_text(processor, prompt: str) -> str:
    """The chat text of a video + prompt, with ``<video>`` where the frames go (transformers swaps in
    SmolVLM's own video chat template when a message holds a video)."""
    from transformers.models.smolvlm.processing_smolvlm import DEFAULT_CHAT_TEMPLATE

    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": prompt}]}]
    return processor.apply_chat_template(messages, chat_template=DEFAULT_CHAT_TEMPLATE, add_generation_prompt=True)


def text_after_frames(processor, prompt: str) -> str:
    """The text of a video + prompt after its last frame block: the outtro, then the chat text after
    ``<video>`` (the prompt and the template's end; what a generic prompt of smolattn.methods swaps)."""
    from transformers.models.smolvlm.processing_smolvlm import DEFAULT_MEDIA_OUTTRO

    return DEFAULT_MEDIA_OUTTRO + chat_text(processor, prompt).split("<video>", 1)[1]


def process(processor, frames: Frames, prompt: str):
    """(chat text, expanded text, inputs on the host) for a video + prompt: ``input_ids``,
    ``attention_mask``, ``pixel_values`` (1, frames, 3, side, side), ``pixel_attention_mask``."""
    cfg = settings(processor)
    chat = chat_text(processor, prompt)
    if chat.count("<video>") != 1:
        raise RuntimeError("the video chat template put no single <video> placeholder in the prompt")
    text = chat.replace("<video>", prompt_text(processor, frames))
    enc = processor.tokenizer(text, return_tensors="pt")
    pv, mask = pixel_values(frames.images, processor, cfg)
    return chat, text, {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                        "pixel_values": pv[None], "pixel_attention_mask": mask[None]}
