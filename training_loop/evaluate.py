"""Evaluation of a model on a split, with the benchmark metric definitions (see ``metrics.py``).

Segmentation: dataset-level accumulation (IoU/Dice per class, mIoU, mDice) and ASSD per class. Phase: per
video then averaged (accuracy, Jaccard, precision, recall, F1), strict and relaxed-boundary (the schema's
``phase_protocol`` picks the dataset's rules). CVS: AP per criterion on rater means binarised by
``cvs_positive`` (>= 0.5), mAP, balanced accuracy (thresholds calibrated on validation when given).
Annotation efficiency comes from the store: how much humans changed the predictions they corrected.
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from surgenet_assist.core.model import SurgeNetAssistModel
from surgenet_assist.core.predictor import target_size
from surgenet_assist.core.store import LabelStore

from .finetune import LabelledFrames, normalise, temporal_sequences
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
) -> dict[str, np.ndarray]:
    """Phase (frame and temporal) and CVS probabilities for every frame; masks go into ``seg`` if given."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.eval().to(dev)
    short = short_side or min(model.backbone.input_size)
    h, w = data.images.shape[1:3]
    size = target_size(h, w, short)
    phase, cvs, emb = [], [], []
    for start in tqdm(range(0, len(data), batch_size), desc="evaluating", disable=not progress):
        chunk = np.stack(
            [
                cv2.resize(im, (size[1], size[0]), interpolation=cv2.INTER_AREA)
                for im in data.images[start : start + batch_size]
            ]
        )
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
        # the temporal model runs on what it was trained on: uniform sequences at the model's temporal fps;
        # frames off that grid (a burst of segmentation keyframes) keep their frame-level probabilities
        fps = model.preprocessing_contract().temporal_fps
        for rows in temporal_sequences(data, fps, keep_unlabelled=True):
            seq = embeddings[torch.from_numpy(rows)][None].to(dev)
            timeline[rows] = torch.softmax(head.temporal(seq)[-1][0].float(), -1).cpu().numpy()
    return {
        "phase_probs": phase_probs,
        "phase_timeline": timeline,
        "cvs_probs": torch.cat(cvs).numpy() if cvs else np.zeros((0, model.schema.num_cvs)),
        "embeddings": embeddings.numpy(),
    }


def evaluate_model(
    model: SurgeNetAssistModel,
    data: LabelledFrames,
    *,
    short_side: int | None = None,
    fps: float = 1.0,
    cvs_thresholds: list[float] | None = None,
    device: str | None = None,
    progress: bool = False,
    surface_distance: bool = True,
    per_video: bool = False,
) -> dict[str, Any]:
    """All task metrics on one split; ``primary`` holds one headline number per task that has labels.
    ``per_video`` adds ``per_video_primary``: the headline metrics of each video (in video-id order) from the
    same predictions.

    ``surface_distance`` adds ASSD per class to ``segmentation`` (about 0.1 s of CPU per 480x854 frame with
    13 classes; turn it off where only the headline numbers are needed).
    """
    schema = model.schema
    if len(data) == 0:
        return {"frames": 0, "primary": {}, **({"per_video_primary": []} if per_video else {})}
    seg = SegmentationAccumulator(schema.num_classes, schema.ignore_index, surface_distance=surface_distance)
    vids = data.video_ids if data.video_ids is not None else np.zeros(len(data), np.int64)
    videos = np.unique(vids)
    by_video = {v: SegmentationAccumulator(schema.num_classes, schema.ignore_index) for v in videos}
    sink = _PerVideoSegmentation(seg, by_video, vids) if per_video else seg  # one inference for both
    out = predict_frames(model, data, short_side, device=device, seg=sink, progress=progress)
    result = {"frames": len(data), **_metrics(schema, data, out, seg, fps=fps, cvs_thresholds=cvs_thresholds)}
    if per_video:  # the same predictions, scored per video (the gate's paired bootstrap resamples videos)
        result["per_video_primary"] = [
            _metrics(
                schema,
                data.subset(vids == v),
                {k: a[vids == v] for k, a in out.items()},
                by_video[v],
                fps=fps,
                cvs_thresholds=cvs_thresholds,
            )["primary"]
            for v in videos
        ]
    return result


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


def _metrics(
    schema: Any,
    data: LabelledFrames,
    out: dict[str, np.ndarray],
    seg: SegmentationAccumulator,
    *,
    fps: float,
    cvs_thresholds: list[float] | None,
) -> dict[str, Any]:
    """Every task's metrics from the predictions of ``data`` (``seg`` already holds its masks)."""
    result: dict[str, Any] = {"primary": {}}
    if data.masks is not None and (data.masks != schema.ignore_index).any():
        result["segmentation"] = seg.result()
        result["segmentation_confusion"] = seg.confusion.tolist()
        result["primary"]["segmentation"] = result["segmentation"]["mIoU"]
    if data.phases is not None and (data.phases >= 0).any():
        vids = data.video_ids if data.video_ids is not None else np.zeros(len(data), np.int64)
        pred = out["phase_timeline"].argmax(1)
        per_video = [(pred[vids == v], data.phases[vids == v]) for v in np.unique(vids)]
        result["phase"] = phase_video_metrics(per_video, schema.num_phases)
        result["phase_relaxed"] = phase_video_metrics(
            per_video, schema.num_phases, relaxed=True, fps=fps, protocol=schema.phase_protocol
        )
        result["phase_frame_only"] = phase_video_metrics(
            [(out["phase_probs"].argmax(1)[vids == v], data.phases[vids == v]) for v in np.unique(vids)],
            schema.num_phases,
        )
        keep = data.phases >= 0
        conf = np.zeros((schema.num_phases, schema.num_phases), np.int64)
        np.add.at(conf, (data.phases[keep], pred[keep]), 1)
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
