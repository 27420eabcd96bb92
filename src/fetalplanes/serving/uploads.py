"""Reading multipart uploads in memory, with size limits enforced while the body streams in.

Starlette's form parser spools large files to temporary files on disk; uploads may be
patient images, so this module parses the raw body stream with python-multipart and
keeps parts in memory only. A request over a limit is refused as soon as the limit is
crossed (or at once, when Content-Length already says so), without reading the rest:
a file over its limit, a text field over a small one, too many parts, part headers too
long, or a body that stalls or takes too long to arrive (408).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, MultipartState, parse_options_header

FIELD = "files"
_MAX_NAME = 200
#: RFC 2046: 1 to 70 characters from this set, not ending in a space.
MAX_BOUNDARY = 70
_BCHARS = re.compile(rb"^[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]$")
#: Parts allowed beyond `max_files` (text fields a client may add, e.g. a note).
EXTRA_PARTS = 64


@dataclass(frozen=True)
class Upload:
    """One uploaded file, held in memory."""

    filename: str
    data: bytes


class UploadRejected(Exception):
    """The request as a whole cannot be accepted; carries the HTTP status to answer with."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status = status
        self.detail = detail


def human_bytes(n: int) -> str:
    """Sizes for error messages: 512 bytes, 50 KiB, 20 MiB."""
    if n < 1024:
        return f"{n} bytes"
    if n < 1024 * 1024:
        return f"{n / 1024:.3g} KiB"
    return f"{n / 1024 / 1024:.3g} MiB"


def clean_filename(raw: bytes, index: int) -> str:
    """Base name only (browsers on Windows may send paths), printable, bounded length."""
    name = raw.decode("utf-8", errors="replace")
    name = re.split(r"[\\/]", name)[-1]
    name = "".join(c for c in name if c.isprintable()).strip()
    return name[:_MAX_NAME] or f"file{index + 1}"


@dataclass
class _Collector:
    """python-multipart callbacks that keep the parts named `files` and enforce limits."""

    max_file_bytes: int
    max_files: int
    max_field_bytes: int = 64 * 1024
    max_part_header_bytes: int = 16 * 1024
    uploads: list[Upload] = field(default_factory=list)
    parts: int = 0
    _header_bytes: int = 0
    _headers: dict[bytes, bytes] = field(default_factory=dict)
    _field: bytes = b""
    _value: bytes = b""
    _keep: bool = False
    _name: str = ""
    _chunks: list[bytes] = field(default_factory=list)
    _size: int = 0

    def callbacks(self) -> dict[str, object]:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": self._header_field,
            "on_header_value": self._header_value,
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
        }

    def _part_begin(self) -> None:
        self._headers, self._chunks, self._size, self._keep = {}, [], 0, False
        self._header_bytes = 0
        self.parts += 1
        if self.parts > self.max_files + EXTRA_PARTS:
            raise UploadRejected(
                413, f"too many form parts: at most {self.max_files + EXTRA_PARTS} per request"
            )

    def _count_header(self, n: int) -> None:
        self._header_bytes += n
        if self._header_bytes > self.max_part_header_bytes:
            limit = human_bytes(self.max_part_header_bytes)
            raise UploadRejected(400, f"multipart part headers too long (limit {limit})")

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._count_header(end - start)
        self._field += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._count_header(end - start)
        self._value += data[start:end]

    def _header_end(self) -> None:
        self._headers[self._field.lower()] = self._value
        self._field, self._value = b"", b""

    def _headers_finished(self) -> None:
        _, params = parse_options_header(self._headers.get(b"content-disposition", b""))
        self._keep = params.get(b"name") == FIELD.encode()
        field_name = params.get(b"name") or b""
        self._name = clean_filename(field_name, 0)[:50] if field_name else "(unnamed)"
        if not self._keep:
            return
        if len(self.uploads) >= self.max_files:
            raise UploadRejected(413, f"too many files: at most {self.max_files} per request")
        self._name = clean_filename(params.get(b"filename", b""), len(self.uploads))

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        self._size += end - start
        if not self._keep:
            if self._size > self.max_field_bytes:  # refused early: a text field is small
                raise UploadRejected(
                    413,
                    f"form field {self._name}: too large (limit "
                    f"{human_bytes(self.max_field_bytes)} for fields that are not '{FIELD}')",
                )
            return
        if self._size > self.max_file_bytes:
            raise UploadRejected(
                413,
                f"{self._name}: file too large (limit {human_bytes(self.max_file_bytes)} per file)",
            )
        self._chunks.append(data[start:end])

    def _part_end(self) -> None:
        if self._keep:
            self.uploads.append(Upload(self._name, b"".join(self._chunks)))
        self._chunks = []


def _boundary(content_type: str) -> bytes:
    kind, params = parse_options_header(content_type)
    if kind != b"multipart/form-data":
        got = kind.decode("latin-1") or "no content type"
        raise UploadRejected(
            415, f"send images as multipart/form-data in the field '{FIELD}' (got {got})"
        )
    boundary = params.get(b"boundary")
    if not boundary:
        raise UploadRejected(400, "multipart/form-data request without a boundary")
    if len(boundary) > MAX_BOUNDARY:
        raise UploadRejected(
            400, f"multipart boundary is longer than {MAX_BOUNDARY} characters (RFC 2046)"
        )
    if not _BCHARS.match(boundary):
        raise UploadRejected(400, "multipart boundary has characters RFC 2046 does not allow")
    return boundary


def _check_declared_length(value: str | None, max_request_bytes: int) -> None:
    if value is None:
        return
    try:
        declared = int(value)
    except ValueError:
        raise UploadRejected(400, "Content-Length is not a number") from None
    if declared < 0:
        raise UploadRejected(400, "Content-Length is negative")
    if declared > max_request_bytes:
        raise UploadRejected(
            413,
            f"request too large ({human_bytes(declared)}; limit {human_bytes(max_request_bytes)})",
        )


async def _chunks(
    body: AsyncIterator[bytes], stall_s: float | None, total_s: float | None
) -> AsyncIterator[bytes]:
    """`body`, refused with 408 when a chunk takes over `stall_s` or the whole over `total_s`
    (a half-sent body must not hold a connection and its memory forever)."""
    if stall_s is None and total_s is None:
        async for chunk in body:
            yield chunk
        return
    loop = asyncio.get_running_loop()
    deadline = loop.time() + (total_s if total_s is not None else float("inf"))
    it = body.__aiter__()
    while True:
        left = deadline - loop.time()
        wait = left if stall_s is None else min(stall_s, left)
        if wait <= 0:
            raise UploadRejected(408, f"upload not finished within {total_s:g} s")
        try:
            chunk = await asyncio.wait_for(it.__anext__(), wait)
        except StopAsyncIteration:
            return
        except asyncio.TimeoutError:
            if stall_s is not None and wait >= stall_s:
                raise UploadRejected(408, f"upload stalled: no data for {stall_s:g} s") from None
            raise UploadRejected(408, f"upload not finished within {total_s:g} s") from None
        yield chunk


async def read_uploads(
    content_type: str,
    content_length: str | None,
    body: AsyncIterator[bytes],
    *,
    max_file_bytes: int,
    max_request_bytes: int,
    max_files: int,
    max_field_bytes: int = 64 * 1024,
    max_part_header_bytes: int = 16 * 1024,
    body_timeout_s: float | None = None,
    upload_timeout_s: float | None = None,
) -> list[Upload]:
    """Parse the files of a multipart body stream; raises UploadRejected on any violation."""
    boundary = _boundary(content_type)
    _check_declared_length(content_length, max_request_bytes)
    collector = _Collector(max_file_bytes, max_files, max_field_bytes, max_part_header_bytes)
    parser = MultipartParser(boundary, collector.callbacks())  # type: ignore[arg-type]
    total = 0
    try:
        async for chunk in _chunks(body, body_timeout_s, upload_timeout_s):
            total += len(chunk)
            if total > max_request_bytes:
                raise UploadRejected(
                    413, f"request too large (limit {human_bytes(max_request_bytes)})"
                )
            parser.write(chunk)
    except MultipartParseError as exc:
        raise UploadRejected(400, f"malformed multipart body ({_one_line(exc)})") from None
    if parser.state != MultipartState.END:
        raise UploadRejected(400, "incomplete multipart body (no closing boundary)")
    if not collector.uploads:
        raise UploadRejected(400, f"no files: send images in the multipart field '{FIELD}'")
    return collector.uploads


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200] or type(exc).__name__


def upload_body(field: dict[str, object]) -> dict[str, object]:
    """OpenAPI `requestBody` of a multipart upload whose `files` field is `field` (FastAPI
    cannot infer it: the body is streamed by `read_uploads`, not declared as a parameter)."""
    schema = {"type": "object", "required": [FIELD], "properties": {FIELD: field}}
    return {
        "requestBody": {
            "required": True,
            "content": {"multipart/form-data": {"schema": schema}},
        }
    }
