"""Forwarding to another DICOM node (a PACS): originals as they were received, then the
study's SR and KOS once it has settled. In the background, in order, reconnecting with a
growing delay after failures; what the peer accepted is journaled (`forwarded.log`), so a
restart sends only the rest."""

from __future__ import annotations

import contextlib
import logging
import queue
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fetalplanes.errors import FetalPlanesError
from fetalplanes.workflows.dicom_store import (
    COMPREHENSIVE_SR,
    KEY_OBJECT_SELECTION,
    STORAGE_CLASSES,
    TRANSFER_SYNTAXES,
    OutputFolder,
)

log = logging.getLogger("fetalplanes.listen")
_PEER = re.compile(r"^(?P<aet>[^@]{1,16})@(?P<host>[^:@]+|\[[0-9a-fA-F:]+\]):(?P<port>[0-9]{1,5})$")


@dataclass(frozen=True)
class Peer:
    """A remote DICOM node, from `AET@HOST:PORT`."""

    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Peer:
        m = _PEER.match(text.strip())
        if m is None or not 0 < int(m["port"]) < 65536:
            raise FetalPlanesError(f"{text}: not a DICOM node; write it AET@HOST:PORT, "
                                   "e.g. ORTHANC@127.0.0.1:4242")
        return cls(m["aet"], m["host"].strip("[]"), int(m["port"]))

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


class Forwarder:
    """Sends stored originals and settled results to another node, in the background, in
    order, resending after connection failures; what the peer accepted is journaled."""

    def __init__(self, peer: Peer, ae_title: str, folder: OutputFolder, stats: Any):
        self.peer, self.ae_title, self.folder, self.stats = peer, ae_title, folder, stats
        self._queue: queue.Queue[tuple[Path, str] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="forwarder", daemon=True)
        self._stop = threading.Event()
        self._assoc: Any = None

    def start(self) -> None:
        self._thread.start()

    def put(self, path: Path, sop_uid: str) -> None:
        self._queue.put((path, sop_uid))

    def stop(self, timeout: float) -> None:
        self._queue.put(None)
        self._thread.join(timeout)
        self._stop.set()
        self._thread.join(5)
        self._release()

    def _loop(self) -> None:
        delay = 1.0
        item = None
        while not self._stop.is_set():
            if item is None:
                try:
                    item = self._queue.get(timeout=1.0)
                except queue.Empty:
                    self._release()  # idle: do not hold the peer's association
                    continue
                if item is None:
                    break
            try:
                self._send(*item)
                item, delay = None, 1.0
            except (ConnectionError, RuntimeError, OSError) as exc:
                log.warning("forward to %s failed (%s); retrying in %.0f s", self.peer,
                            _first_line(exc), delay)
                self._release()
                if self._stop.wait(delay):
                    break
                delay = min(delay * 2, 30.0)
        self._release()

    def _send(self, path: Path, sop_uid: str) -> None:
        if not path.exists():
            return
        assoc = self._association()
        status = assoc.send_c_store(path)
        code = int(status.get("Status", -1)) if status else -1
        if code == -1:
            raise ConnectionError("no response from the peer")
        if code == 0 or 0xB000 <= code <= 0xBFFF:
            self.folder.mark_forwarded([sop_uid])
            self.stats.forwarded += 1
        else:  # refused by the peer: not retried (it would refuse again)
            self.stats.forward_failed += 1
            log.warning("forward of %s refused by %s: status 0x%04X", sop_uid, self.peer, code)

    def _association(self) -> Any:
        if self._assoc is not None and self._assoc.is_established:
            return self._assoc
        from pynetdicom import AE

        ae = AE(ae_title=self.ae_title)
        for sop_class in (*STORAGE_CLASSES, COMPREHENSIVE_SR, KEY_OBJECT_SELECTION):
            syntaxes = (TRANSFER_SYNTAXES if sop_class in STORAGE_CLASSES
                        else TRANSFER_SYNTAXES[:2])
            for ts in syntaxes:  # one context each: the peer accepts what it can
                ae.add_requested_context(sop_class, ts)
        ae.network_timeout = ae.acse_timeout = ae.dimse_timeout = 30
        assoc = ae.associate(self.peer.host, self.peer.port, ae_title=self.peer.ae_title)
        if not assoc.is_established:
            raise ConnectionError(f"association with {self.peer} not established")
        self._assoc = assoc
        return assoc

    def _release(self) -> None:
        if self._assoc is not None:
            with contextlib.suppress(Exception):
                self._assoc.release()
            self._assoc = None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__
