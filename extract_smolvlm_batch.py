"""Run SmolVLM attention extraction over a folder of images: resumable, sharded, local or on Ray.

The code is smolattn/cli/batch.py, also installed as the console command `smolattn-batch`.
"""
from smolattn.cli.batch import *  # noqa: F401,F403  (main, parse_args ... for callers of the script)
from smolattn.cli.batch import cli

if __name__ == "__main__":
    cli()
