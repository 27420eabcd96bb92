#!/usr/bin/env bash
# Set up a virtual environment with everything fetalplanes needs, then lint and run the tests.
# Usage: bash scripts/test.sh [pytest args]    (re-running reuses .venv)
#   fast lane:  bash scripts/test.sh -m "not slow"
# System-wide: when run as root with apt-get available, it installs Debian's `chromium`
# for the browser test (and says so first); set FETALPLANES_NO_BROWSER=1 to skip that.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -c 'import sys; assert sys.version_info >= (3, 10), "fetalplanes needs Python >= 3.10"'
  "$PY" -m venv .venv
fi
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
# Pinned torch/torchvision for reproducible tests (the package itself accepts a range).
echo "test.sh: installing fetalplanes[dev] into .venv (pip)"
python -m pip install -q -c scripts/constraints.txt -e ".[dev]"
if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ] && [ ! -x /usr/bin/chromium ] \
   && [ "${FETALPLANES_NO_BROWSER:-0}" != 1 ]; then
  # Browser for the web-app end-to-end test (skips itself with a reason when absent)
  echo "test.sh: installing Debian's chromium system-wide for the browser test" \
       "(apt-get; FETALPLANES_NO_BROWSER=1 skips this)"
  (apt-get install -y -q chromium >/dev/null 2>&1 \
    || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1)) \
    && echo "test.sh: chromium installed" \
    || echo "test.sh: could not install chromium; the browser test will be skipped"
fi
ruff check src tests
lint-imports
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
python -m pytest -q "$@"
