"""One model_version story against a REAL Label Studio 1.23: Label Studio skips a task that already has a
prediction of the version ``/setup`` reported (``ml/models.py``, ``predict_tasks``), so a second "Retrieve
predictions" stores no new prediction row, with a served model and in day-one mode; when what is served
changes, the new version is reported and Label Studio asks again, once.

Fixtures (``ls_server``, ``backend``, ``ls``) are in ``conftest.py``; ``_retrieve`` is the data manager's
``retrieve_tasks_predictions`` action, as in ``test_label_studio.py``.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from ls_live import TOKEN, ServedBackend, brush, rect_mask
from ls_live import poll as _poll
from test_label_studio import _retrieve

pytestmark = pytest.mark.slow
H, W = 64, 96


def _frames_project(ls_server, backend_url: str, name: str, seed: int, n: int = 3):
    from surgenet_assist.backend.ls_client import setup_project
    from surgenet_assist.core.synthetic import generate_clip

    folder = ls_server["files"] / name
    folder.mkdir()
    for i, frame in enumerate(generate_clip(seed, n, H, W).frames):
        cv2.imwrite(str(folder / f"{i:05d}.png"), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    return setup_project(
        ls_server["url"], TOKEN, frames=folder, backend_url=backend_url, document_root=ls_server["files"]
    )


def _rows(ls, project_id: int) -> list:
    return list(ls.predictions.list(project=project_id))


def test_served_model_second_retrieve_adds_no_prediction(ls, ls_server, backend):
    res = _frames_project(ls_server, backend["url"], "versions-model", seed=21)
    n = len(res.task_ids)
    first = _retrieve(ls, res.project_id)
    assert len(first) == n and {p.model_version for p in first} == {"it-1.0"}
    assert ls.ml.get(id=res.ml_backend_id).model_version == "it-1.0"  # what /setup reported
    assert len(_retrieve(ls, res.project_id)) == n  # asked nothing, stored nothing
    assert len(_retrieve(ls, res.project_id)) == n

    predictor = backend["predictor"]
    try:  # new weights, new version: asked again once
        predictor.model_version = "it-1.1"
        again = _retrieve(ls, res.project_id)
        assert len(again) == 2 * n and [p.model_version for p in again].count("it-1.1") == n
        assert len(_retrieve(ls, res.project_id)) == 2 * n
    finally:
        predictor.model_version = "it-1.0"


@pytest.fixture(scope="module")
def day_one_backend(ls_server, tmp_path_factory):
    """A second backend in day-one mode: no model, label propagation over the store's labels (a random-init
    backbone; no instant-head worker, so the versions are deterministic)."""
    import torch

    from surgenet_assist.backend.app import BackendSettings, create_app
    from surgenet_assist.core.backbone import load_backbone
    from surgenet_assist.core.embedding_cache import EmbeddingCache
    from surgenet_assist.core.store import LabelStore
    from surgenet_assist.training_loop.assist import DayOneAssist

    tmp = tmp_path_factory.mktemp("day-one")
    store = LabelStore(f"sqlite:///{tmp / 'store.db'}", migrate=True)
    torch.manual_seed(0)
    files = ls_server["files"]
    assist = DayOneAssist(
        store,
        load_backbone(random_init=True),
        short_side=64,
        sample_fps=None,
        cache=EmbeddingCache(tmp / "emb"),
        resolve=lambda video: files / video,  # store videos are the frame folders under the document root
        project="day-one",  # every Label Studio project's labels go there (BackendSettings.store_project)
        worker=False,
    )
    # its own Label Studio connection, as deployed: media from a loopback Label Studio is fetched with it (the
    # host Label Studio names in /setup is trusted with a private address only behind Basic Auth)
    settings = BackendSettings(
        store_project="day-one", label_studio_url=ls_server["url"], label_studio_api_key=TOKEN
    )
    app = create_app(settings, store=store, assist=assist)
    served = ServedBackend(app)
    try:
        yield {"url": served.url, "store": store, "assist": assist}
    finally:
        served.stop()
        assist.close()
        store.close()


def test_day_one_second_retrieve_adds_no_prediction(ls, ls_server, day_one_backend):
    store = day_one_backend["store"]
    res = _frames_project(ls_server, day_one_backend["url"], "versions-day-one", seed=22, n=4)
    n = len(res.task_ids)
    first = _retrieve(ls, res.project_id)
    assert len(first) == n and {p.model_version for p in first} == {"no-model"}  # nothing labelled yet
    assert len(_retrieve(ls, res.project_id)) == n

    # a label: what is served changes (propagation), so the version does, and Label Studio asks again once
    ls.annotations.create(id=res.task_ids[0], result=[brush("r1", "Liver", rect_mask(20, 50, 10, 60))])
    _poll(lambda: store.label_version() > 0, what="the annotation in the day-one store")
    version = f"propagation-{store.label_version()}"
    again = _retrieve(ls, res.project_id)
    assert ls.ml.get(id=res.ml_backend_id).model_version == version
    assert len(again) == 2 * n and [p.model_version for p in again].count(version) == n
    propagated = [p for p in again if p.model_version == version and p.task != res.task_ids[0]]
    assert any(p.result for p in propagated), "the other frames of the labelled video get propagated masks"
    assert len(_retrieve(ls, res.project_id)) == 2 * n  # the second retrieve adds none
    assert np.isfinite([p.score for p in again]).all()
