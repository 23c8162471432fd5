"""Interactive segmentation: clicks and boxes to one object's mask (see ``docs/interactive.md``).

- :mod:`.prompts`: what the annotator gives (clicks, box, previous mask), checked against the image;
- :mod:`.engine`: :class:`ClickSegmenter`, day-one similarity or a learned click head, on cached features;
- :mod:`.clicker`: the standard simulated annotator, NoC / IoU@k and their intervals by video, shared by the
  bench, training and gate;
- :mod:`.objects`: what one object is (:func:`click_objects`), for the bench, training and gate alike.
"""

from .clicker import ClickSession, next_click, noc, simulate, summarize
from .engine import DAY_ONE, LEARNED, ClickSegmenter, ImageEmbedding, MaskResult
from .objects import click_objects
from .prompts import Box, Click, Prompt, PromptError, click_maps

__all__ = [
    "DAY_ONE",
    "LEARNED",
    "Box",
    "Click",
    "ClickSegmenter",
    "ClickSession",
    "ImageEmbedding",
    "MaskResult",
    "Prompt",
    "PromptError",
    "click_maps",
    "click_objects",
    "next_click",
    "noc",
    "simulate",
    "summarize",
]
