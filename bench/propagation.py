"""Label propagation and instant heads on synthetic videos with exact ground truth.

1. mIoU of propagated masks against the distance from the keyframe (1..50 frames), next to the
   copy-the-keyframe baseline measured on the same frames in the same run. Frames where propagation stops
   (similarity collapse) fall back to the copy, so both curves cover every frame.
2. Instant-head scores (mIoU, phase Jaccard, CVS mAP on held-out frames) vs the number of labelled frames.
3. Seconds from a new label to updated predictions for a 5-minute video at 1 fps (300 frames) with a warm
   embedding cache: instant refit + predictions for every frame, and propagation over the whole video.

Random-init backbone unless the SurgeNetXL weights are cached (the output says which).
Usage: .venv/bin/python bench/propagation.py [--threads 2] [--clips 3] [--short-side 256]
       [--height 240 --width 426]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from surgenet_assist.core.backbone import load_backbone
from surgenet_assist.core.embedding_cache import EmbeddingCache
from surgenet_assist.core.propagation import MaskPropagator
from surgenet_assist.core.schema import DEFAULT_SCHEMA
from surgenet_assist.core.synthetic import generate_clip
from surgenet_assist.training_loop.instant import SegSample, fit_instant, fit_with_validation, score_heads
from surgenet_assist.training_loop.metrics import SegmentationAccumulator

DISTANCES = (1, 2, 3, 5, 10, 20, 30, 40, 50)


def _backbone() -> tuple[torch.nn.Module, str]:
    try:
        return load_backbone(allow_download=False, progress=False), "SurgeNetXL (cached weights)"
    except Exception:  # noqa: BLE001 - no cached weights: say so
        torch.manual_seed(0)
        return load_backbone(random_init=True), "random-init backbone (SurgeNetXL weights not cached)"


def miou(pred: np.ndarray, gt: np.ndarray) -> float:
    acc = SegmentationAccumulator(DEFAULT_SCHEMA.num_classes, DEFAULT_SCHEMA.ignore_index)
    acc.update(pred, gt)
    return float(acc.result()["mIoU"])


def propagation_vs_distance(clips: list, feats: list, folder: Path) -> dict:
    prop_scores = {d: [] for d in DISTANCES}
    copy_scores = {d: [] for d in DISTANCES}
    unreliable = 0
    for clip, f in zip(clips, feats, strict=True):
        prop = MaskPropagator(f, DEFAULT_SCHEMA.num_classes)
        result = prop.propagate({0: clip.masks[0]})
        for d in DISTANCES:
            copy = clip.masks[0]
            frame = result.get(d)
            if frame is not None and frame.reliable:
                mask, _ = prop.to_mask(frame, clip.frames[d])
            else:
                mask, unreliable = copy, unreliable + 1
            prop_scores[d].append(miou(mask, clip.masks[d]))
            copy_scores[d].append(miou(copy, clip.masks[d]))
    return {
        "distance": list(DISTANCES),
        "propagation_mIoU": [round(float(np.mean(prop_scores[d])), 4) for d in DISTANCES],
        "copy_mIoU": [round(float(np.mean(copy_scores[d])), 4) for d in DISTANCES],
        "fell_back_to_copy": unreliable,
    }


def _samples(clip, f, idx):
    seg = [SegSample(np.asarray(f.stride8[i]), np.asarray(f.stride16[i]), clip.masks[i]) for i in idx]
    emb = [np.asarray(f.embeddings[i], np.float32) for i in idx]
    return (
        seg,
        [(e, int(clip.phases[i])) for e, i in zip(emb, idx, strict=True)],
        [(e, clip.cvs[i]) for e, i in zip(emb, idx, strict=True)],
    )


def instant_vs_labels(clips: list, feats: list) -> dict:
    held = [[], [], []]
    pool = []
    for c, (clip, f) in enumerate(zip(clips, feats, strict=True)):
        n = len(clip)
        for part, items in zip(held, _samples(clip, f, list(range(1, n, 2))), strict=True):
            part += items
        pool += [(c, i) for i in range(0, n, 2)]
    rng = np.random.default_rng(0)
    out = {}
    for n in (1, 5, 20, 50):
        picks = [pool[j] for j in rng.choice(len(pool), min(n, len(pool)), replace=False)]
        seg, phase, cvs = [], [], []
        for c, i in picks:
            s, p, v = _samples(clips[c], feats[c], [i])
            seg += s
            phase += p
            cvs += v
        t0 = time.perf_counter()
        heads = fit_instant(seg, phase, cvs)
        fit_s = time.perf_counter() - t0
        out[n] = {k: round(v, 4) for k, v in score_heads(heads, *held).items()} | {"fit_s": round(fit_s, 2)}
    return out


def latency(backbone, cache: EmbeddingCache, folder: Path, short_side: int, labels: int) -> dict:
    """300-frame video (5 min at 1 fps): warm cache, then a new label arrives."""
    clip = generate_clip(seed=11, num_frames=300, height=120, width=214)
    video = clip.write_frames(folder / "five_minutes")
    t0 = time.perf_counter()
    feats = cache.get_or_compute(video, backbone, None, short_side=short_side)
    cold = time.perf_counter() - t0
    feats = cache.get_or_compute(video, backbone, None, short_side=short_side)  # warm: memory-mapped
    keyframes = list(range(0, 300, 300 // labels))[:labels]
    seg, phase, cvs = _samples(clip, feats, keyframes)
    t0 = time.perf_counter()
    heads = fit_with_validation(seg, phase, cvs)
    fit_s = time.perf_counter() - t0
    for p in range(len(feats.indices)):
        heads.seg_probs(feats.stride8[p], feats.stride16[p])
    heads.phase_probs(np.asarray(feats.embeddings, np.float32))
    heads.cvs_probs(np.asarray(feats.embeddings, np.float32))
    instant_total = time.perf_counter() - t0
    t0 = time.perf_counter()
    prop = MaskPropagator(feats, DEFAULT_SCHEMA.num_classes)
    masks = {k: clip.masks[k] for k in keyframes}
    result = prop.propagate(masks)
    prop_s = time.perf_counter() - t0
    # a new label between two existing ones: only the span between its neighbours is re-propagated
    new = (keyframes[0] + keyframes[1]) // 2
    t0 = time.perf_counter()
    updated = prop.propagate(masks | {new: clip.masks[new]}, changed=new)
    update_s = time.perf_counter() - t0
    return {
        "frames": len(feats.indices),
        "labelled_frames": labels,
        "cold_feature_extraction_s": round(cold, 1),
        "instant_refit_s": round(fit_s, 2),
        "instant_refit_plus_predict_all_s": round(instant_total, 2),
        "propagation_all_frames_s": round(prop_s, 2),
        "propagated_frames": len(result),
        "new_label_propagation_update_s": round(update_s, 3),
        "new_label_updated_frames": len(updated),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--clips", type=int, default=3)
    ap.add_argument("--frames", type=int, default=60)
    ap.add_argument("--short-side", type=int, default=256)
    ap.add_argument("--height", type=int, default=240)
    ap.add_argument("--width", type=int, default=426)
    ap.add_argument("--labels", type=int, default=10, help="labelled frames in the latency test")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    backbone, which = _backbone()
    print(f"backbone: {which}; torch threads: {args.threads}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        cache = EmbeddingCache(folder / "cache")
        clips, feats = [], []
        for seed in range(1, args.clips + 1):
            clip = generate_clip(
                seed=seed, num_frames=max(args.frames, 51), height=args.height, width=args.width
            )
            clips.append(clip)
            feats.append(
                cache.get_or_compute(
                    clip.write_frames(folder / f"clip{seed}"), backbone, None, short_side=args.short_side
                )
            )
        report = {
            "backbone": which,
            "threads": args.threads,
            "short_side": args.short_side,
            "frame_size": [args.height, args.width],
        }
        report["propagation"] = propagation_vs_distance(clips, feats, folder)
        print(json.dumps(report["propagation"]))
        report["instant"] = instant_vs_labels(clips, feats)
        print(json.dumps(report["instant"]))
        report["latency"] = latency(backbone, cache, folder, args.short_side, args.labels)
        print(json.dumps(report["latency"]))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
