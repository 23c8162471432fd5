"""Fine-tuning the task heads (and optionally the last backbone stages) on labelled frames.

With a frozen backbone the stage features are computed once and cached (fp16), so each epoch only runs the
light heads: minutes on a laptop CPU for a few hundred frames. With ``train_backbone_stages > 0`` the last
stages are trained too and every step runs the backbone. Segmentation uses cross-entropy + Dice with the
ignore label, phase uses cross-entropy (frame classifier, then the causal temporal model on per-video
sequences of embeddings), CVS uses BCE on fractional rater means.

The temporal model trains on uniform sequences at ``FinetuneConfig.temporal_fps``
(:func:`temporal_sequences`): keyframes labelled at other rates (e.g. 25 fps segmentation bursts) train the
frame heads but are left out of its sequences. The fitted model records how it was trained
(``model.preprocessing``: short side, frame size, mean/std, temporal fps); its bundle carries that to every
consumer.

Robustness: seeds, bf16 autocast on GPU, an atomic checkpoint every N steps and resume from it after a
crash (same data and config only), a wall-clock deadline, and DistributedDataParallel with a
DistributedSampler when ``torch.distributed`` is initialised (see ``distributed.py``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DistributedSampler
from tqdm.auto import tqdm

from surgenet_assist.core.model import ModelOutput, Preprocessing, SurgeNetAssistModel, target_size
from surgenet_assist.core.schema import IGNORE_INDEX

from . import distributed as ddp


@dataclass
class LabelledFrames:
    """Frames with whatever labels exist: mask pixels 255 = ignore, phase -1 = unknown, CVS NaN = unknown."""

    images: np.ndarray  # (N, H, W, 3) uint8
    masks: np.ndarray | None = None  # (N, H, W) uint8
    phases: np.ndarray | None = None  # (N,) int64
    cvs: np.ndarray | None = None  # (N, 3) float32
    video_ids: np.ndarray | None = None  # (N,) sequence membership for the temporal model (frames in order)
    frame_indices: np.ndarray | None = None  # (N,) frame index in its video (for temporal sampling)
    fps: np.ndarray | None = None  # (N,) frame rate of each row's video


    def __len__(self) -> int:
        return len(self.images)

    def subset(self, keep: np.ndarray) -> LabelledFrames:
        """The rows selected by ``keep`` (boolean mask or indices), every per-row array alike."""
        arrays = {f.name: getattr(self, f.name) for f in fields(self)}
        return LabelledFrames(**{k: None if v is None else v[keep] for k, v in arrays.items()})

    def fingerprint(self) -> str:
        """Cheap content hash (shapes + sampled bytes of every array) to tie a checkpoint to its data."""
        h = hashlib.sha256()
        for arr in (self.images, self.masks, self.phases, self.cvs, self.video_ids, self.frame_indices,
                    self.fps):
            if arr is None:
                h.update(b"none")
                continue
            a = np.ascontiguousarray(arr)
            h.update(str((a.shape, a.dtype)).encode())
            flat = a.reshape(-1)
            h.update(flat[:: max(1, flat.size // 65536)].tobytes())
        return h.hexdigest()[:16]


@dataclass
class FinetuneConfig:
    epochs: int = 20
    temporal_epochs: int = 60
    lr: float = 2e-3
    backbone_lr: float = 1e-4
    weight_decay: float = 1e-4
    batch_size: int = 16
    short_side: int | None = None
    temporal_fps: float = 1.0  # frames per second of the temporal phase model's sequences
    seed: int = 0
    dice_weight: float = 0.5
    train_backbone_stages: int = 0  # 0: heads only (cached features); k: also the last k backbone stages
    checkpoint_dir: str | None = None
    checkpoint_every: int = 50  # optimizer steps
    resume: bool = True
    amp: bool | None = None  # bf16 autocast; default on for CUDA
    device: str | None = None
    deadline: float | None = None  # time.time() after which training stops early (nightly budget)

    def key(self) -> str:
        skip = {"checkpoint_dir", "resume", "deadline", "device", "checkpoint_every"}
        return json.dumps({k: v for k, v in asdict(self).items() if k not in skip}, sort_keys=True)


@dataclass
class FinetuneHistory:
    losses: dict[str, list[float]] = field(
        default_factory=lambda: {"segmentation": [], "phase": [], "cvs": []}
    )
    temporal_losses: list[float] = field(default_factory=list)
    steps: int = 0
    resumed_from_step: int | None = None
    stopped_early: bool = False
    images_per_second: float | None = None


def seed_everything(seed: int) -> None:
    """Python, NumPy and torch (CPU + CUDA) seeds."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _resize_batch(images: np.ndarray, size: tuple[int, int], interp: int) -> np.ndarray:
    h, w = size
    return np.stack([cv2.resize(im, (w, h), interpolation=interp) for im in images])


def normalise(model: SurgeNetAssistModel, chunk: np.ndarray, device: torch.device) -> torch.Tensor:
    """(N, h, w, 3) uint8 -> normalised float tensor on ``device``."""
    mean = torch.tensor(model.backbone.mean, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(model.backbone.std, device=device).view(1, 3, 1, 1) * 255
    return (torch.from_numpy(chunk).to(device).permute(0, 3, 1, 2).float() - mean) / std


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
    stages: list[list[torch.Tensor]] = [[] for _ in model.backbone.channels]
    device = next(model.parameters()).device
    amp = device.type == "cuda"
    for start in tqdm(range(0, len(images), batch_size), desc="backbone features", disable=not progress):
        chunk = _resize_batch(images[start : start + batch_size], size, cv2.INTER_AREA)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            feats = model.backbone(normalise(model, chunk, device))
        for i, f in enumerate(feats):
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


class _TrainNet(nn.Module):
    """What DDP wraps: heads on cached features, or backbone + heads on images."""

    def __init__(self, model: SurgeNetAssistModel, on_features: bool) -> None:
        super().__init__()
        self.model = model
        self.on_features = on_features

    def forward(self, x: list[torch.Tensor] | torch.Tensor) -> ModelOutput:
        feats = x if self.on_features else self.model.backbone(x)
        return self.model.heads_from_features(feats)


def trainable_backbone_params(model: SurgeNetAssistModel, stages: int) -> list[nn.Parameter]:
    """Parameters of the last ``stages`` backbone stages plus the pooling norm (CaFormer/ConvNeXt/PVT)."""
    if stages <= 0:
        return []
    trunk = model.backbone.trunk
    blocks = getattr(trunk, "stages", None)
    if blocks is None:
        raise ValueError(f"{model.backbone.arch} exposes no .stages to unfreeze")
    params = [p for s in list(blocks)[-stages:] for p in s.parameters()]
    for name in ("head", "norm_pre", "norm"):
        mod = getattr(trunk, name, None)
        if isinstance(mod, nn.Module):
            params += list(mod.parameters())
    return params


def _atomic_save(obj: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _stop_now(deadline: float | None, device: torch.device) -> bool:
    flag = torch.tensor([1.0 if deadline is not None and time.time() > deadline else 0.0], device=device)
    if ddp.world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item() > 0)


def finetune_heads(
    model: SurgeNetAssistModel,
    data: LabelledFrames,
    config: FinetuneConfig | None = None,
    progress: bool = True,
) -> FinetuneHistory:
    """Train the heads (and the last backbone stages if configured), then the temporal phase model.

    Runs unchanged as one process or under ``torchrun`` (DDP over the trainable part, a DistributedSampler
    over frames); only rank 0 writes checkpoints.
    """
    cfg = config or FinetuneConfig()
    rank, world = ddp.rank(), ddp.world_size()
    seed_everything(cfg.seed)
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", ddp.local_rank())
    amp = device.type == "cuda" if cfg.amp is None else cfg.amp
    model.to(device)
    short = cfg.short_side or model.preprocessing_contract().short_side
    n = len(data)
    show = progress and rank == 0
    on_features = cfg.train_backbone_stages <= 0
    size = target_size(data.images.shape[1], data.images.shape[2], short)
    # the contract this model is trained under; its bundle records it and every consumer serves with it
    model.preprocessing = Preprocessing(
        short_side=int(short),
        mean=tuple(model.backbone.mean),
        std=tuple(model.backbone.std),
        frame_size=(int(data.images.shape[1]), int(data.images.shape[2])),
        temporal_fps=float(cfg.temporal_fps),
        interpolation="area",
        source="training",
    )
    model.backbone.input_size = size
    if on_features:
        feats, _ = extract_features(model, data.images, short, progress=show)
        inputs: list[torch.Tensor] | np.ndarray = feats
        stride4 = feats[0].shape[-2:]
    else:
        inputs = _resize_batch(data.images, size, cv2.INTER_AREA)
        stride4 = (size[0] // 4, size[1] // 4)
    masks = None
    if data.masks is not None:
        masks = torch.from_numpy(
            _resize_batch(data.masks, (stride4[0] * 2, stride4[1] * 2), cv2.INTER_NEAREST)
        ).long()
    phases = torch.from_numpy(np.asarray(data.phases, dtype=np.int64)) if data.phases is not None else None
    cvs = torch.from_numpy(np.asarray(data.cvs, dtype=np.float32)) if data.cvs is not None else None

    for p in model.parameters():
        p.requires_grad_(False)
    head_params = [
        p for h in (model.seg_head, model.phase_head.frame, model.cvs_head) for p in h.parameters()
    ]
    bb_params = trainable_backbone_params(model, cfg.train_backbone_stages)
    for p in head_params + bb_params:
        p.requires_grad_(True)
    groups = [{"params": head_params, "lr": cfg.lr}]
    if bb_params:
        groups.append({"params": bb_params, "lr": cfg.backbone_lr})
    optim = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    sampler = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed)
    per_epoch = max(1, math.ceil(len(sampler) / cfg.batch_size))
    total = cfg.epochs * per_epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(
        optim, max_lr=[g["lr"] for g in groups], total_steps=max(1, total)
    )
    net: nn.Module = _TrainNet(model, on_features)
    if world > 1:
        net = nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None
        )

    history = FinetuneHistory()
    step, temporal_done = 0, False
    sums = {"segmentation": 0.0, "phase": 0.0, "cvs": 0.0}
    ckpt_path = Path(cfg.checkpoint_dir) / "finetune_last.pt" if cfg.checkpoint_dir else None
    run_key = hashlib.sha256((cfg.key() + data.fingerprint() + str(world)).encode()).hexdigest()[:16]
    if ckpt_path is not None and cfg.resume and ckpt_path.exists():
        state = torch.load(ckpt_path, map_location=device, weights_only=True)
        if state.get("run_key") == run_key:
            model.load_state_dict(state["model"], strict=False)
            optim.load_state_dict(state["optim"])
            sched.load_state_dict(state["sched"])
            step, sums = int(state["step"]), state["sums"]
            history.losses = state["losses"]
            history.resumed_from_step = step
            torch.set_rng_state(state["torch_rng"])
            temporal_done = bool(state.get("temporal_done")) and step >= total

    def save_checkpoint() -> None:
        if ckpt_path is None or rank != 0:
            return
        own = model.heads_state_dict() if not bb_params else model.state_dict()
        _atomic_save(
            {
                "run_key": run_key,
                "step": step,
                "model": {k: v.detach().cpu() for k, v in own.items()},
                "optim": optim.state_dict(),
                "sched": sched.state_dict(),
                "sums": sums,
                "losses": history.losses,
                "torch_rng": torch.get_rng_state(),
                "temporal_done": step >= total and bool(model.phase_head.temporal_trained),
            },
            ckpt_path,
        )

    model.train()
    if on_features:
        model.backbone.eval()
    else:  # frozen early stages keep their norm statistics; only unfrozen stages train
        model.backbone.eval()
        for s in list(model.backbone.trunk.stages)[-cfg.train_backbone_stages :]:
            s.train()
    t_start, seen = time.perf_counter(), 0
    bar = tqdm(total=total, initial=step, desc="fine-tuning", disable=not show)
    while step < total:
        epoch, within = divmod(step, per_epoch)
        sampler.set_epoch(epoch)
        order = list(iter(sampler))
        if within == 0:
            sums = {"segmentation": 0.0, "phase": 0.0, "cvs": 0.0}
        if _stop_now(cfg.deadline, device):
            history.stopped_early = True
            break
        idx = torch.tensor(order[within * cfg.batch_size : (within + 1) * cfg.batch_size], dtype=torch.long)
        if on_features:
            x: list[torch.Tensor] | torch.Tensor = [s[idx].to(device).float() for s in inputs]
        else:
            x = normalise(model, inputs[idx.numpy()], device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = net(x)
        seg_logits, ph_logits, cvs_logits = (
            out.seg_logits.float(),
            out.phase_logits.float(),
            out.cvs_logits.float(),
        )
        # every output takes part in the loss, so DDP sees gradients for every trainable parameter
        loss = (seg_logits.sum() + ph_logits.sum() + cvs_logits.sum()) * 0
        if masks is not None:
            target = masks[idx].to(device)
            if (target != IGNORE_INDEX).any():
                logits = F.interpolate(
                    seg_logits, size=target.shape[-2:], mode="bilinear", align_corners=False
                )
                seg = F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX)
                seg = seg + cfg.dice_weight * dice_loss(logits, target)
                loss = loss + seg
                sums["segmentation"] += float(seg.detach()) * len(idx)
        if phases is not None and (phases[idx] >= 0).any():
            ph = F.cross_entropy(ph_logits, phases[idx].to(device), ignore_index=-1)
            loss = loss + ph
            sums["phase"] += float(ph.detach()) * len(idx)
        if cvs is not None:
            target_cvs = cvs[idx].to(device)
            known = ~torch.isnan(target_cvs)
            if known.any():
                cv = F.binary_cross_entropy_with_logits(cvs_logits[known], target_cvs[known])
                loss = loss + cv
                sums["cvs"] += float(cv.detach()) * len(idx)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        sched.step()
        step += 1
        seen += len(idx)
        bar.update(1)
        if step % per_epoch == 0:
            for k, v in sums.items():
                history.losses[k].append(v / max(1, len(sampler)))
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < total:
            save_checkpoint()
    bar.close()
    elapsed = time.perf_counter() - t_start
    history.images_per_second = seen * world / elapsed if elapsed > 0 and seen else None
    history.steps = step
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if (
        phases is not None
        and data.video_ids is not None
        and (phases >= 0).any()
        and not history.stopped_early
        and not temporal_done
    ):
        emb = embeddings_for(model, inputs, on_features, device, amp)
        if rank == 0:
            sequences = temporal_sequences(data, cfg.temporal_fps)
            history.temporal_losses = train_temporal(model, emb, phases, sequences, cfg, show)
        if world > 1:
            for t in list(model.phase_head.temporal.parameters()) + [model.phase_head.temporal_trained]:
                dist.broadcast(t.data, src=0)
    if ckpt_path is not None and rank == 0:
        save_checkpoint()  # final state: a rerun with the same data resumes straight to the temporal model
    return history


@torch.inference_mode()
def embeddings_for(
    model: SurgeNetAssistModel,
    inputs: list[torch.Tensor] | np.ndarray,
    on_features: bool,
    device: torch.device,
    amp: bool,
    batch_size: int = 16,
) -> torch.Tensor:
    """Pooled frame embeddings (float32, CPU) from cached features or from resized images."""
    if on_features:
        return model.backbone.pool(inputs[-1].to(device).float()).float().cpu()
    out = []
    for start in range(0, len(inputs), batch_size):
        x = normalise(model, inputs[start : start + batch_size], device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out.append(model.backbone.pool(model.backbone(x)[-1]).float().cpu())
    return torch.cat(out)


def _grid_step(fps: float, temporal_fps: float) -> float:
    """Frames between two samples of the temporal model: video fps / temporal fps (at least 1)."""
    return max(1.0, float(fps) / float(temporal_fps)) if temporal_fps > 0 else 1.0


def temporal_grid(frame_count: int, fps: float, temporal_fps: float = 1.0) -> np.ndarray:
    """Frame indices of a video at ``temporal_fps``: the frame nearest each time k / temporal_fps (as
    ``Video.sample_indices``); e.g. 1 fps of a 25 fps video gives 0, 25, 50, ..."""
    step = _grid_step(fps, temporal_fps)
    idx = np.round(np.arange(0, max(0, frame_count), step)).astype(np.int64)
    return idx[idx < frame_count]


def temporal_sequences(
    data: LabelledFrames, temporal_fps: float = 1.0, *, keep_unlabelled: bool = False
) -> list[np.ndarray]:
    """Row indices of the uniform sequences the temporal model trains on, in temporal order.

    Per video, only rows whose frame lies on the ``temporal_fps`` grid of the video (:func:`temporal_grid`)
    are kept, and a sequence is cut wherever a grid position is missing, so every sequence is uniformly
    spaced at video fps / temporal fps: keyframes labelled at other rates (a 25 fps segmentation burst)
    stay out of it (the frame heads still train on every row). Sequences without any phase label are dropped.
    Without ``frame_indices``/``fps`` (frames not from the store) every video's rows form one sequence.
    ``keep_unlabelled``: keep sequences without a phase label too (evaluation predicts every sequence).
    """
    if data.video_ids is None:
        return []
    phases = data.phases if data.phases is not None else np.full(len(data), -1)
    out: list[np.ndarray] = []
    for v in np.unique(data.video_ids):
        rows = np.flatnonzero(data.video_ids == v)
        if data.frame_indices is None or data.fps is None:
            runs = [rows]
        else:
            idx = data.frame_indices[rows]
            rows, idx = rows[np.argsort(idx, kind="stable")], np.sort(idx, kind="stable")
            step = _grid_step(float(data.fps[rows[0]]), temporal_fps)
            k = np.round(idx / step).astype(np.int64)
            on_grid = np.round(k * step).astype(np.int64) == idx
            rows, k = rows[on_grid], k[on_grid]
            cuts = np.flatnonzero(np.diff(k) != 1) + 1
            runs = np.split(rows, cuts)
        out += [r for r in runs if len(r) and (keep_unlabelled or (phases[r] >= 0).any())]
    return out


def train_temporal(
    model: SurgeNetAssistModel,
    embeddings: torch.Tensor,
    phases: torch.Tensor,
    sequences: list[np.ndarray],
    cfg: FinetuneConfig,
    progress: bool = True,
) -> list[float]:
    """Fit the causal TCN on uniform embedding sequences (row indices in temporal order, see
    :func:`temporal_sequences`)."""
    tcn = model.phase_head.temporal
    device = next(tcn.parameters()).device
    for p in tcn.parameters():
        p.requires_grad_(True)
    tcn.train()
    gen = torch.Generator().manual_seed(cfg.seed)
    optim = torch.optim.AdamW(tcn.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    pairs = [
        (embeddings[torch.from_numpy(rows)].to(device), phases[torch.from_numpy(rows)].to(device))
        for rows in sequences
    ]
    pairs = [(e, t) for e, t in pairs if (t >= 0).any()]
    losses = []
    with torch.enable_grad():
        for _ in tqdm(range(cfg.temporal_epochs), desc="temporal model", disable=not progress):
            total = 0.0
            for emb, target in pairs:
                # feature noise keeps the TCN from trusting training-set embeddings too much
                noise = torch.randn(emb.shape, generator=gen).to(device)
                outs = tcn((emb + 0.1 * emb.std() * noise)[None])
                loss = sum(F.cross_entropy(o[0], target, ignore_index=-1) for o in outs) / len(outs)
                optim.zero_grad(set_to_none=True)
                loss.backward()
                optim.step()
                total += float(loss.detach())
            losses.append(total / max(1, len(pairs)))
    tcn.eval()
    for p in tcn.parameters():
        p.requires_grad_(False)
    model.phase_head.temporal_trained.fill_(True)
    return losses
