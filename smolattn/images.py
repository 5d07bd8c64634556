"""Open user images safely: EXIF orientation, every common mode to RGB, clear errors."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import UserError

MAX_PIXELS = 250_000_000      # refuse larger images (a decompression bomb guard); 12000x9000 is fine
Image.MAX_IMAGE_PIXELS = MAX_PIXELS
EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB the way a person would expect to see it."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):         # 16/32-bit grey: scale, don't clip
        a = np.asarray(im, dtype=np.float64)
        hi = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
        if im.mode == "F":
            lo, hi = float(a.min()), float(a.max())
            a = (a - lo) / (hi - lo or 1) * 255
        else:
            a = a / hi * 255
        im = Image.fromarray(np.clip(a + 0.5, 0, 255).astype(np.uint8), "L")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):             # transparent: over white, not black
        im = im.convert("RGBA")
        base = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(base, im).convert("RGB")
    return im.convert("RGB")


def open_image(path) -> tuple[Image.Image, dict]:
    """Load an image fully, apply EXIF orientation, convert to RGB. Returns (image, info)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"image not found: {path}")
    if path.is_dir():
        raise UserError(f"{path} is a directory, not an image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                fmt, mode = im.format, im.mode
                im.load()
                orientation = im.getexif().get(0x0112, 1)
                oriented = ImageOps.exif_transpose(im)
                rgb = to_rgb(oriented)
    except Image.DecompressionBombError:
        raise UserError(f"{path}: image is larger than {MAX_PIXELS:,} pixels")
    except UnidentifiedImageError:
        raise UserError(f"{path}: not an image file (or a format Pillow cannot read)")
    except (OSError, SyntaxError, ValueError) as e:
        raise UserError(f"{path}: corrupt or truncated image ({str(e).splitlines()[0] if str(e) else type(e).__name__})")
    if min(rgb.size) < 1:
        raise UserError(f"{path}: empty image")
    info = {"source": str(path), "format": fmt, "mode": mode, "size": list(rgb.size),
            "exif_orientation": int(orientation)}
    return rgb, info
