"""A label store filled with synthetic labelled clips: for tests, the benchmark and offline trials.

Clips are written as PNG frame folders (lossless, so decoded frames equal the generated ones) and labelled
as humans would label them: a mask and CVS values per frame, and one phase range per video.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from surgenet_assist.core.store import AnnotationInput, LabelStore, build_payload
from surgenet_assist.core.synthetic import DEFAULT_WORLD, generate_clip


def phase_segments(phases: np.ndarray) -> list[list]:
    """Run-length phase ranges ``[[start, end, id], ...]`` (0-based inclusive)."""
    out, start = [], 0
    for i in range(1, len(phases) + 1):
        if i == len(phases) or phases[i] != phases[start]:
            out.append([start, i - 1, int(phases[start])])
            start = i
    return out


def populate_store(
    store: LabelStore,
    root: str | Path,
    seeds: list[int],
    frames: int = 24,
    size: tuple[int, int] = (64, 112),
    splits: list[str | None] | None = None,
    label_every: int = 1,
    unlabelled_seeds: list[int] | None = None,
    world: str = DEFAULT_WORLD,
) -> list[int]:
    """Write one clip per seed under ``root``, register it and record human labels; returns video ids.

    ``splits`` pins each video's split (None: left for ``assign_splits``); ``unlabelled_seeds`` adds videos
    without labels (for pretraining and active-learning re-scoring); ``world`` is the synthetic world.
    """
    root = Path(root)
    ids = []
    for k, seed in enumerate(list(seeds) + list(unlabelled_seeds or [])):
        clip = generate_clip(seed, frames, size[0], size[1], fps=1.0, world=world)
        folder = clip.write_frames(root / f"clip_{seed}")
        split = splits[k] if splits is not None and k < len(splits) else None
        vid = store.add_video(str(folder), fps=1.0, frame_count=len(clip), split=split)
        ids.append(vid)
        if k >= len(seeds):
            continue
        items = []
        for i in range(0, len(clip), label_every):
            for task, value in (("segmentation", clip.masks[i]), ("cvs", [float(v) for v in clip.cvs[i]])):
                items.append(
                    AnnotationInput(
                        video_id=vid,
                        frame_start=i,
                        task=task,
                        payload=build_payload(task, value, store.schema),
                        source="import",
                        author="synthetic",
                    )
                )
        items.append(
            AnnotationInput(
                video_id=vid,
                frame_start=0,
                frame_end=len(clip) - 1,
                task="phase",
                payload=build_payload("phase", {"segments": phase_segments(clip.phases)}, store.schema),
                source="import",
                author="synthetic",
            )
        )
        store.record_annotations(items)
    return ids
