"""WebSocket `/api/v1/live`: plane recognition on live video, one JSON answer per frame.

The client (the page's Live panel, `tools/live_bench.py`, any program) sends frames as
binary messages, each one JPEG or PNG image; the server answers every frame it processed
with one JSON message (docs/live.md has the protocol). Why it works this way:

- **Latest wins.** Each connection has a slot holding only the newest frame not yet
  processed: a frame that arrives while the model is busy replaces the waiting one, and the
  replaced frame is counted as dropped (reported in every message). Nothing is queued
  without bound, so the answer is never more than one frame behind the camera.
- **One engine, shared.** Frames become items (`Item(data=...)`) that go through the app's
  micro-batcher into `PredictService.run_items`, the engine under the decode-memory budget,
  like every upload: connections share the model with each other and with other requests.
  Results go into `workflows.live.LiveSession`, the scan's own incremental timeline.
- **Limits per connection:** a frame's size (`max_live_frame_bytes`; over it the
  connection is closed with 1009), frames per second (`max_live_fps`; frames above the
  rate are dropped unread, counted as `over_rate`), and connections at once
  (`max_live_connections`; over it, 1013). The Host allow-list applies to the handshake
  (`hosts.HostGuard`), and a browser's `Origin` must name an allowed host too, so another
  web site cannot drive the model through a visitor's browser.
- **Nothing stored.** Frames live in memory until their answer is sent; the session's
  best frames are the client's to keep (it sent them: answers name frames by `seq`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from starlette.websockets import WebSocketState

from fetalplanes.data.formats import HEAD_BYTES, image_format
from fetalplanes.data.items import frame_name
from fetalplanes.data.sources import Item
from fetalplanes.inference.predictor import Predictor
from fetalplanes.inference.results import NOT_TARGET, Prediction
from fetalplanes.serving.batching import MicroBatcher
from fetalplanes.serving.explainer import one_line
from fetalplanes.serving.hosts import host_name
from fetalplanes.serving.settings import ServeSettings
from fetalplanes.workflows.checklist import (
    DEFAULT_CHECKLIST,
    Checklist,
    builtin_checklists,
    load_checklist,
)
from fetalplanes.workflows.live import LIVE_SOURCE, LiveSession, LiveUpdate
from fetalplanes.workflows.scan import DEFAULT_WINDOW, TimelineRow

LIVE = "/api/v1/live"
log = logging.getLogger("fetalplanes.serve")
MAX_WINDOW = 101
#: WebSocket close codes (RFC 6455 7.4.1)
NORMAL, POLICY, TOO_BIG, FAILED, TRY_LATER = 1000, 1008, 1009, 1011, 1013
#: What a live frame may be: one still image (never a video or DICOM: one frame, one decode)
FRAME_FORMATS = ("JPEG", "PNG", "WEBP")


class _Service(Protocol):
    """What the live endpoint needs of the app's `PredictService`."""

    predictor: Predictor
    settings: ServeSettings
    batcher: MicroBatcher[Item, Prediction]


@dataclass
class Frame:
    """A received frame waiting for the model."""

    seq: int
    data: bytes = field(repr=False)
    received: float  # time.perf_counter() when it arrived


class FrameSlot:
    """The newest unprocessed frame of one connection; `put` replaces (and counts as
    dropped) a frame still waiting."""

    def __init__(self) -> None:
        self._frame: Frame | None = None
        self._ready = asyncio.Event()
        self._closed = False
        self.dropped = 0

    def put(self, frame: Frame) -> None:
        if self._frame is not None:
            self.dropped += 1
        self._frame = frame
        self._ready.set()

    def close(self) -> None:
        """No more frames: `take` returns the waiting one, then None."""
        self._closed = True
        self._ready.set()

    def take_nowait(self) -> Frame | None:
        """The waiting frame, if any (claimed before an answer is sent: a frame arriving
        meanwhile then waits instead of replacing it)."""
        frame, self._frame = self._frame, None
        return frame

    async def take(self) -> Frame | None:
        while self._frame is None:
            if self._closed:
                return None
            self._ready.clear()
            await self._ready.wait()
        frame, self._frame = self._frame, None
        return frame


class RateLimit:
    """Token bucket: `rate` frames per second sustained, bursts of up to one second's."""

    def __init__(self, rate: float):
        self.rate = rate
        self.capacity = max(1.0, rate)
        self.tokens = self.capacity
        self.last = time.monotonic()

    def allow(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


@dataclass
class Counters:
    received: int = 0  # binary messages received (the next frame's seq)
    processed: int = 0  # frames answered
    over_rate: int = 0  # frames above max_live_fps, dropped unread

    def to_dict(self, slot: FrameSlot) -> dict[str, int]:
        return {"received": self.received, "processed": self.processed,
                "dropped": slot.dropped, "over_rate": self.over_rate}


class LiveError(Exception):
    """A session that cannot start or go on: close code and one-line reason."""

    def __init__(self, code: int, detail: str):
        super().__init__(detail)
        self.code, self.detail = code, detail


# ------------------------------------------------------------------ messages
def smoothed_dict(row: TimelineRow) -> dict[str, Any]:
    """A final timeline row as the live messages carry it: which frame (`seq`), its time
    and its smoothed label (the frame's own result came in that frame's message)."""
    return {"seq": row.frame, "time_s": round(row.time_s, 6), **row.to_dict()["smoothed"]}


def frame_message(update: LiveUpdate, seq: int, latency_ms: float,
                  counts: dict[str, int]) -> dict[str, Any]:
    """The answer to one frame (docs/live.md): its own result, the smoothed row that became
    final with it (or null), best-frame and checklist changes when there are any."""
    pred = update.prediction
    assert pred is not None
    own = {k: v for k, v in pred.to_dict().items() if k != "path"}
    msg: dict[str, Any] = {"type": "frame", "seq": seq, **own,
                           "latency_ms": round(latency_ms, 2), **counts,
                           "smoothed": smoothed_dict(update.rows[-1]) if update.rows else None}
    if update.best:
        msg["best"] = [b.to_dict() for b in update.best]
    if update.checklist is not None:
        msg["checklist"] = update.checklist.to_dict()
    return msg


def end_message(session: LiveSession, update: LiveUpdate, counts: dict[str, int]
                ) -> dict[str, Any]:
    """The answer to `stop`: the last rows made final, all best frames and segments."""
    checklist = session.checklist()
    return {"type": "end", **counts, "final": [smoothed_dict(r) for r in update.rows],
            "best": [b.to_dict() for b in session.best.values()],
            "segments": [s.to_dict() for s in session.segments],
            "checklist": None if checklist is None else checklist.to_dict()}


# ------------------------------------------------------------------ checks
def origin_allowed(origin: str | None, names: frozenset[str]) -> bool:
    """No Origin (a program, not a browser), or a browser page served by an allowed host."""
    if origin is None:
        return True
    try:
        parts = urlsplit(origin)
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and host_name(parts.netloc) in names


def choose_checklist(predictor: Predictor, name: str | None) -> Checklist | None:
    """A shipped checklist by name ('none': no checklist); by default the first shipped one
    this model's views can fill (ISUOG for a views13 model, seed4-planes for four planes).
    Only shipped names: a client never names a file on the server."""
    views = set(predictor.output_classes) - {NOT_TARGET}
    shipped = builtin_checklists()
    if name == "none":
        return None
    if name is not None:
        if name not in shipped:
            raise LiveError(POLICY, f"unknown checklist {name[:40]!r}; choose "
                                    f"{', '.join(shipped)} or none")
        return load_checklist(name)
    order = [DEFAULT_CHECKLIST, *(n for n in shipped if n != DEFAULT_CHECKLIST)]
    for n in order:
        checklist = load_checklist(n)
        if views & set(checklist.views):
            return checklist
    return None


def parse_window(text: str | None) -> int:
    try:
        window = DEFAULT_WINDOW if text is None else int(text)
    except ValueError:
        raise LiveError(POLICY, "window must be an odd whole number of frames") from None
    if not 1 <= window <= MAX_WINDOW or window % 2 == 0:
        raise LiveError(POLICY, f"window must be odd, 1-{MAX_WINDOW} (got {window})")
    return window


# ------------------------------------------------------------------ the session
class Connection:
    """One client: receives frames into the slot, processes the newest, answers."""

    def __init__(self, ws: WebSocket, service: _Service, session: LiveSession):
        self.ws, self.service, self.session = ws, service, session
        self.settings = service.settings
        self.slot = FrameSlot()
        self.rate = RateLimit(self.settings.max_live_fps)
        self.counters = Counters()
        self.start: float | None = None
        self._send_lock = asyncio.Lock()

    def counts(self) -> dict[str, int]:
        return self.counters.to_dict(self.slot)

    async def send(self, msg: dict[str, Any]) -> None:
        async with self._send_lock:
            await self.ws.send_text(json.dumps(msg, allow_nan=False))

    async def run(self) -> None:
        worker = asyncio.create_task(self.process())
        try:
            while await self.receive_one(worker):
                pass
        finally:
            self.slot.close()
            if not worker.done():
                worker.cancel()
            await asyncio.gather(worker, return_exceptions=True)

    async def receive_one(self, worker: asyncio.Task[None]) -> bool:
        """Handle one message from the client; False when the session is over."""
        message = await self.ws.receive()
        if message["type"] == "websocket.disconnect":
            return False
        data = message.get("bytes")
        if data is not None:
            problem = self.frame(data)
            if problem is not None:
                await self.send({"type": "error", "seq": self.counters.received - 1,
                                 "detail": problem})
            await asyncio.sleep(0)  # an idle worker takes this frame before the next is read
            return True
        return await self.command(message.get("text") or "", worker)

    def frame(self, data: bytes) -> str | None:
        """Put a received frame into the slot; why it was refused, if it was."""
        seq = self.counters.received
        self.counters.received += 1
        limit = self.settings.max_live_frame_bytes
        if len(data) > limit:
            raise LiveError(TOO_BIG, f"frame {seq} is {len(data)} bytes, over this server's "
                                     f"limit of {limit} bytes per frame")
        if not self.rate.allow():
            self.counters.over_rate += 1
            return None
        if image_format(data[:HEAD_BYTES]) not in FRAME_FORMATS:
            return f"frame {seq} is not a JPEG, PNG or WebP image"
        now = time.perf_counter()
        if self.start is None:
            self.start = now
        self.slot.put(Frame(seq, data, now))
        return None

    async def command(self, text: str, worker: asyncio.Task[None]) -> bool:
        try:
            kind = json.loads(text).get("type")
        except (ValueError, AttributeError):
            kind = None
        if kind == "stats":
            await self.send({"type": "stats", **self.counts()})
            return True
        if kind == "stop":
            self.slot.close()  # the waiting frame is still answered
            await worker
            if self.ws.application_state != WebSocketState.CONNECTED:
                return False  # the worker failed and closed the session
            update = self.session.finish()
            await self.send(end_message(self.session, update, self.counts()))
            await self.ws.close(NORMAL)
            return False
        await self.send({"type": "error", "detail": "unknown message; send frames as binary "
                                                    "messages, or {\"type\": \"stats\"} or "
                                                    "{\"type\": \"stop\"}"})
        return True

    async def process(self) -> None:
        try:
            await self._process()
        except (WebSocketDisconnect, OSError):  # the client left while being answered
            return
        except Exception as exc:  # the model failed: say so and end this session
            log.error("live session failed: %s", one_line(exc))
            await _refuse(self.ws, LiveError(FAILED, "internal server error; see the server "
                                                     "log"))

    async def _process(self) -> None:
        frame = await self.slot.take()
        while frame is not None:
            assert self.start is not None
            item = Item(frame_name(LIVE_SOURCE, frame.seq), frame.seq,
                        frame.received - self.start, data=frame.data)
            frame.data = b""  # the item holds the bytes now (kept only as a best frame)
            [pred] = await self.service.batcher.submit([item])
            update = self.session.push(item, pred)
            self.counters.processed += 1
            latency = (time.perf_counter() - frame.received) * 1000
            message = frame_message(update, frame.seq, latency, self.counts())
            waiting = self.slot.take_nowait()  # a client that waits for answers drops nothing
            await self.send(message)
            frame = waiting if waiting is not None else await self.slot.take()


def live_router(service: _Service) -> APIRouter:
    """The live endpoint, sharing the app's model, batcher and decode budget."""
    router = APIRouter()
    active = {"n": 0}

    @router.websocket(LIVE)
    async def live(ws: WebSocket) -> None:
        """Frames in (binary JPEG/PNG), one JSON answer per processed frame out."""
        settings = service.settings
        if not origin_allowed(ws.headers.get("origin"), settings.host_names()):
            await ws.close(POLICY, "Origin is not an allowed host of this server")
            return
        await ws.accept()
        if active["n"] >= settings.max_live_connections:
            await _refuse(ws, LiveError(TRY_LATER, f"server busy: {active['n']} live sessions "
                                                   f"(limit {settings.max_live_connections})"))
            return
        active["n"] += 1
        try:
            window = parse_window(ws.query_params.get("window"))
            checklist = choose_checklist(service.predictor, ws.query_params.get("checklist"))
            session = LiveSession.for_predictor(service.predictor, window=window,
                                                checklist=checklist)
            connection = Connection(ws, service, session)
            tally = session.checklist()
            await connection.send({
                "type": "start", "classes": service.predictor.output_classes,
                "window": window, "lag_frames": window // 2,
                "checklist": None if tally is None else tally.to_dict(),
                "limits": {"max_frame_bytes": settings.max_live_frame_bytes,
                           "max_fps": settings.max_live_fps}})
            await connection.run()
        except LiveError as exc:
            await _refuse(ws, exc)
        except WebSocketDisconnect:
            pass
        finally:
            active["n"] -= 1

    return router


async def _refuse(ws: WebSocket, exc: LiveError) -> None:
    """Say why in a message (a browser cannot read a close reason it did not expect), then
    close with the code."""
    if ws.application_state != WebSocketState.CONNECTED:
        return
    try:
        await ws.send_text(json.dumps({"type": "error", "detail": exc.detail}))
        await ws.close(exc.code, exc.detail.encode()[:120].decode(errors="ignore"))
    except (WebSocketDisconnect, RuntimeError):
        pass
