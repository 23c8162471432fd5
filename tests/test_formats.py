"""Importers/exporters on small fixture datasets written in the documented formats (surgenetxl.md §6,
label-studio.md §3), plus every bad-input case of the issue: clear error, nothing half-written."""
# ruff: noqa: F811  (fixtures imported from store_helpers are parameters of the tests below)

from __future__ import annotations

import json
import time

import cv2
import ls_brush_reference as sdk
import numpy as np
import pytest
from store_helpers import random_mask, store, store_url, write_cholecseg8k, write_phase_file  # noqa: F401

from surgenet_assist.core.encoders import coco_rle_decode
from surgenet_assist.core.errors import DatasetFormatError
from surgenet_assist.core.formats.cholec80 import export_cholec80, import_cholec80
from surgenet_assist.core.formats.cholecseg8k import export_cholecseg8k, import_cholecseg8k
from surgenet_assist.core.formats.coco import export_coco
from surgenet_assist.core.formats.endoscapes import import_endoscapes
from surgenet_assist.core.formats.label_studio import export_label_studio, import_label_studio, ingest_webhook
from surgenet_assist.core.schema import DEFAULT_SCHEMA, IGNORE_INDEX
from surgenet_assist.core.store import LabelStore

PHASES = DEFAULT_SCHEMA.phase_names


@pytest.fixture
def sqlite_store(tmp_path):
    st = LabelStore(f"sqlite:///{tmp_path / 'f.db'}")
    yield st
    st.close()


def _masks(n=3, seed=0):
    rng = np.random.default_rng(seed)
    return {("video01", 80 + i): random_mask(rng) for i in range(n)}


# --- CholecSeg8k ------------------------------------------------------------------------------------------
def test_cholecseg8k_import_maps_colours_and_border_to_ignore(store, tmp_path):
    masks = _masks()
    masks[("video12", 400)] = random_mask(np.random.default_rng(9))
    write_cholecseg8k(tmp_path / "ds", masks, watershed_only={("video12", 400)})
    (tmp_path / "ds" / "video01" / "video01_00080" / "frame_99_endo.png").write_bytes(b"")  # image, no mask
    report = import_cholecseg8k(store, tmp_path / "ds")
    assert report.counts["new revisions"] == 4
    assert any("without colour or watershed mask" in r for _, r in report.skipped)
    got = {(r.video_path, r.frame_start): r.payload["mask"] for r in store.training_labels("segmentation")}
    assert got.keys() == masks.keys()
    for key, mask in masks.items():
        np.testing.assert_array_equal(got[key], mask)
        assert (got[key][0] == IGNORE_INDEX).all()
    again = import_cholecseg8k(store, tmp_path / "ds")  # idempotent re-import
    assert again.counts["new revisions"] == 0 and again.counts["unchanged (already stored)"] == 4


def test_cholecseg8k_export_roundtrip(sqlite_store, tmp_path):
    write_cholecseg8k(tmp_path / "ds", _masks(2))
    import_cholecseg8k(sqlite_store, tmp_path / "ds")
    assert export_cholecseg8k(sqlite_store, tmp_path / "out") == 2
    other = LabelStore(f"sqlite:///{tmp_path / 'other.db'}")
    import_cholecseg8k(other, tmp_path / "out")
    a = {
        (r.video_path, r.frame_start): r.payload["mask"] for r in sqlite_store.training_labels("segmentation")
    }
    b = {(r.video_path, r.frame_start): r.payload["mask"] for r in other.training_labels("segmentation")}
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    other.close()


def test_unknown_colour_is_reported_with_count_and_nothing_written(store, tmp_path):
    v = store.add_video("keep")
    store.record_annotation(v, 0, "cvs", [1, 1, 1], source="napari")
    masks = _masks(3)
    write_cholecseg8k(tmp_path / "ds", masks)
    path = tmp_path / "ds" / "video01" / "video01_00080" / "frame_82_endo_color_mask.png"
    img = cv2.imread(str(path))
    img[5:7, 5:8] = (3, 2, 1)  # BGR -> RGB(1,2,3), 6 px
    cv2.imwrite(str(path), img)
    with pytest.raises(DatasetFormatError) as info:
        import_cholecseg8k(store, tmp_path / "ds")
    assert "RGB(1,2,3): 6 px" in info.value.message and "frame_82" in info.value.message
    s = store.stats()
    assert s["annotations"]["total"] == 1 and s["videos"] == 1


def test_truncated_png_is_a_clear_error(store, tmp_path):
    write_cholecseg8k(tmp_path / "ds", _masks(2))
    path = tmp_path / "ds" / "video01" / "video01_00080" / "frame_81_endo_color_mask.png"
    path.write_bytes(path.read_bytes()[:60])
    with pytest.raises(DatasetFormatError, match="frame_81_endo_color_mask.png"):
        import_cholecseg8k(store, tmp_path / "ds")
    assert store.stats()["annotations"]["revisions"] == 0


# --- Cholec80 ----------------------------------------------------------------------------------------------
def test_cholec80_import_export_roundtrip(store, tmp_path):
    phases = ["Preparation"] * 30 + ["CalotTriangleDissection"] * 50 + ["ClippingCutting"] * 20
    (tmp_path / "phase_annotations").mkdir()
    src = tmp_path / "phase_annotations" / "video07-phase.txt"
    write_phase_file(src, phases)
    (tmp_path / "phase_annotations" / "video07-tool.txt").write_text("Frame\tGrasper\n0\t1\n")
    report = import_cholec80(store, tmp_path / "phase_annotations")
    assert report.counts["frames"] == 100 and report.counts["new revisions"] == 1
    assert any("tool" in item for item, _ in report.skipped)
    vid = store.video_id("video07")
    assert store.videos()[0]["fps"] == 25 and store.videos()[0]["frame_count"] == 100
    assert [PHASES[i] for i in store.phase_labels(vid)] == phases
    assert export_cholec80(store, tmp_path / "out") == 1
    assert (tmp_path / "out" / "video07-phase.txt").read_text() == src.read_text()


@pytest.mark.parametrize(
    "rows, match",
    [
        (["0\tPreparation", "1\tSuturing"], "unknown phase 'Suturing'"),
        (["0\tPreparation", "2\tPreparation", "1\tPreparation"], "does not follow"),
        (["0\tPreparation", "0\tPreparation"], "does not follow"),
        (["zero\tPreparation"], "not an integer"),
    ],
)
def test_bad_phase_files(store, tmp_path, rows, match):
    good = tmp_path / "video01-phase.txt"
    write_phase_file(good, ["Preparation"] * 5)
    bad = tmp_path / "video02-phase.txt"
    bad.write_text("Frame\tPhase\n" + "\n".join(rows) + "\n")
    with pytest.raises(DatasetFormatError, match=match) as info:
        import_cholec80(store, tmp_path)  # the good file is in the same import: it must not be written either
    assert "video02-phase.txt:" in info.value.message
    assert store.stats()["videos"] == 0
    headerless = tmp_path / "x" / "video03-phase.txt"
    headerless.parent.mkdir()
    headerless.write_text("0,Preparation\n")
    with pytest.raises(DatasetFormatError, match="header"):
        import_cholec80(store, headerless)


def test_one_hour_of_phases_imports_in_seconds(sqlite_store, tmp_path):
    n = 90_000
    rng = np.random.default_rng(0)
    bounds = np.sort(rng.choice(np.arange(1, n), 6, replace=False))
    ids = np.searchsorted(bounds, np.arange(n), side="right")
    path = tmp_path / "video01-phase.txt"
    write_phase_file(path, [PHASES[i] for i in ids])
    t0 = time.perf_counter()
    import_cholec80(sqlite_store, path)
    elapsed = time.perf_counter() - t0
    assert elapsed < 10, f"{elapsed:.1f} s"
    np.testing.assert_array_equal(sqlite_store.phase_labels(sqlite_store.video_id("video01")), ids)


# --- Endoscapes -----------------------------------------------------------------------------------------
def _endoscapes(root, images):
    (root / "train").mkdir(parents=True)
    coco = {
        "images": images,
        "annotations": [{"id": 1, "image_id": 1, "bbox": [0, 0, 1, 1]}],
        "categories": [],
    }
    (root / "train" / "annotation_ds_coco.json").write_text(json.dumps(coco))
    return root / "train" / "annotation_ds_coco.json"


def test_endoscapes_keeps_fractional_ds_and_raters(store, tmp_path):
    path = _endoscapes(
        tmp_path / "endo",
        [
            {
                "id": 1,
                "file_name": "12_14850.jpg",
                "ds": [0.6666667, 0.0, 1.0],
                "is_ds_keyframe": True,
                "cvs_annotator_1": "[1, 0, 1]",
                "cvs_annotator_2": [1, 0, 1],
                "cvs_annotator_3": [0, 0, 1],
            },
            {"id": 2, "file_name": "12_14875.jpg", "ds": [0.6666667, 0.0, 1.0], "is_ds_keyframe": False},
            {"id": 3, "file_name": "13_100.jpg", "ds": [0.0, 0.3333333, 0.0], "is_ds_keyframe": True},
            {"id": 4, "file_name": "13_125.jpg"},
        ],
    )
    (tmp_path / "endo" / "all_metadata.csv").write_text(
        "vid,frame,is_ds_keyframe,C1,C2,C3,cvs_annotator_1,cvs_annotator_2,cvs_annotator_3\n"
        '13,100,True,0,0.33,0,"[0, 1, 0]","[0, 0, 0]","[0, 0, 0]"\n'
    )
    report = import_endoscapes(store, tmp_path / "endo")
    assert report.counts["new revisions"] == 2
    reasons = " ".join(r for _, r in report.skipped)
    assert "carried-forward" in reasons and "not a CVS keyframe" in reasons and "detection" in reasons
    labels = {(r.video_path, r.frame_start): r.payload for r in store.training_labels("cvs", "train")}
    assert labels[("endoscapes/12", 14850)]["values"] == [0.666667, 0.0, 1.0]
    assert labels[("endoscapes/12", 14850)]["raters"] == [[1, 0, 1], [1, 0, 1], [0, 0, 1]]
    assert labels[("endoscapes/13", 100)]["raters"] == [[0, 1, 0], [0, 0, 0], [0, 0, 0]]  # from the csv
    assert path.exists()


@pytest.mark.parametrize(
    "coco, match",
    [
        ({"categories": []}, "no 'images'"),
        ({"images": [{"id": 1, "ds": [0, 0, 0]}]}, "lacks \\['file_name'\\]"),
        ({"images": [{"id": 1, "file_name": "a.jpg", "ds": [0, 0, 0]}]}, "not <video>_<frame>"),
        ({"images": [{"id": 1, "file_name": "1_2.jpg", "ds": [0, 2]}]}, "3 numbers"),
    ],
)
def test_endoscapes_missing_fields(store, tmp_path, coco, match):
    path = tmp_path / "annotation_ds_coco.json"
    path.write_text(json.dumps(coco))
    with pytest.raises(DatasetFormatError, match=match):
        import_endoscapes(store, path)
    assert store.stats()["annotations"]["revisions"] == 0


# --- Label Studio -------------------------------------------------------------------------------------------
def _ls_export(mask):
    h, w = mask.shape
    brush = [
        {
            "id": f"r{c}",
            "from_name": "seg",
            "to_name": "image",
            "type": "brushlabels",
            "original_width": w,
            "original_height": h,
            "image_rotation": 0,
            "value": {
                "format": "rle",
                "rle": sdk.mask2rle(((mask == c) * 255).astype(np.uint8)),
                "brushlabels": [DEFAULT_SCHEMA.class_names[c]],
            },
        }
        for c in np.unique(mask)
        if c != IGNORE_INDEX
    ]
    return [
        {
            "id": 1,
            "data": {"image": "/data/upload/1/video03_frame_000120.png"},
            "annotations": [
                {
                    "id": 10,
                    "completed_by": {"email": "a@x"},
                    "updated_at": "2024-05-01T10:00:00.5Z",
                    "result": brush
                    + [
                        {
                            "type": "choices",
                            "from_name": "cvs",
                            "to_name": "image",
                            "value": {"choices": ["C1", "C3"]},
                        },
                        {"type": "polygonlabels", "value": {}},
                    ],
                },
                {"id": 11, "was_cancelled": True, "result": []},
            ],
        },
        {
            "id": 2,
            "data": {"video": "/data/video03.mp4", "video_name": "video03", "fps": 25},
            "annotations": [
                {
                    "id": 12,
                    "completed_by": 3,
                    "created_at": "2024-05-02T00:00:00Z",
                    "result": [
                        {
                            "type": "timelinelabels",
                            "from_name": "phases",
                            "to_name": "video",
                            "value": {"ranges": [{"start": 1, "end": 10}], "timelinelabels": ["Preparation"]},
                        },
                        {
                            "type": "timelinelabels",
                            "from_name": "phases",
                            "to_name": "video",
                            "value": {
                                "ranges": [{"start": 11, "end": 25}],
                                "timelinelabels": ["Calot triangle dissection"],
                            },
                        },
                    ],
                }
            ],
        },
    ]


def test_label_studio_export_import(store, tmp_path):
    mask = random_mask(np.random.default_rng(3))
    path = tmp_path / "export.json"
    path.write_text(json.dumps(_ls_export(mask)))
    report = import_label_studio(store, path)
    assert report.counts["new revisions"] == 3
    reasons = " ".join(r for _, r in report.skipped)
    assert "cancelled" in reasons and "polygonlabels" in reasons
    seg = store.training_labels("segmentation")[0]
    assert (seg.video_path, seg.frame_start, seg.author, seg.source) == (
        "video03",
        120,
        "a@x",
        "label-studio",
    )
    np.testing.assert_array_equal(seg.payload["mask"], mask)  # border stays unlabelled
    assert store.training_labels("cvs")[0].payload["values"] == [1.0, 0.0, 1.0]
    phase = store.phase_labels(store.video_id("video03"))
    assert list(phase[:25]) == [0] * 10 + [1] * 15
    assert import_label_studio(store, path).counts["new revisions"] == 0


def test_label_studio_unknown_label_is_rejected(store, tmp_path):
    tasks = _ls_export(random_mask(np.random.default_rng(1)))
    tasks[1]["annotations"][0]["result"][0]["value"]["timelinelabels"] = ["Suturing"]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(tasks))
    with pytest.raises(DatasetFormatError, match="task 2 annotation 12.*Suturing"):
        import_label_studio(store, path)
    assert store.stats()["annotations"]["revisions"] == 0  # task 1 was valid but is not half-written


def test_webhook_bodies_are_idempotent_and_deletes_tombstone(store):
    task = {"id": 5, "data": {"video_name": "video04", "frame_index": 33}}
    ann = {
        "id": 77,
        "completed_by": 1,
        "updated_at": "2024-05-01T00:00:00Z",
        "result": [{"type": "choices", "from_name": "phase", "value": {"choices": ["Preparation"]}}],
    }
    body = {"action": "ANNOTATION_CREATED", "task": task, "annotation": ann, "project": {"id": 1}}
    assert ingest_webhook(store, body)["counts"]["new revisions"] == 1
    assert ingest_webhook(store, body)["counts"]["unchanged (already stored)"] == 1
    updated = dict(
        ann,
        updated_at="2024-05-02T00:00:00Z",
        result=[{"type": "choices", "value": {"choices": ["ClippingCutting"]}}],
    )
    ingest_webhook(store, {"action": "ANNOTATION_UPDATED", "task": task, "annotation": updated})
    ingest_webhook(store, body)  # late redelivery of the old version: kept as history, not current
    assert store.training_labels("phase")[0].payload == {"phase": "ClippingCutting"}
    assert ingest_webhook(store, {"action": "START_TRAINING", "project": {}})["ignored"]
    assert (
        ingest_webhook(store, {"action": "ANNOTATIONS_DELETED", "annotations": [{"id": 77}]})["deleted"] == 1
    )
    assert store.training_labels("phase") == []
    assert store.stats()["annotations"]["revisions"] == 3


def test_label_studio_predictions_export(sqlite_store, tmp_path):
    st = sqlite_store
    v = st.add_video("video05", 25, 50)
    mask = random_mask(np.random.default_rng(4))
    st.add_prediction(v, 7, "segmentation", mask, model_version="m1", score=0.4)
    st.add_prediction(v, 7, "cvs", [0.8, 0.2, 0.6], model_version="m1")
    st.add_prediction(
        v, 0, "phase", {"segments": [[0, 9, "Preparation"], [10, 49, 1]]}, frame_end=49, model_version="m1"
    )
    assert export_label_studio(st, tmp_path / "tasks.json") == 2
    tasks = json.loads((tmp_path / "tasks.json").read_text())
    frame_task = next(t for t in tasks if "frame_index" in t["data"])
    result = frame_task["predictions"][0]["result"]
    assert frame_task["predictions"][0]["model_version"] == "m1"
    rebuilt = np.full(mask.shape, IGNORE_INDEX, np.uint8)
    for r in result:
        if r["type"] == "brushlabels":
            alpha = sdk.decode_rle(r["value"]["rle"]).reshape(*mask.shape, 4)[:, :, 3]
            rebuilt[alpha == 255] = DEFAULT_SCHEMA.class_id(r["value"]["brushlabels"][0])
    np.testing.assert_array_equal(rebuilt, mask)
    assert next(r for r in result if r["type"] == "choices")["value"]["choices"] == ["C1", "C3"]
    video_task = next(t for t in tasks if "video" in t["data"])
    ranges = [
        (r["value"]["ranges"][0]["start"], r["value"]["ranges"][0]["end"])
        for r in video_task["predictions"][0]["result"]
    ]
    assert ranges == [(1, 10), (11, 50)]


# --- COCO ---------------------------------------------------------------------------------------------------
def test_coco_export_rle_masks(sqlite_store, tmp_path):
    write_cholecseg8k(tmp_path / "ds", _masks(2, seed=5))
    import_cholecseg8k(sqlite_store, tmp_path / "ds")
    v = sqlite_store.video_id("video01")
    sqlite_store.record_annotation(
        v, 80, "cvs", {"values": [1, 0.5, 0], "raters": [[1, 1, 0], [1, 0, 0], [1, 0, 0]]}, source="napari"
    )
    counts = export_coco(sqlite_store, tmp_path / "coco.json")
    coco = json.loads((tmp_path / "coco.json").read_text())
    assert counts["images"] == 2 and len(coco["categories"]) == 13
    for lab in sqlite_store.training_labels("segmentation"):
        img = next(i for i in coco["images"] if i["frame"] == lab.frame_start)
        rebuilt = np.full(lab.payload["mask"].shape, IGNORE_INDEX, np.uint8)
        for a in coco["annotations"]:
            if a["image_id"] == img["id"]:
                rebuilt[coco_rle_decode(a["segmentation"]) == 1] = a["category_id"] - 1
        np.testing.assert_array_equal(rebuilt, lab.payload["mask"])
    img80 = next(i for i in coco["images"] if i["frame"] == 80)
    assert img80["ds"] == [1, 0.5, 0] and len(img80["ds_raters"]) == 3
