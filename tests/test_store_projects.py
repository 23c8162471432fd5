"""One registry, training queue and labelling queue per store project (one store project per Label Studio
project), and the 0001 -> 0002 migration that introduced it; each on SQLite and PostgreSQL."""
# ruff: noqa: F811  (fixtures imported from store_helpers are parameters of the tests below)

from __future__ import annotations

import datetime as dt

import pytest
import sqlalchemy as sa
from store_helpers import random_mask, store_url  # noqa: F401 - fixtures

from surgenet_assist.core.errors import StoreError
from surgenet_assist.core.store import CHAMPION, INTERACTIVE_TASK, LabelStore, upgrade
from surgenet_assist.core.store.migrations import head_revision


@pytest.fixture
def stores(store_url):
    a = LabelStore(store_url, project="label-studio-1", migrate=True)
    b = LabelStore(store_url, project="label-studio-2")
    yield a, b
    a.close()
    b.close()


def _status(store, **kw):
    return {m["version"]: m["status"] for m in store.model_versions(**kw)}


def test_each_project_has_its_own_champion(stores):
    a, b = stores
    a.register_model_version("a-1", bundle_hash="ha1")
    a.register_model_version("a-2", bundle_hash="ha2")
    b.register_model_version("b-1", bundle_hash="hb1")
    a.set_model_status("a-1", CHAMPION)
    b.set_model_status("b-1", CHAMPION)
    a.set_model_status("a-2", CHAMPION)  # promoting in A demotes A's champion only
    assert _status(a) == {"a-1": "previous-champion", "a-2": "champion"}
    assert _status(b) == {"b-1": "champion"}
    assert _status(a, project="label-studio-2") == {"b-1": "champion"}  # an explicit project wins
    assert [m["project"] for m in a.model_versions()] == ["label-studio-1"] * 2
    assert len(a.model_versions(all_projects=True)) == 3
    # names stay unique across projects (bundle directories), and one project cannot promote another's
    with pytest.raises(StoreError, match="already registered in project 'label-studio-1'"):
        b.register_model_version("a-1", bundle_hash="ha1")
    with pytest.raises(StoreError, match="no model version 'a-2' in project 'label-studio-2'"):
        b.set_model_status("a-2", CHAMPION)
    assert _status(b) == {"b-1": "champion"}
    # the store's default project is untouched by both
    with LabelStore(a.url) as default:
        assert default.project == "default" and default.model_versions() == []


def test_training_runs_and_queue_per_project(stores):
    a, b = stores
    ra, added = a.queue_training_run({"trigger": "ls"})
    assert added and a.queue_training_run({"trigger": "again"}) == (ra, False)
    rb, added = b.queue_training_run({"trigger": "ls"})  # B may queue while A has one queued
    assert added and rb != ra
    assert a.queued_run_projects() == ["label-studio-1", "label-studio-2"]
    running_b = b.record_training_run(task="nightly", status="running")
    claimed = a.claim_queued_run(task="nightly")
    assert claimed is not None and claimed["id"] == ra and claimed["project"] == "label-studio-1"
    assert a.claim_queued_run() is None  # B's queued run is not A's to claim
    assert a.queued_run_projects() == ["label-studio-2"]
    assert a.claim_queued_run(project="label-studio-2")["id"] == rb
    assert a.close_interrupted_runs(task="nightly") == [ra]  # B's running run is left alone
    assert [r["id"] for r in b.training_runs(status="running")] == [rb, running_b]
    assert [r["id"] for r in a.training_runs()] == [ra]
    assert {r["project"] for r in a.training_runs(all_projects=True)} == {"label-studio-1", "label-studio-2"}


def test_labelling_queue_shows_only_the_projects_frames_and_champion(stores):
    a, b = stores
    va = a.add_video("case.mp4", 25, 100)
    vb = b.add_video("case.mp4", 25, 100)  # same path, another project: another video
    assert va != vb
    a.save_acquisition_scores([(va, 1, 0.9), (va, 2, 0.5)], task="cvs", method="hybrid", model_version="a-1")
    a.save_acquisition_scores([(va, 3, 0.1)], task="cvs", method="hybrid", model_version="a-2")
    b.save_acquisition_scores([(vb, 7, 1.0)], task="cvs", method="hybrid", model_version="b-1")
    assert [(q.video_id, q.frame_index) for q in a.labelling_queue("cvs")] == [(va, 1), (va, 2), (va, 3)]
    assert [(q.video_id, q.frame_index) for q in b.labelling_queue("cvs")] == [(vb, 7)]
    assert [q.frame_index for q in a.acquisition_queue("cvs", project="label-studio-2")] == [7]
    a.register_model_version("a-2")
    a.set_model_status("a-2", CHAMPION)
    b.register_model_version("b-1")
    b.set_model_status("b-1", CHAMPION)
    assert [q.frame_index for q in a.labelling_queue("cvs")] == [3]  # A's champion's rows
    assert [q.frame_index for q in b.labelling_queue("cvs")] == [7]
    # a learned click head has its own champion (newer, no acquisition rows): the queue stays the model's
    a.register_model_version("clicks-1", task=INTERACTIVE_TASK, bundle_path="/registry/clicks-1")
    a.set_model_status("clicks-1", CHAMPION)
    assert [q.frame_index for q in a.labelling_queue("cvs")] == [3]
    assert [r["version"] for r in a.frame_model_versions(status=CHAMPION)] == ["a-2"]
    b.record_annotation(vb, 7, "cvs", [1, 0, 1], source="napari")
    assert b.labelling_queue("cvs") == [] and len(a.labelling_queue("cvs")) == 1
    assert a.projects() == ["label-studio-1", "label-studio-2"]
    assert a.projects(with_human_labels=True) == ["label-studio-2"]


def test_upgrade_from_0001_keeps_every_row(store_url):
    """A 0001 database with registry rows, runs and labels upgrades to the head; nothing is lost, and the
    rows become the default project's."""
    assert upgrade(store_url, "0001") == "0001"
    engine = sa.create_engine(store_url)
    now = dt.datetime(2026, 1, 1, 12, 0)
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO projects (name, created_at) VALUES ('p1', :t)"), {"t": now})
        conn.execute(
            sa.text(
                "INSERT INTO videos (project_id, path, created_at) "
                "SELECT id, 'v.mp4', :t FROM projects WHERE name = 'p1'"
            ),
            {"t": now},
        )
        for version, status in (("old-1", "previous-champion"), ("old-2", "champion"), ("old-3", "rejected")):
            conn.execute(
                sa.text(
                    "INSERT INTO model_versions (version, task, bundle_path, status, created_at, updated_at) "
                    "VALUES (:v, NULL, :p, :s, :t, :t)"
                ),
                {"v": version, "p": f"/registry/{version}", "s": status, "t": now},
            )
        for status in ("finished", "queued"):
            conn.execute(
                sa.text("INSERT INTO training_runs (task, status, started_at) VALUES ('nightly', :s, :t)"),
                {"s": status, "t": now},
            )
    with pytest.raises(StoreError, match="db upgrade"):
        LabelStore(store_url)  # 0001 is not the head: refused without migrate
    assert upgrade(store_url) == head_revision()
    with engine.connect() as conn:
        names = dict(conn.execute(sa.text("SELECT id, name FROM projects")).all())
        mv = conn.execute(sa.text("SELECT version, project_id FROM model_versions ORDER BY id")).all()
        runs = conn.execute(sa.text("SELECT status, project_id FROM training_runs ORDER BY id")).all()
        videos = conn.execute(sa.text("SELECT count(*) FROM videos")).scalar()
    engine.dispose()
    assert sorted(names.values()) == ["default", "p1"]
    assert [(v, names[p]) for v, p in mv] == [(f"old-{i}", "default") for i in (1, 2, 3)]
    assert [(s, names[p]) for s, p in runs] == [("finished", "default"), ("queued", "default")]
    assert videos == 1
    with LabelStore(store_url) as st:  # the default project keeps its champion, history and queue
        assert _status(st) == {"old-1": "previous-champion", "old-2": "champion", "old-3": "rejected"}
        assert st.queued_run_projects() == ["default"]
        assert st.claim_queued_run()["status"] == "running"
        assert st.model_versions(project="p1") == []


def test_upgrade_of_an_empty_0001_database_adds_no_project(store_url):
    upgrade(store_url, "0001")
    assert upgrade(store_url) == head_revision()
    with LabelStore(store_url) as st:
        assert st.projects() == [] and st.stats()["projects"] == 0
