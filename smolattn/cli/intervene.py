"""Ablate attention heads or knock out attention in a run: the console command ``smolattn-intervene``
(``python intervene.py`` in a checkout is the same). The code is smolattn.interventions.main."""
from smolattn.errors import run_cli
from smolattn.interventions import main


def cli() -> None:
    """The console command smolattn-intervene."""
    run_cli(main)


if __name__ == "__main__":
    cli()
