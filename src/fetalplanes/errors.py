"""Exception types: every user-facing error carries a one-line message naming the culprit."""

from __future__ import annotations


class FetalPlanesError(Exception):
    """Base class for errors the CLI prints as one line (no traceback)."""


class ImageError(FetalPlanesError):
    """An image file is missing, empty, truncated, not an image, or too large."""


class LabelFileError(FetalPlanesError):
    """A label file has the wrong columns, unknown planes or cannot be parsed."""


class CheckpointError(FetalPlanesError):
    """A run folder or weight file is missing, incomplete or inconsistent."""


class NoInputError(FetalPlanesError):
    """Nothing to work on: no images, frames or files where the user pointed (exit 1, like
    a run in which nothing could be read)."""

    exit_code = 1
