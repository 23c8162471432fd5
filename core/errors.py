"""Errors that name the problem and the fix.

Every error a user can trigger with bad input derives from :class:`SurgenetAssistError`, which carries a
``hint`` (what to do about it). The CLI prints ``message`` and ``hint`` without a traceback.
"""

from __future__ import annotations


class SurgenetAssistError(Exception):
    """Base class: a problem the user can fix, with the fix in ``hint``."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message if not hint else f"{message}\nFix: {hint}")
        self.message = message
        self.hint = hint


class UsageError(SurgenetAssistError, ValueError):
    """An option or argument has a value the command cannot use (a ValueError too, for library callers)."""


class WeightsError(SurgenetAssistError):
    """Checkpoint missing, unreadable, unsafe, or not matching the architecture."""


class WeightsNotAvailableError(WeightsError):
    """Weights are not cached and cannot be downloaded (offline, or downloads disabled)."""


class ChecksumMismatchError(WeightsError):
    """A downloaded or cached file does not have the expected SHA-256."""


class VideoReadError(SurgenetAssistError):
    """A video or frame folder cannot be opened or decoded."""


class FrameError(SurgenetAssistError):
    """A frame array has the wrong dtype or shape."""


class MediaTooLarge(SurgenetAssistError):
    """An image or video whose header announces more pixels, or a longer aspect ratio, than the caps allow
    (refused before a pixel is decoded: ``core/media_limits.py``)."""


class SchemaError(SurgenetAssistError):
    """A label schema file is malformed, or a label is unknown to the schema."""


class BundleError(SurgenetAssistError):
    """A model bundle is missing, incomplete or incompatible."""


class StoreError(SurgenetAssistError):
    """The label store cannot be reached or a write was refused."""


class DatasetFormatError(SurgenetAssistError):
    """An imported dataset file does not follow its format."""
