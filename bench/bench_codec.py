"""Store codec: write/read MB/s per core and compression ratio on real-shape attention rows.

    python bench/bench_codec.py                       # rows of a fresh real-shape stand-in run (extracts one)
    python bench/bench_codec.py --run runs/photo      # the rows of an existing compact run

Candidates: np.savez_compressed (zlib, format v1), zstd, lz4 (bytes as they are), and blosc2 with
byte shuffle + zstd / lz4 (format v2). One thread each (per-core figures); ratios are against
np.savez_compressed measured in the same run, interleaved, best of --repeats.
"""
import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from sample_data import IMAGES, PHOTO  # noqa: E402  (bench/ is on sys.path: the script's folder)
DEFAULT_IMAGE = IMAGES / PHOTO


def codecs():
    import zlib

    import blosc2
    import lz4.frame
    import zstandard

    blosc2.set_nthreads(1)

    def npz_write(arrs):
        buf = io.BytesIO()
        np.savez_compressed(buf, **arrs)
        return buf.getvalue()

    def npz_read(blob):
        with np.load(io.BytesIO(blob)) as z:
            return {k: z[k] for k in z.files}

    def raw(comp, decomp):
        return (lambda arrs: [comp(a.tobytes()) for a in arrs.values()],
                lambda blobs: [decomp(b) for b in blobs])

    def b2(codec, level, filt=blosc2.Filter.SHUFFLE):
        return (lambda arrs: [blosc2.compress2(a, typesize=a.dtype.itemsize, codec=codec, clevel=level,
                                               filters=[filt], nthreads=1) for a in arrs.values()],
                lambda blobs: [blosc2.decompress2(b) for b in blobs])

    from smolattn import store   # the store's own codec, exactly as runs are written and read

    zc = {lvl: zstandard.ZstdCompressor(level=lvl) for lvl in (1, 3)}
    zd = zstandard.ZstdDecompressor()
    return {
        "np.savez_compressed (zlib 6, v1)": (npz_write, npz_read),
        "zlib 1": raw(lambda b: zlib.compress(b, 1), zlib.decompress),
        "zstd 1": raw(zc[1].compress, zd.decompress),
        "zstd 3": raw(zc[3].compress, zd.decompress),
        "lz4": raw(lz4.frame.compress, lz4.frame.decompress),
        "blosc2 shuffle+lz4 5": b2(blosc2.Codec.LZ4, 5),
        "blosc2 bitshuffle+lz4 5": b2(blosc2.Codec.LZ4, 5, blosc2.Filter.BITSHUFFLE),
        "blosc2 shuffle+zstd 3": b2(blosc2.Codec.ZSTD, 3),
        "store v2: blosc2 shuffle+zstd 1 (chosen)": (lambda arrs: [store.pack(a) for a in arrs.values()],
                                                     lambda blobs: [store.unpack(b, np.uint8, -1) for b in blobs]),
    }


def layers_of(run_dir):
    from smolattn import store
    run = store.Run(run_dir)
    out = []
    for i in range(run.num_layers):
        layer = run.layer(i)
        out.append({"image": layer.image.astype(np.float16), "text": layer.text.astype(np.float16)})
    return run, out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", default=None, help="a compact run directory (default: extract one with the stand-in)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if args.run is None:
        from smolattn import extract as ex
        from smolattn import model as mdl
        from smolattn import standin
        loaded = mdl.load(str(standin.ensure("smolvlm-256m")), "cpu")
        args.run = Path(tempfile.mkdtemp(prefix="bench-codec-")) / "run"
        ex.extract(loaded, DEFAULT_IMAGE, args.run, ex.Settings(max_new_tokens=32, longest_edge=2048))
    run, layers = layers_of(args.run)
    raw = sum(a.nbytes for lay in layers for a in lay.values())
    print(f"rows of {args.run}: {run.geometry.rows}x{run.geometry.cols} tiles, {len(layers)} layers, "
          f"{raw / 1e6:.1f} MB of float16 (image {layers[0]['image'].shape}, text {layers[0]['text'].shape})")
    table = {name: [np.inf, np.inf, 0] for name in codecs()}
    for _ in range(args.repeats):
        for name, (write, read) in codecs().items():   # interleaved: drift hits every codec alike
            t0 = time.perf_counter()
            blobs = [write(lay) for lay in layers]
            t1 = time.perf_counter()
            for b in blobs:
                read(b)
            t2 = time.perf_counter()
            size = sum(len(x) for b in blobs for x in ([b] if isinstance(b, bytes) else b))
            table[name] = [min(table[name][0], t1 - t0), min(table[name][1], t2 - t1), size]
    base_w, _, base_size = table["np.savez_compressed (zlib 6, v1)"]
    print("\n| codec (1 thread) | write MB/s | read MB/s | ratio raw/stored | bytes vs savez | write speed vs savez |")
    print("|---|---|---|---|---|---|")
    for name, (w, r, size) in table.items():
        print(f"| {name} | {raw / w / 1e6:.0f} | {raw / r / 1e6:.0f} | {raw / size:.2f} | {size / base_size:.3f}x "
              f"| {base_w / w:.1f}x |")


if __name__ == "__main__":
    main()
