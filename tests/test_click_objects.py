"""One object definition (issue 21, item 5): the bench, training and the gate cut masks into the same objects,
connected class parts of at least 1 % of the frame (``core.interactive.objects.click_objects``)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from surgenet_assist.core.interactive import click_objects
from surgenet_assist.training_loop import click_training as ct

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _bench():
    """bench/interactive.py as one module per test session (its worker pool pickles functions by name)."""
    if "bench_interactive" in sys.modules:
        return sys.modules["bench_interactive"]
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("bench_interactive", BENCH / "interactive.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _multi_part_mask() -> np.ndarray:
    """100 x 200: class 2 in two separate parts and one speck, class 4 in one part touching a class-2 part,
    background 0, an ignore region 255 and a class covering almost the whole of nothing."""
    mask = np.zeros((100, 200), np.uint8)
    mask[10:40, 10:60] = 2  # 1500 px = 7.5 %
    mask[60:90, 120:180] = 2  # 1800 px, a second part of the same class
    mask[95:97, 5:7] = 2  # 4 px speck: under 1 %
    mask[10:40, 60:100] = 4  # touches the first class-2 part: still its own object (another class)
    mask[0:5, 150:200] = 255  # ignored
    return mask


def _as_sets(objects) -> list[tuple[int, bytes]]:
    return sorted((int(k), np.packbits(m).tobytes()) for k, m in objects)


def test_objects_are_connected_class_parts_of_at_least_one_percent():
    mask = _multi_part_mask()
    objects = click_objects(mask)
    assert [k for k, _ in objects] == [2, 2, 4]
    assert sorted(int(m.sum()) for _, m in objects) == [1200, 1500, 1800]
    assert all(not (m & (mask == 255)).any() and not (m & (mask == 0)).any() for _, m in objects)
    huge = np.full((50, 50), 3, np.uint8)  # the whole frame is one class: nothing to click out
    assert click_objects(huge) == []


def test_bench_training_and_gate_cut_the_same_objects():
    mask = _multi_part_mask()
    frame = np.zeros((*mask.shape, 3), np.uint8)
    expected = _as_sets(click_objects(mask))
    bench = _bench()
    bench_objects = [(0, obj) for _, obj, _ in bench.objects_of(frame, mask, 0.01)]
    # training and the gate's validation objects both come from _objects_of_samples (train and val splits)
    embed = SimpleNamespace(embed=lambda image: SimpleNamespace(size=image.shape[:2]))
    cut = ct._objects_of_samples([(frame, mask)], embed, ct.ClickTrainConfig())
    assert [o.class_id for o in cut] == [2, 2, 4]
    assert _as_sets((0, o.mask) for o in cut) == _as_sets((0, m) for _, m in click_objects(mask))
    assert _as_sets(bench_objects) == _as_sets((0, m) for _, m in click_objects(mask))
    assert len(expected) == 3
