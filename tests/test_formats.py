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
from ls_semantics import FIXTURES, assert_same_annotations, fixture
from store_helpers import random_mask, store, store_url, write_cholecseg8k, write_phase_file  # noqa: F401

from surgenet_assist.core.encoders import coco_rle_decode
from surgenet_assist.core.errors import DatasetFormatError, SchemaError
from surgenet_assist.core.formats.cholec80 import export_cholec80, import_cholec80
from surgenet_assist.core.formats.cholecseg8k import export_cholecseg8k, import_cholecseg8k
from surgenet_assist.core.formats.coco import export_coco
from surgenet_assist.core.formats.endoscapes import import_endoscapes
from surgenet_assist.core.formats.label_studio import export_label_studio, import_label_studio
from surgenet_assist.core.label_studio_sync import ingest_webhook
from surgenet_assist.core.schema import DEFAULT_SCHEMA, IGNORE_INDEX
from surgenet_assist.core.store import LabelStore

PHASES = DEFAULT_SCHEMA.phase_names


@pytest.fixture
def sqlite_store(tmp_path):
    st = LabelStore(f"sqlite:///{tmp_path / 'f.db'}", migrate=True)
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
    other = LabelStore(f"sqlite:///{tmp_path / 'other.db'}", migrate=True)
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
# Payloads captured from a real Label Studio 1.23 (tests/fixtures/label_studio/README.md).
IMAGE_CFG, VIDEO_CFG, POLY_CFG = (fixture(f"{k}_config.xml") for k in ("image", "video", "polygon"))


def _export(store, tmp_path, name="out.json", **kw):
    export_label_studio(store, tmp_path / name, **kw)
    return json.loads((tmp_path / name).read_text())


def test_label_studio_import_of_a_real_export_exports_back_the_same(store, tmp_path):
    for kind, cfg in (("image", IMAGE_CFG), ("video", VIDEO_CFG)):
        report = import_label_studio(store, FIXTURES / f"{kind}_export.json", label_config=cfg)
        assert report.counts["new revisions"] >= 1
        ours = _export(
            store, tmp_path, annotations=True, label_config=cfg, tasks=FIXTURES / f"{kind}_export.json"
        )
        assert_same_annotations(ours, fixture(f"{kind}_export.json"))
    reasons = " ".join(r for _, r in report.skipped)  # the video export has nothing to skip
    assert "cvs" not in reasons
    seg = {(r.video_path, r.frame_start): r for r in store.training_labels("segmentation")}
    assert set(seg) == {("case07", 0), ("case07", 1), ("video09", 120)}  # upload: named by its file name
    assert {r.author for r in seg.values()} == {"ls-user:1"} and seg[("case07", 0)].source == "label-studio"
    gb, liver = DEFAULT_SCHEMA.class_id("Gallbladder"), DEFAULT_SCHEMA.class_id("Liver")
    mask = seg[("case07", 0)].payload["mask"]
    assert mask[45, 60] == gb and mask[45, 35] == liver and mask[0, 0] == IGNORE_INDEX  # later stroke on top
    assert store.training_labels("cvs")[0].payload["values"] == [1.0, 0.0, 1.0]
    phase = store.phase_labels(store.video_id("/data/local-files/?d=videos/case10.mp4"))
    assert list(phase[:25]) == [0] * 8 + [1] * 17
    again = import_label_studio(store, FIXTURES / "image_export.json", label_config=IMAGE_CFG)
    assert again.counts["new revisions"] == 0
    skipped = " ".join(r for _, r in again.skipped)
    assert "cancelled" in skipped and "no annotations" in skipped


def _labels(st):
    out = []
    for task in ("segmentation", "phase", "cvs"):
        for r in st.training_labels(task):
            payload = dict(r.payload)
            if "mask" in payload:
                payload["mask"] = payload["mask"].tobytes().hex()
            out.append((r.video_path, r.frame_start, r.task, r.author, json.dumps(payload, sort_keys=True)))
    return sorted(out)


def test_label_studio_export_without_tasks_reimports_to_the_same_labels(store, sqlite_store, tmp_path):
    import_label_studio(store, FIXTURES / "image_export.json")  # no config: by type and values
    tasks = _export(store, tmp_path, annotations=True)  # default config: the one `ls config` generates
    assert {r["from_name"] for t in tasks for a in t["annotations"] for r in a["result"]} == {
        "mask",
        "cvs",
        "phase",
    }
    assert {(t["data"]["source_video"], t["data"]["frame_index"]) for t in tasks} == {
        ("case07", 0),
        ("case07", 1),
        ("video09", 120),
    }
    assert all(a["completed_by"] == 1 for t in tasks for a in t["annotations"])
    import_label_studio(sqlite_store, tmp_path / "out.json")
    assert _labels(sqlite_store) == _labels(store)


def test_captured_webhooks_build_what_label_studio_holds(store, tmp_path):
    bodies = fixture("webhooks.json")
    results = [ingest_webhook(store, b) for b in bodies]
    assert [r["action"] for r in results] == [b["action"] for b in bodies]
    for kind, cfg in (("image", IMAGE_CFG), ("video", VIDEO_CFG)):
        ours = _export(
            store, tmp_path, annotations=True, label_config=cfg, tasks=FIXTURES / f"{kind}_export.json"
        )
        assert_same_annotations(ours, fixture(f"{kind}_export.json"))
    # the update dropped the phase of frame 1 and the clip CVS; the video's boundary moved from 12|13 to 8|9
    assert store.label_for(store.video_id("case07"), 1, "phase") is None
    video = store.video_id("/data/local-files/?d=videos/case10.mp4")
    assert list(store.phase_labels(video)) == [0] * 8 + [1] * 17
    assert [r["tombstones"] for r in results if r["action"] == "ANNOTATIONS_DELETED"] == [1]
    skipped = [s for r in results for a in r.get("annotations", []) for s in a["skipped"]]
    assert any("video task" in s for s in skipped)  # the clip-level CVS choice
    before = store.stats()["annotations"]
    for b in bodies:
        ingest_webhook(store, b)  # redelivery of everything: nothing changes, not even history
    assert store.stats()["annotations"] == before
    for kind, cfg in (("image", IMAGE_CFG), ("video", VIDEO_CFG)):
        ours = _export(
            store, tmp_path, annotations=True, label_config=cfg, tasks=FIXTURES / f"{kind}_export.json"
        )
        assert_same_annotations(ours, fixture(f"{kind}_export.json"))
    # one identity: importing Label Studio's export of the same annotations adds nothing
    for kind in ("image", "video", "polygon"):
        report = import_label_studio(
            store, FIXTURES / f"{kind}_export.json", label_config=fixture(f"{kind}_config.xml")
        )
        assert report.counts["new revisions"] == 0, kind


def _polygon_pixels(points, h, w):
    """Pixel centres inside a polygon given in percent (matplotlib's point-in-polygon, not OpenCV)."""
    from matplotlib.path import Path as MplPath

    yy, xx = np.mgrid[0:h, 0:w]
    centres = np.stack([(xx.ravel() + 0.5) / w * 100, (yy.ravel() + 0.5) / h * 100], axis=1)
    return MplPath(points).contains_points(centres).reshape(h, w)


def test_polygons_import_and_webhook_agree(store):
    report = import_label_studio(store, FIXTURES / "polygon_export.json", label_config=POLY_CFG)
    assert report.counts["new revisions"] == 2  # mask + CVS
    rec = store.training_labels("segmentation")[0]
    mask = rec.payload["mask"]
    regions = fixture("polygon_export.json")[0]["annotations"][0]["result"]
    h, w = mask.shape
    expected = np.full((h, w), IGNORE_INDEX, np.uint8)
    for r in regions:
        if r["type"] == "polygonlabels":
            inside = _polygon_pixels(r["value"]["points"], h, w)
            expected[inside] = DEFAULT_SCHEMA.class_id(r["value"]["polygonlabels"][0])
    assert (mask != expected).sum() <= 0.02 * mask.size  # edge pixels may differ by rasteriser
    assert (mask == DEFAULT_SCHEMA.class_id("Liver")).sum() > 100
    body = next(b for b in fixture("webhooks.json") if "PolygonLabels" in b["project"]["label_config"])
    out = ingest_webhook(store, body)["annotations"][0]
    assert out["labels"]["segmentation"]["created"] is False  # same identity, same mask: nothing new


def test_label_studio_unknown_labels_are_refused(store, tmp_path):
    tasks = fixture("image_export.json")
    tasks[0]["annotations"][0]["result"][1]["value"]["brushlabels"] = ["Suturing needle"]
    (tmp_path / "bad.json").write_text(json.dumps(tasks))
    with pytest.raises(SchemaError, match="task 1 annotation 1.*'Suturing needle'") as info:
        import_label_studio(store, tmp_path / "bad.json")
    assert "Gallbladder" in info.value.hint
    assert store.stats()["annotations"]["revisions"] == 0  # the valid tasks are not half-written
    # a label the project's config offers but the schema lacks: named with its control and the way to map it
    cfg = IMAGE_CFG.replace(
        '<BrushLabels name="mask" toName="image">',
        '<BrushLabels name="mask" toName="image">\n<Label value="Clip"/>',
    )
    tasks[0]["annotations"][0]["result"][1]["value"]["brushlabels"] = ["Clip"]
    (tmp_path / "bad.json").write_text(json.dumps(tasks))
    with pytest.raises(SchemaError, match="'Clip' of control 'mask'") as info:
        import_label_studio(store, tmp_path / "bad.json", label_config=cfg)
    assert "predicted_values" in info.value.hint
    video = fixture("video_export.json")
    video[0]["annotations"][0]["result"][0]["value"]["timelinelabels"] = ["Suturing"]
    (tmp_path / "bad.json").write_text(json.dumps(video))
    with pytest.raises(SchemaError, match="Suturing"):
        import_label_studio(store, tmp_path / "bad.json", label_config=VIDEO_CFG)


def test_label_studio_control_names_and_aliases_come_from_the_config(store, tmp_path):
    cfg = (
        IMAGE_CFG.replace('name="mask"', 'name="seg"')
        .replace('<Label value="Gallbladder"', '<Label value="GB" predicted_values="Gallbladder"')
        .replace(
            "</Choices>\n</View>",
            '</Choices>\n<Choices name="quality" toName="image">'
            '<Choice value="good"/><Choice value="blurry"/></Choices>\n</View>',
        )
    )
    tasks = fixture("image_export.json")[:1]
    result = tasks[0]["annotations"][0]["result"]
    for r in result:
        if r["type"] == "brushlabels":
            r["from_name"] = "seg"
            r["value"]["brushlabels"] = ["GB" if x == "Gallbladder" else x for x in r["value"]["brushlabels"]]
    quality = dict(result[3], id="q", from_name="quality", value={"choices": ["blurry"]})
    result.append(quality)
    (tmp_path / "in.json").write_text(json.dumps(tasks))
    with pytest.raises(SchemaError, match="'GB' is not a segmentation class"):
        import_label_studio(store, tmp_path / "in.json")  # without the config, "GB" means nothing
    only_quality = [dict(tasks[0], annotations=[dict(tasks[0]["annotations"][0], result=[quality])])]
    (tmp_path / "q.json").write_text(json.dumps(only_quality))
    with pytest.raises(SchemaError, match="neither CVS criteria nor one phase"):
        import_label_studio(store, tmp_path / "q.json")  # without the config, "blurry" means nothing
    report = import_label_studio(store, tmp_path / "in.json", label_config=cfg)
    assert any("'quality' is not one of ours" in r for _, r in report.skipped)
    mask = store.training_labels("segmentation")[0].payload["mask"]
    assert (mask == DEFAULT_SCHEMA.class_id("Gallbladder")).any()
    ours = _export(store, tmp_path, annotations=True, label_config=cfg, tasks=tmp_path / "in.json")
    regions = ours[0]["annotations"][0]["result"]
    assert {r["from_name"] for r in regions} == {"seg", "cvs", "phase"}
    assert ["GB"] in [r["value"].get("brushlabels") for r in regions]
    result.remove(quality)
    assert_same_annotations(ours, tasks)


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
    assert frame_task["data"] == {"source_video": "video05", "frame_index": 7}
    result = frame_task["predictions"][0]["result"]
    assert frame_task["predictions"][0]["model_version"] == "m1"
    assert frame_task["predictions"][0]["score"] == 0.4 and frame_task["annotations"] == []
    rebuilt = np.full(mask.shape, IGNORE_INDEX, np.uint8)
    for r in result:
        if r["type"] == "brushlabels":
            assert r["from_name"] == "mask"  # the control name of the generated config
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


def test_label_studio_round_trip_from_the_command_line(tmp_path):
    import typer
    from typer.testing import CliRunner

    from surgenet_assist.cli.store_commands import register

    app = typer.Typer()
    register(app)
    db, cfg = f"sqlite:///{tmp_path / 'cli.db'}", str(FIXTURES / "image_config.xml")
    export = str(FIXTURES / "image_export.json")
    r = CliRunner().invoke(
        app, ["import", "label-studio", export, "--db", db, "--label-config", cfg, "--json"]
    )
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["counts"]["new revisions"] == 6  # 3 + 1 + 2 labels of 3 frames
    out = tmp_path / "back.json"
    args = ["export", "label-studio", "--out", str(out), "--db", db, "--label-config", cfg, "--tasks", export]
    r = CliRunner().invoke(app, [*args, "--annotations"])
    assert r.exit_code == 0 and "3 Label Studio tasks with annotations" in r.output, r.output
    assert_same_annotations(json.loads(out.read_text()), fixture("image_export.json"))
    r = CliRunner().invoke(app, ["import", "cholec80", export, "--db", db, "--label-config", cfg])
    assert r.exit_code == 2 and "only for label-studio" in r.output
