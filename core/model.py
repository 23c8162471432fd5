"""One model object: SurgeNet backbone + segmentation, phase and CVS heads, with its label schema."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
import torch.nn as nn

from .backbone import SurgeNetBackbone, load_backbone
from .errors import UsageError
from .heads import CVSHead, FPNSegHead, PhaseHead
from .schema import DEFAULT_SCHEMA, LabelSchema
from .zoo import DEFAULT_BACKBONE

MAX_ASPECT_ENV = "SURGENET_ASSIST_MAX_ASPECT"
DEFAULT_MAX_ASPECT = 4.0  # 16:9, 4:3, 21:9 and side-by-side stereo (32:9) frames are all below it


def max_input_aspect() -> float:
    """The longest model input side, as a multiple of the short side: ``$SURGENET_ASSIST_MAX_ASPECT``,
    default :data:`DEFAULT_MAX_ASPECT`. Read on each call (as ``core.paths`` reads the data home), so the
    server, the nightly job and napari all size frames the same way from the same environment."""
    raw = os.environ.get(MAX_ASPECT_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_ASPECT
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and 1.0 <= value <= 64.0):
        raise UsageError(
            f"{MAX_ASPECT_ENV}={raw!r} is not a usable aspect ratio",
            f"set it to a number from 1 to 64 (the model input's long side as a multiple of its short side; "
            f"default {DEFAULT_MAX_ASPECT:g}), or unset it",
        )
    return value


def target_size(
    height: int, width: int, short_side: int, multiple: int = 32, max_aspect: float | None = None
) -> tuple[int, int]:
    """(H, W) of the model input for a ``height`` x ``width`` frame: the short side scaled to ``short_side``,
    the long side at most ``max_aspect`` times ``short_side`` (default :func:`max_input_aspect`), aspect
    kept, both sides rounded to ``multiple``.

    Every path that feeds the backbone sizes its input here (Predictor, the embedding cache and single-frame
    features of day one, instant heads and clicks, fine-tuning, evaluation, acquisition scoring). The long
    side's clamp bounds the work per frame whatever the image: scaling only the short side would give a 1 x
    4000 image a 256 x 1,024,000 input (gigabytes of activations); clamped it gets 32 x 1024. Frames up to
    the clamp's aspect (all usual video formats) are sized exactly as without it."""
    limit = max_input_aspect() if max_aspect is None else float(max_aspect)
    scale = min(short_side / min(height, width), limit * short_side / max(height, width))
    # Rounding each side to the multiple can push a clamped long side one step past the clamp (784.0000001 px
    # rounds to 800 when the clamp is 784): cap it at the largest multiple within the clamp.
    h = max(multiple, int(round(height * scale / multiple)) * multiple)
    w = max(multiple, int(round(width * scale / multiple)) * multiple)
    if math.isfinite(limit):
        cap = max(multiple, int(limit * short_side // multiple) * multiple)
        h, w = min(h, cap), min(w, cap)
    return h, w


@dataclass(frozen=True)
class Preprocessing:
    """How a frame becomes model input: the contract a model is trained under and every consumer serves with.

    A frame is first resized to ``frame_size`` (H, W; None: kept as it is), then to :func:`target_size` with
    ``short_side`` (both sides a multiple of ``multiple``), with ``interpolation`` (``"area"``: OpenCV
    INTER_AREA always, as training does; ``"auto"``: INTER_AREA when shrinking, INTER_LINEAR when enlarging,
    the behaviour before bundles recorded their preprocessing), then normalised with ``mean``/``std`` (0-1
    scale). The temporal phase model runs on sequences sampled at ``temporal_fps`` frames per second.
    ``source``: ``"training"`` (recorded by fine-tuning), ``"default"`` (an untrained model: the backbone's
    defaults) or ``"legacy"`` (a bundle written before the contract existed; today's serving defaults).
    """

    short_side: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    frame_size: tuple[int, int] | None = None
    temporal_fps: float = 1.0
    multiple: int = 32
    interpolation: str = "area"
    source: str = "training"

    def input_size(self, height: int, width: int) -> tuple[int, int]:
        """Model input (H, W) for a frame of ``height`` x ``width``."""
        h, w = self.frame_size or (height, width)
        return target_size(h, w, self.short_side, self.multiple)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["mean"], out["std"] = list(self.mean), list(self.std)
        out["frame_size"] = list(self.frame_size) if self.frame_size else None
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocessing:
        frame = data.get("frame_size")
        return cls(
            short_side=int(data["short_side"]),
            mean=tuple(float(v) for v in data["mean"]),
            std=tuple(float(v) for v in data["std"]),
            frame_size=(int(frame[0]), int(frame[1])) if frame else None,
            temporal_fps=float(data.get("temporal_fps", 1.0)),
            multiple=int(data.get("multiple", 32)),
            interpolation=str(data.get("interpolation", "area")),
            source=str(data.get("source", "training")),
        )

    def with_changes(self, **changes: Any) -> Preprocessing:
        return replace(self, **changes)


@dataclass
class ModelOutput:
    """Raw outputs of one forward pass (logits; the Predictor turns them into labels)."""

    seg_logits: torch.Tensor  # (N, C, H/4, W/4)
    embedding: torch.Tensor  # (N, D) pooled, normed frame embedding
    phase_logits: torch.Tensor  # (N, P) per-frame phase logits
    cvs_logits: torch.Tensor  # (N, 3)


class SurgeNetAssistModel(nn.Module):
    """Backbone and heads in one module; ``forward(x)`` runs every task on a batch of normalised frames."""

    def __init__(self, backbone: SurgeNetBackbone, schema: LabelSchema = DEFAULT_SCHEMA) -> None:
        super().__init__()
        self.backbone = backbone
        self.schema = schema
        self.seg_head = FPNSegHead(backbone.channels, schema.num_classes)
        self.phase_head = PhaseHead(backbone.embed_dim, schema.num_phases)
        self.cvs_head = CVSHead(backbone.embed_dim, schema.num_cvs)
        # set by fine-tuning (how it trained) or by load_bundle (what the bundle recorded)
        self.preprocessing: Preprocessing | None = None

    def preprocessing_contract(self) -> Preprocessing:
        """The recorded preprocessing, else the backbone's defaults (short side of its input size, frames
        kept, 1 fps temporal model, INTER_AREA when shrinking and INTER_LINEAR when enlarging)."""
        if self.preprocessing is not None:
            return self.preprocessing
        return Preprocessing(
            short_side=min(self.backbone.input_size),
            mean=tuple(self.backbone.mean),
            std=tuple(self.backbone.std),
            interpolation="auto",
            source="default",
        )

    @classmethod
    def create(
        cls,
        backbone: str = DEFAULT_BACKBONE,
        schema: LabelSchema = DEFAULT_SCHEMA,
        weights=None,
        random_init: bool = False,
        allow_download: bool = True,
    ) -> SurgeNetAssistModel:
        """A fresh model: pretrained (or random-init) backbone with untrained heads."""
        bb = load_backbone(backbone, weights=weights, random_init=random_init, allow_download=allow_download)
        return cls(bb, schema)

    def heads_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if not k.startswith("backbone.")}

    def heads_from_features(self, features: list[torch.Tensor]) -> ModelOutput:
        """Run the heads on precomputed backbone stages (used by training on cached features)."""
        embedding = self.backbone.pool(features[-1])
        return ModelOutput(
            seg_logits=self.seg_head(features),
            embedding=embedding,
            phase_logits=self.phase_head(embedding),
            cvs_logits=self.cvs_head(embedding),
        )

    def forward(self, x: torch.Tensor) -> ModelOutput:
        return self.heads_from_features(self.backbone(x))
