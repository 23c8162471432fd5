"""Label store guarantees, each on SQLite and PostgreSQL (``store_url`` is parametrized over both)."""
# ruff: noqa: F811  (fixtures imported from store_helpers are parameters of the tests below)

from __future__ import annotations

import numpy as np
import pytest
import sqlalchemy as sa
from sqlalchemy import event
from store_helpers import random_mask, store, store_url, write_cholecseg8k  # noqa: F401 - fixtures

from surgenet_assist.core.errors import SchemaError, StoreError
from surgenet_assist.core.store import LabelStore, upgrade
from surgenet_assist.core.store.migrations import head_revision
from surgenet_assist.core.store.models import AnnotationRevision, Base


def _seg(seed: int = 0) -> np.ndarray:
    return random_mask(np.random.default_rng(seed))


def test_migration_creates_exactly_the_orm_schema(store_url):
    """The Alembic migration (not create_all) builds the schema, and it matches the ORM classes."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    assert upgrade(store_url) == head_revision()
    assert upgrade(store_url) == head_revision()  # idempotent
    engine = sa.create_engine(store_url)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        tables = set(sa.inspect(conn).get_table_names())
    engine.dispose()
    assert diff == []
    assert {"annotations", "annotation_revisions", "predictions", "model_versions", "frames"} <= tables


def test_sqlite_pragmas(tmp_path):
    st = LabelStore(f"sqlite:///{tmp_path / 'p.db'}", migrate=True)
    with st.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 1000
    st.close()


def test_default_url_is_sqlite_in_data_dir_and_env_overrides(_isolated_home, tmp_path, monkeypatch):
    st = LabelStore(migrate=True)
    assert st.url == f"sqlite:///{_isolated_home / 'surgenet-assist.db'}"
    assert (_isolated_home / "surgenet-assist.db").exists()
    st.close()
    monkeypatch.setenv("SURGENET_ASSIST_DB_URL", f"sqlite:///{tmp_path / 'env.db'}")
    st = LabelStore(migrate=True)
    assert st.url.endswith("env.db")
    st.close()


def test_same_label_studio_annotation_twice_is_one_revision(store):
    v = store.add_video("video01", 25, 1000)
    kw = dict(
        source="label-studio",
        ls_task_id=3,
        ls_annotation_id=11,
        author="a@x",
        updated_at="2024-05-01T10:00:00Z",
    )
    first = store.record_annotation(v, 7, "segmentation", _seg(1), **kw)
    again = store.record_annotation(v, 7, "segmentation", _seg(1), **kw)
    assert first.created and not again.created
    assert again.revision_id == first.revision_id
    assert len(store.history(first.annotation_id)) == 1
    assert store.stats()["annotations"]["revisions"] == 1


def test_redelivery_without_timestamp_is_idempotent(store):
    v = store.add_video("video01")
    a = store.record_annotation(v, 1, "cvs", [1, 0, 0.5], source="napari", author="dr")
    b = store.record_annotation(v, 1, "cvs", [1, 0, 0.5], source="napari", author="dr")
    c = store.record_annotation(v, 1, "cvs", [1, 1, 0.5], source="napari", author="dr")
    assert a.created and not b.created and c.created and c.revision == 2


def test_out_of_order_updates_keep_the_newest(store):
    v = store.add_video("video01")
    new, old = _seg(2), _seg(3)
    kw = dict(source="label-studio", ls_annotation_id=5)
    r_new = store.record_annotation(v, 3, "segmentation", new, updated_at="2024-05-02T00:00:00Z", **kw)
    r_old = store.record_annotation(v, 3, "segmentation", old, updated_at="2024-05-01T00:00:00Z", **kw)
    assert r_new.current and r_old.created and not r_old.current
    labels = store.training_labels("segmentation")
    assert len(labels) == 1
    np.testing.assert_array_equal(labels[0].payload["mask"], new)
    assert [h.revision for h in store.history(r_new.annotation_id)] == [2, 1]  # ordered by time


def test_update_keeps_old_revision_and_delete_is_a_tombstone(store):
    v = store.add_video("video01")
    kw = dict(source="label-studio", ls_annotation_id=9)
    r1 = store.record_annotation(v, 0, "phase", "Preparation", updated_at="2024-01-01T00:00:00", **kw)
    r2 = store.record_annotation(
        v, 0, "phase", "Clipping and Cutting", updated_at="2024-01-02T00:00:00", **kw
    )
    assert r2.revision == 2
    assert store.training_labels("phase")[0].payload == {"phase": "ClippingCutting"}
    tomb = store.delete_annotation(v, 0, "phase", updated_at="2024-01-03T00:00:00", **kw)
    assert tomb is not None and tomb.created
    assert store.training_labels("phase") == []
    hist = store.history(r1.annotation_id)
    assert [h.deleted for h in hist] == [False, False, True]
    assert hist[0].payload == {"phase": "Preparation"}
    assert store.stats()["annotations"]["deleted"] == 1
    # deleting something never stored is a no-op, not an error
    assert store.delete_annotation(v, 5, "phase", source="label-studio", ls_annotation_id=77) is None


def test_human_labels_win_over_predictions(store):
    v = store.add_video("video01")
    pred_mask, human_mask = _seg(4), _seg(5)
    store.add_prediction(v, 10, "segmentation", pred_mask, model_version="m1", uncertainty=0.7)
    store.add_prediction(
        v, 11, "cvs", [0.9, 0.1, 0.2], model_version="m1", probabilities=np.array([0.9, 0.1, 0.2])
    )
    assert store.label_for(v, 10, "segmentation").origin == "model"
    assert store.training_labels("segmentation") == []  # predictions are never training labels
    store.record_annotation(v, 10, "segmentation", human_mask, source="napari", author="dr")
    shown = store.label_for(v, 10, "segmentation")
    assert shown.origin == "human"
    np.testing.assert_array_equal(shown.payload["mask"], human_mask)
    # a later prediction does not displace the human label
    store.add_prediction(v, 10, "segmentation", pred_mask, model_version="m2")
    assert store.label_for(v, 10, "segmentation").origin == "human"
    preds = store.predictions_for(v, task="segmentation")
    assert [p.model_version for p in preds] == ["m2"]
    assert len(store.predictions_for(v, latest=False)) == 3
    assert store.predictions_for(v, task="cvs")[0].probabilities == [0.9, 0.1, 0.2]


def test_newest_human_label_across_annotators_wins(store):
    v = store.add_video("video01")
    store.record_annotation(
        v, 2, "cvs", [1, 0, 0], source="label-studio", ls_annotation_id=1, updated_at="2024-01-01T00:00:00Z"
    )
    store.record_annotation(
        v, 2, "cvs", [1, 1, 1], source="napari", author="dr", updated_at="2024-01-05T00:00:00Z"
    )
    labels = store.training_labels("cvs")
    assert len(labels) == 1 and labels[0].payload["values"] == [1, 1, 1] and labels[0].source == "napari"


def test_split_filter_and_phase_ranges(store):
    a = store.add_video("video01", 25, 100, split="train")
    b = store.add_video("video02", 25, 100, split="test")
    store.record_annotation(
        a,
        0,
        "phase",
        {"segments": [[0, 49, "Preparation"], [50, 99, 1]]},
        frame_end=99,
        source="import",
        author="cholec80",
    )
    store.record_annotation(
        b, 0, "phase", {"segments": [[0, 99, "Preparation"]]}, frame_end=99, source="import"
    )
    store.record_annotation(a, 60, "phase", "Gallbladder Dissection", source="napari", author="dr")
    assert {r.video_path for r in store.training_labels("phase", "train")} == {"video01"}
    assert {r.video_path for r in store.training_labels("phase", "test")} == {"video02"}
    store.set_split(a, "val", frames=[60])
    assert [r.frame_start for r in store.training_labels("phase", "val")] == [60]
    per_frame = store.phase_labels(a)
    assert per_frame.shape == (100,)
    assert (per_frame[:50] == 0).all() and per_frame[60] == 3 and per_frame[59] == 1 and per_frame[99] == 1


def test_invalid_payloads_raise_schema_errors_and_write_nothing(store):
    v = store.add_video("video01")
    bad = _seg(6)
    bad[3, 3] = 40
    with pytest.raises(SchemaError, match="40"):
        store.record_annotation(v, 0, "segmentation", bad, source="napari")
    with pytest.raises(SchemaError, match="unknown phase"):
        store.record_annotation(v, 0, "phase", "Suturing", source="napari")
    with pytest.raises(SchemaError, match=r"\[0, 1\]"):
        store.record_annotation(v, 0, "cvs", [0.2, 1.5, 0], source="napari")
    with pytest.raises(SchemaError, match="unknown task"):
        store.add_prediction(v, 0, "tools", {}, model_version="m")
    with pytest.raises(StoreError, match="source"):
        store.record_annotation(v, 0, "cvs", [0, 0, 0], source="excel")
    with pytest.raises(StoreError, match="no video"):
        store.record_annotation(v + 100, 0, "cvs", [0, 0, 0], source="napari")
    s = store.stats()
    assert s["annotations"]["revisions"] == 0 and s["predictions"]["total"] == 0 and s["frames"] == 0


def test_crash_mid_import_leaves_nothing_half_written(store, tmp_path):
    """The 3rd revision insert of an import fails: nothing of it is stored, earlier data is intact."""
    from surgenet_assist.core.formats.cholecseg8k import import_cholecseg8k

    v = store.add_video("video99")
    earlier = store.record_annotation(v, 1, "cvs", [1, 0, 0], source="napari", author="dr")
    rng = np.random.default_rng(0)
    write_cholecseg8k(tmp_path / "ds", {("video01", n): random_mask(rng) for n in (80, 81, 82, 83)})
    calls = {"n": 0}

    def explode(mapper, connection, target):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated crash")

    event.listen(AnnotationRevision, "before_insert", explode)
    try:
        with pytest.raises(RuntimeError, match="simulated crash"):
            import_cholecseg8k(store, tmp_path / "ds")
    finally:
        event.remove(AnnotationRevision, "before_insert", explode)
    assert calls["n"] == 3  # two rows were inserted before the crash, then rolled back
    s = store.stats()
    assert s["videos"] == 1 and s["annotations"]["total"] == 1 and s["annotations"]["revisions"] == 1
    assert store.video_id("video01") is None
    assert store.history(earlier.annotation_id)[0].payload["values"] == [1, 0, 0]
    report = import_cholecseg8k(store, tmp_path / "ds")  # the same import succeeds afterwards
    assert report.counts["new revisions"] == 4


def test_unreachable_database_is_a_clear_error(tmp_path):
    with pytest.raises(StoreError) as info:
        LabelStore("postgresql+psycopg://bob:s3cret@127.0.0.1:1/nowhere")
    assert "s3cret" not in str(info.value) and "***" in info.value.message
    assert "127.0.0.1:1" in info.value.message and info.value.hint
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StoreError, match="cannot|unable"):
        LabelStore(f"sqlite:///{blocker / 'sub' / 'db.sqlite'}", migrate=True)
    with pytest.raises(StoreError, match="unsupported"):
        LabelStore("mysql://u@localhost/db")


def test_refuses_old_schema_without_upgrade(tmp_path):
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    sa.create_engine(url).connect().close()
    with pytest.raises(StoreError, match="db upgrade"):
        LabelStore(url)
    assert upgrade(url) == head_revision()
    LabelStore(url).close()  # migrated: opens without migrate=True


def test_registry_training_runs_and_acquisition_queue(store):
    store.register_model_version(
        "seg-1", task="segmentation", bundle_path="/b/1", bundle_hash="h1", metrics={"miou": np.float32(0.5)}
    )
    store.register_model_version("seg-2", task="segmentation", bundle_hash="h2")
    assert store.register_model_version("seg-1", task="segmentation", bundle_hash="h1") > 0
    with pytest.raises(StoreError, match="another bundle"):
        store.register_model_version("seg-1", bundle_hash="other")
    store.set_model_status("seg-1", "champion")
    store.set_model_status("seg-2", "champion")
    status = {m["version"]: m["status"] for m in store.model_versions("segmentation")}
    assert status == {"seg-1": "previous-champion", "seg-2": "champion"}
    with pytest.raises(StoreError):
        store.set_model_status("nope", "champion")
    run = store.record_training_run(
        model_version="seg-2",
        task="segmentation",
        metrics={"miou": 0.6},
        num_labels=3,
        max_revision_id=store.label_version(),
    )
    assert store.training_runs("segmentation")[0]["id"] == run

    v = store.add_video("video01")
    n = store.save_acquisition_scores(
        [(v, 1, 0.2), (v, 2, 0.9), (v, 3, 0.5)], task="segmentation", method="entropy", model_version="seg-2"
    )
    assert n == 3
    store.save_acquisition_scores(
        [(v, 1, 0.95)], task="segmentation", method="entropy", model_version="seg-2"
    )
    assert [q.frame_index for q in store.acquisition_queue("segmentation")] == [1, 2, 3]
    store.record_annotation(v, 2, "segmentation", _seg(7), source="label-studio", ls_annotation_id=1)
    assert [q.frame_index for q in store.acquisition_queue("segmentation", limit=5)] == [1, 3]
    assert len(store.acquisition_queue("segmentation", exclude_labelled=False)) == 3


def test_stats_counts_per_task_and_source(store):
    v = store.add_video("video01")
    store.ensure_frames(v, range(5))
    store.record_annotation(v, 0, "segmentation", _seg(), source="label-studio", ls_annotation_id=1)
    store.record_annotation(v, 1, "segmentation", _seg(), source="napari", author="x")
    store.record_annotation(v, 1, "cvs", [0, 0, 1], source="import", author="endoscapes")
    store.add_prediction(v, 3, "cvs", [0, 0, 1], model_version="m")
    s = store.stats()
    assert s["videos"] == 1 and s["frames"] == 5
    assert s["annotations"]["by_task"] == {"segmentation": 2, "cvs": 1}
    assert s["annotations"]["by_source"] == {"label-studio": 1, "napari": 1, "import": 1}
    assert s["predictions"]["by_task"] == {"cvs": 1}


def test_video_content_hash_conflict(store):
    store.add_video("video01", 25, 10, "aaaa")
    assert store.add_video("video01", 25, 20, "aaaa") == store.add_video("video01")
    assert store.videos()[0]["frame_count"] == 20
    with pytest.raises(StoreError, match="content hash"):
        store.add_video("video01", content_hash="bbbb")


def test_label_records_carry_annotation_and_revision_ids(tmp_path):
    """Regression: records must not swap annotation_id and revision_id."""
    from surgenet_assist.core.store import LabelStore

    store = LabelStore(f"sqlite:///{tmp_path / 'ids.db'}", migrate=True)
    vid = store.add_video("v.mp4", fps=1, frame_count=10)
    # a first, unrelated annotation so that revision ids and annotation ids diverge
    store.record_annotation(vid, 0, "phase", {"phase": "Preparation"}, source="napari", author="a")
    first = store.record_annotation(vid, 1, "phase", {"phase": "Preparation"}, source="napari", author="a")
    second = store.record_annotation(
        vid, 1, "phase", {"phase": "ClippingCutting"}, source="napari", author="a"
    )
    assert second.annotation_id == first.annotation_id and second.revision_id != first.revision_id
    history = store.history(first.annotation_id)
    assert [h.annotation_id for h in history] == [first.annotation_id] * 2
    assert [h.revision_id for h in history] == [first.revision_id, second.revision_id]
    current = [r for r in store.training_labels("phase", video_id=vid) if r.frame_start == 1]
    assert current[0].annotation_id == first.annotation_id and current[0].revision_id == second.revision_id
    store.close()


def test_the_training_queue_is_a_store_api(store):
    """Queue (never two queued), claim once, close what a killed cycle left running, update with checks."""
    assert store.claim_queued_run() is None
    rid, added = store.queue_training_run({"trigger": "test"})
    assert added and store.queue_training_run({"trigger": "again"}) == (rid, False)
    running = store.record_training_run(task="nightly", status="running")
    claimed = store.claim_queued_run(task="nightly")
    assert claimed is not None and claimed["id"] == rid and claimed["status"] == "running"
    assert store.claim_queued_run() is None
    assert store.close_interrupted_runs(task="nightly") == sorted([rid, running])
    store.update_training_run(rid, status="finished", metrics={"score": np.float32(0.5)})
    row = {r["id"]: r for r in store.training_runs(status="finished")}[rid]
    assert row["metrics"] == {"score": 0.5}
    with pytest.raises(StoreError, match="no column"):
        store.update_training_run(rid, colour="red")
    with pytest.raises(StoreError, match="no training run"):
        store.update_training_run(10_000, status="failed")
    with store.exclusive_lock("test") as held:
        assert held


def test_current_human_labels_and_the_labelling_queue(store):
    """The reviewers' reader ignores splits; the front-ends' queue prefers the champion's default strategy."""
    v = store.add_video("video01", 25, 100, split="test")
    store.record_annotation(v, 5, "cvs", [1, 0, 1], source="napari")
    assert store.training_labels("cvs", "train") == []
    assert [r.frame_start for r in store.current_human_labels("cvs", video_id=v)] == [5]
    assert store.current_human_labels("cvs", video_id=v) == store.training_labels("cvs", video_id=v)
    store.save_acquisition_scores([(v, 1, 0.9), (v, 5, 1.0)], task="cvs", method="entropy", model_version="")
    store.save_acquisition_scores([(v, 2, 0.4), (v, 3, 0.8)], task="cvs", method="hybrid", model_version="m1")
    store.save_acquisition_scores([(v, 4, 1.0)], task="cvs", method="hybrid", model_version="m2")
    assert [q.frame_index for q in store.labelling_queue("cvs")] == [4, 3, 2]  # no champion: any version
    store.register_model_version("m1", task="cvs")
    store.set_model_status("m1", "champion")
    assert [q.frame_index for q in store.labelling_queue("cvs")] == [3, 2]  # the champion's rows
    assert [q.frame_index for q in store.labelling_queue("cvs", "entropy")] == [1]  # frame 5 is labelled
    assert [q.frame_index for q in store.labelling_queue("cvs", "entropy", exclude_labelled=False)] == [5, 1]
