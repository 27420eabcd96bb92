"""Command line: a thin Typer layer over the Python API (`fetalplanes --help`)."""

from fetalplanes.cli.main import app

__all__ = ["app"]
