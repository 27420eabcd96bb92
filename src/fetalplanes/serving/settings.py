"""Server settings: limits and concurrency, validated once so a bad flag fails at start-up."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from fetalplanes.errors import FetalPlanesError

MB = 1024 * 1024
KB = 1024
_AT_LEAST_ONE = (
    "max_file_bytes",
    "max_request_bytes",
    "max_files",
    "max_concurrency",
    "max_batch",
    "max_field_bytes",
    "max_part_header_bytes",
    "max_header_bytes",
    "max_request_pixels",
    "max_decode_bytes",
    "max_frames",
    "max_heatmap_requests",
    "max_heatmaps_per_request",
    "max_live_frame_bytes",
    "max_live_connections",
)
_POSITIVE_SECONDS = ("header_timeout_s", "keep_alive_s", "body_timeout_s", "upload_timeout_s")
#: Names a browser on this machine uses for a loopback server (the Host header, port aside).
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")
_HOST_NAME = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9._-]+)$")
_WILDCARDS = ("0.0.0.0", "::", "[::]", "")


@dataclass(frozen=True)
class ServeSettings:
    """How the web app binds, what it accepts and how much work it runs at once."""

    host: str = "127.0.0.1"
    port: int = 8000
    max_file_bytes: int = 20 * MB  # one uploaded file
    max_request_bytes: int = 200 * MB  # the whole multipart body
    max_files: int = 500  # files in one request
    max_concurrency: int = 2  # model jobs (batches, heat maps) running at once
    max_batch: int = 8  # images gathered into one model call (bigger: throughput, not latency)
    batch_window_ms: float = 5.0  # how long a batch waits for more requests
    access_log: bool = False  # uvicorn's per-request log (client addresses); off for privacy
    # Host header names accepted besides the loopback ones (DNS-rebinding defence)
    allowed_hosts: tuple[str, ...] = ()
    max_field_bytes: int = 64 * KB  # a multipart part that is not a file (a text field)
    max_part_header_bytes: int = 16 * KB  # the headers of one multipart part
    max_header_bytes: int = 64 * KB  # HTTP request line and headers (h11's incomplete event)
    max_request_pixels: int = 128_000_000  # pixels decoded for one request, all files
    # memory that decoding may take at once, all requests together (estimated per file from
    # its header, `images.decode_cost`); a file needing more is refused
    max_decode_bytes: int = 768 * MB
    max_frames: int = 20_000  # frames of one DICOM cine or video classified by /predict
    max_heatmap_requests: int = 4  # requests computing heat maps at once (running or queued)
    max_heatmaps_per_request: int = 16  # heat maps made for one request
    # live video (WebSocket /api/v1/live): one frame's encoded size, frames accepted per
    # second per connection (more are dropped unread and counted), connections at once
    max_live_frame_bytes: int = 8 * MB
    max_live_fps: float = 60.0
    max_live_connections: int = 4
    header_timeout_s: float = 10.0  # a connection must send a whole request head in this time
    keep_alive_s: float = 5.0  # an idle keep-alive connection is closed after this
    body_timeout_s: float = 30.0  # longest pause while an upload streams in
    upload_timeout_s: float = 600.0  # longest time to receive one whole upload

    def __post_init__(self) -> None:
        for name in _AT_LEAST_ONE:
            if getattr(self, name) < 1:
                raise FetalPlanesError(f"serve setting {name} must be at least 1")
        for name in _POSITIVE_SECONDS:
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise FetalPlanesError(f"serve setting {name} must be a number of seconds > 0")
        if not (math.isfinite(self.max_live_fps) and self.max_live_fps > 0):
            raise FetalPlanesError("serve setting max_live_fps must be a number of frames > 0")
        if self.batch_window_ms < 0:
            raise FetalPlanesError("serve setting batch_window_ms must not be negative")
        if not 0 <= self.port <= 65535:
            raise FetalPlanesError(f"port {self.port} is outside 0-65535")
        for name in self.allowed_hosts:
            if not _HOST_NAME.match(name):
                raise FetalPlanesError(
                    f"--allow-host {name}: not a host name (give a name or address, no port, "
                    "scheme or path; IPv6 in brackets)"
                )

    def host_names(self) -> frozenset[str]:
        """Host header names (lower case, no port) this server answers to: the loopback
        names, the address it binds (unless a wildcard) and `allowed_hosts`."""
        names = {*LOOPBACK_HOSTS, *(h.lower() for h in self.allowed_hosts)}
        bound = self.host.lower()
        if bound not in _WILDCARDS:
            names.add(f"[{bound.strip('[]')}]" if ":" in bound else bound)
        return frozenset(names)

    @classmethod
    def from_mb(
        cls, max_file_mb: float = 20, max_request_mb: float = 200, **kw: Any
    ) -> ServeSettings:
        """Settings with the size limits given in MiB, as on the command line."""
        return cls(
            max_file_bytes=int(max_file_mb * MB), max_request_bytes=int(max_request_mb * MB), **kw
        )
