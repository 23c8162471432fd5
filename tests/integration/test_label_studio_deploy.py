"""Label Studio as teams deploy it: legacy tokens off (a personal access token only), Basic Auth on the
backend, webhooks that are never retried. A real Label Studio 1.23 and our backend on a real port.

Nothing a human labels may be lost: annotations and their deletion reach the store through verified
webhooks; what a stopped backend missed, and tasks deleted in Label Studio, are repaired by `ls sync`;
forged webhooks change nothing; two Label Studio projects stay apart in the store.
"""

from __future__ import annotations

import json

import cv2
import pytest
import requests
from ls_live import (
    H,
    ServedBackend,
    W,
    brush,
    choices,
    export,
    free_port,
    label_studio,
    personal_access_token,
    poll,
    rect_mask,
)
from ls_semantics import assert_same_annotations
from typer.testing import CliRunner

pytestmark = pytest.mark.slow
BASIC = ("ml-backend", "s3cret-pass")
WEBHOOK_SECRET = "deploy-webhook-secret-0123456789"


@pytest.fixture(scope="module")
def server(tmp_path_factory, label_studio_installed):
    with label_studio(tmp_path_factory.mktemp("ls-deploy")) as srv:
        yield srv | {"pat": personal_access_token(srv["url"])}


class Backend:
    """Our backend on a fixed port, with Basic Auth and the Label Studio connection; stop() and start()
    simulate a restart (Label Studio's deliveries in between are lost)."""

    def __init__(self, server, db):
        from surgenet_assist.core.model import SurgeNetAssistModel
        from surgenet_assist.core.predictor import Predictor

        model = SurgeNetAssistModel.create(random_init=True)
        self.predictor = Predictor(model, batch_size=4, short_side=64, model_version="deploy-1", device="cpu")
        self.server_info, self.db = server, db
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.httpd = None
        self.start()

    def start(self):
        from surgenet_assist.backend.app import BackendSettings, create_app

        settings = BackendSettings(
            db_url=self.db,
            basic_auth_user=BASIC[0],
            basic_auth_pass=BASIC[1],
            webhook_secret=WEBHOOK_SECRET,
            label_studio_url=self.server_info["url"],
            label_studio_api_key=self.server_info["pat"],
            day_one=False,
        )
        self.app = create_app(settings, predictor=self.predictor)
        self.store = self.app.extensions["surgenet"].store
        self.httpd = ServedBackend(self.app, port=self.port)

    def stop(self):
        self.httpd.stop()
        self.store.close()


@pytest.fixture(scope="module")
def backend(server, tmp_path_factory):
    b = Backend(server, f"sqlite:///{tmp_path_factory.mktemp('deploy-store') / 'store.db'}")
    yield b
    b.stop()


@pytest.fixture(scope="module")
def ls(server):
    from label_studio_sdk import LabelStudio

    return LabelStudio(base_url=server["url"], api_key=server["pat"])  # the SDK exchanges the PAT itself


def _project(server, backend, tmp_path, name, n=4):
    """A project of uploaded frames (not under Label Studio's document root), our backend connected with its
    Basic Auth and the webhook secret, as `surgenet-assist ls setup-project --backend-user/--backend-password`
    does with SURGENET_ASSIST_WEBHOOK_SECRET set."""
    from surgenet_assist.backend.ls_client import setup_project
    from surgenet_assist.core.synthetic import generate_clip

    folder = tmp_path / name
    folder.mkdir()
    for i, frame in enumerate(generate_clip(hash(name) % 97, n, H, W).frames):
        cv2.imwrite(str(folder / f"{name}_{i:06d}.png"), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    url, pat = server["url"], server["pat"]
    return setup_project(
        url, pat, frames=folder, backend_url=backend.url, backend_auth=BASIC, webhook_secret=WEBHOOK_SECRET
    )


def _store(backend, pid):
    from surgenet_assist.core.store import LabelStore

    return LabelStore(backend.db, project=f"label-studio-{pid}")


def _live(store):
    """The store project's current human labels (``stats()`` counts the whole database)."""
    from surgenet_assist.core.schema import TASKS

    return sum(len(store.current_human_labels(t)) for t in TASKS)


def _annotate(ls, task_id, label="Liver"):
    phase = choices("c1", "phase", ["CalotTriangleDissection"])
    result = [brush("m1", label, rect_mask(4, 30, 6, 50)), phase]
    return ls.annotations.create(id=task_id, result=result)


def _same_as_label_studio(server, backend, pid, tmp_path):
    from surgenet_assist.core.formats.label_studio import export_label_studio
    from surgenet_assist.core.formats.ls_config import image_config

    theirs = export(server["url"], pid, server["pat"])
    out = tmp_path / f"ours-{pid}.json"
    cfg = image_config()
    export_label_studio(_store(backend, pid), out, annotations=True, label_config=cfg, tasks=theirs)
    assert_same_annotations(json.loads(out.read_text()), theirs)


@pytest.fixture(scope="module")
def project(server, backend, tmp_path_factory):
    return _project(server, backend, tmp_path_factory.mktemp("frames"), "caseA")


def test_personal_access_token_predictions_for_uploaded_images(ls, project):
    everything = {"all": True, "excluded": []}
    ls.actions.create(id="retrieve_tasks_predictions", project=project.project_id, selected_items=everything)
    preds = poll(lambda: ls.predictions.list(project=project.project_id), what="predictions")
    assert sorted(p.task for p in preds) == sorted(project.task_ids)  # every uploaded image, media via PAT
    assert all(p.model_version == "deploy-1" and p.result for p in preds)


def test_annotation_and_its_deletion_reach_the_store_with_basic_auth_on(ls, project, backend):
    store = _store(backend, project.project_id)
    ann = _annotate(ls, project.task_ids[0])
    poll(lambda: _live(store) == 2, what="the annotation in the store")
    ls.annotations.delete(id=ann.id)
    poll(lambda: _live(store) == 0, what="the deletion in the store")


def test_forged_webhooks_change_nothing(ls, project, backend):
    store = _store(backend, project.project_id)
    real = _annotate(ls, project.task_ids[1], "Gallbladder")
    poll(lambda: _live(store) == 2, what="the annotation in the store")
    before = store.stats()["annotations"]
    where = {"id": project.project_id}
    forged = [
        {
            "action": "ANNOTATION_CREATED",
            "annotation": {"id": 987654, "task": project.task_ids[2], "result": [], "completed_by": 1},
            "task": {"id": project.task_ids[2], "data": {"image": "/data/upload/x.png"}},
            "project": {"id": project.project_id},
        },
        {"action": "ANNOTATIONS_DELETED", "annotations": [{"id": real.id}], "project": where},
        {"action": "TASKS_DELETED", "tasks": [{"id": project.task_ids[1]}], "project": where},
    ]
    for body in forged:  # no credentials and no webhook secret: refused before anything is read
        r = requests.post(f"{backend.url}/webhook", json=body, timeout=30)
        assert r.status_code == 401, r.text
    assert store.stats()["annotations"] == before


def test_what_a_stopped_backend_missed_is_repaired_by_ls_sync(ls, server, project, backend, tmp_path):
    from surgenet_assist.cli.main import app

    store = _store(backend, project.project_id)
    _annotate(ls, project.task_ids[3], "Fat")
    poll(lambda: _live(store) == 4, what="the annotation in the store")
    backend.stop()  # Label Studio's webhooks fail while it is down and are never retried
    _annotate(ls, project.task_ids[2], "Liver")
    ls.tasks.delete(id=str(project.task_ids[3]))  # takes its annotation along, no annotation event
    backend.start()
    store = _store(backend, project.project_id)
    assert _live(store) == 4  # the store missed both
    env = {"LABEL_STUDIO_URL": server["url"], "LABEL_STUDIO_API_KEY": server["pat"]}
    args = ["ls", "sync", "--project", str(project.project_id), "--db", backend.db, "--json"]
    res = CliRunner().invoke(app, args, env=env)
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output)[0]
    counts = summary["counts"]
    assert counts["new revisions"] == 2 and counts["tombstoned (gone from Label Studio)"] == 2
    assert server["pat"] not in res.output
    _same_as_label_studio(server, backend, project.project_id, tmp_path)
    again = json.loads(CliRunner().invoke(app, args, env=env).output)[0]["counts"]
    assert again.get("new revisions", 0) == 0 and again["tombstoned (gone from Label Studio)"] == 0


def test_two_label_studio_projects_stay_apart(ls, server, project, backend, tmp_path):
    other = _project(server, backend, tmp_path, "caseB", n=2)
    before = _live(_store(backend, project.project_id))
    _annotate(ls, other.task_ids[0], "Gallbladder")
    poll(lambda: _live(_store(backend, other.project_id)) == 2, what="caseB labels")
    assert _live(_store(backend, project.project_id)) == before
    assert {f"label-studio-{project.project_id}", f"label-studio-{other.project_id}"} <= set(
        backend.store.projects()
    )
