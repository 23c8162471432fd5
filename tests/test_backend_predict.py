"""``/predict`` and ``/setup`` agree on one model_version in every serving mode (a served model, no model,
day-one assistance), and a batch with one unreadable task is still served: that task gets an empty
prediction of the same version, a log line and a counter, the others get their regions.

Label Studio skips a task that already has a prediction of the version ``/setup`` reported and stores a new
prediction row every time the two differ (``tests/integration/test_label_studio_versions.py`` checks that
against a real Label Studio); it stores nothing for any task of a request that fails.


Every task is pre-annotated here, test videos included (``preannotate_held_out=True``); which tasks the
backend leaves empty by default is ``tests/test_preannotation.py``'s subject.
"""

from __future__ import annotations

import json
import logging

import cv2
import numpy as np
import pytest
from test_backend_propagation import _brush, _event, _frame_task, app, backbone, media  # noqa: F401 - fixtures
from webhook_helpers import deliver

from surgenet_assist.backend.app import NO_MODEL_VERSION, BackendSettings, create_app
from surgenet_assist.backend.labeling_configs import image_config, video_config
from surgenet_assist.backend.media import MediaError

H, W = 64, 96

WIRE = BackendSettings(preannotate_held_out=True)  # every task pre-annotated (module docstring)


@pytest.fixture(scope="module")
def predictor():
    from surgenet_assist.core.model import SurgeNetAssistModel
    from surgenet_assist.core.predictor import Predictor

    model = SurgeNetAssistModel.create(random_init=True)
    return Predictor(model, batch_size=4, short_side=64, model_version="pred-1.0", device="cpu")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from surgenet_assist.core.synthetic import generate_clip

    root = tmp_path_factory.mktemp("frames")
    clip = generate_clip(5, 12, H, W)
    out = {}
    for i in range(3):
        p = root / f"f{i}.png"
        cv2.imwrite(str(p), cv2.cvtColor(clip.frames[i], cv2.COLOR_RGB2BGR))
        out[f"/data/upload/1/f{i}.png"] = p
    out["/data/upload/1/clip.mp4"] = clip.write_video(root / "clip.mp4", fps=10)
    bad = root / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not an image" * 8)
    out["/data/upload/1/bad.png"] = bad
    broken = root / "broken.mp4"
    broken.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 64)
    out["/data/upload/1/broken.mp4"] = broken
    return out


@pytest.fixture()
def store(tmp_path):
    from surgenet_assist.core.store import LabelStore

    s = LabelStore(f"sqlite:///{tmp_path / 'store.db'}", migrate=True)
    yield s
    s.close()


def _fetch(files):
    def fetch(url, task_id=None):
        if url not in files:
            raise MediaError(f"cannot fetch {url}: HTTP 404 (not found)", url=url)
        return files[url]

    return fetch


def post(client, path, body):
    return client.post(path, data=json.dumps(body), content_type="application/json")


def _tasks(urls):
    return [{"id": 10 + i, "data": {"image": u}} for i, u in enumerate(urls)]


def _versions(client, tasks, cfg, project="1.1795623120"):
    """(what /setup reports, the set of versions /predict stamps, the /predict body)."""
    setup = post(client, "/setup", {"project": project, "schema": cfg})
    assert setup.status_code == 200, setup.get_json()
    r = post(client, "/predict", {"tasks": tasks, "label_config": cfg, "project": project})
    assert r.status_code == 200, r.get_json()
    body = r.get_json()
    stamped = {p["model_version"] for p in body["results"]} | {body["model_version"]}
    return setup.get_json()["model_version"], stamped, body


# ------------------------------------------------------------------------------------------------------------
# one model_version
# ------------------------------------------------------------------------------------------------------------
def test_served_model_setup_version_is_the_predict_version(predictor, files, store):
    c = create_app(WIRE, predictor=predictor, store=store, fetch=_fetch(files)).test_client()
    tasks = _tasks(["/data/upload/1/f0.png", "/data/upload/1/f1.png"])
    reported, stamped, _ = _versions(c, tasks, image_config())
    assert reported == "pred-1.0" and stamped == {"pred-1.0"}


def test_no_model_setup_version_is_the_predict_version(files, store):
    c = create_app(WIRE, store=store, fetch=_fetch(files)).test_client()
    reported, stamped, body = _versions(c, _tasks(["/data/upload/1/f0.png"]), image_config())
    assert reported == NO_MODEL_VERSION and stamped == {NO_MODEL_VERSION}
    assert body["results"] == [{"model_version": NO_MODEL_VERSION, "score": 0.0, "result": []}]


def test_day_one_setup_version_is_the_predict_version_and_moves_with_what_is_served(app, media):  # noqa: F811
    """No labels: no-model. A label: propagation-<label version> on every task (propagated or not). Instant
    heads fitted on it: their version. Each step changes what /setup reports; /predict stamps the same."""
    _, masks = media
    c = app.test_client()
    assist = app.extensions["surgenet"].assist
    cfg = image_config()
    tasks = [_frame_task(5), {"id": 7, "data": {"image": "/data/upload/1/disc_6.png"}}]  # the 2nd: no video

    reported0, stamped0, _ = _versions(c, tasks, cfg, project="1.1")
    assert reported0 == NO_MODEL_VERSION and stamped0 == {NO_MODEL_VERSION}

    k = 2
    result = [
        _brush("Gallbladder", (masks[k] == 1).astype(np.uint8) * 255),
        _brush("Liver", (masks[k] == 0).astype(np.uint8) * 255),
    ]
    deliver(c, _event(1, _frame_task(k), result, cfg))
    assert assist.updater.wait_idle(120) and assist.updater.error is None
    heads = assist.updater.version
    assert heads.startswith("instant-")
    reported2, stamped2, body = _versions(c, tasks, cfg, project="1.1")
    assert reported2 == heads and stamped2 == {heads}
    assert all(p["result"] for p in body["results"])  # propagated and instant answers, one version

    # a newer label while the refit is held back: the version names both, and still agrees
    assist.updater.close()
    assist.updater = None
    result = [_brush("Liver", np.full(masks[k].shape, 255, np.uint8))]
    deliver(c, _event(2, _frame_task(9), result, cfg))
    reported3, stamped3, _ = _versions(c, tasks, cfg, project="1.1")
    label_version = app.extensions["surgenet"].store.label_version()
    assert reported3 == f"{heads}+propagation-{label_version}" and stamped3 == {reported3}
    assert len({reported0, reported2, reported3}) == 3


def test_day_one_propagation_only_version(app, media):  # noqa: F811
    _, masks = media
    c = app.test_client()
    assist = app.extensions["surgenet"].assist
    assist.updater.close()  # no instant heads: propagation only
    assist.updater = None
    cfg = image_config()
    result = [_brush("Gallbladder", (masks[2] == 1).astype(np.uint8) * 255)]
    deliver(c, _event(1, _frame_task(2), result, cfg))
    tasks = [_frame_task(5), {"id": 7, "data": {"image": "/data/upload/1/disc_6.png"}}]
    reported, stamped, body = _versions(c, tasks, cfg, project="1.1")
    label_version = app.extensions["surgenet"].store.label_version()
    assert reported == f"propagation-{label_version}" and stamped == {reported}
    assert body["results"][0]["result"] and body["results"][1]["result"] == []  # nothing to say: empty


# ------------------------------------------------------------------------------------------------------------
# partial failure stays partial
# ------------------------------------------------------------------------------------------------------------
def _failures(client, reason="media"):
    text = client.get("/metrics").get_data(as_text=True)
    for line in text.splitlines():
        if line.startswith(f'surgenet_backend_prediction_failures_total{{reason="{reason}"}}'):
            return float(line.split()[-1])
    return 0.0


@pytest.mark.parametrize("middle", ["/data/upload/1/missing.png", "/data/upload/1/bad.png", None])
def test_batch_with_one_unreadable_task_serves_the_others(predictor, files, store, caplog, middle):
    c = create_app(WIRE, predictor=predictor, store=store, fetch=_fetch(files)).test_client()
    tasks = _tasks(["/data/upload/1/f0.png", "/data/upload/1/f1.png", "/data/upload/1/f2.png"])
    if middle is None:
        tasks[1]["data"] = {"picture": "x.png"}  # no $image at all
    else:
        tasks[1]["data"]["image"] = middle
    before = _failures(c)
    with caplog.at_level(logging.WARNING, logger="surgenet_assist.backend"):
        r = post(c, "/predict", {"tasks": tasks, "label_config": image_config(), "project": "1.1"})
    assert r.status_code == 200, r.get_json()
    body = r.get_json()
    assert len(body["results"]) == 3
    assert body["results"][1] == {"model_version": "pred-1.0", "score": 0.0, "result": []}
    for i in (0, 2):
        assert body["results"][i]["model_version"] == "pred-1.0"
        assert any(reg["type"] == "brushlabels" for reg in body["results"][i]["result"])
    assert body["failed"] == [{"task": 11, "reason": "media", "url": middle}]
    assert _failures(c) == before + 1
    line = [rec.getMessage() for rec in caplog.records if "task 11" in rec.getMessage()]
    assert line and (middle is None or middle in line[0])


def test_partial_failure_with_video_tasks_and_in_day_one_mode(predictor, files, store, app, media):  # noqa: F811
    c = create_app(WIRE, predictor=predictor, store=store, fetch=_fetch(files)).test_client()
    good = {"id": 1, "data": {"video": "/data/upload/1/clip.mp4"}}
    tasks = [good, {"id": 2, "data": {"video": "/data/upload/1/broken.mp4"}}, {**good, "id": 3}]
    body = post(c, "/predict", {"tasks": tasks, "label_config": video_config()}).get_json()
    assert [bool(p["result"]) for p in body["results"]] == [True, False, True]
    assert [f["task"] for f in body["failed"]] == [2] and _failures(c) == 1

    # day-one: one task's frame is missing, the others are served by the instant heads / propagation
    _, masks = media
    d = app.test_client()
    assist = app.extensions["surgenet"].assist
    cfg = image_config()
    result = [_brush("Gallbladder", (masks[2] == 1).astype(np.uint8) * 255)]
    deliver(d, _event(1, _frame_task(2), result, cfg))
    assert assist.updater.wait_idle(120)
    lost = {"id": 99, "data": {"image": "/data/upload/1/gone.png"}}
    tasks = [_frame_task(4), lost, _frame_task(6)]
    body = post(d, "/predict", {"tasks": tasks, "label_config": cfg}).get_json()
    assert [bool(p["result"]) for p in body["results"]] == [True, False, True]
    assert len({p["model_version"] for p in body["results"]}) == 1 and _failures(d) == 1


def test_urls_in_failure_logs_lose_their_secrets(predictor, files, store, caplog):
    c = create_app(WIRE, predictor=predictor, store=store, fetch=_fetch(files)).test_client()
    url = "https://bucket.s3.amazonaws.com/f.png?X-Amz-Credential=AKIAXYZ&X-Amz-Signature=deadbeef42&token=tok99"
    tasks = _tasks(["/data/upload/1/f0.png", url])
    with caplog.at_level(logging.WARNING, logger="surgenet_assist.backend"):
        body = post(c, "/predict", {"tasks": tasks, "label_config": image_config()}).get_json()
    assert body["results"][1]["result"] == [] and body["results"][0]["result"]
    for secret in ("AKIAXYZ", "deadbeef42", "tok99"):
        assert secret not in caplog.text and secret not in json.dumps(body)
    assert "task 11" in caplog.text and "bucket.s3.amazonaws.com/f.png" in caplog.text


@pytest.mark.parametrize(
    ("raw", "error"),
    [(b"{nope", "malformed_json"), (json.dumps({"label_config": "<View/>"}).encode(), "missing_tasks")],
)
def test_malformed_requests_are_still_400(predictor, files, store, raw, error):
    c = create_app(WIRE, predictor=predictor, store=store, fetch=_fetch(files)).test_client()
    r = c.post("/predict", data=raw, content_type="application/json")
    assert r.status_code == 400 and r.get_json()["error"] == error
