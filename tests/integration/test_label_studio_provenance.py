"""Which label trains, what exports, and independent test labels, against a REAL Label Studio 1.23.

Two annotators on one task and Label Studio's ground-truth star; "create annotations from predictions" (its
data-manager action); an edit through the API; webhooks (verified: re-read from Label Studio) and ``ls sync``
into the store; our export with every annotator, imported into an empty store and into Label Studio itself.
And the backend as teams get it: no pre-annotation for tasks of test videos, from ``/predict`` (Label
Studio's "Retrieve predictions") and from ``ls preannotate``.
"""

from __future__ import annotations

import json
import threading

import pytest
from ls_live import TOKEN, _local_tasks, brush, choices, export, free_port, poll, rect_mask
from ls_semantics import assert_same_annotations
from store_helpers import live_label_state

from surgenet_assist.core.store import LabelStore, Provenance, split_for_video

pytestmark = pytest.mark.slow


def video_in(split: str, prefix: str) -> str:
    """The first ``<prefix>-NN`` the store's rule puts in ``split`` (a name chosen for that property)."""
    return next(n for n in (f"{prefix}-{k:02d}" for k in range(200)) if split_for_video(n) == split)


@pytest.fixture(scope="module")
def teams_backend(ls_server, tmp_path_factory):
    """Our backend with the defaults teams get (test videos not pre-annotated), verifying every webhook."""
    from werkzeug.serving import make_server

    from surgenet_assist.backend.app import BackendSettings, create_app
    from surgenet_assist.core.model import SurgeNetAssistModel
    from surgenet_assist.core.predictor import Predictor

    model = SurgeNetAssistModel.create(random_init=True)
    predictor = Predictor(model, batch_size=4, short_side=64, model_version="prov-1", device="cpu")
    db = f"sqlite:///{tmp_path_factory.mktemp('prov-store') / 'store.db'}"
    settings = BackendSettings(db_url=db, label_studio_url=ls_server["url"], label_studio_api_key=TOKEN)
    app = create_app(settings, predictor=predictor)
    server = make_server("127.0.0.1", free_port(), app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield {"url": f"http://127.0.0.1:{server.server_port}", "db": db, "model": model}
    finally:
        server.shutdown()
        app.extensions["surgenet"].store.close()


@pytest.fixture(scope="module")
def api(ls_server):
    from surgenet_assist.backend.ls_api import LabelStudioAPI

    client = LabelStudioAPI(ls_server["url"], TOKEN)
    yield client
    client.close()


def _project(ls, ls_server, backend, title: str, videos: dict[str, int]) -> tuple[int, dict[str, list[int]]]:
    """A project of frame tasks (local files with ``source_video``/``frame_index``, as ``ls setup-project``
    imports them), our backend connected; returns its id and the task ids per video."""
    from surgenet_assist.core.formats.ls_config import image_config
    from surgenet_assist.core.synthetic import generate_clip

    project = ls.projects.create(title=title, label_config=image_config())
    tasks = {}
    for k, (video, n) in enumerate(videos.items()):
        frames = list(generate_clip(40 + k, n, 64, 96).frames)
        tasks[video] = _local_tasks(ls, project.id, ls_server["files"], ls_server["files"] / video, frames)
    ls.ml.create(project=project.id, url=backend["url"], title="surgenet-assist", is_interactive=False)
    return project.id, tasks


def test_ground_truth_two_annotators_predictions_turned_into_annotations_and_the_export(
    ls, ls_server, teams_backend, api, tmp_path
):
    from surgenet_assist.backend.sync import sync_project
    from surgenet_assist.core.formats.label_studio import export_label_studio, import_label_studio
    from surgenet_assist.core.formats.ls_config import image_config

    cfg, url = image_config(), ls_server["url"]
    video = video_in("train", "prov-gt")
    pid, tasks = _project(ls, ls_server, teams_backend, "provenance", {video: 2})
    first, second = tasks[video]
    admin = api.get("/api/current-user/whoami", what="who am I")["id"]
    user = {"username": "annotator-b", "email": "b@example.com"}
    other = api.request("POST", "/api/users/", what="create a user", json=user)["id"]
    # two annotators on the first frame; the first one's gets the star, then the other one's is updated
    mine = ls.annotations.create(
        id=first, result=[brush("m1", "Liver", rect_mask(4, 30, 6, 50)), choices("c1", "cvs", ["C1"])]
    )
    theirs = ls.annotations.create(
        id=first, result=[brush("m1", "Gallbladder", rect_mask(10, 40, 20, 70))], completed_by=other
    )
    ls.annotations.update(id=mine.id, ground_truth=True)
    ls.annotations.update(id=theirs.id, result=[brush("m1", "Gallbladder", rect_mask(12, 44, 20, 70))])
    # the second frame: a prediction turned into an annotation by the data manager's action
    predicted = [brush("p1", "Fat", rect_mask(2, 20, 3, 30))]
    ls.predictions.create(task=second, result=predicted, model_version="pred-9")
    api.request(
        "POST", "/api/dm/actions", what="create annotations from predictions",
        params={"id": "predictions_to_annotations", "project": pid},
        json={"selectedItems": {"all": False, "included": [second]}, "model_version": "pred-9"},
    )
    store = LabelStore(teams_backend["db"], project=f"label-studio-{pid}")
    poll(lambda: len(store.live_labels("segmentation")) == 3, what="the three annotations in the store")
    poll(lambda: [r.author for r in store.training_labels("segmentation")] == [f"ls-user:{admin}"],
         what="the starred annotation as the training label")
    poll(lambda: {r.frame_start: r.author for r in store.current_human_labels("segmentation")}.get(0)
         == f"ls-user:{other}", what="the other annotator's update")
    (trained,) = store.training_labels("segmentation")
    assert trained.frame_start == 0 and trained.provenance == Provenance(ground_truth=True)
    newest = store.current_human_labels("segmentation")
    assert {r.frame_start: r.author for r in newest} == {0: f"ls-user:{other}", 1: f"ls-user:{admin}"}
    (made,) = [r for r in store.training_labels("segmentation", unreviewed=True) if r.frame_start == 1]
    assert made.provenance == Provenance(True, "pred-9", reviewed=False)  # the version from Label Studio
    # someone corrects it through the API: from now on it trains, still marked as started from pred-9
    ls.annotations.update(id=made.ls_annotation_id, result=[brush("p1", "Fat", rect_mask(2, 24, 3, 40))])
    poll(lambda: {r.frame_start for r in store.training_labels("segmentation")} == {0, 1}, what="the edit")
    edited = next(r for r in store.training_labels("segmentation") if r.frame_start == 1)
    assert edited.provenance == Provenance(True, "pred-9", reviewed=True)

    # `ls sync` into an empty store holds the same labels with the same provenance
    name = f"label-studio-{pid}"
    synced = LabelStore(f"sqlite:///{tmp_path / 'synced.db'}", project=name, migrate=True)
    sync_project(api, synced, pid)
    assert live_label_state(synced) == live_label_state(store)

    # our export: every annotator, each with its author and the star
    ls_export = export(url, pid)
    out = tmp_path / "ours.json"
    export_label_studio(store, out, annotations=True, label_config=cfg, tasks=ls_export, predictions=False)
    ours = json.loads(out.read_text())
    by_frame = {t["data"]["frame_index"]: t["annotations"] for t in ours}
    assert [(a["completed_by"], a["ground_truth"]) for a in by_frame[0]] == [(admin, True), (other, False)]
    assert_same_annotations(ours, ls_export)
    # ... imported into an empty store: the same state; into Label Studio: the same annotations and stars
    imported = LabelStore(f"sqlite:///{tmp_path / 'imported.db'}", project=name, migrate=True)
    import_label_studio(imported, out, label_config=cfg, project=name)
    assert live_label_state(imported) == live_label_state(store)
    copy = ls.projects.create(title="provenance copy", label_config=cfg)
    ls.projects.import_tasks(id=copy.id, request=[{k: v for k, v in t.items() if k != "id"} for t in ours])
    back = export(url, copy.id)
    assert_same_annotations(back, ours)
    stars = {
        t["data"]["frame_index"]: sorted((a["completed_by"], a["ground_truth"]) for a in t["annotations"])
        for t in back
    }
    assert stars[0] == sorted([(admin, True), (other, False)])
    for st in (store, synced, imported):
        st.close()


def test_test_videos_get_no_pre_annotation_from_retrieve_or_ls_preannotate(ls, ls_server, teams_backend):
    from surgenet_assist.backend.ls_client import preannotate
    from surgenet_assist.core.predictor import Predictor

    train, test = video_in("train", "prov-pre"), video_in("test", "prov-pre")
    pid, tasks = _project(ls, ls_server, teams_backend, "held out", {train: 1, test: 1})
    (train_task,), (test_task,) = tasks[train], tasks[test]
    ls.actions.create(
        id="retrieve_tasks_predictions", project=pid, selected_items={"all": True, "excluded": []}
    )

    def regions(version: str) -> dict[int, int]:
        return {p.task: len(p.result) for p in ls.predictions.list(project=pid) if p.model_version == version}

    poll(lambda: len(regions("prov-1")) == 2, what="predictions of both tasks")
    got = regions("prov-1")
    assert got[train_task] > 0 and got[test_task] == 0  # the test video's task: an empty prediction
    # ls preannotate with a new version: the same rule, the task reported as held out
    model = teams_backend["model"]
    newer = Predictor(model, batch_size=2, short_side=64, model_version="prov-2", device="cpu")
    with LabelStore(teams_backend["db"]) as store:
        project = f"label-studio-{pid}"
        rep = preannotate(
            ls_server["url"], TOKEN, pid, newer, progress=False, store=store, store_project=project
        )
    assert rep.held_out == {test_task: "test video: empty prediction"}
    assert (rep.predicted, rep.failed) == (1, {})
    got = regions("prov-2")
    assert got[train_task] > 0 and got[test_task] == 0
