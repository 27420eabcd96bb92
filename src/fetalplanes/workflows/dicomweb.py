"""DICOMweb against a PACS: pull (QIDO-RS search, WADO-RS retrieve), push (STOW-RS), and
classify a study in place (pull -> classify -> push the SR and KOS back).

Researchers reach a PACS over HTTP, not with files. `dicomweb-client` speaks the protocol;
this module adds what a long transfer over a hospital network needs: resumable downloads
(each instance written atomically under OUT/STUDY/SERIES/SOP.dcm, existing ones skipped),
uploads that skip what the PACS already holds, progress bars, credentials from options or
the environment (never printed: URLs in messages lose their user:password part), and
one-line errors for HTTP failures.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from fetalplanes.errors import FetalPlanesError

log = logging.getLogger("fetalplanes.pacs")

USER_ENV, PASSWORD_ENV, TOKEN_ENV = (
    "FETALPLANES_PACS_USER",
    "FETALPLANES_PACS_PASSWORD",
    "FETALPLANES_PACS_TOKEN",
)
_DATE = re.compile(r"^(\d{4})-?(\d{2})-?(\d{2})$")
STUDY_UID, SERIES_UID, SOP_UID, SOP_CLASS = "0020000D", "0020000E", "00080018", "00080016"
#: Instances per STOW-RS request.
STOW_BATCH = 16
#: Results asked for per QIDO-RS request.
QIDO_PAGE = 500


@dataclass
class Credentials:
    """HTTP Basic user/password or a bearer token; repr never shows the secrets."""

    user: str | None = None
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)

    @classmethod
    def resolve(cls, user: str | None = None, password: str | None = None,
                token: str | None = None) -> Credentials:
        """Options first, then FETALPLANES_PACS_USER / _PASSWORD / _TOKEN."""
        return cls(user or os.environ.get(USER_ENV) or None,
                   password or os.environ.get(PASSWORD_ENV) or None,
                   token or os.environ.get(TOKEN_ENV) or None)


@dataclass
class TransferReport:
    """What a pull or push did (counts only)."""

    found: int = 0
    transferred: int = 0
    skipped: int = 0
    refused: list[str] = field(default_factory=list)
    paths: list[Path] = field(default_factory=list)


def safe_url(url: str) -> str:
    """`url` without a user:password part, for messages."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


def connect(url: str, credentials: Credentials | None = None) -> Any:
    """A DICOMweb client for `url` (e.g. http://pacs:8042/dicom-web)."""
    from dicomweb_client.api import DICOMwebClient
    from dicomweb_client.session_utils import create_session

    if urlsplit(url).scheme not in ("http", "https"):
        raise FetalPlanesError(f"{safe_url(url)}: not an http(s) DICOMweb URL")
    logging.getLogger("dicomweb_client").setLevel(logging.WARNING)
    creds = credentials or Credentials()
    session = create_session()
    parts = urlsplit(url)
    if parts.username:  # user:password in the URL: move it into the session
        session.auth = (parts.username, parts.password or "")
        url = safe_url(url)
    if creds.user:
        session.auth = (creds.user, creds.password or "")
    headers = {"Authorization": f"Bearer {creds.token}"} if creds.token else None
    client = DICOMwebClient(url, session=session, headers=headers, timeout=(10, 120))
    client.set_http_retry_params(retry=True, max_attempts=3, wait_exponential_multiplier=500)
    return client


@contextlib.contextmanager
def http_errors(url: str, action: str):
    """Turn HTTP and connection failures into one line naming the server and the action."""
    import requests

    try:
        yield
    except requests.HTTPError as exc:
        resp = exc.response
        code = f"HTTP {resp.status_code} {resp.reason}" if resp is not None else "HTTP error"
        hint = " (check the user name and password)" if resp is not None and \
            resp.status_code in (401, 403) else ""
        raise FetalPlanesError(f"{safe_url(url)}: {action} failed: {code}{hint}") from None
    except requests.ConnectionError:
        raise FetalPlanesError(f"{safe_url(url)}: {action} failed: cannot connect") from None
    except requests.Timeout:
        raise FetalPlanesError(f"{safe_url(url)}: {action} failed: timed out") from None
    except requests.RequestException as exc:
        raise FetalPlanesError(f"{safe_url(url)}: {action} failed: "
                               f"{type(exc).__name__}") from None


def dicom_date(text: str) -> str:
    """YYYY-MM-DD or YYYYMMDD -> YYYYMMDD (QIDO's date format)."""
    m = _DATE.match(text.strip())
    if m is None:
        raise FetalPlanesError(f"{text}: not a date; write it YYYY-MM-DD")
    return "".join(m.groups())


def _value(item: dict[str, Any], tag: str) -> str:
    values = item.get(tag, {}).get("Value") or [""]
    return str(values[0])


def search(method: Any, *args: str, filters: dict[str, str] | None = None,
           key: str = SOP_UID) -> list[dict[str, Any]]:
    """All results of a QIDO-RS search, page by page (`limit`/`offset`). Stops at a short
    page or at a page with nothing new: some servers ignore `offset` and would repeat the
    first page forever."""
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    offset = 0
    while True:
        page = method(*args, search_filters=filters, limit=QIDO_PAGE, offset=offset)
        new = [item for item in page if _value(item, key) not in seen]
        seen.update(_value(item, key) for item in new)
        out += new
        if len(page) < QIDO_PAGE or not new:
            return out
        offset += len(page)


def find_instances(client: Any, url: str, study: str | None = None, since: str | None = None,
                   modality: str | None = None) -> list[tuple[str, str, str]]:
    """QIDO-RS: (study, series, SOP instance) UIDs of the study or of studies since a date,
    restricted to series of `modality` when given."""
    if (study is None) == (since is None):
        raise FetalPlanesError("give either a study UID or a date to search from")
    with http_errors(url, "QIDO-RS search"):
        if study is not None:
            studies = [study]
        else:
            filters = {"StudyDate": f"{dicom_date(since or '')}-"}
            if modality:
                filters["ModalitiesInStudy"] = modality
            found = search(client.search_for_studies, filters=filters, key=STUDY_UID)
            studies = [_value(s, STUDY_UID) for s in found]
        out = []
        for st in studies:
            filters = {"Modality": modality} if modality else None
            for series in search(client.search_for_series, st, filters=filters,
                                 key=SERIES_UID):
                se = _value(series, SERIES_UID)
                for inst in search(client.search_for_instances, st, se):
                    out.append((st, se, _value(inst, SOP_UID)))
    return out


def pull(client: Any, url: str, out: Path, study: str | None = None, since: str | None = None,
         modality: str | None = None, progress: bool = True) -> TransferReport:
    """Download the instances QIDO-RS finds into OUT/STUDY/SERIES/SOP.dcm, as stored by
    the PACS (any transfer syntax). Resumable: files already there are skipped."""
    from tqdm import tqdm

    from fetalplanes.workflows.dicom_store import valid_uid
    from fetalplanes.workflows.durable_files import atomic_write

    found = find_instances(client, url, study, since, modality)
    report = TransferReport(found=len(found))
    tmp = out / ".incoming"
    tmp.mkdir(parents=True, exist_ok=True)
    for st, se, sop in tqdm(found, desc="pulling", unit="inst", disable=not progress):
        if not all(valid_uid(u) for u in (st, se, sop)):
            report.refused.append(f"{sop[:64]}: invalid UID from the server")
            continue
        path = out / st / se / f"{sop}.dcm"
        report.paths.append(path)
        if path.exists():
            report.skipped += 1
            continue
        with http_errors(url, f"WADO-RS retrieve of instance {sop}"):
            ds = client.retrieve_instance(st, se, sop, media_types=(("application/dicom",
                                                                     "*"),))
        atomic_write(path, encode(ds), tmp, durable=True)
        report.transferred += 1
    with contextlib.suppress(OSError):
        tmp.rmdir()
    return report


def encode(ds: Any) -> bytes:
    """A data set as DICOM file bytes in its own transfer syntax."""
    from pydicom.filebase import DicomBytesIO

    buf = DicomBytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def present(client: Any, url: str, study: str) -> set[str]:
    """SOP instance UIDs the PACS holds in `study` (none when the study is unknown)."""
    import requests

    try:
        found = search(client.search_for_instances, study)
    except requests.HTTPError as exc:
        if exc.response is not None and exc.response.status_code == 404:
            return set()
        with http_errors(url, "QIDO-RS search"):
            raise
    return {_value(i, SOP_UID) for i in found}


def push(client: Any, url: str, files: Sequence[Path], progress: bool = True) -> TransferReport:
    """STOW-RS the files (DICOM, any transfer syntax), in batches; instances the PACS
    already holds are skipped, so a failed push can simply be run again."""
    from pydicom import dcmread
    from pydicom.errors import InvalidDicomError
    from tqdm import tqdm

    report = TransferReport(found=len(files))
    headers: list[tuple[Path, str, str]] = []
    for f in files:
        try:
            ds = dcmread(f, stop_before_pixels=True)
            headers.append((f, str(ds.StudyInstanceUID), str(ds.SOPInstanceUID)))
        except (InvalidDicomError, AttributeError, OSError) as exc:
            raise FetalPlanesError(f"{f}: not a DICOM file with study and instance UIDs "
                                   f"({type(exc).__name__})") from None
    held: dict[str, set[str]] = {}
    with http_errors(url, "QIDO-RS search"):
        for st in {h[1] for h in headers}:
            held[st] = present(client, url, st)
    todo = [h for h in headers if h[2] not in held[h[1]]]
    report.skipped = len(headers) - len(todo)
    bar = tqdm(total=len(todo), desc="pushing", unit="inst", disable=not progress)
    for start in range(0, len(todo), STOW_BATCH):
        chunk = todo[start:start + STOW_BATCH]
        datasets = [dcmread(p) for p, _, _ in chunk]
        with http_errors(url, "STOW-RS store"):
            response = client.store_instances(datasets)
        report.refused += _stow_failures(response)
        report.transferred += len(chunk)
        report.paths += [p for p, _, _ in chunk]
        bar.update(len(chunk))
    bar.close()
    report.transferred -= len(report.refused)
    return report


def _stow_failures(response: Any) -> list[str]:
    """SOP UIDs (with the reason code) the STOW-RS response lists as failed."""
    out = []
    for item in getattr(response, "FailedSOPSequence", None) or []:
        out.append(f"{item.get('ReferencedSOPInstanceUID', '?')}: failure reason "
                   f"{item.get('FailureReason', '?')}")
    return out


def classify_study(client: Any, url: str, study: str, predictor: Any, model: dict[str, str],
                   out: Path, modality: str | None = "US", progress: bool = True,
                   push_results: bool = True, checklist: Any = None) -> dict[str, Any]:
    """Pull a study, classify every frame (the same path and output folder as `listen`),
    then push its SR and KOS back into the study. Resumable: pulled files, per-instance
    results and reports already in OUT are reused. `checklist` (a `Checklist`): the exam
    checklist goes into the SR and KOS, as with `listen --checklist` (`model` describes
    `dicom_listen.fit_checklist`'s predictor)."""
    from fetalplanes.workflows.dicom_listen import Listener

    node = Listener(predictor, out, model, checklist=checklist)  # a misfit fails first
    pulled = pull(client, url, out / "pulled", study=study, modality=modality,
                  progress=progress)
    node.start(network=False)
    try:
        for path in pulled.paths:
            reason = node.receive_file(path.read_bytes(), time.time())
            if reason is not None:
                pulled.refused.append(f"{path.stem}: {reason}")
        if not node.wait_idle(timeout=24 * 3600):
            raise FetalPlanesError(f"{out}: classification did not finish")
    finally:
        node.stop()
    reports = [p for p in node.folder.report_paths(study) if p.is_file()]
    pushed = push(client, url, reports, progress=False) if push_results and reports \
        else TransferReport()
    return {"pulled": pulled, "reports": reports, "pushed": pushed, "stats": node.stats,
            "checklist": node.checklist_of(study)}


def dicom_files(paths: Iterable[Path]) -> list[Path]:
    """Files, and the .dcm files of folders (recursively), in a stable order."""
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            out += sorted(q for q in p.rglob("*") if q.is_file() and not q.name.startswith("."))
        elif p.is_file():
            out.append(p)
        else:
            raise FetalPlanesError(f"{p}: no such file or folder")
    return out
