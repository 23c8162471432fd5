"""Day-one assistance over HTTP: a label on frame k of a video -> propagated mask for frame k+3 (beats copying
the keyframe), phase timeline for a video task from its labelled ranges, instant heads refitted off the
request path (the webhook returns before the refit finishes).

Every task is pre-annotated here, test videos included (``preannotate_held_out=True``); which tasks the
backend leaves empty by default is ``tests/test_preannotation.py``'s subject.
"""

from __future__ import annotations

import json
import time

import cv2
import numpy as np
import pytest
import torch
from webhook_helpers import deliver

from surgenet_assist.backend.app import BackendSettings, create_app
from surgenet_assist.backend.labeling_configs import image_config, video_config
from surgenet_assist.backend.media import MediaError
from surgenet_assist.core.backbone import load_backbone
from surgenet_assist.core.embedding_cache import EmbeddingCache
from surgenet_assist.core.encoders import brush_rle_to_mask, mask_to_brush_rle
from surgenet_assist.core.schema import DEFAULT_SCHEMA
from surgenet_assist.core.synthetic import generate_clip
from surgenet_assist.training_loop import assist as assist_mod
from surgenet_assist.training_loop.assist import DayOneAssist

H, W, N = 120, 214, 12
GB, LIVER = DEFAULT_SCHEMA.class_id("Gallbladder"), DEFAULT_SCHEMA.class_id("Liver")


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    return load_backbone(random_init=True)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """A textured disc moving 6 px per frame (frames as PNG image tasks of one video) and a phase clip."""
    root = tmp_path_factory.mktemp("media")
    rng = np.random.default_rng(0)
    bg = cv2.GaussianBlur(rng.integers(0, 255, (H, W, 3)).astype(np.float32), (0, 0), 3)
    bg = (0.5 * bg + np.array([150, 60, 50])).clip(0, 255).astype(np.uint8)
    folder = root / "disc"
    folder.mkdir()
    files, masks = {}, []
    for t in range(N):
        mask = np.zeros((H, W), np.uint8)
        cv2.circle(mask, (40 + 6 * t, 60), 16, 1, -1)
        texture = (rng.normal(0, 12, (H, W, 3)) + np.array([70, 160, 200])).clip(0, 255).astype(np.uint8)
        image = bg.copy()
        image[mask == 1] = texture[mask == 1]
        cv2.imwrite(str(folder / f"frame_{t:03d}.png"), image[..., ::-1])
        files[f"/data/upload/1/disc_{t}.png"] = folder / f"frame_{t:03d}.png"
        masks.append(mask)
    files["/data/upload/1/case.mp4"] = folder
    clip = generate_clip(seed=3, num_frames=20, height=64, width=112)
    files["/data/upload/1/phases.avi"] = clip.write_video(root / "phases.avi", fps=25, codec="MJPG")
    return files, np.stack(masks)


@pytest.fixture()
def app(tmp_path, media, backbone, monkeypatch):
    from surgenet_assist.core.store import LabelStore

    monkeypatch.setenv("SURGENET_ASSIST_HOME", str(tmp_path / "home"))
    files = media[0]

    def fetch(url, task_id=None):
        if url not in files:
            raise MediaError(f"cannot fetch {url}", url=url)
        return files[url]

    store = LabelStore(f"sqlite:///{tmp_path / 'store.db'}", migrate=True)
    store.ensure_project("label-studio-1")  # Label Studio project 1 is connected: its webhooks are taken
    assist = DayOneAssist(
        store,
        backbone,
        short_side=96,
        sample_fps=None,
        cache=EmbeddingCache(tmp_path / "emb"),
        resolve=lambda u: fetch(u),
        instant_root=tmp_path / "instant",
        debounce_s=0.1,
        project="label-studio-1",  # the store project of Label Studio project 1, where its webhooks write
    )
    app = create_app(BackendSettings(preannotate_held_out=True), store=store, fetch=fetch, assist=assist)
    yield app
    assist.close()
    store.close()


def post(client, path, body):
    return client.post(path, data=json.dumps(body), content_type="application/json")


def _frame_task(t):
    return {
        "id": 100 + t,
        "data": {
            "image": f"/data/upload/1/disc_{t}.png",
            "source_video": "/data/upload/1/case.mp4",
            "frame_index": t,
        },
    }


def _brush(label, mask):
    return {
        "from_name": "mask",
        "to_name": "image",
        "type": "brushlabels",
        "original_width": W,
        "original_height": H,
        "value": {"format": "rle", "rle": mask_to_brush_rle(mask), "brushlabels": [label]},
    }


def _event(ann_id, task, result, cfg):
    return {
        "action": "ANNOTATION_CREATED",
        "annotation": {
            "id": ann_id,
            "result": result,
            "completed_by": 1,
            "was_cancelled": False,
            "updated_at": "2026-01-01T10:00:00Z",
        },
        "task": task,
        "project": {"id": 1, "label_config": cfg},
    }


def _iou(a, b):
    return float((a & b).sum() / max(1, (a | b).sum()))


def test_label_on_frame_k_propagates_to_k_plus_3_without_blocking(app, media, monkeypatch):
    _, masks = media
    slow_fit = assist_mod.fit_with_validation

    def slow(*a, **kw):
        time.sleep(1.5)  # a slow refit must not delay the webhook's response
        return slow_fit(*a, **kw)

    monkeypatch.setattr(assist_mod, "fit_with_validation", slow)
    c = app.test_client()
    assist = app.extensions["surgenet"].assist
    k = 2
    before = post(c, "/predict", {"tasks": [_frame_task(k + 3)], "label_config": image_config()}).get_json()
    assert before["results"][0]["result"] == []  # day 0: nothing labelled yet
    result = [
        _brush("Gallbladder", (masks[k] == 1).astype(np.uint8) * 255),
        _brush("Liver", (masks[k] == 0).astype(np.uint8) * 255),
    ]
    t0 = time.perf_counter()
    r = post(c, "/webhook", _event(1, _frame_task(k), result, image_config()))
    elapsed = time.perf_counter() - t0
    queue = app.extensions["surgenet"].webhooks.queue  # the label is written on the webhook worker
    assert r.status_code == 202 and queue.wait_idle(60)
    assert "segmentation" in queue.outcome(r.get_json()["job"])["annotations"][0]["labels"]
    assert elapsed < 1.0 and assist.updater.version is None  # returned while the refit is still running

    pred = post(c, "/predict", {"tasks": [_frame_task(k + 3)], "label_config": image_config()}).get_json()
    res = pred["results"][0]
    assert res["model_version"].startswith("propagation-")
    gb = [reg for reg in res["result"] if reg["value"]["brushlabels"] == ["Gallbladder"]]
    assert len(gb) == 1
    got = brush_rle_to_mask(gb[0]["value"]["rle"], H, W) > 127
    truth, copy = masks[k + 3] == 1, masks[k] == 1
    assert _iou(got, truth) > max(0.6, _iou(copy, truth) + 0.2), (_iou(got, truth), _iou(copy, truth))

    assert assist.updater.wait_idle(120) and assist.updater.error is None
    version = assist.updater.version
    assert version.startswith("instant-")
    rows = app.extensions["surgenet"].store.model_versions(status="instant")
    assert [r["version"] for r in rows] == [version]
    # a frame of an unlabelled video gets the instant head (no propagation source there)
    other = {"id": 7, "data": {"image": f"/data/upload/1/disc_{k + 3}.png"}}
    res = post(c, "/predict", {"tasks": [other], "label_config": image_config()}).get_json()["results"][0]
    assert res["model_version"] == version and res["result"]


def test_video_task_gets_phase_timeline_from_labelled_ranges(app):
    c = app.test_client()
    task = {"id": 9, "data": {"video": "/data/upload/1/phases.avi"}}
    ranges = [({"start": 1, "end": 5}, "Preparation"), ({"start": 16, "end": 20}, "ClippingCutting")]
    result = [
        {
            "from_name": "phases",
            "to_name": "video",
            "type": "timelinelabels",
            "value": {"ranges": [rng], "timelinelabels": [label]},
        }
        for rng, label in ranges
    ]
    # the file runs at the config's frameRate (25): LS frames 1-5 and 16-20 are video frames 0-4 and 15-19
    assert "phase" in deliver(c, _event(2, task, result, video_config()))["annotations"][0]["labels"]
    res = post(c, "/predict", {"tasks": [task], "label_config": video_config()}).get_json()["results"][0]
    assert res["model_version"].startswith("propagation-")
    regions = [reg for reg in res["result"] if reg["type"] == "timelinelabels"]
    labels = [reg["value"]["timelinelabels"][0] for reg in regions]
    assert labels[0] == "Preparation" and labels[-1] == "ClippingCutting"
    starts = [reg["value"]["ranges"][0]["start"] for reg in regions]
    assert starts == sorted(starts) and starts[0] == 1
    assert regions[-1]["value"]["ranges"][0]["end"] == 20  # the timeline covers the whole video
