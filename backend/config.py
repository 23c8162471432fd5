"""Labeling-config parsing for the backend: re-exported from :mod:`surgenet_assist.core.formats.ls_config`,
where the pure parsing lives so that the translator, importer and exporter in core use the same plan."""

from surgenet_assist.core.formats.ls_config import (
    BRUSH,
    CVS_CRITERION,
    CVS_MULTI,
    LS_DEFAULT_FRAME_RATE,
    PHASE_CHOICE,
    POLYGON,
    TIMELINE,
    ConfigPlan,
    ControlPlan,
    InteractivePlan,
    LabelConfigError,
    RegionControl,
    parse_label_config,
)

__all__ = [
    "BRUSH",
    "CVS_CRITERION",
    "CVS_MULTI",
    "LS_DEFAULT_FRAME_RATE",
    "PHASE_CHOICE",
    "POLYGON",
    "TIMELINE",
    "ConfigPlan",
    "ControlPlan",
    "InteractivePlan",
    "LabelConfigError",
    "RegionControl",
    "parse_label_config",
]
