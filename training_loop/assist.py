"""Day-one assistance for a server: label propagation and instant heads over the store's human labels.

The backend keeps one :class:`DayOneAssist` per process. It owns a frozen backbone, the per-video embedding
cache and the :class:`~.instant.InstantUpdater` worker; the HTTP layer only asks it for predictions
(``propagated``, ``phase_timeline``, ``instant_predictor``) and calls ``label_arrived`` after a webhook stored
a label, so all the logic lives here and requests never wait for a refit.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from surgenet_assist.core.backbone import SurgeNetBackbone
from surgenet_assist.core.embedding_cache import (
    DEFAULT_CACHE_BYTES,
    ByteLRU,
    EmbeddingCache,
    Stages,
    VideoFeatures,
    image_stages,
    resident_nbytes,
)
from surgenet_assist.core.predictor import FramePrediction, VideoPrediction, normalised_entropy
from surgenet_assist.core.propagation import MaskPropagator, propagate_cvs, propagate_phases
from surgenet_assist.core.schema import DEFAULT_SCHEMA, LabelSchema
from surgenet_assist.core.timeline import runs, smooth_phase_labels
from surgenet_assist.core.video import open_video

from .instant import (
    InstantHeads,
    InstantUpdater,
    SegSample,
    ServingChoice,
    choose_serving,
    fit_with_validation,
    latest_instant,
    register_instant,
)

log = logging.getLogger("surgenet_assist.assist")
VAL_FRAMES = 200  # validation frames the champion is scored on at each refit (decoded and predicted)

class InstantPredictor:
    """The instant heads behind the :class:`~surgenet_assist.core.predictor.Predictor` interface the
    backend's prediction formatting uses (``predict``, ``predict_video``, ``model_version``, ``schema``)."""

    def __init__(self, assist: DayOneAssist, heads: InstantHeads, version: str) -> None:
        self.assist, self.heads, self.model_version = assist, heads, version
        self.schema = assist.schema

    def _frame(self, index: int, stages: Stages, size: tuple[int, int] | None) -> FramePrediction:
        s8, s16, emb = stages
        phase = self.heads.phase_probs(emb)[0]
        cvs = self.heads.cvs_probs(emb)[0]
        unc: dict[str, float] = {}
        mask = conf = None
        if self.heads.has_seg:
            probs = self.heads.seg_probs(s8, s16)
            unc["segmentation"] = float(normalised_entropy(torch.from_numpy(probs), 0).mean())
            if size is not None:
                mask, conf = self.heads.to_mask(probs, size)
        if self.heads.has_phase:
            unc["phase"] = float(normalised_entropy(torch.from_numpy(phase), 0))
        if self.heads.has_cvs:
            p = np.clip(cvs, 1e-6, 1 - 1e-6)
            unc["cvs"] = float(np.mean(-(p * np.log(p) + (1 - p) * np.log(1 - p)) / np.log(2)))
        return FramePrediction(
            index, float(index), mask, conf, phase, cvs, unc or {"all": 1.0}, np.asarray(emb, np.float32)
        )

    def predict(self, frames: Any, keep_masks: bool = True) -> list[FramePrediction]:
        out = []
        for i, image in enumerate(frames):
            stages = image_stages(self.assist.backbone, image, self.assist.short_side)
            out.append(self._frame(i, stages, image.shape[:2] if keep_masks else None))
        return out

    def predict_video(self, source: str | Path, sample_fps: float | None = 1.0) -> VideoPrediction:
        feats = self.assist.video_features(source)
        phase = self.heads.phase_probs(np.asarray(feats.embeddings, np.float32))
        preds = [
            self._frame(int(i), (feats.stride8[p], feats.stride16[p], feats.embeddings[p]), None)
            for p, i in enumerate(feats.indices)
        ]
        labels = smooth_phase_labels(phase)
        idx = np.asarray(feats.indices)
        return VideoPrediction(
            indices=idx,
            timestamps=idx.astype(float),
            phase_probs=phase,
            phase_timeline_probs=phase,
            phase_labels=labels,
            cvs_probs=np.stack([p.cvs_probs for p in preds]),
            uncertainty={k: np.array([p.uncertainty[k] for p in preds]) for k in preds[0].uncertainty},
            embeddings=np.asarray(feats.embeddings, np.float16),
            fps=sample_fps or 1.0,
            segments=[(int(idx[s]), int(idx[e - 1]), lab) for s, e, lab in runs(labels)],
        )


def _features_nbytes(value: VideoFeatures | Stages) -> int:
    """Memory a cached video's features (memory-mapped stages: their indices and embeddings) or a frame's
    stages hold in this process."""
    if isinstance(value, VideoFeatures):
        return resident_nbytes(value.indices, value.stride8, value.stride16, value.embeddings)
    return resident_nbytes(*value)


class DayOneAssist:
    """Propagation + instant heads for one label store (see the module docstring).

    Features in memory (videos' cache entries, single frames' stages) share one LRU of at most
    ``feature_cache_bytes``: a frame's stages cost ~0.75 MB at a 256-pixel short side (854 x 480 input
    448 x 256), at most ~1.7 MB (the input's long side is clamped); a video's entry costs ~1 KB per sampled
    frame, its stages being memory-mapped from the disk cache."""

    no_model_version = "no-model"  # what a task gets when neither source can say anything

    def __init__(
        self,
        store: Any,
        backbone: SurgeNetBackbone,
        *,
        schema: LabelSchema = DEFAULT_SCHEMA,
        short_side: int = 256,
        sample_fps: float | None = 1.0,
        cache: EmbeddingCache | None = None,
        resolve: Callable[[str], Path] | None = None,
        project: str | None = None,
        instant_root: str | Path | None = None,
        debounce_s: float = 0.5,
        worker: bool = True,
        feature_cache_bytes: int = DEFAULT_CACHE_BYTES,
    ) -> None:
        self.store, self.backbone, self.schema = store, backbone.eval(), schema
        self.short_side, self.sample_fps, self.project = short_side, sample_fps, project
        self.cache = cache or EmbeddingCache()
        self.resolve = resolve or Path
        self.instant_root = instant_root
        self.features_in_memory: ByteLRU[VideoFeatures | Stages] = ByteLRU(
            feature_cache_bytes, _features_nbytes
        )
        self._propagated: dict[tuple[int, tuple], dict[int, Any]] = {}
        self._heads: tuple[str, InstantHeads] | None = None
        self._lock = threading.RLock()
        self._fitted_label_version: int | None = None
        self._seen_label_version: int | None = None
        self.updater = InstantUpdater(self.update_instant, debounce_s) if worker else None
        self._champion_model: tuple[str, Any] | None = None

    # --- features ---------------------------------------------------------------------------------------
    def video_features(self, video: str | Path) -> VideoFeatures:
        path = str(self.resolve(str(video)))
        with self._lock:
            feats = self.features_in_memory.get(("video", path))
            if feats is None:
                feats = self.cache.get_or_compute(path, self.backbone, self.sample_fps, self.short_side)
                self.features_in_memory.put(("video", path), feats)
            return feats

    def frame_stages(self, video: str, frame: int) -> Stages:
        """Features of one frame: from the video's cache when the frame was sampled, else computed."""
        feats = self.video_features(video)
        try:
            p = feats.position(frame)
            return feats.stride8[p], feats.stride16[p], feats.embeddings[p]
        except KeyError:
            pass
        key = ("frame", str(video), int(frame))
        with self._lock:
            stages = self.features_in_memory.get(key)
            if stages is None:
                with open_video(self.resolve(str(video))) as src:
                    image = src.read_frame(frame)
                stages = self.features_in_memory.put(key, image_stages(self.backbone, image, self.short_side))
            return stages

    # --- instant heads --------------------------------------------------------------------------------
    def training_data(
        self,
    ) -> tuple[list[SegSample], list[tuple[np.ndarray, int]], list[tuple], dict[str, list[str]]]:
        """Every current human label outside the test and final splits as features + target (phase ranges:
        their sampled frames), and the video of each sample per task (for validation by held-out videos).
        Test and final videos never shape what is served: they decide and report promotions."""
        test = {v["path"] for v in self.store.videos(self.project) if v["split"] in ("test", "final")}
        seg, phase, cvs = [], [], []
        videos: dict[str, list[str]] = {"segmentation": [], "phase": [], "cvs": []}

        def labels(task: str) -> list[Any]:
            rows = self.store.training_labels(task, project=self.project)
            return [r for r in rows if r.video_path not in test]

        for r in labels("segmentation"):
            s8, s16, _ = self.frame_stages(r.video_path, r.frame_start)
            seg.append(SegSample(np.asarray(s8), np.asarray(s16), r.payload["mask"]))
            videos["segmentation"].append(r.video_path)
        for r in labels("cvs"):
            cvs.append(
                (
                    np.asarray(self.frame_stages(r.video_path, r.frame_start)[2], np.float32),
                    np.asarray(r.payload["values"], float),
                )
            )
            videos["cvs"].append(r.video_path)
        for r in labels("phase"):
            if "segments" in r.payload:
                feats = self.video_features(r.video_path)
                for start, end, name in r.payload["segments"]:
                    pid = self.schema.phase_id(name)
                    for p in np.flatnonzero((feats.indices >= start) & (feats.indices <= end)):
                        phase.append((np.asarray(feats.embeddings[p], np.float32), pid))
                        videos["phase"].append(r.video_path)
            else:
                emb = self.frame_stages(r.video_path, r.frame_start)[2]
                phase.append((np.asarray(emb, np.float32), self.schema.phase_id(r.payload["phase"])))
                videos["phase"].append(r.video_path)
        return seg, phase, cvs, videos

    def champion_on_validation(self, champion: dict[str, Any] | None) -> dict[str, float]:
        """The champion's headline metrics on the validation split's labelled frames: the frames the instant
        heads are validated on when the store has that split, so the two are compared on the same frames."""
        if champion is None or not champion.get("bundle_path"):
            return {}
        from surgenet_assist.core.bundle import load_bundle

        from .datasets import load_split
        from .evaluate import evaluate_model

        data = load_split(self.store, "val", project=self.project, max_frames=VAL_FRAMES)
        if len(data.frames) == 0:
            return {}
        with self._lock:
            if self._champion_model is None or self._champion_model[0] != champion["version"]:
                model, _ = load_bundle(champion["bundle_path"], allow_download=False)
                self._champion_model = (champion["version"], model)
            model = self._champion_model[1]
        return evaluate_model(model, data.frames, surface_distance=False)["primary"]

    def update_instant(self, force: bool = False) -> str | None:
        """Refit on all current labels and register the result; None when the labels did not change."""
        label_version = self.store.label_version()
        if not force and label_version == self._fitted_label_version:
            return None
        seg, phase, cvs, videos = self.training_data()
        if not (seg or phase or cvs):
            return None
        val_videos = {v["path"] for v in self.store.videos(self.project) if v["split"] == "val"}
        heads = fit_with_validation(
            seg,
            phase,
            cvs,
            self.schema,
            videos=videos,
            val_videos=val_videos,
            meta={
                "label_version": label_version,
                "backbone_sha256": self.backbone.weights_sha256,
                "short_side": self.short_side,
            },
        )
        champion = self.store.serving_champion(self.project)
        held = set(heads.meta["val"]["videos"])
        if champion is not None and held and held <= val_videos:  # same frames: score the champion there
            try:
                heads.meta["val"]["champion_primary"] = self.champion_on_validation(champion)
                heads.meta["val"]["champion"] = champion["version"]
            except Exception as exc:  # noqa: BLE001 - without the comparison the champion keeps serving
                log.warning("champion %s not scored on validation: %s", champion["version"], exc)
        version = register_instant(self.store, heads, self.instant_root)
        with self._lock:
            self._heads = (version, heads)
            self._fitted_label_version = label_version
        log.info("instant heads %s fitted on %s", version, heads.meta["counts"])
        return version

    def label_arrived(self) -> None:
        """Called after a label was stored: schedules a refit (debounced) and returns at once."""
        if self.updater is not None:
            self.updater.notify()

    def poll_labels(self) -> None:
        """Schedule a refit when labels arrived by another route (a napari commit, an import): the store's
        label version moved since this process last looked. One cheap query."""
        version = self.store.label_version()
        if version == self._seen_label_version:
            return
        if self._seen_label_version is None:  # first look after start-up: refit unless already current
            row = latest_instant(self.store)
            stale = row is None or (row.get("metrics") or {}).get("label_version") != version
            if version > 0 and stale:
                self.label_arrived()
        else:
            self.label_arrived()
        self._seen_label_version = version

    def instant_heads(self) -> tuple[str, InstantHeads] | None:
        row = latest_instant(self.store)
        if row is None:
            return None
        with self._lock:
            if self._heads is None or self._heads[0] != row["version"]:
                heads = InstantHeads.load(row["bundle_path"])
                if heads.meta.get("backbone_sha256") not in (None, self.backbone.weights_sha256):
                    return None  # fitted on another backbone's features: meaningless here
                self._heads = (row["version"], heads)
            return self._heads

    def serving(self, champion: dict[str, Any] | None) -> ServingChoice:
        return choose_serving(champion, latest_instant(self.store))

    def instant_predictor(self) -> InstantPredictor | None:
        got = self.instant_heads()
        return InstantPredictor(self, got[1], got[0]) if got else None

    def served_version(self) -> str:
        """The one ``model_version`` of everything this assistant answers now (``/setup`` reports it and
        every ``/predict`` result carries it, whichever source answered a task): the instant heads' version
        when they were fitted on the store's current labels; ``<heads>+propagation-<label version>`` while a
        refit on newer labels is pending; ``propagation-<label version>`` before any heads; ``no-model``
        with no labels at all. It changes exactly when the answers can change (a new label, new heads), so
        Label Studio asks again once, and never otherwise."""
        label_version = self.store.label_version()
        got = self.instant_heads()
        if got is None:
            return f"propagation-{label_version}" if label_version > 0 else self.no_model_version
        version, heads = got
        if heads.meta.get("label_version") == label_version:
            return version
        return f"{version}+propagation-{label_version}"

    # --- propagation ------------------------------------------------------------------------------------
    def propagated(self, video: str, frame: int, image: np.ndarray | None = None) -> dict[str, Any] | None:
        """Propagated mask for ``frame`` of a store video from its human segmentation labels on *other*
        frames, or None (no such labels, frame not sampled, or unreliable, e.g. behind a camera cut)."""
        vid = self.store.video_id(video, project=self.project)
        if vid is None:
            return None
        labels = [
            r
            for r in self.store.current_human_labels("segmentation", video_id=vid, project=self.project)
            if r.frame_start != frame
        ]
        if not labels:
            return None
        feats = self.video_features(video)
        sampled = {int(i) for i in feats.indices}
        keyframes = {r.frame_start: r.payload["mask"] for r in labels if r.frame_start in sampled}
        if not keyframes or frame not in sampled:
            return None
        cache_key = (vid, tuple(sorted(r.revision_id for r in labels)))
        with self._lock:
            if cache_key not in self._propagated:
                prop = MaskPropagator(feats, self.schema.num_classes)
                self._propagated = {cache_key: {"prop": prop, "frames": prop.propagate(keyframes)}}
            entry = self._propagated[cache_key]
        result = entry["frames"].get(frame)
        if result is None or not result.reliable:
            return None
        mask, conf = entry["prop"].to_mask(result, image)
        return {"mask": mask, "confidence": conf, "frame": result, "label_version": max(cache_key[1])}

    def phase_timeline(self, video: str) -> dict[str, Any] | None:
        """Phase of every sampled frame from the video's human phase labels (ordered k-NN + Viterbi)."""
        vid = self.store.video_id(video, project=self.project)
        if vid is None:
            return None
        per_frame = self.store.phase_labels(vid)
        if not (per_frame >= 0).any():
            return None
        feats = self.video_features(video)
        labelled = {
            p: int(per_frame[i])
            for p, i in enumerate(feats.indices)
            if i < len(per_frame) and per_frame[i] >= 0
        }
        if not labelled:
            return None
        labels, probs = propagate_phases(feats.embeddings, labelled, self.schema.num_phases)
        idx = np.asarray(feats.indices)
        cvs_labels = {
            feats.position(r.frame_start): np.asarray(r.payload["values"], float)
            for r in self.store.current_human_labels("cvs", video_id=vid, project=self.project)
            if r.frame_start in set(idx.tolist())
        }
        return {
            "indices": idx,
            "labels": labels,
            "probs": probs,
            "segments": [(int(idx[s]), int(idx[e - 1]), lab) for s, e, lab in runs(labels)],
            "cvs": propagate_cvs(feats.embeddings, cvs_labels) if cvs_labels else None,
            "label_version": self.store.label_version(),
        }

    def close(self) -> None:
        if self.updater is not None:
            self.updater.close()
