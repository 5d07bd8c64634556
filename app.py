"""Attention viewer: serve one run (default: ./smolattn_run or the current directory) or every run under a root.

The code is smolattn/cli/view.py, also installed as the console command `smolattn-view`.
"""
from smolattn.cli.view import *  # noqa: F401,F403  (main, default_run ... for callers of the script)
from smolattn.cli.view import cli

if __name__ == "__main__":
    cli()
