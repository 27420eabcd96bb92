"""A real PACS for the network tests: Debian's Orthanc with its DICOMweb plugin, started on
127.0.0.1 with a temporary configuration and storage and free ports, stopped afterwards.
Skips the test with a one-line reason when Orthanc or the plugin is not installed."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

ORTHANC = os.environ.get("FETALPLANES_ORTHANC", "/usr/sbin/Orthanc")
DICOMWEB_PLUGIN = os.environ.get(
    "FETALPLANES_ORTHANC_DICOMWEB", "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
)
USER, PASSWORD = "fetaltest", "s3cret-test-password"


@dataclass
class OrthancNode:
    """A running Orthanc: where to reach it over HTTP (DICOMweb) and DICOM."""

    http_port: int
    dicom_port: int
    ae_title: str
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    @property
    def peer(self) -> str:
        return f"{self.ae_title}@127.0.0.1:{self.dicom_port}"

    def get(self, path: str) -> object:
        """GET a REST resource of Orthanc's own API (JSON)."""
        import requests

        r = requests.get(self.url + path, auth=(USER, PASSWORD), timeout=30)
        r.raise_for_status()
        return r.json()

    def instances(self) -> list[dict]:
        """Every stored instance: its main tags and Orthanc's "id"."""
        return [{**self.get(f"/instances/{i}/simplified-tags"), "id": i}  # type: ignore[dict-item]
                for i in self.get("/instances")]  # type: ignore[union-attr]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def need_orthanc() -> None:
    if not (shutil.which(ORTHANC) or Path(ORTHANC).is_file()):
        pytest.skip(f"Orthanc not found at {ORTHANC}: install Debian's orthanc")
    if not Path(DICOMWEB_PLUGIN).is_file():
        pytest.skip(f"Orthanc DICOMweb plugin not found at {DICOMWEB_PLUGIN}: install Debian's "
                    "orthanc-dicomweb")
    pytest.importorskip("requests")


@contextmanager
def orthanc(folder: Path, modalities: dict[str, list] | None = None) -> Iterator[OrthancNode]:
    """Run Orthanc with storage, index and log under ``folder`` until the block ends."""
    import requests

    need_orthanc()
    folder.mkdir(parents=True, exist_ok=True)
    node = OrthancNode(free_port(), free_port(), "ORTHANC", folder / "orthanc.log")
    config = {
        "Name": "fetalplanes-test",
        "StorageDirectory": str(folder / "storage"),
        "IndexDirectory": str(folder / "index"),
        "HttpPort": node.http_port,
        "DicomPort": node.dicom_port,
        "DicomAet": node.ae_title,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": True,
        "RegisteredUsers": {USER: PASSWORD},
        "Plugins": [DICOMWEB_PLUGIN],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False},
        "DicomModalities": modalities or {},
        "DicomCheckCalledAet": False,
        "StableAge": 1,
        "SaveJobs": False,
        "HttpTimeout": 60,
    }
    cfg = folder / "orthanc.json"
    cfg.write_text(json.dumps(config, indent=1))
    with open(node.log, "w") as log:
        proc = subprocess.Popen([ORTHANC, f"--logfile={node.log}", str(cfg)], stdout=log,
                                stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                r = requests.get(node.url + "/system", auth=(USER, PASSWORD), timeout=2)
                if r.status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = node.log.read_text()[-2000:] if node.log.exists() else ""
                pytest.fail(f"Orthanc did not start (exit {proc.poll()}): {tail}")
            time.sleep(0.2)
        yield node
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
