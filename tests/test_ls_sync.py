"""Reconciliation (`ls sync`): after it, the store's current Label Studio labels of a project equal what
Label Studio holds, whatever webhooks were lost; it is idempotent, leaves labels of other tools alone, and
never drops a live label: not when a task is deleted while it pages, not when Label Studio caps the page size,
not when a webhook writes while it runs, not when Label Studio's clock is ahead.

Tasks and annotations are Label Studio's own export of real projects (tests/fixtures/label_studio), or served
by :class:`FakeLabelStudio`, which answers the three endpoints a sync calls the way Label Studio 1.23.2's
source does (``data_manager/api.py``, ``data_manager/managers.py``: offset pages over the filtered,
id-ordered tasks, ``page_size`` silently capped at ``TASK_API_PAGE_SIZE_MAX``, ``total`` of the filtered
set, 404 past the last page; ``resolve_uri``; 404 for a gone annotation). The same races against the real
server: tests/integration/test_label_studio_sync.py.
"""

from __future__ import annotations

import base64
import copy
import json
import logging
import math
from collections import Counter
from datetime import UTC, datetime, timedelta

import httpx
import numpy as np
import pytest
import sqlalchemy as sa
from ls_semantics import assert_same_annotations, fixture
from store_helpers import store_url  # noqa: F401 - fixture (SQLite and PostgreSQL)

from surgenet_assist.backend.ls_api import LabelStudioAPI, LabelStudioToolError
from surgenet_assist.backend.sync import connected_projects, sync_project
from surgenet_assist.core.encoders import mask_to_brush_rle
from surgenet_assist.core.formats.label_studio import LabelStudioTranslator, export_label_studio
from surgenet_assist.core.formats.ls_config import image_config
from surgenet_assist.core.label_studio_sync import (
    annotations_in,
    apply_annotation,
    ingest_webhook,
    reconcile_label_studio,
)
from surgenet_assist.core.store import LabelStore

P = "label-studio-1"
GONE = "tombstoned (gone from Label Studio)"


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
    """A sync from an export, taken as Label Studio's whole state (an annotation not in it is gone)."""
    return reconcile_label_studio(
        store,
        tasks,
        annotation_exists=annotations_in(tasks),
        label_config=fixture(f"{kind}_config.xml"),
        project=P,
    ).counts


# ----------------------------------------------------------------------------------------------------------
# a faithful fake of the endpoints a sync calls
# ----------------------------------------------------------------------------------------------------------
H, W = 16, 24


def phase(name: str) -> dict:
    return {
        "id": "ph",
        "type": "choices",
        "from_name": "phase",
        "to_name": "image",
        "value": {"choices": [name]},
    }


def cvs(*keys: str) -> dict:
    return {
        "id": "cv",
        "type": "choices",
        "from_name": "cvs",
        "to_name": "image",
        "value": {"choices": list(keys)},
    }


def brush(label: str, rows: slice) -> dict:
    mask = np.zeros((H, W), np.uint8)
    mask[rows, 2:20] = 255
    return {
        "id": "br",
        "type": "brushlabels",
        "from_name": "mask",
        "to_name": "image",
        "original_width": W,
        "original_height": H,
        "value": {"format": "rle", "rle": mask_to_brush_rle(mask), "brushlabels": [label]},
    }


class FakeLabelStudio:
    """Project 1 of a Label Studio server, in memory, behind an :class:`httpx.MockTransport`."""

    def __init__(self, page_size_max: int | None = None, clock: datetime | None = None) -> None:
        self.config = image_config()
        self.page_size_max = page_size_max  # TASK_API_PAGE_SIZE_MAX
        self.tasks: dict[int, dict] = {}
        self.clock = clock or datetime(2026, 11, 30, 9, 0, tzinfo=UTC)
        self._ids = {"task": 0, "annotation": 0}
        self.hooks: dict[int, object] = {}  # n -> callable run before answering the n-th task-list request
        self.task_requests: list[dict] = []
        self.ignore_filters = False  # what a server without the data manager's filters would do
        self.fail_at: int | None = None  # answer the n-th task-list request with a 502
        self.unlisted: set[int] = set()  # tasks the list leaves out (a paging bug, a proxy's cache)

    # --- Label Studio's state, changed the way annotators and admins change it ------------------------------
    def _next(self, kind: str) -> int:
        self._ids[kind] += 1
        return self._ids[kind]

    def _tick(self) -> str:
        self.clock += timedelta(minutes=1)
        return self.clock.isoformat().replace("+00:00", "Z")

    def add_task(self, data: dict) -> int:
        tid = self._next("task")
        self.tasks[tid] = {"id": tid, "data": data, "annotations": []}
        return tid

    def annotate(self, task_id: int, result: list, *, cancelled: bool = False) -> dict:
        now = self._tick()
        ann = {
            "id": self._next("annotation"),
            "task": task_id,
            "project": 1,
            "completed_by": 1,
            "result": result,
            "was_cancelled": cancelled,
            "created_at": now,
            "updated_at": now,
        }
        self.tasks[task_id]["annotations"].append(ann)
        return ann

    def annotation(self, ann_id: int) -> dict | None:
        return next((a for t in self.tasks.values() for a in t["annotations"] if a["id"] == ann_id), None)

    def edit(self, ann_id: int, result: list, *, touch_updated_at: bool = True) -> dict:
        """An annotator's update; ``touch_updated_at=False``: /api/labels/bulk (``bulk_update``)."""
        ann = self.annotation(ann_id)
        ann["result"] = result
        if touch_updated_at:
            ann["updated_at"] = self._tick()
        return ann

    def delete_annotation(self, ann_id: int) -> None:
        for t in self.tasks.values():
            t["annotations"] = [a for a in t["annotations"] if a["id"] != ann_id]

    def delete_task(self, task_id: int) -> None:
        del self.tasks[task_id]  # its annotations go with it

    def webhook(self, action: str, ann: dict) -> dict:
        """The body Label Studio posts for an annotation event (raw URIs, like exports)."""
        task = self.serialize(self.tasks[ann["task"]], resolve=False, annotations=False)
        return {
            "action": action,
            "annotation": ann,
            "task": task,
            "project": {"id": 1, "label_config": self.config},
        }

    def serialize(self, task: dict, *, resolve: bool, annotations: bool = True) -> dict:
        out = copy.deepcopy(task)
        if not annotations:
            out.pop("annotations")
        if resolve:  # io_storages: a cloud URI becomes a link to Label Studio's own resolver
            for key, value in out["data"].items():
                if isinstance(value, str) and value.startswith("s3://"):
                    fileuri = base64.urlsafe_b64encode(value.encode()).decode()
                    out["data"][key] = f"/tasks/{task['id']}/resolve/?fileuri={fileuri}"
        return out

    def after_page(self, page: int, hook: object) -> None:
        """Run ``hook`` once the next ``page`` task-list requests are answered, before the one after."""
        self.hooks[len(self.task_requests) + page + 1] = hook

    # --- the HTTP side ------------------------------------------------------------------------------------
    def api(self) -> LabelStudioAPI:
        api = LabelStudioAPI("http://label-studio.test", "0123456789abcdef0123456789abcdef01234567")
        api._http = httpx.Client(transport=httpx.MockTransport(self.handle))
        return api

    def handle(self, request: httpx.Request) -> httpx.Response:
        path, q = request.url.path, request.url.params
        if request.method != "GET":
            return httpx.Response(405)
        if path == "/api/projects/1/":
            return httpx.Response(
                200, json={"id": 1, "label_config": self.config, "task_number": len(self.tasks)}
            )
        if path.startswith("/api/annotations/"):
            ann = self.annotation(int(path.split("/")[3]))
            return (
                httpx.Response(200, json=ann) if ann else httpx.Response(404, json={"detail": "Not found."})
            )
        if path == "/api/tasks/":
            return self._task_page(q)
        return httpx.Response(404, json={"detail": "Not found."})

    def _task_page(self, q: httpx.QueryParams) -> httpx.Response:
        self.task_requests.append(dict(q))
        n = len(self.task_requests)
        if n in self.hooks:
            self.hooks.pop(n)()
        if n == self.fail_at:
            return httpx.Response(502, text="Bad Gateway")
        if q.get("project") != "1":
            return httpx.Response(404, json={"detail": "Not found."})
        query = json.loads(q.get("query", "{}"))
        tasks = sorted(self.tasks.values(), key=lambda t: t["id"])  # order_by('id') unless told otherwise
        tasks = [t for t in tasks if t["id"] not in self.unlisted]
        if query.get("ordering") not in (None, [], ["tasks:id"]):
            return httpx.Response(
                400, json={"detail": f"the fake orders by id only, not {query['ordering']}"}
            )
        for item in (query.get("filters") or {}).get("items", []):
            if (item["filter"], item["operator"], item["type"]) != ("filter:tasks:id", "greater", "Number"):
                return httpx.Response(
                    400, json={"detail": f"the fake knows the tasks:id filter only: {item}"}
                )
            if not self.ignore_filters:
                tasks = [t for t in tasks if t["id"] > float(item["value"])]  # cast_value: float
        size = int(q.get("page_size", 100))
        if self.page_size_max:
            size = min(size, self.page_size_max)
        page = int(q.get("page", 1))
        if page > max(1, math.ceil(len(tasks) / size)):
            return httpx.Response(404, json={"detail": "Invalid page."})
        resolve = q.get("resolve_uri", "true").lower() not in ("false", "0", "no", "off")
        chunk = tasks[(page - 1) * size : page * size]
        body = {
            "total_annotations": sum(len(t["annotations"]) for t in tasks),
            "total_predictions": 0,
            "total": len(tasks),
            "tasks": [
                self.serialize(t, resolve=resolve, annotations=q.get("fields") == "all") for t in chunk
            ],
        }
        return httpx.Response(200, json=body)


def project_of(n_tasks: int, page_size_max: int | None = 2) -> FakeLabelStudio:
    """``n_tasks`` frames of case01, each with one annotation: a phase, CVS, and a mask on every other."""
    ls = FakeLabelStudio(page_size_max)
    for i in range(n_tasks):
        tid = ls.add_task({"image": f"s3://surgery/case01/case01_{i:05d}.png"})
        result = [phase("Preparation" if i % 2 else "CalotTriangleDissection"), cvs("C1")]
        if i % 2 == 0:
            result.append(brush("Liver", slice(2, 9)))
        ls.annotate(tid, result)
    return ls


def expected_labels(ls: FakeLabelStudio) -> set[tuple]:
    """What the store must hold live: every label of every annotation Label Studio holds now."""
    tr = LabelStudioTranslator.for_config(ls.config)
    out = set()
    for task in ls.tasks.values():
        for ann in task["annotations"]:
            if not ann["was_cancelled"]:
                labels, _ = tr.read(ls.serialize(task, resolve=False), ann)
                out |= {
                    (ann["id"], lab.video, lab.frame_start, lab.task, lab.payload.digest()) for lab in labels
                }
    return out


def live_labels(store: LabelStore) -> set[tuple]:
    paths = {v["id"]: v["path"] for v in store.videos(P)}
    return {
        (
            c.annotation.ls_annotation_id,
            paths[c.annotation.video_id],
            c.annotation.frame_start,
            c.annotation.task,
            c.digest,
        )
        for c in store.transaction(lambda w: w.current_ls_labels(P))
    }


def sync(ls: FakeLabelStudio, store: LabelStore) -> Counter:
    api = ls.api()
    try:
        return Counter(sync_project(api, store, 1)["counts"])
    finally:
        api.close()


# ----------------------------------------------------------------------------------------------------------
# from an export
# ----------------------------------------------------------------------------------------------------------
def test_sync_builds_what_label_studio_holds_and_a_second_sync_changes_nothing(store, tmp_path):
    tasks = fixture("image_export.json")
    counts = _sync(store, tasks)
    assert counts["new revisions"] > 0 and counts[GONE] == 0
    assert_same_annotations(_export(store, tmp_path, "image"), tasks)
    before, version = store.stats()["annotations"], store.label_version()
    again = _sync(store, tasks)
    assert again["new revisions"] == 0 and again[GONE] == 0 and again["annotations read"] == 0
    assert store.stats()["annotations"] == before and store.label_version() == version


def test_sync_tombstones_deleted_annotations_and_tasks_and_restores_lost_ones(store, tmp_path):
    tasks = fixture("image_export.json")
    _sync(store, tasks)
    labelled = [t for t in tasks if any(not a.get("was_cancelled") for a in t["annotations"])]
    assert len(labelled) >= 2
    now = copy.deepcopy(tasks)
    gone_task = labelled[0]["id"]
    now = [t for t in now if t["id"] != gone_task]  # a task deleted in Label Studio (no annotation event)
    target = next(t for t in now if t["id"] == labelled[1]["id"])
    target["annotations"] = []  # an annotation deleted
    counts = _sync(store, now)
    assert counts[GONE] > 0
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
    rep = reconcile_label_studio(
        store, bad, annotation_exists=annotations_in(bad), label_config=fixture("image_config.xml"), project=P
    )
    assert any("Suturing needle" in reason for _, reason in rep.skipped)
    assert rep.counts[GONE] == 0  # the unreadable one keeps its labels
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


# ----------------------------------------------------------------------------------------------------------
# against the fake server: paging, races, digests, clocks, URIs
# ----------------------------------------------------------------------------------------------------------
def test_keyset_paging_reads_every_task_when_label_studio_caps_the_page_size(store):
    ls = project_of(7, page_size_max=2)  # page_size=100 is asked for, 2 come back: not the end
    counts = sync(ls, store)
    assert counts["tasks"] == 7 and live_labels(store) == expected_labels(ls)
    assert len(ls.task_requests) == 4  # 2 + 2 + 2 + 1: the last page holds all the 'total' left
    for request in ls.task_requests:
        query = json.loads(request["query"])
        assert query["filters"]["items"][0]["filter"] == "filter:tasks:id" and request["page"] == "1"
        assert request["resolve_uri"] == "false" and request["fields"] == "all"


def test_sync_racing_webhooks_and_deletes_loses_no_live_label(store):
    """Between page 1 and page 2 of a sync: a read task is deleted (offset pages would shift and skip the
    next task), webhooks update an annotation already read and add one to a read task, an unread task is
    deleted. Nothing live is lost, the webhooks' labels stay current, and the deletes land."""
    ls = project_of(7, page_size_max=2)
    sync(ls, store)
    first = ls.tasks[1]["annotations"][0]["id"]
    ls.edit(first, [phase("ClippingCutting"), cvs("C1")])  # its webhook was lost: the sync reads this

    def meanwhile() -> None:
        newer = ls.edit(first, [phase("GallbladderDissection"), cvs("C1", "C2"), brush("Fat", slice(0, 4))])
        ingest_webhook(store, ls.webhook("ANNOTATION_UPDATED", newer), project=P)
        added = ls.annotate(1, [phase("Preparation")])
        ingest_webhook(store, ls.webhook("ANNOTATION_CREATED", added), project=P)
        ls.delete_task(2)  # read already; its TASKS_DELETED webhook is lost
        ls.delete_task(6)  # not read yet; lost as well

    ls.after_page(1, meanwhile)
    version = store.label_version()
    counts = sync(ls, store)
    assert counts["tasks"] == 6  # 1, 2 | 3, 4 | 5, 7: task 3 is not skipped by the delete of task 2
    held = live_labels(store)
    assert expected_labels(ls) <= held  # nothing Label Studio holds is missing, webhooks' labels included
    # task i holds annotation i: annotation 2 was deleted after it was read, annotation 6 before
    assert {row[0] for row in held - expected_labels(ls)} == {2}
    assert counts[GONE] == 2  # annotation 6 answered 404: its phase and CVS
    assert store.label_version() > version
    again = sync(ls, store)  # annotation 2 answers 404 now
    assert live_labels(store) == expected_labels(ls) and again[GONE] == 2
    version = store.label_version()
    assert sync(ls, store)["new revisions"] == 0 and store.label_version() == version


def test_a_result_change_without_updated_at_is_read(store):
    """/api/labels/bulk and the rename-labels action rewrite results with updated_at untouched."""
    ls = project_of(3)
    sync(ls, store)
    ann = ls.edit(2, [phase("ClippingCutting"), cvs("C3")], touch_updated_at=False)
    counts = sync(ls, store)
    assert counts["annotations read"] == 1 and counts["new revisions"] == 2
    assert live_labels(store) == expected_labels(ls)
    assert ann["updated_at"] == ann["created_at"]


def test_an_annotation_a_webhook_changed_since_the_last_sync_is_read_again(store):
    """v1 synced; a webhook brings v2; the annotator goes back to v1 and that webhook is lost. Label Studio's
    digest equals the one the last sync stored, but the store's live revisions do not: it must be read."""
    ls = project_of(2)
    sync(ls, store)
    v1 = copy.deepcopy(ls.annotation(1)["result"])
    v2 = ls.edit(1, [phase("ClippingCutting")])
    ingest_webhook(store, ls.webhook("ANNOTATION_UPDATED", v2), project=P)
    ls.edit(1, v1)
    counts = sync(ls, store)
    assert counts["annotations read"] == 1 and live_labels(store) == expected_labels(ls)


def test_an_annotation_a_webhook_emptied_during_the_sync_is_read_again_next_time(store):
    """The sync reads v1 of an annotation; meanwhile a webhook empties it (every label tombstoned, after the
    sync started); then the annotator restores v1 and that webhook is lost. The store's empty state must not
    be remembered as 'v1 synced'."""
    ls = project_of(3)
    sync(ls, store)
    v1 = [phase("ClippingCutting"), cvs("C2")]
    ls.edit(2, v1)

    def meanwhile() -> None:
        ingest_webhook(store, ls.webhook("ANNOTATION_UPDATED", ls.edit(2, [])), project=P)

    ls.after_page(1, meanwhile)
    sync(ls, store)
    assert {r for r in live_labels(store) if r[0] == 2} == set()  # the webhook's (newer) state stands
    ls.edit(2, v1)
    counts = sync(ls, store)
    assert counts["annotations read"] == 1 and live_labels(store) == expected_labels(ls)


def test_a_config_or_task_data_change_reads_again_and_adds_nothing_when_labels_are_the_same(store):
    ls = project_of(4)
    sync(ls, store)
    version = store.label_version()
    ls.config = ls.config.replace("<View>", "<View>\n  <!-- reviewed -->", 1)
    counts = sync(ls, store)
    assert counts["annotations read"] == 4 and counts["new revisions"] == 0
    assert store.label_version() == version
    assert sync(ls, store)["annotations read"] == 0  # read once, then skipped again
    ls.tasks[3]["data"]["image"] = "s3://surgery/case02/case02_00077.png"  # the task now shows another frame
    counts = sync(ls, store)
    assert counts["annotations read"] == 1 and live_labels(store) == expected_labels(ls)


def test_tombstone_restore_and_two_syncs_add_exactly_one_revision(store):
    ls = project_of(3)
    ls.edit(2, [phase("Preparation")])  # one label: one revision per write
    sync(ls, store)
    saved = copy.deepcopy(ls.tasks[2])
    ls.delete_task(2)
    assert sync(ls, store)[GONE] == 1
    ls.tasks[2] = saved  # what a false tombstone looks like: Label Studio holds the annotation after all
    revisions = store.stats()["annotations"]["revisions"]
    counts = sync(ls, store)
    assert counts["restored (Label Studio still holds them)"] == 1
    assert store.stats()["annotations"]["revisions"] == revisions + 1
    version = store.label_version()
    for _ in range(2):
        counts = sync(ls, store)
        assert counts["new revisions"] == 0 and counts["annotations read"] == 0
    assert store.label_version() == version and store.stats()["annotations"]["revisions"] == revisions + 1
    # with no sync state at all (a store just upgraded), the restored content is found current: no revision
    with store.engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM ls_sync_states"))
    counts = sync(ls, store)
    assert counts["annotations read"] == 3 and counts["new revisions"] == 0
    assert store.label_version() == version and live_labels(store) == expected_labels(ls)


def test_delete_wins_when_label_studios_clock_is_an_hour_ahead(store, caplog):
    ls = FakeLabelStudio(clock=datetime.now(UTC) + timedelta(hours=1))
    tid = ls.add_task({"image": "s3://surgery/case01/case01_00003.png"})
    ann = ls.annotate(tid, [phase("Preparation"), cvs("C2")])
    keep = ls.annotate(ls.add_task({"image": "s3://surgery/case01/case01_00004.png"}), [phase("Preparation")])
    sync(ls, store)
    ls.delete_annotation(ann["id"])
    with caplog.at_level(logging.WARNING, logger="surgenet_assist.core.label_studio_sync"):
        counts = sync(ls, store)
    assert counts[GONE] == 2
    assert {row[0] for row in live_labels(store)} == {keep["id"]}
    assert store.training_labels("phase", project=P)[0].frame_start == 4  # the deleted frame's is gone
    assert any("clock is" in r.getMessage() and "ahead" in r.getMessage() for r in caplog.records)
    assert sync(ls, store)[GONE] == 0


def test_cloud_uris_keep_their_frame_identity(store):
    """Label Studio rewrites s3:// to /tasks/{id}/resolve/?fileuri=... unless asked not to."""
    ls = FakeLabelStudio()
    for frame in (120, 121):
        ls.annotate(
            ls.add_task({"image": f"s3://surgery/video07/video07_frame_{frame:06d}.png"}),
            [phase("Preparation")],
        )
    sync(ls, store)
    assert [v["path"] for v in store.videos(P)] == ["video07"]
    assert sorted(r.frame_start for r in store.training_labels("phase", project=P)) == [120, 121]
    resolved = ls.serialize(ls.tasks[1], resolve=True)["data"]["image"]
    assert resolved.startswith("/tasks/1/resolve/?fileuri=")  # what the default request would have seen


def test_a_label_is_tombstoned_only_when_label_studio_answers_404_for_its_annotation(store):
    ls = project_of(4)
    sync(ls, store)
    before = live_labels(store)
    ls.unlisted = {2}  # the list misses task 2, but GET /api/annotations/2/ still finds its annotation
    ls.delete_task(3)
    rep_counts = sync(ls, store)
    assert rep_counts[GONE] == 3  # annotation 3's phase, CVS and mask
    assert {r for r in live_labels(store) if r[0] == 2} == {r for r in before if r[0] == 2}


def test_a_server_that_ignores_the_id_filter_is_refused_and_nothing_is_tombstoned(store):
    ls = project_of(5)
    sync(ls, store)
    before = live_labels(store)
    ls.ignore_filters = True  # page 2 would be page 1 again: the sync would never end
    with pytest.raises(LabelStudioToolError, match="tasks:id filter") as err:
        sync(ls, store)
    assert err.value.hint and live_labels(store) == before


def test_an_interrupted_sync_leaves_whole_annotations_and_a_rerun_finishes(store):
    ls = project_of(6)
    sync(ls, store)
    before = live_labels(store)
    for ann_id in (1, 6):  # both edited, webhooks lost: one on page 1, one on page 3
        ls.edit(ann_id, [phase("ClippingCutting"), brush("Fat", slice(5, 9))])
    ls.delete_task(3)
    ls.fail_at = len(ls.task_requests) + 3  # the request for page 3 fails
    with pytest.raises(LabelStudioToolError, match="502"):
        sync_with_batches(ls, store, batch_tasks=1)
    held = live_labels(store)
    assert {r for r in held if r[0] == 1} == {r for r in expected_labels(ls) if r[0] == 1}  # read: written
    for untouched in (3, 6):  # not tombstoned, not half-updated: a run that did not finish removes nothing
        assert {r for r in held if r[0] == untouched} == {r for r in before if r[0] == untouched}
    ls.fail_at = None
    sync(ls, store)
    assert live_labels(store) == expected_labels(ls)


def sync_with_batches(ls: FakeLabelStudio, store: LabelStore, batch_tasks: int) -> None:
    api = ls.api()
    try:
        reconcile_label_studio(
            store,
            api.tasks(1),
            annotation_exists=lambda i: api.annotation(i) is not None,
            label_config=ls.config,
            project=P,
            batch_tasks=batch_tasks,
        )
    finally:
        api.close()
