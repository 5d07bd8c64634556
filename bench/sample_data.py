"""Where the bench scripts find COCO photos and POPE questions by default: the 3 photos and their
questions shipped in ``samples/``; or a larger data folder you name with ``$SMOLATTN_DATA``
(``images/coco_val2014`` + ``pope/pope_subset.jsonl``, e.g. the 13-photo set the README's older figures
were measured on).
"""
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ["SMOLATTN_DATA"]) if os.environ.get("SMOLATTN_DATA") else None
if SHARED is not None and (SHARED / "images" / "coco_val2014").is_dir():
    IMAGES = SHARED / "images" / "coco_val2014"
    POPE_SUBSET = SHARED / "pope" / "pope_subset.jsonl"
    PHOTO = "COCO_val2014_000000001171.jpg"          # 640 x 426: 3 x 4 tiles at 2048 px
    PHOTO_4_3 = "COCO_val2014_000000265719.jpg"      # 640 x 480: 3 x 4 tiles
else:
    IMAGES = ROOT / "samples" / "coco_val2014"
    POPE_SUBSET = ROOT / "samples" / "pope" / "pope_subset.jsonl"
    PHOTO = PHOTO_4_3 = "COCO_val2014_000000429109.jpg"   # 640 x 427: 3 x 4 tiles at 2048 px
