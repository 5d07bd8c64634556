#!/usr/bin/env bash
# Demo: set up, extract the bundled sample image, open the viewer on http://localhost:5001.
# Uses the real SmolVLM-256M-Instruct when the hub is reachable (or the model is cached);
# otherwise an offline stand-in model with random weights, clearly bannered as such.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
PY=.venv/bin/python
IMAGE=${IMAGE:-samples/chelsea.png}
OUT=${OUT:-demo_run}
if ! $PY extract_smolvlm_attn.py --image "$IMAGE" --output-dir "$OUT" --max-new-tokens 48; then
  echo "demo: the real model is not available here; using an offline stand-in (random weights)" >&2
  MODEL=$($PY -c "from smolattn import standin; print(standin.ensure('tiny'))")
  $PY extract_smolvlm_attn.py --image "$IMAGE" --output-dir "$OUT" --model-id "$MODEL" --max-new-tokens 24
fi
exec $PY app.py --run "$OUT" "$@"
