"""What an annotator gives the click-to-mask engine: clicks, an optional box, the previous mask.

Coordinates are pixels of the full-size image, ``row``/``col`` (napari order, y then x); the Label Studio
and napari front-ends convert their own conventions (percent of the image, layer coordinates) into these.
Everything is checked against the image size before any work is done, so a click outside the image or an
empty prompt is a clear error rather than an empty mask.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

from ..errors import UsageError


class PromptError(UsageError):
    """A click or box the engine cannot use (outside the image, empty prompt, wrong previous mask)."""


@dataclass(frozen=True)
class Click:
    """One click: ``positive`` adds the pixel's object, negative removes what was wrongly included."""

    row: float
    col: float
    positive: bool = True


@dataclass(frozen=True)
class Box:
    """An axis-aligned box around the object, in pixels (``bottom``/``right`` exclusive)."""

    top: float
    left: float
    bottom: float
    right: float


@dataclass
class Prompt:
    """All the annotator has said about one object so far (clicks accumulate, in order)."""

    clicks: tuple[Click, ...] = ()
    box: Box | None = None
    previous_mask: np.ndarray | None = field(default=None, repr=False)  # (H, W) bool, e.g. the last result

    def with_click(self, click: Click) -> Prompt:
        return Prompt(self.clicks + (click,), self.box, self.previous_mask)

    @property
    def positives(self) -> list[Click]:
        return [c for c in self.clicks if c.positive]

    @property
    def negatives(self) -> list[Click]:
        return [c for c in self.clicks if not c.positive]

    def validate(self, height: int, width: int) -> None:
        """Raise :class:`PromptError` naming the first problem; return quietly when usable."""
        if not self.clicks and self.box is None:
            raise PromptError(
                "the prompt has no click and no box",
                "click on the object (positive) or draw a box around it first",
            )
        if not self.positives and self.box is None:
            raise PromptError(
                "the prompt has only negative clicks: nothing says where the object is",
                "add a positive click inside the object, or a box around it",
            )
        for c in self.clicks:
            if not (0 <= c.row < height and 0 <= c.col < width) or not np.isfinite([c.row, c.col]).all():
                raise PromptError(
                    f"click at row {c.row:.1f}, col {c.col:.1f} is outside the {width}x{height} image",
                    "click inside the image (coordinates are pixels: row < height, col < width)",
                )
        if self.box is not None:
            b = self.box
            if not (b.bottom > b.top and b.right > b.left):
                raise PromptError(f"box {b} is empty", "draw the box with a width and a height")
            if b.bottom <= 0 or b.right <= 0 or b.top >= height or b.left >= width:
                raise PromptError(
                    f"box {b} lies outside the {width}x{height} image", "draw the box over the object"
                )
        if self.previous_mask is not None and self.previous_mask.shape[:2] != (height, width):
            raise PromptError(
                f"previous mask is {self.previous_mask.shape[:2]}, the image is {(height, width)}",
                "pass the mask of this image (or none)",
            )


def click_maps(
    prompt: Prompt, size: tuple[int, int], image_size: tuple[int, int], radius: float
) -> np.ndarray:
    """(4, h, w) float32 maps of a prompt on a ``size`` grid: positive disks, negative disks, the box and the
    previous mask (area-averaged). Disks have ``radius`` grid cells; the learned head reads these maps beside
    the backbone features (RITM's encoding, at the features' resolution)."""
    h, w = size
    H, W = image_size
    sy, sx = h / H, w / W
    maps = np.zeros((4, h, w), np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    for c in prompt.clicks:
        disk = ((yy - c.row * sy) ** 2 + (xx - c.col * sx) ** 2) <= radius**2
        maps[0 if c.positive else 1][disk] = 1.0
    if prompt.box is not None:
        b = prompt.box
        maps[2][(yy >= b.top * sy) & (yy < b.bottom * sy) & (xx >= b.left * sx) & (xx < b.right * sx)] = 1.0
    if prompt.previous_mask is not None:
        maps[3] = cv2.resize(prompt.previous_mask.astype(np.float32), (w, h), interpolation=cv2.INTER_AREA)
    return maps
