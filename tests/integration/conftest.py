"""Fixtures shared by the tests against a real Label Studio (one server and one backend per session):
``ls_server`` (Label Studio 1.23 from ``.ls-venv``), ``backend`` (our app with the random-init model),
``ls`` (the SDK client), ``image_project`` (a frame project connected to ``backend``)."""

from __future__ import annotations

import os

import cv2
import pytest
from ls_live import LS_VENV, TOKEN, ServedBackend, label_studio

H, W = 64, 96


@pytest.fixture(scope="session")
def label_studio_installed() -> None:
    """Skip (or, with SURGENET_ASSIST_REQUIRE_LABEL_STUDIO=1 as in CI, fail) without the Label Studio venv."""
    if not (LS_VENV / "bin" / "label-studio").exists():
        reason = f"Label Studio virtualenv not found at {LS_VENV}; run scripts/setup_label_studio.sh"
        if os.environ.get("SURGENET_ASSIST_REQUIRE_LABEL_STUDIO") == "1":
            pytest.fail(reason + " (required: SURGENET_ASSIST_REQUIRE_LABEL_STUDIO=1)")
        pytest.skip(reason)


@pytest.fixture(scope="session")
def ls_server(tmp_path_factory, label_studio_installed):
    with label_studio(tmp_path_factory.mktemp("ls")) as server:
        yield server


@pytest.fixture(scope="session")
def backend(ls_server, tmp_path_factory):
    """Our backend in-process (the server `serve` runs) with the random-init model and a SQLite store."""
    from surgenet_assist.backend.app import BackendSettings, create_app
    from surgenet_assist.core.model import SurgeNetAssistModel
    from surgenet_assist.core.predictor import Predictor

    model = SurgeNetAssistModel.create(random_init=True)
    predictor = Predictor(model, batch_size=4, short_side=64, model_version="it-1.0", device="cpu")
    db = f"sqlite:///{tmp_path_factory.mktemp('store') / 'store.db'}"
    # the service opens its store; with its own Label Studio connection it verifies every webhook
    settings = BackendSettings(db_url=db, label_studio_url=ls_server["url"], label_studio_api_key=TOKEN)
    app = create_app(settings, predictor=predictor)
    store = app.extensions["surgenet"].store
    served = ServedBackend(app)
    try:
        yield {"url": served.url, "store": store, "predictor": predictor, "model": model}
    finally:
        served.stop()
        store.close()


@pytest.fixture(scope="session")
def ls(ls_server):
    from label_studio_sdk import LabelStudio

    return LabelStudio(base_url=ls_server["url"], api_key=TOKEN)


@pytest.fixture(scope="session")
def image_project(ls_server, backend):
    from surgenet_assist.backend.ls_client import setup_project
    from surgenet_assist.core.synthetic import generate_clip

    folder = ls_server["files"] / "case01"
    folder.mkdir()
    clip = generate_clip(11, 3, H, W)
    for i, frame in enumerate(clip.frames):
        cv2.imwrite(str(folder / f"{i:05d}.png"), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    return setup_project(
        ls_server["url"], TOKEN, frames=folder, backend_url=backend["url"], document_root=ls_server["files"]
    )
