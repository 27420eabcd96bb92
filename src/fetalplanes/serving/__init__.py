"""Web app and HTTP API (`fetalplanes serve`): FastAPI app factory, settings, server.

Needs the `serve` extra (fastapi, uvicorn, python-multipart).
"""

from __future__ import annotations

from fetalplanes.serving.app import create_app
from fetalplanes.serving.hosts import HostGuard
from fetalplanes.serving.server import exposure_warning, guarded, is_loopback, run_server
from fetalplanes.serving.settings import ServeSettings

__all__ = [
    "HostGuard",
    "ServeSettings",
    "create_app",
    "exposure_warning",
    "guarded",
    "is_loopback",
    "run_server",
]
