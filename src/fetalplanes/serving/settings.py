"""Server settings: limits and concurrency, validated once so a bad flag fails at start-up."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fetalplanes.errors import FetalPlanesError

MB = 1024 * 1024
_AT_LEAST_ONE = ("max_file_bytes", "max_request_bytes", "max_files", "max_concurrency", "max_batch")


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

    def __post_init__(self) -> None:
        for name in _AT_LEAST_ONE:
            if getattr(self, name) < 1:
                raise FetalPlanesError(f"serve setting {name} must be at least 1")
        if self.batch_window_ms < 0:
            raise FetalPlanesError("serve setting batch_window_ms must not be negative")
        if not 0 <= self.port <= 65535:
            raise FetalPlanesError(f"port {self.port} is outside 0-65535")

    @classmethod
    def from_mb(
        cls, max_file_mb: float = 20, max_request_mb: float = 200, **kw: Any
    ) -> ServeSettings:
        """Settings with the size limits given in MiB, as on the command line."""
        return cls(
            max_file_bytes=int(max_file_mb * MB), max_request_bytes=int(max_request_mb * MB), **kw
        )
