"""Instant heads: light classifiers on frozen SurgeNetXL features, refitted within seconds of a new label.

Before the nightly cycle has trained anything, a linear pixel classifier (a 1x1 convolution over the
stride-8 stage-2 features concatenated with the upsampled stage-3 features) and logistic regressions on the
pooled embedding (phase: multinomial; CVS: one per criterion) already give useful pre-annotations. They fit
on CPU in about a second because the backbone is frozen and features come from caches.

The artefact is a ``weights_only``-loadable torch file of plain tensors plus ``instant.json`` (no pickled
scikit-learn objects), under ``data_home()/instant/<version>/``. It is registered in the label store with
status ``instant`` (never ``champion``, so the nightly gate and rollback are untouched); serving prefers the
champion only when its validation score beats the instant head's (:func:`choose_serving`).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from surgenet_assist.core.paths import atomic_directory, data_home
from surgenet_assist.core.schema import DEFAULT_SCHEMA, LabelSchema
from surgenet_assist.core.store import INSTANT

from .evaluate import overall_score
from .metrics import SegmentationAccumulator, cvs_metrics, phase_video_metrics

log = logging.getLogger("surgenet_assist.instant")

INSTANT_STATUS = INSTANT  # the registry status of instant heads
RETIRED_STATUS = "instant-retired"
INSTANT_PREFIX = "instant-"
#: the splits whose labels fit instant heads
INSTANT_SPLITS = ("train", "val")


def fits_instant_heads(split: str | None) -> bool:
    """Whether the labels of a video in ``split`` may fit instant heads: train and val only. Test and final
    videos judge and report models, so they never shape what is served; and a video without a split (the store
    gives one at entry, but a split can be cleared by hand) might become a test video later."""
    return split in INSTANT_SPLITS


def instant_root() -> Path:
    return data_home() / "instant"


def pixel_features(stride8: np.ndarray | torch.Tensor, stride16: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(C8, h, w) + (C16, h', w') -> (h*w, C8+C16): the two stages L2-normalised per cell and concatenated
    (the same features label propagation matches on), so one linear map is a 1x1 conv over both scales."""
    s8 = torch.as_tensor(np.asarray(stride8, dtype=np.float32))
    s16 = torch.as_tensor(np.asarray(stride16, dtype=np.float32))
    s16 = F.interpolate(s16[None], size=s8.shape[-2:], mode="bilinear", align_corners=False)[0]
    return torch.cat([F.normalize(s8, dim=0), F.normalize(s16, dim=0)], 0).flatten(1).T


def soft_targets(mask: np.ndarray, grid: tuple[int, int], num_classes: int, ignore_index: int) -> np.ndarray:
    """(H, W) class ids -> (h*w, K) class fractions per feature cell; rows of ignored cells sum to < 0.5."""
    h, w = grid
    planes = np.stack(
        [
            cv2.resize((mask == k).astype(np.float32), (w, h), interpolation=cv2.INTER_AREA)
            for k in range(num_classes)
        ]
    )
    del ignore_index  # ignored pixels are simply in no plane
    return planes.reshape(num_classes, -1).T


@dataclass
class SegSample:
    stride8: np.ndarray
    stride16: np.ndarray
    mask: np.ndarray  # (H, W) class ids, 255 = ignore


@dataclass
class InstantHeads:
    """Weights of the instant heads as plain arrays (what is saved), with predict functions."""

    num_classes: int
    num_phases: int
    num_cvs: int
    seg_weight: np.ndarray | None = None  # (K, C)
    seg_bias: np.ndarray | None = None  # (K,)
    seg_mean: np.ndarray | None = None  # (C,) feature standardisation
    seg_scale: np.ndarray | None = None
    emb_mean: np.ndarray | None = None  # (D,) embedding standardisation for the regressions
    emb_scale: np.ndarray | None = None
    phase_coef: np.ndarray | None = None  # (P, D); rows of phases never labelled stay at -inf bias
    phase_bias: np.ndarray | None = None  # (P,)
    cvs_coef: np.ndarray | None = None  # (3, D)
    cvs_bias: np.ndarray | None = None  # (3,)
    meta: dict[str, Any] = field(default_factory=dict)

    # --- prediction ---------------------------------------------------------------------------------
    @property
    def has_seg(self) -> bool:
        return self.seg_weight is not None

    @property
    def has_phase(self) -> bool:
        return self.phase_coef is not None

    @property
    def has_cvs(self) -> bool:
        return self.cvs_coef is not None

    def seg_logits(self, stride8: np.ndarray, stride16: np.ndarray) -> torch.Tensor:
        """(K, h, w) logits on the stride-8 grid."""
        assert self.seg_weight is not None
        x = (pixel_features(stride8, stride16) - torch.from_numpy(self.seg_mean)) / torch.from_numpy(
            self.seg_scale
        )
        logits = x @ torch.from_numpy(self.seg_weight).T + torch.from_numpy(self.seg_bias)
        h, w = np.asarray(stride8).shape[-2:]
        return logits.T.reshape(-1, h, w)

    def seg_probs(self, stride8: np.ndarray, stride16: np.ndarray) -> np.ndarray:
        return torch.softmax(self.seg_logits(stride8, stride16), 0).numpy()

    def to_mask(self, probs: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """(K, h, w) probabilities -> full-size class mask and per-pixel confidence."""
        h, w = size
        up = np.stack([cv2.resize(p, (w, h), interpolation=cv2.INTER_LINEAR) for p in probs])
        return up.argmax(0).astype(np.uint8), up.max(0).astype(np.float16)

    def _standard(self, emb: np.ndarray) -> np.ndarray:
        return (np.asarray(emb, dtype=np.float32) - self.emb_mean) / self.emb_scale

    def phase_probs(self, emb: np.ndarray) -> np.ndarray:
        """(T, D) embeddings -> (T, P) phase probabilities (uniform without a phase head)."""
        emb = np.atleast_2d(emb)
        if self.phase_coef is None:
            return np.full((len(emb), self.num_phases), 1.0 / self.num_phases, np.float32)
        z = self._standard(emb) @ self.phase_coef.T + self.phase_bias
        z = z - z.max(1, keepdims=True)
        p = np.exp(z)
        return (p / p.sum(1, keepdims=True)).astype(np.float32)

    def cvs_probs(self, emb: np.ndarray) -> np.ndarray:
        """(T, D) -> (T, 3) probability that each criterion is met (0.5 without a CVS head)."""
        emb = np.atleast_2d(emb)
        if self.cvs_coef is None:
            return np.full((len(emb), self.num_cvs), 0.5, np.float32)
        z = self._standard(emb) @ self.cvs_coef.T + self.cvs_bias
        return (1.0 / (1.0 + np.exp(-np.clip(z, -30, 30)))).astype(np.float32)

    # --- persistence ----------------------------------------------------------------------------------
    _ARRAYS = (
        "seg_weight",
        "seg_bias",
        "seg_mean",
        "seg_scale",
        "emb_mean",
        "emb_scale",
        "phase_coef",
        "phase_bias",
        "cvs_coef",
        "cvs_bias",
    )

    def save(self, folder: str | Path) -> Path:
        """Write ``heads.pt`` (tensors only) and ``instant.json`` atomically (temp dir, then rename)."""
        folder = Path(folder)
        with atomic_directory(folder) as tmp:
            tensors = {
                k: torch.from_numpy(np.ascontiguousarray(getattr(self, k)))
                for k in self._ARRAYS
                if getattr(self, k) is not None
            }
            torch.save(tensors, tmp / "heads.pt")
            info = {
                "format": "surgenet-assist-instant/1",
                "num_classes": self.num_classes,
                "num_phases": self.num_phases,
                "num_cvs": self.num_cvs,
                "meta": self.meta,
            }
            (tmp / "instant.json").write_text(json.dumps(info, indent=2, default=str))
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> InstantHeads:
        folder = Path(folder)
        info = json.loads((folder / "instant.json").read_text())
        tensors = torch.load(folder / "heads.pt", map_location="cpu", weights_only=True)
        arrays = {k: v.numpy() for k, v in tensors.items() if k in cls._ARRAYS}
        return cls(info["num_classes"], info["num_phases"], info["num_cvs"], meta=info["meta"], **arrays)


# --- fitting ----------------------------------------------------------------------------------------------
def _fit_pixels(
    samples: Sequence[SegSample], num_classes: int, ignore_index: int, max_pixels: int, iters: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Multinomial logistic regression on sampled feature cells (L-BFGS, full batch, soft targets)."""
    rng = np.random.default_rng(seed)
    per_frame = max(64, max_pixels // max(1, len(samples)))
    xs, ys = [], []
    for s in samples:
        feats = pixel_features(s.stride8, s.stride16)
        grid = tuple(np.asarray(s.stride8).shape[-2:])
        target = soft_targets(s.mask, grid, num_classes, ignore_index)
        keep = np.flatnonzero(target.sum(1) >= 0.5)
        if len(keep) > per_frame:
            keep = rng.choice(keep, per_frame, replace=False)
        xs.append(feats[torch.from_numpy(keep)])
        t = target[keep]
        ys.append(torch.from_numpy(t / t.sum(1, keepdims=True)))
    x, y = torch.cat(xs), torch.cat(ys).float()
    mean, scale = x.mean(0), x.std(0).clamp_min(1e-4)
    x = (x - mean) / scale
    freq = y.sum(0) / y.sum()
    # sqrt-inverse class frequency: small structures (tools, ducts) matter for mIoU as much as background
    cw = torch.where(freq > 0, freq.clamp_min(1e-6).rsqrt(), torch.zeros_like(freq))
    cw = cw / (cw * freq).sum()
    lin = torch.nn.Linear(x.shape[1], num_classes)
    torch.nn.init.zeros_(lin.weight)
    with torch.no_grad():
        lin.bias.copy_(torch.log(freq.clamp_min(1e-4)))
    opt = torch.optim.LBFGS(
        lin.parameters(), lr=1.0, max_iter=iters, history_size=10, line_search_fn="strong_wolfe"
    )
    l2 = 1e-3

    def closure() -> torch.Tensor:
        opt.zero_grad()
        logp = torch.log_softmax(lin(x), 1)
        loss = -((y * logp) * cw).sum(1).mean() + l2 * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return (
        lin.weight.detach().numpy().copy(),
        lin.bias.detach().numpy().copy(),
        mean.numpy(),
        scale.numpy(),
    )


def _fit_logistic(x: np.ndarray, y: np.ndarray, num_out: int, c: float) -> tuple[np.ndarray, np.ndarray]:
    """Multinomial logistic regression -> (num_out, D) coefficients and (num_out,) biases; classes never
    seen get a very low bias. One class only: a constant prediction of that class."""
    from sklearn.linear_model import LogisticRegression

    classes = np.unique(y)
    coef = np.zeros((num_out, x.shape[1]), np.float32)
    bias = np.full(num_out, -20.0, np.float32)
    if len(classes) == 1:
        bias[int(classes[0])] = 0.0
        return coef, bias
    clf = LogisticRegression(C=c, max_iter=500)
    clf.fit(x, y)
    if len(classes) == 2:  # sklearn keeps one row for two classes: logit of classes[1] vs classes[0]
        coef[classes[1]], bias[classes[1]] = clf.coef_[0] / 2, clf.intercept_[0] / 2
        coef[classes[0]], bias[classes[0]] = -clf.coef_[0] / 2, -clf.intercept_[0] / 2
    else:
        coef[classes], bias[classes] = clf.coef_, clf.intercept_
    return coef, bias


def _fit_binary(x: np.ndarray, y: np.ndarray, c: float) -> tuple[np.ndarray, float]:
    """One CVS criterion: fractional targets become sample weights (y and 1-y) of a binary regression."""
    from sklearn.linear_model import LogisticRegression

    y = np.clip(np.asarray(y, dtype=np.float64), 0, 1)
    if (y >= 0.5).all() or (y < 0.5).all():  # one side only: constant at the (smoothed) mean rate
        p = float(np.clip((y.sum() + 0.5) / (len(y) + 1.0), 1e-3, 1 - 1e-3))
        return np.zeros(x.shape[1], np.float32), float(np.log(p / (1 - p)))
    xx = np.concatenate([x, x])
    yy = np.concatenate([np.ones(len(x)), np.zeros(len(x))])
    ww = np.concatenate([y, 1 - y]) + 1e-6
    clf = LogisticRegression(C=c, max_iter=500)
    clf.fit(xx, yy, sample_weight=ww)
    return clf.coef_[0].astype(np.float32), float(clf.intercept_[0])


def fit_instant(
    seg: Sequence[SegSample],
    phase: Sequence[tuple[np.ndarray, int]],
    cvs: Sequence[tuple[np.ndarray, np.ndarray]],
    schema: LabelSchema = DEFAULT_SCHEMA,
    *,
    max_pixels: int = 6_000,
    iters: int = 30,
    c: float = 0.5,
    seed: int = 0,
    meta: dict[str, Any] | None = None,
) -> InstantHeads:
    """Fit every head that has at least one label; the others predict uninformatively."""
    heads = InstantHeads(schema.num_classes, schema.num_phases, schema.num_cvs, meta=dict(meta or {}))
    if seg:
        w, b, m, s = _fit_pixels(seg, schema.num_classes, schema.ignore_index, max_pixels, iters, seed)
        heads.seg_weight, heads.seg_bias, heads.seg_mean, heads.seg_scale = w, b, m, s
    embs = [np.asarray(e, np.float32) for e, _ in phase] + [np.asarray(e, np.float32) for e, _ in cvs]
    if embs:
        all_emb = np.stack(embs)
        heads.emb_mean = all_emb.mean(0)
        heads.emb_scale = np.maximum(all_emb.std(0), 1e-3).astype(np.float32)
    if phase:
        x = heads._standard(np.stack([e for e, _ in phase]))
        heads.phase_coef, heads.phase_bias = _fit_logistic(
            x, np.array([p for _, p in phase]), schema.num_phases, c
        )
    if cvs:
        x = heads._standard(np.stack([e for e, _ in cvs]))
        values = np.stack([np.asarray(v, np.float64) for _, v in cvs])
        fits = [_fit_binary(x, values[:, j], c) for j in range(schema.num_cvs)]
        heads.cvs_coef = np.stack([f[0] for f in fits])
        heads.cvs_bias = np.array([f[1] for f in fits], np.float32)
    heads.meta.setdefault("counts", {"segmentation": len(seg), "phase": len(phase), "cvs": len(cvs)})
    return heads


# --- evaluation ----------------------------------------------------------------------------------------
def score_heads(
    heads: InstantHeads,
    seg: Sequence[SegSample],
    phase: Sequence[tuple[np.ndarray, int]],
    cvs: Sequence[tuple[np.ndarray, np.ndarray]],
    schema: LabelSchema = DEFAULT_SCHEMA,
) -> dict[str, float]:
    """Headline metrics (the nightly ``PRIMARY`` names' tasks: mIoU, phase Jaccard, CVS mAP) on held-out
    labels; a task without held-out labels (or without a head) is left out."""
    out: dict[str, float] = {}
    if seg and heads.has_seg:
        acc = SegmentationAccumulator(schema.num_classes, schema.ignore_index)
        for s in seg:
            mask, _ = heads.to_mask(heads.seg_probs(s.stride8, s.stride16), s.mask.shape)
            acc.update(mask, s.mask)
        out["segmentation"] = float(acc.result()["mIoU"])
    if phase and heads.has_phase:
        pred = heads.phase_probs(np.stack([e for e, _ in phase])).argmax(1)
        gt = np.array([p for _, p in phase])
        out["phase"] = float(phase_video_metrics([(pred, gt)], schema.num_phases)["jaccard"])
    if cvs and heads.has_cvs:
        probs = heads.cvs_probs(np.stack([e for e, _ in cvs]))
        target = np.stack([np.asarray(v, float) for _, v in cvs])
        res = cvs_metrics(probs, target, list(schema.cvs_keys))
        if res["ap_per_criterion"]:
            out["cvs"] = float(res["mAP"])
    return out


def held_out_videos(videos: Collection[str], val_videos: Collection[str] | None = None) -> set[str]:
    """Which videos validate the instant heads: the store's validation-split videos when any of them has
    labels (the frames the champion was validated on), else a deterministic fifth of the videos (by a hash
    of the name, at least one) when there are two or more; none for a single video."""
    names = sorted(set(videos))
    chosen = set(names) & set(val_videos or ())
    if chosen or len(names) < 2:
        return chosen
    ranked = sorted(names, key=lambda v: hashlib.sha256(v.encode()).hexdigest())
    return set(ranked[: max(1, len(names) // 5)])


def fit_with_validation(
    seg: Sequence[SegSample],
    phase: Sequence[tuple[np.ndarray, int]],
    cvs: Sequence[tuple[np.ndarray, np.ndarray]],
    schema: LabelSchema = DEFAULT_SCHEMA,
    *,
    videos: dict[str, Sequence[str]] | None = None,
    val_videos: Collection[str] | None = None,
    **kwargs: Any,
) -> InstantHeads:
    """Validation scores from a fit without the held-out *videos* (:func:`held_out_videos`; neighbouring
    frames of one video are not independent, so holding out frames would flatter the heads), then the
    served fit on all labels. ``videos[task][i]`` names the video of the i-th sample of that task; without
    it there is no validation (and a trained champion keeps serving)."""
    tasks = {"segmentation": seg, "phase": phase, "cvs": cvs}
    held: set[str] = set()
    if videos is not None:
        held = held_out_videos([v for task in tasks for v in videos.get(task, ())], val_videos)
    split: dict[str, tuple[list[int], list[int]]] = {}
    for task, items in tasks.items():
        names = list((videos or {}).get(task, ())) or [""] * len(items)
        split[task] = (
            [i for i in range(len(items)) if names[i] not in held],
            [i for i in range(len(items)) if names[i] in held],
        )
    val: dict[str, float] = {}
    if any(split[t][1] for t in tasks):
        (ts, vs), (tp, vp), (tc, vc) = split["segmentation"], split["phase"], split["cvs"]
        probe = fit_instant(
            [seg[i] for i in ts], [phase[i] for i in tp], [cvs[i] for i in tc], schema, **kwargs
        )
        val = score_heads(probe, [seg[i] for i in vs], [phase[i] for i in vp], [cvs[i] for i in vc], schema)
    heads = fit_instant(seg, phase, cvs, schema, **kwargs)
    heads.meta["val"] = {
        "primary": val,
        "held_out": {t: len(split[t][1]) for t in tasks},
        "videos": sorted(held),
    }
    return heads


# --- registry --------------------------------------------------------------------------------------------
def new_instant_version(label_version: int) -> str:
    return f"{INSTANT_PREFIX}{dt.datetime.now(dt.UTC):%Y%m%d-%H%M%S}-r{label_version}-{secrets.token_hex(2)}"


def register_instant(store: Any, heads: InstantHeads, root: str | Path | None = None) -> str:
    """Save the artefact and register it (status ``instant``); older instant heads become retired."""
    version = heads.meta.get("version") or new_instant_version(int(heads.meta.get("label_version", 0)))
    heads.meta["version"] = version
    folder = heads.save(Path(root or instant_root()) / version)
    store.register_model_version(
        version,
        task=None,
        bundle_path=str(folder),
        metrics={
            "val": heads.meta.get("val", {}),
            "kind": "instant",
            "counts": heads.meta.get("counts"),
            "label_version": heads.meta.get("label_version"),
            "backbone_sha256": heads.meta.get("backbone_sha256"),
        },
        status=INSTANT_STATUS,
    )
    for row in store.model_versions(status=INSTANT_STATUS):
        if row["version"] != version:
            store.set_model_status(row["version"], RETIRED_STATUS)
    return version


def latest_instant(store: Any) -> dict[str, Any] | None:
    rows = [r for r in store.model_versions(status=INSTANT_STATUS) if r.get("bundle_path")]
    return max(rows, key=lambda r: (r["created_at"], r["version"])) if rows else None


def _val_primary(row: dict[str, Any] | None) -> dict[str, float]:
    """Validation headline metrics of a registry row: instant heads store ``val.primary``; nightly
    candidates keep theirs under ``params.val.primary``."""
    metrics = (row or {}).get("metrics") or {}
    for path in (("val", "primary"), ("params", "val", "primary")):
        node: Any = metrics
        for key in path:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict) and node:
            return {k: float(v) for k, v in node.items() if isinstance(v, int | float)}
    return {}


@dataclass
class ServingChoice:
    kind: str  # "champion" | "instant" | "none"
    row: dict[str, Any] | None
    reason: str


def choose_serving(champion: dict[str, Any] | None, instant: dict[str, Any] | None) -> ServingChoice:
    """The champion when it exists and scores at least as well as the instant head **on the same
    validation frames** (the instant head's held-out videos, where the assistant also scored that champion:
    ``val.champion`` / ``val.champion_primary``); an instant head without such a comparison never beats a
    trained champion. Otherwise the newest instant head, otherwise nothing."""
    if instant is None:
        return ServingChoice("champion" if champion else "none", champion, "no instant head")
    if champion is None:
        return ServingChoice("instant", instant, "no champion yet")
    val = (instant.get("metrics") or {}).get("val") or {}
    if val.get("champion") != champion.get("version") or not val.get("champion_primary"):
        return ServingChoice(
            "champion", champion, "instant head not compared with this champion on the same frames"
        )
    champ = {k: float(v) for k, v in val["champion_primary"].items()}
    inst = _val_primary(instant)
    tasks = sorted(set(champ) & set(inst))
    if not inst:
        return ServingChoice("champion", champion, "instant head has no validation scores")
    if not tasks:
        return ServingChoice(
            "instant", instant, "champion has no validation score on the instant head's tasks"
        )
    c = overall_score({t: champ[t] for t in tasks})
    i = overall_score({t: inst[t] for t in tasks})
    if c >= i:
        return ServingChoice("champion", champion, f"champion {c:.4f} >= instant {i:.4f} on the same frames")
    return ServingChoice("instant", instant, f"instant {i:.4f} > champion {c:.4f} on the same frames")


# --- background updates ------------------------------------------------------------------------------
class InstantUpdater:
    """Refits the instant heads on a worker thread after labels arrive (never on the request's thread).

    ``notify()`` is cheap; bursts of notifications within ``debounce_s`` are coalesced into one update, and
    an update is skipped when the store's label version did not change.
    """

    def __init__(self, update: Callable[[], str | None], debounce_s: float = 0.5) -> None:
        self._update = update
        self.debounce_s = debounce_s
        self._cond = threading.Condition()
        self._pending = False
        self._last_notify = 0.0
        self._busy = False
        self._stop = False
        self.updates = 0
        self.version: str | None = None
        self.last_seconds: float | None = None
        self.error: str | None = None
        self._thread = threading.Thread(target=self._loop, name="surgenet-instant", daemon=True)
        self._thread.start()

    def notify(self) -> None:
        with self._cond:
            self._pending = True
            self._last_notify = time.monotonic()
            self._cond.notify_all()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stop:
                    self._cond.wait()
                if self._stop:
                    return
                while (wait := self._last_notify + self.debounce_s - time.monotonic()) > 0:
                    self._cond.wait(wait)  # more labels may arrive: one update for the whole burst
                self._pending, self._busy = False, True
            t0 = time.perf_counter()
            try:
                version = self._update()
                if version is not None:
                    self.version, self.updates = version, self.updates + 1
                self.error = None
            except Exception as exc:  # noqa: BLE001 - a failed refit must not kill the worker
                self.error = f"{type(exc).__name__}: {getattr(exc, 'message', exc)}"
                log.exception("instant head update failed")
            finally:
                self.last_seconds = time.perf_counter() - t0
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def wait_idle(self, timeout: float = 60.0) -> bool:
        """Block until no update is pending or running (tests, benchmarks)."""
        end = time.monotonic() + timeout
        with self._cond:
            while self._pending or self._busy:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
