"""Importers and exporters of the surgical dataset formats (see ``docs/store.md``).

Every importer works in two steps: parse and validate ALL input first (nothing touches the database while a
file may still turn out to be bad), then write everything in ONE store transaction. A bad file therefore
leaves the store exactly as it was.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from ..store.payloads import Payload

if TYPE_CHECKING:
    from ..store import LabelStore, RecordResult, Writer


@dataclass
class PendingLabel:
    """A validated label waiting to be written (video named by path; ids are assigned at write time)."""

    video: str
    frame_start: int
    task: str
    payload: Payload
    author: str | None
    source: str = "import"
    frame_end: int | None = None
    updated_at: datetime | None = None
    ls_task_id: int | None = None
    ls_annotation_id: int | None = None
    image_path: str | None = None
    deleted: bool = False


@dataclass
class VideoInfo:
    fps: float | None = None
    frame_count: int | None = None
    split: str | None = None


@dataclass
class ImportReport:
    """What an import stored and what it skipped, with the reason for each skip."""

    dataset: str
    source: str
    counts: Counter[str] = field(default_factory=Counter)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def skip(self, item: str, reason: str) -> None:
        self.skipped.append((item, reason))

    def to_dict(self) -> dict[str, Any]:
        reasons = Counter(reason for _, reason in self.skipped)
        return {
            "dataset": self.dataset,
            "source": self.source,
            "counts": dict(self.counts),
            "skipped": len(self.skipped),
            "skipped_by_reason": dict(reasons),
            "skipped_examples": [{"item": i, "reason": r} for i, r in self.skipped[:20]],
        }


def write_labels(
    store: LabelStore,
    videos: dict[str, VideoInfo],
    labels: Sequence[PendingLabel],
    report: ImportReport,
    project: str | None = None,
    *,
    replace_ls_annotations: Iterable[int] = (),
    replaced_at: datetime | None = None,
) -> list[RecordResult | None]:
    """Write videos, frames and labels in one transaction and count what was new vs. already stored.

    ``replace_ls_annotations``: Label Studio annotations whose labels ``labels`` replace as a whole; their
    other live labels (a class no longer painted, a moved phase range) are tombstoned at ``replaced_at`` in
    the same transaction, so a failure leaves the previous state intact.

    Returns the store's result per label, in order (None for a delete of a label never stored).
    """
    counts, results = store.transaction(
        lambda w: stage_labels(
            w, videos, labels, project, replace_ls_annotations=replace_ls_annotations, replaced_at=replaced_at
        )
    )
    report.counts.update(counts)
    return results


def stage_labels(
    w: Writer,
    videos: dict[str, VideoInfo],
    labels: Sequence[PendingLabel],
    project: str | None = None,
    *,
    replace_ls_annotations: Iterable[int] = (),
    replaced_at: datetime | None = None,
) -> tuple[Counter[str], list[RecordResult | None]]:
    """What :func:`write_labels` writes, inside the caller's transaction ``w``: for a caller that writes more
    in the same transaction (``ls sync`` adds its restores, tombstones and sync state). Returns the counts
    and the store's result per label."""
    replace = sorted({int(i) for i in replace_ls_annotations})
    from ..store import AnnotationInput

    counts: Counter[str] = Counter()
    ids = {}
    for name, info in videos.items():
        ids[name] = w.add_video(name, info.fps, info.frame_count, split=info.split, project=project)
    counts["videos"] = len(ids)
    images: dict[str, dict[int, str]] = {}
    for lab in labels:
        if lab.image_path and lab.frame_end in (None, lab.frame_start):
            images.setdefault(lab.video, {})[lab.frame_start] = lab.image_path
    for name, paths in images.items():
        w.ensure_frames(ids[name], paths.keys(), image_paths=paths)
    items = [
        AnnotationInput(
            video_id=ids[lab.video],
            frame_start=lab.frame_start,
            frame_end=lab.frame_end,
            task=lab.task,
            payload=None if lab.deleted else lab.payload,
            source=lab.source,
            author=lab.author,
            ls_task_id=lab.ls_task_id,
            ls_annotation_id=lab.ls_annotation_id,
            updated_at=lab.updated_at,
            deleted=lab.deleted,
        )
        for lab in labels
    ]
    results = w.record_annotations(items, project)
    if replace:
        keep = {r.annotation_id for r, it in zip(results, items, strict=True) if r and not it.deleted}
        counts["tombstoned (replaced)"] += w.tombstone_ls_labels(
            project, ls_annotation_ids=replace, keep=keep, updated_at=replaced_at
        )
    for res in results:
        if res is None:
            counts["deletes of unknown labels"] += 1
        else:
            counts["new revisions" if res.created else "unchanged (already stored)"] += 1
    return counts, list(results)


def progress_iter(items: Iterable[Any], show: bool, desc: str, total: int | None = None) -> Iterable[Any]:
    """tqdm progress bar on stderr when ``show``; the plain iterable otherwise."""
    if not show:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, total=total, unit="file", leave=False)
