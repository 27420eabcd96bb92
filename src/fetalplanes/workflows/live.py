"""Live plane recognition: one frame at a time from a camera, a capture card or a stream.

Why it works this way:

- **The scan sink, unchanged.** A live session is a scan whose frames arrive one by one:
  each result goes into `workflows.scan.Timeline`, the same incremental sink `scan` uses,
  so a frame gets the same own result, smoothed label, segments and best frames as in a
  scan of the same frames (tests/test_live.py checks this against `scan`).
- **The centred window, reported late.** The smoothed label of frame N needs the frames
  up to N + window // 2, so the update for frame N carries frame N's own result at once and
  the smoothed row that became final with it: that of frame N - window // 2 (with its own
  frame number). With the default window of 5 frames at 15 fps that is 133 ms late.
  `window=1` gives the smoothed label of the frame itself (no smoothing). docs/live.md.
- **Constant memory.** Rows are handed out, not kept; only the window, the open segment's
  best item, one best item per plane and the checklist's per-item tallies are held.
- **Transport apart.** This module does not know where frames come from or how the
  updates travel (the WebSocket endpoint in `serving/live.py`, the terminal view of
  `fetalplanes scan --live`); both call `LiveSession.push` with the engine's results.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import closing
from dataclasses import dataclass, field
from typing import Any

from fetalplanes.data.sources import Item
from fetalplanes.inference.predictor import Predictor, Result
from fetalplanes.inference.results import NOT_TARGET, Prediction
from fetalplanes.workflows.checklist import (
    Checklist,
    ChecklistResult,
    ChecklistTally,
    Observation,
)
from fetalplanes.workflows.scan import DEFAULT_WINDOW, BestFrame, Segment, Timeline, TimelineRow

LIVE_SOURCE = "live"
"""The source name of live observations in the checklist."""


@dataclass
class LiveUpdate:
    """What one frame changed: its own result, the timeline rows that became final, the
    planes whose best frame changed, and the checklist when an item became present. The
    update that ends a session has no frame (`item`, `prediction` None)."""

    item: Item | None
    prediction: Prediction | None
    rows: list[TimelineRow] = field(default_factory=list)
    best: list[BestFrame] = field(default_factory=list)
    checklist: ChecklistResult | None = None


def observation(row: TimelineRow, source: str = LIVE_SOURCE) -> Observation:
    """A final timeline row as a checklist observation (as `fetalplanes audit` makes them
    from a recording's rows)."""
    return Observation(source, row.label,
                       float(row.prediction.probs.get(row.label, row.confidence)),
                       frame=row.frame, time_s=row.time_s, not_target=row.not_target,
                       uncertain=row.uncertain, frame_rejected=row.prediction.not_target)


class LiveSession:
    """One live session's state: the timeline, the best frames reported so far and the
    checklist being filled."""

    def __init__(self, classes: list[str], min_confidence: float, *,
                 window: int = DEFAULT_WINDOW, checklist: Checklist | None = None,
                 fps: float = 25.0):
        self.timeline = Timeline(classes, min_confidence, window=window, fps=fps,
                                 keep_rows=False)
        views = [c for c in classes if c != NOT_TARGET]
        self.tally = None if checklist is None else ChecklistTally(checklist, views)
        self._reported: dict[str, tuple[int, float]] = {}  # plane -> (frame, confidence)
        self.last_row: TimelineRow | None = None

    @classmethod
    def for_predictor(cls, predictor: Predictor, **kw: Any) -> LiveSession:
        return cls(predictor.output_classes, predictor.min_confidence, **kw)

    def push(self, item: Item, pred: Prediction) -> LiveUpdate:
        """The engine's result of the next frame -> what changed."""
        return self._update(item, pred, self.timeline.push(item, pred))

    def finish(self) -> LiveUpdate:
        """End of the session: the rows still inside the window, final."""
        return self._update(None, None, self.timeline.flush())

    def _update(self, item: Item | None, pred: Prediction | None,
                rows: list[TimelineRow]) -> LiveUpdate:
        update = LiveUpdate(item, pred, rows)
        changed = False
        for row in rows:
            self.last_row = row
            if self.tally is not None:
                changed |= self.tally.add(observation(row))
        if changed and self.tally is not None:
            update.checklist = self.tally.result()
        if rows:
            update.best = self._best_changes()
        return update

    def _best_changes(self) -> list[BestFrame]:
        out = []
        for plane, best in self.timeline.best.items():
            key = (best.frame, best.confidence)
            if self._reported.get(plane) != key:
                self._reported[plane] = key
                out.append(best)
        return out

    @property
    def best(self) -> dict[str, BestFrame]:
        return self.timeline.best

    @property
    def segments(self) -> list[Segment]:
        return self.timeline.segments

    def checklist(self) -> ChecklistResult | None:
        return None if self.tally is None else self.tally.result()


def stream_live(predictor: Predictor, items: Iterable[Item], session: LiveSession,
                on_update: Callable[[LiveUpdate], None]) -> None:
    """Live frames through the engine (`Predictor.stream`, in this process, one frame per
    network call: the lowest latency) into `session`; `on_update` sees every frame's
    update, and the final one when the items end (a stop, the duration, the stream's end)."""
    stream: Iterator[Result] = predictor.stream(items, batch_size=1, workers=0, desc="live")
    with closing(stream):
        for result in stream:
            on_update(session.push(result.item, result.prediction))
    on_update(session.finish())
