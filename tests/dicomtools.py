"""External DICOM tools the network tests run as a second implementation (dcmtk,
dicom3tools): found on PATH or the test is skipped with a one-line reason."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from fetalplanes.tools.native_tools import native_tool

#: tool -> the Debian package that installs it (scripts/test.sh installs them as root)
PACKAGES = {
    "storescu": "dcmtk",
    "echoscu": "dcmtk",
    "dsrdump": "dcmtk",
    "dcmdump": "dcmtk",
    "dciodvfy": "dicom3tools",
}


def need_tool(name: str) -> str:
    """Path of the compiled tool (not pynetdicom's same-named script in the venv), or skip
    the test naming the package that has it."""
    path = native_tool(name)
    if path is None:
        pytest.skip(f"{name} not found: install Debian's {PACKAGES.get(name, name)}")
    return path


def dsrdump(path: Path) -> str:
    """dcmtk's reading of an SR or KOS document; fails the test on any error it reports."""
    proc = subprocess.run([need_tool("dsrdump"), str(path)], capture_output=True, text=True,
                          timeout=60)
    errors = [line for line in proc.stderr.splitlines() if line.startswith(("E:", "F:"))]
    assert proc.returncode == 0 and not errors, proc.stderr
    return proc.stdout


def dciodvfy(path: Path) -> list[str]:
    """dicom3tools' IOD check of a file: the error lines it prints (none when valid)."""
    proc = subprocess.run([need_tool("dciodvfy"), str(path)], capture_output=True, text=True,
                          timeout=60)
    out = proc.stdout + proc.stderr
    assert "Abort" not in out, out
    return [line for line in out.splitlines() if line.startswith("Error")]
