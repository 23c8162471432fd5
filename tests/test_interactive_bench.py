"""The interactive benchmark's fairness (issue 21, item 6): every method is driven by the clicker answering
its own masks, gets the same click disks and kept-parts rule, and the bench refuses overlapping seed lists."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from surgenet_assist.core.interactive import Prompt
from surgenet_assist.core.interactive.clicker import iou
from surgenet_assist.core.interactive.prompts import Click

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
if "bench_interactive" in sys.modules:  # one module per session: its worker pool pickles functions by name
    bench = sys.modules["bench_interactive"]
else:
    _spec = importlib.util.spec_from_file_location("bench_interactive", BENCH / "interactive.py")
    bench = importlib.util.module_from_spec(_spec)
    sys.modules[_spec.name] = bench
    _spec.loader.exec_module(bench)

H, W = 96, 160


def _scene() -> tuple[np.ndarray, np.ndarray]:
    """A red disk-ish object on a grey-green background, plus a second red blob elsewhere."""
    image = np.full((H, W, 3), (60, 120, 60), np.uint8)
    gt = np.zeros((H, W), np.uint8)
    cv2.ellipse(gt, (50, 48), (28, 20), 0, 0, 360, 1, -1)
    image[gt > 0] = (200, 40, 40)
    return image, gt.astype(bool)


def _object(image: np.ndarray, gt: np.ndarray) -> bench.BenchObject:
    return bench.BenchObject(image, gt, "thing", "v", ("v", 0))


def _fake_core(grow: int):
    """A 'classical method' whose mask is the true object grown by ``grow`` pixels plus a far blob."""

    def core(image: np.ndarray, certain: np.ndarray, near: np.ndarray) -> np.ndarray:
        _, gt = _scene()
        size = (image.shape[1], image.shape[0])
        small = cv2.resize(gt.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST)
        kernel = np.ones((2 * grow + 1, 2 * grow + 1), np.uint8)
        out = cv2.dilate(small, kernel).astype(np.float32)
        out[5:15, 140:155] = 1.0  # a separate part no positive click holds
        return out

    return core


def test_methods_with_identical_masks_get_identical_clicks_and_the_clicker_answers_each_method():
    image, gt = _scene()
    obj = [_object(image, gt)]
    a = bench.classical(_fake_core(3), 1.0)
    b = bench.classical(lambda im, c, n: _fake_core(3)(im, c, n).copy(), 1.0)  # another function, same masks
    c = bench.classical(_fake_core(8), 1.0)  # other masks
    sa, sb, sc = (bench.evaluate(lambda o, p, m=m: m(o.frame, p), obj, max_clicks=6)[0] for m in (a, b, c))
    assert sa.clicks == sb.clicks and sa.ious == sb.ious
    assert len(sa.clicks) >= 2 and sa.clicks[0] == sc.clicks[0]  # the first click is on the empty mask
    assert sa.clicks[1:] != sc.clicks[1:]  # later clicks answer each method's own errors


def test_classical_masks_keep_only_parts_with_a_positive_click_and_obey_both_disks():
    image, gt = _scene()
    segment = bench.classical(_fake_core(2), 0.5)
    inside, outside = Click(48, 50, True), Click(60, 60, False)  # the negative click lies in the grown rim
    mask = segment(image, Prompt((inside, outside)))
    assert not mask[5:15, 140:155].any()  # the far blob holds no positive click: dropped
    assert mask[48, 50] and not mask[60, 60]
    certain, near = bench.seed_layers(Prompt((Click(30, 40, True), Click(30, 120, False))), (H, W), (H, W))
    assert (certain > 0).sum() == (certain < 0).sum() > 0  # symmetric disks, same radius for both signs
    assert (near > 0).sum() == (near < 0).sum() > (certain > 0).sum()


@pytest.mark.parametrize("core", [bench.grabcut_core, bench.random_walker_core])
def test_classical_baselines_segment_an_easy_object(core):
    image, gt = _scene()
    segment = bench.classical(core, 1.0)
    inside = Click(48, 50, True)
    assert iou(segment(image, Prompt((inside,))), gt) > 0.8


def test_the_bench_refuses_overlapping_seed_lists(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(
        "<!-- seeds:start -->\n```yaml\ninteractive:\n  world: v2\n  unit: video\n"
        "  calibration: [1, 2, 3]\n  report: [3, 4, 5]\n```\n<!-- seeds:end -->\n",
        encoding="utf-8",
    )
    with pytest.raises(bench.seeds.SeedRegistryError, match="overlap"):
        bench.main(["--registry", str(readme), "--seed-set", "calibration"])


def test_worker_processes_give_the_same_sessions():
    image, gt = _scene()
    objects = [_object(image, gt), _object(image[:, ::-1].copy(), gt[:, ::-1].copy())]
    methods = {
        "a": lambda o, p, m=bench.classical(_fake_core(3), 1.0): m(o.frame, p),
        "b": lambda o, p, m=bench.classical(_fake_core(8), 1.0): m(o.frame, p),
    }
    one = bench.run_sessions(methods, objects, 6, jobs=1)
    two = bench.run_sessions(methods, objects, 6, jobs=2)
    for name in methods:
        assert [s.clicks for s in one[name][0]] == [s.clicks for s in two[name][0]]
        assert [s.ious for s in one[name][0]] == [s.ious for s in two[name][0]]
