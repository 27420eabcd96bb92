"""Running the app with uvicorn, loopback by default."""

from __future__ import annotations

import ipaddress
import logging

from fastapi import FastAPI

from fetalplanes.serving.settings import ServeSettings


def is_loopback(host: str) -> bool:
    """True for localhost and 127.0.0.0/8 or ::1; anything else is reachable from outside."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: may resolve to a public interface


def exposure_warning(host: str) -> str | None:
    """The warning to print when binding beyond this machine, else None."""
    if is_loopback(host):
        return None
    return (
        f"warning: serving on {host} makes the app reachable from other machines; it has no "
        "authentication or TLS, and uploads may be patient images. Put it behind an "
        "authenticating HTTPS proxy, or use the default --host 127.0.0.1."
    )


def run_server(app: FastAPI, settings: ServeSettings) -> None:
    """Serve until interrupted (Ctrl-C)."""
    import uvicorn

    # python-multipart logs a warning quoting bytes of a malformed body; the client gets a 400
    logging.getLogger("python_multipart").setLevel(logging.ERROR)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        access_log=settings.access_log,
        log_level="info",
        server_header=False,
    )
