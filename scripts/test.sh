#!/usr/bin/env bash
# Set up a virtual environment with everything fetalplanes needs, then lint and run the tests.
# Usage: bash scripts/test.sh [pytest args]    (re-running reuses .venv)
#   fast lane:  bash scripts/test.sh -m "not slow"
# System-wide: when run as root with apt-get available, it installs the Debian packages some
# tests use (chromium for the browser test; orthanc, orthanc-dicomweb, dcmtk, dicom3tools for
# the DICOM network tests; ghostscript, ffmpeg) and says so first; set
# FETALPLANES_NO_SYSTEM_PACKAGES=1 to skip that (FETALPLANES_NO_BROWSER=1 still works).
# Tests whose tools are missing skip with a one-line reason.
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
NO_SYSTEM=${FETALPLANES_NO_SYSTEM_PACKAGES:-${FETALPLANES_NO_BROWSER:-0}}
# Debian package -> a file it installs (already there: nothing to do)
SYSTEM_PACKAGES="chromium:/usr/bin/chromium orthanc:/usr/sbin/Orthanc
orthanc-dicomweb:/usr/share/orthanc/plugins/libOrthancDicomWeb.so dcmtk:/usr/bin/storescu
dicom3tools:/usr/bin/dciodvfy ghostscript:/usr/bin/gs ffmpeg:/usr/bin/ffmpeg"
MISSING=""
for entry in $SYSTEM_PACKAGES; do
  [ -e "${entry#*:}" ] || MISSING="$MISSING ${entry%%:*}"
done
if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ] && [ -n "$MISSING" ] \
   && [ "$NO_SYSTEM" != 1 ]; then
  # Browser, PACS (Orthanc + DICOMweb), DICOM tools: the tests needing them skip without
  echo "test.sh: installing Debian packages system-wide for the browser, PACS and DICOM" \
       "tests:$MISSING (apt-get; FETALPLANES_NO_SYSTEM_PACKAGES=1 skips this)"
  UPDATED=0
  for pkg in $MISSING; do  # one at a time: a package missing from the mirror skips alone
    if ! apt-get install -y -q --no-install-recommends "$pkg" >/dev/null 2>&1; then
      [ "$UPDATED" = 1 ] || { apt-get update -q >/dev/null 2>&1 || true; UPDATED=1; }
      apt-get install -y -q --no-install-recommends "$pkg" >/dev/null 2>&1 \
        || { echo "test.sh: could not install $pkg; the tests needing it will be skipped"; \
             continue; }
    fi
    echo "test.sh: installed $pkg"
  done
fi
ruff check src tests
lint-imports
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
python -m pytest -q --durations=25 "$@"
