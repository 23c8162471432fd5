"""The labeling configs we ship (image: masks + CVS + phase; video: phase timeline + CVS).

Generated from the label schema so a custom procedure gets a matching config; the files under
``labeling_configs/`` are the default schema's rendering (a test keeps them in sync), for people who paste a
config into Label Studio's UI by hand.
"""

from __future__ import annotations

from importlib import resources
from xml.sax.saxutils import quoteattr

from surgenet_assist.core.schema import DEFAULT_SCHEMA, LabelSchema

KINDS = ("image", "video")


def _hex(color: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*color)


def image_config(schema: LabelSchema = DEFAULT_SCHEMA) -> str:
    """Brush masks per class, CVS criteria (multiple choice), frame phase (single choice)."""
    labels = "\n".join(
        f"    <Label value={quoteattr(c.name)} background={quoteattr(_hex(c.color))}/>"
        for c in schema.classes
    )
    cvs = "\n".join(f"    <Choice value={quoteattr(c.key)} hint={quoteattr(c.name)}/>" for c in schema.cvs)
    phases = "\n".join(f"    <Choice value={quoteattr(p.name)}/>" for p in schema.phases)
    return f"""<View>
  <Header value="Segmentation"/>
  <Image name="image" value="$image" zoom="true" zoomControl="true"/>
  <BrushLabels name="mask" toName="image">
{labels}
  </BrushLabels>
  <Header value="Critical view of safety"/>
  <Choices name="cvs" toName="image" choice="multiple" showInline="true">
{cvs}
  </Choices>
  <Header value="Surgical phase"/>
  <Choices name="phase" toName="image" choice="single-radio" showInline="true">
{phases}
  </Choices>
</View>
"""


def video_config(schema: LabelSchema = DEFAULT_SCHEMA, frame_rate: float = 25.0) -> str:
    """Phase timeline on the video (``frameRate`` must equal the video's real FPS) + clip-level CVS."""
    phases = "\n".join(
        f"    <Label value={quoteattr(p.name)} background={quoteattr(_hex(p.color))}/>" for p in schema.phases
    )
    cvs = "\n".join(f"    <Choice value={quoteattr(c.key)} hint={quoteattr(c.name)}/>" for c in schema.cvs)
    return f"""<View>
  <Header value="Surgical phases"/>
  <Video name="video" value="$video" frameRate="{frame_rate:g}" timelineHeight="120"/>
  <TimelineLabels name="phases" toName="video">
{phases}
  </TimelineLabels>
  <Header value="Critical view of safety (reached in this clip)"/>
  <Choices name="cvs" toName="video" choice="multiple" showInline="true">
{cvs}
  </Choices>
</View>
"""


def label_config(kind: str, schema: LabelSchema = DEFAULT_SCHEMA, frame_rate: float = 25.0) -> str:
    """The config for ``kind`` ("image" or "video")."""
    if kind == "image":
        return image_config(schema)
    if kind == "video":
        return video_config(schema, frame_rate)
    raise ValueError(f"unknown config kind {kind!r}; use one of {KINDS}")


def shipped_config(kind: str) -> str:
    """The XML file shipped in the package for ``kind``."""
    if kind not in KINDS:
        raise ValueError(f"unknown config kind {kind!r}; use one of {KINDS}")
    return (
        resources.files("surgenet_assist.backend").joinpath(f"labeling_configs/{kind}.xml").read_text("utf-8")
    )
