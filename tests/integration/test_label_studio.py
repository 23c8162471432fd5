"""End to end against a REAL Label Studio 1.23.x (own venv, SQLite, 127.0.0.1), started once per session.

Label Studio talks to our backend over HTTP exactly as in production: connect (``/health`` + ``/setup``),
"Retrieve predictions" (``/predict``), annotation webhooks, "Start training" (``START_TRAINING``). We read the
stored predictions back through Label Studio's API and the labels back from the label store, and check the
round trip both ways: what the webhooks wrote exports as what Label Studio holds, and Label Studio's own
export imports and exports back unchanged (``ls_live.py`` annotates and captures, ``ls_semantics.py``
compares).

Skips with a reason when the LS virtualenv is missing (``scripts/setup_label_studio.sh`` creates it), unless
``SURGENET_ASSIST_REQUIRE_LABEL_STUDIO=1``, where that is a failure.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from label_studio_sdk.label_interface import LabelInterface
from ls_live import TOKEN, WebhookSink, annotate_and_capture, export
from ls_live import poll as _poll
from ls_semantics import assert_same_annotations, fixture

from surgenet_assist.core.encoders import brush_rle_to_mask, mask_to_brush_rle
from surgenet_assist.core.schema import DEFAULT_SCHEMA

pytestmark = pytest.mark.slow
H, W = 64, 96


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


def _project_store(backend, ls_project_id):
    """The store project a Label Studio project's labels go to (label-studio-<id>)."""
    from surgenet_assist.core.store import LabelStore

    return LabelStore(backend["store"].url, project=f"label-studio-{ls_project_id}")


def test_annotations_become_store_revisions(ls, image_project, backend):
    store = _project_store(backend, image_project.project_id)
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
        lambda: [
            r
            for r in _project_store(backend, image_project.project_id).training_runs()
            if r["status"] == "queued"
        ],
        what="START_TRAINING -> queued run",
    )
    assert len(queued) == 1 and queued[0]["params"]["ls_project"] == image_project.project_id


def test_preannotate_posts_new_version_and_resumes(ls, ls_server, image_project, backend):
    from surgenet_assist.backend.ls_client import preannotate
    from surgenet_assist.core.predictor import Predictor

    p2 = Predictor(backend["model"], batch_size=2, short_side=64, model_version="it-2.0", device="cpu")
    # case01 is a test video by the store's rule: pre-annotated here on purpose (held_out=True)
    rep = preannotate(
        ls_server["url"], TOKEN, image_project.project_id, p2, batch=2, progress=False, held_out=True
    )
    assert (rep.predicted, rep.failed) == (len(image_project.task_ids), {})
    versions = [p.model_version for p in ls.predictions.list(project=image_project.project_id)]
    assert versions.count("it-2.0") == len(image_project.task_ids)
    again = preannotate(
        ls_server["url"], TOKEN, image_project.project_id, p2, batch=2, progress=False, held_out=True
    )
    assert again.predicted == 0 and again.skipped == len(image_project.task_ids)


def test_round_trip_through_the_store_is_lossless(ls_server, backend, tmp_path):
    import typer
    from typer.testing import CliRunner

    from surgenet_assist.cli.store_commands import register
    from surgenet_assist.core.formats.label_studio import export_label_studio

    sink = WebhookSink()
    try:
        cap = annotate_and_capture(ls_server, sink, backend_url=backend["url"])
    finally:
        sink.close()

    def ours(store, kind):
        out = tmp_path / f"{kind}-{id(store)}.json"
        export_label_studio(
            store, out, annotations=True, label_config=cap.configs[kind], tasks=cap.exports[kind]
        )
        return json.loads(out.read_text())

    # 1. what the backend's webhooks wrote into the store exports as what Label Studio holds
    for kind in ("image", "video"):  # the projects our backend is connected to
        _poll(
            lambda kind=kind: _same(
                ours(_project_store(backend, cap.ids[kind]), kind), export(ls_server["url"], cap.ids[kind])
            ),
            what=f"{kind} annotations in the store",
        )
        assert_same_annotations(ours(_project_store(backend, cap.ids[kind]), kind), cap.exports[kind])
    # 2. Label Studio's own export, imported into an empty store, exports back the same (as a user would)
    cli, db = typer.Typer(), f"sqlite:///{tmp_path / 'fresh.db'}"
    register(cli)
    for kind in ("image", "video"):
        (tmp_path / f"{kind}.xml").write_text(cap.configs[kind])
        (tmp_path / f"{kind}-ls.json").write_text(json.dumps(cap.exports[kind]))
        cfg, exported, back = (
            str(tmp_path / n) for n in (f"{kind}.xml", f"{kind}-ls.json", f"{kind}-back.json")
        )
        r = CliRunner().invoke(cli, ["import", "label-studio", exported, "--db", db, "--label-config", cfg])
        assert r.exit_code == 0, r.output
        args = ["--db", db, "--label-config", cfg, "--tasks", exported, "--annotations"]
        r = CliRunner().invoke(cli, ["export", "label-studio", "--out", back, *args])
        assert r.exit_code == 0, r.output
        assert_same_annotations(json.loads(Path(back).read_text()), cap.exports[kind])
    # 3. the payloads the fast tests read (tests/fixtures/label_studio) still have this server's shapes
    assert [b["action"] for b in cap.webhooks] == [b["action"] for b in fixture("webhooks.json")]
    for live, saved in zip(cap.webhooks, fixture("webhooks.json"), strict=True):
        assert sorted(live) == sorted(saved)
        for part in ("annotation", "task"):
            if part in saved:
                assert sorted(live[part]) == sorted(saved[part]), part
    for kind, tasks in cap.exports.items():
        saved = fixture(f"{kind}_export.json")
        assert [sorted(t) for t in tasks] == [sorted(t) for t in saved]
        assert [sorted(t["data"]) for t in tasks] == [sorted(t["data"]) for t in saved]  # uploads: new names


def _same(ours, theirs) -> bool:
    try:
        assert_same_annotations(ours, theirs)
    except AssertionError:
        return False
    return True
