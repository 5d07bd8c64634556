"""Where the bench scripts find COCO photos and POPE questions by default: the project's 13-photo data
folder (``shared/data`` in or next to the checkout) where it exists, so figures stay comparable with
those measured before; else the 3 photos and their questions shipped in ``samples/`` (a fresh clone).
"""
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = next((d for d in (ROOT / "shared" / "data", ROOT.parent / "shared" / "data") if d.is_dir()), None)
if SHARED is not None:
    IMAGES = SHARED / "images" / "coco_val2014"
    POPE_SUBSET = SHARED / "pope" / "pope_subset.jsonl"
    PHOTO = "COCO_val2014_000000001171.jpg"          # 640 x 426: 3 x 4 tiles at 2048 px
    PHOTO_4_3 = "COCO_val2014_000000265719.jpg"      # 640 x 480: 3 x 4 tiles
else:
    IMAGES = ROOT / "samples" / "coco_val2014"
    POPE_SUBSET = ROOT / "samples" / "pope" / "pope_subset.jsonl"
    PHOTO = PHOTO_4_3 = "COCO_val2014_000000429109.jpg"   # 640 x 427: 3 x 4 tiles at 2048 px
