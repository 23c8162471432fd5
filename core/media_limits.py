"""Refuse oversized media from its header, before a single pixel is decoded.

Decoding is where an image costs memory and time: a 40000×40000 PNG is a few hundred bytes on disk and
4.8 GB once decoded, and a 1×4000 strip, scaled so that its short side fits the model, becomes a
4000-times-longer input. Both are visible in the header: Pillow opens lazily (``Image.open(f).size`` reads
the header only) and a video container states its width and height before any frame is decoded. So every
place that takes media from someone else (the Label Studio backend, napari, the CLI) asks
:func:`check_media_file` first and decodes only what passes.

The caps (:class:`MediaLimits`) are arguments, never read from the environment here: the backend reads
``SURGENET_ASSIST_MEDIA_MAX_PIXELS`` / ``SURGENET_ASSIST_MEDIA_MAX_ASPECT`` once (``BackendSettings``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import MediaTooLarge

#: 4096×4096: every surgical format (4K UHD is 8.3 MP) passes; a decoded RGB frame stays under 50 MB
DEFAULT_MAX_PIXELS = 4096 * 4096
#: long side / short side: endoscopes record 1:1 to 21:9 (2.3); 8 leaves room for crops and strips of frames
DEFAULT_MAX_ASPECT = 8.0
DEFAULT_HINT = "downscale or crop the file; if it is genuine, raise the cap"


@dataclass(frozen=True)
class MediaLimits:
    """The largest frame accepted: ``max_pixels`` (width × height) and ``max_aspect`` (long / short side)."""

    max_pixels: int = DEFAULT_MAX_PIXELS
    max_aspect: float = DEFAULT_MAX_ASPECT


@dataclass(frozen=True)
class MediaHeader:
    """What a file's header says: ``kind`` ("image" or "video"), ``width`` and ``height`` in pixels."""

    kind: str
    width: int
    height: int


def check_size(
    width: int, height: int, limits: MediaLimits, what: str = "image", hint: str = DEFAULT_HINT
) -> None:
    """Raise :class:`MediaTooLarge` when a ``width`` × ``height`` frame is empty or exceeds ``limits``."""
    if width <= 0 or height <= 0:
        raise MediaTooLarge(f"{what} is {width}×{height} pixels: an empty frame", "re-export the file")
    pixels = width * height
    if pixels > limits.max_pixels:
        raise MediaTooLarge(
            f"{what} is {width}×{height} pixels ({pixels:,}), over the cap of {limits.max_pixels:,} pixels",
            hint,
        )
    aspect = max(width, height) / min(width, height)
    if aspect > limits.max_aspect:
        raise MediaTooLarge(
            f"{what} is {width}×{height} pixels: an aspect ratio of {aspect:.1f}:1, over the cap of "
            f"{limits.max_aspect:g}:1",
            hint,
        )


def image_header(path: str | Path, what: str | None = None, hint: str = DEFAULT_HINT) -> MediaHeader | None:
    """Width and height from an image file's header (Pillow reads no pixel data); None when Pillow does not
    recognise the file as an image. Raises :class:`MediaTooLarge` for a header Pillow itself calls a
    decompression bomb (over twice ``PIL.Image.MAX_IMAGE_PIXELS``), whose size it does not report."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            width, height = im.size
    except Image.DecompressionBombError:
        limit = 2 * (Image.MAX_IMAGE_PIXELS or 0)
        raise MediaTooLarge(
            f"image {what or Path(path).name} has more than {limit:,} pixels (Pillow: a decompression bomb)",
            hint,
        ) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return None
    return MediaHeader("image", int(width), int(height))


def video_header(path: str | Path) -> MediaHeader | None:
    """Width and height of a video's first video stream, from the container (PyAV demuxes headers, decodes no
    frame of ours); None when the file is not a container with a video stream."""
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                return None
            ctx = container.streams.video[0].codec_context
            if ctx.width <= 0 or ctx.height <= 0:
                return None  # the demuxer could not tell (e.g. a corrupt image): the decoder will say why
            return MediaHeader("video", int(ctx.width), int(ctx.height))
    except (av.error.FFmpegError, OSError, ValueError):
        return None


def media_header(path: str | Path, what: str | None = None, hint: str = DEFAULT_HINT) -> MediaHeader | None:
    """The header of an image (tried first: the cheaper read) or a video; None when neither is recognised."""
    return image_header(path, what, hint) or video_header(path)


def check_media_file(
    path: str | Path, limits: MediaLimits, what: str | None = None, hint: str = DEFAULT_HINT
) -> MediaHeader | None:
    """Refuse ``path`` (:class:`MediaTooLarge`) when its header exceeds ``limits``; its header otherwise, or
    None when the file is neither a recognised image nor a video (the decoder will then say what is wrong).
    ``what`` names the file in the message (default: its name)."""
    header = media_header(path, what, hint)
    if header is not None:
        check_size(header.width, header.height, limits, f"{header.kind} {what or Path(path).name}", hint)
    return header
