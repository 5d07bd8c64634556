"""The package as a user installs it: build the wheel (offline, no build isolation), install it with
--no-deps into a fresh venv that reuses this environment's packages (torch is not installed again),
and run the console commands from a directory outside the checkout."""
from __future__ import annotations

import os
import site
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = ("smolattn-extract", "smolattn-batch", "smolattn-view", "smolattn-pope", "smolattn-heatmap",
            "smolattn-heads", "smolattn-intervene")


def run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kw)


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    pytest.importorskip("setuptools", reason="the build backend (setuptools, requirements.txt) is not installed")
    tmp = tmp_path_factory.mktemp("package")
    built = run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
                 "--no-index", "-q", "-w", str(tmp / "dist")], cwd=tmp)
    assert built.returncode == 0, built.stderr
    wheel = next((tmp / "dist").glob("smolattn-*.whl"))
    env_dir = tmp / "venv"
    made = run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(env_dir)])
    assert made.returncode == 0, made.stderr
    py = env_dir / "bin" / "python"
    # --system-site-packages gives the base interpreter's packages; this environment's (torch, flask...)
    # come from a .pth file, after the venv's own site-packages (where the wheel goes)
    purelib = run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    Path(purelib, "test-env.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    installed = run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index", "-q",
                     str(wheel)])
    assert installed.returncode == 0, installed.stderr
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return {"wheel": wheel, "bin": env_dir / "bin", "py": py, "purelib": Path(purelib), "env": env, "tmp": tmp}


def test_wheel_holds_the_package_viewer_and_assets(venv):
    names = zipfile.ZipFile(venv["wheel"]).namelist()
    for path in ("smolattn/viewer/__init__.py", "smolattn/viewer/export.py", "smolattn/templates/index.html",
                 "smolattn/static/js/app.js", "smolattn/static/js/offline.js", "smolattn/static/css/style.css",
                 "smolattn/cli/view.py"):
        assert path in names, path
    tops = {n.split("/")[0] for n in names}
    assert tops == {"smolattn", next(t for t in tops if t.endswith(".dist-info"))}    # no top-level viewer
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(venv["wheel"]).read(entry).decode()
    assert all(f"{c} = " in text for c in COMMANDS)


def test_console_commands_run_outside_the_checkout(venv, make_run, tmp_path):
    work = tmp_path / "elsewhere"
    work.mkdir()
    where = run([str(venv["py"]), "-c", "import smolattn, smolattn.viewer as v; print(smolattn.__file__, v.__file__); "
                 "import importlib.util as u; print(u.find_spec('viewer'))"], cwd=work, env=venv["env"])
    assert where.returncode == 0, where.stderr
    pkg, viewer_file, top = where.stdout.split()
    assert Path(pkg).is_relative_to(venv["purelib"]) and Path(viewer_file).is_relative_to(venv["purelib"])
    assert top == "None"                                      # no generic 'viewer' module installed
    for command in COMMANDS:
        helped = run([str(venv["bin"] / command), "--help"], cwd=work, env=venv["env"])
        assert helped.returncode == 0 and "usage:" in helped.stdout, (command, helped.stderr)

    src = make_run("cat")
    exported = run([str(venv["bin"] / "smolattn-view"), "--export", str(src), "cat.html"], cwd=work, env=venv["env"])
    assert exported.returncode == 0, exported.stderr
    assert "exported" in exported.stdout and (work / "cat.html").read_text()[:300].count("smolattn-export")

    bad = run([str(venv["bin"] / "smolattn-view"), "--run", str(work / "missing")], cwd=work, env=venv["env"])
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([str(venv["bin"] / "smolattn-view"), "--run", str(src), "--port", str(port)], cwd=work,
                              env=venv["env"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, page = time.time() + 60, None
        while time.time() < deadline and page is None:
            try:
                page = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5).read().decode()
            except OSError:
                assert server.poll() is None, server.stdout.read()
                time.sleep(0.3)
        assert page and "SmolVLM attention viewer" in page          # the installed templates
        js = urllib.request.urlopen(f"http://127.0.0.1:{port}/static/js/app.js", timeout=5).read().decode()
        assert "getJSON" in js                                      # and the installed static files
        info = urllib.request.urlopen(f"http://127.0.0.1:{port}/api/initialize", timeout=5).read().decode()
        assert '"success":true' in info.replace(" ", "")
    finally:
        server.terminate()
        server.wait(timeout=30)
