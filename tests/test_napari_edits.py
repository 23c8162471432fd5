"""The review panel's edit state and merge/commit rules (napari_plugin/edits.py), without Qt or a display."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from surgenet_assist.core.errors import SurgenetAssistError
from surgenet_assist.napari_plugin.edits import ClipEdits, ReviewError
from surgenet_assist.napari_plugin.session import CachedPrediction, Clip, ReviewSession

N, H, W = 8, 6, 10


def make_clip(n: int = N) -> Clip:
    return Clip("/videos/case.mp4", 1, n, H, W, 25.0, "hash")


def prediction(cls: int, phase: int = 2, cvs=(0.9, 0.2, 0.6), version: str = "v3") -> CachedPrediction:
    phase_probs = np.full(7, 0.01)
    phase_probs[phase] = 0.9
    return CachedPrediction(
        mask=np.full((H, W), cls, np.uint8),
        uncertainty_map=np.zeros((H, W), np.float16),
        phase_probs=phase_probs,
        cvs_probs=np.asarray(cvs),
        uncertainty={"segmentation": 0.1, "phase": 0.1, "cvs": 0.1},
        model_version=version,
    )


class FakeSession:
    """Records commits; review order = the given queue."""

    def __init__(self, queue=()):
        self.commits: list[dict] = []
        self.queue = list(queue)

    def commit(self, clip, frames, *, masks=None, phases=None, cvs=None, shown_model=None, started_from=None):
        self.commits.append(
            {"frames": frames, "masks": masks, "phases": phases, "cvs": cvs, "shown_model": shown_model,
             "started_from": started_from}
        )
        return "result"

    def next_to_review(self, clip, current, skip=frozenset()):
        return next((f for f in self.queue if f != current and f not in skip), None)


def test_module_imports_neither_qt_nor_napari():
    import subprocess

    code = (
        "import sys; import surgenet_assist.napari_plugin.edits\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('napari', 'qtpy', 'PyQt6', 'PyQt5', 'PySide6',"
        " 'magicgui', 'superqt')]\n"
        "print(bad); assert not bad"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_starts_from_human_labels():
    human = np.zeros((H, W), np.uint8) + 4
    phases = [-1, 1, 1, -1, -1, -1, -1, -1]
    edits = ClipEdits(make_clip(), phases=phases, cvs={2: [1, 0, 1]}, masks={3: human})
    assert edits.masks.shape == (N, H, W) and edits.masks.dtype == np.uint8
    np.testing.assert_array_equal(edits.masks[3], human)
    assert edits.human_masks == {3} and edits.phase_at(1) == 1 and edits.phase_at(0) == -1
    assert edits.cvs_at(2) == [1.0, 0.0, 1.0] and edits.cvs_at(0) is None
    assert not edits.has_uncommitted() and edits.uncommitted_count() == 0
    with pytest.raises(ReviewError, match="phase values"):
        ClipEdits(make_clip(), phases=[0, 1])


def test_prediction_never_overwrites_human_or_edited_labels():
    edits = ClipEdits(make_clip(), phases=[3] + [-1] * (N - 1), cvs={1: [0, 0, 0]},
                      masks={0: np.full((H, W), 5, np.uint8)})
    edits.masks[2] = 7  # a stroke, as napari paints it into the shared array
    edits.mark_painted(2)
    wrote = {f: edits.apply_prediction(f, prediction(cls=1)) for f in range(4)}
    assert wrote == {0: False, 1: True, 2: False, 3: True}
    assert (edits.masks[0] == 5).all() and (edits.masks[2] == 7).all() and (edits.masks[3] == 1).all()
    assert edits.predicted == {0, 1, 2, 3} and edits.shown_model == "v3"
    # phases only where none was set; CVS only where the clinician has none (model value >= 0.5)
    assert edits.phase_at(0) == 3 and edits.phase_at(1) == 2
    assert edits.cvs_at(1) == [0.0, 0.0, 0.0] and edits.cvs_at(3) == [1.0, 0.0, 1.0]
    np.testing.assert_allclose(edits.cvs_probs[3], [0.9, 0.2, 0.6])
    # a clinician's CVS value survives a later prediction too
    edits.set_cvs(4, [False, True, False])
    edits.apply_prediction(4, prediction(cls=1))
    assert edits.cvs_at(4) == [0.0, 1.0, 0.0]
    # a second prediction replaces the first where no one edited
    edits.apply_prediction(3, prediction(cls=9, version="v4"))
    assert (edits.masks[3] == 9).all() and edits.shown_model == "v4"


def test_propagation_fills_only_unedited_frames():
    edits = ClipEdits(make_clip(), masks={5: np.full((H, W), 2, np.uint8)})
    edits.mark_painted(4)
    mask = np.full((H, W), 6, np.uint8)
    assert [edits.apply_propagated(f, mask) for f in (3, 4, 5)] == [True, False, False]
    assert edits.predicted == {3} and (edits.masks[3] == 6).all() and (edits.masks[5] == 2).all()


def test_propagation_targets_and_scopes():
    edits = ClipEdits(make_clip())
    assert edits.propagation_targets(2, "next", 3) == [3, 4, 5]
    assert edits.propagation_targets(2, "previous", 5) == [0, 1]
    assert edits.propagation_targets(6, "both", 3) == [7, 3, 4, 5]
    with pytest.raises(ReviewError, match="No frames in that direction") as err:
        edits.propagation_targets(N - 1, "next", 3)
    assert err.value.hint and isinstance(err.value, SurgenetAssistError)
    with pytest.raises(ReviewError, match="direction"):
        edits.propagation_targets(2, "sideways", 3)
    assert edits.scope_frames("current frame", 4, (0, 0)) == [4]
    assert edits.scope_frames("frame range", 4, (6, 2)) == [2, 3, 4, 5, 6]
    assert edits.scope_frames("whole clip", 4, (0, 0)) == list(range(N))
    with pytest.raises(ReviewError, match="outside the clip"):
        edits.scope_frames("current frame", N, (0, 0))
    with pytest.raises(ReviewError, match="scope"):
        edits.scope_frames("everything", 0, (0, 0))


def test_set_phase_marks_range_dirty_and_checks_input():
    edits = ClipEdits(make_clip())
    assert edits.set_phase(4, (5, 2)) == (2, 5)
    assert list(edits.phases[2:6]) == [4] * 4 and edits.phase_at(1) == -1 and edits.phase_at(6) == -1
    assert edits.dirty_phase == {2, 3, 4, 5} and edits.has_uncommitted()
    with pytest.raises(ReviewError, match="not a phase"):
        edits.set_phase(7, (0, 0))
    with pytest.raises(ReviewError, match="CVS values"):
        edits.set_cvs(0, [1, 0])


def test_commit_current_frame_confirms_a_prediction():
    edits = ClipEdits(make_clip())
    for f in range(N):
        edits.apply_prediction(f, prediction(cls=1, phase=2))
    session = FakeSession()
    assert edits.commit(session, "current frame", 3, (0, N - 1)) == "result"
    (c,) = session.commits
    assert c["frames"] == (3, 3) and list(c["masks"]) == [3] and (c["masks"][3] == 1).all()
    assert c["cvs"] == {3: [1.0, 0.0, 1.0]} and c["phases"][3] == 2 and c["shown_model"] == "v3"
    # what each committed value started from: the v3 pre-annotation, for every task of the frame
    assert {task: by_frame.get(3) for task, by_frame in c["started_from"].items()} == {
        "segmentation": "v3", "phase": "v3", "cvs": "v3"
    }
    assert edits.human_masks == {3}
    # the committed mask is a copy: painting afterwards does not change what was sent
    edits.masks[3] = 0
    assert (c["masks"][3] == 1).all()


def test_commit_current_frame_without_anything_sends_nothing():
    edits = ClipEdits(make_clip())
    plan = edits.commit_plan("current frame", 0, (0, 0))
    assert plan.frames == (0, 0) and plan.masks == {} and plan.cvs == {} and plan.phases is None


def test_commit_range_sends_phases_and_only_edited_masks_and_cvs():
    edits = ClipEdits(make_clip())
    for f in range(N):
        edits.apply_prediction(f, prediction(cls=1))
    edits.set_phase(4, (2, 6))
    edits.masks[3] = 8
    edits.mark_painted(3)
    edits.mark_painted(7)  # outside the range: stays dirty
    edits.set_cvs(5, [1, 0, 1])
    session = FakeSession()
    edits.commit(session, "frame range", 0, (6, 2))
    (c,) = session.commits
    assert c["frames"] == (2, 6) and list(c["masks"]) == [3] and (c["masks"][3] == 8).all()
    assert c["cvs"] == {5: [1.0, 0.0, 1.0]} and list(c["phases"][2:7]) == [4] * 5
    assert edits.dirty_masks == {7} and not edits.dirty_cvs and not edits.dirty_phase
    assert edits.human_masks == {3}
    # a corrected pre-annotation still started from it, and so did the CVS of frame 5 the clinician set over
    # the pre-filled one
    assert c["started_from"]["segmentation"][3] == "v3" and c["started_from"]["cvs"][5] == "v3"
    # a prediction after the commit leaves the committed mask alone, and what it started from
    assert edits.apply_prediction(3, prediction(cls=2, version="v4")) is False and (edits.masks[3] == 8).all()
    assert edits.started_from["segmentation"][3] == "v3"


def test_failed_commit_keeps_edits_dirty():
    class Refusing(FakeSession):
        def commit(self, *a, **k):
            raise SurgenetAssistError("store is read-only", hint="check the database URL")

    edits = ClipEdits(make_clip())
    edits.mark_painted(1)
    with pytest.raises(SurgenetAssistError):
        edits.commit(Refusing(), "current frame", 1, (0, 0))
    assert edits.dirty_masks == {1} and not edits.human_masks


def test_next_and_previous_walk_the_review_queue():
    edits = ClipEdits(make_clip())
    session = FakeSession(queue=[6, 2, 4])
    assert edits.next_to_review(session, 0) == 6
    assert edits.next_to_review(session, 6) == 2
    assert edits.next_to_review(session, 2) == 4
    assert edits.next_to_review(session, 4) is None and edits.reviewed == [0, 6, 2]
    assert [edits.previous(4), edits.previous(2), edits.previous(6)] == [2, 6, 0]
    assert edits.previous(3) == 2 and edits.previous(0) is None


def test_round_trip_through_a_real_store(tmp_path):
    """Commit through a ReviewSession on SQLite, then a fresh ClipEdits shows what was committed."""
    folder = tmp_path / "frames"  # the store registers the path; no frame is decoded here
    folder.mkdir()
    for i in range(4):
        (folder / f"frame_{i:06d}.png").write_bytes(b"")
    from surgenet_assist.core.store.migrations import upgrade

    url = f"sqlite:///{tmp_path / 'labels.db'}"
    upgrade(url)  # what `surgenet-assist db upgrade` does
    session = ReviewSession(url, author="dr-test")
    try:
        clip = session.open_clip({"path": str(folder), "fps": 1.0, "frame_count": 4, "height": H, "width": W})
        edits = ClipEdits.load(session, clip)
        edits.apply_prediction(1, prediction(cls=3, phase=1))
        edits.set_phase(5, (1, 2))
        result = edits.commit(session, "current frame", 1, (0, 0))
        assert result.count == 3  # mask, phase, CVS
        edits.masks[2] = 11
        edits.mark_painted(2)
        edits.commit(session, "frame range", 0, (1, 2))
        assert not edits.has_uncommitted()

        again = ClipEdits.load(session, clip)
        assert again.human_masks == {1, 2}
        assert (again.masks[1] == 3).all() and (again.masks[2] == 11).all()
        assert list(again.phases) == [-1, 5, 5, -1] and again.cvs_at(1) == [1.0, 0.0, 1.0]
        # provenance: frame 1's mask and CVS started from the v3 pre-annotation, frame 2's mask was painted on
        # an empty frame; the phase range 1-2 holds a frame v3 pre-filled; a person committed all of them
        store = session.store
        started = {
            (task, r.frame_start, r.frame_end): r.provenance.model_version
            for task in ("segmentation", "phase", "cvs")
            for r in store.current_human_labels(task, video_id=clip.video_id)
        }
        assert started == {
            ("segmentation", 1, 1): "v3", ("segmentation", 2, 2): None, ("cvs", 1, 1): "v3",
            ("phase", 1, 1): "v3", ("phase", 1, 2): "v3",
        }
        labels = [r for t in ("segmentation", "phase", "cvs") for r in store.training_labels(t)]
        assert len(labels) == 5 and all(r.provenance.reviewed for r in labels)
        assert [r.provenance.from_prediction for r in store.training_labels("segmentation")] == [True, False]
    finally:
        session.close()


def _real_session(tmp_path, n: int = 4):
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(n):
        (folder / f"frame_{i:06d}.png").write_bytes(b"")
    session = ReviewSession(f"sqlite:///{tmp_path / 'labels.db'}", author="dr-test")
    clip = session.open_clip({"path": str(folder), "fps": 1.0, "frame_count": n, "height": H, "width": W})
    return session, clip


def _revisions(session) -> int:
    return session.store.stats()["annotations"]["revisions"]


def test_commit_is_one_transaction_a_failure_half_way_stores_nothing(tmp_path, monkeypatch):
    """Masks, phases and CVS of one commit are written together: when the store fails after some of them,
    none is stored, the error is a SurgenetAssistError, and the edits stay uncommitted."""
    from surgenet_assist.core.errors import StoreError
    from surgenet_assist.core.store import Writer

    session, clip = _real_session(tmp_path)
    try:
        masks = {f: np.full((H, W), 3, np.uint8) for f in range(3)}
        phases = np.array([1, 1, 2, -1])
        cvs = {0: [1, 0, 1], 2: [0, 0, 1]}
        real = Writer.record_annotations
        recorded: list[object] = []

        def fail_at_the_fourth_label(self, items, project=None):
            out = []
            for item in items:  # one by one, whether the session sends them together or apart
                if len(recorded) == 3:  # the store fails half-way through the commit
                    raise StoreError("disk full", "free some space")
                out += real(self, [item], project)
                recorded.append(item)
            return out

        monkeypatch.setattr(Writer, "record_annotations", fail_at_the_fourth_label)
        with pytest.raises(SurgenetAssistError, match="disk full"):
            session.commit(clip, (0, 3), masks=masks, phases=phases, cvs=cvs, shown_model="v3")
        assert _revisions(session) == 0
        for task in ("segmentation", "phase", "cvs"):
            assert session.store.current_human_labels(task, video_id=clip.video_id) == []

        # through the panel: the same failure keeps every edit dirty
        recorded[:] = ["earlier", "earlier"]  # the panel commit (mask + CVS) fails at its 2nd label
        edits = ClipEdits(clip)
        edits.mark_painted(1)
        edits.set_cvs(1, [1, 1, 0])
        with pytest.raises(SurgenetAssistError):
            edits.commit(session, "current frame", 1, (0, 0))
        assert edits.dirty_masks == {1} and edits.has_uncommitted() and _revisions(session) == 0

        monkeypatch.setattr(Writer, "record_annotations", real)
        result = session.commit(clip, (0, 3), masks=masks, phases=phases, cvs=cvs, shown_model="v3")
        assert {t: len(r) for t, r in result.revisions.items()} == {"segmentation": 3, "phase": 1, "cvs": 2}
        assert _revisions(session) == 6
    finally:
        session.close()


def test_commit_with_an_invalid_label_after_valid_ones_stores_nothing(tmp_path):
    from surgenet_assist.core.errors import SchemaError

    session, clip = _real_session(tmp_path)
    try:
        masks = {0: np.full((H, W), 3, np.uint8), 1: np.full((H, W), 3, np.uint8)}
        with pytest.raises(SchemaError):  # a CVS value outside [0, 1], after two valid masks
            session.commit(clip, (0, 1), masks=masks, cvs={1: [0.5, 2.0, 0.0]})
        assert _revisions(session) == 0
    finally:
        session.close()
