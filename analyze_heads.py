"""Which heads localise, over a whole dataset of runs, and where the model looks on POPE.

The code is smolattn/cli/heads.py, also installed as the console command `smolattn-heads`.
"""
from smolattn.cli.heads import *  # noqa: F401,F403  (main, parse_args ... for callers of the script)
from smolattn.cli.heads import cli

if __name__ == "__main__":
    cli()
