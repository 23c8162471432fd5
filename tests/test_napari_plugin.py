"""napari plugin end-to-end, in a real viewer under Xvfb (pytest-xvfb, PyQt6).

Each test opens the synthetic sample clip through the plugin's reader and docks the widget the way napari
does (``add_plugin_dock_widget``); the model is the random-init one at a 64-pixel short side (no weights).
Screenshots go to ``$SURGENET_NAPARI_ARTIFACTS`` (default: the test's tmp dir).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("NAPARI_ASYNC", "0")
if os.environ.get("SURGENET_ASSIST_REQUIRE_NAPARI") == "1":  # CI: a missing GUI stack is a failure
    import napari
    import pytestqt  # noqa: F401
else:
    napari = pytest.importorskip("napari", reason="install the napari extra: pip install -e '.[napari]'")
    pytest.importorskip("pytestqt")

from surgenet_assist.napari_plugin._sample import sample_clip_path  # noqa: E402
from surgenet_assist.napari_plugin.session import SHOWN_MODEL_KEY, UNTRAINED  # noqa: E402

PLUGIN = "surgenet-assist"
SHORT_SIDE = 64
WAIT_MS = 120_000


@pytest.fixture
def viewer(make_napari_viewer):
    return make_napari_viewer()


def open_widget(viewer, seed: int = 7):
    """Open the sample clip via the reader, dock the widget by its manifest name, make it fast."""
    layers = viewer.open(str(sample_clip_path(seed=seed)), plugin=PLUGIN)
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "SurgeNet Assist")
    widget.session.short_side = SHORT_SIDE
    widget.session.batch_size = 4
    return layers[0], widget


def preannotate(qtbot, widget, scope: str = "whole clip"):
    with qtbot.waitSignal(widget.preannotation_finished, timeout=WAIT_MS):
        assert widget.preannotate(scope) is not None
    return widget


def stored_predictions(widget, frame: int):
    return widget.session.store.predictions_for(
        widget.clip.video_id, task="segmentation", frame_index=frame, latest=False
    )


def test_reader_layer_and_widget_defaults(viewer):
    image, widget = open_widget(viewer)
    assert image.data.shape == (12, 120, 214, 3) and image.rgb
    assert tuple(image.axis_labels) == ("frame", "y", "x")
    assert type(image.data).__name__ == "LazyVideo"
    # no registry rows: the widget says clearly that it serves an untrained model
    assert widget.model_choice.version == UNTRAINED
    assert "untrained" in widget.served_label.value.lower()
    assert widget.labels_layer is not None and widget.labels_layer.data.shape == (12, 120, 214)
    assert widget.clip.frame_count == 12


def test_preannotate_paint_commit_keeps_prediction(viewer, qtbot, tmp_path):
    _, widget = open_widget(viewer)
    preannotate(qtbot, widget)
    assert widget.edits.predicted == set(range(12))
    layer = widget.labels_layer
    frame = 3
    widget.goto(frame)
    before = [p.payload["mask"].copy() for p in stored_predictions(widget, frame)]
    assert len(before) == 1
    np.testing.assert_array_equal(layer.data[frame], before[0])  # the layer shows the stored prediction
    other = layer.data[5].copy()

    # paint a correction with a class the model did not predict there
    cls = next(k for k in range(1, 13) if k not in np.unique(before[0][40:80, 80:140]))
    layer.brush_size = 20
    layer.selected_label = cls
    layer.paint((frame, 60, 110), cls)
    assert frame in widget.edits.dirty_masks
    expected = np.asarray(layer.data[frame]).copy()
    assert (expected != before[0]).sum() > 100
    np.testing.assert_array_equal(layer.data[5], other)  # painting stays on the current frame

    result = widget.commit("current frame")
    assert result.count >= 1 and not widget.edits.dirty_masks
    labels = widget.session.store.training_labels("segmentation", video_id=widget.clip.video_id)
    assert [(r.frame_start, r.source, r.author) for r in labels] == [(frame, "napari", widget.session.author)]
    np.testing.assert_array_equal(labels[0].payload["mask"], expected)
    assert labels[0].payload[SHOWN_MODEL_KEY] == UNTRAINED
    after = [p.payload["mask"] for p in stored_predictions(widget, frame)]
    assert len(after) == 1
    np.testing.assert_array_equal(after[0], before[0])
    # the human label is what the store shows for the frame now
    assert widget.session.store.label_for(widget.clip.video_id, frame, "segmentation").origin == "human"

    # File > Save on the segmentation layer exports the store's human labels (COCO) through our writer
    out = tmp_path / "labels.json"
    assert layer.save(str(out), plugin=PLUGIN) == [str(out)]
    coco = json.loads(out.read_text())
    assert len(coco["images"]) == 1 and coco["annotations"]


def test_phase_range_and_cvs_via_shortcuts(viewer, qtbot):
    from napari.utils.key_bindings import coerce_keybinding

    _, widget = open_widget(viewer)
    preannotate(qtbot, widget)
    layer = widget.labels_layer

    def press(target, key):
        kb = coerce_keybinding(key)
        assert kb in target.keymap, f"{key} not bound on {target}"
        target.keymap[kb](target)

    # the timeline's drag selection, then Alt-5 (phase 4) pressed while the Labels layer is active
    widget.timeline.range_selected.emit(2, 6)
    assert widget.frame_range == (2, 6)
    press(layer, "Alt-5")
    assert set(widget.edits.phases[2:7]) == {4}
    widget.goto(5)
    for cb, on in zip(widget.cvs_boxes, (True, False, True), strict=True):
        cb.value = on
    widget.cvs_boxes[1].value = True
    widget.cvs_boxes[1].value = False
    widget.commit_scope.value = "frame range"
    press(widget.viewer, "Shift-C")
    assert not widget.edits.dirty_phase and not widget.edits.dirty_cvs

    store, vid = widget.session.store, widget.clip.video_id
    phases = store.phase_labels(vid, length=12)
    assert list(phases[2:7]) == [4] * 5
    assert (phases[:2] == -1).all() and (phases[7:] == -1).all()
    cvs = store.training_labels("cvs", video_id=vid)
    assert [(r.frame_start, r.payload["values"]) for r in cvs] == [(5, [1.0, 0.0, 1.0])]
    rng = store.training_labels("phase", video_id=vid)
    assert [(r.frame_start, r.frame_end, r.source) for r in rng] == [(2, 6, "napari")]

    # a fresh widget on the same store shows the committed labels
    widget2_phases = widget.session.human_labels(widget.clip)["phases"]
    assert list(widget2_phases[2:7]) == [4] * 5
    # N (next to review) is bound on the layer too and walks unlabelled frames in order
    widget.goto(0)
    press(layer, "N")
    assert widget.frame == 1
    press(layer, "Shift-N")
    assert widget.frame == 0


def test_event_loop_stays_responsive_and_cancel(viewer, qtbot):
    from qtpy.QtCore import QTimer

    _, widget = open_widget(viewer)
    widget.session.batch_size = 1
    ticks = []
    timer = QTimer()
    timer.setInterval(20)
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start()
    t0 = time.perf_counter()
    preannotate(qtbot, widget)
    elapsed = time.perf_counter() - t0
    timer.stop()
    # the timer kept firing during the run: no gap longer than 1 s, and most of the expected ticks arrived
    gaps = np.diff([t0, *ticks])
    assert len(ticks) >= 0.3 * elapsed / 0.020, (len(ticks), elapsed)
    assert gaps.max() < 1.0, gaps.max()

    # cancel: a second clip, stopped after the first frame arrives
    widget.session._cache.clear()
    widget.edits.predicted.clear()
    worker = widget.preannotate("whole clip")
    qtbot.waitUntil(lambda: len(widget.edits.predicted) >= 1, timeout=WAIT_MS)
    with qtbot.waitSignal(widget.preannotation_finished, timeout=WAIT_MS):
        widget.cancel_btn.native.click()
    assert worker is not None and 1 <= len(widget.edits.predicted) < 12
    assert widget.run_btn.enabled and not widget.cancel_btn.enabled
    assert "cancelled" in widget.status.value


def test_switching_clip_flags_uncommitted_edits(viewer, qtbot):
    image, widget = open_widget(viewer)
    preannotate(qtbot, widget, "current frame")
    widget.labels_layer.paint((0, 50, 50), 6)
    asked = []
    widget.confirm_discard = lambda: asked.append(1) or False
    viewer.open(str(sample_clip_path(seed=8)), plugin=PLUGIN)  # opening does not switch while dirty
    other = [ly for ly in widget._clip_layers() if ly is not image][0]
    assert widget.set_clip(other) is False and asked and widget.image_layer is image
    widget.confirm_discard = lambda: True
    assert widget.set_clip(other) is True and widget.image_layer is other and not widget.has_uncommitted()


def test_next_to_review_follows_acquisition_queue(viewer):
    _, widget = open_widget(viewer)
    store, vid = widget.session.store, widget.clip.video_id
    store.save_acquisition_scores(
        [(vid, 9, 0.9), (vid, 4, 0.8), (vid, 2, 0.1)], task="segmentation", method="entropy"
    )
    assert widget.next_to_review() == 9
    assert widget.next_to_review() == 4
    assert widget.next_to_review() == 2


def test_panel_is_magicgui_and_user_errors_are_notified(viewer):
    """The dock is a magicgui Container; an action the user cannot take shows a message with a hint in the
    status line and as a napari notification instead of raising."""
    from magicgui.widgets import Container
    from napari.utils.notifications import notification_manager

    from surgenet_assist.napari_plugin.edits import ReviewError

    _, widget = open_widget(viewer)
    assert isinstance(widget, Container)
    seen = []
    notification_manager.notification_ready.connect(seen.append)
    try:
        widget.goto(11)
        assert widget.propagate("next", 3) is None  # the last frame has nothing after it
        assert "No frames in that direction" in widget.status.value
        assert seen and "No frames in that direction" in seen[-1].message and "Fix:" in seen[-1].message
        with pytest.raises(ReviewError):  # the rule itself, as the edit state states it
            widget.edits.propagation_targets(11, "next", 3)
        viewer.layers.clear()  # no clip left: the shortcuts say so instead of failing silently
        assert widget.clip is None and widget.commit() is None
        assert "No clip is open" in widget.status.value and "File › Open" in seen[-1].message
    finally:
        notification_manager.notification_ready.disconnect(seen.append)


def _artifact_dir(tmp_path: Path) -> Path:
    out = Path(os.environ.get("SURGENET_NAPARI_ARTIFACTS") or tmp_path)
    out.mkdir(parents=True, exist_ok=True)
    return out


def test_screenshot_after_preannotation(make_napari_viewer, qtbot, tmp_path):
    viewer = make_napari_viewer(show=True)
    image, widget = open_widget(viewer)
    viewer.window._qt_window.resize(1600, 1000)
    widget.goto(4)
    preannotate(qtbot, widget, "current frame")
    layer = widget.labels_layer
    # a known correction: a square of a class the model did not predict much of
    counts = np.bincount(np.asarray(layer.data[4]).ravel(), minlength=13)
    cls = min((5, 7, 11), key=lambda k: counts[k])
    layer.data_setitem((np.full(900, 4), *np.mgrid[40:70, 100:130].reshape(2, -1)), cls)
    assert (np.asarray(layer.data[4]) == cls).sum() >= 900
    mask = np.asarray(layer.data[4]).copy()
    qtbot.wait(200)
    viewer.reset_view()
    qtbot.wait(200)
    out = _artifact_dir(tmp_path)
    viewer.window.screenshot(path=str(out / "napari_review.png"), canvas_only=False)
    shot = viewer.screenshot(path=str(out / "napari_canvas.png"), canvas_only=True, flash=False)
    assert shot.ndim == 3 and shot[..., :3].std() > 10, "blank screenshot"

    # colour check: labels alone at full opacity, pixel centres mapped through the camera
    image.visible = False
    layer.opacity = 1.0
    layer.blending = "opaque"
    shot = viewer.screenshot(canvas_only=True, flash=False)[..., :3].astype(int)
    cam = viewer.scene.camera
    hs, ws = shot.shape[:2]
    scale = viewer.window._qt_window.devicePixelRatioF()  # world -> logical px (zoom) -> screenshot px
    cy, cx = cam.center[-2:]
    zoom = cam.zoom * scale
    colors = widget.schema.palette().astype(int)
    checked = matched = 0
    rng = np.random.default_rng(0)
    from scipy.ndimage import binary_erosion

    for cls in [c for c in np.unique(mask) if c != 0]:
        inner = binary_erosion(mask == cls, iterations=2)
        ys, xs = np.nonzero(inner)
        pick = rng.choice(len(ys), size=min(200, len(ys)), replace=False) if len(ys) else []
        for y, x in zip(ys[pick], xs[pick], strict=True):
            sy = int(round((y - cy) * zoom + hs / 2))
            sx = int(round((x - cx) * zoom + ws / 2))
            checked += 1
            matched += int(np.abs(shot[sy, sx] - colors[cls]).max() <= 8)
    assert checked >= 100
    assert matched / checked > 0.9, (matched, checked)

    # optional uncertainty heatmap: 1 - max class probability of the frames predicted so far
    widget.uncertainty_check.value = True
    unc = widget.uncertainty_layer
    assert unc is not None and unc.data.shape == (12, 120, 214)
    assert 0.0 < float(unc.data[4].max()) <= 1.0 and not unc.data[3].any()


def test_reader_random_seeks_are_frame_exact(tmp_path):
    from surgenet_assist.core.synthetic import decode_frame_index, make_indexed_video
    from surgenet_assist.napari_plugin._reader import get_reader

    path = make_indexed_video(tmp_path / "indexed.mp4", num_frames=90, fps=25.0, size=(120, 214))
    reader = get_reader(str(path))
    assert reader is not None and get_reader(str(tmp_path / "notes.txt")) is None
    ((data, kwargs, kind),) = reader(str(path))
    assert kind == "image" and data.shape == (90, 120, 214, 3)
    assert kwargs["axis_labels"] == ("frame", "y", "x")
    rng = np.random.default_rng(1)
    seeks = [89, 0, 45, 44, 46, 3, 88, *rng.integers(0, 90, 25).tolist()]
    assert [decode_frame_index(data[i]) for i in seeks] == seeks
    np.testing.assert_array_equal(data[10:13][1], data[11])


def test_reader_names_the_problem_of_an_unreadable_file(tmp_path):
    from surgenet_assist.core.errors import VideoReadError
    from surgenet_assist.napari_plugin._reader import get_reader

    bad = tmp_path / "case.mp4"
    bad.write_bytes(b"not a video")
    reader = get_reader(str(bad))
    assert reader is not None
    with pytest.raises(VideoReadError, match="case.mp4") as err:
        reader(str(bad))
    assert err.value.hint


def test_manifest_is_valid_and_complete():
    from npe2 import PluginManifest

    mf = PluginManifest.from_distribution("surgenet-assist")
    assert mf.name == PLUGIN
    c = mf.contributions
    assert [w.display_name for w in c.widgets] == ["SurgeNet Assist"]
    assert c.readers[0].accepts_directories and "*.mkv" in c.readers[0].filename_patterns
    assert c.writers and c.sample_data and "store" in (c.configurations or {})


def test_widget_loads_torch_after_viewer_in_fresh_process(tmp_path):
    """The real start-up order (napari first, the plugin imports torch later) must not crash the process."""
    import subprocess
    import sys

    if not os.environ.get("DISPLAY"):
        pytest.skip("needs the X display that pytest-xvfb provides")
    script = (
        "import napari, sys\n"
        "v = napari.Viewer(show=True)\n"
        f"v.open({str(sample_clip_path())!r}, plugin='surgenet-assist')\n"
        "_, w = v.window.add_plugin_dock_widget('surgenet-assist', 'SurgeNet Assist')\n"
        "w.session.short_side = 64\n"
        "w.session.predictor(w.model_choice)\n"
        "print('OK', w.clip.frame_count)\n"
    )
    env = dict(os.environ, SURGENET_ASSIST_HOME=str(tmp_path), NAPARI_ASYNC="0")
    cmd = [sys.executable, "-c", script]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "OK 12" in proc.stdout, proc.stderr[-2000:]


def test_propagate_carries_a_mask_to_the_next_frames(viewer, qtbot):
    """Propagate from a hand-labelled frame: the next frames get masks as predictions (not human labels),
    and they follow the ground truth better than copying the keyframe does."""
    import cv2

    _, widget = open_widget(viewer)
    folder = sample_clip_path(seed=7)
    truth = [
        cv2.imread(str(folder / "masks" / f"masks_{i:06d}.png"), cv2.IMREAD_UNCHANGED) for i in range(12)
    ]
    widget.session.short_side = 128
    widget.goto(0)
    widget.labels_layer.data[0] = truth[0]
    with qtbot.waitSignal(widget.preannotation_finished, timeout=WAIT_MS):
        assert widget.propagate("next", 6) is not None
    assert widget.edits.predicted >= set(range(1, 7)) and 7 not in widget.edits.predicted

    def agreement(a, b):
        return float((a == b).mean())

    layer = widget.labels_layer.data
    propagated = np.mean([agreement(np.asarray(layer[i]), truth[i]) for i in range(4, 7)])
    copied = np.mean([agreement(truth[0], truth[i]) for i in range(4, 7)])
    assert propagated > copied + 0.03, (propagated, copied)  # measured 0.82 vs 0.74
    rows = widget.session.store.predictions_for(widget.clip.video_id, task="segmentation", frame_index=3)
    assert rows and rows[0].model_version == "propagation-from-0"
    assert widget.session.store.training_labels("segmentation", video_id=widget.clip.video_id) == []
