"""Webhooks as teams deploy them: Basic Auth and a webhook secret on the backend, deliveries that carry the
secret header, forged requests, floods, and every event shape Label Studio 1.23 sends (bodies from
tests/fixtures/label_studio, which a real server produced).

Label Studio's API is played by ``FakeLabelStudio``: the state those bodies came from, answered the way Label
Studio 1.23.2's data-manager list answers (``/api/tasks/?project=N&fields=all`` with the
``filter:tasks:annotations_ids`` filter or ``selectedItems``, scoped to the project, ``total``, pages capped
by ``TASK_API_PAGE_SIZE_MAX``; read from its source and checked against a real server in
tests/integration/test_label_studio_webhooks.py), plus its webhook and ML-backend lists.
"""

from __future__ import annotations

import base64
import copy
import json
import re
import threading
import time

import pytest
from ls_semantics import fixture
from test_backend import post  # noqa: F401
from webhook_helpers import deliver

from surgenet_assist.backend import webhooks as webhooks_mod
from surgenet_assist.backend.app import BackendSettings, create_app
from surgenet_assist.backend.ls_api import LabelStudioToolError
from surgenet_assist.backend.ls_webhooks import (
    SSRF_FIX,
    check_project_webhook,
    ensure_project_webhook,
    why_label_studio_refuses,
)
from surgenet_assist.backend.webhooks import SECRET_HEADER
from surgenet_assist.core.errors import UsageError
from surgenet_assist.core.formats.label_studio import LabelStudioTranslator
from surgenet_assist.core.formats.ls_config import image_config
from surgenet_assist.core.store import LabelStore

SECRET = "wh-secret-0123456789abcdef"
AUTH = {"Authorization": "Basic " + base64.b64encode(b"ml:s3cret").decode()}
SIGNED = {SECRET_HEADER: SECRET}


class FakeLabelStudio:
    """Label Studio's API over a dict of its current objects, answering the calls the backend makes."""

    url = "http://label-studio.invalid:8080"
    token_problem = None  # the token works (what /health reads through the media fetcher)

    def __init__(self, page_size_max: int | None = None) -> None:
        self.annotations: dict[int, dict] = {}
        self.tasks: dict[int, dict] = {}
        self.projects: dict[int, dict] = {}
        self.webhooks: dict[int, dict] = {}
        self.ml: dict[int, list[str]] = {}
        self.hidden: set[int] = set()  # tasks not listed yet (an import that has not committed)
        self.ssrf_protection = False
        self.page_size_max = page_size_max
        self.calls: list[tuple[str, str]] = []
        self.gate: threading.Event | None = None  # list calls wait for it (a slow Label Studio)
        self.refuse_headers = False

    def learn(self, body: dict) -> None:
        """Label Studio's state after it sent ``body`` (what its API would return)."""
        project = body["project"]
        self.projects[project["id"]] = {"id": project["id"], "label_config": project["label_config"]}
        task = dict(body["task"], project=project["id"])
        self.tasks[task["id"]] = task
        self.annotations[body["annotation"]["id"]] = dict(
            body["annotation"], task=task["id"], project=project["id"]
        )

    # --- LabelStudioAPI's surface ---------------------------------------------------------------------------
    def project(self, i: int):
        self.calls.append(("GET", f"/api/projects/{i}/"))
        return copy.deepcopy(self.projects.get(i))

    def request(self, method: str, path: str, *, what: str, missing_ok: bool = False, params=None, json=None):
        self.calls.append((method, path))
        params = params or {}
        if path == "/api/tasks/":
            return self._list_tasks(params, missing_ok)
        if path == "/api/webhooks/" and method == "GET":
            if int(params["project"]) not in self.projects:
                raise LabelStudioToolError(f"Label Studio {what} failed: HTTP 400 Select a valid choice")
            return [
                copy.deepcopy(h) for h in self.webhooks.values() if h["project"] == int(params["project"])
            ]
        if path == "/api/webhooks/" and method == "POST":
            self._refuse_url(json["url"], what)
            hook_id = max(self.webhooks, default=0) + 1
            self.webhooks[hook_id] = {"id": hook_id, "is_active": True, **json}
            return self.webhooks[hook_id]
        if path.startswith("/api/webhooks/"):
            if self.refuse_headers and json and json.get("headers"):  # a validation error quoting the input
                raise LabelStudioToolError(f"Label Studio {what} failed: HTTP 400 headers: {json['headers']}")
            hook_id = int(path.strip("/").split("/")[-1])
            if method == "DELETE":
                del self.webhooks[hook_id]
                return None
            self.webhooks[hook_id].update(json)
            return self.webhooks[hook_id]
        if path == "/api/ml/":
            return [{"id": 1, "url": u} for u in self.ml.get(int(params["project"]), [])]
        raise AssertionError(f"unexpected call {method} {path}")

    def connect_backend(self, project: int, url: str) -> None:
        """What connecting an ML backend does: Label Studio adds a webhook without headers, unless its URL
        check refuses the address (then silently none)."""
        self.ml.setdefault(project, []).append(url)
        try:
            self._refuse_url(url + "/webhook", "create ML webhook")
        except LabelStudioToolError:
            return
        if not any(h["url"] == url + "/webhook" for h in self.webhooks.values()):
            hook_id = max(self.webhooks, default=0) + 1
            self.webhooks[hook_id] = {
                "id": hook_id,
                "project": project,
                "url": url + "/webhook",
                "headers": {},
                "is_active": True,
                "send_payload": True,
                "send_for_all_actions": True,
            }

    def _refuse_url(self, url: str, what: str) -> None:
        host = re.match(r"https?://([^:/]+)", url).group(1)
        if "." not in host and host != "localhost":
            raise LabelStudioToolError(f"Label Studio {what} failed: HTTP 400 url: Enter a valid URL.")
        if self.ssrf_protection and (host.startswith(("127.", "10.", "192.168.")) or host == "localhost"):
            raise LabelStudioToolError(
                f"Label Studio {what} failed: HTTP 403 The provided URL was not allowed."
            )

    def _list_tasks(self, params: dict, missing_ok: bool):
        if self.gate is not None:
            assert self.gate.wait(30), "the test never opened the gate"
        pid = int(params["project"])
        if pid not in self.projects:
            assert missing_ok
            return None
        query = json.loads(params["query"])
        tasks = [t for t in self.tasks.values() if t["project"] == pid and t["id"] not in self.hidden]
        if "filters" in query:
            (item,) = query["filters"]["items"]
            assert item["filter"] == "filter:tasks:annotations_ids" and item["operator"] == "contains"
            wanted = {int(v) for v in re.split(",|;| ", item["value"]) if v.isdigit()}
            tasks = [
                t
                for t in tasks
                if any(a["task"] == t["id"] and a["id"] in wanted for a in self.annotations.values())
            ]
        else:
            included = set(query["selectedItems"]["included"])
            tasks = [t for t in tasks if t["id"] in included]
        tasks.sort(key=lambda t: t["id"])
        size = min(int(params["page_size"]), self.page_size_max or 10**9)
        page = tasks[(int(params["page"]) - 1) * size : int(params["page"]) * size]
        out = []
        for t in page:
            anns = [copy.deepcopy(a) for a in self.annotations.values() if a["task"] == t["id"]]
            out.append({**copy.deepcopy(t), "annotations": anns})
        return {"tasks": out, "total": len(tasks)}

    def list_calls(self) -> int:
        return sum(1 for c in self.calls if c[1] == "/api/tasks/")


@pytest.fixture
def store(tmp_path):
    s = LabelStore(f"sqlite:///{tmp_path / 'store.db'}", migrate=True)
    yield s
    s.close()


@pytest.fixture
def ls():
    return FakeLabelStudio()


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch):
    """A created object Label Studio does not list yet is looked up again after 1.5 s and 5 s; tests that
    meet one (an invented id) need not wait that long."""
    monkeypatch.setattr(webhooks_mod, "RETRY_DELAYS_S", (0.05, 0.1))


def _app(store, ls_api=None, *, connect=(1,), **settings):
    base = {"basic_auth_user": "ml", "basic_auth_pass": "s3cret", "webhook_secret": SECRET, "day_one": False}
    for pid in connect:
        store.ensure_project(f"label-studio-{pid}")
    return create_app(BackendSettings(**(base | settings)), store=store, ls_api=ls_api)


def _client(store, ls_api=None, **kw):
    """A test client, once the backend's start-up look at Label Studio's webhooks is over."""
    client = _app(store, ls_api, **kw).test_client()
    checked(client)
    return client


def checked(client) -> dict:
    """/health's ``webhook_check`` once the start-up check has run (it runs on its own thread)."""
    deadline = time.monotonic() + 30
    while (check := client.get("/health").get_json()["webhook_check"])["state"] == "pending":
        assert time.monotonic() < deadline, check
        time.sleep(0.02)
    return check


def _post(client, body, headers=None):
    return client.post("/webhook", json=body, headers=headers or {})


def _labels(store, project="label-studio-1"):
    return LabelStore(store.url, project=project).stats()["annotations"]


# ---------------------------------------------------------------------------------------------------------
# authentication
# ---------------------------------------------------------------------------------------------------------
def test_with_the_secret_label_studio_deliveries_reach_the_store_verified(store, ls):
    body = fixture("webhooks.json")[0]
    ls.learn(body)
    client = _client(store, ls)
    assert (
        client.post("/predict", json={}, headers=SIGNED).status_code == 401
    )  # the secret opens no other route
    out = deliver(client, body, SIGNED)
    assert out["verified"] and set(out["annotations"][0]["labels"]) == {"segmentation", "cvs", "phase"}
    assert ls.list_calls() == 1 and not any(c[1].startswith("/api/annotations/") for c in ls.calls)
    assert _labels(store)["total"] == 3


def _forgeries(bodies):
    return [
        bodies[0],
        {
            "action": "ANNOTATIONS_DELETED",
            "annotations": [{"id": bodies[0]["annotation"]["id"]}],
            "project": {"id": 1},
        },
        {"action": "TASKS_DELETED", "tasks": [{"id": bodies[0]["task"]["id"]}], "project": {"id": 1}},
        {"action": "TASKS_CREATED", "tasks": [{"id": 1}], "project": {"id": 1}},
        {"action": "START_TRAINING", "project": {"id": 1}},
        {
            "action": "ANNOTATION_CREATED",
            **{k: bodies[0][k] for k in ("annotation", "task")},
            "project": {"id": 555, "label_config": image_config()},
        },
    ]


@pytest.mark.parametrize("verified", [True, False], ids=["verified", "trusting"])
def test_forged_events_without_the_secret_or_credentials_are_refused_and_write_nothing(store, ls, verified):
    bodies = fixture("webhooks.json")
    ls.learn(bodies[0])
    client = _client(store, ls if verified else None)
    assert _post(client, bodies[0], SIGNED).status_code == 202  # the real delivery
    assert client.application.extensions["surgenet"].webhooks.queue.wait_idle(60)
    before, projects, calls = store.stats()["annotations"], store.projects(), len(ls.calls)
    wrong_basic = {"Authorization": "Basic " + base64.b64encode(b"ml:guess").decode()}
    for body in _forgeries(bodies):
        for headers in ({}, {SECRET_HEADER: SECRET[:-1] + "x"}, {SECRET_HEADER: "é" * 30}, wrong_basic):
            r = _post(client, body, headers)
            assert r.status_code == 401, (body["action"], headers, r.get_json())
            assert r.get_json()["hint"]
    # START_TRAINING comes from the ML connector with Basic Auth: the webhook's secret does not queue a run
    r = _post(client, {"action": "START_TRAINING", "project": {"id": 1}}, SIGNED)
    assert r.status_code == 401 and "Basic Auth" in r.get_json()["hint"]
    assert client.application.extensions["surgenet"].webhooks.queue.wait_idle(60)
    assert store.stats()["annotations"] == before and store.projects() == projects
    assert len(ls.calls) == calls  # nobody made the backend call Label Studio
    assert store.training_runs(project="label-studio-1") == []
    metrics = client.get("/metrics", headers=AUTH).get_data(as_text=True)
    assert 'surgenet_backend_webhooks_refused_total{reason="unauthenticated"} 25.0' in metrics


def test_start_training_needs_basic_auth_and_is_queued_once(store, ls):
    client = _client(store, ls)
    first = deliver(client, {"action": "START_TRAINING", "project": {"id": 1}}, AUTH)
    again = deliver(client, {"action": "START_TRAINING", "project": {"id": 1}}, AUTH)
    assert not first["already_queued"] and again["already_queued"]
    assert again["training_run"] == first["training_run"]
    runs = store.training_runs(project="label-studio-1")
    assert [r["status"] for r in runs] == ["queued"] and runs[0]["params"]["ls_project"] == 1
    assert store.training_runs() == []  # never the default project


def test_nothing_configured_means_open_and_a_half_or_weak_configuration_is_refused(store):
    open_client = _client(store, basic_auth_user=None, basic_auth_pass=None, webhook_secret=None)
    assert deliver(open_client, {"action": "START_TRAINING", "project": {"id": 1}})["training_run"]
    with pytest.raises(UsageError, match="BASIC_AUTH_PASS"):
        create_app(BackendSettings(basic_auth_user="ml"), store=store)
    with pytest.raises(UsageError, match="LABEL_STUDIO_API_KEY"):
        create_app(BackendSettings(label_studio_url="http://ls:8080"), store=store)
    for weak in ("short", "a secret with spaces in it", "ünïcödé-secret-0123456789"):
        with pytest.raises(UsageError, match="SURGENET_ASSIST_WEBHOOK_SECRET") as err:
            create_app(BackendSettings(webhook_secret=weak), store=store)
        assert weak not in str(err.value.message)


# ---------------------------------------------------------------------------------------------------------
# connected projects; the project comes from Label Studio
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("verified", [True, False], ids=["verified", "trusting"])
def test_a_webhook_never_creates_a_store_project(store, ls, verified):
    """100 deliveries naming projects that were never connected: 403 each, no store project, no call to Label
    Studio, so `ls sync --all` and the nightly cycle have nothing new to visit."""
    client = _client(store, ls if verified else None)
    projects = store.projects()
    ls.calls.clear()
    for pid in range(100, 200):
        body = {"action": "ANNOTATIONS_DELETED", "annotations": [{"id": 1}], "project": {"id": pid}}
        r = _post(client, body, SIGNED)
        assert r.status_code == 403 and r.get_json()["error"] == "not_connected", r.get_json()
        assert f"ls setup-project --project {pid}" in r.get_json()["hint"]
    r = _post(client, {"action": "START_TRAINING", "project": {"id": 150}}, AUTH)
    assert r.status_code == 403
    assert store.projects() == projects and ls.calls == []
    assert store.training_runs(project="label-studio-150") == []


def test_one_store_project_for_every_label_studio_project_is_connected_at_start(store, ls):
    """SURGENET_ASSIST_STORE_PROJECT: the operator names the one store project; the backend creates it at
    start, so Label Studio projects write there without any other store project appearing."""
    bodies = fixture("webhooks.json")
    ls.learn(bodies[7])  # Label Studio project 2
    client = _client(store, ls, connect=(), store_project="surgery-site")
    assert "surgery-site" in store.projects()
    out = deliver(client, bodies[7], SIGNED)
    assert out["store_project"] == "surgery-site" and out["annotations"][0]["labels"]
    assert "label-studio-2" not in store.projects()


def test_an_id_from_another_project_pulls_nothing_in(store, ls):
    """A signed delivery for connected project 1 naming annotation 6, which Label Studio holds in project 2
    (never connected): Label Studio's list of project 1 does not hold it, so nothing is written anywhere."""
    bodies = fixture("webhooks.json")
    other = bodies[7]
    assert other["project"]["id"] == 2
    ls.learn(bodies[0])
    ls.learn(other)
    client = _client(store, ls)
    forged = copy.deepcopy(other)
    forged["project"] = copy.deepcopy(bodies[0]["project"])  # claims project 1
    out = deliver(client, forged, SIGNED)
    assert out["annotations"] == [] and out["gone"] == [other["annotation"]["id"]]
    assert "label-studio-2" not in store.projects() and store.stats()["annotations"]["total"] == 0


def test_label_studio_setup_connects_a_project_once_label_studio_confirms_it(store, ls):
    ls.projects[4] = {"id": 4, "label_config": image_config()}
    app = _app(store, ls, connect=())
    client = app.test_client()
    queue = app.extensions["surgenet"].webhooks.queue
    for project in ("4.1700000000", "9.1700000000"):  # Label Studio has project 4, not 9
        r = client.post("/setup", json={"project": project, "schema": image_config()}, headers=AUTH)
        assert r.status_code == 200, r.get_json()
    assert queue.wait_idle(60)
    assert "label-studio-4" in store.projects() and "label-studio-9" not in store.projects()
    # without a Label Studio connection and without Basic Auth, /setup connects nothing
    bare = _app(store, None, connect=(), basic_auth_user=None, basic_auth_pass=None, webhook_secret=None)
    bare.test_client().post("/setup", json={"project": "12.1", "schema": image_config()})
    assert bare.extensions["surgenet"].webhooks.queue.wait_idle(60)
    assert "label-studio-12" not in store.projects()


# ---------------------------------------------------------------------------------------------------------
# what verified deliveries write and delete
# ---------------------------------------------------------------------------------------------------------
def test_forged_content_changes_nothing(store, ls):
    bodies = fixture("webhooks.json")
    ls.learn(bodies[0])
    client = _client(store, ls)
    deliver(client, bodies[0], SIGNED)
    before = store.stats()["annotations"]

    invented = copy.deepcopy(bodies[0])
    invented["annotation"]["id"] = 4242  # Label Studio has no such annotation
    assert deliver(client, invented, SIGNED)["gone"] == [4242]

    altered = copy.deepcopy(bodies[0])  # an existing annotation, with someone else's regions
    altered["action"] = "ANNOTATION_UPDATED"
    altered["annotation"]["result"] = altered["annotation"]["result"][:1]
    altered["annotation"]["updated_at"] = "2031-01-01T00:00:00Z"
    deliver(client, altered, SIGNED)

    delete = {
        "action": "ANNOTATIONS_DELETED",
        "annotations": [{"id": bodies[0]["annotation"]["id"]}],
        "project": {"id": 1},
    }
    out = deliver(client, delete, SIGNED)
    assert out["tombstones"] == 0 and "still exist in Label Studio" in out["warnings"][0]
    kill_task = {"action": "TASKS_DELETED", "tasks": [{"id": bodies[0]["task"]["id"]}], "project": {"id": 1}}
    assert deliver(client, kill_task, SIGNED)["tombstones"] == 0
    assert store.stats()["annotations"] == before


def test_real_deletes_of_annotations_and_tasks_become_tombstones(store, ls):
    bodies = fixture("webhooks.json")
    for b in bodies[:2]:
        ls.learn(b)
    client = _client(store, ls)
    for b in bodies[:2]:
        deliver(client, b, SIGNED)
    first, second = bodies[0], bodies[1]
    del ls.annotations[first["annotation"]["id"]]
    delete = {
        "action": "ANNOTATIONS_DELETED",
        "annotations": [{"id": first["annotation"]["id"]}],
        "project": {"id": 1},
    }
    assert deliver(client, delete, SIGNED)["tombstones"] == 3
    del ls.tasks[second["task"]["id"]]  # deleting a task sends TASKS_DELETED, no annotation event
    body = {"action": "TASKS_DELETED", "tasks": [{"id": second["task"]["id"]}], "project": {"id": 1}}
    assert deliver(client, body, SIGNED)["tombstones"] >= 1
    assert _labels(store)["total"] == 0


def test_bulk_created_annotations_and_deleted_tasks_as_label_studio_sends_them(store, ls):
    """``ANNOTATIONS_CREATED`` ("create annotations from predictions": ``annotation`` and ``task`` are lists)
    and ``TASKS_DELETED`` (``{"tasks": [{"id"}]}``), captured from Label Studio 1.23.2."""
    created, *deleted = fixture("webhooks_bulk.json")
    assert created["action"] == "ANNOTATIONS_CREATED"
    assert [d["action"] for d in deleted] == ["TASKS_DELETED"] * 2
    for ann, task in zip(created["annotation"], created["task"], strict=True):
        ls.learn({"annotation": ann, "task": task, "project": created["project"]})
    pid = created["project"]["id"]
    client = _client(store, ls, connect=(pid,))
    out = deliver(client, created, SIGNED)
    assert len(out["annotations"]) == 3 and ls.list_calls() == 1  # three annotations, one list call
    project = f"label-studio-{pid}"
    assert _labels(store, project)["total"] == 3
    trusted = _client(store, connect=(pid,))  # the same body trusted: the same labels, nothing new
    again = deliver(trusted, created, SIGNED)["annotations"]
    assert not any(v["created"] for a in again for v in a["labels"].values())

    assert deliver(client, deleted[0], SIGNED)["tombstones"] == 0  # Label Studio still has the task
    for body in deleted:
        del ls.tasks[body["tasks"][0]["id"]]
    assert sum(deliver(client, body, SIGNED)["tombstones"] for body in deleted) == 2
    assert _labels(store, project)["total"] == 1


def test_tasks_imported_with_annotations_are_synced(store, ls):
    """``TASKS_CREATED`` (an import of tasks that already hold annotations sends nothing else): the tasks are
    read back from Label Studio with their annotations, again shortly when its import has not committed."""
    bodies = fixture("webhooks.json")
    for b in bodies[:2]:
        ls.learn(b)
    ls.hidden = {bodies[1]["task"]["id"]}  # the second task is not committed when the event arrives
    client = _client(store, ls)
    event = {
        "action": "TASKS_CREATED",
        "tasks": [{"id": b["task"]["id"]} for b in bodies[:2]] * 3,
        "project": {"id": 1, "label_config": "<View/>"},
    }
    timer = threading.Timer(0.02, lambda: ls.hidden.clear())
    timer.start()
    out = deliver(client, event, SIGNED)
    timer.join()
    assert {a["annotation"] for a in out["annotations"]} == {1, 2} and out["status"] == "ok"
    reader = LabelStudioTranslator.for_config(bodies[0]["project"]["label_config"])
    assert _labels(store)["total"] == sum(len(reader.read(b["task"], b["annotation"])[0]) for b in bodies[:2])
    # without a Label Studio connection there is nothing to re-read: said, not guessed
    r = _post(_client(store), event, SIGNED)
    assert r.status_code == 200 and r.get_json()["status"] == "ignored" and "ls sync" in r.get_json()["hint"]


def test_project_updated_drops_the_cached_config_at_once(store, ls):
    """A label added to the config: without PROJECT_UPDATED the minute-old cached config refuses it."""
    bodies = fixture("webhooks.json")
    ls.learn(bodies[0])
    without_fat = image_config().replace('<Label value="Fat"', '<Label value="FatX"')
    assert without_fat != image_config()
    ls.projects[1]["label_config"] = without_fat
    client = _client(store, ls)
    deliver(client, bodies[0], SIGNED)  # caches the config
    fat = copy.deepcopy(bodies[1])
    for region in fat["annotation"]["result"]:
        if region["type"] == "brushlabels":
            region["value"]["brushlabels"] = ["Fat"]
    ls.learn(fat)
    ls.projects[1]["label_config"] = image_config()  # the admin adds the label
    refused = deliver(client, fat, SIGNED)
    assert "error" in refused["annotations"][0] and "'Fat'" in refused["annotations"][0]["error"]
    updated = deliver(client, {"action": "PROJECT_UPDATED", "project": ls.projects[1]}, SIGNED, status=200)
    assert updated["config_cache"] == "dropped"
    accepted = deliver(client, fat, SIGNED)
    assert "segmentation" in accepted["annotations"][0]["labels"]


# ---------------------------------------------------------------------------------------------------------
# floods: caps, bulk verification, the queue, metrics
# ---------------------------------------------------------------------------------------------------------
def test_3000_ids_are_deduplicated_capped_and_verified_in_bulk(store, ls):
    bodies = fixture("webhooks.json")
    for b in bodies[:5]:
        ls.learn(b)
    client = _client(store, ls)
    for b in bodies[:5]:
        deliver(client, b, SIGNED)
    gone = [bodies[i]["annotation"]["id"] for i in (0, 4)]
    held = store.ls_live_revisions("label-studio-1")  # Label Studio annotation id -> its live labels
    live = sum(len(held[i]) for i in gone)
    assert live >= 2
    for i in gone:
        del ls.annotations[i]
    ids = [*gone, *range(10_000, 12_998)]  # 3,000 ids: the two deleted ones first, then noise
    ls.calls.clear()
    body = {"action": "ANNOTATIONS_DELETED", "annotations": [{"id": i} for i in ids], "project": {"id": 1}}
    r = _post(client, body, SIGNED)
    assert r.status_code == 202, r.get_json()
    reply = r.get_json()
    assert reply["ids"] == 1000 and reply["ignored_ids"] == 2000 and "ls sync --project 1" in reply["hint"]
    handler = client.application.extensions["surgenet"].webhooks
    assert handler.queue.wait_idle(60)
    assert handler.queue.outcome(reply["job"])["tombstones"] == live
    assert ls.list_calls() == 10 and len(ls.calls) == 10  # 1,000 ids / 100 per list call, nothing else

    repeated = {"action": "TASKS_DELETED", "tasks": [{"id": 3}] * 3000, "project": {"id": 1}}
    ls.calls.clear()
    out = deliver(client, repeated, SIGNED)
    assert ls.list_calls() == 1 and out["still_exist"] == 1 and out["tombstones"] == 0  # one distinct id
    metrics = client.get("/metrics", headers=AUTH).get_data(as_text=True)
    assert "surgenet_backend_webhook_ids_ignored_total 2000.0" in metrics


def test_bulk_verification_reads_every_page_when_label_studio_caps_the_page(store, ls):
    """``TASK_API_PAGE_SIZE_MAX`` below our 100 ids a call: the answer's ``total`` says more pages follow."""
    ls.page_size_max = 30
    ls.projects[1] = {"id": 1, "label_config": image_config()}
    for t in range(1, 101):
        ls.tasks[t] = {"id": t, "project": 1, "data": {"image": f"/data/upload/1/{t}.png"}}
    client = _client(store, ls)
    body = {"action": "TASKS_DELETED", "tasks": [{"id": t} for t in range(1, 101)], "project": {"id": 1}}
    out = deliver(client, body, SIGNED)
    assert out["still_exist"] == 100 and out["tombstones"] == 0
    assert ls.list_calls() == 4  # 30 + 30 + 30 + 10


def test_unknown_actions_do_not_grow_metrics(store):
    client = _client(store)

    def forge(n: int, start: int = 0) -> None:
        for i in range(start, start + n):
            r = _post(client, {"action": f"FORGED_{i}_" + "x" * 200, "project": {"id": 1}}, SIGNED)
            assert r.status_code == 200 and r.get_json()["status"] == "ignored"

    forge(10)
    client.get("/metrics", headers=AUTH)  # counts itself after it answers: the next one has its series
    size = len(client.get("/metrics", headers=AUTH).data)
    forge(1990, start=10)
    text = client.get("/metrics", headers=AUTH).get_data(as_text=True)
    assert 'surgenet_backend_webhooks_total{action="other"} 2000.0' in text
    assert "FORGED" not in text and len(text) - size < 100  # only counts moved: no new series


def test_a_full_webhook_queue_answers_503_while_health_and_predict_stay_free(store, ls):
    """Label Studio stalls: the worker waits inside a list call, two deliveries wait behind it, the next is
    refused at once (503, counted). /health and /predict are answered meanwhile (they never wait on it)."""
    ls.learn(fixture("webhooks.json")[0])
    ls.gate = threading.Event()
    app = _app(store, ls, webhook_backlog=2)
    client = app.test_client()
    queue = app.extensions["surgenet"].webhooks.queue
    body = {"action": "TASKS_DELETED", "tasks": [{"id": 1}], "project": {"id": 1}}
    assert _post(client, body, SIGNED).status_code == 202
    deadline = time.monotonic() + 30
    while queue.snapshot()["waiting"] and time.monotonic() < deadline:
        time.sleep(0.01)  # the worker took it and now waits on Label Studio
    assert [_post(client, body, SIGNED).status_code for _ in range(2)] == [202, 202]
    r = _post(client, body, SIGNED)
    assert (
        r.status_code == 503 and r.get_json()["error"] == "queue_full" and "ls sync" in r.get_json()["hint"]
    )

    answers: dict[str, int] = {}

    def others() -> None:
        answers["health"] = client.get("/health").status_code
        tasks = [{"id": 1, "data": {"image": "/data/upload/1/x.png"}}]
        answers["predict"] = client.post(
            "/predict", json={"tasks": tasks, "label_config": image_config()}, headers=AUTH
        ).status_code

    side = threading.Thread(target=others)
    side.start()
    side.join(20)
    assert not side.is_alive() and answers == {"health": 200, "predict": 200}  # while the worker is stuck
    health = client.get("/health").get_json()
    assert health["webhook_backlog"]["waiting"] == 2 and health["webhook_backlog"]["dropped"] == 1
    ls.gate.set()
    assert queue.wait_idle(60) and queue.snapshot()["done"] == 3
    metrics = client.get("/metrics", headers=AUTH).get_data(as_text=True)
    assert 'surgenet_backend_webhooks_refused_total{reason="queue_full"} 1.0' in metrics


# ---------------------------------------------------------------------------------------------------------
# malformed bodies
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"action": "ANNOTATION_CREATED", "annotation": {"id": "abc"}, "task": {"id": 1}}, "annotation id"),
        ({"action": "ANNOTATIONS_DELETED", "annotations": "all"}, "annotations"),
        ({"action": "TASKS_DELETED", "tasks": [{"id": None}]}, "tasks id"),
        ({"action": "ANNOTATIONS_CREATED", "annotation": [{"id": 1, "task": 9}], "task": []}, "task 9"),
        ({"action": "TASKS_DELETED", "tasks": [{"id": 1}]}, "names no Label Studio project"),
    ],
)
def test_malformed_events_get_a_400_naming_the_field(store, ls, body, field):
    for client in (_client(store, ls), _client(store, None)):
        r = _post(client, body, SIGNED)
        assert r.status_code == 400, r.get_json()
        assert field in r.get_json()["detail"] and r.get_json()["hint"]
    assert store.stats()["annotations"]["total"] == 0


# ---------------------------------------------------------------------------------------------------------
# the webhook Label Studio holds: check and repair
# ---------------------------------------------------------------------------------------------------------
def test_setup_adds_the_secret_to_the_webhook_label_studio_created_without_headers(ls):
    ls.projects[1] = {"id": 1, "label_config": image_config()}
    ls.connect_backend(1, "http://ml.internal:9090")
    ls.webhooks[9] = dict(ls.webhooks[1], id=9)  # a duplicate (a backend connected twice)
    before = check_project_webhook(ls, 1, secret=SECRET)
    assert before.state == "no_secret" and "401" in before.problem and "--project 1" in before.fix
    after = ensure_project_webhook(ls, 1, "http://ml.internal:9090", secret=SECRET)
    assert after.ok and list(ls.webhooks) == [1]  # repaired in place, the duplicate gone
    assert ls.webhooks[1]["headers"] == {SECRET_HEADER: SECRET} and ls.webhooks[1]["send_for_all_actions"]
    assert check_project_webhook(ls, 1, secret="another-secret-0123456789").state == "wrong_secret"
    assert SECRET not in repr(after) + str(after.to_dict())
    ls.refuse_headers = True  # an error that quotes what was sent never carries the secret on
    with pytest.raises(LabelStudioToolError) as err:
        ensure_project_webhook(ls, 1, "http://ml.internal:9090", secret=SECRET)
    assert "***" in err.value.message and SECRET not in str(err.value)


def test_a_webhook_label_studio_silently_skipped_is_reported_with_the_reason(ls):
    ls.ssrf_protection = True
    ls.projects[1] = {"id": 1, "label_config": image_config()}
    ls.connect_backend(1, "http://127.0.0.1:9090")  # refused by SSRF protection: no webhook
    check = check_project_webhook(ls, 1, secret=SECRET)
    assert check.state == "missing" and "SSRF_PROTECTION_ENABLED" in check.problem
    assert check.fix.startswith(SSRF_FIX) and "USE_DEFAULT_BANNED_SUBNETS" in check.fix
    with pytest.raises(LabelStudioToolError, match="SSRF_PROTECTION_ENABLED") as err:
        ensure_project_webhook(ls, 1, "http://127.0.0.1:9090", secret=SECRET)
    assert "USE_DEFAULT_BANNED_SUBNETS" in err.value.hint
    reason, fix = why_label_studio_refuses("http://backend:9090/webhook")  # the compose service name
    assert "without a dot" in reason and "backend.internal" in fix
    ls.projects[2] = {"id": 2, "label_config": image_config()}
    assert check_project_webhook(ls, 2).state == "no_ml_backend"
    assert check_project_webhook(ls, 77).state == "no_project"


def test_health_shows_the_webhook_check_computed_at_start(store, ls):
    ls.ssrf_protection = True
    ls.projects[1] = {"id": 1, "label_config": image_config()}
    ls.connect_backend(1, "http://127.0.0.1:9090")
    client = _client(store, ls)
    check = checked(client)
    assert check["state"] == "problems" and check["projects"] == 1
    (problem,) = check["problems"]
    assert (
        problem["project"] == 1
        and problem["state"] == "missing"
        and "SSRF_PROTECTION_ENABLED" in problem["fix"]
    )
    assert "127.0.0.1" not in json.dumps(check)  # /health is public: no address
    calls = len(ls.calls)
    for _ in range(20):
        client.get("/health")
    assert len(ls.calls) == calls  # /health never calls Label Studio
