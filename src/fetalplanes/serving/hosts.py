"""Host-header allow-list: the DNS-rebinding defence of a server without authentication.

A web page on another site can make the browser send requests to a name that its
attacker later points at 127.0.0.1; the browser then treats the answers as same-origin.
Such requests carry the attacker's name in `Host`, so answering only the names this
server is meant to be reached by (loopback ones by default, `--allow-host` adds more)
closes that door. WebSocket handshakes (`/api/v1/live`) are checked the same way and
refused (close code 1008, which uvicorn answers with HTTP 403) before the app sees them.
Pure ASGI (no body buffering); other scope types (lifespan) pass through.
"""

from __future__ import annotations

import re

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocketClose

_PORT = re.compile(r"^:[0-9]{1,5}$")


def host_name(header: str) -> str | None:
    """The name part of a Host header, lower case, without port or one trailing dot;
    None when the header is not a well-formed host[:port]."""
    value = header.strip().lower()
    if value.startswith("["):  # IPv6 literal: [::1]:8000
        end = value.find("]")
        if end < 0:
            return None
        name, rest = value[: end + 1], value[end + 1 :]
    else:
        name, _, port = value.partition(":")
        rest = f":{port}" if _ else ""
    if rest and not _PORT.match(rest):
        return None
    name = name.removesuffix(".")
    return name or None


def _shown(header: str) -> str:
    """The Host value as echoed in the error: printable and short (it is the client's text)."""
    text = "".join(c for c in header if c.isprintable())[:100]
    return text or "(empty)"


class HostGuard:
    """Answer 400 to HTTP requests, and refuse WebSocket handshakes, whose Host header is
    not one of `names`."""

    def __init__(self, app: ASGIApp, names: frozenset[str]):
        self.app = app
        self.names = frozenset(n.lower() for n in names)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        raw = next((v for k, v in scope["headers"] if k == b"host"), None)
        header = raw.decode("latin-1") if raw is not None else ""
        if host_name(header) in self.names:
            await self.app(scope, receive, send)
            return
        detail = (
            f"Host {_shown(header)} is not allowed: this server answers to "
            f"{', '.join(sorted(self.names))} (start it with --allow-host NAME to add a name)"
        )
        if scope["type"] == "websocket":
            await receive()  # websocket.connect; closing now refuses the handshake
            reason = f"Host {_shown(header)[:40]} is not allowed"
            await WebSocketClose(code=1008, reason=reason)(scope, receive, send)
            return
        await JSONResponse({"detail": detail}, status_code=400)(scope, receive, send)
