"""Webhooks as teams deploy them: Basic Auth on the backend, deliveries without credentials, forged requests,
and every event shape Label Studio 1.23 sends (bodies from tests/fixtures/label_studio, which a real server
produced). Label Studio's API is played by ``FakeLabelStudio`` holding the state those bodies came from; the
real server is in tests/integration/test_label_studio_deploy.py."""

from __future__ import annotations

import base64
import copy

import pytest
from ls_semantics import fixture
from test_backend import post  # noqa: F401

from surgenet_assist.backend.app import BackendSettings, create_app
from surgenet_assist.core.errors import UsageError
from surgenet_assist.core.store import LabelStore

AUTH = {"Authorization": "Basic " + base64.b64encode(b"ml:s3cret").decode()}


class FakeLabelStudio:
    """What LabelStudioAPI answers, from a dict of Label Studio's current objects (None = gone)."""

    def __init__(self) -> None:
        self.annotations: dict[int, dict] = {}
        self.tasks: dict[int, dict] = {}
        self.projects: dict[int, dict] = {}
        self.calls: list[tuple[str, int]] = []

    def learn(self, body: dict) -> None:
        """Label Studio's state after it sent ``body`` (what its API would return)."""
        project = body["project"]
        self.projects[project["id"]] = {"id": project["id"], "label_config": project["label_config"]}
        task = dict(body["task"], project=project["id"])
        self.tasks[task["id"]] = task
        self.annotations[body["annotation"]["id"]] = dict(body["annotation"], task=task["id"])

    def annotation(self, i: int):
        self.calls.append(("annotation", i))
        return copy.deepcopy(self.annotations.get(i))

    def task(self, i: int):
        self.calls.append(("task", i))
        return copy.deepcopy(self.tasks.get(i))

    def project(self, i: int):
        self.calls.append(("project", i))
        return copy.deepcopy(self.projects.get(i))


@pytest.fixture
def store(tmp_path):
    s = LabelStore(f"sqlite:///{tmp_path / 'store.db'}", migrate=True)
    yield s
    s.close()


@pytest.fixture
def ls():
    return FakeLabelStudio()


def _client(store, ls_api=None, **settings):
    base = {"basic_auth_user": "ml", "basic_auth_pass": "s3cret", "day_one": False}
    app = create_app(BackendSettings(**(base | settings)), store=store, ls_api=ls_api)
    return app.test_client()


def _post(client, body, headers=None):
    return client.post("/webhook", json=body, headers=headers or {})


def _labels(store, project="label-studio-1"):
    return LabelStore(store.url, project=project).stats()["annotations"]


def test_with_basic_auth_label_studio_deliveries_reach_the_store_verified(store, ls):
    body = fixture("webhooks.json")[0]
    ls.learn(body)
    client = _client(store, ls)
    assert client.post("/predict", json={}).status_code == 401  # every other route still needs Basic Auth
    r = _post(client, body)  # Label Studio sends no credentials
    assert r.status_code == 200, r.get_json()
    out = r.get_json()
    assert out["verified"] and set(out["annotations"][0]["labels"]) == {"segmentation", "cvs", "phase"}
    assert ("annotation", body["annotation"]["id"]) in ls.calls  # re-read, not taken from the body
    assert _labels(store)["total"] == 3


def test_without_a_label_studio_connection_basic_auth_guards_the_webhook(store):
    client = _client(store)  # no LABEL_STUDIO_URL / LABEL_STUDIO_API_KEY: the body would be trusted
    body = fixture("webhooks.json")[0]
    assert _post(client, body).status_code == 401
    assert _post(client, body, AUTH).status_code == 200  # a sender that has the credentials
    assert _labels(store)["total"] == 3


def test_forged_webhooks_change_nothing(store, ls):
    bodies = fixture("webhooks.json")
    ls.learn(bodies[0])
    client = _client(store, ls)
    assert _post(client, bodies[0]).status_code == 200
    before = store.stats()["annotations"]

    invented = copy.deepcopy(bodies[0])
    invented["annotation"]["id"] = 4242  # Label Studio has no such annotation
    r = _post(client, invented)
    assert r.status_code == 200 and r.get_json()["annotations"][0]["gone"]

    altered = copy.deepcopy(bodies[0])  # an existing annotation, with someone else's regions
    altered["action"] = "ANNOTATION_UPDATED"
    altered["annotation"]["result"] = altered["annotation"]["result"][:1]
    altered["annotation"]["updated_at"] = "2031-01-01T00:00:00Z"
    assert _post(client, altered).status_code == 200

    delete = {"action": "ANNOTATIONS_DELETED", "annotations": [{"id": bodies[0]["annotation"]["id"]}],
              "project": {"id": 1}}
    r = _post(client, delete)
    assert r.status_code == 200 and r.get_json()["tombstones"] == 0
    assert "still exists in Label Studio" in r.get_json()["warnings"][0]

    kill_task = {"action": "TASKS_DELETED", "tasks": [{"id": bodies[0]["task"]["id"]}], "project": {"id": 1}}
    assert _post(client, kill_task).get_json()["tombstones"] == 0
    assert store.stats()["annotations"] == before


def test_real_deletes_of_annotations_and_tasks_become_tombstones(store, ls):
    bodies = fixture("webhooks.json")
    for b in bodies[:2]:
        ls.learn(b)
    client = _client(store, ls)
    for b in bodies[:2]:
        assert _post(client, b).status_code == 200
    first, second = bodies[0], bodies[1]
    del ls.annotations[first["annotation"]["id"]]
    delete = {"action": "ANNOTATIONS_DELETED", "annotations": [{"id": first["annotation"]["id"]}],
              "project": {"id": 1}}
    assert _post(client, delete).get_json()["tombstones"] == 3
    del ls.tasks[second["task"]["id"]]  # deleting a task sends TASKS_DELETED, no annotation event
    body = {"action": "TASKS_DELETED", "tasks": [{"id": second["task"]["id"]}], "project": {"id": 1}}
    assert _post(client, body).get_json()["tombstones"] >= 1
    assert _labels(store)["total"] == 0


def test_bulk_created_annotations_and_deleted_tasks_as_label_studio_sends_them(store, ls):
    """``ANNOTATIONS_CREATED`` ("create annotations from predictions": ``annotation`` and ``task`` are lists)
    and ``TASKS_DELETED`` (``{"tasks": [{"id"}]}``), captured from Label Studio 1.23.2."""
    created, *deleted = fixture("webhooks_bulk.json")
    assert created["action"] == "ANNOTATIONS_CREATED"
    assert [d["action"] for d in deleted] == ["TASKS_DELETED"] * 2
    for ann, task in zip(created["annotation"], created["task"], strict=True):
        ls.learn({"annotation": ann, "task": task, "project": created["project"]})
    client = _client(store, ls)
    r = _post(client, created)
    assert r.status_code == 200 and len(r.get_json()["annotations"]) == 3
    project = f"label-studio-{created['project']['id']}"
    assert _labels(store, project)["total"] == 3
    trusted = _client(store)  # the same body trusted (behind Basic Auth): the same labels, nothing new
    again = _post(trusted, created, AUTH).get_json()["annotations"]
    assert not any(v["created"] for a in again for v in a["labels"].values())

    assert _post(client, deleted[0]).get_json()["tombstones"] == 0  # Label Studio still has the task
    for body in deleted:
        del ls.tasks[body["tasks"][0]["id"]]
    assert sum(_post(client, body).get_json()["tombstones"] for body in deleted) == 2
    assert _labels(store, project)["total"] == 1


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"action": "ANNOTATION_CREATED", "annotation": {"id": "abc"}, "task": {"id": 1}}, "annotation id"),
        ({"action": "ANNOTATIONS_DELETED", "annotations": "all"}, "annotations"),
        ({"action": "TASKS_DELETED", "tasks": [{"id": None}]}, "tasks id"),
        ({"action": "ANNOTATIONS_CREATED", "annotation": [{"id": 1, "task": 9}], "task": []}, "task 9"),
    ],
)
def test_malformed_events_get_a_400_naming_the_field(store, ls, body, field):
    for client in (_client(store, ls), _client(store, None, basic_auth_user=None, basic_auth_pass=None)):
        r = _post(client, body)
        assert r.status_code == 400, r.get_json()
        assert field in r.get_json()["detail"] and r.get_json()["hint"]


def test_half_configurations_are_refused_at_start(store):
    with pytest.raises(UsageError, match="BASIC_AUTH_PASS"):
        create_app(BackendSettings(basic_auth_user="ml"), store=store)
    with pytest.raises(UsageError, match="LABEL_STUDIO_API_KEY"):
        create_app(BackendSettings(label_studio_url="http://ls:8080"), store=store)
