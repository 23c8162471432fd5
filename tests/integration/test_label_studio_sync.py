"""`ls sync` against a real Label Studio 1.23 started with ``TASK_API_PAGE_SIZE_MAX=2``: it lowers every
page to two tasks without saying so, the way a deployment that sets it does.

Between page 1 and page 2 of a sync, an annotation already read is updated and one is added to a read task,
both delivered as webhooks; a read task and an unread one are deleted, their webhooks lost. The sync must read
every task (a short page is not the end, a delete shifts nothing), keep what the webhooks wrote, and tombstone
only what Label Studio answers 404 for; the next sync makes the store equal Label Studio, and the one after
changes nothing. On SQLite and PostgreSQL.
"""

from __future__ import annotations

from typing import Any

import pytest
from ls_live import TOKEN, choices, export, label_studio
from store_helpers import store_url  # noqa: F401 - fixture (SQLite and PostgreSQL)

from surgenet_assist.backend.ls_api import LabelStudioAPI
from surgenet_assist.backend.sync import sync_project
from surgenet_assist.core.formats.label_studio import LabelStudioTranslator
from surgenet_assist.core.formats.ls_config import image_config
from surgenet_assist.core.label_studio_sync import ingest_webhook
from surgenet_assist.core.store import LabelStore

pytestmark = pytest.mark.slow
GONE = "tombstoned (gone from Label Studio)"


@pytest.fixture(scope="module")
def capped_server(tmp_path_factory, label_studio_installed):
    with label_studio(tmp_path_factory.mktemp("ls-sync"), extra_env={"TASK_API_PAGE_SIZE_MAX": "2"}) as srv:
        yield srv


@pytest.fixture(scope="module")
def ls(capped_server):
    from label_studio_sdk import LabelStudio

    return LabelStudio(base_url=capped_server["url"], api_key=TOKEN)


class PagedAPI(LabelStudioAPI):
    """The real client, with a hook run after the consumer has taken ``n`` tasks and before the client reads
    on (with two tasks a page: between two page requests)."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.hooks: dict[int, Any] = {}

    def tasks(self, project_id: int, page_size: int = 100):
        inner, taken = super().tasks(project_id, page_size), 0
        while True:
            if taken in self.hooks:
                self.hooks.pop(taken)()
            try:
                task = next(inner)
            except StopIteration:
                return
            taken += 1
            yield task


def _phase(name: str, cvs: list[str]) -> list[dict[str, Any]]:
    return [choices("p", "phase", [name]), choices("c", "cvs", cvs)]


def _expected(server: dict[str, Any], pid: int) -> set[tuple]:
    """Every label of every annotation Label Studio exports now, as the store must hold it live."""
    tr = LabelStudioTranslator.for_config(image_config())
    out = set()
    for task in export(server["url"], pid):
        for ann in task["annotations"]:
            labels, _ = tr.read(task, ann)
            out |= {(ann["id"], lab.video, lab.frame_start, lab.task, lab.payload.digest()) for lab in labels}
    return out


def _live(store: LabelStore) -> set[tuple]:
    paths = {v["id"]: v["path"] for v in store.videos()}
    return {
        (
            c.annotation.ls_annotation_id,
            paths[c.annotation.video_id],
            c.annotation.frame_start,
            c.annotation.task,
            c.digest,
        )
        for c in store.transaction(lambda w: w.current_ls_labels())
    }


def _webhook(api: LabelStudioAPI, action: str, ann_id: int, pid: int) -> dict[str, Any]:
    """What Label Studio posts for an annotation event, built from what it holds (raw URIs, as it sends)."""
    ann = api.annotation(ann_id)
    task = api.get(f"/api/tasks/{ann['task']}/", what="read task", resolve_uri="false")
    return {
        "action": action,
        "annotation": ann,
        "task": task,
        "project": {"id": pid, "label_config": image_config()},
    }


def test_sync_reads_every_capped_page_and_loses_no_live_label_to_a_racing_webhook_or_delete(
    capped_server,
    ls,
    store_url,  # noqa: F811
):
    url = capped_server["url"]
    project = ls.projects.create(title=f"sync race {store_url.split(':')[0]}", label_config=image_config())
    pid = project.id
    data = [{"image": f"s3://surgery/case01/case01_{i:05d}.png"} for i in range(7)]
    tids = sorted(ls.projects.import_tasks(id=pid, request=data, return_task_ids=True).task_ids)
    anns = [ls.annotations.create(id=t, result=_phase("CalotTriangleDissection", ["C1"])).id for t in tids]
    name = f"label-studio-{pid}"
    store = LabelStore(store_url, project=name, migrate=True)
    api = PagedAPI(url, TOKEN)
    try:
        first = sync_project(api, store, pid)["counts"]
        assert first["tasks"] == 7 and _live(store) == _expected(capped_server, pid)  # not page 1 alone
        ls.annotations.update(id=anns[0], result=_phase("ClippingCutting", ["C1"]))  # webhook lost

        def meanwhile() -> None:
            ls.annotations.update(id=anns[0], result=_phase("GallbladderDissection", ["C1", "C2"]))
            ingest_webhook(store, _webhook(api, "ANNOTATION_UPDATED", anns[0], pid), project=name)
            added = ls.annotations.create(id=tids[0], result=_phase("Preparation", ["C3"]))
            ingest_webhook(store, _webhook(api, "ANNOTATION_CREATED", added.id, pid), project=name)
            ls.tasks.delete(id=str(tids[1]))  # read already; its TASKS_DELETED webhook lost
            ls.tasks.delete(id=str(tids[5]))  # not read yet; lost as well

        api.hooks[2] = meanwhile
        counts = sync_project(api, store, pid)["counts"]
        assert counts["tasks"] == 6  # offset pages would have skipped the task after the deleted one
        expected, held = _expected(capped_server, pid), _live(store)
        assert (
            expected <= held
        )  # the webhooks' labels are current, every annotation Label Studio holds is there
        assert {row[0] for row in held - expected} == {anns[1]}  # deleted after it was read: next time
        assert counts[GONE] == 2  # the unread deleted task's phase and CVS, after a 404
        again = sync_project(api, store, pid)["counts"]
        assert again[GONE] == 2 and _live(store) == _expected(capped_server, pid)
        version = store.label_version()
        last = sync_project(api, store, pid)["counts"]
        assert last.get("new revisions", 0) == 0 and last.get("annotations read", 0) == 0
        assert store.label_version() == version
    finally:
        api.close()
        store.close()
