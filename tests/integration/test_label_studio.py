"""End to end against a REAL Label Studio 1.23.x (own venv, SQLite, 127.0.0.1), started once per session.

Label Studio talks to our backend over HTTP exactly as in production: connect (``/health`` + ``/setup``),
"Retrieve predictions" (``/predict``), annotation webhooks, "Start training" (``START_TRAINING``). We read the
stored predictions back through Label Studio's API and the labels back from the label store.

Skips with a reason when the LS virtualenv is missing (``scripts/setup_label_studio.sh`` creates it), unless
``SURGENET_ASSIST_REQUIRE_LABEL_STUDIO=1``, where that is a failure.
"""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import requests
from label_studio_sdk.label_interface import LabelInterface

from surgenet_assist.core.encoders import brush_rle_to_mask, mask_to_brush_rle
from surgenet_assist.core.schema import DEFAULT_SCHEMA

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
LS_VENV = Path(os.environ.get("SURGENET_ASSIST_LS_VENV", ROOT / ".ls-venv"))
TOKEN = "0123456789abcdef0123456789abcdef01234567"
H, W = 64, 96


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(url: str, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-3000:] if log else ""
            raise RuntimeError(f"Label Studio exited with {proc.returncode}:\n{tail}")
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} not up after {timeout:.0f} s")


def _poll(fn, timeout: float = 30.0, what: str = "condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="session")
def ls_server(tmp_path_factory):
    exe = LS_VENV / "bin" / "label-studio"
    if not exe.exists():
        reason = f"Label Studio virtualenv not found at {LS_VENV}; run scripts/setup_label_studio.sh"
        if os.environ.get("SURGENET_ASSIST_REQUIRE_LABEL_STUDIO") == "1":
            pytest.fail(reason + " (required: SURGENET_ASSIST_REQUIRE_LABEL_STUDIO=1)")
        pytest.skip(reason)
    base = tmp_path_factory.mktemp("ls")
    files = base / "files"
    files.mkdir()
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LABEL_STUDIO_", "DJANGO"))}
    env.update(
        LABEL_STUDIO_USERNAME="admin@example.com",
        LABEL_STUDIO_PASSWORD="adminpass123",
        LABEL_STUDIO_USER_TOKEN=TOKEN,
        LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED="true",
        LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT=str(files),
        SENTRY_DSN="",
        FRONTEND_SENTRY_DSN="",
        LATEST_VERSION_CHECK="false",
        COLLECT_ANALYTICS="false",
        ML_BLOCK_LOCAL_IP="false",
        SSRF_PROTECTION_ENABLED="false",
        HOME=str(base),
        PYTHONUNBUFFERED="1",
    )
    log = base / "ls.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                str(exe),
                "start",
                "--no-browser",
                "--internal-host",
                "127.0.0.1",
                "--port",
                str(port),
                "--data-dir",
                str(base / "data"),
                "--enable-legacy-api-token",
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=base,
        )
    try:
        _wait(f"http://127.0.0.1:{port}/health", 300, proc, log)
        yield {"url": f"http://127.0.0.1:{port}", "files": files, "log": log}
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="session")
def backend(ls_server, tmp_path_factory):
    """Our backend in-process (werkzeug threaded server) with the random-init model and a SQLite store."""
    from werkzeug.serving import make_server

    from surgenet_assist.backend.app import BackendSettings, create_app
    from surgenet_assist.core.model import SurgeNetAssistModel
    from surgenet_assist.core.predictor import Predictor
    from surgenet_assist.core.store import LabelStore

    saved = {k: os.environ.get(k) for k in ("LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY")}
    os.environ["LABEL_STUDIO_URL"] = ls_server["url"]
    os.environ["LABEL_STUDIO_API_KEY"] = TOKEN
    model = SurgeNetAssistModel.create(random_init=True)
    predictor = Predictor(model, batch_size=4, short_side=64, model_version="it-1.0", device="cpu")
    store = LabelStore(f"sqlite:///{tmp_path_factory.mktemp('store') / 'store.db'}")
    app = create_app(BackendSettings(), predictor=predictor, store=store)
    port = _free_port()
    server = make_server("127.0.0.1", port, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield {"url": f"http://127.0.0.1:{port}", "store": store, "predictor": predictor, "model": model}
    finally:
        server.shutdown()
        store.close()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


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


def _retrieve(ls, project_id: int) -> list:
    ls.actions.create(
        id="retrieve_tasks_predictions", project=project_id, selected_items={"all": True, "excluded": []}
    )
    return ls.predictions.list(project=project_id)


def test_image_project_predictions_round_trip(ls, image_project, backend):
    ml = ls.ml.get(id=image_project.ml_backend_id)
    assert ml.state == "CO" and ml.model_version == "it-1.0"
    preds = _retrieve(ls, image_project.project_id)
    assert sorted(p.task for p in preds) == sorted(image_project.task_ids)
    cfg = ls.projects.get(id=image_project.project_id).label_config
    li = LabelInterface(cfg)
    for p in preds:
        assert p.model_version == "it-1.0" and 0.0 <= p.score <= 1.0
        body = {"model_version": p.model_version, "score": p.score, "result": p.result}
        assert li.validate_prediction(body, return_errors=True) == []
        brush = [r for r in p.result if r["type"] == "brushlabels"]
        assert brush
        covered = np.zeros((H, W), bool)
        for r in brush:
            alpha = brush_rle_to_mask(r["value"]["rle"], r["original_height"], r["original_width"])
            assert not (covered & (alpha == 255)).any()
            covered |= alpha == 255
        assert covered.all(), "the class regions tile the frame"
        assert {r["from_name"] for r in p.result} >= {"mask", "phase"}


def test_video_project_timeline(ls, ls_server, backend):
    from surgenet_assist.backend.ls_client import setup_project
    from surgenet_assist.core.synthetic import generate_clip

    (ls_server["files"] / "videos").mkdir()
    path = generate_clip(5, 20, H, W).write_video(ls_server["files"] / "videos" / "case02.mp4", fps=10)
    res = setup_project(
        ls_server["url"], TOKEN, video=path, backend_url=backend["url"], document_root=ls_server["files"]
    )
    preds = _retrieve(ls, res.project_id)
    assert len(preds) == 1
    cfg = ls.projects.get(id=res.project_id).label_config
    assert 'frameRate="10"' in cfg
    result = preds[0].result
    assert (
        LabelInterface(cfg).validate_prediction(
            {"result": result, "score": preds[0].score}, return_errors=True
        )
        == []
    )
    ranges = [
        (r["value"]["ranges"][0]["start"], r["value"]["ranges"][0]["end"])
        for r in result
        if r["type"] == "timelinelabels"
    ]
    assert ranges[0][0] == 1 and ranges[-1][1] == 20


def test_annotations_become_store_revisions(ls, image_project, backend):
    store = backend["store"]
    task_id = image_project.task_ids[0]
    m = np.zeros((H, W), np.uint8)
    m[5:25, 10:60] = 255

    def region(label):
        return {
            "from_name": "mask",
            "to_name": "image",
            "type": "brushlabels",
            "original_width": W,
            "original_height": H,
            "value": {"format": "rle", "rle": mask_to_brush_rle(m), "brushlabels": [label]},
        }

    ann = ls.annotations.create(
        id=task_id,
        result=[
            region("Gallbladder"),
            {
                "from_name": "phase",
                "to_name": "image",
                "type": "choices",
                "value": {"choices": ["ClippingCutting"]},
            },
        ],
    )
    vid = _poll(lambda: store.video_id("case01"), what="ANNOTATION_CREATED in the store")
    seg = _poll(lambda: store.label_for(vid, 0, "segmentation"), what="segmentation label")
    assert seg.payload["mask"][10, 20] == DEFAULT_SCHEMA.class_id("Gallbladder")
    assert store.label_for(vid, 0, "phase").payload["phase"] == "ClippingCutting"

    ls.annotations.update(id=ann.id, result=[region("Liver")])

    def updated():
        rec = store.label_for(vid, 0, "segmentation")
        return rec if rec.payload["mask"][10, 20] == DEFAULT_SCHEMA.class_id("Liver") else None

    _poll(updated, what="ANNOTATION_UPDATED revision")
    runs = [r for r in store.training_labels("segmentation", video_id=vid)]
    assert len(runs) == 1 and runs[0].revision == 2 and runs[0].source == "label-studio"
    assert store.training_labels("phase", video_id=vid) == []  # removed in the update -> tombstone


def test_start_training_queues_a_cycle(ls, image_project, backend):
    ls.ml.train(id=image_project.ml_backend_id)
    queued = _poll(
        lambda: [r for r in backend["store"].training_runs() if r["status"] == "queued"],
        what="START_TRAINING -> queued run",
    )
    assert len(queued) == 1 and queued[0]["params"]["ls_project"] == image_project.project_id


def test_preannotate_posts_new_version_and_resumes(ls, ls_server, image_project, backend):
    from surgenet_assist.backend.ls_client import preannotate
    from surgenet_assist.core.predictor import Predictor

    p2 = Predictor(backend["model"], batch_size=2, short_side=64, model_version="it-2.0", device="cpu")
    rep = preannotate(ls_server["url"], TOKEN, image_project.project_id, p2, batch=2, progress=False)
    assert (rep.predicted, rep.failed) == (len(image_project.task_ids), {})
    versions = [p.model_version for p in ls.predictions.list(project=image_project.project_id)]
    assert versions.count("it-2.0") == len(image_project.task_ids)
    again = preannotate(ls_server["url"], TOKEN, image_project.project_id, p2, batch=2, progress=False)
    assert again.predicted == 0 and again.skipped == len(image_project.task_ids)
