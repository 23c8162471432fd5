"""Draw what a synthetic world looks like: one row per Cholec80 phase, frame and mask of a few videos each.

    .venv/bin/python scripts/world_contact_sheet.py [--world v2] [--seeds 1 2 3] [--out docs/images]

Frames are rendered at the world's default size (480x854 for v2) and shrunk for the sheet; masks use the
schema's colours, ignored pixels (instruments and structures CholecSeg8k has no class for) in white. Each
frame is labelled with its index, the Cholec80 tools in view and the CVS criteria met. Writes
``world_<world>_phases.png`` (the sheet) into ``--out``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from surgenet_assist.core.schema import DEFAULT_SCHEMA
from surgenet_assist.core.synthetic import TOOL_NAMES, clip_timeline, generate_clip, world_default_size

TOOL_SHORT = dict(
    zip(TOOL_NAMES, ("grasper", "bipolar", "hook", "scissors", "clipper", "irrigator", "bag"), strict=True)
)


def _text(
    img: np.ndarray, text: str, org: tuple[int, int], scale: float = 0.42, colour=(255, 255, 255)
) -> None:
    cv2.putText(img, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 3, cv2.LINE_AA)
    cv2.putText(img, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, colour, 1, cv2.LINE_AA)


def contact_sheet(world: str, seeds: list[int], frames: int, tile: tuple[int, int]) -> np.ndarray:
    """(H, W, 3) RGB sheet: rows = phases, columns = (frame, mask) per seed."""
    height, width = world_default_size(world)
    palette = DEFAULT_SCHEMA.palette()
    palette[DEFAULT_SCHEMA.ignore_index] = (255, 255, 255)
    clips = [generate_clip(seed, frames, height, width, world=world) for seed in seeds]
    th, tw = tile
    label_w = 150
    rows = []
    for phase, name in enumerate(DEFAULT_SCHEMA.phase_names):
        row = np.full((th, label_w + 2 * tw * len(clips), 3), 24, np.uint8)
        _text(row, f"{phase} {name[:13]}", (6, th // 2 - 6), 0.42)
        _text(row, name[13:], (6, th // 2 + 14), 0.42)
        for c, clip in enumerate(clips):
            idx = np.flatnonzero(clip.phases == phase)
            x = label_w + 2 * tw * c
            if len(idx) == 0:
                _text(row, f"seed {clip.seed}: phase skipped", (x + 10, th // 2), 0.45, (200, 200, 200))
                continue
            t = int(idx[len(idx) // 2])
            frame = cv2.resize(clip.frames[t], (tw, th), interpolation=cv2.INTER_AREA)
            mask = cv2.resize(palette[clip.masks[t]], (tw, th), interpolation=cv2.INTER_NEAREST)
            tools = [TOOL_SHORT[n] for n, on in zip(TOOL_NAMES, clip.tools[t], strict=True) if on]
            met = [k for k, v in zip(DEFAULT_SCHEMA.cvs_keys, clip.cvs[t], strict=True) if v >= 0.5]
            _text(frame, f"seed {clip.seed} frame {t}", (5, 14), 0.38)
            _text(frame, ", ".join(tools) or "no tool", (5, th - 8), 0.38)
            _text(mask, f"CVS: {' '.join(met) or '-'}", (5, 14), 0.38)
            row[:, x : x + tw] = frame
            row[:, x + tw : x + 2 * tw] = mask
        rows.append(row)
    legend = np.full((44, rows[0].shape[1], 3), 24, np.uint8)
    x = 8
    for cls in DEFAULT_SCHEMA.classes[1:]:
        cv2.rectangle(legend, (x, 10), (x + 14, 24), tuple(int(v) for v in cls.color), -1)
        _text(legend, cls.name, (x + 18, 22), 0.36)
        x += 28 + 7 * len(cls.name)
    cv2.rectangle(legend, (x, 10), (x + 14, 24), (255, 255, 255), -1)
    _text(legend, "255 ignored (tools and structures CholecSeg8k lacks)", (x + 18, 22), 0.36)
    _text(legend, f"world {world}, rendered at {height}x{width}, {frames} frames per video", (8, 40), 0.36)
    return np.vstack([*rows, legend])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--world", default="v2")
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=None,
        help="default: the first 3 seeds whose clip has every phase",
    )
    parser.add_argument("--frames", type=int, default=70)
    parser.add_argument("--tile", default="180x320", help="height x width of each shrunk frame")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "images"))
    args = parser.parse_args()
    tile = tuple(int(v) for v in args.tile.split("x"))
    if args.seeds is None:
        every = (
            s for s in range(1, 1000) if len(set(clip_timeline(s, args.frames, world=args.world)[0])) == 7
        )
        args.seeds = [next(every) for _ in range(3)]
    sheet = contact_sheet(args.world, args.seeds, args.frames, tile)
    out = Path(args.out) / f"world_{args.world}_phases.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    # 256 colours are plenty for a sheet and keep the repository light (about a third of the size)
    Image.fromarray(sheet).quantize(256, method=Image.Quantize.MEDIANCUT).save(out, optimize=True)
    print(out, f"{out.stat().st_size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
