"""Task media from a REAL Label Studio 1.23 with a personal access token, and what a revoked token does.

The backend downloads uploaded frames from Label Studio with the access token it gets for a personal access
token. When that token is revoked (``POST /api/token/blacklist/``), the next refresh is refused: ``/predict``
answers 503 naming the token problem (Label Studio then stores nothing, and asks again once the token is
fixed) and ``/health`` is not UP. The same routes against a stand-in: ``tests/test_backend_media.py``.
"""

from __future__ import annotations

import json

import cv2
import pytest
import requests
from ls_live import TOKEN

pytestmark = pytest.mark.slow
H, W = 64, 96


def _predict(client, tasks):
    from surgenet_assist.backend.labeling_configs import image_config

    body = {"tasks": tasks, "label_config": image_config(), "project": "1.1"}
    return client.post("/predict", data=json.dumps(body), content_type="application/json")


def test_a_revoked_personal_access_token_is_a_503_and_health_is_not_up(ls_server, tmp_path):
    from surgenet_assist.backend.app import BackendSettings, create_app
    from surgenet_assist.backend.ls_api import LabelStudioAPI
    from surgenet_assist.backend.ls_client import setup_project
    from surgenet_assist.core.model import SurgeNetAssistModel
    from surgenet_assist.core.predictor import Predictor
    from surgenet_assist.core.synthetic import generate_clip

    url = ls_server["url"]
    legacy = {"Authorization": f"Token {TOKEN}"}
    created = requests.post(f"{url}/api/token/", headers=legacy, timeout=30)
    assert created.status_code == 201, created.text
    pat = created.json()["token"]

    folder = tmp_path / "frames"  # outside Label Studio's document root: uploaded
    folder.mkdir()
    for i, frame in enumerate(generate_clip(21, 2, H, W).frames):
        cv2.imwrite(str(folder / f"video41_{i:06d}.png"), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    project = setup_project(url, pat, frames=folder)
    reader = LabelStudioAPI(url, TOKEN)
    tasks = [reader.task(t) for t in project.task_ids]
    assert all(t["data"]["image"].startswith("/data/upload/") for t in tasks)

    predictor = Predictor(
        SurgeNetAssistModel.create(random_init=True), batch_size=2, short_side=64, model_version="m-1"
    )
    settings = BackendSettings(
        label_studio_url=url,
        label_studio_api_key=pat,
        media_cache_dir=str(tmp_path / "cache"),
        extra={"open_store": False},
    )
    app = create_app(settings, predictor=predictor)
    client = app.test_client()
    first = _predict(client, tasks[:1])
    assert first.status_code == 200, first.get_json()
    assert first.get_json()["results"][0]["result"] and "failed" not in first.get_json()
    assert client.get("/health").get_json()["status"] == "UP"

    revoked = requests.post(f"{url}/api/token/blacklist/", json={"refresh": pat}, headers=legacy, timeout=30)
    assert revoked.status_code == 204, revoked.text
    # an access token issued before the revocation lives at most 5 more minutes; let it be over now
    app.extensions["surgenet"].media.api.invalidate()

    r = _predict(client, tasks[1:])  # media not cached yet: needs Label Studio, hence the token
    assert r.status_code == 503, r.get_json()
    err = r.get_json()
    assert err["error"] == "label_studio_token"
    assert "refused the personal access token" in err["detail"] and "HTTP 401" in err["detail"]
    assert "Personal Access Token" in err["hint"] and pat not in r.get_data(as_text=True)
    health = client.get("/health").get_json()
    assert health["status"] == "DEGRADED"
    assert health["label_studio_token"]["problem"] == err["detail"]
    assert pat not in json.dumps(health) and url not in json.dumps(health)
