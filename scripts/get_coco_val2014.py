"""Download the COCO val2014 photos the POPE questions are about (500 images, about 80 MB).

    python scripts/get_coco_val2014.py                         # -> coco/val2014/ (the images of samples/pope)
    python scripts/get_coco_val2014.py --dest /data/coco/val2014 --annotations

Reads the image names from POPE question files (default: the official files in samples/pope) and
fetches each photo from images.cocodataset.org/val2014/ into --dest. A photo already in --dest is
left as it is (a rerun fetches only what is missing); each one is written under a temporary name and
renamed when complete. --annotations also fetches COCO's annotations_trainval2014.zip (241 MB) and
keeps only annotations/instances_val2014.json, next to --dest (for --annotations of benchmark.py and
analyze_heads.py). The whole val2014 set (40,504 photos, 6.2 GB) instead:
http://images.cocodataset.org/zips/val2014.zip. Needs the internet; offline it stops with one line.
"""
import argparse
import os
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from smolattn import pope  # noqa: E402
from smolattn.errors import UserError, run_cli  # noqa: E402

IMAGES = "http://images.cocodataset.org/val2014/"
ANNOTATIONS = "http://images.cocodataset.org/annotations/annotations_trainval2014.zip"
INSTANCES = "annotations/instances_val2014.json"


def download(url: str, out, timeout: float) -> None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            shutil.copyfileobj(r, out, 1 << 20)
        out.flush()
        os.fsync(out.fileno())
    except (urllib.error.URLError, OSError) as e:
        raise UserError(f"cannot download {url} ({getattr(e, 'reason', e)}); is the internet reachable from here?")


def get_image(name: str, dest: Path) -> bool:
    """One photo into ``dest`` (a temporary sibling, linked into place when complete); a file of that
    name already there is left as it is. True: downloaded now."""
    path = dest / name
    if path.exists():
        return False
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.part-", dir=dest)
    try:
        with os.fdopen(fd, "wb") as out:
            download(IMAGES + name, out, 60)
        with open(tmp, "rb") as f:
            if f.read(3) != b"\xff\xd8\xff":
                raise UserError(f"{IMAGES + name}: the download is not a JPEG")
        os.link(tmp, path)        # never replaces a file that appeared meanwhile
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)
    return True


def get_instances(dest: Path) -> Path:
    """COCO's instances_val2014.json into ``dest`` (from the annotations zip, in a temporary file)."""
    out = dest / "instances_val2014.json"
    if out.exists():
        return out
    with tempfile.TemporaryDirectory(prefix=".annotations-", dir=dest) as tmp:
        archive = Path(tmp) / "annotations_trainval2014.zip"
        with open(archive, "wb") as f:
            download(ANNOTATIONS, f, 600)
        with zipfile.ZipFile(archive) as z, z.open(INSTANCES) as src, open(Path(tmp) / out.name, "wb") as f:
            shutil.copyfileobj(src, f, 1 << 20)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(Path(tmp) / out.name, out)
        except FileExistsError:
            pass
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pope", nargs="+", default=[str(ROOT / "samples" / "pope")],
                    help="POPE question file(s) or folder (default: samples/pope, the official files)")
    ap.add_argument("--dest", default="coco/val2014", help="folder for the photos (created)")
    ap.add_argument("--annotations", action="store_true",
                    help="also COCO's instances_val2014.json (next to --dest; a 241 MB download)")
    ap.add_argument("--jobs", type=int, default=8, help="downloads at once")
    args = ap.parse_args(argv)
    try:
        names = sorted({q.image for q in pope.load_questions(args.pope)})
    except pope.PopeInputError as e:
        raise UserError(str(e))
    dest = Path(args.dest)
    made = [d for d in [dest, *dest.parents] if not d.exists()]
    dest.mkdir(parents=True, exist_ok=True)
    fetch_one = lambda name: get_image(name, dest)  # noqa: E731
    try:
        new = fetch_one(names[0])     # one first: offline, this is the one line
    except UserError:
        for d in made:                # leave no empty folders of ours behind
            d.rmdir()
        raise
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        new += sum(pool.map(fetch_one, names[1:]))
    print(f"{len(names)} POPE images in {dest} ({new} downloaded now)")
    if args.annotations:
        print(f"COCO instances: {get_instances(dest.parent)}")
    return 0


if __name__ == "__main__":
    run_cli(main)
