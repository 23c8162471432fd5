"""Qt-free review logic behind the dock widget: model choice, cached pre-annotation, commits, review order.

The widget only wires Qt events to this class, so everything that touches the model or the label store can be
tested (and reused) without a display. Human corrections are recorded as append-only revisions with source
``napari``; model outputs go to the store's prediction table, which a commit never touches.
"""

from __future__ import annotations

import getpass
import hashlib
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np


def _keep_triton_out_after_gl() -> None:
    """Importing triton (pulled in by timm/torchvision -> torch._dynamo) after napari has created its OpenGL
    context segfaults with Mesa's llvmpipe (two LLVMs in one process; reproduced on Debian 12). The usual
    order is exactly that: napari starts, then the plugin loads torch. The review GUI never compiles
    kernels, so in that order triton is made unimportable (torch then reports it as absent)."""
    if "triton" in sys.modules:
        return
    qtwidgets = sys.modules.get("qtpy.QtWidgets")
    if qtwidgets is not None and qtwidgets.QApplication.instance() is not None:
        sys.modules["triton"] = None  # type: ignore[assignment]


_keep_triton_out_after_gl()

from surgenet_assist.core.embedding_cache import video_content_hash  # noqa: E402
from surgenet_assist.core.errors import UsageError  # noqa: E402
from surgenet_assist.core.predictor import FramePrediction, Predictor  # noqa: E402
from surgenet_assist.core.schema import DEFAULT_SCHEMA, LabelSchema  # noqa: E402
from surgenet_assist.core.store import (  # noqa: E402
    CANDIDATE,
    CHAMPION,
    INTERACTIVE_TASK,
    PREVIOUS_CHAMPION,
    AnnotationInput,
    LabelRecord,
    LabelStore,
    Payload,
    Provenance,
    RecordResult,
    Writer,
    build_payload,
)
from surgenet_assist.core.store.db import mask_url, resolve_url  # noqa: E402
from surgenet_assist.core.timeline import runs  # noqa: E402

if TYPE_CHECKING:
    from surgenet_assist.core.interactive import ClickSegmenter

PLUGIN = "surgenet-assist"
UNTRAINED = "untrained (random-init)"
#: payload key recording which model's pre-annotation the clinician was looking at when committing
SHOWN_MODEL_KEY = "shown_model_version"

_RANDOM_INIT_LOCK = threading.Lock()
_RANDOM_INIT_MODEL: Any = None


@dataclass(frozen=True)
class ModelChoice:
    """One entry of the model selector."""

    version: str
    bundle_path: str | None
    status: str  # champion / candidate / ... / "bundle" (picked by the user) / "untrained"

    @property
    def label(self) -> str:
        if self.status == "untrained":
            return f"{UNTRAINED} — predictions are meaningless"
        return f"{self.version} ({self.status})"

    @property
    def trained(self) -> bool:
        return self.status != "untrained"


@dataclass
class Clip:
    """A video (or frame folder) registered in the store, with its size; its labels live in the store."""

    path: str
    video_id: int
    frame_count: int
    height: int
    width: int
    fps: float
    content_hash: str


@dataclass
class CachedPrediction:
    """What the widget needs of one frame's prediction (the mask also lives in the Labels layer)."""

    mask: np.ndarray
    uncertainty_map: np.ndarray  # (H, W) float16, 1 - max softmax probability
    phase_probs: np.ndarray
    cvs_probs: np.ndarray
    uncertainty: dict[str, float]
    model_version: str


@dataclass
class CommitResult:
    """What one commit wrote (revision ids per task), for the status line and tests."""

    frames: tuple[int, int]
    revisions: dict[str, list[int]] = field(default_factory=dict)

    @property
    def count(self) -> int:
        return sum(len(v) for v in self.revisions.values())


def clip_signature(clip: Clip, model_version: str, short_side: int) -> str:
    """Key of the per-clip prediction cache: same pixels + same model + same input size = same outputs."""
    text = f"{clip.content_hash}|{model_version}|{short_side}"
    return hashlib.sha256(text.encode()).hexdigest()[:24]


class ReviewSession:
    """Store + model + prediction cache for one napari window."""

    def __init__(
        self,
        url: str | None = None,
        *,
        project: str = "default",
        author: str | None = None,
        short_side: int | None = None,
        batch_size: int = 4,
        device: str | None = None,
        schema: LabelSchema = DEFAULT_SCHEMA,
    ) -> None:
        self.url = resolve_url(url or None)
        self.project = project or "default"
        self.author = author or getpass.getuser()
        # None (or 0 in the settings): each model's own recorded preprocessing, what it was trained at
        self.short_side = int(short_side) if short_side else None
        self.batch_size = int(batch_size)
        self.device = device or None
        self.schema = schema
        self._store: LabelStore | None = None
        self._extra: list[ModelChoice] = []
        self._predictors: dict[tuple[str, int], Predictor] = {}
        self._cache: dict[str, dict[int, CachedPrediction]] = {}
        self._segmenters: dict[tuple[str, int | None], ClickSegmenter] = {}
        self._segmenter_lock = threading.Lock()

    # --- store -----------------------------------------------------------------------------------------
    @property
    def store(self) -> LabelStore:
        if self._store is None:
            # the clinicians' front-end writes corrections: it creates or migrates the store it opens
            self._store = LabelStore(self.url, project=self.project, schema=self.schema, migrate=True)
        return self._store

    @property
    def display_url(self) -> str:
        return mask_url(self.url)

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None

    # --- models ----------------------------------------------------------------------------------------
    def model_choices(self) -> list[ModelChoice]:
        """Champion first, then other registered bundles (newest first), bundles picked by hand, untrained."""
        # click heads (task "interactive") cannot segment a frame alone: they are served by click_segmenter
        rows = [
            r
            for r in self.store.model_versions()
            if r.get("bundle_path") and r.get("task") != INTERACTIVE_TASK
        ]
        rank = {CHAMPION: 0, CANDIDATE: 2, PREVIOUS_CHAMPION: 3}
        rows.sort(key=lambda r: (rank.get(r["status"], 4), -r["created_at"].timestamp()))
        out = [ModelChoice(r["version"], r["bundle_path"], r["status"]) for r in rows]
        out += [c for c in self._extra if c not in out]
        out.append(ModelChoice(UNTRAINED, None, "untrained"))
        return out

    def add_bundle(self, path: str | Path) -> ModelChoice:
        """A bundle chosen in the widget (not in the registry): read its version, list it."""
        from surgenet_assist.core.bundle import read_bundle_info

        info = read_bundle_info(path)
        choice = ModelChoice(info.version, str(Path(path).resolve()), "bundle")
        if choice not in self._extra:
            self._extra.insert(0, choice)
        return choice

    def predictor(self, choice: ModelChoice) -> Predictor:
        """Load (once) the predictor for a choice; slow, so the widget calls it in a worker thread."""
        key = (choice.bundle_path or UNTRAINED, self.short_side)
        if key in self._predictors:
            return self._predictors[key]
        if choice.bundle_path:
            pred = Predictor.from_bundle(
                choice.bundle_path,
                short_side=self.short_side,
                batch_size=self.batch_size,
                device=self.device,
                allow_download=False,
            )
            pred.model_version = choice.version
        else:
            pred = Predictor(
                _random_init_model(),
                short_side=self.short_side or 256,
                batch_size=self.batch_size,
                device=self.device,
                model_version=UNTRAINED,
            )
        self._predictors[key] = pred
        return pred

    def click_segmenter(self, choice: ModelChoice) -> ClickSegmenter:
        """The click-to-mask engine on ``choice``'s backbone (created once; it caches per-frame features).

        It serves the project's learned click head when the registry has one trained on this backbone,
        otherwise the day-one level. Slow the first time (the model loads), so called in a worker thread."""
        from surgenet_assist.core.interactive import ClickSegmenter
        from surgenet_assist.core.interactive.serving import serving_click_head

        key = (choice.bundle_path or UNTRAINED, self.short_side)
        with self._segmenter_lock:
            if key not in self._segmenters:
                backbone = self.predictor(choice).model.backbone
                served = serving_click_head(self.store, self.project, backbone_sha256=backbone.weights_sha256)
                head, version = served if served is not None else (None, None)
                self._segmenters[key] = ClickSegmenter(backbone, head=head, head_version=version)
            return self._segmenters[key]

    # --- clips -----------------------------------------------------------------------------------------
    def open_clip(self, source: dict[str, Any]) -> Clip:
        """Register the reader's source (path, fps, size) in the store; idempotent on the path."""
        path = Path(source["path"])
        digest = video_content_hash(path)
        vid = self.store.add_video(
            str(path),
            fps=float(source["fps"]),
            frame_count=int(source["frame_count"]),
            content_hash=None if path.is_dir() else digest,
        )
        return Clip(
            str(path),
            vid,
            int(source["frame_count"]),
            int(source["height"]),
            int(source["width"]),
            float(source["fps"]),
            digest,
        )

    def human_labels(self, clip: Clip) -> dict[str, Any]:
        """Current human labels of a clip: per-frame phase ids, CVS values and masks by frame."""
        phases = self.store.phase_labels(clip.video_id, length=clip.frame_count)
        cvs: dict[int, list[float]] = {}
        for rec in self.store.current_human_labels("cvs", video_id=clip.video_id):
            for f in range(rec.frame_start, rec.frame_end + 1):
                cvs[f] = list(rec.payload["values"])
        masks = {
            rec.frame_start: rec.payload["mask"]
            for rec in self.store.current_human_labels("segmentation", video_id=clip.video_id)
            if rec.frame_start == rec.frame_end and "mask" in rec.payload
        }
        return {"phases": phases, "cvs": cvs, "masks": masks}

    # --- prediction --------------------------------------------------------------------------------------
    def cached(self, clip: Clip, predictor: Predictor) -> dict[int, CachedPrediction]:
        return self._cache.setdefault(clip_signature(clip, predictor.model_version, predictor.short_side), {})

    def predict_frames(
        self,
        clip: Clip,
        predictor: Predictor,
        indices: Sequence[int],
        should_stop: Callable[[], bool] = lambda: False,
    ) -> Iterator[tuple[int, CachedPrediction]]:
        """Predict ``indices`` (cached frames are served from the cache), store each model output as a
        prediction row, and yield ``(frame, prediction)`` as soon as each frame is done.

        Runs in a worker thread: it opens its own decoder, and stops between batches when ``should_stop()``.
        """
        from surgenet_assist.core.video import FrameRecord, open_video

        cache = self.cached(clip, predictor)
        todo = [int(i) for i in indices if int(i) not in cache]
        for i in indices:
            if int(i) in cache:
                yield int(i), cache[int(i)]
        if not todo:
            return
        with open_video(clip.path, fps=clip.fps) as video:
            for start in range(0, len(todo), predictor.batch_size):
                if should_stop():
                    return
                chunk = todo[start : start + predictor.batch_size]
                records = [FrameRecord(i, i / clip.fps, video.read_frame(i)) for i in chunk]
                preds = predictor.predict(records, keep_masks=True)
                items = [self._as_cached(p, predictor.model_version) for p in preds]
                self._store_predictions(clip, preds, predictor.model_version)
                for p, item in zip(preds, items, strict=True):
                    cache[p.index] = item
                    yield p.index, item

    def propagate_frames(
        self,
        clip: Clip,
        predictor: Predictor,
        keyframe: int,
        mask: np.ndarray,
        targets: Sequence[int],
        should_stop: Callable[[], bool] = lambda: False,
        *,
        version: str | None = None,
        finish: Callable[[int, np.ndarray], np.ndarray] | None = None,
    ) -> Iterator[tuple[int, np.ndarray]]:
        """Carry ``mask`` from ``keyframe`` to ``targets`` by backbone feature similarity (no trained head
        needed), store each result as a ``propagation-from-<keyframe>`` prediction (or ``version``), yield
        ``(frame, mask)``. ``finish(frame, propagated)``, when given, turns the propagated mask into what is
        stored and yielded (a propagated object merged into the frame's labels).

        Runs in a worker thread; stops between frames when ``should_stop()``. Frames after a similarity
        collapse (e.g. a camera cut) are not yielded."""
        from surgenet_assist.core.embedding_cache import compute_features
        from surgenet_assist.core.propagation import MaskPropagator
        from surgenet_assist.core.video import open_video

        frames = sorted({int(keyframe), *(int(t) for t in targets)})
        feats = compute_features(
            clip.path, predictor.model.backbone, None, predictor.short_side, self.batch_size, frames=frames
        )
        prop = MaskPropagator(feats, self.schema.num_classes)
        result = prop.propagate({int(keyframe): np.asarray(mask, dtype=np.uint8)})
        version = version or f"propagation-from-{int(keyframe)}"
        with open_video(clip.path, fps=clip.fps) as video:
            for f in sorted(result, key=lambda i: abs(i - keyframe)):
                if should_stop():
                    return
                if not result[f].reliable:
                    continue
                full, _ = prop.to_mask(result[f], video.read_frame(f))
                if finish is not None:
                    full = finish(f, full)
                self.store.ensure_frames(clip.video_id, [f])
                self.store.add_predictions(
                    [
                        {
                            "video_id": clip.video_id,
                            "frame_index": f,
                            "model_version": version,
                            "task": "segmentation",
                            "payload": full,
                            "score": result[f].confidence,
                        }
                    ]
                )
                yield f, full

    @staticmethod
    def _as_cached(p: FramePrediction, version: str) -> CachedPrediction:
        assert p.mask is not None and p.confidence is not None
        unc = (1.0 - p.confidence.astype(np.float32)).astype(np.float16)
        return CachedPrediction(p.mask, unc, p.phase_probs, p.cvs_probs, dict(p.uncertainty), version)

    def _store_predictions(self, clip: Clip, preds: Sequence[FramePrediction], version: str) -> None:
        items: list[dict[str, Any]] = []
        for p in preds:
            base = {
                "video_id": clip.video_id,
                "frame_index": p.index,
                "model_version": version,
                "score": p.score,
            }
            items += [
                base
                | {"task": "segmentation", "payload": p.mask, "uncertainty": p.uncertainty["segmentation"]},
                base
                | {
                    "task": "phase",
                    "payload": int(p.phase),
                    "probabilities": p.phase_probs.tolist(),
                    "uncertainty": p.uncertainty["phase"],
                },
                base
                | {
                    "task": "cvs",
                    "payload": np.clip(p.cvs_probs, 0, 1).tolist(),
                    "probabilities": p.cvs_probs.tolist(),
                    "uncertainty": p.uncertainty["cvs"],
                },
            ]
        self.store.ensure_frames(clip.video_id, [p.index for p in preds])
        self.store.add_predictions(items)

    # --- commits -----------------------------------------------------------------------------------------
    def _payload(self, task: str, value: Any, shown_model: str | None) -> Payload:
        base = build_payload(task, value, self.schema)
        return Payload(base.task, base.data | {SHOWN_MODEL_KEY: shown_model}, base.mask)

    def commit(
        self,
        clip: Clip,
        frames: tuple[int, int],
        *,
        masks: dict[int, np.ndarray] | None = None,
        phases: np.ndarray | None = None,
        cvs: dict[int, Sequence[float]] | None = None,
        shown_model: str | None = None,
        started_from: Mapping[str, Mapping[int, str]] | None = None,
    ) -> CommitResult:
        """Record the clinician's labels for ``frames`` (inclusive) with provenance, all in ONE store
        transaction: every label of the commit is stored, or (on any error) none.

        ``masks`` and ``cvs`` are per frame; ``phases`` is the clip's per-frame phase-id array (-1 = unset),
        of which the range is committed as one range label (or a single-frame label for one frame).
        ``started_from``: per task, the frames whose value a model's pre-annotation or a propagation filled
        and the version that filled them (``ClipEdits.started_from``); each label is stored as started from
        it (a range from the version that filled most of its frames), and as reviewed: a person committed it.
        """
        start, end = int(frames[0]), int(frames[1])
        filled = started_from or {}

        def common(task: str, first: int, last: int | None = None) -> dict[str, Any]:
            by_frame = filled.get(task, {})
            versions = Counter(by_frame[f] for f in range(first, (last or first) + 1) if f in by_frame)
            provenance = Provenance.started_from(versions.most_common(1)[0][0]) if versions else Provenance()
            return {"source": "napari", "author": self.author, "provenance": provenance}

        # every payload is validated before anything is written (a bad one raises SchemaError here)
        items: list[AnnotationInput] = []
        for f, mask in sorted((masks or {}).items()):
            payload = self._payload("segmentation", mask, shown_model)
            items.append(
                AnnotationInput(clip.video_id, int(f), "segmentation", payload, **common("segmentation", f))
            )
        if phases is not None:
            part = np.asarray(phases[start : end + 1])
            if start == end and part[0] >= 0:
                payload = self._payload("phase", int(part[0]), shown_model)
                items.append(
                    AnnotationInput(clip.video_id, start, "phase", payload, **common("phase", start))
                )
            elif start < end and (part >= 0).any():
                segments = [(start + s, start + e - 1, int(p)) for s, e, p in runs(part) if p >= 0]
                payload = self._payload("phase", {"segments": segments}, shown_model)
                items.append(
                    AnnotationInput(
                        clip.video_id, start, "phase", payload, frame_end=end, **common("phase", start, end)
                    )
                )
        for f, values in sorted((cvs or {}).items()):
            payload = self._payload("cvs", [float(v) for v in values], shown_model)
            items.append(AnnotationInput(clip.video_id, int(f), "cvs", payload, **common("cvs", f)))

        def write(w: Writer) -> list[RecordResult]:
            w.ensure_frames(clip.video_id, range(start, end + 1))
            return w.record_annotations(items, self.store.project)

        # ONE transaction: a failure part-way (a refused row, a lost connection) leaves none of it stored,
        # and the error (a SurgenetAssistError) reaches the panel, which keeps the edits uncommitted
        recorded = self.store.transaction(write)
        result = CommitResult((start, end))
        for item, r in zip(items, recorded, strict=True):
            result.revisions.setdefault(item.task, []).append(r.revision_id)
        return result

    # --- review order ------------------------------------------------------------------------------------
    def next_to_review(
        self, clip: Clip, current: int, skip: set[int] | frozenset[int] = frozenset()
    ) -> int | None:
        """Next frame of the active-learning queue for this clip; plain frame order without a queue.

        Frames with a human label and frames in ``skip`` (already reviewed this session) are passed over.
        """
        queue = [
            item.frame_index
            for item in self.store.labelling_queue("segmentation", limit=500)
            if item.video_id == clip.video_id and item.frame_index < clip.frame_count
        ]
        for f in queue:
            if f != current and f not in skip:
                return int(f)
        if queue:
            return None
        labels = self.store.current_human_labels("segmentation", video_id=clip.video_id, with_payload=False)
        labelled = {r.frame_start for r in labels}
        for f in list(range(current + 1, clip.frame_count)) + list(range(0, current)):
            if f not in labelled and f not in skip:
                return f
        return None

    # --- export ------------------------------------------------------------------------------------------
    def export(self, fmt: str, out: str | Path) -> Any:
        """Export the store's human labels in one of the store's formats."""
        from surgenet_assist.core import formats  # noqa: F401 - registers nothing, keeps imports lazy

        if fmt == "coco":
            from surgenet_assist.core.formats.coco import export_coco

            return export_coco(self.store, out, schema=self.schema)
        if fmt == "cholecseg8k":
            from surgenet_assist.core.formats.cholecseg8k import export_cholecseg8k

            return export_cholecseg8k(self.store, out, schema=self.schema)
        if fmt == "cholec80":
            from surgenet_assist.core.formats.cholec80 import export_cholec80

            return export_cholec80(self.store, out, schema=self.schema)
        if fmt == "label-studio":
            from surgenet_assist.core.formats.label_studio import export_label_studio

            return export_label_studio(self.store, out, schema=self.schema)
        raise UsageError(f"unknown export format {fmt!r}", f"use one of: {', '.join(EXPORT_FORMATS)}")


EXPORT_FORMATS = ("coco", "cholecseg8k", "cholec80", "label-studio")


def plugin_settings() -> dict[str, Any]:
    """The plugin's napari settings (Preferences › SurgeNet Assist), with defaults outside napari."""
    out: dict[str, Any] = {
        "database_url": "",
        "project": "default",
        "author": "",
        "short_side": 0,
        "batch_size": 4,
        "device": "",
    }
    try:
        from napari.settings import get_plugin_settings

        s = get_plugin_settings(PLUGIN)
        out.update(
            database_url=s.store.database_url,
            project=s.store.project,
            author=s.store.author,
            short_side=s.model.short_side,
            batch_size=s.model.batch_size,
            device=s.model.device,
        )
    except Exception:  # noqa: BLE001 - settings unavailable (plugin not registered): defaults
        pass
    return out


def _random_init_model() -> Any:
    """One shared random-init model per process (creating it takes seconds; weights never download)."""
    global _RANDOM_INIT_MODEL
    with _RANDOM_INIT_LOCK:
        if _RANDOM_INIT_MODEL is None:
            from surgenet_assist.core.model import SurgeNetAssistModel

            _RANDOM_INIT_MODEL = SurgeNetAssistModel.create(random_init=True)
        return _RANDOM_INIT_MODEL


__all__ = [
    "EXPORT_FORMATS",
    "SHOWN_MODEL_KEY",
    "UNTRAINED",
    "CachedPrediction",
    "Clip",
    "CommitResult",
    "LabelRecord",
    "ModelChoice",
    "ReviewSession",
    "clip_signature",
]
