"""Label Studio's interactive mode in the backend: ``params.context`` (keypoints with ``is_positive``,
rectangles, as LS 1.23.2 sends them: label-studio.md §4.4) -> a core Prompt -> the clicked object's
``brushlabels`` region under the label the annotator chose.

The parsing tests need no model; the ``/predict`` tests run the real :class:`ClickSegmenter` on a random-init
backbone and a synthetic frame through Flask's test client. The same route against a real Label Studio is
``tests/integration/test_label_studio_interactive.py``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from surgenet_assist.backend.app import BackendSettings, create_app
from surgenet_assist.backend.config import parse_label_config
from surgenet_assist.backend.interactive import (
    ClickSegmenters,
    InteractiveError,
    InteractiveUnavailable,
    context_regions,
    read_context,
)
from surgenet_assist.backend.labeling_configs import image_config, label_config
from surgenet_assist.backend.media import MediaError
from surgenet_assist.core.encoders import brush_rle_to_mask
from surgenet_assist.core.formats.ls_config import LabelConfigError
from surgenet_assist.core.interactive import ClickSegmenter
from surgenet_assist.core.interactive.prompts import PromptError
from surgenet_assist.core.schema import DEFAULT_SCHEMA

H, W = 120, 160
CONFIG = image_config(interactive=True)
URL = "/data/upload/1/frame.png"


def keypoint(x: float, y: float, label: str = "Liver", positive: bool = True, **extra) -> dict:
    """A keypoint region exactly as Label Studio 1.23.2 puts it in ``params.context.result``."""
    region = {
        "original_width": W,
        "original_height": H,
        "image_rotation": 0,
        "value": {"x": x, "y": y, "width": 0.5, "keypointlabels": [label]},
        "is_positive": positive,
        "id": f"kp{x}-{y}",
        "from_name": "click",
        "to_name": "image",
        "type": "keypointlabels",
        "origin": "manual",
    }
    region.update(extra)
    return region


def rectangle(x: float, y: float, w: float, h: float, label: str = "Liver", **value) -> dict:
    return {
        "original_width": W,
        "original_height": H,
        "image_rotation": 0,
        "value": {"x": x, "y": y, "width": w, "height": h, "rotation": 0, "rectanglelabels": [label]} | value,
        "id": f"box{x:g}",
        "from_name": "box",
        "to_name": "image",
        "type": "rectanglelabels",
        "origin": "manual",
    }


def plan(cfg: str = CONFIG):
    return parse_label_config(cfg, DEFAULT_SCHEMA)


# ---------------------------------------------------------------------------------------------------------
# the config
# ---------------------------------------------------------------------------------------------------------
def test_interactive_config_pairs_brush_with_smart_prompts_of_the_same_labels():
    p = plan()
    assert p.interactive is not None and p.interactive.problem is None
    brush = {c.name: c for c in p.interactive.brushes}["mask"]
    prompts = {c.name: c for c in p.interactive.prompts}
    assert set(prompts) == {"click", "box"} and all(c.smart for c in prompts.values())
    assert prompts["click"].tag == "KeyPointLabels" and prompts["box"].tag == "RectangleLabels"
    assert prompts["click"].labels == prompts["box"].labels == brush.labels
    assert set(brush.labels) == {c.name for c in DEFAULT_SCHEMA.classes}
    # the prompts are never predicted (the translator skips their regions in annotations) ...
    assert {s["control"] for s in p.skipped_controls} == {"click", "box"}
    # ... and the ordinary pre-annotation is unchanged
    assert [c.name for c in p.controls] == [c.name for c in plan(image_config()).controls]
    assert p.summary()["interactive"]["brush"] == ["mask"]
    assert plan(image_config()).interactive is None


def test_interactive_config_problem_without_brush():
    cfg = """<View><Image name="img" value="$image"/>
      <KeyPointLabels name="kp" toName="img" smart="true"><Label value="Liver"/></KeyPointLabels></View>"""
    p = plan(cfg)
    assert "no BrushLabels" in p.interactive.problem
    with pytest.raises(InteractiveError, match="no BrushLabels on image 'img'") as err:
        read_context([keypoint(10, 10, from_name="kp", to_name="img")], p)
    assert "--interactive" in err.value.hint


def test_interactive_video_config_is_refused():
    with pytest.raises(LabelConfigError, match="image"):
        label_config("video", interactive=True)


def test_cli_prints_the_interactive_config_and_refuses_video():
    from surgenet_assist.cli.main import app

    runner = CliRunner()
    res = runner.invoke(app, ["ls", "config", "--kind", "image", "--interactive"])
    assert res.exit_code == 0, res.output
    assert res.output == CONFIG
    assert 'smart="true"' in res.output
    assert "<KeyPointLabels" in res.output and "<RectangleLabels" in res.output
    res = runner.invoke(app, ["ls", "config", "--kind", "video", "--interactive"])
    assert res.exit_code == 2 and "--interactive needs --kind image" in res.output
    args = ["ls", "setup-project", "--url", "http://127.0.0.1:1", "--api-key", "k", "--video", "a.mp4"]
    res = runner.invoke(app, [*args, "--interactive"])
    assert res.exit_code == 2 and "--interactive works on frame projects" in res.output


# ---------------------------------------------------------------------------------------------------------
# params.context -> prompt
# ---------------------------------------------------------------------------------------------------------
def test_only_a_null_or_absent_context_means_the_ordinary_predict():
    for params in (None, {}, {"context": None}, "junk", [1]):
        assert context_regions(params) is None
    # any object is interactive; one without regions is the editor's "last smart region deleted"
    for params in ({"context": {}}, {"context": {"result": []}}, {"context": {"result": None}}):
        assert context_regions(params) == []
    assert context_regions({"context": {"result": [keypoint(1, 2)]}}) == [keypoint(1, 2)]
    for bad in ("x", [1], {"result": "x"}, {"result": [1]}):
        with pytest.raises(InteractiveError):
            context_regions({"context": bad})


def test_keypoints_positive_and_negative_in_pixels():
    parsed = read_context([keypoint(25.0, 50.0), keypoint(75.0, 10.0, positive=False)], plan())
    assert parsed.label == "Liver" and parsed.brush.name == "mask" and parsed.to_name == "image"
    prompt = parsed.prompt(H, W)
    assert [(c.row, c.col, c.positive) for c in prompt.clicks] == [(60.0, 40.0, True), (12.0, 120.0, False)]
    assert prompt.box is None
    prompt.validate(H, W)
    # a keypoint without is_positive is an ordinary click; one on the far border stays inside the image
    far = keypoint(100.0, 100.0)
    del far["is_positive"]
    click = read_context([far], plan()).prompt(H, W).clicks[0]
    assert click.positive and click.row < H and click.col < W


def test_rectangle_is_the_box_and_the_newest_wins():
    regions = [rectangle(0, 0, 50, 50), keypoint(30, 30), rectangle(10.0, 25.0, 50.0, 50.0)]
    prompt = read_context(regions, plan()).prompt(H, W)
    b = prompt.box
    assert (b.top, b.left, b.bottom, b.right) == (30.0, 16.0, 90.0, 96.0)
    assert len(prompt.clicks) == 1
    only_box = read_context([rectangle(10.0, 25.0, 50.0, 50.0)], plan()).prompt(H, W)
    assert only_box.clicks == () and only_box.box == b


def test_the_newest_label_is_the_object_and_other_labels_are_ignored():
    regions = [keypoint(10, 10, "Liver"), keypoint(20, 20, "Gallbladder")]
    regions.append(keypoint(30, 30, "Gallbladder", positive=False))
    parsed = read_context(regions, plan())
    assert parsed.label == "Gallbladder"
    assert [(x, y, pos) for x, y, pos in parsed.clicks] == [(20.0, 20.0, True), (30.0, 30.0, False)]
    # other region types (e.g. an accepted brush) are not prompts
    brush = {"type": "brushlabels", "from_name": "mask", "to_name": "image", "value": {"rle": [1]}}
    assert read_context([brush, keypoint(10, 10)], plan()).label == "Liver"


@pytest.mark.parametrize(
    ("regions", "match"),
    [
        ([keypoint(10, 10, "Kidney")], "label 'Kidney' is not offered by the BrushLabels"),
        ([{"type": "brushlabels", "from_name": "mask", "value": {}}], "no keypoint and no rectangle"),
        ([keypoint(120.0, 10)], r"value.x = 120.0 is not a percentage"),
        ([keypoint(10, -3)], r"value.y = -3 is not a percentage"),
        ([keypoint(10, None)], r"value.y = None"),
        ([keypoint(10, 10, image_rotation=90)], "rotated by 90 degrees"),
        ([rectangle(10, 10, 20, 20, rotation=30)], "box is rotated by 30"),
        ([rectangle(60, 10, 50, 20)], "reaches past the image"),
        ([rectangle(10, 10, 0, 20)], "box is empty"),
        ([keypoint(10, 10, from_name="other")], "'other' is not a KeyPointLabels or RectangleLabels"),
        ([keypoint(10, 10, is_positive="yes")], "is_positive = 'yes'"),
        ([{**keypoint(10, 10), "value": {"x": 10, "y": 10, "keypointlabels": []}}], "has no label"),
    ],
)
def test_bad_context_is_a_clear_error(regions, match):
    with pytest.raises(InteractiveError, match=match) as err:
        read_context(regions, plan())
    assert err.value.hint


def test_config_without_smart_tools_refuses_clicks():
    with pytest.raises(InteractiveError, match="no smart KeyPointLabels") as err:
        read_context([keypoint(10, 10)], plan(image_config()))
    assert "--interactive" in err.value.hint


# ---------------------------------------------------------------------------------------------------------
# /predict with the real engine
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def segmenter():
    from surgenet_assist.core.backbone import load_backbone
    from surgenet_assist.core.interactive import ClickSegmenter

    return ClickSegmenter(load_backbone(random_init=True), short_side=128)


@pytest.fixture(scope="module")
def frame(tmp_path_factory):
    """A synthetic frame on disk and its exact class mask."""
    from surgenet_assist.core.synthetic import generate_clip

    clip = generate_clip(3, 1, H, W)
    path = tmp_path_factory.mktemp("interactive") / "frame.png"
    cv2.imwrite(str(path), cv2.cvtColor(clip.frames[0], cv2.COLOR_RGB2BGR))
    return path, clip.masks[0]


def _fetch(path: Path):
    def fetch(url, task_id=None):
        if url != URL:
            raise MediaError(f"cannot fetch {url}: HTTP 404 (not found)", url=url)
        return path

    return fetch


@pytest.fixture()
def client(segmenter, frame):
    settings = BackendSettings(extra={"open_store": False})
    return create_app(settings, fetch=_fetch(frame[0]), click_segmenter=segmenter).test_client()


def body(regions, url: str = URL, cfg: str = CONFIG) -> dict:
    """The interactive ``/predict`` body as Label Studio 1.23.2 sends it (label-studio.md §4.4)."""
    return {
        "tasks": [{"id": 7, "data": {"image": url}, "annotations": [], "predictions": [], "drafts": []}],
        "project": "1.1795623120",
        "label_config": cfg,
        "params": {"login": None, "password": None, "context": {"result": regions}},
    }


def post(client, data):
    return client.post("/predict", data=json.dumps(data), content_type="application/json")


def _centre_click(gt: np.ndarray) -> tuple[float, float]:
    """(x %, y %) of the object's most interior pixel."""
    depth = cv2.distanceTransform(np.pad(gt.astype(np.uint8), 1), cv2.DIST_L2, 5)[1:-1, 1:-1]
    y, x = np.unravel_index(int(depth.argmax()), depth.shape)
    return (x + 0.5) / W * 100, (y + 0.5) / H * 100


def _decode(region: dict) -> np.ndarray:
    alpha = brush_rle_to_mask(region["value"]["rle"], region["original_height"], region["original_width"])
    return alpha == 255


def test_click_returns_the_objects_brush_region(client, segmenter, frame):
    _, masks = frame
    cid = int(np.bincount(masks.ravel()).argmax())
    label = DEFAULT_SCHEMA.classes[cid].name
    x, y = _centre_click(masks == cid)
    res = post(client, body([keypoint(x, y, label)]))
    assert res.status_code == 200, res.get_json()
    data = res.get_json()
    assert len(data["results"]) == 1
    pred = data["results"][0]
    assert data["model_version"] == pred["model_version"] == segmenter.model_version
    assert pred["model_version"].startswith("clicks-day-one-")
    (region,) = pred["result"]
    assert region["type"] == "brushlabels" and region["from_name"] == "mask" and region["to_name"] == "image"
    assert region["value"]["brushlabels"] == [label] and region["value"]["format"] == "rle"
    assert (region["original_width"], region["original_height"], region["image_rotation"]) == (W, H, 0)
    assert 0.0 < region["score"] <= 1.0 and 0.0 < pred["score"] <= 1.0
    mask = _decode(region)
    assert mask.shape == (H, W) and mask.any()
    assert mask[int(y / 100 * H), int(x / 100 * W)], "the clicked pixel is in the mask"
    from label_studio_sdk.label_interface import LabelInterface

    assert LabelInterface(CONFIG).validate_prediction(pred, return_errors=True) == []


def test_negative_click_removes_a_false_region(client, frame):
    _, masks = frame
    cid = int(np.bincount(masks.ravel()).argmax())
    label = DEFAULT_SCHEMA.classes[cid].name
    x, y = _centre_click(masks == cid)
    first = _decode(post(client, body([keypoint(x, y, label)])).get_json()["results"][0]["result"][0])
    wrong = first & (masks != cid)
    if not wrong.any():  # the first click was perfect: a negative click inside the object must still cut
        wrong = first.copy()
        wrong[int(y / 100 * H), int(x / 100 * W)] = False
    nx, ny = _centre_click(wrong)
    regions = [keypoint(x, y, label), keypoint(nx, ny, label, positive=False)]
    res = post(client, body(regions))
    assert res.status_code == 200, res.get_json()
    result = res.get_json()["results"][0]["result"]
    second = _decode(result[0]) if result else np.zeros((H, W), bool)
    assert not second[int(ny / 100 * H), int(nx / 100 * W)], "the negative click's pixel is out"
    assert (second != first).any()


def test_box_prompt(client, frame):
    res = post(client, body([rectangle(20, 20, 40, 50, "Fat")]))
    assert res.status_code == 200, res.get_json()
    (region,) = res.get_json()["results"][0]["result"]
    assert region["value"]["brushlabels"] == ["Fat"]
    assert _decode(region).shape == (H, W)


def test_bad_context_is_a_400_with_detail_and_hint(client):
    res = post(client, body([keypoint(10, 10, "Kidney")]))
    assert res.status_code == 400
    err = res.get_json()
    assert err["error"] == "bad_interactive_context" and "Kidney" in err["detail"] and err["hint"]
    res = post(client, body([keypoint(150, 10)]))
    assert res.status_code == 400 and "not a percentage" in res.get_json()["detail"]
    bad = body([keypoint(10, 10)])
    bad["params"]["context"] = "clicks"
    assert post(client, bad).status_code == 400
    res = post(client, body([keypoint(10, 10)], cfg=image_config()))
    assert res.status_code == 400 and "no smart KeyPointLabels" in res.get_json()["detail"]


def test_unfetchable_image_is_a_422_naming_the_url(client):
    res = post(client, body([keypoint(10, 10)], url="/data/upload/1/missing.png"))
    assert res.status_code == 422
    err = res.get_json()
    assert err["error"] == "media_unavailable" and "missing.png" in err["detail"] and err["hint"]


def test_an_empty_context_gets_an_empty_result_from_the_engine_never_the_whole_frame(frame, segmenter):
    """Deleting the last smart region sends ``{"result": []}``: the editor applies whatever comes back, so a
    whole-frame prediction (phase, CVS, masks under fixed ids) would silently replace the annotator's own
    choices. It gets exactly one empty result per task, stamped with the click engine's version."""
    from surgenet_assist.core.model import SurgeNetAssistModel
    from surgenet_assist.core.predictor import Predictor

    fetched = []

    def fetch(url, task_id=None):
        fetched.append(url)
        return frame[0]

    model = SurgeNetAssistModel.create(random_init=True)
    predictor = Predictor(model, short_side=64, model_version="whole-frame-1")
    settings = BackendSettings(extra={"open_store": False})
    app = create_app(settings, predictor=predictor, fetch=fetch, click_segmenter=segmenter)
    client = app.test_client()
    ordinary = post(client, body([]) | {"params": {"context": None}})  # batch pre-annotation: unchanged
    assert ordinary.status_code == 200 and ordinary.get_json()["model_version"] == "whole-frame-1"
    assert ordinary.get_json()["results"][0]["result"], "the whole-frame model fills the task"
    fetched.clear()
    for context in ({"result": []}, {}, {"result": None}):
        data = body([])
        data["params"]["context"] = context
        res = post(client, data)
        assert res.status_code == 200, res.get_json()
        assert res.get_json() == {
            "results": [{"model_version": segmenter.model_version, "score": 0.0, "result": []}],
            "model_version": segmenter.model_version,
        }
    assert fetched == [], "nothing to segment: no image fetched"
    two = body([])
    two["tasks"].append({"id": 8, "data": {"image": URL}})
    res = post(client, two)
    assert res.status_code == 200 and [r["result"] for r in res.get_json()["results"]] == [[], []]


def test_without_an_engine_clicks_get_a_503_that_says_why(frame):
    settings = BackendSettings(extra={"open_store": False})
    off = create_app(settings, fetch=_fetch(frame[0])).test_client()
    res = post(off, body([keypoint(10, 10)]))
    assert res.status_code == 503 and "not enabled" in res.get_json()["detail"]

    def no_weights():
        from surgenet_assist.core.errors import WeightsNotAvailableError

        raise WeightsNotAvailableError("weights for 'surgenetxl' are not cached", "download them")

    built: list = []
    broken = create_app(
        settings,
        fetch=_fetch(frame[0]),
        click_segmenter_factory=lambda _s, backbone: built.append(backbone),
        backbone_loader=no_weights,
    ).test_client()
    res = post(broken, body([keypoint(10, 10)]))
    err = res.get_json()
    assert built == []  # no engine without a backbone
    assert res.status_code == 503 and "not cached" in err["detail"] and "weights download" in err["hint"]


@pytest.mark.parametrize("with_model", [True, False], ids=["model-served", "no-model"])
def test_clicks_and_day_one_share_the_served_models_backbone(frame, tmp_path, with_model):
    """One backbone per process: with a model served, the click engine and the day-one assistants are built on
    its backbone and the cached SurgeNetXL weights are never loaded (before, a bundle served on a machine
    without cached weights answered every click with 503, and with them the process held two backbones).
    Without a model, the fallback loads once, at start, and serves both."""
    from surgenet_assist.core.backbone import load_backbone
    from surgenet_assist.core.interactive import ClickSegmenter
    from surgenet_assist.core.model import SurgeNetAssistModel
    from surgenet_assist.core.predictor import Predictor

    model = SurgeNetAssistModel.create(random_init=True)
    served = Predictor(model, batch_size=1, short_side=64, model_version="bundle-7", device="cpu")
    predictor = served if with_model else None
    loads, engines, assists = [], [], []

    def loader():
        loads.append(1)
        return load_backbone(random_init=True)

    def factory(_settings, backbone):
        engines.append(backbone)
        return ClickSegmenter(backbone, short_side=64)

    def assist_factory(_settings, _store, _schema, _fetch, backbone):
        assists.append(backbone)

    settings = BackendSettings(db_url=f"sqlite:///{tmp_path / f'{predictor is None}.db'}", day_one=True)
    app = create_app(
        settings,
        predictor=predictor,
        fetch=_fetch(frame[0]),
        click_segmenter_factory=factory,
        assist_factory=assist_factory,
        backbone_loader=loader,
    )
    app.extensions["surgenet"].warm()  # what `serve` does before accepting connections
    client = app.test_client()
    assert post(client, body([keypoint(40, 30)])).status_code == 200
    setup = client.post("/setup", json={"project": "1.1795623120", "label_config": CONFIG}).get_json()
    health = client.get("/health").get_json()
    expected = served.model.backbone if predictor is not None else None
    if predictor is not None:
        assert loads == [] and engines == [expected] and assists == [expected]
        assert setup["backbone"]["source"] == health["backbone"]["source"] == "served model bundle-7"
    else:
        assert loads == [1] and len(engines) == 1 and assists == engines  # loaded once, at start
        assert health["backbone"]["source"] == "cached SurgeNetXL weights"
    assert health["backbone"]["weights_sha256"] == engines[0].weights_sha256[:12]


# ---------------------------------------------------------------------------------------------------------
# which engine answers a project
# ---------------------------------------------------------------------------------------------------------
class _FakeHead:
    def eval(self):
        return self


class _FakeStore:
    def __init__(self, rows: dict):
        self.rows = rows
        self.reads = 0

    def model_versions(self, task=None, status=None, *, project=None, all_projects=False):
        self.reads += 1
        return list(self.rows.get(project, []))


def test_a_project_with_a_learned_click_head_gets_its_own_engine(segmenter, monkeypatch):
    import surgenet_assist.core.interactive.serving as serving

    row = {"version": "click-7", "bundle_path": "/heads/7", "updated_at": 1, "created_at": 1, "metrics": {}}
    store = _FakeStore({"label-studio-3": [row]})
    monkeypatch.setattr(serving, "serving_click_head", lambda *a, **k: (_FakeHead(), "click-7"))
    clicks = ClickSegmenters(segmenter, store=store, poll_s=60.0)
    learned = clicks.for_project("label-studio-3")
    assert learned is not segmenter and learned.model_version == "click-7"
    assert learned.backbone is segmenter.backbone, "the backbone is shared, not loaded again"
    assert learned.cache is segmenter.cache, "one feature-cache budget for every project's engine"
    assert clicks.for_project("label-studio-4") is segmenter  # no head yet: day one
    reads = store.reads
    assert clicks.for_project("label-studio-3") is learned and store.reads == reads  # polled, not re-read
    assert segmenter.model_version.startswith("clicks-day-one-")


def test_a_click_head_trained_on_another_backbone_is_never_served(segmenter, monkeypatch):
    """for_project passes the engine's backbone hash: a head whose features differ stays unserved."""
    import surgenet_assist.core.interactive.serving as serving

    sha = segmenter.backbone.weights_sha256
    assert sha
    monkeypatch.setattr(serving, "load_click_head", lambda path: (_FakeHead(), {}))

    def row(version, trained_on):
        return {"version": version, "bundle_path": f"/heads/{version}", "updated_at": 1, "created_at": 1,
                "metrics": {"backbone_sha256": trained_on}}

    store = _FakeStore({"p-other": [row("clicks-1", "0" * 64)], "p-same": [row("clicks-2", sha)]})
    clicks = ClickSegmenters(segmenter, store=store, poll_s=60.0)
    assert clicks.for_project("p-other") is segmenter  # day one, not a head that reads unseen features
    learned = clicks.for_project("p-same")
    assert learned is not segmenter and learned.model_version == "clicks-2"


def test_no_engine_configured_raises():
    with pytest.raises(InteractiveUnavailable, match="not enabled"):
        ClickSegmenters().for_project(None)


def test_an_annotation_that_keeps_its_prompt_keypoints_stores_only_the_mask():
    """With auto-accept off the prompt keypoints stay in the annotation: the webhook stores the accepted brush
    region and skips the keypoints (they are prompts, not labels)."""
    from surgenet_assist.core.encoders import mask_to_brush_rle
    from surgenet_assist.core.formats.label_studio import LabelStudioTranslator

    mask = np.zeros((H, W), np.uint8)
    mask[20:60, 30:90] = 255
    brush = {
        "id": "b1", "type": "brushlabels", "from_name": "mask", "to_name": "image", "origin": "manual",
        "original_width": W, "original_height": H, "image_rotation": 0,
        "value": {"format": "rle", "rle": mask_to_brush_rle(mask), "brushlabels": ["Liver"]},
    }  # fmt: skip
    task = {"id": 1, "data": {"image": "/data/upload/1/video01_000010.png"}}
    annotation = {"id": 5, "result": [keypoint(40, 30), keypoint(10, 10, positive=False), brush]}
    labels, skipped = LabelStudioTranslator.for_config(CONFIG).read(task, annotation)
    (label,) = labels
    assert label.task == "segmentation" and label.frame_start == 10
    assert len(skipped) == 2 and all("interactive prompt" in s for s in skipped)


# ---------------------------------------------------------------------------------------------------------
# hostile input: bounded before any engine is built or image fetched
# ---------------------------------------------------------------------------------------------------------
class _Recording:
    """An app whose engine factory and media fetch record their calls."""

    def __init__(self, segmenter, path: Path, **settings):
        self.built: list[int] = []
        self.fetched: list[str] = []

        def factory(_settings, backbone):
            assert backbone is segmenter.backbone
            self.built.append(1)
            return segmenter

        def fetch(url, task_id=None):
            self.fetched.append(url)
            return path

        config = BackendSettings(extra={"open_store": False}, **settings)
        app = create_app(
            config, fetch=fetch, click_segmenter_factory=factory, backbone_loader=lambda: segmenter.backbone
        )
        self.client = app.test_client()

    def post_text(self, text: str):
        return self.client.post("/predict", data=text, content_type="application/json")

    def untouched(self) -> bool:
        return not self.built and not self.fetched


def _compact_keypoint(i: int) -> dict:
    return {
        "type": "keypointlabels", "from_name": "click", "to_name": "image", "id": f"k{i}",
        "image_rotation": 0, "is_positive": bool(i % 2),
        "value": {"x": 10.0 + i % 80, "y": 20.5, "width": 0.5, "keypointlabels": ["Liver"]},
    }  # fmt: skip


def test_150000_clicks_are_refused_naming_the_cap_without_allocating_gigabytes(segmenter, frame):
    """On main: a 200 after 11 s with +2.6 GB peak. The regions are counted before one is read."""
    from rss_probe import peak_rss_growth

    app = _Recording(segmenter, frame[0])
    text = json.dumps(body([_compact_keypoint(i) for i in range(150_000)]))
    assert 20 << 20 < len(text) < 32 << 20  # under the body limit: the cap, not the body size, refuses it
    res, grew = peak_rss_growth(lambda: app.post_text(text))
    assert res.status_code == 400, res.get_json()
    err = res.get_json()
    assert err["error"] == "bad_interactive_context"
    assert "150000 regions" in err["detail"] and "at most 300" in err["detail"]
    assert "SURGENET_ASSIST_MAX_PROMPT_REGIONS" in err["detail"] and err["hint"]
    assert app.untouched(), "no engine built, no image fetched"
    assert grew < 600 << 20, f"peak memory grew by {grew >> 20} MB (parsing the 30 MB body is most of it)"


def test_the_region_cap_is_a_setting(segmenter, frame, monkeypatch):
    monkeypatch.setenv("SURGENET_ASSIST_MAX_PROMPT_REGIONS", "2")
    assert BackendSettings.from_env().max_prompt_regions == 2
    assert BackendSettings().max_prompt_regions == 300
    app = _Recording(segmenter, frame[0], max_prompt_regions=2)
    three = [keypoint(30, 30), keypoint(40, 40), keypoint(50, 50)]
    res = app.post_text(json.dumps(body(three)))
    assert res.status_code == 400 and "at most 2" in res.get_json()["detail"] and app.untouched()
    res = app.post_text(json.dumps(body(three[:2])))
    assert res.status_code == 200 and app.built and app.fetched == [URL]


_VALID = json.dumps(body([keypoint(30.0, 40.0)]))


def _with(path: tuple, raw: str) -> str:
    """The valid interactive body with the JSON at ``path`` (inside the first region) replaced by ``raw``
    text, so that numbers JSON's writer cannot produce (``1e400``, a 400-digit integer) can be sent."""
    data = json.loads(_VALID)
    target = data["params"]["context"]["result"][0]
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = "@@JUNK@@"
    return json.dumps(data).replace('"@@JUNK@@"', raw)


_JUNK_NUMBERS = {
    "10**400": str(10**400),
    "-10**400": str(-(10**400)),
    "1e400": "1e400",
    "-1e400": "-1e400",
    "NaN": "NaN",
    "Infinity": "Infinity",
    "string": '"12"',
    "true": "true",
    "false": "false",
    "null": "null",
    "list": "[12]",
    "object": '{"x": 12}',
    "nested": '[[[[{"a": [1, {"b": NaN}]}]]]]',
}


@pytest.mark.parametrize(
    ("where", "junk"),
    [
        (where, junk)
        for where in [("value", "x"), ("value", "y"), ("image_rotation",), ("value", "keypointlabels")]
        for junk in _JUNK_NUMBERS
        if not (where == ("image_rotation",) and junk in ("null", "false"))  # no rotation: unrotated
    ],
)
def test_a_malformed_number_is_a_400_never_a_500(segmenter, frame, where, junk):
    app = _Recording(segmenter, frame[0])
    res = app.post_text(_with(where, _JUNK_NUMBERS[junk]))
    assert res.status_code == 400, (where, junk, res.status_code, res.get_data()[:300])
    err = res.get_json()
    assert err["error"] == "bad_interactive_context" and err["detail"] and err["hint"]
    assert len(err["detail"]) < 600, "a caller's value is echoed cut short"
    assert app.untouched(), "refused before the engine is built or the image fetched"


def test_a_malformed_box_number_is_a_400(segmenter, frame):
    app = _Recording(segmenter, frame[0])
    valid = body([rectangle(10, 10, 30, 30)])
    for key in ("x", "y", "width", "height", "rotation"):
        for raw in (str(10**400), "1e400", "NaN", '"12"', "true", "[1]"):
            data = json.loads(json.dumps(valid))
            data["params"]["context"]["result"][0]["value"][key] = "@@JUNK@@"
            res = app.post_text(json.dumps(data).replace('"@@JUNK@@"', raw))
            assert res.status_code == 400, (key, raw, res.get_data()[:300])
    assert app.untouched()


def test_junk_anywhere_in_a_region_is_a_400_never_a_500(segmenter, frame):
    app = _Recording(segmenter, frame[0])
    junk_regions = [
        keypoint(10, 10, from_name={"a": [1, 2]}),
        keypoint(10, 10, from_name=["click"]),
        keypoint(10, 10, to_name={"x": 1}) | {"value": {"x": 1, "y": 1, "keypointlabels": [["Liver"]]}},
        keypoint(10, 10, type=["keypointlabels"]),
        keypoint(10, 10, is_positive="yes"),
        keypoint(10, 10, is_positive=1),
        keypoint(10, 10) | {"value": [10, 10]},
        keypoint(10, 10) | {"value": "x" * 100_000},
        keypoint(10, 10, id="x" * 1_000_000, image_rotation=45),
    ]
    for region in junk_regions:
        res = app.post_text(json.dumps(body([region])))
        assert res.status_code == 400, (str(region)[:200], res.get_data()[:300])
        assert len(res.get_json()["detail"]) < 600
    res = app.post_text(_with(("value", "x"), "1" * 5000))  # past Python's 4,300-digit int limit
    assert res.status_code == 400 and res.get_json()["error"] == "malformed_json"
    two_tasks = body([keypoint(30, 30)])
    two_tasks["tasks"].append({"id": 8, "data": {"image": URL}})
    res = app.post_text(json.dumps(two_tasks))
    assert res.status_code == 400 and "names 2 tasks; it takes 1" in res.get_json()["detail"]
    assert app.untouched()


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
    | st.sampled_from([10**400, -(10**400), "keypointlabels", "rectanglelabels", "click", "box", "Liver"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)  # fmt: skip


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    field=st.sampled_from(["type", "from_name", "to_name", "value", "image_rotation", "is_positive", "id"]),
    inner=st.sampled_from(
        [None, "x", "y", "width", "height", "rotation", "keypointlabels", "rectanglelabels"]
    ),
    junk=_json,
    kind=st.sampled_from(["keypoint", "rectangle"]),
)
def test_any_junk_in_a_region_is_an_interactive_error_or_usable(field, inner, junk, kind):
    """Property: whatever JSON sits in a region's field, reading the context raises InteractiveError (a 400)
    or gives a prompt with finite percentages, which the engine's own check accepts or refuses
    with a PromptError (also a 400: say, a lone negative click); never another exception (a 500)."""
    region = keypoint(30, 40) if kind == "keypoint" else rectangle(10, 10, 30, 30)
    if field == "value" and inner is not None:
        region["value"][inner] = junk
    else:
        region[field] = junk
    try:
        parsed = read_context([region], plan())
    except InteractiveError as err:
        assert err.hint
        return
    for x, y, positive in parsed.clicks:
        assert 0 <= x <= 100.001 and 0 <= y <= 100.001 and isinstance(positive, bool)
    if parsed.box is not None:
        assert all(math.isfinite(v) for v in parsed.box)
    try:
        parsed.prompt(H, W).validate(H, W)
    except PromptError as err:
        assert err.hint


@settings(max_examples=200, deadline=None)
@given(context=_json)
def test_any_json_context_is_none_a_region_list_or_an_interactive_error(context):
    try:
        regions = context_regions({"context": context})
    except InteractiveError:
        assert context is not None
        return
    assert (regions is None) == (context is None)
    assert regions is None or all(isinstance(r, dict) for r in regions)


@pytest.mark.parametrize(
    ("height", "width", "backbone_input"), [(1, 4000, (32, 1024)), (4000, 4000, (256, 256))]
)
def test_a_click_on_a_thin_or_huge_png_is_bounded_work(segmenter, tmp_path, height, width, backbone_input):
    """The findings on main: a 1x4000 PNG and one click gave the backbone a 256x1,024,000 input (the worker
    grew to 23 GB and was killed); a 4000x4000 one took 46-93 s per click. Here the answer is the clicked
    object at the image's size, from a clamped input and a bounded peak."""
    from rss_probe import peak_rss_growth

    image = np.zeros((height, width, 3), np.uint8)
    image[:] = (190, 120, 115)
    cv2.circle(image, (width // 2, height // 2), max(1, min(height, width) // 4), (210, 190, 90), -1)
    path = tmp_path / "big.png"
    cv2.imwrite(str(path), image)
    served = ClickSegmenter(segmenter.backbone)  # what `serve` builds: short side 256
    seen: list[tuple[int, int]] = []
    hook = served.backbone.register_forward_pre_hook(lambda _m, args: seen.append(tuple(args[0].shape[-2:])))
    try:
        client = create_app(
            BackendSettings(extra={"open_store": False}), fetch=lambda url, task_id=None: path,
            click_segmenter=served,
        ).test_client()  # fmt: skip
        click = keypoint(50.0, 50.0, original_width=width, original_height=height)
        res, grew = peak_rss_growth(lambda: post(client, body([click])))
    finally:
        hook.remove()
    assert res.status_code == 200, res.get_json()
    assert seen == [backbone_input]
    (region,) = res.get_json()["results"][0]["result"]
    mask = _decode(region)
    assert mask.shape == (height, width) and mask[height // 2, width // 2]
    assert grew < 500 << 20, f"peak memory grew by {grew >> 20} MB"
