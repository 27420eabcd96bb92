"""A DICOM Storage SCP that classifies what scanners send (`fetalplanes listen`).

Scanners send ultrasound over the DICOM network (C-STORE), not as files. This node accepts
Verification and Ultrasound (multi-frame) Image and Secondary Capture storage in the
transfer syntaxes the reader decodes, and for each instance:

1. checks it with the reader's header guard (`data.dicom.open_dicom`: malformed data sets
   and oversized declared images are refused *before any pixel is decoded*, with a failure
   status; a refused instance is not stored);
2. writes it durably (temporary file, fsync, rename, fsync of the folder) and only then
   answers Success: nothing acknowledged is lost if the process is killed the next moment;
3. classifies every frame (one adapter function, `classify_instances`), writes the
   per-instance results in the one result schema (`Prediction.to_dict`), and per study the
   DICOM results: a Comprehensive SR and a Key Object Selection (`dicom_results`); with an
   exam checklist, the study's checklist (filled by `workflows.checklist`, the engine of
   `fetalplanes audit`) goes into both;
4. with `forward`, sends the originals and the settled results on to another node (a PACS).

The output folder is its own journal: ``instances/STUDY/SOP.dcm`` (received), ``results/
STUDY/SOP.json`` (classified), ``reports/STUDY/{sr,kos}.dcm``, ``state.json`` (per study,
written atomically) and ``forwarded.log``. A restart classifies what was stored but not yet
classified, rewrites stale study results and forwards what was not forwarded; an instance
received twice (same SOP Instance UID) is stored and classified once. Logs name AE titles,
addresses and UIDs, never patient names or IDs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fetalplanes._version import __version__
from fetalplanes.data.items import parse_frame_name
from fetalplanes.data.sources import DicomFile as DicomSource
from fetalplanes.data.sources import Source
from fetalplanes.errors import ImageError
from fetalplanes.inference.results import Prediction
from fetalplanes.workflows.checklist import (
    Checklist,
    check_checklist_fits,
    model_views,
    predictor_for_preset,
)
from fetalplanes.workflows.dicom_forward import Forwarder, Peer
from fetalplanes.workflows.dicom_results import (
    FrameResult,
    SourceInstance,
    StudyIdentity,
    best_frame_results,
    build_kos,
    checklist_result,
    encode_sr,
    warm_up,
)
from fetalplanes.workflows.dicom_store import (
    COMPREHENSIVE_SR,
    KEY_OBJECT_SELECTION,
    STORAGE_CLASSES,
    TRANSFER_SYNTAXES,
    VERIFICATION,
    OutputFolder,
    prediction_from_dict,
    valid_uid,
)
from fetalplanes.workflows.durable_files import atomic_write

__all__ = [
    "CANNOT_UNDERSTAND",
    "COMPREHENSIVE_SR",
    "DOES_NOT_MATCH",
    "KEY_OBJECT_SELECTION",
    "OUT_OF_RESOURCES",
    "SUCCESS",
    "ListenStats",
    "Listener",
    "OutputFolder",
    "Peer",
    "classify_instances",
    "fit_checklist",
    "model_info",
]

log = logging.getLogger("fetalplanes.listen")

# C-STORE statuses (PS3.4 B.2.3, PS3.7 C)
SUCCESS = 0x0000
SOP_CLASS_NOT_SUPPORTED = 0x0122
OUT_OF_RESOURCES = 0xA700
DOES_NOT_MATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000
#: Frames per model call (memory of the node: ONNX Runtime keeps buffers for the largest).
CLASSIFY_BATCH = 8
#: A study's reports are written once nothing of it is queued and nothing arrived for
#: this long, ...
REPORT_DELAY_S = 1.0
#: ... or, while instances trickle in, once nothing is queued and the last write is this
#: old (or 5 times as old as that write took, so a big study costs at most 20 % of a core),
REPORT_INTERVAL_S = 2.0
#: All these writes together take at most this share of the time (the oldest news first):
#: with 40 studies arriving interleaved (a PACS sending a backlog), each quiet for a second
#: between its instances, per-study rules alone let the reporter rewrite 20 reports a
#: second and starve receiving (2,000 instances: 611 SR writes, 16.7 frames/s).
REPORT_SHARE = 0.1
#: ... or at least this often while its instances keep coming faster than classified.
RESULTS_INTERVAL_S = 30.0
#: A study's reports are forwarded once no instance of it arrived for this long.
SETTLE_S = 5.0
#: A study's classified results leave memory after this long without new instances.
STUDY_IDLE_S = 60.0


def decodable_syntaxes() -> list[str]:
    """The accepted transfer syntaxes whose pixel decoder is installed here."""
    from pydicom.pixels import get_decoder
    from pydicom.uid import UID

    out = []
    for ts in TRANSFER_SYNTAXES:
        uid = UID(ts)
        try:
            if not uid.is_encapsulated or get_decoder(uid).is_available:
                out.append(ts)
        except NotImplementedError:
            continue
    return out


# ----------------------------------------------------------------- classification adapter
def classify_instances(predictor: Any, paths: Sequence[str | Path | Source],
                       pool: Any = None) -> list[Prediction]:
    """Every frame of these DICOM files through the one engine (`Predictor.stream`): the
    network is one more source, like files and uploads. Each frame of a multi-frame file
    is its own item (`file.dcm#frame=N`, `Prediction.frame` set). Decoding runs in this
    thread and the model sees at most `CLASSIFY_BATCH` frames at once: a long-running node
    holds the memory of a few frames, and forks no worker processes from a threaded server
    (on 2 busy cores this was also the fastest: 15 frames/s against 13-14 with 2 workers).
    With `pool` (`Listener(workers=N)`, a `DecodePool` made once at start), the frames are
    decoded and classified in N long-lived worker processes instead. A `Source` in
    `paths` is used as it is (the node's, made when the instance was checked)."""
    from fetalplanes.data.sources import file_source, iter_items

    # DICOM by content: every frame an item
    sources = [p if isinstance(p, Source) else file_source(p) for p in paths]
    return list(predictor.predict_items(iter_items(sources), workers=0, pool=pool,
                                        batch_size=CLASSIFY_BATCH))


def fit_checklist(predictor: Any, checklist: Checklist) -> Any:
    """The predictor a checklist is filled with: a zero-shot model folded to the
    checklist's preset (`predictor_for_preset`, as `fetalplanes audit` does), any other
    model as it is; ChecklistError (one line) when it can assess none of its views."""
    folded = predictor_for_preset(predictor, checklist.preset)
    check_checklist_fits(checklist, model_views(folded), folded.card.architecture)
    return folded


def model_info(predictor: Any, name: str, backend: str) -> dict[str, str]:
    """What the results say about the model: name, version and a one-line card summary."""
    card = predictor.card
    classes = getattr(predictor, "output_classes", None) or list(card.classes)
    rejection = card.rejection.get("method") or "none"
    summary = (
        f"{card.architecture} ({len(card.classes)} classes) -> {', '.join(classes)}; "
        f"preset {card.preset}; temperature {card.temperature:g}; rejection {rejection}; "
        f"uncertain below {predictor.min_confidence:g}; backend {backend}"
    )
    return {"name": name, "version": card.version or f"fetalplanes {__version__}",
            "summary": summary}


@dataclass
class Received:
    """A stored instance waiting for classification (no patient identity in it)."""

    study_uid: str
    instance: SourceInstance
    path: Path
    received_at: float  # time.time() when its last byte had arrived
    source: Source  # the engine's source for the stored file, from the parse that checked it


@dataclass
class StudyState:
    """What is known about one study in memory (rebuilt from disk after a restart).

    `results` holds what was classified in this run; once `loaded`, also what earlier
    runs left on disk. `groups` caches each frame's SR content so an update of the
    study's SR does not rebuild the frames already reported.
    """

    identity: StudyIdentity | None = None
    results: dict[str, list[FrameResult]] = field(default_factory=dict)
    groups: dict[Any, Any] = field(default_factory=dict)
    loaded: bool = False
    dirty: bool = False
    waiting: list[float] = field(default_factory=list)  # received_at of unreported ones
    pending: int = 0  # received, not classified yet
    last_received: float = 0.0  # arrival of its latest instance
    last_written: float = 0.0
    dirty_since: float = 0.0  # first result not in the reports yet
    write_cost: float = 0.0  # seconds the last write of its reports took
    version: int = 0
    sr_uid: str = ""
    kos_uid: str = ""
    forwarded: bool = True
    checklist: Any = None  # the ChecklistResult in its latest reports


@dataclass
class ListenStats:
    """Counters for logs and the benchmark."""

    received: int = 0
    duplicates: int = 0
    refused: int = 0
    classified: int = 0
    frames: int = 0
    failed_frames: int = 0
    reports: int = 0
    forwarded: int = 0
    forward_failed: int = 0
    latencies: deque = field(default_factory=lambda: deque(maxlen=100_000))

    def as_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "latencies"}
        lat = sorted(self.latencies)
        if lat:
            d["latency_p50_s"] = lat[len(lat) // 2]
            d["latency_p95_s"] = lat[min(len(lat) - 1, int(0.95 * len(lat)))]
        return d


def _no_delay(event: Any) -> None:
    """TCP_NODELAY on each accepted connection: pynetdicom writes a C-STORE response in
    small pieces, and with Nagle's algorithm each waited for the sender's delayed ACK
    (~40 ms per instance: 15 instances/s, whatever the classifier's speed)."""
    import socket

    sock = getattr(getattr(getattr(event.assoc, "dul", None), "socket", None), "socket", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class Listener:
    """The Storage SCP: receive -> durable write -> classify -> per-study DICOM results.

    Three kinds of threads: pynetdicom's (one per association: check, store, answer),
    the classifier (batches of stored instances through `classify_instances`) and the
    reporter (a study's SR and KOS once it is quiet for `report_delay` seconds, or every
    `results_interval` while it keeps growing; forwarding once it settled). `start()`
    serves in the background; `stop()` stops accepting, lets the associations in flight
    finish, classifies what is queued and writes the results.

    With `checklist`, the predictor is `fit_checklist`'s (pass `model` info of that
    predictor: `model_info(fit_checklist(p, c), ...)`) and each study's SR and KOS carry
    its exam checklist.
    """

    def __init__(
        self,
        predictor: Any,
        out: Path,
        model: dict[str, str],
        ae_title: str = "FETALPLANES",
        host: str = "127.0.0.1",
        port: int = 11112,
        allow: Sequence[str] = (),
        forward: Peer | None = None,
        batch: int = 64,
        workers: int = 0,
        report_delay: float = REPORT_DELAY_S,
        results_interval: float = RESULTS_INTERVAL_S,
        settle: float = SETTLE_S,
        checklist: Checklist | None = None,
    ):
        self.checklist = checklist
        if checklist is not None:
            predictor = fit_checklist(predictor, checklist)
        self.predictor = predictor
        self.views = model_views(predictor)
        self.folder = OutputFolder(out)
        self.model = model
        self.ae_title = ae_title
        self.host, self.port = host, port
        self.allow = [a.strip() for a in allow if a.strip()]
        self.forward = forward
        self.batch = max(1, batch)
        self.workers = max(0, workers)
        self._pool: Any = None  # the engine's long-lived decode workers (workers > 0)
        self.report_delay = report_delay
        self.results_interval = results_interval
        self.settle = settle
        self.stats = ListenStats()
        self._queue: queue.Queue[Received] = queue.Queue()
        self._studies: dict[str, StudyState] = {}
        self._store_lock = threading.Lock()
        self._study_lock = threading.Lock()
        self._stopping = threading.Event()
        self._classifier_done = threading.Event()
        self._reporter_done = threading.Event()
        self._reporting = 0  # studies being written right now
        self._write_ready = 0.0  # time.monotonic() from which the next write may start
        self._forwarder: Forwarder | None = None
        self._server: Any = None
        self._assoc_counts: dict[int, list[int]] = {}

    # ------------------------------------------------------------ lifecycle
    def start(self, network: bool = True) -> None:
        """Recover the folder's journal, then start classifying and (with `network`)
        serving; without it, files come in through `receive_file` (DICOMweb pulls)."""
        partial = self.folder.clean_incoming()
        if partial:
            log.info("removed %d partial file(s) of interrupted associations", partial)
        if self.forward is not None:
            self._forwarder = Forwarder(self.forward, self.ae_title, self.folder, self.stats)
        if self.workers and getattr(self.predictor, "decode_pool", None) is not None:
            self._pool = self.predictor.decode_pool(self.workers)  # before any thread starts
        self._recover()
        warm_up(self.model)
        for target, name in ((self._classify_loop, "classifier"),
                             (self._report_loop, "reporter")):
            threading.Thread(target=target, name=name, daemon=True).start()
        if self._forwarder is not None:
            self._forwarder.start()
        if not network:
            return
        self._server = self._make_ae().start_server(
            (self.host, self.port), block=False, evt_handlers=self._handlers()
        )
        self.port = self._server.server_address[1]
        log.info("listening as %s on %s:%d (%s)", self.ae_title, self.host, self.port,
                 "calling AE titles: " + ", ".join(self.allow) if self.allow else "any AE title")

    def stop(self, drain_timeout: float = 60.0) -> None:
        """Stop accepting, finish the associations in flight, classify what was
        received, write the study results and forward them (each step bounded)."""
        if self._server is not None:
            server, self._server = self._server, None
            server.shutdown()
            deadline = time.monotonic() + drain_timeout
            while server.active_associations and time.monotonic() < deadline:
                time.sleep(0.05)
            for assoc in server.active_associations:  # too slow: the sender resends
                assoc.abort()
        self._stopping.set()
        self._classifier_done.wait(drain_timeout)
        self._reporter_done.wait(drain_timeout)
        if self._forwarder is not None:
            self._forwarder.stop(drain_timeout)
        if self._pool is not None:
            self._pool.close()
        self.write_stats()
        log.info("stopped: %s", _counts(self.stats))

    def write_stats(self) -> None:
        """OUT/stats.json: this run's counters and last-byte -> SR latency (p50, p95)."""
        data = json.dumps(self.stats.as_dict(), indent=1).encode()
        atomic_write(self.folder.root / "stats.json", data, self.folder.incoming)

    def __enter__(self) -> Listener:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait_idle(self, timeout: float = 60.0) -> bool:
        """Block until every received instance is classified and reported (tests, bench)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._study_lock:
                busy = self._reporting or any(s.dirty for s in self._studies.values())
            if self._queue.unfinished_tasks == 0 and not busy:
                return True
            time.sleep(0.05)
        return False

    def checklist_of(self, study_uid: str) -> Any:
        """The exam checklist (`ChecklistResult`) in the study's latest reports written
        by this run, or None."""
        with self._study_lock:
            st = self._studies.get(study_uid)
            return None if st is None else st.checklist

    # ------------------------------------------------------------ network
    def _make_ae(self) -> Any:
        from pynetdicom import AE

        logging.getLogger("pynetdicom").setLevel(logging.WARNING)
        ae = AE(ae_title=self.ae_title)
        syntaxes = decodable_syntaxes()
        ae.add_supported_context(VERIFICATION)
        for sop_class in STORAGE_CLASSES:
            ae.add_supported_context(sop_class, syntaxes)
        if self.allow:
            ae.require_calling_aet = self.allow
        ae.maximum_associations = 8
        ae.network_timeout = 60
        ae.dimse_timeout = 60
        return ae

    def _handlers(self) -> list[tuple[Any, Any]]:
        from pynetdicom import evt

        return [
            (evt.EVT_CONN_OPEN, _no_delay),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_RELEASED, self._on_closed),
            (evt.EVT_ABORTED, self._on_closed),
            (evt.EVT_REJECTED, self._on_rejected),
        ]

    def _on_accepted(self, event: Any) -> None:
        self._assoc_counts[id(event.assoc)] = [0, 0]

    def _on_rejected(self, event: Any) -> None:
        who = event.assoc.requestor
        log.warning("refused association from %s (%s): calling AE title not allowed",
                    who.ae_title, who.address)

    def _on_closed(self, event: Any) -> None:
        stored, refused = self._assoc_counts.pop(id(event.assoc), [0, 0])
        who = event.assoc.requestor
        how = "released" if event.event.name == "EVT_RELEASED" else "aborted"
        log.info("association from %s (%s) %s: %d stored, %d refused", who.ae_title,
                 who.address, how, stored, refused)

    def _on_store(self, event: Any) -> Any:
        """C-STORE: validate before decoding, store durably, then answer."""
        received_at = time.time()
        counts = self._assoc_counts.setdefault(id(event.assoc), [0, 0])
        try:
            status = self.receive(event.encoded_dataset(), received_at,
                                  str(event.request.AffectedSOPClassUID),
                                  str(event.request.AffectedSOPInstanceUID))
        except OSError as exc:  # disk full, read-only folder: not stored, say so
            log.error("cannot store an instance: %s", exc.strerror or exc)
            status = _status(OUT_OF_RESOURCES, "cannot store: "
                             + str(exc.strerror or "I/O error"))
        ok = isinstance(status, int) and status == SUCCESS
        counts[0 if ok else 1] += 1
        return status

    # ------------------------------------------------------------ receiving
    def receive(self, data: bytes, received_at: float, sop_class: str, sop_uid: str) -> Any:
        """Check, durably store and queue one encoded instance (file format bytes).
        Returns SUCCESS or a status data set with a one-line Error Comment."""
        from fetalplanes.data.dicom import open_dicom_and_header

        label = f"instance {sop_uid}" if valid_uid(sop_uid) else "instance"
        if sop_class not in STORAGE_CLASSES:
            return self._refuse(SOP_CLASS_NOT_SUPPORTED, "SOP class not supported", sop_uid)
        if not valid_uid(sop_uid):
            return self._refuse(DOES_NOT_MATCH, "invalid SOP Instance UID", sop_uid)
        try:
            # the one size guard: nothing decoded yet
            dcm, header = open_dicom_and_header(data, label)
        except ImageError as exc:
            reason = str(exc).removeprefix(f"{label}: ")
            if _is_size_refusal(reason):  # the comment is 64 characters at most
                return self._refuse(OUT_OF_RESOURCES, reason, sop_uid,
                                    "declared image over the size limit; not decoded")
            return self._refuse(CANNOT_UNDERSTAND, reason, sop_uid)
        study_uid = str(header.get("StudyInstanceUID", "") or "")
        if str(header.get("SOPInstanceUID", "")) != sop_uid:
            return self._refuse(DOES_NOT_MATCH, "SOP Instance UID differs from the request",
                                sop_uid)
        if str(header.get("SOPClassUID", "")) != sop_class:
            return self._refuse(DOES_NOT_MATCH, "SOP Class UID differs from the request",
                                sop_uid)
        if not valid_uid(study_uid) or not valid_uid(str(header.get("SeriesInstanceUID", ""))):
            return self._refuse(DOES_NOT_MATCH, "missing or invalid Study/Series UID", sop_uid)
        instance = SourceInstance(sop_uid, sop_class, str(header.SeriesInstanceUID),
                                  dcm.rows, dcm.columns, dcm.n_frames)
        path = self.folder.instance_path(study_uid, sop_uid)
        with self._store_lock:
            if path.exists():  # sent again: already stored (and classified or queued)
                self.stats.duplicates += 1
                return SUCCESS
            atomic_write(path, data, self.folder.incoming, durable=True)
            self.stats.received += 1
            self._remember_identity(study_uid, header, received_at)
            source = DicomSource(path, str(path), opened=dcm)
            self._queue.put(Received(study_uid, instance, path, received_at, source))
        if self._forwarder is not None:
            self._forwarder.put(path, sop_uid)
        log.debug("stored %s (study %s)", sop_uid, study_uid)
        return SUCCESS

    def receive_file(self, data: bytes, received_at: float) -> str | None:
        """Like a C-STORE of file bytes that came another way (a DICOMweb pull): the same
        checks and storage. None when stored, else the one-line reason it was refused."""
        from fetalplanes.data.dicom import read_header

        try:
            header = read_header(data, "instance")
        except ImageError as exc:
            self.stats.refused += 1
            return str(exc)
        status = self.receive(data, received_at, str(header.get("SOPClassUID", "")),
                              str(header.get("SOPInstanceUID", "")))
        if isinstance(status, int) and status == SUCCESS:
            return None
        return str(status.get("ErrorComment", "refused"))

    def _refuse(self, code: int, message: str, sop_uid: str, comment: str = "") -> Any:
        """A failure status with a one-line Error Comment; the full reason is logged."""
        self.stats.refused += 1
        log.warning("refused %s (status 0x%04X): %s",
                    sop_uid if valid_uid(sop_uid) else "an instance", code, message)
        return _status(code, comment or message)

    def _remember_identity(self, study_uid: str, header: Any, received_at: float) -> None:
        """A new instance of the study is queued: its identity, and that it is busy."""
        with self._study_lock:
            state = self._studies.setdefault(study_uid, StudyState())
            if state.identity is None:
                state.identity = StudyIdentity.from_dataset(header)
            state.pending += 1
            state.last_received = max(state.last_received, received_at)

    # ------------------------------------------------------------ recovery
    def _recover(self) -> None:
        """Queue what was stored but not classified; mark studies whose reports are stale;
        queue for forwarding what the peer has not accepted yet."""
        saved_state = self.folder.load_state()
        state = saved_state.get("studies", {})
        # reports made with another checklist (or none) are rewritten with this one
        other_checklist = saved_state.get("checklist") != self._checklist_name()
        forwarded = self.folder.forwarded() if self._forwarder is not None else set()
        todo = stale = 0
        counts: dict[str, int] = {}
        for study_uid, sop_uid, path in self.folder.stored():
            counts[study_uid] = counts.get(study_uid, 0) + 1
            if self._forwarder is not None and sop_uid not in forwarded:
                self._forwarder.put(path, sop_uid)
            if self.folder.read_result(study_uid, sop_uid) is not None:
                continue
            received = self._recovered(study_uid, sop_uid, path)
            if received is not None:
                self._queue.put(received)
                todo += 1
        for study_uid, n in counts.items():
            st = self._studies.setdefault(study_uid, StudyState())
            saved = state.get(study_uid, {})
            st.version = int(saved.get("version", 0))
            st.sr_uid, st.kos_uid = saved.get("sr_uid", ""), saved.get("kos_uid", "")
            if saved.get("instances") != n or other_checklist:
                st.dirty, st.dirty_since = True, time.time()
                stale += 1
            elif self._forwarder is not None:
                st.forwarded = not self._unforwarded_reports(study_uid, st, forwarded)
        if todo or stale:
            log.info("resuming: %d stored instance(s) to classify, %d study report(s) to "
                     "rewrite", todo, stale)

    def _unforwarded_reports(self, study_uid: str, st: StudyState, done: set[str]) -> bool:
        return any(uid and uid not in done for uid in (st.sr_uid, st.kos_uid))

    def _recovered(self, study_uid: str, sop_uid: str, path: Path) -> Received | None:
        from fetalplanes.data.dicom import open_dicom_and_header

        try:
            dcm, header = open_dicom_and_header(path, sop_uid)
        except (ImageError, OSError) as exc:
            log.warning("stored instance %s is unreadable: %s", sop_uid, exc)
            return None
        now = time.time()
        self._remember_identity(study_uid, header, now)
        inst = SourceInstance(sop_uid, str(header.SOPClassUID), str(header.SeriesInstanceUID),
                              dcm.rows, dcm.columns, dcm.n_frames)
        return Received(study_uid, inst, path, now, DicomSource(path, str(path), opened=dcm))

    # ------------------------------------------------------------ classification
    def _classify_loop(self) -> None:
        try:
            while not (self._stopping.is_set() and self._queue.empty()):
                batch = self._take_batch()
                if batch:
                    try:
                        self._classify(batch)
                    finally:
                        for _ in batch:
                            self._queue.task_done()
        except Exception:  # never die silently: the node would accept and not classify
            log.exception("classification stopped")
        finally:
            self._classifier_done.set()

    def _take_batch(self) -> list[Received]:
        try:
            first = self._queue.get(timeout=0.2)
        except queue.Empty:
            return []
        batch = [first]
        while len(batch) < self.batch:
            try:
                batch.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return batch

    def _classify(self, batch: list[Received]) -> None:
        started = time.monotonic()
        by_path: dict[str, list[Prediction]] = {str(r.path): [] for r in batch}
        for p in classify_instances(self.predictor, [r.source for r in batch], self._pool):
            by_path.setdefault(parse_frame_name(p.path)[0], []).append(p)
        frames = 0
        for r in batch:
            preds = by_path.get(str(r.path), [])
            frames += len(preds)
            self._save_result(r, preds)
        self.stats.classified += len(batch)
        self.stats.frames += frames
        log.info("classified %d instance(s), %d frame(s) in %.2f s", len(batch), frames,
                 time.monotonic() - started)

    def _save_result(self, r: Received, preds: list[Prediction]) -> None:
        rel = r.path.relative_to(self.folder.root).as_posix()
        for p in preds:  # paths relative to the output folder: the folder can move
            frame = parse_frame_name(p.path)[1]
            p.path = rel if frame is None else f"{rel}#frame={frame}"
        self.stats.failed_frames += sum(not p.ok for p in preds)
        inst = r.instance
        record = {
            "study_uid": r.study_uid,
            "series_uid": inst.series_uid,
            "sop_instance_uid": inst.sop_instance_uid,
            "sop_class_uid": inst.sop_class_uid,
            "rows": inst.rows,
            "columns": inst.columns,
            "frames": inst.n_frames,
            "file": rel,
            "model": self.model["name"],
            "predictions": [p.to_dict() for p in preds],
        }
        data = json.dumps(record, indent=1).encode()
        atomic_write(self.folder.result_path(r.study_uid, inst.sop_instance_uid), data,
                     self.folder.incoming)
        with self._study_lock:
            st = self._studies.setdefault(r.study_uid, StudyState())
            st.results[inst.sop_instance_uid] = [FrameResult(inst, p) for p in preds]
            if not st.dirty:
                st.dirty, st.dirty_since = True, time.time()
            st.waiting.append(r.received_at)
            st.pending = max(0, st.pending - 1)

    # ------------------------------------------------------------ study results
    def _report_loop(self) -> None:
        try:
            while True:
                final = self._classifier_done.is_set()
                self._write_reports(final)
                if final:
                    return
                time.sleep(0.1)
        except Exception:
            log.exception("writing study results stopped")
        finally:
            self._reporter_done.set()

    def _write_reports(self, final: bool = False) -> None:
        """Write the reports of studies with new results that are quiet (nothing queued,
        nothing arrived for `report_delay`) or have waited `results_interval`, then of
        studies still trickling in, within `REPORT_SHARE` of the time while instances
        wait to be classified (else all of them); forward settled ones; drop idle studies
        from memory."""
        now = time.time()
        with self._study_lock:
            due = self._due(now, final)
        for uid in due:
            busy = not final and self._queue.unfinished_tasks > 0
            if busy and time.monotonic() < self._write_ready:
                break
            started = time.monotonic()
            self._write_study_safely(uid)
            took = time.monotonic() - started
            self._write_ready = time.monotonic() + took * (1 - REPORT_SHARE) / REPORT_SHARE
        if self._forwarder is not None:
            self._forward_settled(now, final)
        with self._study_lock:
            for st in self._studies.values():
                if st.loaded and not st.dirty and now - st.last_received > STUDY_IDLE_S:
                    st.results, st.groups, st.loaded = {}, {}, False

    def _due(self, now: float, final: bool) -> list[str]:
        """Studies whose reports are due: quiet or overdue ones (the longest unreported
        first), then those trickling in (the longest unwritten first). Called with the
        study lock held."""
        due: list[str] = []
        interim: list[str] = []
        for uid, st in self._studies.items():
            if not st.dirty:
                continue
            quiet = st.pending == 0 and now - st.last_received >= self.report_delay
            if final or quiet or now - st.dirty_since >= self.results_interval:
                due.append(uid)
            elif st.pending == 0 and now - st.last_written >= max(REPORT_INTERVAL_S,
                                                                   5 * st.write_cost):
                interim.append(uid)
        due.sort(key=lambda uid: self._studies[uid].dirty_since)
        interim.sort(key=lambda uid: self._studies[uid].last_written)
        return due + interim

    def _write_study_safely(self, study_uid: str) -> None:
        try:
            self._write_study(study_uid)
        except Exception:  # one study's bad data must not stop the others' reports
            log.exception("study %s: cannot write its SR and KOS", study_uid)

    def _write_study(self, study_uid: str) -> None:
        with self._study_lock:
            st = self._studies[study_uid]
            self._reporting += 1
        try:
            if not st.loaded:
                self._load_study(study_uid, st)
            with self._study_lock:
                st.dirty = False
                waiting, st.waiting = st.waiting, []
                results = [fr for frs in st.results.values() for fr in frs]
            self._write_study_files(study_uid, st, results, waiting)
        finally:
            with self._study_lock:
                self._reporting -= 1

    def _write_study_files(self, study_uid: str, st: StudyState, results: list[FrameResult],
                           waiting: list[float]) -> None:
        identity = st.identity or self._identity_from_disk(study_uid)
        if identity is None or not any(fr.prediction.ok for fr in results):
            self._save_state()
            return
        st.identity = identity
        started = time.monotonic()
        sr_path, kos_path = self.folder.report_paths(study_uid)
        st.version += 1
        check = None if self.checklist is None else checklist_result(
            self.checklist, results, self.views)
        sr_uid, sr_bytes = encode_sr(identity, results, self.model,
                                     instance_number=st.version, cache=st.groups,
                                     checklist=check)
        atomic_write(sr_path, sr_bytes, self.folder.incoming)
        best = best_frame_results(results)
        kos_uid = ""
        if best:
            kos = build_kos(identity, best, self.model, instance_number=st.version,
                            checklist=check, results=results)
            self._save_dataset(kos, kos_path)
            kos_uid = str(kos.SOPInstanceUID)
        elif kos_path.exists():
            kos_path.unlink()
        st.checklist = check
        changed = (sr_uid, kos_uid) != (st.sr_uid, st.kos_uid)
        st.sr_uid, st.kos_uid = sr_uid, kos_uid
        st.last_written = time.time()
        st.write_cost = time.monotonic() - started
        if changed:
            st.forwarded = False
        self.stats.reports += 1
        for t in waiting:
            self.stats.latencies.append(st.last_written - t)
        self._save_state()
        n_instances = len({fr.instance.sop_instance_uid for fr in results})
        log.info("study %s: SR and KOS written (%d instance(s), %d frame(s), %d best%s)",
                 study_uid, n_instances, len(results), len(best),
                 "" if check is None else f"; checklist {self.checklist.name}: "
                 f"{len(check.present)}/{check.assessed} views present")

    def _save_dataset(self, ds: Any, path: Path) -> None:
        from pydicom.filebase import DicomBytesIO

        buf = DicomBytesIO()
        ds.save_as(buf, enforce_file_format=True)
        atomic_write(path, buf.getvalue(), self.folder.incoming)

    def _load_study(self, study_uid: str, st: StudyState) -> None:
        """Add what earlier runs classified (on disk) to what this run holds in memory."""
        folder = self.folder.results / study_uid
        results: dict[str, list[FrameResult]] = {}
        for f in sorted(folder.glob("*.json")) if folder.is_dir() else []:
            record = self.folder.read_result(study_uid, f.stem)
            if record is None:
                continue
            inst = SourceInstance(record["sop_instance_uid"], record["sop_class_uid"],
                                  record["series_uid"], int(record.get("rows", 0)),
                                  int(record.get("columns", 0)), int(record.get("frames", 1)))
            results[inst.sop_instance_uid] = [
                FrameResult(inst, prediction_from_dict(d)) for d in record["predictions"]]
        with self._study_lock:
            results.update(st.results)
            st.results, st.loaded = results, True

    def _identity_from_disk(self, study_uid: str) -> StudyIdentity | None:
        from fetalplanes.data.dicom import read_header

        for f in sorted((self.folder.instances / study_uid).glob("*.dcm")):
            try:
                return StudyIdentity.from_dataset(read_header(f, f.stem))
            except (ImageError, OSError):
                continue
        return None

    def _save_state(self) -> None:
        with self._study_lock:
            studies = {
                uid: {"instances": len(st.results) if st.loaded else None,
                      "version": st.version, "sr_uid": st.sr_uid, "kos_uid": st.kos_uid}
                for uid, st in self._studies.items()
            }
        old = self.folder.load_state().get("studies", {})
        for uid, entry in studies.items():  # an unloaded study keeps its saved count
            if entry["instances"] is None:
                entry["instances"] = old.get(uid, {}).get("instances")
        state = {"format": 1, "model": self.model, "checklist": self._checklist_name(),
                 "studies": studies}
        atomic_write(self.folder.state_file, json.dumps(state, indent=1).encode(),
                     self.folder.incoming)

    def _checklist_name(self) -> str | None:
        return None if self.checklist is None else self.checklist.name

    def _forward_settled(self, now: float, final: bool) -> None:
        assert self._forwarder is not None
        with self._study_lock:
            ready = [(uid, st) for uid, st in self._studies.items()
                     if not st.forwarded and not st.dirty and st.sr_uid and st.pending == 0
                     and (final or now - st.last_received >= self.settle)]
            for _, st in ready:
                st.forwarded = True
        for uid, st in ready:
            sr_path, kos_path = self.folder.report_paths(uid)
            self._forwarder.put(sr_path, st.sr_uid)
            if st.kos_uid:
                self._forwarder.put(kos_path, st.kos_uid)


def _status(code: int, comment: str) -> Any:
    from pydicom.dataset import Dataset

    ds = Dataset()
    ds.Status = code
    ds.ErrorComment = comment[:64]
    return ds


def _is_size_refusal(message: str) -> bool:
    """The reader's size guard (frame pixels, decoded bytes, header element) said no."""
    return "refusing to decode" in message or "bytes (over" in message


def _counts(stats: ListenStats) -> str:
    d = stats.as_dict()
    keys = ("received", "duplicates", "refused", "classified", "frames", "reports",
            "forwarded", "forward_failed")
    return ", ".join(f"{k} {d[k]}" for k in keys)
