"""Task heads on the four backbone stages: FPN segmentation, phase (frame + causal temporal), CVS.

Small, composable modules (timm style); each takes backbone outputs and returns logits.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


def _conv_gn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.GroupNorm(min(32, cout // 4), cout), nn.ReLU(True)
    )


class FPNSegHead(nn.Module):
    """Feature-pyramid decoder (as in segmentation_models_pytorch's FPN, summed merge).

    Returns class logits at stride 4; callers upsample to the size they need, so the expensive
    full-resolution step happens once, at the resolution of the original frame.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        pyramid_channels: int = 128,
        segmentation_channels: int = 64,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, pyramid_channels, 1) for c in in_channels)
        # level i (stride 4 * 2**i) needs i upsampling blocks to reach stride 4 (at least one conv)
        self.seg_blocks = nn.ModuleList(
            nn.Sequential(
                *[
                    _conv_gn_relu(
                        pyramid_channels if j == 0 else segmentation_channels, segmentation_channels
                    )
                    for j in range(max(1, i))
                ]
            )
            for i in range(len(in_channels))
        )
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(segmentation_channels, num_classes, 1)
        self.num_classes = num_classes

    def forward(
        self, features: Sequence[torch.Tensor], out_size: tuple[int, int] | None = None
    ) -> torch.Tensor:
        pyramid: list[torch.Tensor] = [None] * len(features)  # type: ignore[list-item]
        top = self.lateral[-1](features[-1])
        pyramid[-1] = top
        for i in range(len(features) - 2, -1, -1):
            top = self.lateral[i](features[i]) + F.interpolate(
                top, size=features[i].shape[-2:], mode="nearest"
            )
            pyramid[i] = top
        target = features[0].shape[-2:]
        merged = 0
        for i, (level, block) in enumerate(zip(pyramid, self.seg_blocks, strict=True)):
            x = level
            for j, layer in enumerate(block):
                x = layer(x)
                if i > 0 and j < i:
                    x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
            if x.shape[-2:] != target:
                x = F.interpolate(x, size=target, mode="bilinear", align_corners=False)
            merged = merged + x
        logits = self.classifier(self.dropout(merged))
        if out_size is not None:
            logits = F.interpolate(logits, size=out_size, mode="bilinear", align_corners=False)
        return logits


class _CausalResidual(nn.Module):
    def __init__(self, channels: int, dilation: int, dropout: float) -> None:
        super().__init__()
        self.pad = 2 * dilation  # kernel 3, all padding on the past side: output t sees inputs <= t
        self.conv = nn.Conv1d(channels, channels, 3, dilation=dilation)
        self.out = nn.Conv1d(channels, channels, 1)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.conv(F.pad(x, (self.pad, 0))))
        return x + self.drop(self.out(y))


class _TCNStage(nn.Module):
    def __init__(self, in_dim: int, hidden: int, out_dim: int, layers: int, dropout: float) -> None:
        super().__init__()
        self.inp = nn.Conv1d(in_dim, hidden, 1)
        self.layers = nn.ModuleList(_CausalResidual(hidden, 2**i, dropout) for i in range(layers))
        self.out = nn.Conv1d(hidden, out_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        for layer in self.layers:
            x = layer(x)
        return self.out(x)


class CausalTCN(nn.Module):
    """Multi-stage causal TCN (MS-TCN/TeCNO style) over sequences of frame embeddings.

    Causal, so the output at frame t depends only on frames <= t: the same network serves online
    (frame-by-frame, see :class:`OnlinePhaseTracker`) and offline (whole video) use.
    """

    def __init__(
        self,
        embed_dim: int,
        num_phases: int,
        hidden: int = 64,
        layers: int = 8,
        stages: int = 2,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        self.stages = nn.ModuleList(
            [_TCNStage(embed_dim, hidden, num_phases, layers, dropout)]
            + [_TCNStage(num_phases, hidden, num_phases, layers, dropout) for _ in range(stages - 1)]
        )
        self.receptive_field = 1 + stages * sum(2 * 2**i for i in range(layers))

    def forward(self, embeddings: torch.Tensor) -> list[torch.Tensor]:
        """(B, T, D) embeddings -> list of (B, T, P) logits, one per stage; the last is the prediction."""
        x = embeddings.transpose(1, 2)
        outputs = []
        for i, stage in enumerate(self.stages):
            x = stage(x if i == 0 else F.softmax(x, dim=1))
            outputs.append(x.transpose(1, 2))
        return outputs


class PhaseHead(nn.Module):
    """Per-frame phase classifier on the pooled embedding plus the causal temporal model."""

    def __init__(self, embed_dim: int, num_phases: int, dropout: float = 0.2) -> None:
        super().__init__()
        self.frame = nn.Sequential(nn.Dropout(dropout), nn.Linear(embed_dim, num_phases))
        self.temporal = CausalTCN(embed_dim, num_phases)
        # persisted with the weights, so a bundle says whether its temporal model was trained
        self.register_buffer("temporal_trained", torch.tensor(False))

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.frame(embedding)


class CVSHead(nn.Module):
    """Three independent sigmoid outputs: C1 two structures, C2 triangle cleared, C3 cystic plate."""

    def __init__(
        self, embed_dim: int, num_criteria: int = 3, hidden: int = 256, dropout: float = 0.2
    ) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Dropout(dropout), nn.Linear(embed_dim, hidden), nn.ReLU(True), nn.Linear(hidden, num_criteria)
        )

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.net(embedding)


class OnlinePhaseTracker:
    """Frame-by-frame use of :class:`CausalTCN`: keeps only the last ``receptive_field`` embeddings."""

    def __init__(self, tcn: CausalTCN) -> None:
        self.tcn = tcn
        self.buffer: list[torch.Tensor] = []

    @torch.inference_mode()
    def update(self, embedding: torch.Tensor) -> torch.Tensor:
        """Add one (D,) embedding; return the phase probabilities for that frame."""
        self.buffer.append(embedding.detach().float().reshape(-1))
        self.buffer = self.buffer[-self.tcn.receptive_field :]
        seq = torch.stack(self.buffer)[None]
        param = next(self.tcn.parameters())
        logits = self.tcn(seq.to(param.device, param.dtype))[-1][0, -1]
        return torch.softmax(logits.float(), dim=-1)
