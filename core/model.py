"""One model object: SurgeNet backbone + segmentation, phase and CVS heads, with its label schema."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from .backbone import SurgeNetBackbone, load_backbone
from .heads import CVSHead, FPNSegHead, PhaseHead
from .schema import DEFAULT_SCHEMA, LabelSchema
from .zoo import DEFAULT_BACKBONE


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
