"""Fine-tuning the task heads on labelled frames.

With a frozen backbone the stage features are computed once and cached (fp16), so each epoch only
runs the light heads: minutes on a laptop CPU for a few hundred frames. Segmentation uses
cross-entropy + Dice with the ignore label, phase uses cross-entropy (frame classifier, then the causal
temporal model on per-video sequences of embeddings), CVS uses BCE on fractional rater means.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from surgenet_assist.core.model import SurgeNetAssistModel
from surgenet_assist.core.predictor import target_size
from surgenet_assist.core.schema import IGNORE_INDEX


@dataclass
class LabelledFrames:
    """Frames with whatever labels exist: mask pixels 255 = ignore, phase -1 = unknown, CVS NaN = unknown."""

    images: np.ndarray  # (N, H, W, 3) uint8
    masks: np.ndarray | None = None  # (N, H, W) uint8
    phases: np.ndarray | None = None  # (N,) int64
    cvs: np.ndarray | None = None  # (N, 3) float32
    video_ids: np.ndarray | None = None  # (N,) sequence membership for the temporal model (frames in order)

    def __len__(self) -> int:
        return len(self.images)


@dataclass
class FinetuneConfig:
    epochs: int = 20
    temporal_epochs: int = 60
    lr: float = 2e-3
    weight_decay: float = 1e-4
    batch_size: int = 16
    short_side: int | None = None
    seed: int = 0
    dice_weight: float = 0.5


@dataclass
class FinetuneHistory:
    losses: dict[str, list[float]] = field(
        default_factory=lambda: {"segmentation": [], "phase": [], "cvs": []}
    )
    temporal_losses: list[float] = field(default_factory=list)


def _resize_batch(images: np.ndarray, size: tuple[int, int], interp: int) -> np.ndarray:
    h, w = size
    return np.stack([cv2.resize(im, (w, h), interpolation=interp) for im in images])


@torch.inference_mode()
def extract_features(
    model: SurgeNetAssistModel,
    images: np.ndarray,
    short_side: int,
    batch_size: int = 8,
    progress: bool = True,
) -> tuple[list[torch.Tensor], tuple[int, int]]:
    """Backbone stage features for all images (fp16, CPU) and the model input size used."""
    model.eval()
    size = target_size(images.shape[1], images.shape[2], short_side)
    mean = torch.tensor(model.backbone.mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(model.backbone.std).view(1, 3, 1, 1) * 255
    stages: list[list[torch.Tensor]] = [[] for _ in model.backbone.channels]
    device = next(model.parameters()).device
    for start in tqdm(range(0, len(images), batch_size), desc="backbone features", disable=not progress):
        chunk = _resize_batch(images[start : start + batch_size], size, cv2.INTER_AREA)
        x = (torch.from_numpy(chunk).permute(0, 3, 1, 2).float() - mean) / std
        for i, f in enumerate(model.backbone(x.to(device))):
            stages[i].append(f.to("cpu", torch.float16))
    return [torch.cat(s) for s in stages], size


def dice_loss(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Soft Dice over classes present in the batch, ignoring ``ignore_index`` pixels."""
    valid = (target != ignore_index).unsqueeze(1)
    probs = torch.softmax(logits, dim=1) * valid
    onehot = F.one_hot(target.clamp_max(logits.shape[1] - 1), logits.shape[1]).permute(0, 3, 1, 2) * valid
    inter = (probs * onehot).sum(dim=(0, 2, 3))
    denom = probs.sum(dim=(0, 2, 3)) + onehot.sum(dim=(0, 2, 3))
    present = onehot.sum(dim=(0, 2, 3)) > 0
    dice = (2 * inter + 1.0) / (denom + 1.0)
    return 1 - dice[present].mean() if present.any() else logits.sum() * 0


def finetune_heads(
    model: SurgeNetAssistModel,
    data: LabelledFrames,
    config: FinetuneConfig | None = None,
    progress: bool = True,
) -> FinetuneHistory:
    """Train the three heads (backbone frozen); with phases and video ids, also the temporal model."""
    cfg = config or FinetuneConfig()
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    short = cfg.short_side or min(model.backbone.input_size)
    feats, size = extract_features(model, data.images, short, progress=progress)
    n = len(data)
    masks = None
    if data.masks is not None:
        stride4 = feats[0].shape[-2:]
        masks = torch.from_numpy(
            _resize_batch(data.masks, (stride4[0] * 2, stride4[1] * 2), cv2.INTER_NEAREST)
        ).long()
    phases = torch.from_numpy(np.asarray(data.phases, dtype=np.int64)) if data.phases is not None else None
    cvs = torch.from_numpy(np.asarray(data.cvs, dtype=np.float32)) if data.cvs is not None else None

    heads = [model.seg_head, model.phase_head.frame, model.cvs_head]
    params = [p for h in heads for p in h.parameters()]
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    optim = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = cfg.epochs * math.ceil(n / cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(optim, max_lr=cfg.lr, total_steps=max(1, steps))
    history = FinetuneHistory()
    for h in heads:
        h.train()
    for _ in tqdm(range(cfg.epochs), desc="fine-tuning heads", disable=not progress):
        order = rng.permutation(n)
        sums = {"segmentation": 0.0, "phase": 0.0, "cvs": 0.0}
        for start in range(0, n, cfg.batch_size):
            idx = torch.from_numpy(order[start : start + cfg.batch_size])
            f = [s[idx].float() for s in feats]
            out = model.heads_from_features(f)
            loss = out.seg_logits.sum() * 0
            if masks is not None:
                target = masks[idx]
                logits = F.interpolate(
                    out.seg_logits, size=target.shape[-2:], mode="bilinear", align_corners=False
                )
                seg = F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX)
                seg = seg + cfg.dice_weight * dice_loss(logits, target)
                loss = loss + seg
                sums["segmentation"] += float(seg.detach()) * len(idx)
            if phases is not None and (phases[idx] >= 0).any():
                ph = F.cross_entropy(out.phase_logits, phases[idx], ignore_index=-1)
                loss = loss + ph
                sums["phase"] += float(ph.detach()) * len(idx)
            if cvs is not None:
                target_cvs = cvs[idx]
                known = ~torch.isnan(target_cvs)
                if known.any():
                    cv = F.binary_cross_entropy_with_logits(out.cvs_logits[known], target_cvs[known])
                    loss = loss + cv
                    sums["cvs"] += float(cv.detach()) * len(idx)
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
            sched.step()
        for k, v in sums.items():
            history.losses[k].append(v / n)
    for h in heads:
        h.eval()
    if phases is not None and data.video_ids is not None:
        with torch.inference_mode():
            emb = model.backbone.pool(feats[-1].float())
        history.temporal_losses = train_temporal(model, emb.clone(), phases, data.video_ids, cfg, progress)
    return history


def train_temporal(
    model: SurgeNetAssistModel,
    embeddings: torch.Tensor,
    phases: torch.Tensor,
    video_ids: np.ndarray,
    cfg: FinetuneConfig,
    progress: bool = True,
) -> list[float]:
    """Fit the causal TCN on per-video embedding sequences (frames must be in temporal order)."""
    tcn = model.phase_head.temporal
    tcn.train()
    optim = torch.optim.AdamW(tcn.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sequences = [
        (embeddings[torch.from_numpy(video_ids == v)], phases[torch.from_numpy(video_ids == v)])
        for v in np.unique(video_ids)
    ]
    losses = []
    for _ in tqdm(range(cfg.temporal_epochs), desc="temporal model", disable=not progress):
        total = 0.0
        for emb, target in sequences:
            # feature noise keeps the TCN from trusting training-set embeddings too much
            noisy = emb + 0.1 * emb.std() * torch.randn_like(emb)
            outs = tcn(noisy[None])
            loss = sum(F.cross_entropy(o[0], target, ignore_index=-1) for o in outs) / len(outs)
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
            total += float(loss.detach())
        losses.append(total / max(1, len(sequences)))
    tcn.eval()
    model.phase_head.temporal_trained.fill_(True)
    return losses
