"""Ablate attention heads or knock out attention in a run, and measure what changes in the answer.

    python intervene.py --run runs/photo --ablate-heads 12:3,14:7
    python intervene.py --run runs/photo --ablate-heads top:4 --analysis smol_outputs/analysis
    python intervene.py --run runs/photo --knockout --from last --to box:120,40,300,200 --layers 8-16
    python intervene.py --run runs/photo --block-image-from 15
    python intervene.py --run runs/photo --sweep --from last --to image --window 9

Writes a normal run of the intervened generation (plus effects.json) to <run>.<slug>, or a sweep
folder (sweep.json, sweep.png). Definitions and words: docs/interventions.md.
"""
from smolattn import interventions
from smolattn.errors import run_cli

if __name__ == "__main__":
    run_cli(interventions.main)
