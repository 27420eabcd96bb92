"""Human-facing messages on stderr, so stdout stays clean for --format json/csv."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape

err = Console(stderr=True, highlight=False, soft_wrap=True)


def info(msg: str) -> None:
    """A message as it is: file names with [brackets] are text, never markup."""
    err.print(msg, markup=False)


def warn(msg: str) -> None:
    err.print(f"[yellow]warning:[/yellow] {escape(msg)}")


def report_failures(failures: list[tuple[int, str]] | list[str], limit: int = 20) -> None:
    """One line per unreadable file (first `limit`), then a count."""
    msgs = [f if isinstance(f, str) else f[1] for f in failures]
    for m in msgs[:limit]:
        err.print(f"[yellow]skipped:[/yellow] {escape(m)}")
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
