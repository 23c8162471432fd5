"""Label Studio labeling configs: ours generated from the label schema, and any project's config parsed into
a :class:`ConfigPlan` (which controls map to which schema labels). Pure parsing, no HTTP: the translator
(:mod:`.label_studio`), the exporter and the ML backend all take their control names from here.

Label Studio hands the backend the project's XML config on ``/setup`` and ``/predict`` (and inside webhook
bodies). We match controls by tag type and label names (case-insensitive, ignoring spaces and punctuation,
plus the comma-separated ``predicted_values`` aliases a ``<Label>``/``<Choice>`` may carry), never by
position, so a project can rename, reorder or drop labels. A label the model does not know is reported
(``/setup`` response and log) and never emitted: Label Studio stores unknown labels silently and then does
not render them.

Supported controls:

* ``BrushLabels`` / ``PolygonLabels`` on an ``Image``: segmentation classes;
* ``Choices`` whose choices are CVS criteria (``C1``..``C3``, multiple choice) or one ``Choices`` per
  criterion (named after it, with yes/no choices): CVS;
* single ``Choices`` whose choices are phases: the phase of an image task;
* ``TimelineLabels`` on a ``Video``: contiguous phase segments (uses the video's ``frameRate``).

Interactive mode (:class:`InteractivePlan`, ``ConfigPlan.interactive``): ``KeyPointLabels`` /
``RectangleLabels`` on an ``Image`` are the annotator's prompts (clicks, boxes; ``smart="true"`` makes Label
Studio send them to the backend), answered with a ``brushlabels`` region of the ``BrushLabels`` on the same
image that offers the prompt's label. They are never predicted themselves, so they stay in
``skipped_controls`` (the translator skips their regions when an annotation keeps them).

The configs we generate (:func:`image_config`, :func:`video_config`; ``surgenet-assist ls config``) name the
controls ``mask``, ``cvs``, ``phase`` (image) and ``phases``, ``cvs`` (video); the interactive image config
adds the prompt tools ``click`` (KeyPointLabels) and ``box`` (RectangleLabels).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any
from xml.etree.ElementTree import Element
from xml.sax.saxutils import quoteattr

from defusedxml import ElementTree as SafeET

from ..errors import SurgenetAssistError
from ..schema import DEFAULT_SCHEMA, LabelSchema

#: control kinds this backend can fill
BRUSH, POLYGON, CVS_MULTI, CVS_CRITERION, PHASE_CHOICE, TIMELINE = (
    "brush",
    "polygon",
    "cvs_multi",
    "cvs_criterion",
    "phase_choice",
    "timeline",
)
OBJECT_TAGS = {"image", "video"}
_YES = {"yes", "y", "true", "1", "achieved", "met", "present", "positive"}
_NO = {"no", "n", "false", "0", "notachieved", "notmet", "absent", "negative"}
#: default ``frameRate`` of LS's ``<Video>`` tag when the config does not set one
LS_DEFAULT_FRAME_RATE = 24.0


class LabelConfigError(SurgenetAssistError, ValueError):
    """The labeling config is not valid XML or has no control this model can fill (a 4xx for the client)."""


def _norm(text: str) -> str:
    return "".join(ch for ch in text.lower() if ch.isalnum())


@dataclass
class ControlPlan:
    """One control to fill: where its output goes and how model ids map to its label values."""

    kind: str
    tag: str  # original tag name, e.g. "BrushLabels"
    name: str  # from_name
    to_name: str
    object_tag: str  # "image" | "video"
    value_key: str  # task data key of the object ("image" for value="$image")
    labels: dict[int, str] = field(default_factory=dict)  # model id -> config label value
    criterion: int | None = None  # CVS_CRITERION: which criterion
    yes_no: tuple[str, str] | None = None  # CVS_CRITERION: the config's (yes, no) values
    frame_rate: float | None = None  # TIMELINE: the Video's frameRate
    frame_rate_key: str | None = None  # TIMELINE: frameRate="$fps" -> task data key
    multiple: bool = False

    @property
    def type(self) -> str:
        """The lower-case ``type`` Label Studio expects in a result region."""
        return self.tag.lower()

    def model_id(self, value: str) -> int | None:
        """The schema id behind one of this control's label values; None for a value the schema lacks."""
        return next((i for i, v in self.labels.items() if v == value), None)


@dataclass(frozen=True)
class RegionControl:
    """A labels control on an ``Image`` with *all* its label values (schema or not): the interactive pairing
    needs them, since click-to-mask segments any object the annotator names, not only the schema's classes."""

    tag: str  # "BrushLabels" | "KeyPointLabels" | "RectangleLabels"
    name: str
    to_name: str
    value_key: str
    labels: tuple[str, ...]
    smart: bool = False  # smart="true" / smartOnly="true": Label Studio sends its regions as prompts


@dataclass(frozen=True)
class InteractivePlan:
    """The prompt tools of a config (``KeyPointLabels`` / ``RectangleLabels`` on an ``Image``) and the
    ``BrushLabels`` that answer them. Present whenever a config has a smart prompt tool, paired or not, so
    that the backend can say what is missing instead of answering nothing."""

    prompts: tuple[RegionControl, ...]
    brushes: tuple[RegionControl, ...]  # every BrushLabels on an Image

    def prompt(self, name: str) -> RegionControl | None:
        return next((p for p in self.prompts if p.name == name), None)

    def brush_for(self, to_name: str, label: str) -> RegionControl | None:
        """The BrushLabels on image ``to_name`` that offers ``label`` (the first, when several do)."""
        return next((b for b in self.brushes if b.to_name == to_name and label in b.labels), None)

    @property
    def problem(self) -> str | None:
        """Why no click can be answered (no BrushLabels on the prompts' image, no shared label), or None."""
        smart = [p for p in self.prompts if p.smart]
        for p in smart:
            brushes = [b for b in self.brushes if b.to_name == p.to_name]
            if not brushes:
                return f"{p.tag} {p.name!r} has no BrushLabels on image {p.to_name!r} to answer with"
            if not set(p.labels) & {label for b in brushes for label in b.labels}:
                return f"{p.tag} {p.name!r} shares no label with the BrushLabels on image {p.to_name!r}"
        return None

    def summary(self) -> dict[str, Any]:
        return {
            "prompts": [{"name": p.name, "tag": p.tag, "smart": p.smart} for p in self.prompts],
            "brush": [b.name for b in self.brushes],
            "problem": self.problem,
        }


@dataclass
class ConfigPlan:
    """Everything the backend learned from one labeling config."""

    controls: list[ControlPlan]
    unknown_labels: list[dict[str, str]]  # {"control", "label"} the model cannot predict
    skipped_controls: list[dict[str, str]]  # {"control", "tag", "reason"}
    interactive: InteractivePlan | None = None  # None: no smart KeyPointLabels / RectangleLabels

    @property
    def image_controls(self) -> list[ControlPlan]:
        return [c for c in self.controls if c.object_tag == "image"]

    @property
    def video_controls(self) -> list[ControlPlan]:
        return [c for c in self.controls if c.object_tag == "video"]

    def summary(self) -> dict[str, Any]:
        """JSON-safe summary for ``/setup`` and logs."""
        return {
            "controls": [
                {
                    "name": c.name,
                    "tag": c.tag,
                    "kind": c.kind,
                    "to_name": c.to_name,
                    "labels": sorted(c.labels.values()),
                }
                for c in self.controls
            ],
            "unknown_labels": self.unknown_labels,
            "skipped_controls": self.skipped_controls,
            **({"interactive": self.interactive.summary()} if self.interactive is not None else {}),
        }


def _aliases(el: Element) -> list[str]:
    names = [el.get("value", "")]
    names += [a.strip() for a in (el.get("predicted_values") or "").split(",") if a.strip()]
    alias = el.get("alias")
    if alias:
        names.append(alias)
    return [n for n in names if n]


def _match(el: Element, has: Any, find: Any) -> int | None:
    for name in _aliases(el):
        if has(name):
            return int(find(name))
    return None


def _object_key(obj: Element) -> str:
    value = obj.get("value", "")
    return value[1:] if value.startswith("$") else value


def _rate(video: Element) -> tuple[float | None, str | None]:
    raw = (video.get("frameRate") or "").strip()
    if not raw:
        return LS_DEFAULT_FRAME_RATE, None
    if raw.startswith("$"):
        return None, raw[1:]
    try:
        rate = float(raw)
    except ValueError:
        raise LabelConfigError(
            f"<Video name={video.get('name')!r}> has frameRate={raw!r}, not a number",
            "set frameRate to the video's real FPS (e.g. 25) or to $fps with fps in the task data",
        ) from None
    if rate <= 0:
        raise LabelConfigError(f"<Video> frameRate must be positive, got {rate}", "use the video's FPS")
    return rate, None


@functools.lru_cache(maxsize=64)
def parse_label_config(xml: str, schema: LabelSchema) -> ConfigPlan:
    """Parse a labeling config (cached: LS sends the same config with every request)."""
    if not isinstance(xml, str) or not xml.strip():
        raise LabelConfigError("the labeling config is empty", "send the project's label_config (<View>...)")
    try:
        root = SafeET.fromstring(xml)
    except Exception as exc:  # noqa: BLE001 - ParseError and defusedxml's entity errors
        raise LabelConfigError(
            f"the labeling config is not valid XML: {exc}", "fix the <View> markup"
        ) from None
    objects = {el.get("name"): el for el in root.iter() if el.tag.lower() in OBJECT_TAGS and el.get("name")}
    controls: list[ControlPlan] = []
    unknown: list[dict[str, str]] = []
    skipped: list[dict[str, str]] = []
    regions: list[RegionControl] = []  # labels controls on images, for the interactive pairing
    for el in root.iter():
        tag = el.tag
        low = tag.lower()
        if (
            low in OBJECT_TAGS
            or low in {"view", "header", "label", "choice", "style", "text"}
            or not el.get("toName")
        ):
            continue
        name = el.get("name") or ""
        to_name = el.get("toName", "").split(",")[0].strip()
        obj = objects.get(to_name)
        if obj is None:
            skipped.append(
                {"control": name, "tag": tag, "reason": f"toName {to_name!r} is not an Image or Video"}
            )
            continue
        otag = obj.tag.lower()
        base = {
            "tag": tag,
            "name": name,
            "to_name": to_name,
            "object_tag": otag,
            "value_key": _object_key(obj),
        }
        region = _region_control(el, base) if low in _REGION_TAGS and otag == "image" else None
        if region is not None:
            regions.append(region)
        if region is not None and region.smart and low in _PROMPT_TAGS:
            reason = "interactive prompt: answered with a BrushLabels region"
            skipped.append({"control": name, "tag": tag, "reason": reason})
        elif low in {"brushlabels", "polygonlabels"} and otag == "image":
            labels, missing = _map_labels(el, "Label", schema.has_class, schema.class_id)
            unknown += [{"control": name, "label": m} for m in missing]
            if labels:
                controls.append(
                    ControlPlan(kind=BRUSH if low == "brushlabels" else POLYGON, labels=labels, **base)
                )
            else:
                skipped.append(
                    {"control": name, "tag": tag, "reason": "no label matches a segmentation class"}
                )
        elif low == "timelinelabels" and otag == "video":
            labels, missing = _map_labels(el, "Label", schema.has_phase, schema.phase_id)
            unknown += [{"control": name, "label": m} for m in missing]
            rate, rate_key = _rate(obj)
            if labels:
                controls.append(
                    ControlPlan(
                        kind=TIMELINE, labels=labels, frame_rate=rate, frame_rate_key=rate_key, **base
                    )
                )
            else:
                skipped.append({"control": name, "tag": tag, "reason": "no label matches a surgical phase"})
        elif low == "choices":
            plan, missing, reason = _choices_plan(el, base, schema)
            unknown += [{"control": name, "label": m} for m in missing]
            if plan is not None:
                controls.append(plan)
            else:
                skipped.append({"control": name, "tag": tag, "reason": reason})
        else:
            skipped.append({"control": name, "tag": tag, "reason": f"{tag} on {obj.tag} is not predicted"})
    prompts = tuple(r for r in regions if r.tag.lower() in _PROMPT_TAGS)
    interactive = None
    if any(p.smart for p in prompts):
        brushes = tuple(r for r in regions if r.tag.lower() == "brushlabels")
        interactive = InteractivePlan(prompts=prompts, brushes=brushes)
    return ConfigPlan(
        controls=controls, unknown_labels=unknown, skipped_controls=skipped, interactive=interactive
    )


_PROMPT_TAGS = {"keypointlabels", "rectanglelabels"}
_REGION_TAGS = _PROMPT_TAGS | {"brushlabels"}
_TRUE = {"true", "1", "yes"}


def _region_control(el: Element, base: dict[str, str]) -> RegionControl:
    labels = tuple(v for v in (item.get("value") for item in el.iter("Label")) if v is not None)
    smart = any((el.get(a) or "").strip().lower() in _TRUE for a in ("smart", "smartOnly"))
    return RegionControl(
        tag=base["tag"],
        name=base["name"],
        to_name=base["to_name"],
        value_key=base["value_key"],
        labels=labels,
        smart=smart,
    )


def _map_labels(el: Element, child: str, has: Any, find: Any) -> tuple[dict[int, str], list[str]]:
    labels: dict[int, str] = {}
    missing: list[str] = []
    for item in el.iter(child):
        value = item.get("value")
        if value is None:
            continue
        idx = _match(item, has, find)
        if idx is None or idx in labels:
            missing.append(value)
        else:
            labels[idx] = value
    return labels, missing


def _choices_plan(
    el: Element, base: dict[str, str], schema: LabelSchema
) -> tuple[ControlPlan | None, list[str], str]:
    choices = [c for c in el.iter("Choice") if c.get("value") is not None]
    values = [c.get("value", "") for c in choices]
    multiple = (el.get("choice") or "single").lower() == "multiple"
    has_cvs = schema.has_cvs
    cvs_labels, cvs_missing = _map_labels(el, "Choice", has_cvs, schema.cvs_id)
    phase_labels, phase_missing = _map_labels(el, "Choice", schema.has_phase, schema.phase_id)
    if cvs_labels and len(cvs_labels) >= len(phase_labels):
        if not multiple and len(cvs_labels) > 1:
            return None, [], 'CVS criteria need choice="multiple" (several criteria can hold at once)'
        return ControlPlan(kind=CVS_MULTI, labels=cvs_labels, multiple=multiple, **base), cvs_missing, ""
    if phase_labels:
        if multiple:
            return None, [], "phase Choices must be single choice (one phase per frame)"
        if base["object_tag"] != "image":
            return None, [], "phase on a Video is predicted with TimelineLabels, not Choices"
        return ControlPlan(kind=PHASE_CHOICE, labels=phase_labels, **base), phase_missing, ""
    # one control per criterion: the control (or its hint/alias) names the criterion, choices are yes/no
    crit = None
    for cand in (el.get("name", ""), el.get("alias", ""), *(el.get("predicted_values") or "").split(",")):
        if cand.strip() and has_cvs(cand.strip()):
            crit = schema.cvs_id(cand.strip())
            break
    yes = next((v for v in values if _norm(v) in _YES), None)
    no = next((v for v in values if _norm(v) in _NO), None)
    if crit is not None and yes is not None and no is not None:
        plan = ControlPlan(
            kind=CVS_CRITERION, labels={crit: schema.cvs_keys[crit]}, criterion=crit, yes_no=(yes, no), **base
        )
        return plan, [v for v in values if v not in (yes, no)], ""
    return None, [], f"choices {values[:6]} match no phase, no CVS criterion and no yes/no criterion"


# ---------------------------------------------------------------------------------------------------
# the configs we generate
# ---------------------------------------------------------------------------------------------------
KINDS = ("image", "video")


def _hex(color: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*color)


#: control names of the interactive prompt tools in the image config we generate
CLICK_CONTROL, BOX_CONTROL = "click", "box"


def image_config(schema: LabelSchema = DEFAULT_SCHEMA, interactive: bool = False) -> str:
    """Brush masks per class, CVS criteria (multiple choice), frame phase (single choice).

    ``interactive``: add smart ``KeyPointLabels`` (clicks; Alt+click for a negative one) and
    ``RectangleLabels`` (boxes) with the brush's labels, so that with an interactive ML backend and
    Auto-Annotation on a click or a box comes back as the object's mask under the same label."""
    labels = "\n".join(
        f"    <Label value={quoteattr(c.name)} background={quoteattr(_hex(c.color))}/>"
        for c in schema.classes
    )
    prompts = ""
    if interactive:
        prompts = f"""
  <Header value="Click or box an object (Auto-Annotation on; Alt+click: negative)"/>
  <KeyPointLabels name="{CLICK_CONTROL}" toName="image" smart="true" strokeWidth="3">
{labels}
  </KeyPointLabels>
  <RectangleLabels name="{BOX_CONTROL}" toName="image" smart="true" strokeWidth="2">
{labels}
  </RectangleLabels>"""
    cvs = "\n".join(f"    <Choice value={quoteattr(c.key)} hint={quoteattr(c.name)}/>" for c in schema.cvs)
    phases = "\n".join(f"    <Choice value={quoteattr(p.name)}/>" for p in schema.phases)
    return f"""<View>
  <Header value="Segmentation"/>
  <Image name="image" value="$image" zoom="true" zoomControl="true"/>
  <BrushLabels name="mask" toName="image">
{labels}
  </BrushLabels>{prompts}
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


def label_config(
    kind: str, schema: LabelSchema = DEFAULT_SCHEMA, frame_rate: float = 25.0, interactive: bool = False
) -> str:
    """The config for ``kind`` ("image" or "video"); ``interactive`` adds click/box prompt tools (images
    only: Label Studio's interactive mode works on an ``<Image>``)."""
    if kind not in KINDS:
        raise LabelConfigError(f"unknown config kind {kind!r}", f"use one of {KINDS}")
    if interactive and kind != "image":
        raise LabelConfigError(
            f"interactive mode needs an image config, not {kind!r}",
            "use --kind image --interactive (clicks and boxes are drawn on frames, not on a video)",
        )
    if kind == "image":
        return image_config(schema, interactive=interactive)
    return video_config(schema, frame_rate)
