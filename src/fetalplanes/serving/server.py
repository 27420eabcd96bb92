"""Running the app with uvicorn, loopback by default, with limits on slow clients.

Uvicorn's h11 protocol arms its keep-alive timer only after a response, and any byte
received disarms it, so a client sending half a request head (slow loris) holds a
connection forever. `head_timeout_protocol` closes a connection that has no request
in progress and has not sent a complete request head within `header_timeout_s`.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import socket
from typing import Any

from starlette.types import ASGIApp

from fetalplanes.errors import FetalPlanesError
from fetalplanes.serving.framing import RequestGuard
from fetalplanes.serving.hosts import HostGuard
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
    names = (
        " Requests must name this machine as given with --allow-host NAME (other Host "
        "headers get 400)."
        if host.strip("[]") in ("0.0.0.0", "::", "")
        else ""
    )
    return (
        f"warning: serving on {host} makes the app reachable from other machines; it has no "
        "authentication or TLS, and uploads may be patient images. Put it behind an "
        "authenticating HTTPS proxy, or use the default --host 127.0.0.1." + names
    )


def head_timeout_protocol(header_timeout_s: float) -> type[asyncio.Protocol]:
    """Uvicorn's h11 protocol, closing connections whose request head does not arrive in
    `header_timeout_s` (counted from the connection, or from the end of the last response)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeadTimeoutH11(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self._busy():
                self._disarm()

        def handle_websocket_upgrade(self, event: Any) -> None:
            self._disarm()  # the connection is the WebSocket protocol's from here on
            super().handle_websocket_upgrade(event)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and not self._busy():
                self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _busy(self) -> bool:
            return self.cycle is not None and not self.cycle.response_complete

        def _arm(self) -> None:
            self._disarm()
            self._head_timer = self.loop.call_later(header_timeout_s, self._expire)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _expire(self) -> None:
            self._head_timer = None
            if not self._busy() and not self.transport.is_closing():
                self.transport.close()

    return HeadTimeoutH11


def guarded(app: ASGIApp, settings: ServeSettings) -> ASGIApp:
    """The app as `run_server` serves it: framing and head size checked first, then the
    Host allow-list."""
    return RequestGuard(HostGuard(app, settings.host_names()), settings.max_header_bytes)


def uvicorn_options(settings: ServeSettings) -> dict[str, Any]:
    """Keyword arguments for `uvicorn.run`/`uvicorn.Config`: address, privacy, and the
    timeouts and header limit that stop slow or oversized request heads."""
    return dict(
        host=settings.host,
        port=settings.port,
        access_log=settings.access_log,
        log_level="info",
        server_header=False,
        http=head_timeout_protocol(settings.header_timeout_s),
        timeout_keep_alive=settings.keep_alive_s,
        h11_max_incomplete_event_size=settings.max_header_bytes,
        # a live frame larger than this is refused by the protocol (close 1009), unbuffered
        ws_max_size=settings.max_live_frame_bytes + 1024,
        ws_max_queue=4,  # messages buffered ahead of the app; the app keeps only the newest
    )


def bind(settings: ServeSettings) -> socket.socket:
    """The listening socket, bound now, so a port in use is one line before anything else
    (uvicorn would log its own error after "startup complete")."""
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((settings.host.strip("[]"), settings.port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise FetalPlanesError(
                f"port {settings.port} is in use on {settings.host}; pass --port with a free "
                "port (or stop the other server)"
            ) from None
        raise FetalPlanesError(
            f"cannot listen on {settings.host}:{settings.port} ({exc.strerror or exc})"
        ) from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def run_server(app: ASGIApp, settings: ServeSettings, sock: socket.socket | None = None) -> None:
    """Serve until interrupted (Ctrl-C), answering only the allowed Host names."""
    import uvicorn

    # python-multipart logs a warning quoting bytes of a malformed body; the client gets a 400
    logging.getLogger("python_multipart").setLevel(logging.ERROR)
    sock = sock or bind(settings)
    server = uvicorn.Server(uvicorn.Config(guarded(app, settings), **uvicorn_options(settings)))
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
