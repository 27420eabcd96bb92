"""`fetalplanes scan --live SOURCE`: planes named live from a capture card, camera or stream.

The frames go through the one engine (`workflows.live.stream_live`: `Predictor.stream`
in this process, one frame per call) into the scan's own timeline; the terminal shows the
current plane, speed, latency and the best frames so far (a rich live view on a terminal,
one line per second otherwise). timeline.csv is written row by row as rows become final
and best/<plane>.png when the session stops (Ctrl-C, SIGTERM, --duration, or the end of
the stream), so memory stays flat however long the session runs.
"""

from __future__ import annotations

import csv
import signal
import time
from array import array
from collections import deque
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path
from typing import IO, Any

import numpy as np
import typer

from fetalplanes.console import err, safe_text
from fetalplanes.data.sources import LiveStream, open_live
from fetalplanes.inference.predictor import Predictor
from fetalplanes.inference.results import NOT_TARGET
from fetalplanes.workflows import scan as timeline
from fetalplanes.workflows.live import LiveSession, LiveUpdate, stream_live


class LiveStats:
    """What the view shows and the summary reports: counts, speed, latency, current plane."""

    def __init__(self, stream: LiveStream, classes: list[str]):
        self.stream = stream
        self.classes = classes
        self.start = time.monotonic()
        self.processed = 0
        self.latency_ms = array("f")  # one float per frame: 90k frames an hour, 360 kB
        self.recent: deque[float] = deque(maxlen=64)  # answer times, for the current fps
        self.own = ""
        self.plane = ""

    def frame(self, update: LiveUpdate) -> None:
        assert update.item is not None and update.prediction is not None
        now = time.monotonic()
        self.processed += 1
        self.latency_ms.append(self.stream.age(update.item) * 1000)
        self.recent.append(now)
        pred = update.prediction
        self.own = (f"{pred.label} {pred.confidence:.2f}" if pred.ok
                    else f"unreadable ({pred.error})")
        if update.rows:
            row = update.rows[-1]
            self.plane = ("not a target plane" if row.not_target else
                          f"{row.label} (uncertain)" if row.uncertain else row.label)
            self.plane += f" {row.confidence:.2f}, frame {row.frame}"

    @property
    def fps(self) -> float:
        """Answers per second over the last 64 answers."""
        if len(self.recent) < 2:
            return 0.0
        span = self.recent[-1] - self.recent[0]
        return (len(self.recent) - 1) / span if span > 0 else 0.0

    def percentile(self, q: float) -> float:
        return float(np.percentile(np.frombuffer(self.latency_ms, np.float32), q)) \
            if self.processed else float("nan")

    def line(self, session: LiveSession) -> str:
        """One line: time, counts, fps, latency, the plane now, best frames so far."""
        elapsed = time.monotonic() - self.start
        last = self.latency_ms[-1] if self.processed else float("nan")
        best = ", ".join(f"{p} #{b.frame} {b.confidence:.2f}"
                         for p, b in sorted(session.best.items())) or "none yet"
        return (f"live {elapsed:6.1f} s: {self.processed} frames ({self.fps:.1f}/s), "
                f"dropped {self.stream.dropped}, latency {last:.0f} ms; "
                f"plane: {self.plane or '-'}; best: {best}")


class LiveView:
    """The terminal view: rich.live on a terminal, one line per second elsewhere, none
    with --quiet."""

    def __init__(self, stats: LiveStats, session: LiveSession, quiet: bool):
        self.stats, self.session, self.quiet = stats, session, quiet
        self.tty = err.is_terminal
        self._live: Any = None
        self._shown = 0.0

    def __enter__(self) -> LiveView:
        if self.tty and not self.quiet:
            from rich.live import Live

            self._live = Live(self._table(), console=err, refresh_per_second=4,
                              transient=False)
            self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.update(self._table())
            self._live.__exit__(None, None, None)

    def update(self) -> None:
        now = time.monotonic()
        if self.quiet or now - self._shown < (0.25 if self.tty else 1.0):
            return
        self._shown = now
        if self._live is not None:
            self._live.update(self._table())
        else:
            err.print(safe_text(self.stats.line(self.session)), markup=False, highlight=False)

    def _table(self) -> Any:
        from rich.table import Table
        from rich.text import Text

        s = self.stats
        table = Table(title="fetalplanes live (Ctrl-C stops and writes the results)",
                      show_header=False, title_justify="left")
        table.add_column(style="bold")
        table.add_column()
        last = s.latency_ms[-1] if s.processed else float("nan")
        table.add_row("plane", Text(s.plane or "-"))
        table.add_row("this frame", Text(s.own or "-"))
        table.add_row("speed", f"{s.fps:.1f} frames/s, latency {last:.0f} ms")
        table.add_row("frames", f"{s.stream.received} received, {s.processed} classified, "
                                f"{s.stream.dropped} dropped")
        for plane in [c for c in s.classes if c != NOT_TARGET]:
            b = self.session.best.get(plane)
            table.add_row(Text(plane), "not seen yet" if b is None else
                          f"best frame {b.frame} at {b.time_s:.1f} s ({b.confidence:.3f})")
        return table


@contextmanager
def stop_on_signals(stream: LiveStream) -> Any:
    """Ctrl-C and SIGTERM end the session cleanly (results written); a second Ctrl-C
    interrupts at once."""
    previous = {}

    def handler(signum: int, _frame: Any) -> None:
        if stream.stopping and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stream.stop()

    for sig in (signal.SIGINT, signal.SIGTERM):
        with suppress(ValueError):  # not the main thread (tests): the caller stops the stream
            previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def run_live(predictor: Predictor, spec: str, folder_for: Any, *, window: int,
             duration_s: float | None, timeout_s: float, quiet: bool) -> None:
    """Open SOURCE, classify it live until stopped, write timeline.csv and best/ into the
    folder `folder_for()` makes, and print the summary."""
    if not quiet:
        err.print(safe_text(f"live: opening {spec} (waiting up to {timeout_s:g} s)"),
                  markup=False, highlight=False)
    stream = open_live(spec, duration_s=duration_s, timeout_s=timeout_s)
    folder: Path = folder_for()
    classes = predictor.output_classes
    session = LiveSession.for_predictor(predictor, window=window, fps=stream.fps)
    stats = LiveStats(stream, classes)
    with ExitStack() as stack:
        f: IO[str] = stack.enter_context((folder / "timeline.csv").open(
            "w", newline="", encoding="utf-8"))
        writer = csv.DictWriter(f, timeline.timeline_columns(classes))
        writer.writeheader()
        view = stack.enter_context(LiveView(stats, session, quiet))
        stack.enter_context(stop_on_signals(stream))

        def on_update(update: LiveUpdate) -> None:
            if update.item is not None:
                stats.frame(update)
            for row in update.rows:
                writer.writerow(row.to_row(classes))
            view.update()

        stream_live(predictor, stream.items(), session, on_update)
    seconds = time.monotonic() - stats.start
    result = session.timeline.result(spec, "live", seconds=seconds)
    timeline.write_best_frames(result, folder / "best")
    for message in result.skipped[:20]:
        typer.secho(f"skipped: {safe_text(message)}", fg=typer.colors.YELLOW, err=True)
    for line in summary_lines(result, stats, seconds):
        typer.echo(line)
    if result.found:
        typer.echo(f"best frames: {folder / 'best'}")
    typer.echo(f"timeline: {folder / 'timeline.csv'}")


def summary_lines(result: timeline.ScanResult, stats: LiveStats, seconds: float) -> list[str]:
    stream = stats.stream
    why = f" ({stream.ended})" if stream.ended else ""
    lines = [
        f"live: {stream.received} frames received in {seconds:.1f} s{why}, "
        f"{stats.processed} classified ({stats.processed / max(seconds, 1e-9):.1f}/s), "
        f"{stream.dropped} dropped (newest kept); latency p50 {stats.percentile(50):.0f} ms, "
        f"p95 {stats.percentile(95):.0f} ms (frame received to answer)"
    ]
    for plane in result.found:
        spans = ", ".join(f"{s.start_s:.2f}-{s.end_s:.2f} s (frames {s.start}-{s.end})"
                          for s in result.segments if s.plane == plane)
        b = result.best[plane]
        lines.append(f"found {plane}: {spans}; best frame {b.frame} at {b.time_s:.2f} s, "
                     f"confidence {b.confidence:.3f}")
    lines.append("missing: " + (", ".join(result.missing) if result.missing else "none"))
    return lines
