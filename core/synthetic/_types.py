"""Names and containers shared by every synthetic world (kept apart so the worlds never import each other)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Cholec80's seven instruments, in the column order of its ``tool_annotations`` files (Twinanda et al. 2016).
TOOL_NAMES = ("Grasper", "Bipolar", "Hook", "Scissors", "Clipper", "Irrigator", "SpecimenBag")


@dataclass(frozen=True)
class SceneStates:
    """The renderer's true scene state per frame: what a perfect perception of the scene would know.

    ``values[:, i]`` is the variable ``names[i]`` (fractions in 0..1 unless its name says otherwise);
    ``tools`` is Cholec80-style tool presence (1 = at least half the tip in view), columns as ``TOOL_NAMES``.
    Neither holds the phase or its progress: they are what a benchmark's privileged probe predicts phase from,
    so giving it the answer would make the ceiling meaningless.
    """

    names: tuple[str, ...]
    values: np.ndarray
    tools: np.ndarray

    def __len__(self) -> int:
        return int(self.values.shape[0])

    def __getitem__(self, name: str) -> np.ndarray:
        if name in TOOL_NAMES:
            return self.tools[:, TOOL_NAMES.index(name)]
        try:
            return self.values[:, self.names.index(name)]
        except ValueError:
            known = list(self.names) + list(TOOL_NAMES)
            raise KeyError(f"no scene variable {name!r}; known: {known}") from None

    def features(self) -> np.ndarray:
        """(frames, variables + tools) float32: the state variables followed by the tool-presence flags."""
        return np.concatenate([self.values, self.tools], axis=1).astype(np.float32)
