"""The learned level of the click engine: a light click-conditioned head on the frozen backbone.

In the spirit of RITM / SimpleClick, the clicks enter the decoder as extra input maps beside the backbone
features: the prompt's maps (positive disks, negative disks, box, previous mask) and the day-one level's
probability, all on the stride-8 grid (``ClickSegmenter.head_inputs`` builds them, for serving and training
alike). The map encoding follows RITM's: 1x1 conv -> LeakyReLU -> conv, *added* to the reduced features.

The head predicts a **local correction** to the day-one logit (FocalClick's idea: a new click should change
the mask near itself, not everywhere): ``logits = DAY_ONE_SCALE * logit(day_one) + window * f(features,
maps)``, where ``window`` is 1 on the cells within ``LOCAL_WINDOW_CELLS`` of the newest click and 0 elsewhere.
The scale is fixed (a learned one let training re-temper day one everywhere, outside any click's reach), the
last layer of ``f`` starts at zero, and training pays an L1 penalty on the correction: a zero correction is
day one, and :meth:`ClickHead.probability` serves day one's probability itself wherever the correction is
zero, so an untrained (or step-0) head serves *exactly* the day-one level. The maps also carry each cell's
mean RGB, so the correction can see colour edges the stride-8 features blur.

The artefact is ``click_head.pt`` (a plain state dict, loaded with ``weights_only=True``) plus
``click_head.json`` (format, channel sizes and metadata, among them the SHA-256 of the backbone whose
features the head was trained on: a head is only valid on those features).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BundleError
from ..paths import atomic_directory

FORMAT = "surgenet-assist-click-head/2"  # /2: local window + colour maps (9 channels)
WEIGHTS_FILE = "click_head.pt"
INFO_FILE = "click_head.json"
# positive disks, negative disks, box, previous mask, day-one probability, newest-click window, mean R, G, B
NUM_MAPS = 9
PREVIOUS_MASK_CHANNEL = 3
DAY_ONE_CHANNEL = 4
WINDOW_CHANNEL = 5
COLOUR_CHANNELS = (6, 7, 8)
DAY_ONE_SCALE = 1.0  # fixed: the correction, not a global re-scaling, is what training may change
# the correction's last layer is scaled up: day one's wrong cells sit at |logit| ~ 9, which an optimizer's
# ~lr-sized steps on a zero-initialised 1x1 layer would take hundreds of steps to reach
CORRECTION_GAIN = 8.0
LOCAL_WINDOW_CELLS = 6  # half-size of the square correction window around the newest click (stride-8 cells)
_EPS = 1e-4  # day-one probabilities are clamped to [eps, 1 - eps] before the logit (finite, |logit| <= 9.2)


def _block(channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(channels, channels, 3, padding=1, bias=False),
        nn.GroupNorm(min(8, channels), channels),
        nn.ReLU(inplace=True),
    )


class ClickHead(nn.Module):
    """Stride-8 features + stride-16 features + 9 maps -> (N, 1, h, w) logits on the stride-8 grid.

    ``c8`` / ``c16``: channels of the backbone's stride-8 and stride-16 stages (128 / 320 for CaFormer-S18);
    ``hidden``: the width of the head (64 is ~120 k parameters: trains in minutes on CPU).
    """

    def __init__(self, c8: int, c16: int, hidden: int = 64, read_previous_mask: bool = False) -> None:
        super().__init__()
        self.c8, self.c16, self.hidden = int(c8), int(c16), int(hidden)
        # Off by default, measured (bench/interactive.py, random-init features, 24 labelled frames): a head
        # that reads its own previous mask learns to copy it, so a click inside an error changes little:
        # NoC@85 10.1 with it, 7.8 without (day one: 4.9). RITM learns to use the previous mask from
        # COCO+LVIS, far more objects than a team's first nights give.
        self.read_previous_mask = bool(read_previous_mask)
        self.reduce8 = nn.Conv2d(c8, hidden, 1)
        self.reduce16 = nn.Conv2d(c16, hidden, 1)
        self.maps = nn.Sequential(  # RITM's click-map encoder, added to the features
            nn.Conv2d(NUM_MAPS, 16, 1),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(16, hidden, 3, padding=1),
        )
        self.blocks = nn.Sequential(_block(hidden), _block(hidden), _block(hidden))
        self.out = nn.Conv2d(hidden, 1, 1)
        nn.init.zeros_(self.out.weight)  # untrained head == day-one level
        nn.init.zeros_(self.out.bias)

    @staticmethod
    def _unit(x: torch.Tensor) -> torch.Tensor:
        """Per-cell L2 normalisation times sqrt(C): features of any backbone (or scale) enter at unit variance
        per channel on average, the same normalisation label propagation and instant heads rely on."""
        return F.normalize(x, dim=1) * x.shape[1] ** 0.5

    def parts(
        self, stride8: torch.Tensor, stride16: torch.Tensor, maps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 1, h, w) scaled day-one logit and the correction (zero outside the newest click's window)."""
        if maps.shape[1] != NUM_MAPS:
            raise ValueError(f"ClickHead expects {NUM_MAPS} map channels, got {maps.shape[1]}")
        window = maps[:, WINDOW_CHANNEL : WINDOW_CHANNEL + 1]
        if not self.read_previous_mask:
            keep = torch.ones(NUM_MAPS, dtype=maps.dtype, device=maps.device)
            keep[PREVIOUS_MASK_CHANNEL] = 0
            maps = maps * keep.view(1, -1, 1, 1)
        x = self.reduce8(self._unit(stride8))
        y = self.reduce16(self._unit(stride16))
        x = x + F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)
        x = x + self.maps(maps)
        correction = CORRECTION_GAIN * self.out(self.blocks(x)) * window
        day_one = maps[:, DAY_ONE_CHANNEL : DAY_ONE_CHANNEL + 1].clamp(_EPS, 1 - _EPS)
        return DAY_ONE_SCALE * torch.logit(day_one), correction

    def forward(self, stride8: torch.Tensor, stride16: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
        """(N, C8, h, w), (N, C16, h', w'), (N, 9, h, w) -> (N, 1, h, w) logits (day one's + a correction)."""
        base, correction = self.parts(stride8, stride16, maps)
        return base + correction

    def probability(self, stride8: torch.Tensor, stride16: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
        """(N, 1, h, w) served object probability: day one's own probability wherever the correction is zero
        (so a zero-correction head serves day one bit for bit, not through a clamped logit round trip), the
        sigmoid of the corrected logit elsewhere."""
        base, correction = self.parts(stride8, stride16, maps)
        day_one = maps[:, DAY_ONE_CHANNEL : DAY_ONE_CHANNEL + 1]
        return torch.where(correction == 0, day_one, torch.sigmoid(base + correction))

    def zero_correction(self) -> ClickHead:
        """This head with its last layer zeroed (in place): the day-one level, training's step 0."""
        with torch.no_grad():
            self.out.weight.zero_()
            self.out.bias.zero_()
        return self


def newest_click_window(
    clicks: tuple[Any, ...],
    grid: tuple[int, int],
    image_size: tuple[int, int],
    half: int = LOCAL_WINDOW_CELLS,
) -> np.ndarray:
    """(h, w) float32: 1 on the square of ``2 * half + 1`` cells centred on the newest click's cell, 0
    elsewhere (all zero without clicks: a box-only prompt is day one's). The newest click is the last."""
    h, w = grid
    window = np.zeros((h, w), np.float32)
    if clicks:
        c = clicks[-1]
        r = min(h - 1, int(c.row * h / image_size[0]))
        q = min(w - 1, int(c.col * w / image_size[1]))
        window[max(0, r - half) : r + half + 1, max(0, q - half) : q + half + 1] = 1.0
    return window


def save_click_head(head: ClickHead, folder: str | Path, meta: dict[str, Any] | None = None) -> Path:
    """Write ``click_head.pt`` (tensors only) and ``click_head.json`` into ``folder`` atomically (temp dir,
    then rename): a reader never sees half an artefact, and a registry row is only added after this returns.
    ``meta`` should carry ``backbone_sha256`` (the features the head was trained on)."""
    folder = Path(folder)
    with atomic_directory(folder) as tmp:
        state = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
        torch.save(state, tmp / WEIGHTS_FILE)
        info = {
            "format": FORMAT,
            "c8": head.c8,
            "c16": head.c16,
            "hidden": head.hidden,
            "read_previous_mask": head.read_previous_mask,
            "meta": meta or {},
        }
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2, default=str))
    return folder


def load_click_head(folder: str | Path) -> tuple[ClickHead, dict[str, Any]]:
    """The head (eval mode, CPU) and its ``meta`` from a folder written by :func:`save_click_head`."""
    folder = Path(folder)
    try:
        info = json.loads((folder / INFO_FILE).read_text())
        state = torch.load(folder / WEIGHTS_FILE, map_location="cpu", weights_only=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise BundleError(
            f"{folder} is not a readable click head: {exc}",
            "point to a folder written by save_click_head (click_head.json + click_head.pt)",
        ) from None
    if info.get("format") != FORMAT:
        raise BundleError(
            f"{folder / INFO_FILE} has format {info.get('format')!r}, expected {FORMAT!r}",
            "retrain the click head with this version (surgenet-assist train-clicks)",
        )
    head = ClickHead(
        int(info["c8"]), int(info["c16"]), int(info["hidden"]), bool(info.get("read_previous_mask", True))
    )
    head.load_state_dict(state, strict=True)
    head.eval()
    return head, dict(info.get("meta") or {})
