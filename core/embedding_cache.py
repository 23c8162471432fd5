"""Per-video cache of backbone features, so propagation after a new label takes seconds, not a backbone pass.

A cache entry is keyed by the video's content hash, the backbone's weights hash, the input size and the
sampling rate; any change gives a new key (a mismatch recomputes, never reuses stale features). Each entry
holds, per sampled frame: stride-8 features (stage 2), stride-16 features (stage 3), the pooled
embedding, as fp16 ``.npy`` files read with memory mapping, plus ``meta.json``. Entries are written to a
temporary folder and renamed into place, so a crash never leaves a half-written entry that looks valid, and
are served memory-mapped, also right after they were computed: a long video's features live in the page
cache, not in the process.

In memory, features are kept by :class:`ByteLRU`: least recently used first out once a byte budget is
reached (the click engine's frames, the day-one assistant's frames and videos).
"""

from __future__ import annotations

import hashlib
import json
import mmap
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

import numpy as np
import torch
from tqdm.auto import tqdm

from .backbone import SurgeNetBackbone
from .model import DEFAULT_MAX_ASPECT, max_input_aspect, target_size
from .paths import atomic_directory, data_home
from .video import FrameRecord, open_video

_SAMPLE = 4 << 20

Stages = tuple[np.ndarray, np.ndarray, np.ndarray]  # stride-8 (C, h, w), stride-16, embedding (D,)
V = TypeVar("V")
DEFAULT_CACHE_BYTES = 256 << 20  # an in-memory feature cache's default budget (backend: *_CACHE_MB=256)


def resident_nbytes(*arrays: object) -> int:
    """Bytes the arrays hold in this process's memory: a memory-mapped array (or a view of one) costs
    nothing here, its pages belong to the OS's file cache; an ndarray or tensor costs its ``nbytes``."""
    total = 0
    for a in arrays:
        if isinstance(a, torch.Tensor):
            total += a.element_size() * a.nelement()
            continue
        if not isinstance(a, np.ndarray):
            continue
        base: object = a
        while isinstance(base, np.ndarray) and not isinstance(base, np.memmap):
            base = base.base
        if not isinstance(base, (np.memmap, mmap.mmap)):
            total += a.nbytes
    return total


class ByteLRU(Generic[V]):
    """A thread-safe least-recently-used cache bounded by bytes (``size_of(value)``), not by entries.

    A count of entries bounds nothing when one entry can be 1 MB or 200 MB (a frame's features grow with
    its size); a byte budget bounds the process. Past ``max_bytes`` the least recently used entries go; a
    value larger than the whole budget is returned to its caller but not kept. ``max_items`` optionally
    caps the count as well (a caller that wants exactly one frame kept)."""

    def __init__(self, max_bytes: int, size_of: Callable[[V], int], max_items: int | None = None) -> None:
        self.max_bytes = int(max_bytes)
        self.max_items = max_items
        self._size_of = size_of
        self._entries: OrderedDict[Hashable, tuple[V, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        """Bytes held now (never more than ``max_bytes``)."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def get(self, key: Hashable) -> V | None:
        """The value, now the most recently used; None when absent."""
        with self._lock:
            hit = self._entries.get(key)
            if hit is None:
                return None
            self._entries.move_to_end(key)
            return hit[0]

    def put(self, key: Hashable, value: V) -> V:
        """Keep ``value`` (replacing one under the same key), evicting least recently used entries until
        the budget holds; returns ``value``."""
        size = int(self._size_of(value))
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            if size > self.max_bytes:
                return value
            self._entries[key] = (value, size)
            self._bytes += size
            while self._entries and (
                self._bytes > self.max_bytes
                or (self.max_items is not None and len(self._entries) > self.max_items)
            ):
                _, (_, dropped) = self._entries.popitem(last=False)
                self._bytes -= dropped
        return value

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0


@torch.inference_mode()
def image_stages(backbone: SurgeNetBackbone, image: np.ndarray, short_side: int) -> Stages:
    """Backbone features of one RGB frame, resized exactly as :func:`compute_features` resizes video frames
    (so a frame's features are the same whether they come from the cache or from a single image)."""
    import cv2

    h, w = image.shape[:2]
    th, tw = target_size(h, w, short_side)
    x = torch.from_numpy(cv2.resize(image, (tw, th), interpolation=cv2.INTER_AREA)).permute(2, 0, 1)[None]
    mean = torch.tensor(backbone.mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(backbone.std).view(1, 3, 1, 1) * 255
    device = next(backbone.parameters()).device
    stages = backbone(((x.float() - mean) / std).to(device))
    return (
        stages[1][0].half().cpu().numpy(),
        stages[2][0].half().cpu().numpy(),
        backbone.pool(stages[3])[0].half().cpu().numpy(),
    )


def video_content_hash(path: str | Path) -> str:
    """SHA-256 of the file size plus its first, middle and last 4 MB: fast on hour-long files, and any
    re-encode or trim changes it. For a frame folder: the names, sizes and mtimes of its files."""
    path = Path(path)
    digest = hashlib.sha256()
    if path.is_dir():
        for f in sorted(path.iterdir()):
            if f.is_file():
                st = f.stat()
                digest.update(f"{f.name}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        return digest.hexdigest()
    size = path.stat().st_size
    digest.update(str(size).encode())
    with open(path, "rb") as fh:
        for offset in sorted({0, max(0, size // 2 - _SAMPLE // 2), max(0, size - _SAMPLE)}):
            fh.seek(offset)
            digest.update(fh.read(_SAMPLE))
    return digest.hexdigest()


@dataclass
class VideoFeatures:
    """Cached features of one video's sampled frames (arrays may be memory-mapped)."""

    indices: np.ndarray  # (T,) frame indices in the video
    stride8: np.ndarray  # (T, C8, h8, w8) float16
    stride16: np.ndarray  # (T, C16, h16, w16) float16
    embeddings: np.ndarray  # (T, D) float16
    frame_size: tuple[int, int]  # original (H, W)
    key: str
    from_cache: bool = False

    def position(self, frame_index: int) -> int:
        pos = int(np.searchsorted(self.indices, frame_index))
        if pos >= len(self.indices) or self.indices[pos] != frame_index:
            raise KeyError(f"frame {frame_index} was not sampled (sampled: {self.indices[:5]}...)")
        return pos


class EmbeddingCache:
    """Disk cache of :class:`VideoFeatures` under ``root`` (default ``$SURGENET_ASSIST_HOME/embeddings``)."""

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root) if root else data_home() / "embeddings"

    @staticmethod
    def key(video_hash: str, backbone_sha256: str, short_side: int, sample_fps: float | None) -> str:
        text = f"{video_hash}|{backbone_sha256}|{short_side}|{sample_fps}"
        aspect = max_input_aspect()
        if aspect != DEFAULT_MAX_ASPECT:  # another clamp sizes wide frames differently (default: old keys)
            text += f"|aspect={aspect:g}"
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def _load(self, folder: Path, key: str) -> VideoFeatures:
        meta = json.loads((folder / "meta.json").read_text())
        return VideoFeatures(
            indices=np.load(folder / "indices.npy"),
            stride8=np.load(folder / "stride8.npy", mmap_mode="r"),
            stride16=np.load(folder / "stride16.npy", mmap_mode="r"),
            embeddings=np.load(folder / "embeddings.npy"),
            frame_size=tuple(meta["frame_size"]),
            key=key,
            from_cache=True,
        )

    def get_or_compute(
        self,
        video: str | Path,
        backbone: SurgeNetBackbone,
        sample_fps: float | None = 1.0,
        short_side: int = 256,
        batch_size: int = 8,
        progress: bool = False,
    ) -> VideoFeatures:
        key = self.key(
            video_content_hash(video), backbone.weights_sha256 or "unknown", short_side, sample_fps
        )
        folder = self.root / key
        if (folder / "meta.json").exists():
            return self._load(folder, key)
        with atomic_directory(folder) as tmp:
            feats = compute_features(video, backbone, sample_fps, short_side, batch_size, progress)
            np.save(tmp / "indices.npy", feats.indices)
            np.save(tmp / "stride8.npy", feats.stride8)
            np.save(tmp / "stride16.npy", feats.stride16)
            np.save(tmp / "embeddings.npy", feats.embeddings)
            meta = {
                "video": str(video),
                "frame_size": list(feats.frame_size),
                "short_side": short_side,
                "sample_fps": sample_fps,
                "backbone": backbone.name,
                "backbone_sha256": backbone.weights_sha256,
            }
            (tmp / "meta.json").write_text(json.dumps(meta))
            del feats  # served from the files (memory-mapped) like every later hit, not held in memory
        computed = self._load(folder, key)
        computed.from_cache = False
        return computed


@torch.inference_mode()
def compute_features(
    video: str | Path,
    backbone: SurgeNetBackbone,
    sample_fps: float | None = 1.0,
    short_side: int = 256,
    batch_size: int = 8,
    progress: bool = False,
    frames: list[int] | None = None,
) -> VideoFeatures:
    """Run the backbone over a video's sampled frames (or exactly ``frames``, read by frame-accurate
    seeks: e.g. the next N frames around a keyframe of a long video), keeping stride-8/16 maps and
    embeddings (fp16)."""
    import cv2

    backbone.eval()
    device = next(backbone.parameters()).device
    mean = torch.tensor(backbone.mean, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(backbone.std, device=device).view(1, 3, 1, 1) * 255
    indices, s8, s16, emb = [], [], [], []
    frame_size = (0, 0)

    def run(batch: list[np.ndarray]) -> None:
        x = torch.from_numpy(np.stack(batch)).to(device).permute(0, 3, 1, 2).float()
        stages = backbone((x - mean) / std)
        s8.append(stages[1].half().cpu().numpy())
        s16.append(stages[2].half().cpu().numpy())
        emb.append(backbone.pool(stages[3]).half().cpu().numpy())

    with open_video(video) as src:
        if frames is not None:
            wanted = sorted(set(frames))
            records = (FrameRecord(i, i / src.fps, src.read_frame(i)) for i in wanted)
            total = len(wanted)
        else:
            records = src.iter_frames(sample_fps=sample_fps)
            total = len(src.sample_indices(sample_fps))
        batch: list[np.ndarray] = []
        for rec in tqdm(records, total=total, desc="features", disable=not progress):
            h, w = rec.image.shape[:2]
            frame_size = (h, w)
            th, tw = target_size(h, w, short_side)
            batch.append(cv2.resize(rec.image, (tw, th), interpolation=cv2.INTER_AREA))
            indices.append(rec.index)
            if len(batch) == batch_size:
                run(batch)
                batch = []
        if batch:
            run(batch)
    return VideoFeatures(
        indices=np.asarray(indices, dtype=np.int64),
        stride8=np.concatenate(s8),
        stride16=np.concatenate(s16),
        embeddings=np.concatenate(emb),
        frame_size=frame_size,
        key="",
    )
