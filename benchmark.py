"""Run SmolVLM on POPE and score it under the official, lmms-eval and VLMEvalKit conventions.

The code is smolattn/cli/pope.py, also installed as the console command `smolattn-pope`.
"""
from smolattn.cli.pope import *  # noqa: F401,F403  (main, parse_args ... for callers of the script)
from smolattn.cli.pope import cli

if __name__ == "__main__":
    cli()
