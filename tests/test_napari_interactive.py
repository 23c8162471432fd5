"""Click-to-mask in the napari plugin: the Qt-free click state, then a real viewer under Xvfb (pytest-xvfb).

The viewer tests open the synthetic sample clip through the plugin's reader, dock the widget the way napari
does, and drive the real :class:`~surgenet_assist.core.interactive.ClickSegmenter` on the random-init
backbone (no weights), clicking inside objects of the clip's exact ground truth. Screenshots for
``docs/interactive.md`` go to ``$SURGENET_NAPARI_ARTIFACTS`` (default: the test's tmp dir); refresh them with
``scripts/napari_interactive_screenshots.sh``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("NAPARI_ASYNC", "0")
if os.environ.get("SURGENET_ASSIST_REQUIRE_NAPARI") == "1":  # CI: a missing GUI stack is a failure
    import napari  # noqa: F401
    import pytestqt  # noqa: F401
else:
    pytest.importorskip("napari", reason="install the napari extra: pip install -e '.[napari]'")
    pytest.importorskip("pytestqt")

from surgenet_assist.core.interactive import Box, Click, MaskResult, PromptError  # noqa: E402
from surgenet_assist.napari_plugin._sample import sample_clip_path  # noqa: E402
from surgenet_assist.napari_plugin.edits import ReviewError  # noqa: E402
from surgenet_assist.napari_plugin.interactive import (  # noqa: E402
    ClickState,
    merge_object,
    prompt_from_layers,
)

PLUGIN = "surgenet-assist"
WAIT_MS = 120_000


# --- Qt-free: the click state's rules ---------------------------------------------------------------------
def _result(mask: np.ndarray) -> MaskResult:
    return MaskResult(mask, mask.astype(np.float32), "day-one", "test", 0.01)


def test_state_drops_stale_results_and_runs_only_the_newest_prompt():
    state = ClickState(10, 20)
    first = state.set_prompt(3, [Click(2, 2)])
    assert first is not None and state.in_flight and state.waiting
    # two more clicks while the engine works on the first: no new call now, the newest one runs next
    assert state.set_prompt(3, [Click(2, 2), Click(4, 4, False)]) is None
    assert state.set_prompt(3, [Click(2, 2), Click(4, 4, False), Click(5, 5)]) is None
    mask = np.zeros((10, 20), bool)
    mask[1:4, 1:4] = True
    assert state.deliver(first, _result(mask)) is False and state.preview is None  # stale: dropped
    with pytest.raises(ReviewError, match="still being computed"):
        state.accept(1)
    newest = state.finished()
    assert newest is not None and len(newest.prompt.clicks) == 3 and state.in_flight
    assert state.deliver(newest, _result(mask)) is True
    assert state.finished() is None and not state.in_flight
    # an extra click starts from the shown mask (iterative refinement); the same prompt again is no call
    nxt = state.set_prompt(3, [*newest.prompt.clicks, Click(8, 8, False)])
    assert nxt is not None and nxt.prompt.previous_mask is not None
    assert state.set_prompt(3, nxt.prompt.clicks) is None


def test_state_refuses_what_the_engine_cannot_use_and_accept_rules():
    state = ClickState(10, 20)
    with pytest.raises(PromptError, match="outside"):
        state.set_prompt(0, [Click(12, 5)])
    with pytest.raises(PromptError, match="only negative"):
        state.set_prompt(0, [Click(2, 5, positive=False)])
    assert not state.in_flight and not state.waiting
    with pytest.raises(ReviewError, match="No object to accept"):
        state.accept(1)
    req = state.set_prompt(0, [Click(2, 5)], Box(0, 0, 6, 10))
    assert req is not None and req.prompt.box == Box(0, 0, 6, 10)
    mask = np.zeros((10, 20), bool)
    mask[1:4, 3:8] = True
    state.deliver(req, _result(mask))
    for bad in (0, 13, 255):  # background, beyond the schema, the ignore index
        with pytest.raises(ReviewError, match="not an object class"):
            state.accept(bad)
    obj = state.accept(4)
    assert obj.frame == 0 and obj.class_id == 4 and obj.mask.sum() == 15
    labels = np.zeros((10, 20), np.uint8)
    with pytest.raises(ReviewError, match="no longer"):
        state.object_to_propagate(labels)  # the accept was undone
    assert state.object_to_propagate(merge_object(labels, obj.mask, 4)) is obj


def test_merge_changes_only_the_object_pixels_and_layers_give_the_frame_prompt():
    target = np.full((4, 5), 2, np.uint8)
    target[0] = 7
    obj = np.zeros((4, 5), bool)
    obj[1:3, 1:3] = True
    out = merge_object(target, obj, 9)
    assert (out[obj] == 9).all() and (out[~obj] == target[~obj]).all() and (target != 9).all()
    points = np.array([[1, 2.0, 3.0], [2, 5.0, 6.0], [2, 7.0, 8.0]])
    box = np.array([[2, 1.0, 1.0], [2, 1.0, 9.0], [2, 6.0, 9.0], [2, 6.0, 1.0]])
    clicks, b = prompt_from_layers(points, ["positive", "negative", "positive"], [box], 2)
    assert clicks == [Click(5.0, 6.0, False), Click(7.0, 8.0, True)] and b == Box(1.0, 1.0, 6.0, 9.0)


# --- a real viewer ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def _seeded_model():
    import torch

    from surgenet_assist.core.model import SurgeNetAssistModel

    with torch.random.fork_rng():
        torch.manual_seed(0)
        return SurgeNetAssistModel.create(random_init=True)


@pytest.fixture
def seeded_backbone(_seeded_model, monkeypatch):
    """The widget's untrained model drawn from a fixed seed: what a random backbone segments depends on
    its draw, and the process-wide one may have been drawn by another test already."""
    from surgenet_assist.napari_plugin import session

    monkeypatch.setattr(session, "_RANDOM_INIT_MODEL", _seeded_model)


@pytest.fixture
def viewer(make_napari_viewer, seeded_backbone):
    return make_napari_viewer()


def open_widget(viewer, seed: int = 7):
    layers = viewer.open(str(sample_clip_path(seed=seed)), plugin=PLUGIN)
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "SurgeNet Assist")
    widget.session.short_side = 64  # whole-frame model and propagation: fast; the click engine keeps its own
    widget.session.batch_size = 4
    return layers[0], widget


def truth(frame: int, seed: int = 7) -> np.ndarray:
    import cv2

    path = sample_clip_path(seed=seed) / "masks" / f"masks_{frame:06d}.png"
    return cv2.imread(str(path), cv2.IMREAD_UNCHANGED)


def inner_point(region: np.ndarray) -> tuple[int, int]:
    """The pixel deepest inside ``region`` (where an annotator clicks first)."""
    import cv2

    depth = cv2.distanceTransform(np.pad(region.astype(np.uint8), 1), cv2.DIST_L2, 5)[1:-1, 1:-1]
    r, c = np.unravel_index(int(np.argmax(depth)), depth.shape)
    return int(r), int(c)


def an_object(gt: np.ndarray) -> tuple[int, np.ndarray]:
    """The gallbladder (class 10) when the frame shows enough of it, else the class with most pixels."""
    if (gt == 10).sum() >= 500:
        return 10, gt == 10
    counts = np.bincount(gt.ravel(), minlength=256)
    counts[0] = counts[255] = 0
    cls = int(np.argmax(counts[:13]))
    return cls, gt == cls


def click(qtbot, widget, frame: int, row: float, col: float) -> None:
    """Add a point as a mouse click does, and wait for its preview."""
    with qtbot.waitSignal(widget.click_preview, timeout=WAIT_MS):
        widget.clicks.points_layer.add([frame, row, col])
    assert not widget.clicks.state.waiting


def press(target, key: str) -> None:
    from napari.utils.key_bindings import coerce_keybinding

    kb = coerce_keybinding(key)
    assert kb in target.keymap, f"{key} not bound on {target}"
    target.keymap[kb](target)


def test_click_preview_negative_accept_undo_commit(viewer, qtbot):
    _, widget = open_widget(viewer)
    frame = 2
    widget.goto(frame)
    gt = truth(frame)
    cls, obj = an_object(gt)
    tool = widget.clicks
    assert tool.points_layer.name == "click prompts" and tool.preview_layer.name == "current object"
    assert tuple(tool.points_layer.property_choices["label"]) == ("positive", "negative")

    r, c = inner_point(obj)
    click(qtbot, widget, frame, r, c)
    preview = np.asarray(tool.preview_layer.data[frame]).astype(bool)
    assert preview.shape == gt.shape == (120, 214)
    # the engine's quality is bench/interactive.py's business; here: the clicked object, at frame size
    assert preview[r, c] and (preview & obj).sum() >= 20, ((preview & obj).sum(), preview.sum())
    assert not np.asarray(tool.preview_layer.data[frame - 1]).any()  # the preview sits on its frame only
    np.testing.assert_array_equal(tool.state.preview.mask, preview)
    assert "Object on frame 2" in widget.status.value

    # T (bound on the click layer) makes the next point negative: red border, and the mask changes there
    press(tool.points_layer, "T")
    assert "negative" in widget.click_kind_btn.text
    # a negative click on the preview pixel farthest from the positive one (spill-over first)
    far = np.hypot(*(np.mgrid[:120, :214] - np.array([r, c])[:, None, None]))
    wrong = preview & ~obj
    candidates = wrong if wrong.any() else preview
    nr, nc = np.unravel_index(int(np.argmax(np.where(candidates, far, -1))), far.shape)
    assert far[nr, nc] >= 6, "the preview is too small to place a negative click"
    click(qtbot, widget, frame, nr, nc)
    assert np.allclose(tool.points_layer.border_color[-1], [1, 0, 0, 1])
    after = np.asarray(tool.preview_layer.data[frame]).astype(bool)
    assert not after[nr, nc] and after[r, c] and (after != preview).sum() > 0
    assert tool.state.prompt.clicks[-1] == Click(float(nr), float(nc), False)
    press(viewer, "T")  # back to positive, from the viewer's keymap this time
    assert tool.points_layer.feature_defaults["label"][0] == "positive"

    # U removes the newest click: the preview follows
    with qtbot.waitSignal(widget.click_preview, timeout=WAIT_MS):
        press(tool.points_layer, "U")
    assert len(tool.points_layer.data) == 1
    np.testing.assert_array_equal(np.asarray(tool.preview_layer.data[frame]).astype(bool), preview)

    # C accepts under the selected label as one undoable edit of the segmentation layer
    labels = widget.labels_layer
    before = np.asarray(labels.data[frame]).copy()
    other = np.asarray(labels.data[frame + 1]).copy()
    labels.selected_label = cls
    press(labels, "C")
    now = np.asarray(labels.data[frame])
    assert (now[preview] == cls).all() and (now[~preview] == before[~preview]).all()
    np.testing.assert_array_equal(labels.data[frame + 1], other)
    assert frame in widget.edits.dirty_masks
    assert len(tool.points_layer.data) == 0 and not np.asarray(tool.preview_layer.data[frame]).any()
    assert tool.state.accepted is not None and tool.state.accepted.class_id == cls
    widget.undo_edit()
    np.testing.assert_array_equal(labels.data[frame], before)
    assert widget.propagate_object("next", 2) is None  # the undone object is not carried through the clip
    assert "no longer" in widget.status.value

    # accept again and commit: stored as the clinician's label, with provenance
    click(qtbot, widget, frame, r, c)
    assert np.allclose(tool.points_layer.border_color[-1], [0, 1, 0, 1])  # positive again: green
    assert widget.accept_object() is not None
    result = widget.commit("current frame")
    assert result is not None and result.count >= 1
    stored = widget.session.store.training_labels("segmentation", video_id=widget.clip.video_id)
    assert [(x.frame_start, x.source) for x in stored] == [(frame, "napari")]
    assert (stored[0].payload["mask"][preview] == cls).all()


def test_propagate_object_changes_only_its_pixels_and_spares_edited_frames(viewer, qtbot):
    _, widget = open_widget(viewer)
    widget.session.short_side = 128  # as the whole-frame propagation test: enough resolution to follow
    edits, labels = widget.edits, widget.labels_layer
    cls, obj = an_object(truth(0))
    # neighbours hold a pre-annotation without this class (the object is what propagation must add)
    for f in (1, 2):
        pre = truth(f).copy()
        pre[pre == cls] = 0
        edits.apply_propagated(f, pre)
    labels.data[3] = 6
    edits.mark_painted(3)  # frame 3 was corrected by hand: never overwritten
    kept = {f: np.asarray(labels.data[f]).copy() for f in (1, 2, 3)}

    widget.goto(0)
    r, c = inner_point(obj)
    click(qtbot, widget, 0, r, c)
    labels.selected_label = cls
    obj0 = widget.accept_object()
    assert obj0 is not None and obj0.frame == 0
    with qtbot.waitSignal(widget.preannotation_finished, timeout=WAIT_MS):
        assert widget.propagate_object("next", 3) is not None
    for f in (1, 2):
        new, old = np.asarray(labels.data[f]), kept[f]
        changed = new != old
        assert changed.sum() >= 20, f
        assert (new[changed] == cls).all()  # only the object's class was written
        assert ((new == cls) & (truth(f) == cls)).any(), f  # where the object is on that frame
    np.testing.assert_array_equal(labels.data[3], kept[3])
    rows = widget.session.store.predictions_for(widget.clip.video_id, task="segmentation", frame_index=1)
    assert rows and rows[0].model_version == f"propagation-from-0-class-{cls}"
    np.testing.assert_array_equal(rows[0].payload["mask"], labels.data[1])  # the store has what is shown


def test_click_outside_the_frame_is_reported_not_raised(viewer, qtbot):
    from napari.utils.notifications import notification_manager

    _, widget = open_widget(viewer)
    widget.goto(1)
    seen = []
    notification_manager.notification_ready.connect(seen.append)
    try:
        widget.clicks.points_layer.add([1, -8.0, 300.0])  # above and right of the 214x120 frame
        assert "outside" in widget.status.value
        assert seen and "outside" in seen[-1].message and "Fix:" in seen[-1].message
        assert len(widget.clicks.points_layer.data) == 0  # the unusable click is dropped
        widget.toggle_click()
        widget.clicks.points_layer.add([1, 50.0, 50.0])  # a lone negative click: said, kept
        assert "only negative" in widget.status.value and len(widget.clicks.points_layer.data) == 1
        widget.toggle_click()
        cls, obj = an_object(truth(1))
        click(qtbot, widget, 1, *inner_point(obj))  # clicking on works as usual
        assert np.asarray(widget.clicks.preview_layer.data[1]).any()
        widget.clear_clicks()
        assert widget.accept_object() is None and "No object to accept" in widget.status.value
    finally:
        notification_manager.notification_ready.disconnect(seen.append)


def test_box_prompt_and_the_gui_stays_responsive(viewer, qtbot):
    """A rectangle alone is a prompt (the object inside it); the first call (model load, frame features)
    runs on a worker while the event loop keeps turning."""
    import time

    from qtpy.QtCore import QTimer

    _, widget = open_widget(viewer)
    widget.goto(5)
    ticks: list[float] = []
    timer = QTimer()
    timer.setInterval(20)
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start()
    t0 = time.perf_counter()
    try:
        corners = np.array([[5, 20, 40], [5, 20, 150], [5, 100, 150], [5, 100, 40]], float)
        with qtbot.waitSignal(widget.click_preview, timeout=WAIT_MS):
            widget.clicks.box_layer.add_rectangles(corners)
        elapsed = time.perf_counter() - t0
    finally:
        timer.stop()
    gaps = np.diff([t0, *ticks])
    assert gaps.max() < 1.0 and len(ticks) >= 0.3 * elapsed / 0.020, (gaps.max(), len(ticks), elapsed)
    preview = np.asarray(widget.clicks.preview_layer.data[5]).astype(bool)
    assert preview.any() and not preview[:20].any() and not preview[:, 151:].any()
    assert widget.clicks.state.prompt.box is not None and not widget.clicks.state.prompt.clicks


def _artifact_dir(tmp_path: Path) -> Path:
    out = Path(os.environ.get("SURGENET_NAPARI_ARTIFACTS") or tmp_path)
    out.mkdir(parents=True, exist_ok=True)
    return out


def test_screenshots_clicks_and_accepted(make_napari_viewer, seeded_backbone, qtbot, tmp_path):
    """The two pictures of docs/interactive.md: clicks with their live preview, then the accepted object."""
    viewer = make_napari_viewer(show=True)
    _, widget = open_widget(viewer)
    viewer.window._qt_window.resize(1600, 1000)
    frame = 4
    widget.goto(frame)
    gt = truth(frame)
    cls, obj = an_object(gt)  # the gallbladder: a mid-sized object reads best in a picture
    r, c = inner_point(obj)
    click(qtbot, widget, frame, r, c)
    preview = np.asarray(widget.clicks.preview_layer.data[frame]).astype(bool)
    wrong = preview & ~obj
    if wrong.sum() > 20:  # a negative click where the preview spilled over, as a clinician would
        widget.toggle_click()
        click(qtbot, widget, frame, *inner_point(wrong))
        widget.toggle_click()
    widget.start_clicking()
    viewer.reset_view()
    qtbot.wait(300)
    out = _artifact_dir(tmp_path)
    shot = viewer.screenshot(path=str(out / "interactive_napari_clicks.png"), canvas_only=False, flash=False)
    assert shot.ndim == 3 and shot[..., :3].std() > 10, "blank screenshot"

    widget.labels_layer.selected_label = cls
    assert widget.accept_object() is not None
    viewer.layers.selection.active = widget.labels_layer
    qtbot.wait(300)
    path = out / "interactive_napari_accepted.png"
    shot = viewer.screenshot(path=str(path), canvas_only=False, flash=False)
    assert shot.ndim == 3 and shot[..., :3].std() > 10
    assert (out / "interactive_napari_clicks.png").stat().st_size > 10_000
