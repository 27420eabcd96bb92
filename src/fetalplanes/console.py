"""Human-facing messages on stderr, so stdout stays clean for --format json/csv.

Every helper here shows the text it is given literally and on one line: file names with
[brackets] are never markup, and control characters in them (an ESC sequence that sets the
terminal title or clears the screen, a newline that fakes a second message, DEL, C1 codes,
bidirectional overrides) are shown escaped (`\\x1b`), never sent to the terminal raw.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from typing import Any

from rich.console import Console
from rich.markup import escape

err = Console(stderr=True, highlight=False, soft_wrap=True)

#: C0 controls (tab kept), DEL, C1 controls, and the bidirectional embeddings, overrides
#: and isolates that can make a name read differently from what it is.
_CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _escaped(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def safe_text(text: str) -> str:
    """`text` safe to print on a terminal, on one line: control characters escaped as
    `\\x1b`, `\\x0a`, `\\u202e`, and undecodable bytes of a file name (kept by Python as
    surrogates) as `\\xff` instead of a UnicodeEncodeError."""
    text = str(text).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return _CONTROL.sub(_escaped, text)


def info(msg: str) -> None:
    """A message as it is: file names with [brackets] are text, never markup."""
    err.print(safe_text(msg), markup=False)


def warn(msg: str) -> None:
    err.print(f"[yellow]warning:[/yellow] {escape(safe_text(msg))}")


def report_failures(failures: list[tuple[int, str]] | list[str], limit: int = 20) -> None:
    """One line per unreadable file (first `limit`), then a count."""
    msgs = [f if isinstance(f, str) else f[1] for f in failures]
    for m in msgs[:limit]:
        err.print(f"[yellow]skipped:[/yellow] {escape(safe_text(m))}")
    if len(msgs) > limit:
        err.print(f"[yellow]... and {len(msgs) - limit} more unreadable files[/yellow]")


def plural(n: int, word: str, many: str | None = None) -> str:
    """'1 image', '2 images' (messages count things; '1 images' reads as a bug)."""
    if n == 1:
        return f"1 {word}"
    return f"{n} {many or (word + 'es' if word.endswith(('s', 'x', 'ch')) else word + 's')}"


def say(markup: str) -> None:
    """A message with rich markup written by us (no user text inside)."""
    err.print(markup)


def cli_command(*args: str) -> list[str]:
    """The command line that runs this installation's `fetalplanes` with `args`: every
    subprocess the package starts is built here (tests run each one)."""
    import sys

    return [sys.executable, "-m", "fetalplanes", *args]


class LineProgress:
    """Progress where stderr is not a terminal (CI logs, files): no carriage-return bars,
    one line when a phase ends ("classifying: 120 img in 3.2 s"), or none (`summary`)."""

    def __init__(self, iterable: Any = None, total: float | None = None, desc: str = "",
                 unit: str = "it", disable: bool = False, summary: bool = True,
                 initial: float = 0, **_: Any):
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.disable, self.summary = disable, summary
        self.n = initial
        self._start = time.perf_counter()
        self._closed = False

    def __iter__(self) -> Iterator[Any]:
        for obj in self.iterable:
            yield obj
            self.n += 1
        self.close()

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: float = 1) -> None:
        self.n += n

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        """Per-step figures are for a live bar only."""

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        self.desc = desc or self.desc

    def write(self, text: str, file: Any = None) -> None:
        info(text)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.disable or not self.summary or not self.n:
            return
        seconds = time.perf_counter() - self._start
        n, unit = (self.n / 1e6, "MB") if self.unit == "B" else (self.n, self.unit)
        rate = f" ({n / seconds:.1f} {unit}/s)" if seconds > 0 else ""
        count = f"{n:.1f}" if unit == "MB" else f"{n:.0f}"
        info(f"{self.desc or 'done'}: {count} {unit} in {seconds:.1f} s{rate}")


def progress(iterable: Any = None, *, total: float | None = None, desc: str = "",
             unit: str = "it", disable: bool = False, summary: bool = True,
             **kwargs: Any) -> Any:
    """A progress bar (tqdm) on a terminal; elsewhere a `LineProgress` (one line per phase,
    or none with `summary=False` for inner loops whose phase prints its own line)."""
    import sys

    if disable or not sys.stderr.isatty():
        return LineProgress(iterable, total, desc, unit, disable, summary, **kwargs)
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, **kwargs)
