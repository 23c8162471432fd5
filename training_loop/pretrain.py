"""Continued self-supervised pretraining of the backbone, DINO style, on the store's frames.

Student and teacher start from the current backbone (SurgeNetXL or a previously adapted one) with a fresh
DINO head (MLP -> L2-normalised bottleneck -> weight-normalised prototypes). The teacher is the EMA of
the student (momentum cosine-scheduled towards 1) and sees the two global crops; the student sees global
and local crops; the loss is cross-entropy between the teacher's sharpened assignment and the student's
distribution. Batches mix new frames with a replay share of earlier frames, the LR re-warms then re-decays
(continual-pretraining recipe). The adapted backbone (teacher) is kept only if heads fine-tuned on it beat
the current backbone on validation (:func:`select_backbone`).

The recipe is sized for small batches (8-32 frames, what a nightly on one GPU or a CPU bench affords), where
DINO v1's EMA centring over 4096 prototypes collapsed (loss stuck at ln(out_dim), bench/README.md):

- **Sinkhorn-Knopp centring** (DINOv2): the teacher's assignments are made doubly stochastic over the
  batch, so every prototype gets an equal share of every batch; an EMA centre needs many batches to learn
  what "average" is and a batch of 8 cannot hold it up;
- a **KoLeo** term on the student's normalised backbone embeddings (DINOv2): pushes each frame away from its
  nearest neighbour in the batch, a direct force against all frames mapping to one point;
- **teacher-temperature warm-up** (0.02 -> 0.04, student 0.2): very sharp early targets break the symmetry
  of a fresh head, then the teacher softens;
- **multi-crop** (local crops see parts, must match the teacher's whole-frame view);
- **fewer prototypes** (512 by default): with K prototypes and B frames per batch, equipartition over
  K >> B cannot be met by a batch and each prototype sees a sample every K/B steps.

Each is a :class:`DINOConfig` option, so ``bench/pretrain.py --ablation`` can switch it off.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.transforms import v2
from tqdm.auto import tqdm

from surgenet_assist.core.backbone import SurgeNetBackbone
from surgenet_assist.core.model import SurgeNetAssistModel
from surgenet_assist.core.paths import data_home
from surgenet_assist.core.store import LabelStore
from surgenet_assist.core.video import open_video

from .evaluate import overall_score, paired_per_video
from .fitting import fit
from .registry import paired_test, per_video_gains

#: Teacher centrings :class:`DINOLoss` knows: DINOv2's Sinkhorn-Knopp, DINO v1's EMA centre.
CENTERINGS = ("sinkhorn", "ema")


class DINOHead(nn.Module):
    """DINO projection head: 3-layer MLP, L2-normalised bottleneck, weight-normalised last layer (DINO's
    initialisation)."""

    def __init__(self, in_dim: int, out_dim: int = 4096, hidden: int = 1024, bottleneck: int = 256) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden),
            nn.GELU(),
            nn.Linear(hidden, hidden),
            nn.GELU(),
            nn.Linear(hidden, bottleneck),
        )
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                # DINO's init: small weights, zero bias. PyTorch's default bias init puts a constant vector of
                # the weights' order into every layer; with random-init features that differ little between
                # frames, the bias then sets the normalised bottleneck's direction, every frame gets the
                # same output and the loss starts (and stays) at ln(out_dim)
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last = nn.utils.parametrizations.weight_norm(nn.Linear(bottleneck, out_dim, bias=False))
        self.last.parametrizations.weight.original0.data.fill_(1.0)  # norm_last_layer: fixed unit norms
        self.last.parametrizations.weight.original0.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(F.normalize(self.mlp(x), dim=-1))


@torch.no_grad()
def sinkhorn_knopp(logits: torch.Tensor, temp: float, iterations: int = 3) -> torch.Tensor:
    """Teacher assignments (B, K) from logits (B, K): ``softmax(logits / temp)`` rescaled, by alternating
    row and column normalisation (DINOv2's Sinkhorn-Knopp centring), so that every sample's row sums to 1
    and every prototype's column to B / K (equipartition within the batch: no prototype can take all)."""
    logits = logits.float()
    shift = logits.max()  # for exp's range; a constant factor that the normalisation removes
    batch = logits.shape[0]
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if distributed:
        torch.distributed.all_reduce(shift, op=torch.distributed.ReduceOp.MAX)
        batch *= torch.distributed.get_world_size()
    q = torch.exp((logits - shift) / temp).t()  # (K, B)
    k = q.shape[0]
    total = q.sum()
    if distributed:
        torch.distributed.all_reduce(total)
    q /= total
    for _ in range(iterations):
        rows = q.sum(dim=1, keepdim=True)  # per prototype, over the (global) batch
        if distributed:
            torch.distributed.all_reduce(rows)
        q /= rows
        q /= k
        q /= q.sum(dim=0, keepdim=True)  # per sample
        q /= batch
    q *= batch
    return q.t()


def koleo_loss(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Kozachenko-Leonenko entropy estimator term (DINOv2): ``-mean(log(distance to nearest neighbour))`` of
    the L2-normalised rows of ``x``. Low when the points spread over the sphere, high when they clump, so
    adding it to the loss resists the collapse of all embeddings to one point."""
    x = F.normalize(x.float(), dim=-1, eps=eps)
    with torch.no_grad():
        dots = x @ x.t()
        dots.fill_diagonal_(-2.0)  # a point is not its own neighbour
        nearest = dots.argmax(dim=1)
    distances = F.pairwise_distance(x, x[nearest], eps=eps)
    return -torch.log(distances + eps).mean()


class DINOLoss(nn.Module):
    """Cross-entropy between the teacher's sharpened assignments and the student's distributions over crop
    pairs. ``centering="sinkhorn"`` (default) makes the teacher's assignments doubly stochastic per batch;
    ``"ema"`` is DINO v1's centre (an EMA of teacher outputs subtracted before the softmax)."""

    def __init__(
        self,
        out_dim: int,
        student_temp: float = 0.2,
        teacher_temp: float = 0.04,
        center_momentum: float = 0.9,
        centering: str = "sinkhorn",
        sinkhorn_iterations: int = 3,
    ) -> None:
        super().__init__()
        if centering not in CENTERINGS:
            raise ValueError(f"centering must be one of {CENTERINGS}, got {centering!r}")
        self.student_temp, self.teacher_temp, self.center_momentum = (
            student_temp,
            teacher_temp,
            center_momentum,
        )
        self.centering, self.sinkhorn_iterations = centering, sinkhorn_iterations
        self.register_buffer("center", torch.zeros(1, out_dim))

    def targets(self, teacher: list[torch.Tensor], teacher_temp: float | None = None) -> list[torch.Tensor]:
        """The teacher's assignment per global crop (rows sum to 1), without gradient."""
        temp = self.teacher_temp if teacher_temp is None else teacher_temp
        if self.centering == "sinkhorn":
            # all global crops together, as DINOv2 does: the equipartition holds over the whole batch
            q = sinkhorn_knopp(torch.cat(teacher), temp, self.sinkhorn_iterations)
            return list(q.chunk(len(teacher)))
        return [F.softmax((t - self.center) / temp, dim=-1).detach() for t in teacher]

    def forward(
        self, student: list[torch.Tensor], teacher: list[torch.Tensor], teacher_temp: float | None = None
    ) -> torch.Tensor:
        targets = self.targets(teacher, teacher_temp)
        total, pairs = 0.0, 0
        for i, q in enumerate(targets):
            for v, s in enumerate(student):
                if v == i:  # the same view is not its own target
                    continue
                total = total + torch.sum(-q * F.log_softmax(s / self.student_temp, dim=-1), dim=-1).mean()
                pairs += 1
        if self.centering == "ema":
            self.update_center(torch.cat(teacher))
        return total / pairs

    @torch.no_grad()
    def update_center(self, teacher_out: torch.Tensor) -> None:
        batch_center = teacher_out.mean(dim=0, keepdim=True)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(batch_center)
            batch_center /= torch.distributed.get_world_size()
        self.center.mul_(self.center_momentum).add_(batch_center * (1 - self.center_momentum))


class MultiCrop:
    """DINO augmentations on uint8 (3, H, W) tensors: 2 global crops and ``n_local`` local crops.

    ``photometric=False`` keeps only crops and flips: no colour jitter, greyscale, blur or solarisation.
    Colour carries meaning in surgery (blood, fat, metal), and from random init at a few hundred steps the
    photometric invariances were too hard a task: the run sat at ln(out_dim) (bench/pretrain.py).
    """

    def __init__(
        self,
        global_size: int = 224,
        local_size: int = 96,
        n_local: int = 6,
        global_scale: tuple[float, float] = (0.4, 1.0),
        local_scale: tuple[float, float] = (0.05, 0.4),
        mean: tuple[float, ...] = (0.485, 0.456, 0.406),
        std: tuple[float, ...] = (0.229, 0.224, 0.225),
        photometric: bool = True,
    ):
        flip_jitter: list[v2.Transform] = [v2.RandomHorizontalFlip()]
        if photometric:
            flip_jitter += [
                v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
                v2.RandomGrayscale(p=0.2),
            ]
        norm = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]

        def blur(p: float) -> list[v2.Transform]:
            return [v2.RandomApply([v2.GaussianBlur(9, sigma=(0.1, 2.0))], p=p)] if photometric else []

        solarize = [v2.RandomSolarize(128, p=0.2)] if photometric else []
        self.global1 = v2.Compose(
            [
                v2.RandomResizedCrop(global_size, scale=global_scale, antialias=True),
                *flip_jitter,
                *blur(1.0),
                *norm,
            ]
        )
        self.global2 = v2.Compose(
            [
                v2.RandomResizedCrop(global_size, scale=global_scale, antialias=True),
                *flip_jitter,
                *blur(0.1),
                *solarize,
                *norm,
            ]
        )
        self.local = v2.Compose(
            [
                v2.RandomResizedCrop(local_size, scale=local_scale, antialias=True),
                *flip_jitter,
                *blur(0.5),
                *norm,
            ]
        )
        self.n_local = n_local

    def __call__(self, image: torch.Tensor) -> list[torch.Tensor]:
        return [self.global1(image), self.global2(image)] + [self.local(image) for _ in range(self.n_local)]


class _Embed(nn.Module):
    """Backbone -> pooled embedding -> DINO head."""

    def __init__(self, backbone: SurgeNetBackbone, head: DINOHead) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(
        self, crops: list[torch.Tensor], with_embeddings: bool = False
    ) -> list[torch.Tensor] | tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Head outputs per crop; with ``with_embeddings`` also the pooled backbone embeddings per crop
        (what KoLeo spreads: the features the product uses, not the head's)."""
        # crops of equal size go through together (as in DINO's MultiCropWrapper)
        out, embs, start = [], [], 0
        while start < len(crops):
            end = start
            while end < len(crops) and crops[end].shape == crops[start].shape:
                end += 1
            x = torch.cat(crops[start:end])
            emb = self.backbone.pool(self.backbone(x)[-1])
            out.extend(self.head(emb).float().chunk(end - start))
            embs.extend(emb.float().chunk(end - start))
            start = end
        return (out, embs) if with_embeddings else out


def cosine(base: float, final: float, step: int, total: int, warmup: int = 0, start: float = 0.0) -> float:
    if step < warmup:
        return start + (base - start) * step / max(1, warmup)
    t = (step - warmup) / max(1, total - warmup)
    return final + 0.5 * (base - final) * (1 + math.cos(math.pi * min(1.0, t)))


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """θ_t <- m θ_t + (1 - m) θ_s for every parameter."""
    for pt, ps in zip(teacher.parameters(), student.parameters(), strict=True):
        pt.mul_(momentum).add_(ps.detach(), alpha=1 - momentum)


@dataclasses.dataclass
class DINOConfig:
    """One DINO run. Defaults: the small-batch recipe (module docstring); each of its pieces can be switched
    off for an ablation: ``centering="ema"``, ``koleo_weight=0``, ``teacher_temp_warmup=0``,
    ``local_crops=0``, ``out_dim=4096``."""

    steps: int = 300
    batch_size: int = 32
    lr: float = 5e-5  # re-warm to a low peak: 0.1x of DINO's 5e-4 * B/256 order
    min_lr: float = 1e-6
    warmup_steps: int = 30
    weight_decay: float = 0.04
    momentum: float = 0.996  # teacher EMA momentum, cosine to 1
    out_dim: int = 512  # prototypes: 256-1024 for batches of 8-32 (DINO's 65536 assumes batch 1024)
    global_size: int = 224
    local_size: int = 96
    local_crops: int = 6  # 0: no multi-crop, the two global crops only
    global_scale: tuple[float, float] = (0.4, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.4)
    photometric: bool = True  # colour jitter, greyscale, blur, solarise (MultiCrop)
    replay_fraction: float = 0.3
    # sharpening: teacher 5-10x sharper than the student. At small batch the Sinkhorn-Knopp targets only keep
    # what differs between the batch's frames, which is little at the start; a very sharp early teacher
    # amplifies it (with DINO's 0.1 / 0.04-0.07 the run drifted to uniform outputs, bench/pretrain.py)
    student_temp: float = 0.2
    teacher_temp: float = 0.04  # after the warm-up
    warmup_teacher_temp: float = 0.02
    teacher_temp_warmup: float = 0.3  # fraction of ``steps`` over which the temperature rises; 0: constant
    centering: str = "sinkhorn"  # or "ema" (DINO v1)
    sinkhorn_iterations: int = 3
    center_momentum: float = 0.9  # "ema" centring only
    koleo_weight: float = 0.1  # DINOv2's weight; 0 switches KoLeo off
    clip_grad: float = 3.0
    seed: int = 0
    checkpoint_path: str | None = None
    checkpoint_every: int = 50


class DINOTrainer:
    """Student/teacher pair on a copy of ``backbone``; :meth:`train` runs the steps, :meth:`adapted` returns
    the teacher backbone (DINO's released weights are the teacher's)."""

    def __init__(self, backbone: SurgeNetBackbone, cfg: DINOConfig, device: str | None = None) -> None:
        self.cfg = cfg
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        torch.manual_seed(cfg.seed)
        student_bb = copy.deepcopy(backbone).to(self.device)
        for p in student_bb.parameters():
            p.requires_grad_(True)
        self.student = _Embed(student_bb, DINOHead(backbone.embed_dim, cfg.out_dim)).to(self.device)
        self.teacher = copy.deepcopy(self.student)
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.loss = DINOLoss(
            cfg.out_dim,
            cfg.student_temp,
            cfg.teacher_temp,
            cfg.center_momentum,
            cfg.centering,
            cfg.sinkhorn_iterations,
        ).to(self.device)
        params = [p for p in self.student.parameters() if p.requires_grad]
        self.optim = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.crops = MultiCrop(
            cfg.global_size,
            cfg.local_size,
            cfg.local_crops,
            global_scale=tuple(cfg.global_scale),
            local_scale=tuple(cfg.local_scale),
            mean=backbone.mean,
            std=backbone.std,
            photometric=cfg.photometric,
        )
        self.step = 0
        self.losses: list[float] = []
        #: per step: mean over prototypes of the std over the batch of the teacher's head output (cosines);
        #: near 0 when every frame gets the same output (the other DINO collapse, loss alone can miss it)
        self.teacher_stds: list[float] = []
        self.koleo: list[float] = []
        self.amp = self.device.type == "cuda"

    def state(self) -> dict[str, Any]:
        return {
            "student": self.student.state_dict(),
            "teacher": self.teacher.state_dict(),
            "center": self.loss.center.cpu(),
            "optim": self.optim.state_dict(),
            "step": self.step,
            "losses": self.losses,
            "teacher_stds": self.teacher_stds,
            "koleo": self.koleo,
            "config": dataclasses.asdict(self.cfg),
        }

    def _save(self) -> None:
        if not self.cfg.checkpoint_path:
            return
        path = Path(self.cfg.checkpoint_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        torch.save(self.state(), tmp)
        os.replace(tmp, path)

    def batch(self, images: list[np.ndarray]) -> list[torch.Tensor]:
        views = [self.crops(torch.from_numpy(im).permute(2, 0, 1).contiguous()) for im in images]
        return [torch.stack([v[k] for v in views]).to(self.device) for k in range(len(views[0]))]

    def train_step(self, images: list[np.ndarray]) -> float:
        cfg = self.cfg
        total = cfg.steps
        lr = cosine(cfg.lr, cfg.min_lr, self.step, total, cfg.warmup_steps)
        for g in self.optim.param_groups:
            g["lr"] = lr
        crops = self.batch(images)
        self.student.train()
        self.teacher.train()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            with torch.no_grad():
                t_out = self.teacher(crops[:2])
            s_out, s_emb = self.student(crops, with_embeddings=True)
        dino = self.loss(s_out, t_out, self.teacher_temp_at(self.step))
        loss = dino
        if cfg.koleo_weight:
            # per global crop, as DINOv2: the spread is within one view of the batch
            koleo = sum(koleo_loss(e) for e in s_emb[:2]) / 2
            loss = dino + cfg.koleo_weight * koleo
            self.koleo.append(float(koleo.detach()))
        self.optim.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_([p for p in self.student.parameters() if p.requires_grad], cfg.clip_grad)
        self.optim.step()
        ema_update(self.teacher, self.student, self.momentum_at(self.step))
        self.step += 1
        self.losses.append(float(dino.detach()))  # DINO's term alone: ln(out_dim) is its collapse level
        self.teacher_stds.append(float(torch.cat(t_out).float().std(dim=0).mean()))
        if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
            self._save()
        return self.losses[-1]

    def teacher_temp_at(self, step: int) -> float:
        """Linear warm-up from ``warmup_teacher_temp`` to ``teacher_temp`` over the first
        ``teacher_temp_warmup`` of the steps, then constant (DINO's schedule, in steps, not epochs)."""
        cfg = self.cfg
        warm = int(round(cfg.teacher_temp_warmup * cfg.steps))
        if step >= warm:
            return cfg.teacher_temp
        return cfg.warmup_teacher_temp + (cfg.teacher_temp - cfg.warmup_teacher_temp) * step / warm

    def momentum_at(self, step: int) -> float:
        return 1 - (1 - self.cfg.momentum) * (math.cos(math.pi * step / max(1, self.cfg.steps)) + 1) / 2

    def train(
        self,
        new: FramePool,
        replay: FramePool | None = None,
        deadline: float | None = None,
        progress: bool = True,
    ) -> list[float]:
        rng = np.random.default_rng(self.cfg.seed + self.step)
        n_replay = int(round(self.cfg.batch_size * self.cfg.replay_fraction)) if replay and len(replay) else 0
        for _ in tqdm(range(self.step, self.cfg.steps), desc="continued pretraining", disable=not progress):
            if deadline is not None and time.time() > deadline:
                break
            images = new.sample(rng, self.cfg.batch_size - n_replay)
            if n_replay:
                images += replay.sample(rng, n_replay)
            self.train_step(images)
        self._save()
        return self.losses

    def adapted(self) -> SurgeNetBackbone:
        bb = copy.deepcopy(self.teacher.backbone).cpu().eval()
        for p in bb.parameters():
            p.requires_grad_(False)
        bb.weights_origin = "continued-pretraining"
        return bb


class FramePool:
    """Frames addressed as (video path, fps, index), decoded on demand (a small LRU of open videos)."""

    def __init__(
        self, items: list[tuple[str, float | None, int]], size: tuple[int, int] | None = None
    ) -> None:
        self.items = items
        self.size = size
        self._open: dict[str, Any] = {}

    def __len__(self) -> int:
        return len(self.items)

    def sample(self, rng: np.random.Generator, n: int) -> list[np.ndarray]:
        import cv2

        out = []
        for i in rng.integers(0, len(self.items), n):
            path, fps, index = self.items[int(i)]
            if path not in self._open:
                if len(self._open) > 8:
                    self._open.pop(next(iter(self._open))).close()
                self._open[path] = open_video(path, fps=fps)
            image = self._open[path].read_frame(index)
            if self.size is not None:
                image = cv2.resize(image, (self.size[1], self.size[0]), interpolation=cv2.INTER_AREA)
            out.append(image)
        return out


class MemoryFramePool:
    """A :class:`FramePool` over frames already in memory ((N, H, W, 3) uint8): benchmarks and tests that
    pretrain on synthetic clips without writing them to video files."""

    def __init__(self, frames: np.ndarray) -> None:
        self.frames = frames

    def __len__(self) -> int:
        return len(self.frames)

    def sample(self, rng: np.random.Generator, n: int) -> list[np.ndarray]:
        return [self.frames[int(i)] for i in rng.integers(0, len(self.frames), n)]


def frame_pools(
    store: LabelStore,
    project: str | None,
    max_frames: int,
    seen_videos: set[str],
    size: tuple[int, int] | None,
    fps: float = 1.0,
) -> tuple[FramePool, FramePool]:
    """New frames (videos not in ``seen_videos``) and replay frames (earlier videos), sampled at ``fps``.

    Only training-split videos: validation frames decide whether the adapted backbone is kept and test
    frames decide promotion, so neither may shape the backbone (a video without a split yet is left out
    too: it may become a validation or test video).
    """
    new, old = [], []
    for v in store.videos(project):
        if v["split"] != "train" or not v.get("frame_count"):
            continue
        step = max(1, int(round((v.get("fps") or fps) / fps)))
        items = [(v["path"], v.get("fps"), i) for i in range(0, v["frame_count"], step)]
        (old if v["path"] in seen_videos else new).extend(items)
    rng = np.random.default_rng(0)
    if len(new) > max_frames:
        new = [new[i] for i in sorted(rng.choice(len(new), max_frames, replace=False))]
    if len(old) > max_frames:
        old = [old[i] for i in sorted(rng.choice(len(old), max_frames, replace=False))]
    if not new:  # nothing new: adapt on everything (still a valid continuation)
        new, old = old, []
    return FramePool(new, size), FramePool(old, size)


def continue_pretraining(
    store: LabelStore, backbone: SurgeNetBackbone, cfg: Any, deadline: float | None = None
) -> tuple[SurgeNetBackbone, dict[str, Any]]:
    """Run DINO continuation for a nightly config (``cfg.pretrain``); returns the adapted backbone + info."""
    p = cfg.pretrain
    seen = set()
    for r in store.training_runs(task="pretrain"):
        seen |= set((r.get("params") or {}).get("videos", []))
    new, replay = frame_pools(store, cfg.project, p.max_frames, seen, cfg.frame_size)
    dcfg = DINOConfig(
        steps=p.steps,
        batch_size=p.batch_size,
        global_size=p.global_size,
        local_size=p.local_size,
        local_crops=p.local_crops,
        replay_fraction=p.replay_fraction,
        out_dim=p.out_dim,
        warmup_steps=max(1, p.steps // 10),
        checkpoint_path=str(data_home() / "pretrain" / "dino_last.pt"),
    )
    trainer = DINOTrainer(backbone, dcfg)
    started = time.time()
    losses = trainer.train(new, replay, deadline=deadline, progress=cfg.progress)
    info = {
        "steps": trainer.step,
        "new_frames_pool": len(new),
        "replay_pool": len(replay),
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "collapsed": dino_collapsed(losses, p.out_dim, teacher_stds=trainer.teacher_stds),
        "last_teacher_std": trainer.teacher_stds[-1] if trainer.teacher_stds else None,
        "seconds": round(time.time() - started, 1),
        "videos": sorted({path for path, _, _ in new.items + replay.items}),
    }
    return trainer.adapted(), info


#: Collapse thresholds registered in bench/README.md ("Continued pretraining", regime checks).
COLLAPSE_LOSS_MARGIN = 0.1
COLLAPSE_MIN_TEACHER_STD = 0.01


def dino_collapsed(
    losses: list[float], out_dim: int, window: int = 10, teacher_stds: list[float] | None = None
) -> bool:
    """True when the run taught the backbone nothing: the last DINO losses sit within
    ``COLLAPSE_LOSS_MARGIN`` of ln(out_dim) (teacher and student uniform over the prototypes, what DINO v1's
    recipe gave on CPU-budget runs, bench/README.md), or, given ``teacher_stds``, the teacher's outputs
    barely vary across frames (every frame mapped to the same output). Such a backbone is never kept,
    whatever validation says."""
    if len(losses) < window:
        return False
    if float(np.mean(losses[-window:])) >= math.log(out_dim) - COLLAPSE_LOSS_MARGIN:
        return True
    return bool(teacher_stds) and float(np.mean(teacher_stds[-window:])) <= COLLAPSE_MIN_TEACHER_STD


def select_backbone(
    model: Any,
    adapted: SurgeNetBackbone,
    splits: dict[str, Any],
    cfg: Any,
    manifest: str,
    deadline: float | None = None,
) -> dict[str, Any]:
    """Fine-tune heads on the current and on the adapted backbone; keep the adapted one only when it is better
    on validation by the promotion gate's own test and margin (``registry.paired_test`` over validation
    videos, ``cfg.margin``): a higher mean alone is noise with a few videos."""
    current = copy.deepcopy(model)
    candidate = SurgeNetAssistModel(adapted, model.schema)
    candidate.load_state_dict(model.heads_state_dict(), strict=False)
    candidate.backbone.input_size = model.backbone.input_size
    # fit copies: the winner goes back un-fitted, so the cycle fine-tunes it exactly like any candidate
    _, val_cur = fit(copy.deepcopy(current), splits, cfg, manifest, deadline, tag="backbone-current")
    _, val_new = fit(copy.deepcopy(candidate), splits, cfg, manifest, deadline, tag="backbone-adapted")
    s_cur, s_new = overall_score(val_cur["primary"]), overall_score(val_new["primary"])
    gains = per_video_gains(paired_per_video(val_new, val_cur))
    test = paired_test(list(gains.values()), cfg.margin, unit="validation videos")
    kept = test.better
    return {
        "kept": kept,
        "val_scores": {"current": s_cur, "adapted": s_new, "paired_test": test.to_dict()},
        "model": candidate if kept else current,
    }
