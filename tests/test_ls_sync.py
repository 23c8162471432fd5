"""Reconciliation (`ls sync`): after it, the store's current Label Studio labels of a project equal what
Label Studio holds, whatever webhooks were lost; it is idempotent and leaves labels of other tools alone.

Tasks and annotations are Label Studio's own export of real projects (tests/fixtures/label_studio); the
live server run is in tests/integration/test_label_studio_deploy.py.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
from ls_semantics import assert_same_annotations, fixture
from store_helpers import store_url  # noqa: F401 - fixture (SQLite and PostgreSQL)

from surgenet_assist.backend.sync import connected_projects
from surgenet_assist.core.formats.label_studio import export_label_studio
from surgenet_assist.core.label_studio_sync import apply_annotation, reconcile_label_studio
from surgenet_assist.core.store import LabelStore

P = "label-studio-1"


@pytest.fixture
def store(store_url):  # noqa: F811
    s = LabelStore(store_url, project=P, migrate=True)
    yield s
    s.close()


def _export(store, tmp_path, kind):
    out = tmp_path / f"{kind}.json"
    cfg, tasks = fixture(f"{kind}_config.xml"), fixture(f"{kind}_export.json")
    export_label_studio(store, out, annotations=True, label_config=cfg, tasks=tasks)
    return json.loads(out.read_text())


def _sync(store, tasks, kind="image"):
    return reconcile_label_studio(store, tasks, label_config=fixture(f"{kind}_config.xml"), project=P).counts


def test_sync_builds_what_label_studio_holds_and_a_second_sync_changes_nothing(store, tmp_path):
    tasks = fixture("image_export.json")
    counts = _sync(store, tasks)
    assert counts["new revisions"] > 0 and counts["tombstoned (gone from Label Studio)"] == 0
    assert_same_annotations(_export(store, tmp_path, "image"), tasks)
    before = store.stats()["annotations"]
    again = _sync(store, tasks)
    assert again["new revisions"] == 0 and again["tombstoned (gone from Label Studio)"] == 0
    assert store.stats()["annotations"] == before


def test_sync_tombstones_deleted_annotations_and_tasks_and_restores_lost_ones(store, tmp_path):
    tasks = fixture("image_export.json")
    _sync(store, tasks)
    labelled = [t for t in tasks if any(not a.get("was_cancelled") for a in t["annotations"])]
    assert len(labelled) >= 2
    now = copy.deepcopy(tasks)
    gone_task = labelled[0]["id"]
    now = [t for t in now if t["id"] != gone_task]  # a task deleted in Label Studio (no annotation event)
    target = next(t for t in now if t["id"] == labelled[1]["id"])
    target["annotations"] = []  # an annotation deleted, or turned into a draft
    counts = _sync(store, now)
    assert counts["tombstoned (gone from Label Studio)"] > 0
    exported = _export(store, tmp_path, "image")
    assert all(not t["annotations"] for t in exported if t.get("id") in (gone_task, labelled[1]["id"]))
    assert_same_annotations([t for t in exported if t.get("id") != gone_task], now)
    # the webhook for a re-created annotation was lost: a sync brings it back, current again
    counts = _sync(store, tasks)
    assert counts["new revisions"] > 0
    assert_same_annotations(_export(store, tmp_path, "image"), tasks)


def test_sync_keeps_unreadable_annotations_and_other_tools_labels(store):
    tasks = fixture("image_export.json")
    _sync(store, tasks)
    vid = store.videos()[0]["id"]
    mask = np.ones((8, 8), np.uint8)
    store.record_annotation(vid, 40, "segmentation", mask, source="napari", author="dr-a")
    bad = copy.deepcopy(tasks)
    ann = next(a for t in bad for a in t["annotations"] if a["result"] and not a.get("was_cancelled"))
    region = next(r for r in ann["result"] if r["type"] == "brushlabels")
    region["value"]["brushlabels"] = ["Suturing needle"]  # a label the schema does not know
    ann["updated_at"] = "2031-01-01T00:00:00Z"  # edited in Label Studio since the last sync
    before = store.stats()["annotations"]["total"]
    rep = reconcile_label_studio(store, bad, label_config=fixture("image_config.xml"), project=P)
    assert any("Suturing needle" in reason for _, reason in rep.skipped)
    assert rep.counts["tombstoned (gone from Label Studio)"] == 0  # the unreadable one keeps its labels
    assert store.stats()["annotations"]["total"] == before
    assert store.label_for(vid, 40, "segmentation").source == "napari"  # never touched by a sync


def test_apply_annotation_is_one_transaction(store, monkeypatch):
    """A failure while writing an annotation's labels leaves the store as it was (no half update)."""
    tasks = fixture("image_export.json")
    task = next(t for t in tasks if any(a["result"] for a in t["annotations"]))
    ann = next(a for a in task["annotations"] if a["result"])
    cfg = fixture("image_config.xml")
    apply_annotation(store, ann, task, label_config=cfg, project=P)
    before = store.stats()["annotations"]
    newer = copy.deepcopy(ann)
    newer["updated_at"] = "2030-01-01T00:00:00Z"
    newer["result"] = [r for r in newer["result"] if r["type"] == "brushlabels"]  # drops CVS and phase

    from surgenet_assist.core.store.writer import Writer

    real = Writer.tombstone_ls_labels

    def failing(self, *a, **kw):
        real(self, *a, **kw)
        raise RuntimeError("database went away half-way")

    monkeypatch.setattr(Writer, "tombstone_ls_labels", failing)
    with pytest.raises(Exception, match="half-way"):
        apply_annotation(store, newer, task, label_config=cfg, project=P)
    assert store.stats()["annotations"] == before
    monkeypatch.setattr(Writer, "tombstone_ls_labels", real)
    out = apply_annotation(store, newer, task, label_config=cfg, project=P)
    assert out["tombstoned"] >= 1 and store.stats()["annotations"]["revisions"] > before["revisions"]


def test_connected_projects_are_the_label_studio_store_projects(store):
    LabelStore(store.url, project="label-studio-12", migrate=False).ensure_project()
    LabelStore(store.url, project="cholec80", migrate=False).ensure_project()
    store.ensure_project()
    assert connected_projects(store) == [1, 12]
