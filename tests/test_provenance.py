"""Which label trains and what exports (issue 20 item 7), each on SQLite and PostgreSQL.

Label Studio annotations go in as Label Studio sends them (results and fields from the captured export in
``tests/fixtures/label_studio``), through the same translator webhooks and ``ls sync`` use; what trains is
read back with ``LabelStore.training_labels``, what a reviewer sees with ``current_human_labels``.
"""
# ruff: noqa: F811  (fixtures imported from store_helpers are parameters of the tests below)

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import sqlalchemy as sa
from ls_semantics import fixture
from store_helpers import live_label_state, random_mask, store, store_url  # noqa: F401 - fixtures

from surgenet_assist.core.errors import DatasetFormatError
from surgenet_assist.core.formats.label_studio import EXPORT_KEY, export_label_studio, import_label_studio
from surgenet_assist.core.label_studio_sync import ingest_webhook
from surgenet_assist.core.schema import TASKS
from surgenet_assist.core.store import LabelStore, Provenance, split_for_video, upgrade
from surgenet_assist.core.store.migrations import head_revision

CFG = fixture("image_config.xml")
EXPORT = fixture("image_export.json")  # what Label Studio 1.23.2 exported (tests/fixtures/label_studio)


def _task(k: int, **extra) -> dict:
    """Fixture task ``k`` (1-based) without its annotations."""
    task = copy.deepcopy(EXPORT[k - 1])
    task.pop("annotations")
    return {**task, **extra}


def _annotation(result_of: int, ann_id: int, user: int, when: str, **fields) -> dict:
    """A Label Studio annotation whose result is fixture annotation ``result_of``'s, with the fields Label
    Studio sends for an annotation saved by ``user`` through its API (``updated_by`` set, no lead time)."""
    source = next(a for t in EXPORT for a in t["annotations"] if a["id"] == result_of)
    ann = copy.deepcopy(source)
    ann.update(
        id=ann_id, completed_by=user, updated_by=user, created_at=when, updated_at=when, ground_truth=False,
        lead_time=None, parent_prediction=None,
    )
    ann.update(fields)
    return ann


def _deliver(store, task: dict, *annotations: dict, action: str = "ANNOTATION_CREATED") -> None:
    """The webhooks Label Studio sends for ``annotations`` of ``task`` (one bulk body for
    ``ANNOTATIONS_CREATED``, lists paired by the annotation's ``task``, as in the captured one)."""
    project = {"id": 1, "label_config": CFG}
    if action == "ANNOTATIONS_CREATED":
        anns = [{**a, "task": task["id"]} for a in annotations]
        ingest_webhook(store, {"action": action, "annotation": anns, "task": [task], "project": project})
        return
    for ann in annotations:
        ingest_webhook(store, {"action": action, "annotation": ann, "task": task, "project": project})


def _authors(records) -> list:
    return [r.author for r in records]


def test_two_annotators_the_ground_truth_one_trains(store):
    task = _task(1)
    first = _annotation(1, 101, 1, "2026-01-01T10:00:00Z", ground_truth=True)
    later = _annotation(2, 102, 2, "2026-01-01T11:00:00Z")  # newer, not ground truth
    _deliver(store, task, first, later)
    seg = store.training_labels("segmentation")
    assert _authors(seg) == ["ls-user:1"] and seg[0].provenance.ground_truth
    assert _authors(store.current_human_labels("segmentation")) == ["ls-user:2"]  # what a reviewer sees
    assert sorted(_authors(store.live_labels("segmentation"))) == ["ls-user:1", "ls-user:2"]
    # the star moves to the other annotator (Label Studio clears the first one's without telling anyone;
    # the newest starred revision wins)
    _deliver(
        store, task, {**later, "ground_truth": True, "updated_at": "2026-01-01T12:00:00Z"},
        action="ANNOTATION_UPDATED",
    )
    assert _authors(store.training_labels("segmentation")) == ["ls-user:2"]
    # without any star, the newest trains
    _deliver(
        store, task, {**later, "ground_truth": False, "updated_at": "2026-01-01T13:00:00Z"},
        {**first, "ground_truth": False, "updated_at": "2026-01-01T14:00:00Z"}, action="ANNOTATION_UPDATED",
    )
    assert _authors(store.training_labels("segmentation")) == ["ls-user:1"]
    # the frame's CVS and phase only annotator 1 gave: they train whoever holds the star
    assert _authors(store.training_labels("cvs")) == _authors(store.training_labels("phase")) == ["ls-user:1"]


def test_created_from_a_prediction_trains_only_once_someone_touched_it(store):
    # what "create annotations from predictions" makes: parent_prediction set, no lead time, nobody updated
    # it (the captured ANNOTATIONS_CREATED body has exactly these fields)
    bulk = fixture("webhooks_bulk.json")[0]
    assert bulk["action"] == "ANNOTATIONS_CREATED"
    assert all(a["parent_prediction"] and a["lead_time"] is None and a["updated_by"] is None
               for a in bulk["annotation"])
    task = _task(2, predictions=[{"id": 7, "model_version": "champion-3", "result": []}])
    made = _annotation(
        1, 201, 1, "2026-01-02T09:00:00Z", parent_prediction=7, updated_by=None, lead_time=None
    )
    _deliver(store, task, made, action="ANNOTATIONS_CREATED")
    (shown,) = store.current_human_labels("segmentation")
    assert shown.provenance == Provenance(True, "champion-3", reviewed=False)
    assert store.training_labels("segmentation") == []  # excluded by default
    assert [r.annotation_id for r in store.training_labels("segmentation", unreviewed=True)] == [
        shown.annotation_id
    ]
    assert store.stats()["annotations"]["provenance"] == {
        "from_prediction": 3,
        "from_prediction_by_model_version": {"champion-3": 3},
        "unreviewed": 3,
        "ground_truth": 0,
    }
    # the annotator opens it in the editor and saves (lead time, updated_by): it trains, still marked as
    # started from champion-3
    edited = {**made, "lead_time": 41.5, "updated_by": 1, "updated_at": "2026-01-02T10:00:00Z"}
    _deliver(store, task, edited, action="ANNOTATION_UPDATED")
    (trained,) = store.training_labels("segmentation")
    assert trained.provenance == Provenance(True, "champion-3", reviewed=True)
    assert trained.revision == 2 and store.history(trained.annotation_id)[0].provenance.reviewed is False


def test_the_captured_bulk_creation_is_stored_unreviewed(store):
    """The real ANNOTATIONS_CREATED body: its task carries no predictions, so the version is unknown."""
    body = fixture("webhooks_bulk.json")[0]
    cfg = body["project"]["label_config"]
    ingest_webhook(store, {**body, "project": {**body["project"], "label_config": cfg}})
    labels = [r for t in TASKS for r in store.current_human_labels(t)]
    assert labels and all(r.provenance == Provenance(True, None, reviewed=False) for r in labels)
    assert all(store.training_labels(t) == [] for t in TASKS)


def test_export_writes_every_annotator_and_imports_back_to_the_same_store(store, store_url, tmp_path):
    task1, task2 = _task(1), _task(2, predictions=[{"id": 7, "model_version": "champion-3"}])
    _deliver(
        store, task1,
        _annotation(1, 101, 1, "2026-01-01T10:00:00Z", ground_truth=True),
        _annotation(2, 102, 2, "2026-01-01T11:00:00Z"),
    )
    _deliver(
        store, task2,
        _annotation(1, 201, 1, "2026-01-02T09:00:00Z", parent_prediction=7, updated_by=None),
        action="ANNOTATIONS_CREATED",
    )
    vid = store.video_id("case07")
    store.record_annotation(  # a napari correction of a propagated mask, on the same frame as task 1
        vid, 0, "segmentation", random_mask(np.random.default_rng(1), 64, 96, border=False),
        source="napari", author="dr-smith", updated_at="2026-01-03T08:00:00Z",
        provenance=Provenance.started_from("propagation-from-4"),
    )
    before = live_label_state(store)
    out = tmp_path / "export.json"
    export_label_studio(store, out, annotations=True, label_config=CFG, predictions=False)
    tasks = {t["data"]["frame_index"]: t for t in json.loads(out.read_text())}
    frame0 = tasks[0]["annotations"]
    assert [(a.get("completed_by"), a[EXPORT_KEY]["author"], a["ground_truth"]) for a in frame0] == [
        (1, "ls-user:1", True), (2, "ls-user:2", False), (None, "dr-smith", False)
    ]
    assert [a.get("id") for a in frame0] == [101, 102, None]
    assert frame0[2][EXPORT_KEY] == {
        "source": "napari", "author": "dr-smith", "from_prediction": True,
        "model_version": "propagation-from-4", "reviewed": True,
    }
    (made,) = tasks[1]["annotations"]
    assert made[EXPORT_KEY]["reviewed"] is False and made[EXPORT_KEY]["model_version"] == "champion-3"
    # into the same store: nothing new
    again = import_label_studio(store, out, label_config=CFG)
    assert again.counts["new revisions"] == 0 and live_label_state(store) == before
    # into an empty store: the same labels, authors, provenance and the same choice of what trains
    fresh_url = f"sqlite:///{tmp_path / 'fresh.db'}"
    with LabelStore(fresh_url, migrate=True) as fresh:
        import_label_studio(fresh, out, label_config=CFG)
        assert live_label_state(fresh) == before
        back = tmp_path / "back.json"
        export_label_studio(fresh, back, annotations=True, label_config=CFG, predictions=False)
        assert json.loads(back.read_text()) == json.loads(out.read_text())


@pytest.mark.parametrize(
    ("meta", "problem"),
    [
        ("napari", "is not an object"),
        ({"source": "spreadsheet"}, "is not one of"),
        ({"source": "napari", "author": 7}, "must be a string"),
        ({"source": "napari", "model_version": "v" * 201}, "must be a string"),
        ({"source": "napari", "reviewed": "yes"}, "true or false"),
        ({"source": "napari", "reviewed": False}, "contradictory"),
    ],
)
def test_a_tampered_export_is_refused_and_writes_nothing(store, tmp_path, meta, problem):
    task = _task(1)
    task["annotations"] = [_annotation(1, 101, 1, "2026-01-01T10:00:00Z", **{EXPORT_KEY: meta})]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([task]))
    with pytest.raises(DatasetFormatError, match=problem) as err:
        import_label_studio(store, path, label_config=CFG)
    assert "task 1 annotation 101" in err.value.message and EXPORT_KEY in err.value.hint
    assert store.stats()["annotations"]["revisions"] == 0


def test_webhooks_never_take_provenance_from_the_export_key(store):
    """Only an import trusts our export's key: a webhook body saying "napari" is still Label Studio's."""
    ann = _annotation(1, 101, 1, "2026-01-01T10:00:00Z", **{EXPORT_KEY: {"source": "napari", "author": "x"}})
    _deliver(store, _task(1), ann)
    labels = store.live_labels("segmentation")
    assert {(r.source, r.author) for r in labels} == {("label-studio", "ls-user:1")}


def test_splits_are_given_at_entry_by_video_whatever_the_order(store_url, tmp_path):
    forward = tmp_path / "forward.json"
    tasks = [t for t in EXPORT if t["annotations"]]
    forward.write_text(json.dumps(tasks))
    backward = tmp_path / "backward.json"
    backward.write_text(json.dumps(tasks[::-1]))
    with LabelStore(store_url, migrate=True) as st:
        import_label_studio(st, forward, label_config=CFG)
        splits = {v["path"]: v["split"] for v in st.videos()}
        assert splits and splits == {p: split_for_video(p) for p in splits}
        assert {p: st.video_split(p) for p in splits} == splits
        import_label_studio(st, backward, label_config=CFG)  # a re-import changes no split
        assert {v["path"]: v["split"] for v in st.videos()} == splits
        st.set_split(st.video_id("case07"), "final")  # a split given by hand wins, and stays
        st.add_video("case07", 25.0)
        assert st.video_split("case07") == "final"
        assert st.video_split("never-seen") == split_for_video("never-seen")  # what it will get at entry
    with LabelStore(f"sqlite:///{tmp_path / 'other.db'}", migrate=True) as other:
        import_label_studio(other, backward, label_config=CFG)
        assert {v["path"]: v["split"] for v in other.videos()} == splits


def test_split_rule_shares_and_fractions():
    from surgenet_assist.core.errors import UsageError

    paths = [f"/archive/site{s}/case{k:04d}.mp4" for s in range(4) for k in range(2500)]
    names = ("train", "val", "test", "final")
    shares = {s: sum(split_for_video(p) == s for p in paths) / len(paths) for s in names}
    # 10,000 videos: each share within 1.5 points of 60/15/15/10 (binomial sd <= 0.5 points)
    assert shares == pytest.approx({"train": 0.6, "val": 0.15, "test": 0.15, "final": 0.1}, abs=0.015)
    assert {split_for_video(p, (0.7, 0.15, 0.15)) for p in paths[:500]} == {"train", "val", "test"}
    with pytest.raises(UsageError, match="split fractions"):
        split_for_video("x", (1.0, -0.5, 0.5))


def test_upgrade_gives_old_videos_a_split_and_old_labels_the_plain_provenance(store_url):
    upgrade(store_url, "0002")
    engine = sa.create_engine(store_url)
    now = "2026-01-01 12:00:00"
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO projects (name, created_at) VALUES ('default', :t)"), {"t": now})
        for path, split in (("old.mp4", None), ("kept.mp4", "test")):
            conn.execute(
                sa.text(
                    "INSERT INTO videos (project_id, path, split, created_at) "
                    "SELECT id, :p, :s, :t FROM projects WHERE name = 'default'"
                ),
                {"p": path, "s": split, "t": now},
            )
        conn.execute(
            sa.text(
                "INSERT INTO annotations (project_id, key, video_id, frame_start, frame_end, task, source, "
                "created_at) SELECT v.project_id, 'k', v.id, 0, 0, 'cvs', 'import', :t FROM videos v "
                "WHERE v.path = 'old.mp4'"
            ),
            {"t": now},
        )
        conn.execute(
            sa.text(
                "INSERT INTO annotation_revisions (annotation_id, revision, payload, digest, deleted, "
                "author, source, updated_at, recorded_at) "
                "SELECT id, 1, :p, 'd', false, 'dr', 'import', :t, :t FROM annotations"
            ),
            {"p": json.dumps({"values": [1.0, 0.0, 1.0], "raters": None}), "t": now},
        )
    engine.dispose()
    assert upgrade(store_url) == head_revision()
    with LabelStore(store_url) as st:
        assert {v["path"]: v["split"] for v in st.videos()} == {
            "old.mp4": split_for_video("old.mp4"), "kept.mp4": "test"
        }
        (label,) = st.training_labels("cvs")
        assert label.provenance == Provenance() and label.payload["values"] == [1.0, 0.0, 1.0]


def test_ls_sync_reads_again_an_annotation_whose_provenance_alone_changed(store):
    """A star, or a first look at a pre-filled annotation, changes no result: the sync must not skip it."""
    from surgenet_assist.core.label_studio_sync import reconcile_label_studio

    task = _task(2, predictions=[{"id": 7, "model_version": "champion-3"}])
    made = _annotation(1, 301, 1, "2026-01-04T09:00:00Z", parent_prediction=7, updated_by=None)

    def sync(*annotations):
        tasks = [{**task, "annotations": list(annotations)}]
        return reconcile_label_studio(store, tasks, annotation_exists=lambda _: True, label_config=CFG)

    sync(made)
    assert store.training_labels("segmentation") == []
    assert sync(made).counts.get("new revisions", 0) == 0  # nothing changed: skipped
    sync({**made, "updated_by": 1, "ground_truth": True})  # someone starred it: same result, same time
    (label,) = store.training_labels("segmentation")
    assert label.provenance == Provenance(True, "champion-3", reviewed=True, ground_truth=True)


def test_provenance_from_odd_label_studio_fields():
    """What a malformed body or an older server sends never breaks the translator: no crash, no invented
    version, the store's column width kept."""
    from surgenet_assist.core.formats.label_studio import ls_provenance

    assert ls_provenance({"ground_truth": "yes"}, {}) == Provenance()  # only a JSON true is a star
    unknown = Provenance(True, None, reviewed=False)
    assert ls_provenance({"parent_prediction": 3}, {"predictions": 5}) == unknown
    assert ls_provenance({"parent_prediction": "x", "lead_time": 0.0}, {"predictions": [{"id": "y"}]}) == (
        Provenance(True, None, reviewed=True)
    )
    long = {"parent_prediction": {"id": 1, "model_version": "v" * 500}, "updated_by": 2}
    assert ls_provenance(long, {}).model_version == "v" * 200
    assert ls_provenance({"parent_prediction": True}, {}) == Provenance()  # a bool is no prediction id
