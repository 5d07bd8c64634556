#!/usr/bin/env bash
# Tests: set up (venv, Ray for the scale-out test, Debian chromium for browser tests), run pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh requirements-ray.txt
if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "test.sh: could not install chromium; browser tests will be skipped" >&2
fi
exec .venv/bin/python -m pytest -q "$@"
