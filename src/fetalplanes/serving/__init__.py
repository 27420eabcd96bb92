"""Web app and HTTP API (`fetalplanes serve`): FastAPI app factory, settings, server.

Needs the `serve` extra (fastapi, uvicorn, python-multipart).
"""

from __future__ import annotations

from fetalplanes.serving.app import create_app
from fetalplanes.serving.server import exposure_warning, is_loopback, run_server
from fetalplanes.serving.settings import ServeSettings

__all__ = ["ServeSettings", "create_app", "exposure_warning", "is_loopback", "run_server"]
