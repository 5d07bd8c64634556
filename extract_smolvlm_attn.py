"""Run SmolVLM on one image and store its answer plus the attention of every layer and head.

The code is smolattn/cli/extract.py, also installed as the console command `smolattn-extract`.
"""
from smolattn.cli.extract import *  # noqa: F401,F403  (main, parse_args ... for callers of the script)
from smolattn.cli.extract import cli

if __name__ == "__main__":
    cli()
