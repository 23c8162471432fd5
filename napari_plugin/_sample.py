"""Sample data: a short synthetic laparoscopic clip from the core generator (no downloads).

The clip is written once as a PNG frame folder under ``$SURGENET_ASSIST_HOME/samples`` (lossless, so the frame
napari shows is bit-identical to the generated one) and opened through the plugin's own reader, so the sample
behaves like a real recording: lazy frames, a path the label store can register, exact ground truth on disk
(``masks/``) for checking corrections.
"""

from __future__ import annotations

from pathlib import Path

from surgenet_assist.core.paths import data_home
from surgenet_assist.core.synthetic import DEFAULT_WORLD, generate_clip

from ._reader import LayerData, video_layer_data

SAMPLE_SEED = 7
SAMPLE_FRAMES = 12
SAMPLE_SIZE = (120, 214)  # (H, W): small enough for CPU pre-annotation in seconds


def sample_clip_path(
    seed: int = SAMPLE_SEED, num_frames: int = SAMPLE_FRAMES, size: tuple[int, int] = SAMPLE_SIZE
) -> Path:
    """Folder holding the generated clip (created on first use; deterministic for the same arguments)."""
    h, w = size
    # the world is part of the name: a clip cached by an older default world is never shown as this one
    folder = data_home() / "samples" / f"synthetic-{DEFAULT_WORLD}-seed{seed}-{num_frames}x{h}x{w}"
    if not (folder / f"frame_{num_frames - 1:06d}.png").exists():
        clip = generate_clip(seed, num_frames, h, w, fps=1.0, world=DEFAULT_WORLD)
        clip.write_frames(folder, ext="png", masks=True)
    return folder


def sample_clip() -> list[LayerData]:
    """npe2 sample-data command: the synthetic clip as a lazy video layer."""
    return [video_layer_data(sample_clip_path(), name="synthetic laparoscopic clip")]
