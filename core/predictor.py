"""Batched, streaming inference: frames in, masks / phases / CVS / uncertainty / embeddings out.

Frames are preprocessed exactly as the model was trained (its :class:`~.model.Preprocessing`, read from the
bundle): resized to the training frame size when one is recorded, then to the recorded short side (sides
rounded to a multiple of 32, e.g. 854x480 at short side 256 -> 448x256), normalised and batched; outputs
are mapped back to the original size. An explicit ``short_side`` overrides the contract and is logged as
such. A background thread decodes and resizes the next batch while the model runs on the current one, so
IO overlaps compute. On CUDA the model runs in bf16 autocast with ``channels_last``, batches are copied from
pinned memory without blocking, and ``compile``/``cuda_graphs`` specialise the forward to one batch shape
(short batches padded); on CPU in fp32. ``batch_size=None`` picks one for the device.
Memory stays bounded for any video length: nothing is kept per frame but small vectors, unless the caller
keeps the masks.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from .errors import FrameError
from .model import Preprocessing, SurgeNetAssistModel, target_size
from .timeline import runs, smooth_phase_labels
from .video import FrameRecord, check_frame, open_video

log = logging.getLogger(__name__)

MODEL_FPS = "model"  # predict_video's default: the temporal model's recorded rate


def default_batch_size(device: str | torch.device | None = None) -> int:
    """Frames per forward pass for a device: 4 on CPU (measured fastest on 2 cores: the working set stays in
    cache, docs/performance.md); on a GPU, by its memory (a 256x448 bf16 frame needs ~60 MB of activations
    through backbone + heads, so 256 fits an 80 GB card with room for the decoder's frames)."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type != "cuda":
        return 4
    total_gb = torch.cuda.get_device_properties(dev).total_memory / 2**30
    return 256 if total_gb >= 70 else 128 if total_gb >= 35 else 64 if total_gb >= 16 else 16


def normalised_entropy(probs: torch.Tensor, dim: int) -> torch.Tensor:
    """Entropy divided by log(K): 0 = certain, 1 = uniform."""
    k = probs.shape[dim]
    return -(probs * torch.log(probs.clamp_min(1e-12))).sum(dim) / math.log(k)


@dataclass
class FramePrediction:
    """Everything the model says about one frame, at the frame's original size."""

    index: int
    timestamp: float
    mask: np.ndarray | None  # (H, W) uint8 class ids
    confidence: np.ndarray | None  # (H, W) float16, max softmax probability per pixel
    phase_probs: np.ndarray  # (P,) per-frame classifier
    cvs_probs: np.ndarray  # (3,)
    uncertainty: dict[str, float]  # normalised entropy per task
    embedding: np.ndarray  # (D,) float32

    @property
    def phase(self) -> int:
        return int(self.phase_probs.argmax())

    @property
    def score(self) -> float:
        """Overall confidence in [0, 1] (1 - mean uncertainty): low means worth a human look."""
        return float(1.0 - np.mean(list(self.uncertainty.values())))


@dataclass
class VideoPrediction:
    """Per-frame vectors of a whole video plus the smoothed phase timeline."""

    indices: np.ndarray
    timestamps: np.ndarray
    phase_probs: np.ndarray  # (T, P) frame classifier
    phase_timeline_probs: np.ndarray  # (T, P) causal temporal model (or frame probs when it is untrained)
    phase_labels: np.ndarray  # (T,) smoothed
    cvs_probs: np.ndarray  # (T, 3)
    uncertainty: dict[str, np.ndarray]
    embeddings: np.ndarray  # (T, D) float16
    fps: float
    segments: list[tuple[int, int, int]] = field(default_factory=list)  # (first_idx, last_idx, phase)


def _as_records(frames: Any) -> Iterator[FrameRecord]:
    if isinstance(frames, np.ndarray):
        if frames.ndim == 3:
            frames = [frames]
        elif frames.ndim != 4:
            raise FrameError(
                f"frames array has shape {frames.shape}", "pass (H, W, 3) or (T, H, W, 3) uint8 RGB arrays"
            )
    for i, item in enumerate(frames):
        if isinstance(item, FrameRecord):
            yield item
        else:
            yield FrameRecord(i, float(i), item)


class Predictor:
    """Runs a :class:`SurgeNetAssistModel` efficiently on frames, lists, streams and videos."""

    def __init__(
        self,
        model: SurgeNetAssistModel,
        device: str | torch.device | None = None,
        batch_size: int | None = 4,  # None: default_batch_size(device)
        short_side: int | None = None,
        amp: bool | None = None,
        channels_last: bool | None = None,
        compile: bool = False,
        prefetch: int = 2,
        model_version: str = "untrained",
        cuda_graphs: bool = False,
    ) -> None:
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.eval().to(self.device)
        self.schema = model.schema
        self.batch_size = max(1, int(batch_size or default_batch_size(self.device)))
        contract = model.preprocessing_contract()
        if short_side and int(short_side) != contract.short_side:
            log.warning(
                "explicit override: serving %s at short side %d, not the short side %d it was %s with",
                model_version,
                int(short_side),
                contract.short_side,
                "trained" if contract.source == "training" else "configured",
            )
            contract = contract.with_changes(short_side=int(short_side))
        self.preprocessing: Preprocessing = contract
        self.short_side = contract.short_side
        self.frame_size = contract.frame_size
        self.temporal_fps = contract.temporal_fps
        self._interp = contract.interpolation
        is_cuda = self.device.type == "cuda"
        self.amp = is_cuda if amp is None else amp
        self.channels_last = True if channels_last is None else channels_last  # faster on CPU (oneDNN) too
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.prefetch = max(1, prefetch)
        self.model_version = model_version
        self._mean = torch.tensor(contract.mean, device=self.device).view(1, 3, 1, 1) * 255.0
        self._std = torch.tensor(contract.std, device=self.device).view(1, 3, 1, 1) * 255.0
        self._forward: Callable = self.model
        # compiled graphs are specialised to one batch shape: short batches are padded to batch_size
        self._fixed_batch = bool(compile or cuda_graphs)
        if compile or cuda_graphs:
            if self.device.type == "cpu":
                # inference-only: constant-fold weights and prepack them for oneDNN (~13% faster on CPU)
                import torch._inductor.config as inductor_config

                inductor_config.freezing = True
            # "reduce-overhead" records CUDA graphs: one launch per batch instead of hundreds of kernels
            mode = "reduce-overhead" if cuda_graphs and self.device.type == "cuda" else None
            self._forward = torch.compile(self.model, dynamic=False, mode=mode)

    @classmethod
    def from_bundle(cls, path: str | Path, **kwargs: Any) -> Predictor:
        """Load a bundle; serve it with the preprocessing it records (``short_side=`` overrides, logged)."""
        from .bundle import load_bundle

        allow_download = kwargs.pop("allow_download", True)
        model, info = load_bundle(path, allow_download=allow_download)
        kwargs.setdefault("model_version", info.version)
        if info.preprocessing is not None and info.preprocessing.source == "legacy":
            log.info(
                "bundle %s records no preprocessing: serving at short side %d with frames kept at their size",
                info.version,
                info.preprocessing.short_side,
            )
        return cls(model, **kwargs)

    # --- preprocessing ----------------------------------------------------------------------------
    def _resize_to(self, image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        h, w = image.shape[:2]
        th, tw = size
        if (th, tw) == (h, w):
            return image
        if self._interp == "auto":
            interp = cv2.INTER_AREA if th < h else cv2.INTER_LINEAR
        else:  # "area": as training resized (load_split and finetune use INTER_AREA both ways)
            interp = cv2.INTER_AREA
        return cv2.resize(image, (tw, th), interpolation=interp)

    def _resize(self, image: np.ndarray) -> np.ndarray:
        """Frame -> model input size: to the training frame size (if recorded), then to the short side."""
        if self.frame_size is not None:
            image = self._resize_to(image, self.frame_size)
        h, w = image.shape[:2]
        return self._resize_to(image, target_size(h, w, self.short_side, self.preprocessing.multiple))

    def _batches(self, records: Iterable[FrameRecord]) -> Iterator[tuple[list[FrameRecord], np.ndarray]]:
        """Group consecutive frames of the same resized shape into batches (resized on this thread)."""
        batch: list[FrameRecord] = []
        resized: list[np.ndarray] = []
        for rec in records:
            image = check_frame(rec.image, name=f"frame {rec.index}")
            small = self._resize(image)
            if resized and (small.shape != resized[0].shape or len(batch) == self.batch_size):
                yield batch, np.stack(resized)
                batch, resized = [], []
            batch.append(FrameRecord(rec.index, rec.timestamp, image))
            resized.append(small)
        if batch:
            yield batch, np.stack(resized)

    def _prefetched(self, records: Iterable[FrameRecord]) -> Iterator[tuple[list[FrameRecord], np.ndarray]]:
        """Run decoding + resizing in a background thread, ``prefetch`` batches ahead."""
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        done = object()

        def produce() -> None:
            try:
                for item in self._batches(records):
                    while not stop.is_set():
                        try:
                            q.put(item, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
                q.put(done)
            except BaseException as exc:  # noqa: BLE001 - re-raised on the consumer side
                q.put(exc)

        thread = threading.Thread(target=produce, name="surgenet-prefetch", daemon=True)
        thread.start()
        try:
            while True:
                item = q.get()
                if item is done:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            thread.join(timeout=5)

    def to_tensor(self, batch: np.ndarray) -> torch.Tensor:
        """(N, h, w, 3) uint8 -> normalised (N, 3, h, w) float on the device."""
        src = torch.from_numpy(batch)
        if self.device.type == "cuda":
            src = src.pin_memory()  # page-locked, so the copy below is asynchronous (non_blocking)
        x = src.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float()
        x = (x - self._mean) / self._std
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    # --- inference --------------------------------------------------------------------------------
    @torch.inference_mode()
    def _run(self, x: torch.Tensor):
        n = x.shape[0]
        if self._fixed_batch and n < self.batch_size:
            x = torch.cat([x, x[-1:].expand(self.batch_size - n, *x.shape[1:])]).contiguous(
                memory_format=torch.channels_last if self.channels_last else torch.contiguous_format
            )
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            out = self._forward(x)
        if x.shape[0] != n:
            out = type(out)(**{k: v[:n] for k, v in vars(out).items()})
        if self._fixed_batch and self.device.type == "cuda":
            # CUDA-graph outputs live in memory the next replay overwrites: keep our own copy
            out = type(out)(**{k: v.clone() for k, v in vars(out).items()})
        return out

    @torch.inference_mode()
    def _postprocess(self, recs: list[FrameRecord], out, keep_masks: bool) -> list[FramePrediction]:
        seg = out.seg_logits.float()
        seg_probs = torch.softmax(seg, dim=1)
        seg_unc = normalised_entropy(seg_probs, dim=1).mean(dim=(1, 2))
        phase_probs = torch.softmax(out.phase_logits.float(), dim=1)
        cvs_probs = torch.sigmoid(out.cvs_logits.float())
        cvs_unc = normalised_entropy(torch.stack([cvs_probs, 1 - cvs_probs], dim=-1), dim=-1).mean(dim=1)
        phase_unc = normalised_entropy(phase_probs, dim=1)
        emb = out.embedding.float().cpu().numpy()
        results = []
        for i, rec in enumerate(recs):
            mask = conf = None
            if keep_masks:
                mask, conf = self._full_size_mask(seg[i], seg_probs[i], rec.image.shape[:2])
            results.append(
                FramePrediction(
                    index=rec.index,
                    timestamp=rec.timestamp,
                    mask=mask,
                    confidence=conf,
                    phase_probs=phase_probs[i].cpu().numpy(),
                    cvs_probs=cvs_probs[i].cpu().numpy(),
                    uncertainty={
                        "segmentation": float(seg_unc[i]),
                        "phase": float(phase_unc[i]),
                        "cvs": float(cvs_unc[i]),
                    },
                    embedding=emb[i],
                )
            )
        return results

    def _full_size_mask(
        self, logits: torch.Tensor, probs: torch.Tensor, size: tuple[int, int]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Class mask and max-probability map at the frame's size.

        The mask is the argmax of the bilinearly upsampled logits on every device, as evaluation computes it
        (``evaluate.predict_frames``), so served masks are the masks the gate measured. On CPU, OpenCV
        upsamples the stride-4 logits class by class, keeping a running max (no (H, W, C) array at full size;
        ~3x faster than torch here), and the confidence is the upsampled stride-4 max probability; on GPU,
        torch upsamples the logits and takes their softmax maximum."""
        h, w = size
        if self.device.type == "cpu":
            planes = logits.float().numpy()
            best = cv2.resize(planes[0], (w, h), interpolation=cv2.INTER_LINEAR)
            mask = np.zeros((h, w), dtype=np.uint8)
            for k in range(1, len(planes)):
                up = cv2.resize(planes[k], (w, h), interpolation=cv2.INTER_LINEAR)
                better = up > best
                mask[better] = k
                np.maximum(best, up, out=best)
            conf = cv2.resize(probs.max(dim=0).values.numpy(), (w, h), interpolation=cv2.INTER_LINEAR)
            return mask, conf.astype(np.float16)
        full = F.interpolate(logits[None], size=(h, w), mode="bilinear", align_corners=False)[0]
        top, mask_t = full.max(dim=0)
        conf_t = 1.0 / torch.exp(full - top).sum(dim=0)
        return mask_t.to(torch.uint8).cpu().numpy(), conf_t.to(torch.float16).cpu().numpy()

    def stream_with_frames(
        self, frames: Any, keep_masks: bool = True
    ) -> Iterator[tuple[FramePrediction, np.ndarray]]:
        """Like :meth:`stream`, paired with each original frame (for overlays)."""
        for recs, batch in self._prefetched(_as_records(frames)):
            preds = self._postprocess(recs, self._run(self.to_tensor(batch)), keep_masks)
            yield from zip(preds, (r.image for r in recs), strict=True)

    def stream(self, frames: Any, keep_masks: bool = True) -> Iterator[FramePrediction]:
        """Predict lazily over any iterable of frames / FrameRecords, in order, overlapping IO and compute."""
        for pred, _ in self.stream_with_frames(frames, keep_masks):
            yield pred

    def predict(self, frames: Any, keep_masks: bool = True) -> list[FramePrediction]:
        """Predict a single frame, a list, or a (T, H, W, 3) array; returns one prediction per frame."""
        return list(self.stream(frames, keep_masks=keep_masks))

    def predict_frame(self, frame: np.ndarray) -> FramePrediction:
        return self.predict([frame])[0]

    # --- sequences --------------------------------------------------------------------------------
    @torch.inference_mode()
    def phase_timeline(self, embeddings: np.ndarray, frame_probs: np.ndarray) -> np.ndarray:
        """(T, P) phase probabilities from the causal temporal model, or the frame probs if untrained."""
        head = self.model.phase_head
        if not bool(head.temporal_trained) or len(embeddings) == 0:
            return frame_probs
        param = next(head.temporal.parameters())
        seq = torch.as_tensor(np.asarray(embeddings, dtype=np.float32), device=param.device)[None]
        return torch.softmax(head.temporal(seq.to(param.dtype))[-1][0].float(), dim=-1).cpu().numpy()

    def summarise(self, preds: list[FramePrediction], fps: float) -> VideoPrediction:
        """Collect per-frame vectors and smooth the phase timeline."""
        if not preds:
            raise FrameError("no frames to summarise", "check that the video has frames at the chosen fps")
        phase_probs = np.stack([p.phase_probs for p in preds])
        embeddings = np.stack([p.embedding for p in preds])
        timeline = self.phase_timeline(embeddings, phase_probs)
        labels = smooth_phase_labels(timeline)
        indices = np.array([p.index for p in preds])
        segments = [(int(indices[s]), int(indices[e - 1]), lab) for s, e, lab in runs(labels)]
        return VideoPrediction(
            indices=indices,
            timestamps=np.array([p.timestamp for p in preds]),
            phase_probs=phase_probs,
            phase_timeline_probs=timeline,
            phase_labels=labels,
            cvs_probs=np.stack([p.cvs_probs for p in preds]),
            uncertainty={k: np.array([p.uncertainty[k] for p in preds]) for k in preds[0].uncertainty},
            embeddings=embeddings.astype(np.float16),
            fps=fps,
            segments=segments,
        )

    def predict_video(
        self,
        source: str | Path,
        sample_fps: float | str | None = MODEL_FPS,
        on_frame: Callable[[FramePrediction, np.ndarray], None] | None = None,
        progress: bool = False,
    ) -> VideoPrediction:
        """Stream a video (or frame folder) through the model; ``on_frame(prediction, frame)`` receives each
        prediction with its mask (e.g. to write it to disk), and only small per-frame vectors are kept.
        ``sample_fps``: frames per second to sample (default: the temporal model's recorded rate, so its
        timeline sees sequences like those it was trained on; None: every frame)."""
        from tqdm.auto import tqdm

        if sample_fps == MODEL_FPS:
            sample_fps = self.temporal_fps

        with open_video(source) as video:
            total = len(video.sample_indices(sample_fps))
            kept: list[FramePrediction] = []
            bar = tqdm(total=total, unit="frame", desc=Path(source).name, disable=not progress)
            frames = video.iter_frames(sample_fps=sample_fps)
            for pred, image in self.stream_with_frames(frames, keep_masks=on_frame is not None):
                if on_frame is not None:
                    on_frame(pred, image)
                pred.mask = pred.confidence = None
                kept.append(pred)
                bar.update(1)
            bar.close()
            return self.summarise(kept, fps=sample_fps or video.fps)
