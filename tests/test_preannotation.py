"""Independent test labels (issue 22 item 4), at the backend: the batch ``/predict`` leaves tasks of test and
final videos without a pre-annotation unless the team turns it on, and where it is on, the labels made from
those pre-annotations are stored as started from the model that made them, so the gate can leave them out.

The split of a task's video is the stored one, else the one the video will get when it enters the store.
"""

from __future__ import annotations

import json
import logging

import cv2
import pytest

from surgenet_assist.backend.app import BackendSettings, create_app
from surgenet_assist.backend.labeling_configs import image_config
from surgenet_assist.backend.media import MediaError
from surgenet_assist.core.store import LabelStore, split_for_video
from surgenet_assist.training_loop.datasets import label_origins, videos_started_from

H, W = 64, 96
PROJECT = "label-studio-1"  # the store project of Label Studio project 1, which the requests name
EMPTY = {"model_version": "pred-1.0", "score": 0.0, "result": []}


def video_in(split: str, avoid: set[str] = frozenset()) -> str:
    """The first ``caseNNN`` the store's rule puts in ``split`` (a name with that property, not a result)."""
    names = (f"case{k:03d}" for k in range(1000))
    return next(n for n in names if split_for_video(n) == split and n not in avoid)


@pytest.fixture(scope="module")
def predictor():
    from surgenet_assist.core.model import SurgeNetAssistModel
    from surgenet_assist.core.predictor import Predictor

    model = SurgeNetAssistModel.create(random_init=True)
    return Predictor(model, batch_size=4, short_side=64, model_version="pred-1.0", device="cpu")


@pytest.fixture(scope="module")
def frames(tmp_path_factory):
    from surgenet_assist.core.synthetic import generate_clip

    root = tmp_path_factory.mktemp("frames")
    clip = generate_clip(5, 4, H, W)
    out = {}
    for i in range(4):
        p = root / f"f{i}.png"
        cv2.imwrite(str(p), cv2.cvtColor(clip.frames[i], cv2.COLOR_RGB2BGR))
        out[f"/data/upload/1/f{i}.png"] = p
    return out


@pytest.fixture()
def store(tmp_path):
    s = LabelStore(f"sqlite:///{tmp_path / 'store.db'}", migrate=True)
    yield s
    s.close()


def _client(predictor, frames, store, **settings):
    def fetch(url, task_id=None):
        if url not in frames:
            raise MediaError(f"cannot fetch {url}", url=url)
        return frames[url]

    app = create_app(BackendSettings(**settings), predictor=predictor, store=store, fetch=fetch)
    return app.test_client()


def _task(task_id: int, k: int, video: str) -> dict:
    data = {"image": f"/data/upload/1/f{k}.png", "source_video": video, "frame_index": k}
    return {"id": task_id, "data": data}


def _predict(client, tasks: list[dict]) -> dict:
    r = client.post(
        "/predict",
        data=json.dumps({"tasks": tasks, "label_config": image_config(), "project": "1.1795623120"}),
        content_type="application/json",
    )
    assert r.status_code == 200, r.get_json()
    return r.get_json()


def test_a_test_videos_task_gets_no_pre_annotation_by_default(predictor, frames, store, caplog):
    train, test, final = video_in("train"), video_in("test"), video_in("final")
    pinned = video_in("train", {train})  # the rule says train, the store says test: the store wins
    store.add_video(train, 25.0, project=PROJECT)
    store.add_video(pinned, 25.0, split="test", project=PROJECT)
    tasks = [_task(1, 0, train), _task(2, 1, test), _task(3, 2, final), _task(4, 3, pinned)]
    client = _client(predictor, frames, store)
    with caplog.at_level(logging.INFO, logger="surgenet_assist.backend"):
        body = _predict(client, tasks)
    results = body["results"]
    assert len(results) == 4 and results[1:] == [EMPTY] * 3
    assert any(r["type"] == "brushlabels" for r in results[0]["result"])
    assert body["failed"] == [
        {"task": 2, "reason": "held-out split", "split": "test"},
        {"task": 3, "reason": "held-out split", "split": "final"},
        {"task": 4, "reason": "held-out split", "split": "test"},
    ]
    assert "task 2: its video is in the test split: empty prediction" in caplog.text
    assert "SURGENET_ASSIST_PREANNOTATE_HELD_OUT=1" in caplog.text
    # the team turns it on: every task is pre-annotated
    on = _predict(_client(predictor, frames, store, preannotate_held_out=True), tasks)
    assert "failed" not in on
    assert all(any(r["type"] == "brushlabels" for r in p["result"]) for p in on["results"])


def test_with_it_on_a_test_videos_labels_that_started_from_the_model_are_flagged(predictor, frames, store):
    corrected, drawn = video_in("test"), video_in("test", {video_in("test")})
    store.ensure_project(PROJECT)  # Label Studio project 1 is connected: its webhooks are taken
    client = _client(predictor, frames, store, preannotate_held_out=True)
    tasks = [_task(11, 0, corrected), _task(12, 1, drawn)]
    pre = _predict(client, tasks)["results"][0]
    assert pre["model_version"] == "pred-1.0" and pre["result"]
    cfg = {"id": 1, "label_config": image_config()}
    # the annotator corrects the pre-annotation in the editor: Label Studio sends parent_prediction, and the
    # task as its API returns it lists the prediction with its model_version
    started = {
        "id": 501, "result": pre["result"], "completed_by": 1, "updated_by": 1, "lead_time": 35.2,
        "parent_prediction": 900, "ground_truth": False, "was_cancelled": False,
        "updated_at": "2026-02-01T10:00:00Z",
    }
    task = {**tasks[0], "predictions": [{"id": 900, "model_version": pre["model_version"]}]}
    from_scratch = {**started, "id": 502, "parent_prediction": None}
    for ann, t in ((started, task), (from_scratch, tasks[1])):
        r = client.post(
            "/webhook",
            data=json.dumps({"action": "ANNOTATION_CREATED", "annotation": ann, "task": t, "project": cfg}),
            content_type="application/json",
        )
        assert r.status_code == 202, r.get_json()
    assert client.application.extensions["surgenet"].webhooks.queue.wait_idle(60)  # written on its worker
    origins = label_origins(store, "test", project=PROJECT)
    was, new = store.video_id(corrected, PROJECT), store.video_id(drawn, PROJECT)
    assert set(origins) == {was, new} and origins[was].labels == origins[new].labels > 0
    assert origins[was].started_from == {"pred-1.0": origins[was].labels} and origins[new].independent
    assert videos_started_from(origins, {"pred-1.0", "champion-0"}) == {was}
    assert videos_started_from(origins, {"another-model"}) == set()
    # the started-from label was edited (lead time): it trains and judges, flagged rather than dropped
    assert len(store.training_labels("segmentation", project=PROJECT)) == 2
