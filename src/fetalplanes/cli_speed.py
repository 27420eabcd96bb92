"""Speed commands (export, bench, cache).

Registered on the main Typer app by `fetalplanes.cli`.
"""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add this module's commands to the CLI."""
