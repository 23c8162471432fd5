"""Label Studio sees the active-learning queue: queued frames get low prediction scores, in queue order."""

from __future__ import annotations

from test_backend import image_config, make_fetch, media, post, predictor, store  # noqa: F401 - fixtures

from surgenet_assist.backend.app import BackendSettings, create_app


def _tasks(video: str) -> list[dict]:
    return [
        {
            "id": i + 1,
            "data": {"image": f"/data/upload/1/frame{i}.png", "source_video": video, "frame_index": i},
        }
        for i in range(4)
    ]


def _scores(client, tasks) -> list[float]:
    body = {"tasks": tasks, "project": "1.1", "label_config": image_config(), "params": {}}
    r = post(client, "/predict", body)
    assert r.status_code == 200, r.get_json()
    return [res["score"] for res in r.get_json()["results"]]


def test_label_studio_scores_follow_the_acquisition_queue(predictor, media, store):  # noqa: F811
    from surgenet_assist.core.store import LabelStore

    video = "/videos/case1.mp4"
    other = store.add_video(video, fps=1.0, frame_count=10)  # the same path in another store project
    store.save_acquisition_scores([(other, 1, 1.0)], task="segmentation", method="hybrid")
    ls1 = LabelStore(store.url, project="label-studio-1")  # where Label Studio project 1's tasks live
    vid = ls1.add_video(video, fps=1.0, frame_count=10)
    client = create_app(
        BackendSettings(), predictor=predictor, store=store, fetch=make_fetch(media)
    ).test_client()
    tasks = _tasks(video)
    confidence = _scores(client, tasks)  # no queue yet: the model's confidence, unchanged
    assert all(0.0 <= c <= 1.0 for c in confidence)

    # queue: frame 2 first, then frame 0 (hybrid rows, as `al score` / the nightly cycle write them)
    ls1.save_acquisition_scores([(vid, 2, 1.0), (vid, 0, 0.5)], task="segmentation", method="hybrid")
    scores = _scores(client, tasks)
    assert scores[2] == 0.0 and scores[0] == 0.25
    assert scores[1] == round(0.5 + 0.5 * confidence[1], 6) and scores[3] == round(
        0.5 + 0.5 * confidence[3], 6
    )
    order = sorted(range(4), key=lambda i: scores[i])  # LS "sort by prediction score", ascending
    assert order[:2] == [2, 0]

    # a labelled frame leaves the queue and goes back to the confidence rule
    import numpy as np

    ls1.record_annotation(vid, 2, "segmentation", np.zeros((8, 8), np.uint8), source="napari")
    assert _scores(client, tasks)[2] == round(0.5 + 0.5 * confidence[2], 6)
