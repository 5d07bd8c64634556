#!/usr/bin/env bash
# Create .venv and install the pinned requirements (idempotent: skips pip when nothing changed).
# Usage: scripts/setup.sh [extra requirements files...]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
reqs=(requirements.txt "$@")
stamp=.venv/.installed-$(cat "${reqs[@]}" | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install -q --disable-pip-version-check $(printf -- '-r %s ' "${reqs[@]}")
  touch "$stamp"
fi
