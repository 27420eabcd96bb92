"""Request framing and head size: refuse what lets one request hide another.

Why: a request carrying both `Content-Length` and `Transfer-Encoding` is read one way by
this server (chunked, RFC 9112 6.3) and may be read the other way by a proxy in front of it,
so a second, smuggled request rides inside the first body. Such requests, and ones with
several differing `Content-Length` values, are answered 400 and the connection is closed,
so nothing after them on the connection is ever parsed. h11 bounds only *incomplete* heads;
a head that arrives whole in one read can be larger, so the head size is checked here too
(431). Pure ASGI, before any other middleware; other scope types pass through.
"""

from __future__ import annotations

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send


def head_bytes(scope: Scope) -> int:
    """Bytes of the request line and headers as sent (to within the separators)."""
    line = len(scope.get("method", "")) + len(scope.get("raw_path") or b"") + 12
    query = scope.get("query_string") or b""
    line += len(query) + 1 if query else 0
    return line + sum(len(k) + len(v) + 4 for k, v in scope.get("headers", [])) + 2


def framing_problem(scope: Scope) -> str | None:
    """Why the body framing of this request is ambiguous, or None when it is not."""
    lengths = {v.strip() for k, v in scope.get("headers", []) if k.lower() == b"content-length"}
    chunked = any(k.lower() == b"transfer-encoding" for k, _ in scope.get("headers", []))
    if lengths and chunked:
        return "request has both Content-Length and Transfer-Encoding (refused: ambiguous framing)"
    if len(lengths) > 1:
        return "request has conflicting Content-Length headers"
    return None


class RequestGuard:
    """400 for ambiguous framing, 431 for a request head over `max_head_bytes`; both close
    the connection (the rest of what the client sent is never read)."""

    def __init__(self, app: ASGIApp, max_head_bytes: int):
        self.app = app
        self.max_head_bytes = max_head_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        problem, status = framing_problem(scope), 400
        if problem is None and head_bytes(scope) > self.max_head_bytes:
            problem = f"request head too large (limit {self.max_head_bytes // 1024} KiB)"
            status = 431
        if problem is None:
            await self.app(scope, receive, send)
            return
        response = JSONResponse({"detail": problem}, status_code=status,
                                headers={"Connection": "close"})
        await response(scope, receive, send)
