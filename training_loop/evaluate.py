"""Evaluation of a model on a split, with the benchmark metric definitions (see ``metrics.py``).

Segmentation: dataset-level accumulation (IoU/Dice per class, mIoU, mDice) and ASSD per class. Phase: per
video then averaged (accuracy, Jaccard, precision, recall, F1), strict and relaxed-boundary (the schema's
``phase_protocol`` picks the dataset's rules). CVS: AP per criterion on rater means binarised by
``cvs_positive`` (>= 0.5), mAP, balanced accuracy (thresholds calibrated on validation when given).
Annotation efficiency comes from the store: how much humans changed the predictions they corrected.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from surgenet_assist.core.model import SurgeNetAssistModel
from surgenet_assist.core.predictor import target_size
from surgenet_assist.core.store import LabelStore
from surgenet_assist.core.video import open_video

from .finetune import LabelledFrames, _grid_step, embeddings_for, normalise, temporal_sequences
from .metrics import (
    SegmentationAccumulator,
    calibrate_cvs_thresholds,
    cvs_metrics_thresholded,
    cvs_positive,
    mask_dice,
    phase_video_metrics,
)

PRIMARY = {"segmentation": "mIoU", "phase": "jaccard", "cvs": "mAP"}


@torch.inference_mode()
def predict_frames(
    model: SurgeNetAssistModel,
    data: LabelledFrames,
    short_side: int | None = None,
    batch_size: int = 16,
    device: str | None = None,
    seg: SegmentationAccumulator | None = None,
    progress: bool = False,
    video_paths: dict[int, str] | None = None,
) -> dict[str, np.ndarray]:
    """Phase (frame and temporal) and CVS probabilities for every frame; masks go into ``seg`` if given.

    ``short_side`` defaults to the model's recorded preprocessing. ``video_paths`` (video id -> file, as
    ``SplitData.video_paths``) gives the causal temporal model whole-video context, as serving has it: every
    frame of the temporal grid from the video's start to its last labelled grid frame is embedded (the
    unlabelled ones decoded from the video) and the model runs over that one sequence. Without it (frames not
    from a store) it runs on the uniform fragments the labelled rows form.
    """
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.eval().to(dev)
    short = short_side or model.preprocessing_contract().short_side
    h, w = data.images.shape[1:3]
    size = target_size(h, w, short)
    phase, cvs, emb = [], [], []
    for start in tqdm(range(0, len(data), batch_size), desc="evaluating", disable=not progress):
        chunk = _to_input(data.images[start : start + batch_size], size)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            out = model(normalise(model, chunk, dev))
        phase.append(torch.softmax(out.phase_logits.float(), 1).cpu())
        cvs.append(torch.sigmoid(out.cvs_logits.float()).cpu())
        emb.append(out.embedding.float().cpu())
        if seg is not None and data.masks is not None:
            logits = F.interpolate(out.seg_logits.float(), size=(h, w), mode="bilinear", align_corners=False)
            pred = logits.argmax(1).to(torch.uint8).cpu().numpy()
            for p, t in zip(pred, data.masks[start : start + batch_size], strict=True):
                seg.update(p, t)
    phase_probs = torch.cat(phase).numpy() if phase else np.zeros((0, model.schema.num_phases))
    embeddings = torch.cat(emb) if emb else torch.zeros((0, model.backbone.embed_dim))
    timeline = phase_probs.copy()
    head = model.phase_head
    if bool(head.temporal_trained) and data.video_ids is not None and len(embeddings):
        fps = model.preprocessing_contract().temporal_fps
        whole = {}
        if video_paths and data.frame_indices is not None and data.fps is not None:
            whole = {int(v): video_paths[int(v)] for v in np.unique(data.video_ids) if int(v) in video_paths}

        def run(seq: torch.Tensor) -> np.ndarray:
            return torch.softmax(head.temporal(seq[None].to(dev))[-1][0].float(), -1).cpu().numpy()

        # frames off the temporal grid (a segmentation burst's keyframes) keep their frame-level probabilities
        for rows in temporal_sequences(data, fps, keep_unlabelled=True):
            if int(data.video_ids[rows[0]]) not in whole:
                timeline[rows] = run(embeddings[torch.from_numpy(rows)])
        for vid, path in whole.items():
            rows, k, step = _grid_rows(data, vid, fps)
            if len(rows):
                known = dict(zip(k.tolist(), embeddings[rows], strict=True))
                video_fps = float(data.fps[rows[0]])
                seq = _whole_video_embeddings(
                    model, path, video_fps, step, known, (h, w), size, dev, batch_size
                )
                timeline[rows] = run(seq)[k]
    return {
        "phase_probs": phase_probs,
        "phase_timeline": timeline,
        "cvs_probs": torch.cat(cvs).numpy() if cvs else np.zeros((0, model.schema.num_cvs)),
        "embeddings": embeddings.numpy(),
    }


def _to_input(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Frames (already at the split's frame size) -> model input size, INTER_AREA as training resizes."""
    return np.stack([cv2.resize(im, (size[1], size[0]), interpolation=cv2.INTER_AREA) for im in images])


def _grid_rows(data: LabelledFrames, vid: int, temporal_fps: float) -> tuple[np.ndarray, np.ndarray, float]:
    """Rows of video ``vid`` on its ``temporal_fps`` grid (as ``finetune.temporal_sequences`` finds them),
    their grid positions k (frame = round(k * step)) and the step in frames."""
    rows = np.flatnonzero(data.video_ids == vid)
    step = _grid_step(float(data.fps[rows[0]]), temporal_fps)
    idx = data.frame_indices[rows]
    k = np.round(idx / step).astype(np.int64)
    on_grid = np.round(k * step).astype(np.int64) == idx
    return rows[on_grid], k[on_grid], step


def _whole_video_embeddings(
    model: SurgeNetAssistModel,
    path: str,
    fps: float,
    step: float,
    known: dict[int, torch.Tensor],
    frame_size: tuple[int, int],
    size: tuple[int, int],
    dev: torch.device,
    batch_size: int,
) -> torch.Tensor:
    """(K + 1, D) embeddings of grid positions 0..K (K: the last one in ``known``), decoding the missing
    grid frames from the video at the split's frame size, in batches (bounded memory)."""
    last = max(known)
    missing = [j for j in range(last + 1) if j not in known]
    found: dict[int, torch.Tensor] = dict(known)
    amp = dev.type == "cuda"
    with open_video(path, fps=fps) as source:
        for start in range(0, len(missing), batch_size):
            part = missing[start : start + batch_size]
            frames = []
            for j in part:
                image = source.read_frame(int(round(j * step)))
                if image.shape[:2] != frame_size:
                    image = cv2.resize(image, frame_size[::-1], interpolation=cv2.INTER_AREA)
                frames.append(image)
            embedded = embeddings_for(model, _to_input(np.stack(frames), size), False, dev, amp)
            found |= dict(zip(part, embedded, strict=True))
    return torch.stack([found[j] for j in range(last + 1)]).float()


def evaluate_model(
    model: SurgeNetAssistModel,
    data: LabelledFrames,
    *,
    short_side: int | None = None,
    fps: float | None = None,
    cvs_thresholds: list[float] | None = None,
    device: str | None = None,
    progress: bool = False,
    surface_distance: bool = True,
    per_video: bool = False,
    video_paths: dict[int, str] | None = None,
    matlab_compat: bool = False,
) -> dict[str, Any]:
    """All task metrics on one split; ``primary`` holds one headline number per task that has labels.
    ``per_video`` adds ``per_video_primary``: the headline metrics of each video (in the order of
    ``per_video_ids``) from the same predictions.

    Phase is scored as the protocol defines it: on the rows of the temporal model's uniform sequences only
    (the frames of its ``temporal_fps`` grid; keyframes labelled at other rates are left out), so a relaxed
    window of 10 s is 10 s at that rate; ``fps`` is needed only for frames without frame indices (not from a
    store): the rate they were sampled at (default: the model's temporal rate). ``video_paths`` gives the
    temporal model whole-video context (:func:`predict_frames`). ``matlab_compat`` adds
    ``phase_relaxed_matlab`` (Cholec80 schemas): the relaxed metrics as the published MATLAB script computes
    them (:func:`metrics.phase_video_metrics`).

    ``surface_distance`` adds ASSD per class to ``segmentation`` (about 0.1 s of CPU per 480x854 frame with
    13 classes; turn it off where only the headline numbers are needed).
    """
    schema = model.schema
    if len(data) == 0:
        empty = {"per_video_primary": [], "per_video_ids": []} if per_video else {}
        return {"frames": 0, "primary": {}, **empty}
    temporal_fps = model.preprocessing_contract().temporal_fps
    if fps is not None and data.frame_indices is not None and abs(fps - temporal_fps) > 1e-9:
        raise ValueError(
            f"phase rows from a store are on the temporal grid at {temporal_fps} fps; fps={fps} would set "
            "the relaxed window in the wrong unit (leave fps out)"
        )
    rate = {"temporal_fps": temporal_fps, "fps": fps, "matlab_compat": matlab_compat}
    seg = SegmentationAccumulator(schema.num_classes, schema.ignore_index, surface_distance=surface_distance)
    vids = data.video_ids if data.video_ids is not None else np.zeros(len(data), np.int64)
    videos = np.unique(vids)
    by_video = {v: SegmentationAccumulator(schema.num_classes, schema.ignore_index) for v in videos}
    sink = _PerVideoSegmentation(seg, by_video, vids) if per_video else seg  # one inference for both
    out = predict_frames(
        model, data, short_side, device=device, seg=sink, progress=progress, video_paths=video_paths
    )
    result = {"frames": len(data), **_metrics(schema, data, out, seg, cvs_thresholds=cvs_thresholds, **rate)}
    if per_video:  # the same predictions, scored per video (the gate's paired test is over videos)
        result["per_video_ids"] = [int(v) for v in videos]
        result["per_video_primary"] = [
            _metrics(
                schema,
                data.subset(vids == v),
                {k: a[vids == v] for k, a in out.items()},
                by_video[v],
                cvs_thresholds=cvs_thresholds,
                **rate | {"matlab_compat": False},
            )["primary"]
            for v in videos
        ]
    return result


def paired_per_video(
    candidate: dict[str, Any], champion: dict[str, Any]
) -> dict[int, tuple[dict[str, float], dict[str, float]]]:
    """Video id -> (candidate's, champion's) headline metrics, from two ``evaluate_model(per_video=True)``
    results on the same split: the pairs the gate's paired test compares (a video only one has is left
    out)."""
    theirs = dict(zip(champion["per_video_ids"], champion["per_video_primary"], strict=True))
    return {
        v: (ours, theirs[v])
        for v, ours in zip(candidate["per_video_ids"], candidate["per_video_primary"], strict=True)
        if v in theirs
    }


class _PerVideoSegmentation:
    """Feeds each frame's mask to the whole-split accumulator and to its video's (frames in row order)."""

    def __init__(
        self, whole: SegmentationAccumulator, by_video: dict[Any, SegmentationAccumulator], vids: np.ndarray
    ) -> None:
        self.whole, self.by_video, self.vids, self.row = whole, by_video, vids, 0

    def update(self, pred: np.ndarray, target: np.ndarray) -> None:
        self.whole.update(pred, target)
        self.by_video[self.vids[self.row]].update(pred, target)
        self.row += 1


def phase_rows(data: LabelledFrames, temporal_fps: float) -> tuple[np.ndarray, dict[int, float]]:
    """Rows phase is scored on (in time order per video) and each video's row rate (frames per second).

    The labelled rows of the temporal model's uniform sequences (``finetune.temporal_sequences``): a
    segmentation burst's keyframes inherit phase labels but are not on the grid and would weigh a few
    seconds of video as much as minutes. A video at a lower rate than ``temporal_fps`` is sampled at its own.
    Frames without frame indices: every labelled row, at ``temporal_fps``."""
    rows = temporal_sequences(data, temporal_fps)
    keep = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    keep = keep[data.phases[keep] >= 0]
    vids = data.video_ids if data.video_ids is not None else np.zeros(len(data), np.int64)
    rates = {}
    for v in np.unique(vids[keep]):
        # the grid's step is max(1, video fps / temporal fps) frames: its rate is the smaller of the two
        video_fps = float(data.fps[vids == v][0]) if data.fps is not None else temporal_fps
        rates[int(v)] = min(video_fps, temporal_fps)
    return keep, rates


def _metrics(
    schema: Any,
    data: LabelledFrames,
    out: dict[str, np.ndarray],
    seg: SegmentationAccumulator,
    *,
    temporal_fps: float,
    fps: float | None,
    cvs_thresholds: list[float] | None,
    matlab_compat: bool = False,
) -> dict[str, Any]:
    """Every task's metrics from the predictions of ``data`` (``seg`` already holds its masks)."""
    result: dict[str, Any] = {"primary": {}}
    if data.masks is not None and (data.masks != schema.ignore_index).any():
        result["segmentation"] = seg.result()
        result["segmentation_confusion"] = seg.confusion.tolist()
        result["primary"]["segmentation"] = result["segmentation"]["mIoU"]
    if data.phases is not None and (data.phases >= 0).any():
        if data.video_ids is None:
            data = dataclasses.replace(data, video_ids=np.zeros(len(data), np.int64))
        keep, rates = phase_rows(data, fps or temporal_fps)
        vids, gt = data.video_ids[keep], data.phases[keep]
        timeline, frame_only = out["phase_timeline"].argmax(1)[keep], out["phase_probs"].argmax(1)[keep]
        order = list(rates)
        per_video = [(timeline[vids == v], gt[vids == v]) for v in order]
        video_rates = [rates[v] for v in order]
        result["phase"] = phase_video_metrics(per_video, schema.num_phases)
        relaxed = {"relaxed": True, "fps": video_rates, "protocol": schema.phase_protocol}
        result["phase_relaxed"] = phase_video_metrics(per_video, schema.num_phases, **relaxed)
        if matlab_compat and schema.phase_protocol == "cholec80":
            result["phase_relaxed_matlab"] = phase_video_metrics(
                per_video, schema.num_phases, **relaxed, matlab_compat=True
            )
        result["phase_frame_only"] = phase_video_metrics(
            [(frame_only[vids == v], gt[vids == v]) for v in order], schema.num_phases
        )
        result["phase_rows"] = {"rows": len(keep), "labelled_rows": int((data.phases >= 0).sum())}
        result["phase_rows"]["fps"] = {str(v): r for v, r in rates.items()}
        conf = np.zeros((schema.num_phases, schema.num_phases), np.int64)
        np.add.at(conf, (gt, timeline), 1)
        result["phase_confusion"] = conf.tolist()
        result["primary"]["phase"] = result["phase"]["jaccard"]
    if data.cvs is not None and (~np.isnan(data.cvs)).any():
        result["cvs"] = cvs_metrics_thresholded(out["cvs_probs"], data.cvs, schema.cvs_keys, cvs_thresholds)
        result["primary"]["cvs"] = result["cvs"]["mAP"]
    return result


def cvs_thresholds_on(model: SurgeNetAssistModel, val: LabelledFrames, **kwargs: Any) -> list[float] | None:
    """Balanced-accuracy thresholds calibrated on validation predictions (None without CVS labels)."""
    if len(val) == 0 or val.cvs is None or np.isnan(val.cvs).all():
        return None
    return calibrate_cvs_thresholds(predict_frames(model, val, **kwargs)["cvs_probs"], val.cvs)


def overall_score(primary: dict[str, float]) -> float:
    """Mean of the per-task headline metrics (the number the promotion margin applies to)."""
    return float(np.mean(list(primary.values()))) if primary else 0.0


def annotation_efficiency(store: LabelStore, project: str | None = None) -> dict[str, Any]:
    """How much annotators changed the pre-annotations they corrected, per task.

    For each live human single-frame label with a model prediction for the same frame made before it:
    edit magnitude = 1 - Dice(label, prediction) for masks (mean over classes present), and the share accepted
    unchanged (mask IoU >= 0.99 / same phase / same CVS after binarising with ``cvs_positive``).
    """
    out: dict[str, Any] = {}
    schema = store.schema
    for task in ("segmentation", "phase", "cvs"):
        edits, accepted = [], []
        for rec in store.training_labels(task, project=project):
            if rec.frame_start != rec.frame_end:
                continue
            preds = [
                p
                for p in store.predictions_for(
                    rec.video_id, task=task, frame_index=rec.frame_start, latest=False
                )
                if p.frame_start == p.frame_end and p.created_at <= rec.updated_at
            ]
            if not preds:
                continue
            pred = max(preds, key=lambda p: (p.created_at, p.id)).payload
            if task == "segmentation":
                a, b = rec.payload["mask"], pred["mask"]
                if a.shape != b.shape:
                    b = cv2.resize(b, (a.shape[1], a.shape[0]), interpolation=cv2.INTER_NEAREST)
                d = mask_dice(a, b, schema.num_classes, schema.ignore_index)
                edits.append(1 - d)
                inter, union = ((a == b) & (a != schema.ignore_index)).sum(), (a != schema.ignore_index).sum()
                accepted.append(union == 0 or inter / union >= 0.99)
            elif task == "phase":
                same = rec.payload.get("phase") == pred.get("phase")
                edits.append(0.0 if same else 1.0)
                accepted.append(same)
            else:
                same = np.array_equal(cvs_positive(rec.payload["values"]), cvs_positive(pred["values"]))
                edits.append(float(np.mean(np.abs(np.subtract(rec.payload["values"], pred["values"])))))
                accepted.append(bool(same))
        if edits:
            out[task] = {
                "labels_with_prediction": len(edits),
                "mean_edit": float(np.mean(edits)),
                "accepted_unchanged": float(np.mean(accepted)),
            }
    return out
