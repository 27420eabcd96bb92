#!/usr/bin/env bash
# Set up a virtual environment with everything fetalplanes needs, then lint and run the tests.
# Usage: bash scripts/test.sh [pytest args]    (re-running reuses .venv)
#   fast lane:  bash scripts/test.sh -m "not slow"
# System-wide: when run as root with apt-get available, it installs the Debian packages some
# tests use (listed below; announced first); FETALPLANES_NO_SYSTEM_PACKAGES=1 skips that.
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
# System-wide tools some tests use (each such test skips with a reason when its tool is
# missing): chromium (browser tests), ghostscript (proves PostScript uploads never reach it),
# ffmpeg (test clips), orthanc + orthanc-dicomweb (a real PACS), dcmtk and dicom3tools (DICOM
# reference tools). Installed only as root with apt-get, and announced first;
# FETALPLANES_NO_SYSTEM_PACKAGES=1 (or the older FETALPLANES_NO_BROWSER=1) skips this.
SYSTEM_PACKAGES="chromium ghostscript ffmpeg orthanc orthanc-dicomweb dcmtk dicom3tools"
if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ] \
   && [ "${FETALPLANES_NO_SYSTEM_PACKAGES:-${FETALPLANES_NO_BROWSER:-0}}" != 1 ]; then
  missing=$(for p in $SYSTEM_PACKAGES; do
              dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || echo "$p"
            done | xargs)
  if [ -n "$missing" ]; then
    echo "test.sh: installing Debian packages system-wide for tests: $missing" \
         "(apt-get; FETALPLANES_NO_SYSTEM_PACKAGES=1 skips this)"
    # shellcheck disable=SC2086
    (DEBIAN_FRONTEND=noninteractive apt-get install -y -q $missing >/dev/null 2>&1 \
      || (apt-get update -q >/dev/null 2>&1 \
          && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $missing >/dev/null 2>&1)) \
      && echo "test.sh: installed $missing" \
      || echo "test.sh: could not install all of: $missing; tests needing them will be skipped"
  fi
fi
ruff check src tests
lint-imports
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
python -m pytest -q "$@"
