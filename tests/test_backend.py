"""The Label Studio ML backend over Flask's test client: protocol shapes, every prediction validated with the
SDK's LabelInterface and decoded back, webhooks into a real (SQLite) label store, bad requests, auth, metrics.

Media fetch is the only thing replaced (Label Studio is not running here): tasks point at PNG/MP4 files that
the synthetic generator wrote, through an injected ``fetch``.
"""

from __future__ import annotations

import base64
import copy
import json

import cv2
import numpy as np
import pytest
from label_studio_sdk.label_interface import LabelInterface
from ls_semantics import assert_same_annotations, fixture
from webhook_helpers import deliver

from surgenet_assist.backend.app import NO_MODEL_VERSION, BackendSettings, create_app
from surgenet_assist.backend.config import parse_label_config
from surgenet_assist.backend.labeling_configs import image_config, label_config, shipped_config, video_config
from surgenet_assist.backend.media import MediaError
from surgenet_assist.core.encoders import brush_rle_to_mask
from surgenet_assist.core.schema import DEFAULT_SCHEMA
from surgenet_assist.core.store import INTERACTIVE_TASK

H, W = 64, 96


@pytest.fixture(scope="session")
def predictor():
    from surgenet_assist.core.model import SurgeNetAssistModel
    from surgenet_assist.core.predictor import Predictor

    model = SurgeNetAssistModel.create(random_init=True)
    return Predictor(model, batch_size=4, short_side=64, model_version="test-1.0", device="cpu")


@pytest.fixture(scope="session")
def media(tmp_path_factory):
    """Synthetic frames as PNGs, a short MP4, and a corrupt PNG; URL -> path as LS would store them."""
    from surgenet_assist.core.synthetic import generate_clip

    root = tmp_path_factory.mktemp("media")
    clip = generate_clip(3, 12, H, W)
    files = {}
    for i in range(4):
        p = root / f"frame{i}.png"
        cv2.imwrite(str(p), cv2.cvtColor(clip.frames[i], cv2.COLOR_RGB2BGR))
        files[f"/data/upload/1/frame{i}.png"] = p
    video = clip.write_video(root / "clip.mp4", fps=10)
    files["/data/upload/1/clip.mp4"] = video
    bad = root / "corrupt.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    files["/data/upload/1/corrupt.png"] = bad
    return files


@pytest.fixture()
def store(tmp_path):
    from surgenet_assist.core.store import LabelStore

    s = LabelStore(f"sqlite:///{tmp_path / 'store.db'}", migrate=True)
    yield s
    s.close()


def make_fetch(files):
    def fetch(url, task_id=None):
        if url not in files:
            raise MediaError(f"cannot fetch {url}: HTTP 404 (not found)", url=url)
        return files[url]

    return fetch


# The tests of what /predict answers pre-annotate every task, test videos included; which tasks the backend
# leaves empty by default (test and final videos) is tests/test_preannotation.py's subject.
WIRE = BackendSettings(preannotate_held_out=True)


@pytest.fixture()
def client(predictor, media, store):
    app = create_app(WIRE, predictor=predictor, store=store, fetch=make_fetch(media))
    return app.test_client()


def image_tasks(n=3):
    return [{"id": i + 1, "data": {"image": f"/data/upload/1/frame{i}.png"}} for i in range(n)]


def post(client, path, body, **kw):
    return client.post(path, data=json.dumps(body), content_type="application/json", **kw)


# ------------------------------------------------------------------------------------------------------------
# configs
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["image", "video"])
def test_shipped_configs_are_valid_and_in_sync(kind):
    xml = shipped_config(kind)
    assert xml == label_config(kind)
    li = LabelInterface(xml)
    names = {c.name for c in li.controls}
    assert names == ({"mask", "cvs", "phase"} if kind == "image" else {"phases", "cvs"})
    plan = parse_label_config(xml, DEFAULT_SCHEMA)
    assert not plan.unknown_labels and not plan.skipped_controls
    assert len(plan.controls) == len(names)


def test_config_matching_aliases_unknown_labels_and_per_criterion_cvs():
    xml = """<View><Image name="img" value="$frame"/>
      <PolygonLabels name="poly" toName="img">
        <Label value="gallbladder"/><Label value="GB-Tool" predicted_values="Grasper"/><Label value="Spleen"/>
      </PolygonLabels>
      <Choices name="C2" toName="img" choice="single"><Choice value="Yes"/><Choice value="No"/></Choices>
      <Choices name="ph" toName="img">
        <Choice value="preparation"/><Choice value="Clipping and Cutting"/>
      </Choices>
      <RectangleLabels name="box" toName="img"><Label value="Grasper"/></RectangleLabels>
    </View>"""
    plan = parse_label_config(xml, DEFAULT_SCHEMA)
    by = {c.name: c for c in plan.controls}
    assert by["poly"].labels == {10: "gallbladder", 5: "GB-Tool"}
    assert by["C2"].kind == "cvs_criterion" and by["C2"].criterion == 1
    assert by["ph"].kind == "phase_choice" and by["ph"].labels == {
        0: "preparation",
        2: "Clipping and Cutting",
    }
    assert plan.unknown_labels == [{"control": "poly", "label": "Spleen"}]
    assert [s["control"] for s in plan.skipped_controls] == ["box"]


# ------------------------------------------------------------------------------------------------------------
# protocol
# ------------------------------------------------------------------------------------------------------------
def test_health_and_setup_report_version_and_unknown_labels(client):
    h = client.get("/health").get_json()
    assert h["status"] == "UP" and h["model_version"] == "test-1.0" and h["model_loaded"] is True
    cfg = image_config().replace('<Label value="Liver"', '<Label value="Spleen"/>\n<Label value="Liver"')
    r = post(
        client,
        "/setup",
        {
            "project": "1.1795623120",
            "schema": cfg,
            "hostname": "http://localhost:8080",
            "access_token": "secret-token-123",
            "extra_params": None,
        },
    )
    assert r.status_code == 200
    body = r.get_json()
    assert body["model_version"] == "test-1.0"
    assert {"control": "mask", "label": "Spleen"} in body["unknown_labels"]


def _check_prediction(cfg, pred, height=H, width=W):
    li = LabelInterface(cfg)
    errors = li.validate_prediction(pred, return_errors=True)
    assert errors == [], errors
    assert 0.0 <= pred["score"] <= 1.0 and pred["model_version"] == "test-1.0"


def test_predict_image_tasks_valid_and_rle_round_trips(client, predictor, media):
    cfg = image_config()
    tasks = image_tasks(3)
    r = post(
        client,
        "/predict",
        {
            "tasks": tasks,
            "project": "1.1",
            "label_config": cfg,
            "params": {"login": None, "password": None, "context": None},
        },
    )
    assert r.status_code == 200, r.get_json()
    results = r.get_json()["results"]
    assert len(results) == len(tasks)
    frames = [cv2.cvtColor(cv2.imread(str(media[t["data"]["image"]])), cv2.COLOR_BGR2RGB) for t in tasks]
    direct = predictor.predict(frames)
    for pred, fp in zip(results, direct, strict=True):
        _check_prediction(cfg, pred)
        assert pred["score"] == pytest.approx(fp.score, abs=1e-3)
        brush = [x for x in pred["result"] if x["type"] == "brushlabels"]
        assert brush, "a random model still paints some class"
        rebuilt = np.full((H, W), 255, np.uint8)
        for region in brush:
            assert (region["original_width"], region["original_height"]) == (W, H)
            alpha = brush_rle_to_mask(region["value"]["rle"], H, W)
            assert set(np.unique(alpha)) <= {0, 255}
            rebuilt[alpha == 255] = DEFAULT_SCHEMA.class_id(region["value"]["brushlabels"][0])
        np.testing.assert_array_equal(rebuilt, fp.mask)
        phase = [x for x in pred["result"] if x["from_name"] == "phase"]
        assert phase[0]["value"]["choices"] == [DEFAULT_SCHEMA.phase_names[fp.phase]]
        cvs = [x for x in pred["result"] if x["from_name"] == "cvs"]
        expected = [k for k, p in zip(DEFAULT_SCHEMA.cvs_keys, fp.cvs_probs, strict=True) if p >= 0.5]
        assert (cvs[0]["value"]["choices"] if cvs else []) == expected


def test_predict_polygons_and_per_criterion_cvs(client, predictor, media):
    names = "".join(f'<Label value="{c.name}"/>' for c in DEFAULT_SCHEMA.classes)
    cfg = (
        f'<View><Image name="image" value="$image"/><PolygonLabels name="poly" toName="image">{names}'
        "</PolygonLabels>"
        + "".join(
            f'<Choices name="{k}" toName="image"><Choice value="Yes"/><Choice value="No"/></Choices>'
            for k in ("C1", "C2", "C3")
        )
        + "</View>"
    )
    r = post(client, "/predict", {"tasks": image_tasks(1), "label_config": cfg})
    assert r.status_code == 200, r.get_json()
    pred = r.get_json()["results"][0]
    _check_prediction(cfg, pred)
    polys = [x for x in pred["result"] if x["type"] == "polygonlabels"]
    assert polys
    for p in polys:
        pts = np.array(p["value"]["points"])
        assert pts.shape[1] == 2 and len(pts) >= 3 and (pts >= 0).all() and (pts <= 100).all()
    fp = predictor.predict(
        [cv2.cvtColor(cv2.imread(str(media["/data/upload/1/frame0.png"])), cv2.COLOR_BGR2RGB)]
    )[0]
    for k, prob in zip(("C1", "C2", "C3"), fp.cvs_probs, strict=True):
        region = next(x for x in pred["result"] if x["from_name"] == k)
        assert region["value"]["choices"] == ["Yes" if prob >= 0.5 else "No"]


def test_predict_video_timeline(client, predictor, media):
    cfg = video_config(frame_rate=10)
    r = post(
        client,
        "/predict",
        {"tasks": [{"id": 9, "data": {"video": "/data/upload/1/clip.mp4"}}], "label_config": cfg},
    )
    assert r.status_code == 200, r.get_json()
    pred = r.get_json()["results"][0]
    _check_prediction(cfg, pred)
    timeline = [x for x in pred["result"] if x["type"] == "timelinelabels"]
    ranges = [(x["value"]["ranges"][0]["start"], x["value"]["ranges"][0]["end"]) for x in timeline]
    # contiguous, 1-based inclusive, covering the 12 frames at frameRate == video fps
    assert ranges[0][0] == 1 and ranges[-1][1] == 12
    assert all(b[0] == a[1] + 1 for a, b in zip(ranges, ranges[1:], strict=False))
    vp = predictor.predict_video(media["/data/upload/1/clip.mp4"], sample_fps=1.0)
    assert [x["value"]["timelinelabels"][0] for x in timeline] == [
        DEFAULT_SCHEMA.phase_names[s[2]] for s in vp.segments
    ]


def test_no_model_day_zero(media, store):
    app = create_app(WIRE, store=store, fetch=make_fetch(media))
    c = app.test_client()
    assert c.get("/health").get_json()["model_loaded"] is False
    setup = post(c, "/setup", {"project": "1.1", "schema": image_config()}).get_json()
    assert setup["model_version"] == NO_MODEL_VERSION and "no trained model" in setup["warning"]
    r = post(c, "/predict", {"tasks": image_tasks(3), "label_config": image_config()}).get_json()
    assert r["results"] == [{"model_version": NO_MODEL_VERSION, "score": 0.0, "result": []}] * 3


# ------------------------------------------------------------------------------------------------------------
# bad requests
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("body", "status", "error"),
    [
        (b"{not json", 400, "malformed_json"),
        (json.dumps({"label_config": "<View/>"}).encode(), 400, "missing_tasks"),
        (json.dumps({"tasks": [], "label_config": "<View/>"}).encode(), 400, "missing_tasks"),
        (json.dumps({"tasks": [{"id": 1, "data": {"image": "x"}}]}).encode(), 400, "missing_label_config"),
        (
            json.dumps({"tasks": [{"id": 1, "data": {}}], "label_config": "<View><Image"}).encode(),
            400,
            "bad_label_config",
        ),
        (
            json.dumps(
                {
                    "tasks": [{"id": 1, "data": {"image": "x"}}],
                    "label_config": '<View><Image name="i" value="$image"/>'
                    '<RectangleLabels name="b" toName="i"><Label value="Car"/></RectangleLabels>'
                    "</View>",
                }
            ).encode(),
            422,
            "no_fillable_control",
        ),
    ],
)
def test_bad_requests_get_clear_json_errors(client, body, status, error):
    r = client.post("/predict", data=body, content_type="application/json")
    assert r.status_code == status
    assert r.get_json()["error"] == error
    assert client.get("/health").status_code == 200


@pytest.mark.parametrize("url", ["/data/upload/1/missing.png", "/data/upload/1/corrupt.png"])
def test_missing_or_corrupt_image_names_the_url(client, url):
    tasks = image_tasks(1) + [{"id": 7, "data": {"image": url}}]
    r = post(client, "/predict", {"tasks": tasks, "label_config": image_config()})
    assert r.status_code == 200  # the bad task gets an empty prediction; the batch is still served
    body = r.get_json()
    assert body["results"][1] == {"model_version": "test-1.0", "score": 0.0, "result": []}
    assert body["results"][0]["result"] and body["failed"][0]["url"] == url


def test_token_filter_added_once_however_many_apps(predictor, store):
    import logging

    from surgenet_assist.backend.http import RedactTokens

    for _ in range(3):
        create_app(BackendSettings(), predictor=predictor, store=store)
    assert sum(isinstance(f, RedactTokens) for f in logging.getLogger().filters) == 1


def test_body_size_limit(predictor, media, store):
    app = create_app(
        BackendSettings(max_body=2048), predictor=predictor, store=store, fetch=make_fetch(media)
    )
    c = app.test_client()
    big = {"tasks": image_tasks(1), "label_config": image_config() + " " * 4096}
    r = post(c, "/predict", big)
    assert r.status_code == 413 and r.get_json()["error"] == "body_too_large"
    assert c.get("/health").status_code == 200


def test_basic_auth_everywhere_but_health(predictor, media, store):
    settings = BackendSettings(basic_auth_user="ls", basic_auth_pass="pw")
    c = create_app(settings, predictor=predictor, store=store, fetch=make_fetch(media)).test_client()
    assert c.get("/health").status_code == 200
    assert post(c, "/setup", {"schema": image_config()}).status_code == 401
    assert c.get("/metrics").status_code == 401
    bad = {"Authorization": "Basic " + base64.b64encode(b"ls:nope").decode()}
    assert c.get("/versions", headers=bad).status_code == 401
    good = {"Authorization": "Basic " + base64.b64encode(b"ls:pw").decode()}
    assert post(c, "/setup", {"schema": image_config()}, headers=good).status_code == 200


def test_tokens_never_logged(client, caplog):
    caplog.set_level("DEBUG")
    cfg = image_config().replace('<Label value="Liver"', '<Label value="Spleen"/>\n<Label value="Liver"')
    post(client, "/setup", {"schema": cfg, "access_token": "s3cr3t-t0ken-value", "hostname": "http://x"})
    import logging

    logging.getLogger("surgenet_assist.backend").warning("header was Token s3cr3t-t0ken-value")
    assert "s3cr3t-t0ken-value" not in caplog.text
    assert "Spleen" in caplog.text


def test_metrics_count_requests_predictions_and_errors(client):
    post(client, "/predict", {"tasks": image_tasks(2), "label_config": image_config()})
    client.post("/predict", data=b"{", content_type="application/json")
    text = client.get("/metrics").get_data(as_text=True)
    assert 'surgenet_backend_requests_total{method="POST",route="/predict",status="200"} 1.0' in text
    assert 'surgenet_backend_errors_total{kind="400",route="/predict"} 1.0' in text
    assert 'surgenet_backend_predictions_total{task="phase"} 2.0' in text
    assert "surgenet_backend_tasks_predicted_total 2.0" in text
    assert "surgenet_backend_request_latency_seconds_bucket" in text


# ------------------------------------------------------------------------------------------------------------
# webhooks -> store (bodies captured from a real Label Studio 1.23: tests/fixtures/label_studio/README.md)
# ------------------------------------------------------------------------------------------------------------
def test_captured_webhooks_become_what_label_studio_holds(client, store, tmp_path):
    from surgenet_assist.core.formats.label_studio import export_label_studio
    from surgenet_assist.core.store import LabelStore

    bodies = fixture("webhooks.json")
    for pid in (1, 2, 3):  # connected projects (a webhook never creates one)
        store.ensure_project(f"label-studio-{pid}")
    replies = [deliver(client, b) for b in bodies]  # each answered 202, applied on the webhook queue
    created, _, updated = (r["annotations"][0] for r in replies[:3])
    assert all(v["created"] for v in created["labels"].values())
    assert set(created["labels"]) == {"segmentation", "cvs", "phase"}
    # the update repainted task 2's mask and dropped its phase: a new revision and a tombstone
    assert updated["labels"]["segmentation"]["revision"] == 2 and updated["tombstoned"] == 1
    skipped = replies[3]
    assert skipped["annotations"][0]["labels"] == {} and "skipped" in skipped["warnings"][0]
    assert replies[5]["tombstones"] == 1  # ANNOTATIONS_DELETED
    assert {r["store_project"] for r in replies} == {f"label-studio-{i}" for i in (1, 2, 3)}
    again = deliver(client, bodies[0])["annotations"][0]  # redelivery
    assert not any(v["created"] for v in again["labels"].values()) and again["tombstoned"] == 0

    assert store.video_id("case07") is None  # each Label Studio project has its own store project
    image = LabelStore(store.url, project="label-studio-1")
    seg = image.label_for(image.video_id("case07"), 1, "segmentation")
    assert seg.author == "ls-user:1" and seg.source == "label-studio"
    assert [h.revision for h in image.history(seg.annotation_id)] == [1, 2]
    assert image.label_for(image.video_id("case07"), 1, "phase") is None
    for kind, project in (("image", 1), ("video", 3)):
        export_label_studio(
            LabelStore(store.url, project=f"label-studio-{project}"),
            tmp_path / f"{kind}.json",
            annotations=True,
            label_config=fixture(f"{kind}_config.xml"),
            tasks=fixture(f"{kind}_export.json"),
        )
        assert_same_annotations(
            json.loads((tmp_path / f"{kind}.json").read_text()), fixture(f"{kind}_export.json")
        )


def test_webhook_with_a_label_the_schema_lacks_is_refused(client, store):
    store.ensure_project("label-studio-1")
    body = copy.deepcopy(fixture("webhooks.json")[0])
    body["annotation"]["result"][0]["value"]["brushlabels"] = ["Suturing needle"]
    err = deliver(client, body)  # queued (202), refused on the webhook worker
    assert err["status"] == "error" and "'Suturing needle'" in err["detail"] and "Liver" in err["hint"]
    assert store.stats()["annotations"]["revisions"] == 0
    assert post(client, "/webhook", {"action": "ANNOTATION_CREATED", "task": {}}).status_code == 400
    gone = {"action": "ANNOTATIONS_DELETED", "annotations": [{"id": 999}], "project": {"id": 1}}
    assert deliver(client, gone)["tombstones"] == 0


def test_start_training_queues_one_cycle_and_other_events_are_quick(client, store):
    store.ensure_project("label-studio-5")  # connected (a webhook never creates a store project)
    r = deliver(client, {"action": "START_TRAINING", "project": {"id": 5}})
    assert r["status"] == "ok" and not r["already_queued"]
    again = deliver(client, {"action": "START_TRAINING", "project": {"id": 5}})
    assert again["already_queued"] and again["training_run"] == r["training_run"]
    assert post(client, "/webhook", {"action": "START_TRAINING", "project": {"id": 6}}).status_code == 403
    runs = store.training_runs(project="label-studio-5")  # queued for Label Studio project 5's store project
    assert [x["status"] for x in runs] == ["queued"] and store.training_runs() == []
    other = post(client, "/webhook", {"action": "TASKS_CREATED", "tasks": [], "project": {"id": 5}})
    assert other.status_code == 200 and other.get_json()["status"] == "ignored"
    assert post(client, "/webhook", {"no": "action"}).status_code == 400


def test_each_label_studio_project_is_served_its_own_champion(tmp_path, store, media):
    """Registry mode: a project whose store project (label-studio-<id>) has a champion is served that one;
    a project without one is served the default project's champion."""
    import time

    from surgenet_assist.core.bundle import save_bundle
    from surgenet_assist.core.model import SurgeNetAssistModel

    model = SurgeNetAssistModel.create(random_init=True)
    for version, project in (("site-1.0", None), ("p7-1.0", "label-studio-7")):
        bundle = save_bundle(model, tmp_path / version, version=version)
        store.register_model_version(version, bundle_path=str(bundle), project=project)
        store.set_model_status(version, "champion", project=project)
    settings = BackendSettings(
        registry=True, registry_poll_s=0.0, short_side=64, device="cpu", day_one=False,
        preannotate_held_out=True,
    )
    c = create_app(settings, store=store, fetch=make_fetch(media)).test_client()

    def version(project):
        return post(c, "/setup", {"schema": image_config(), "project": project}).get_json()["model_version"]

    assert version("8.1700000000") == "site-1.0"
    deadline = time.time() + 30  # project 7's champion loads in the background on first use
    while version("7.1700000000") != "p7-1.0" and time.time() < deadline:
        time.sleep(0.2)
    assert version("7.1700000000") == "p7-1.0" and version("8.1700000000") == "site-1.0"
    body = {"tasks": image_tasks(1), "label_config": image_config(), "project": "7.1700000000"}
    assert post(c, "/predict", body).get_json()["results"][0]["model_version"] == "p7-1.0"


def test_versions_and_registry_champion_is_picked_up(tmp_path, store, media):
    from surgenet_assist.core.bundle import save_bundle
    from surgenet_assist.core.model import SurgeNetAssistModel

    settings = BackendSettings(
        registry=True, registry_poll_s=0.0, short_side=64, device="cpu", preannotate_held_out=True
    )
    app = create_app(settings, store=store, fetch=make_fetch(media))
    c = app.test_client()
    assert c.get("/versions").get_json()["current"] == NO_MODEL_VERSION
    model = SurgeNetAssistModel.create(random_init=True)
    bundle = save_bundle(model, tmp_path / "b1", version="reg-2.0")
    store.register_model_version("reg-2.0", bundle_path=str(bundle))
    store.set_model_status("reg-2.0", "champion")
    holder = app.extensions["surgenet"].holder
    holder.poll(force=True, background=False)
    assert post(c, "/setup", {"schema": image_config()}).get_json()["model_version"] == "reg-2.0"
    # a learned click head (its own champion, a click-head folder) is no model choice and does not serve
    store.register_model_version("clicks-1", task=INTERACTIVE_TASK, bundle_path=str(tmp_path / "clicks-1"))
    store.set_model_status("clicks-1", "champion")
    holder.poll(force=True, background=False)
    v = c.get("/versions").get_json()
    assert v["current"] == "reg-2.0" and "reg-2.0" in v["versions"] and "clicks-1" not in v["versions"]
    r = post(c, "/predict", {"tasks": image_tasks(1), "label_config": image_config()}).get_json()
    assert r["results"][0]["model_version"] == "reg-2.0" and r["results"][0]["result"]
