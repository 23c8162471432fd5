"""Authenticated webhooks against a real Label Studio 1.23.2: the secret header ``ls setup-project`` puts on
the project's webhook (missing: 401, present: taken), ``START_TRAINING`` with the backend's Basic Auth,
tasks imported with their annotations (``TASKS_CREATED``), a label added to the config (``PROJECT_UPDATED``),
and, on a second server with Label Studio's default SSRF protection, the webhook it silently never created.
"""

from __future__ import annotations

import cv2
import pytest
import requests
from ls_live import TOKEN, H, ServedBackend, W, brush, choices, label_studio, poll, rect_mask

pytestmark = pytest.mark.slow
BASIC = ("ml-backend", "s3cret-pass")
SECRET = "it-webhook-secret-0123456789"


class Backend:
    """Our backend behind the real server, on a free port: Basic Auth, the webhook secret, a Label Studio
    connection."""

    def __init__(self, ls_url: str, db: str) -> None:
        from surgenet_assist.backend.app import BackendSettings, create_app

        settings = BackendSettings(
            db_url=db,
            basic_auth_user=BASIC[0],
            basic_auth_pass=BASIC[1],
            webhook_secret=SECRET,
            label_studio_url=ls_url,
            label_studio_api_key=TOKEN,
            day_one=False,
        )
        self.app = create_app(settings)
        self.store = self.app.extensions["surgenet"].store
        self.queue = self.app.extensions["surgenet"].webhooks.queue
        self.served = ServedBackend(self.app)
        self.url = self.served.url

    def stop(self) -> None:
        self.served.stop()
        self.store.close()


@pytest.fixture(scope="module")
def backend(ls_server, tmp_path_factory):
    b = Backend(ls_server["url"], f"sqlite:///{tmp_path_factory.mktemp('webhooks-store') / 'store.db'}")
    yield b
    b.stop()


@pytest.fixture(scope="module")
def project(ls_server, backend, tmp_path_factory):
    """A frame project set up as `ls setup-project` does, with the backend's Basic Auth and webhook secret."""
    from surgenet_assist.backend.ls_client import setup_project
    from surgenet_assist.core.synthetic import generate_clip

    folder = tmp_path_factory.mktemp("webhook-frames") / "caseW"
    folder.mkdir()
    for i, frame in enumerate(generate_clip(17, 4, H, W).frames):
        cv2.imwrite(str(folder / f"caseW_{i:06d}.png"), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    return setup_project(
        ls_server["url"],
        TOKEN,
        frames=folder,
        backend_url=backend.url,
        backend_auth=BASIC,
        webhook_secret=SECRET,
    )


def _store(backend, pid):
    from surgenet_assist.core.store import LabelStore

    return LabelStore(backend.store.url, project=f"label-studio-{pid}")


def _live(store) -> int:
    from surgenet_assist.core.schema import TASKS

    return sum(len(store.current_human_labels(t)) for t in TASKS)


def _hooks(url: str, pid: int) -> list[dict]:
    r = requests.get(
        f"{url}/api/webhooks/", headers={"Authorization": f"Token {TOKEN}"}, params={"project": pid}
    )
    r.raise_for_status()
    return r.json()


def test_setup_project_puts_the_secret_on_the_webhook_label_studio_created(ls_server, backend, project):
    from surgenet_assist.backend.webhooks import SECRET_HEADER

    assert project.webhook is not None and project.webhook.ok, project.webhook
    (hook,) = _hooks(ls_server["url"], project.project_id)  # Label Studio's own one, repaired: no duplicate
    assert hook["url"] == f"{backend.url}/webhook" and hook["headers"] == {SECRET_HEADER: SECRET}
    assert hook["send_for_all_actions"] and hook["send_payload"] and hook["is_active"]
    # Label Studio called /setup with Basic Auth when the backend was connected: the project is connected
    poll(lambda: f"label-studio-{project.project_id}" in backend.store.projects(), what="connected project")


def test_with_the_secret_labels_arrive_and_without_it_nothing_is_taken(ls, ls_server, backend, project):
    from surgenet_assist.backend.webhooks import SECRET_HEADER

    store = _store(backend, project.project_id)
    phase = choices("c1", "phase", ["CalotTriangleDissection"])
    ann = ls.annotations.create(
        id=project.task_ids[0], result=[brush("m1", "Liver", rect_mask(4, 30, 6, 50)), phase]
    )
    poll(lambda: _live(store) == 2, what="the annotation, delivered with the secret, in the store")
    before = store.stats()["annotations"]
    forged = {
        "action": "ANNOTATIONS_DELETED",
        "annotations": [{"id": ann.id}],
        "project": {"id": project.project_id},
    }
    r = requests.post(f"{backend.url}/webhook", json=forged, timeout=30)
    assert r.status_code == 401 and SECRET_HEADER in r.json()["hint"]
    r = requests.post(f"{backend.url}/webhook", json=forged, headers={SECRET_HEADER: "x" * 30}, timeout=30)
    assert r.status_code == 401
    r = requests.post(f"{backend.url}/webhook", json=forged, headers={SECRET_HEADER: SECRET}, timeout=30)
    assert r.status_code == 202, r.text  # taken, verified: Label Studio still holds the annotation
    assert backend.queue.wait_idle(60) and backend.queue.outcome(r.json()["job"])["still_exist"] == 1
    assert store.stats()["annotations"] == before
    ls.annotations.delete(id=ann.id)  # the real delete, delivered by Label Studio with the secret
    poll(lambda: _live(store) == 0, what="the deletion in the store")


def test_start_training_arrives_with_basic_auth_only(ls, backend, project):
    from surgenet_assist.backend.webhooks import SECRET_HEADER

    store = _store(backend, project.project_id)
    body = {"action": "START_TRAINING", "project": {"id": project.project_id}}
    for headers in ({}, {SECRET_HEADER: SECRET}):  # the webhook's secret is not the ML connector's credential
        assert (
            requests.post(f"{backend.url}/webhook", json=body, headers=headers, timeout=30).status_code == 401
        )
    assert store.training_runs() == []
    ls.ml.train(id=project.ml_backend_id)  # Label Studio's "Start training": sent with Basic Auth
    runs = poll(lambda: [r for r in store.training_runs() if r["status"] == "queued"], what="queued run")
    assert len(runs) == 1 and runs[0]["params"]["ls_project"] == project.project_id


def test_tasks_imported_with_their_annotations_reach_the_store(ls_server, backend, project):
    """An import of tasks that already hold annotations sends only TASKS_CREATED."""
    headers = {"Authorization": f"Token {TOKEN}"}
    region = brush("m1", "Gallbladder", rect_mask(10, 40, 20, 60))
    tasks = [
        {
            "data": {"image": f"/data/upload/imported_{i}.png", "source_video": "imported", "frame_index": i},
            "annotations": [{"result": [region, choices("c1", "phase", ["ClippingCutting"])]}],
        }
        for i in range(3)
    ]
    r = requests.post(
        f"{ls_server['url']}/api/projects/{project.project_id}/import",
        headers=headers,
        json=tasks,
        timeout=60,
    )
    assert r.status_code == 201, r.text
    store = _store(backend, project.project_id)
    vid = poll(lambda: store.video_id("imported"), what="the imported video in the store")
    poll(lambda: all(store.label_for(vid, i, "segmentation") for i in range(3)), what="imported masks")
    assert all(store.label_for(vid, i, "phase").payload["phase"] == "ClippingCutting" for i in range(3))


def test_a_label_added_to_the_config_is_taken_at_once(ls, ls_server, backend):
    """PROJECT_UPDATED drops the cached labeling config. A project whose config lacks "Fat" is connected (the
    backend caches that config); the admin adds "Fat" and an annotator paints it at once: without the
    event, the cached config (kept a minute) would refuse the annotation."""
    from typer.testing import CliRunner

    from surgenet_assist.cli.main import app as cli
    from surgenet_assist.core.formats.ls_config import image_config
    from surgenet_assist.core.schema import DEFAULT_SCHEMA

    full = image_config()
    without = full.replace('<Label value="Fat"', '<Label value="Omentum"')
    assert without != full
    pid = ls.projects.create(title="config changes", label_config=without).id
    data = [
        {"data": {"image": f"/data/upload/p{i}.png", "source_video": "caseP", "frame_index": i}}
        for i in range(2)
    ]
    r = requests.post(
        f"{ls_server['url']}/api/projects/{pid}/import",
        headers={"Authorization": f"Token {TOKEN}"},
        json=data,
        params={"return_task_ids": "true"},
        timeout=60,
    )
    task_ids = r.json()["task_ids"]
    # `ls setup-project --project N`: the backend connected, the secret on the webhook, the project connected
    env = {"SURGENET_ASSIST_WEBHOOK_SECRET": SECRET, "BASIC_AUTH_USER": BASIC[0], "BASIC_AUTH_PASS": BASIC[1]}
    args = ["ls", "setup-project", "--url", ls_server["url"], "--api-key", TOKEN, "--project", str(pid)]
    res = CliRunner().invoke(cli, [*args, "--backend-url", backend.url, "--db", backend.store.url], env=env)
    assert res.exit_code == 0, res.output
    assert "with the secret header" in res.output and SECRET not in res.output
    store = _store(backend, pid)
    poll(lambda: f"label-studio-{pid}" in backend.store.projects(), what="connected project")
    ls.annotations.create(id=task_ids[0], result=[brush("m1", "Liver", rect_mask(2, 20, 3, 30))])
    poll(lambda: _live(store) == 1, what="an annotation read with the config without Fat")
    ls.projects.update(id=pid, label_config=full)  # the admin adds Fat: Label Studio sends PROJECT_UPDATED
    ls.annotations.create(id=task_ids[1], result=[brush("m1", "Fat", rect_mask(5, 25, 8, 40))])
    vid = store.video_id("caseP")
    label = poll(lambda: store.label_for(vid, 1, "segmentation"), what="the Fat mask in the store")
    assert label.payload["mask"][10, 20] == DEFAULT_SCHEMA.class_id("Fat")


def test_ssrf_protection_on_the_missing_webhook_is_found_and_explained(
    tmp_path_factory, label_studio_installed
):
    """Label Studio's default: SSRF protection on. Connecting a backend on 127.0.0.1 leaves a connected ML
    backend and no webhook. `ls setup-project --project N` says why, and so does the backend's /health."""
    from surgenet_assist.backend.app import BackendSettings, create_app
    from surgenet_assist.backend.ls_api import LabelStudioAPI, LabelStudioToolError
    from surgenet_assist.backend.ls_client import connect_project
    from surgenet_assist.backend.ls_webhooks import check_project_webhook
    from surgenet_assist.core.formats.ls_config import image_config

    base = tmp_path_factory.mktemp("ls-ssrf")
    db = f"sqlite:///{base / 'store.db'}"
    with label_studio(base / "ls", {"SSRF_PROTECTION_ENABLED": "true"}) as server:
        url, headers = server["url"], {"Authorization": f"Token {TOKEN}"}
        pid = requests.post(
            f"{url}/api/projects/",
            headers=headers,
            timeout=30,
            json={"title": "ssrf on", "label_config": image_config()},
        ).json()["id"]
        backend = Backend(url, db)
        stopped = False
        try:
            basic = {"auth_method": "BASIC_AUTH", "basic_auth_user": BASIC[0], "basic_auth_pass": BASIC[1]}
            r = requests.post(
                f"{url}/api/ml/",
                headers=headers,
                timeout=30,
                json={"project": pid, "url": backend.url, "title": "surgenet-assist", **basic},
            )
            assert r.status_code == 403  # ...and yet the ML backend is there, connected
            assert requests.get(f"{url}/api/ml/", headers=headers, params={"project": pid}, timeout=30).json()
            assert _hooks(url, pid) == []
            api = LabelStudioAPI(url, TOKEN)
            check = check_project_webhook(api, pid, secret=SECRET)
            api.close()
            assert check.state == "missing" and "SSRF_PROTECTION_ENABLED" in check.problem
            assert "USE_DEFAULT_BANNED_SUBNETS" in check.fix
            with pytest.raises(LabelStudioToolError, match="SSRF_PROTECTION_ENABLED") as err:
                connect_project(
                    url, TOKEN, pid, backend_url=backend.url, backend_auth=BASIC, webhook_secret=SECRET
                )
            assert "USE_DEFAULT_BANNED_SUBNETS" in err.value.hint

            # the backend's own look at start, shown in /health (the project is connected: /setup came)
            poll(lambda: f"label-studio-{pid}" in backend.store.projects(), what="connected by /setup")
            backend.stop()
            stopped = True
            app = create_app(
                BackendSettings(
                    db_url=db,
                    label_studio_url=url,
                    label_studio_api_key=TOKEN,
                    webhook_secret=SECRET,
                    day_one=False,
                )
            )
            client = app.test_client()
            health = poll(
                lambda: (h := client.get("/health").get_json())["webhook_check"]["state"] != "pending" and h,
                what="the start-up webhook check",
            )
            (problem,) = health["webhook_check"]["problems"]
            assert problem["project"] == pid and problem["state"] == "missing"
            assert (
                "SSRF_PROTECTION_ENABLED" in problem["problem"]
                and "USE_DEFAULT_BANNED_SUBNETS" in problem["fix"]
            )
            app.extensions["surgenet"].store.close()
        finally:
            if not stopped:
                backend.stop()
