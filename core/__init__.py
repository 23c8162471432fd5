"""surgenet_assist.core — the shared core every front-end uses.

Model zoo and SurgeNet backbone loading, task heads, model bundles, the Predictor, video IO, synthetic
surgical data, the label schema, the label store and mask/timeline encoders. Heavy modules (torch) are
imported lazily, so light users (schema, store) start fast.
"""

from __future__ import annotations

import importlib
from typing import Any

from .errors import SurgenetAssistError
from .schema import DEFAULT_SCHEMA, LabelSchema

_LAZY = {
    "load_backbone": "backbone",
    "SurgeNetBackbone": "backbone",
    "inspect_checkpoint": "backbone",
    "SurgeNetAssistModel": "model",
    "save_bundle": "bundle",
    "load_bundle": "bundle",
    "read_bundle_info": "bundle",
    "Predictor": "predictor",
    "FramePrediction": "predictor",
    "VideoPrediction": "predictor",
    "open_video": "video",
    "generate_clip": "synthetic",
    "list_backbones": "zoo",
    "get_spec": "zoo",
}

__all__ = ["DEFAULT_SCHEMA", "LabelSchema", "SurgenetAssistError", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
