"""Run SmolVLM attention extraction over a folder of images: resumable, sharded, local or on Ray.

Console command: ``smolattn-batch`` (``python extract_smolvlm_batch.py`` in a checkout is the same).

    python extract_smolvlm_batch.py --image-dir coco/val2014 --output-root smol_outputs
    python extract_smolvlm_batch.py --image-dir photos --recursive --shards 4 --shard-index 2
    python extract_smolvlm_batch.py --image-dir photos --engine ray --ray-address auto --num-workers 8 --gpus-per-worker 1
    python extract_smolvlm_batch.py --video-dir clips --model-id DIR_OF_A_SMOLVLM2_CHECKPOINT --max-frames 16

One run directory per image under --output-root (docs/run-format.md), a manifest row per image
(manifest.jsonl). Rerunning the same command resumes. Details: docs/batch.md.

exit status: 0 every image ok; 1 some images failed (error rows in the manifest); 2 bad arguments,
no images, --output-root in use by another batch, or a configuration that differs from the runs
already in --output-root (see --overwrite); 3 a CUDA error stopped the worker (rerun to resume).
"""
import argparse

from smolattn import batch
from smolattn.errors import run_cli


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    batch.add_batch_args(ap)
    return ap.parse_args(argv)


def main(argv=None):
    return batch.run(parse_args(argv))


def cli() -> None:
    """The console command smolattn-batch."""
    run_cli(main)


if __name__ == "__main__":
    cli()
