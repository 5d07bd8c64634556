"""bench/bench_gpu.py's small CPU version runs end to end (so the GPU script never rots); not timed."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_gpu_small_runs_and_reports_every_figure(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_gpu.py"), "--small", "--json", str(tmp_path / "b.json")],
                       capture_output=True, text=True, cwd=ROOT, timeout=900)   # defaults: the photos + POPE in samples/
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads((tmp_path / "b.json").read_text())
    assert res["standin"] and set(res["batch"]) == {"1", "2"}
    for row in res["batch"].values():
        assert row["plain_images_per_s"] > 0 and row["extraction_images_per_s"] > 0 and row["extraction_vs_floor"] > 0
    assert res["single"]["ratio"] > 0 and res["syncs"]["plain"] is None        # syncs: counted on CUDA only
    for line in ("plain generate", "extraction (store write included)", "single image:", "device syncs"):
        assert line in r.stdout
    assert res["images"]["distinct"] == 3 and res["pope"]["identical"] is True and res["pope"]["questions"] == 6
    assert "POPE: cached" in r.stdout
