"""The labeling configs we ship (image: masks + CVS + phase; video: phase timeline + CVS).

Generated from the label schema in :mod:`surgenet_assist.core.formats.ls_config` (the exporter's default
config comes from there too) so a custom procedure gets a matching config; the files under
``labeling_configs/`` are the default schema's rendering (a test keeps them in sync), for people who paste a
config into Label Studio's UI by hand.
"""

from __future__ import annotations

from importlib import resources

from surgenet_assist.core.formats.ls_config import (
    KINDS,
    LabelConfigError,
    image_config,
    label_config,
    video_config,
)

__all__ = ["KINDS", "image_config", "label_config", "shipped_config", "video_config"]


def shipped_config(kind: str) -> str:
    """The XML file shipped in the package for ``kind``."""
    if kind not in KINDS:
        raise LabelConfigError(f"unknown config kind {kind!r}", f"use one of {KINDS}")
    return (
        resources.files("surgenet_assist.backend").joinpath(f"labeling_configs/{kind}.xml").read_text("utf-8")
    )
