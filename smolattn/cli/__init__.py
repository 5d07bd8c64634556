"""The console commands (pyproject.toml's [project.scripts]); the top-level scripts are shims over them.

Each module has ``main(argv=None)`` (the script's logic) and ``cli()`` (the console entry point:
one line and a non-zero exit on any error, smolattn.errors.run_cli).
"""
from __future__ import annotations

import importlib


def viewer():
    """The viewer package: ``smolattn.viewer`` once installed (the repository's viewer/ ships under
    that name, pyproject.toml), the repository's ``viewer`` when run from a checkout."""
    try:
        return importlib.import_module("smolattn.viewer")
    except ModuleNotFoundError as e:
        if e.name != "smolattn.viewer":
            raise
        return importlib.import_module("viewer")
