"""Geometry shared by the synthetic worlds: organ outlines, placement, curves, instrument insertion.

Every world draws its scene from these few helpers; they are pure functions of their arguments, so a world
that uses them stays reproducible for as long as they do not change (the ``v1`` digest test guards that).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def unit_blob(rng: np.random.Generator, n: int = 40, rough: float = 0.12) -> np.ndarray:
    """Closed noisy unit curve (n, 2): smooth organ outlines without per-frame randomness."""
    phi = np.linspace(0, 2 * np.pi, n, endpoint=False)
    r = np.ones(n)
    for k in range(2, 6):
        r += rough / k * rng.uniform(0.5, 1.5) * np.cos(k * phi + rng.uniform(0, 2 * np.pi))
    return np.stack([r * np.cos(phi), r * np.sin(phi)], axis=1)


def rot(angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, -s], [s, c]])


def place(unit: np.ndarray, center: Sequence[float], radii: Sequence[float], angle: float) -> np.ndarray:
    return (unit * np.asarray(radii)) @ rot(angle).T + np.asarray(center)



def insertion(present: np.ndarray) -> np.ndarray:
    """0..1 insertion depth: instruments slide in over 4 frames and out over 3 instead of popping up."""
    ins = np.zeros(len(present), np.float32)
    t = 0
    n = len(present)
    while t < n:
        if not present[t]:
            t += 1
            continue
        end = t
        while end < n and present[end]:
            end += 1
        idx = np.arange(t, end)
        ins[t:end] = np.minimum(1.0, np.minimum((idx - t + 1) / 4.0, (end - idx) / 3.0))
        t = end
    return ins


ELLIPSE = np.stack(
    [
        np.cos(np.linspace(0, 2 * np.pi, 16, endpoint=False)),
        np.sin(np.linspace(0, 2 * np.pi, 16, endpoint=False)),
    ],
    axis=1,
)


def bezier(ctrl: np.ndarray, n: int) -> np.ndarray:
    """Quadratic Bezier through 3 control points: smooth ducts, vessels and ligaments."""
    s = np.linspace(0, 1, n)[:, None]
    return (1 - s) ** 2 * ctrl[0] + 2 * s * (1 - s) * ctrl[1] + s**2 * ctrl[2]

