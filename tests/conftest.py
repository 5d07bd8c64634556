"""Shared fixtures: synthetic runs on disk and the viewer app around them (Flask tutorial style)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from smolattn import synthetic  # noqa: E402
from viewer import create_app  # noqa: E402


@pytest.fixture
def make_run(tmp_path):
    """``make_run(name="run", **kwargs)`` -> path of a synthetic run under ``tmp_path/"runs"``;
    keyword arguments go to :func:`smolattn.synthetic.make_run` (rows, cols, one_hot, reference, ...)."""
    def make(name: str = "run", **kwargs) -> Path:
        return Path(synthetic.make_run(tmp_path / "runs" / name, **kwargs))
    return make


@pytest.fixture(scope="session")
def tiny():
    """The tiny stand-in model (CPU), loaded once for every test file that runs it."""
    from smolattn import model, standin
    return model.load(str(standin.ensure("tiny")), device="cpu")


@pytest.fixture
def make_app(tmp_path):
    """``make_app(RUN=path)`` or ``make_app(RUNS=root, ...)`` -> a testing app (summary cache under tmp_path)."""
    def make(**config):
        return create_app({"TESTING": True, "CACHE_DIR": str(tmp_path / "cache"), **config})
    return make


@pytest.fixture
def app(make_run, make_app):
    """The viewer serving one default synthetic run (3 x 4 tiles, 640 x 480)."""
    return make_app(RUN=make_run())


@pytest.fixture
def client(app):
    return app.test_client()
