"""Where does the model look when it reads or writes one token? Aggregate that token's attention

The code is smolattn/cli/heatmap.py, also installed as the console command `smolattn-heatmap`.
"""
from smolattn.cli.heatmap import *  # noqa: F401,F403  (main, parse_args ... for callers of the script)
from smolattn.cli.heatmap import cli

if __name__ == "__main__":
    cli()
